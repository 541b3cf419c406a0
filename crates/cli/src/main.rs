//! leakscope: finds where a program leaks file descriptors and memory —
//! the call stacks that acquired what was never released.
//!
//! This crate is wiring only: flags → [`pipeline::Config`] → backend →
//! ledger → stacks → symbolize → report.

mod attach;
mod backends;
mod doctor;
mod pipeline;
mod record;
mod signals;
mod snoop;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes, documented in README.md, docs/leakscope.1 and `leakscope
/// --help`. Like env(1), timeout(1), nice(1) and chroot(1), leakscope keeps
/// 125, 126 and 127 for itself, so that its own failure is never mistaken
/// for the command's exit code (many programs exit with 1 or 2).
///
/// Precedence in `run`: leakscope's own failure (125, 126, 127); then a
/// command that failed (a non-zero exit or a signal: its status, also with
/// `--fail-on-leak`); then `--fail-on-leak`'s verdicts, leaks found (3)
/// before a kind not traced (4); then the command's 0.
pub mod exit {
    /// leakscope itself failed: bad usage (clap's usage errors too), no
    /// permission for eBPF, a report it cannot write, ...
    pub const ERROR: u8 = 125;
    /// `doctor`: no backend works on this machine (its answer, not its
    /// failure).
    pub const NO_BACKEND: u8 = 1;
    /// `--fail-on-leak` was given and leaks were found.
    pub const LEAKS_FOUND: u8 = 3;
    /// `--fail-on-leak` was given, no leaks were found, but a kind asked
    /// for (by `--track` or by default) was not traced, or not in every
    /// process: "no leaks" would be a guess.
    pub const NOT_TRACED: u8 = 4;
    /// The command exists but cannot be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
    /// `report`: the file is not a recording, or a corrupt one, one cut
    /// before its first complete chunk, or one of a newer format.
    pub const BAD_RECORDING: u8 = 5;
}

const AFTER_HELP: &str = "\
EXIT STATUS:
  leakscope exits as the traced command did (if it was killed by a signal,
  leakscope kills itself with the same signal; core-dumping ones give
  128+N), also with --fail-on-leak when the command failed. Otherwise:
    3    --fail-on-leak was given and leaks were found
    4    --fail-on-leak was given, no leaks were found, but a kind asked
         for (by --track or by default) was not traced, or not in every
         process (no permission for eBPF, a statically linked program
         under the heap shim, ...): the report's first line says which
  125    leakscope failed (bad usage, no permission for eBPF, a program
         the verifier rejected, a report it cannot write, ...;
         `leakscope doctor` says why)
  126    the command is not executable
  127    the command was not found

EXAMPLES:
  leakscope run -- ./server --port 8080           # fds and heap
  leakscope run --format json -o report.json -- ./myprog
  leakscope run --fail-on-leak -- ./test-binary
  leakscope run --track fd --top 5 -- make check
  leakscope run --track tcp -- ./server        # sockets left in CLOSE_WAIT
  leakscope run --backend preload --track heap -- ./myprog   # no root needed
  leakscope run --track heap --suppressions lsan.supp -- ./myprog";

const RECORD_HELP: &str = "\
The recording keeps, in full, only what is outstanding: resources acquired
and released again between two commits (--commit-every) are counted, not
written. It is written in checksummed chunks, so the file of a recorder
that was killed reads up to its last complete chunk. Exit status: the
command's, as with run (0 with -p); 125 when leakscope failed.

EXAMPLES:
  leakscope record -o qa.lsr -- ./test-suite
  leakscope record -o qa.lsr -p 4242 --duration 7h
  leakscope report qa.lsr";

const REPORT_HELP: &str = "\
Exit status: 0; 5 when the file is not a recording, is corrupt, ends
before its first complete chunk, or was written by a newer leakscope (one
line says which); 125 when it cannot be read or the report not written.

EXAMPLES:
  leakscope report qa.lsr
  leakscope report qa.lsr --format json -o qa.json";

