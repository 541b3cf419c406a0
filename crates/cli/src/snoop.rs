//! `leakscope snoop`: fd syscalls printed live, one line (or one JSON
//! object) per event, until Ctrl-C or `--duration`.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use leakscope_snoop::{render, Filter, Item, Snooper};

use crate::signals;

pub const AFTER_HELP: &str = "\
Traced syscalls: open openat openat2 creat close close_range unlink unlinkat
rename renameat renameat2 socket connect accept accept4 bind listen shutdown
pipe pipe2 dup dup2 dup3 eventfd2 epoll_create1 memfd_create socketpair fcntl.
Filters run in the kernel. Events the kernel had to drop are shown inline as
`# lost N events` (JSON: {\"lost\":N}) and counted in the summary on stderr.
Calls already in progress when tracing starts are not shown.

Exit status: 0 after Ctrl-C, SIGTERM or --duration; 125 when leakscope
failed (bad usage, unknown syscall name, no such pid, no permission for
eBPF).

EXAMPLES:
  leakscope snoop                                          # every process
  leakscope snoop -n myapp --syscalls open,close,unlink --entry
  leakscope snoop -p 4242 --format json | jq .
  leakscope snoop --failed --duration 10                   # 10 s of errors";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SnoopFormat {
    /// Aligned columns: TIME PID TID COMM SYSCALL RET/ERR LAT(us) ARGS.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct SnoopArgs {
    /// Only this process (repeatable); its children are not followed.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Only threads whose name (comm, at most 15 bytes) is exactly COMM.
    #[arg(short = 'n', long = "name", value_name = "COMM")]
    name: Option<String>,
    /// Only these syscalls (comma-separated, e.g. open,close,unlink).
    #[arg(long, value_name = "LIST")]
    syscalls: Option<String>,
    /// Show syscall entries too (arguments as they were at entry).
    #[arg(long)]
    entry: bool,
    /// Only calls that failed.
    #[arg(long)]
    failed: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = SnoopFormat::Text)]
    format: SnoopFormat,
    /// Stop after SECS seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
}

/// How long a `-n COMM` may match nothing before saying so.
const NO_MATCH_NOTE_AFTER: Duration = Duration::from_secs(3);
/// Upper bound on how late an event is printed (the kernel wakes the
/// reader early when 256 KiB are waiting).
const POLL: Duration = Duration::from_millis(100);
/// Write out when this much text is pending.
const WRITE_AT: usize = 1 << 20;

pub fn run(args: SnoopArgs) -> anyhow::Result<ExitCode> {
    let syscalls = match &args.syscalls {
        Some(list) => leakscope_snoop::parse_syscalls(list).context("--syscalls")?,
        None => Vec::new(),
    };
    let duration = match args.duration {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            anyhow::bail!("--duration must be a positive number of seconds, not {s}")
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let filter = Filter {
        pids: args.pids.clone(),
        comm: args.name.clone(),
        syscalls,
        failed_only: args.failed,
        entry: args.entry,
    };
    let mut snoop = Snooper::new(&filter).map_err(|e| match e {
        leakscope_snoop::Error::Load(e) => anyhow::anyhow!(
            "{e}; snoop has no backend without eBPF (`leakscope doctor` shows what works here)"
        ),
        e => e.into(),
    })?;
    signals::install();
    eprintln!("{}", banner(&filter));

    let start = Instant::now();
    let mut clock = render::Clock::new();
    let mut buf = String::with_capacity(WRITE_AT + 64 * 1024);
    let json = args.format == SnoopFormat::Json;
    if !json {
        buf.push_str(&render::text_header());
        buf.push('\n');
    }
    let mut stdout = io::stdout().lock();
    let mut closed = false; // stdout is a closed pipe: stop quietly
    let mut noted = false;
    loop {
        let elapsed = start.elapsed();
        let stopping =
            signals::take().is_some() || duration.is_some_and(|d| elapsed >= d) || closed;
        let timeout = duration.map_or(POLL, |d| d.saturating_sub(elapsed).min(POLL));
        let mut sink = |item: Item| {
            match item {
                Item::Event(e) if json => render::json(&e, &clock, &mut buf),
                Item::Event(e) => render::text(&e, &mut clock, &mut buf),
                Item::Lost(n) if json => buf.push_str(&format!("{{\"lost\":{n}}}\n")),
                Item::Lost(n) => buf.push_str(&format!("# lost {n} events\n")),
            }
            if buf.len() >= WRITE_AT && !closed {
                closed = write_out(&mut stdout, &mut buf);
            }
        };
        if stopping {
            snoop.flush(&mut sink)?;
        } else {
            snoop.poll(timeout, &mut sink)?;
        }
        if !closed {
            closed = write_out(&mut stdout, &mut buf);
        }
        if stopping {
            break;
        }
        if let Some(comm) = &filter.comm {
            if !noted && snoop.events() == 0 && start.elapsed() >= NO_MATCH_NOTE_AFTER {
                eprintln!(
                    "leakscope: no process named {comm} has made a traced syscall yet; \
                     still waiting"
                );
                noted = true;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let events = snoop.events();
    let lost = snoop.lost();
    drop(snoop);
    eprintln!(
        "leakscope: {events} events, {lost} lost in {secs:.1} s ({:.0} events/s)",
        events as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes and clears `buf`; true if stdout is gone (EPIPE), which ends
/// snoop normally, like `head` closing a pipe.
fn write_out(stdout: &mut io::StdoutLock, buf: &mut String) -> bool {
    let result = stdout
        .write_all(buf.as_bytes())
        .and_then(|_| stdout.flush());
    buf.clear();
    match result {
        Ok(()) => false,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("leakscope: cannot write to stdout: {e}");
            true
        }
    }
}

/// `Tracing fd syscall returns of all processes (ebpf). Ctrl-C to end.`
fn banner(f: &Filter) -> String {
    let what = match (f.syscalls.is_empty(), f.failed_only) {
        (true, false) => "fd syscall".to_string(),
        (true, true) => "failed fd syscall".to_string(),
        (false, false) => f.syscalls.join(","),
        (false, true) => format!("failed {}", f.syscalls.join(",")),
    };
    let phases = if f.entry {
        "entries and returns"
    } else {
        "returns"
    };
    let mut whom = Vec::new();
    if !f.pids.is_empty() {
        let pids: Vec<String> = f.pids.iter().map(u32::to_string).collect();
        whom.push(format!("pid {}", pids.join(", ")));
    }
    if let Some(comm) = &f.comm {
        whom.push(format!("processes named {comm}"));
    }
    let whom = if whom.is_empty() {
        "all processes".to_string()
    } else {
        whom.join(" and ")
    };
    format!("Tracing {what} {phases} of {whom} (ebpf). Ctrl-C to end.")
}