const ATTACH_HELP: &str = "\
Resources open before tracing began are listed apart, without a stack, and
are never counted as leaks. fds are traced with eBPF (root), or with ptrace
(the process's owner suffices; --backend auto falls back to it): every
thread is seized, and since no seccomp filter can be added to a running
process, each of its syscalls stops it while attached (tens of
microseconds each, as under strace -p). Ctrl-C or --duration detaches, and
the process runs on untraced. Exit status: 0, or 3 with --fail-on-leak
when leaks were found (4 when none were but a kind was not traced), or 125
when leakscope failed (bad usage, no such process, ptrace refused and no
permission for eBPF: the error says what to change).

EXAMPLES:
  leakscope attach -p 4242                  # until the process exits or Ctrl-C
  leakscope attach -p 4242 --backend ptrace --duration 60   # no root needed
  leakscope attach -p 4242 --interval 60    # a report every minute, with growth
  leakscope attach -p 4242 --track tcp      # sockets left in CLOSE_WAIT
  leakscope attach -p 4242 --min-age 30 --format json -o leaks.json";

#[derive(Parser, Debug)]
#[command(
    name = "leakscope",
    version,
    about = "Find where a program leaks file descriptors and memory: the call \
             stacks that acquired what was never released.",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command, trace it and all its children, report leaks when it exits.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Trace a running process (and children it forks) until it exits or Ctrl-C.
    #[command(after_help = ATTACH_HELP)]
    Attach(attach::AttachArgs),
    /// Print fd syscalls (open, close, unlink, socket, ...) live as they happen.
    #[command(after_help = snoop::AFTER_HELP)]
    Snoop(snoop::SnoopArgs),
    /// Run a command (or attach to a process with -p) and record what it
    /// leaves outstanding into a file, for `report` later or elsewhere.
    #[command(after_help = RECORD_HELP)]
    Record(record::RecordArgs),
    /// Report a recording made by `record` (or `run --record`).
    #[command(after_help = REPORT_HELP)]
    Report(record::ReportArgs),
    /// Check which backends work on this machine, and why not (loads each
    /// eBPF program: the verifier's cost per program).
    #[command(after_help = doctor::AFTER_HELP)]
    Doctor(doctor::DoctorArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable, 80 columns.
    Text,
    /// JSON, contract v1.
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Track {
    /// File descriptors of every kind (files, sockets, pipes, ...).
    Fd,
    /// Heap blocks (malloc family, C++ new) never freed.
    Heap,
    /// TCP sockets stranded in CLOSE_WAIT (the peer closed, we never did).
    Tcp,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The best backend for each kind: ebpf for fds, preload for the heap.
    Auto,
    /// eBPF syscall tracepoints; needs root or CAP_BPF+CAP_PERFMON.
    Ebpf,
    /// An LD_PRELOAD shim interposing the allocator; no privileges; heap only.
    Preload,
    /// seccomp-filtered ptrace; no privileges; fds only.
    Ptrace,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write the report to FILE (`-` for stdout) instead of stderr; checked
    /// before the command runs.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Exit with 3 when leaks were found (a CI gate), with 4 when none were
    /// but a kind asked for could not be traced; a command that failed
    /// keeps its own exit status.
    #[arg(long)]
    fail_on_leak: bool,
    /// What to track (comma-separated) [default: fd,heap,tcp with eBPF;
    /// without it fd (ptrace),heap, and the report says what was not traced].
    #[arg(long, value_enum, value_delimiter = ',')]
    track: Option<Vec<Track>>,
    /// Show at most N leak groups in text output.
    #[arg(long, default_value_t = 20, value_name = "N")]
    top: usize,
    /// Tracing backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    #[command(flatten)]
    suppress: SuppressArgs,
    /// Also save the recording the report is made of to FILE (mode
    /// 0600), for `leakscope report FILE` later.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Report when every process the command started has exited (`all`,
    /// the default), or when the command itself has (`main`: processes it
    /// left running, a daemon, are listed as still running).
    #[arg(long, value_enum, default_value_t = Wait::All)]
    wait: Wait,
    /// The command to run, after `--`.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `--wait`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Every process the command started.
    All,
    /// The command's own process.
    Main,
}

/// Which leak groups not to report (run and attach).
#[derive(clap::Args, Debug)]
pub struct SuppressArgs {
    /// Do not report leak groups whose stack matches a `leak:PATTERN` line
    /// of FILE (LeakSanitizer's format: a function, source file or module
    /// name; `*` wildcards, `^`/`$` anchors). Repeatable. What was
    /// suppressed is counted in the summary. Other sanitizers' lines
    /// (`called_from_lib:`, `interceptor_via_fun:`, ...) are skipped with
    /// a warning.
    #[arg(long = "suppressions", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Also report what glibc, libstdc++ and Rust's std keep until exit
    /// (locale, NSS, stdio buffers, thread TLS, the exception pool),
    /// which it keeps until exit by design and leakscope suppresses by
    /// default.
    #[arg(long)]
    no_default_suppressions: bool,
}

impl SuppressArgs {
    /// The rules: the defaults unless turned off, then each file's.
    pub fn load(&self) -> anyhow::Result<leakscope_report::Suppressions> {
        let mut s = if self.no_default_suppressions {
            leakscope_report::Suppressions::none()
        } else {
            leakscope_report::Suppressions::defaults()
        };
        for f in &self.files {
            let ignored = s
                .add_file(f)
                .map_err(|e| pipeline::fatal(exit::ERROR, e.to_string()))?;
            // A file shared with AddressSanitizer: its other types are
            // not ours, and not an error (issue 10).
            if let Some(w) = ignored.warning(&f.display().to_string()) {
                eprintln!("leakscope: warning: {w}");
            }
        }
        Ok(s)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::ERROR } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Run(args) => report_error(run(args)),
        Command::Attach(args) => report_error(attach::run(args)),
        Command::Snoop(args) => report_error(snoop::run(args)),
        Command::Record(args) => report_error(record::run(args)),
        Command::Report(args) => report_error(record::report(args)),
        Command::Doctor(args) => report_error(doctor::run(args)),
    }
}

fn report_error(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leakscope: error: {e:#}");
            ExitCode::from(
                e.downcast_ref::<pipeline::Fatal>()
                    .map_or(exit::ERROR, |f| f.code),
            )
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    check_output(args.output.as_deref())?;
    let track = args.track.clone().unwrap_or(vec![Track::Fd, Track::Heap]);
    let config = pipeline::Config {
        command: args.command.clone(),
        tracking: backends::Tracking {
            fd: track.contains(&Track::Fd),
            heap: track.contains(&Track::Heap),
            tcp: track.contains(&Track::Tcp),
        },
        // Not asked for by name: fds are dropped, and the report says so, when eBPF
        // is not permitted.
        fd_optional: args.track.is_none(),
        backend: match args.backend {
            BackendChoice::Auto => backends::Choice::Auto,
            BackendChoice::Ebpf => backends::Choice::Ebpf,
            BackendChoice::Preload => backends::Choice::Preload,
            BackendChoice::Ptrace => backends::Choice::Ptrace,
        },
        suppressions: args.suppress.load()?,
        wait_main: args.wait == Wait::Main,
    };
    let outcome = pipeline::run(&config, args.record.as_deref())?;
    let leaks_found = !outcome.report.leaks.is_empty();
    let text = match args.format {
        Format::Text => leakscope_report::render_text(&outcome.report, args.top),
        Format::Json => leakscope_report::render_json(&outcome.report),
    };
    write_report(args.output.as_deref(), &text)?;
    // The command's own failure comes first (see `exit`): a CI gate must
    // not turn a crash into "leaks found".
    let command_failed = !matches!(outcome.status, pipeline::Status::Code(0));
    if args.fail_on_leak && !command_failed && leaks_found {
        return Ok(ExitCode::from(exit::LEAKS_FOUND));
    }
    if args.fail_on_leak && !command_failed && !outcome.report.fully_traced() {
        return Ok(ExitCode::from(exit::NOT_TRACED));
    }
    match outcome.status {
        pipeline::Status::Code(c) => Ok(ExitCode::from(c as u8)),
        pipeline::Status::Signal(sig) => {
            // Re-raise terminating signals so a shell sees what the command
            // got; core-dumping ones are only reported as 128+N, so that
            // leakscope does not dump core itself.
            if [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGPIPE,
                libc::SIGKILL,
            ]
            .contains(&sig)
            {
                signals::die_by(sig);
            }
            Ok(ExitCode::from(128u8.wrapping_add(sig as u8)))
        }
    }
}

/// Fails now, before anything is traced, when the report could not be
/// written to `path` at the end (issue 10: a whole run was lost to a typo
/// in `-o`). A file that exists is opened for writing and left as it is;
/// one that does not is created and removed again. FIFOs and devices are
/// only required to exist: opening a FIFO would wait for its reader.
pub(crate) fn check_output(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::fs::OpenOptions;
    use std::io::ErrorKind;
    let Some(p) = path.filter(|p| p.as_os_str() != "-") else {
        return Ok(());
    };
    let why = |e: std::io::Error| -> String {
        match e.kind() {
            ErrorKind::NotFound => match p.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) => format!("no such directory: {}", d.display()),
                None => "no such file or directory".into(),
            },
            ErrorKind::PermissionDenied => "permission denied".into(),
            ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
            ErrorKind::IsADirectory => "it is a directory".into(),
            ErrorKind::NotADirectory => "a part of the path is not a directory".into(),
            _ => {
                let s = e.to_string();
                s.split(" (os error").next().unwrap_or(&s).to_lowercase()
            }
        }
    };
    let result = match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Err("it is a directory".to_string()),
        Ok(m) if m.is_file() => OpenOptions::new()
            .write(true)
            .open(p)
            .map(drop)
            .map_err(why),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .map(|_| {
                let _ = std::fs::remove_file(p);
            })
            .map_err(why),
        Err(e) => Err(why(e)),
    };
    result.map_err(|why| {
        pipeline::fatal(
            exit::ERROR,
            format!("cannot write the report to {}: {why}", p.display()),
        )
    })
}

pub(crate) fn write_report(
    path: Option<&std::path::Path>,
    text: impl AsRef<[u8]>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = text.as_ref();
    let result = match path {
        None => std::io::stderr().write_all(text),
        Some(p) if p.as_os_str() == "-" => std::io::stdout().write_all(text),
        Some(p) => std::fs::write(p, text),
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.with_context(|| {
            format!(
                "cannot write the report to {}",
                path.map_or("stderr".into(), |p| p.display().to_string())
            )
        }),
    }
}
