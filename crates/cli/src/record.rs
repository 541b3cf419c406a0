//! `record` (a trace into a recording file, launched or attached) and
//! `report` (the report of a recording). `run` is the same `record`, into
//! memory, followed by the same report ([`report_of`]).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use leakscope_event::{Backend, Event, FdKind, Pid, StackId};
use leakscope_ledger::Leak;
use leakscope_record::{Recording, Traced as RecTraced};
use leakscope_report::{Counts, Coverage, Group, Preexisting, Report, Target, Traced};

use crate::backends::{self, Tracking};
use crate::pipeline::{apply, exec_note, fatal, lost_note, DRAIN};
use crate::{exit, signals, BackendChoice, Track};

/// `leakscope record` arguments.
#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// The recording to write (created with mode 0600; replaced if it
    /// exists).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Attach to this running process instead of running a command.
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pid: Option<u32>,
    /// With -p: stop after this long (`90`, `90s`, `30m`, `7h`, `2d`);
    /// default: until the process exits or Ctrl-C.
    #[arg(long, value_name = "D", value_parser = parse_duration, requires = "pid")]
    duration: Option<Duration>,
    /// What to track (comma-separated) [default: as `run` for a command
    /// (fd,heap, and tcp with eBPF), fd with -p].
    #[arg(long, value_enum, value_delimiter = ',')]
    track: Option<Vec<Track>>,
    /// Tracing backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Write what changed every SECS seconds: the most a recorder that
    /// is killed loses, and the resolution of growth over time.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    commit_every: f64,
    /// With a command: end when every process it started has exited
    /// (`all`), or when it has (`main`).
    #[arg(long, value_enum, default_value_t = crate::Wait::All)]
    wait: crate::Wait,
    /// The command to run, after `--`.
    #[arg(
        trailing_var_arg = true,
        value_name = "COMMAND",
        required_unless_present = "pid"
    )]
    command: Vec<String>,
}

/// `leakscope report` arguments.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The recording (`leakscope record -o FILE`, `run --record FILE`).
    #[arg(value_name = "RECORDING")]
    recording: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    format: ReportFormat,
    /// Write the report to FILE (`-` for stdout) instead of stderr; pprof
    /// and svg need it.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Show at most N leak groups in text output.
    #[arg(long, default_value_t = 20, value_name = "N")]
    top: usize,
    /// Also look for the debug information of stripped modules in DIR,
    /// by build id (`DIR/.build-id/ab/cdef....debug`) or by
    /// `.gnu_debuglink` under DIR; repeatable.
    #[arg(long = "debug-dir", value_name = "DIR")]
    debug_dirs: Vec<PathBuf>,
    /// Instead of the report, print a suppression file with one
    /// `leak:FUNCTION` rule per reported group (the function the report
    /// names it after), for `--suppressions` once the leaks are known.
    #[arg(long, conflicts_with = "format")]
    gen_suppressions: bool,
    #[command(flatten)]
    suppress: crate::SuppressArgs,
}

/// `report --format`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Human-readable, as `run` prints it.
    Text,
    /// JSON, contract v1, as `run --format json` writes it.
    Json,
    /// Gzipped pprof profile (profile.proto): one sample per group,
    /// valued by its outstanding count and bytes, for `go tool pprof`,
    /// Pyroscope, Parca.
    Pprof,
    /// Flame graph (SVG) of outstanding resources by count.
    Svg,
    /// One self-contained page: summary, growth chart per top group,
    /// table of every group with its stack.
    Html,
}

/// `90`, `90s`, `30m`, `7h`, `2d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s} (try 90, 90s, 30m, 7h, 2d)"))?;
    let mult = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("unknown unit in {s}: s, m, h or d")),
    };
    if !(n * mult).is_finite() || n < 0.0 {
        return Err(format!("not a duration: {s}"));
    }
    Ok(Duration::from_secs_f64(n * mult))
}

/// Creates (or replaces) a recording file, readable by its owner only:
/// a recording names files, addresses and command lines.
pub fn create(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| {
            // An existing file keeps its mode through O_TRUNC.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(f)
        })
        .map_err(|e| {
            let s = e.to_string();
            let why = s.split(" (os error").next().unwrap_or(&s).to_lowercase();
            fatal(
                exit::ERROR,
                format!("cannot write the recording to {}: {why}", path.display()),
            )
        })?;
    Ok(f)
}

pub fn coverage_to_record(c: &[Coverage]) -> Vec<leakscope_record::Coverage> {
    c.iter()
        .map(|c| leakscope_record::Coverage {
            kind: c.kind.clone(),
            requested: c.requested,
            traced: match c.traced {
                Traced::All => RecTraced::All,
                Traced::Part => RecTraced::Part,
                Traced::None => RecTraced::None,
            },
            reason: c.reason.clone(),
        })
        .collect()
}

/// The report of a recording: the same for `run` (of its recording in
/// memory) and `report` (of a file).
pub fn report_of(rec: &Recording, suppressions: &leakscope_report::Suppressions) -> Report {
    report_of_sourced(rec, suppressions, &[]).0
}

/// [`report_of`], with the recording's stacks of each group (in the
/// report's order), whose growth series the recording holds.
pub fn report_of_sourced(
    rec: &Recording,
    suppressions: &leakscope_report::Suppressions,
    debug_dirs: &[PathBuf],
) -> (Report, Vec<Vec<StackId>>) {
    let tracking = Tracking {
        fd: rec.meta.fd,
        heap: rec.meta.heap,
        tcp: rec.meta.tcp,
    };
    let mut leaks: Vec<(Leak, Option<String>)> = rec
        .leaks
        .iter()
        .map(|r| (r.leak.clone(), r.kept.clone()))
        .collect();
    // Stable: equal keys keep the order they were recorded in.
    leaks.sort_by_key(|(l, _)| (l.resource.time(), l.holder, l.fd));
    let (sourced, kept) = crate::pipeline::group_leaks_sourced(
        leaks,
        &|id| &rec.stacks[id.0 as usize],
        tracking,
        suppressions.has_defaults(),
        // --debug-dir first, then the system's (Debian's -dbgsym packages).
        &mut leakscope_symbolize::Symbolizer::with_debug_dirs(
            debug_dirs
                .iter()
                .cloned()
                .chain(
                    leakscope_symbolize::DEFAULT_DEBUG_DIRS
                        .iter()
                        .map(PathBuf::from),
                )
                .collect(),
        ),
    );
    let (groups, mut all_sources): (Vec<Group>, Vec<Vec<StackId>>) = sourced.into_iter().unzip();
    let fingerprints: Vec<(u64, u64, u64, u64, usize)> = groups.iter().map(fingerprint).collect();
    let (groups, mut suppressed) = suppressions.apply(groups);
    // What suppressions keep is a subsequence of what they are given, in
    // order: walk both to give each kept group its stacks.
    let mut sources = Vec::with_capacity(groups.len());
    let mut next = 0;
    for g in &groups {
        let f = fingerprint(g);
        while next < fingerprints.len() && fingerprints[next] != f {
            next += 1;
        }
        sources.push(
            all_sources
                .get_mut(next)
                .map(std::mem::take)
                .unwrap_or_default(),
        );
        next += 1;
    }
    suppressed.extend(kept);
    let p = &rec.progress;
    let end = rec.end.clone().unwrap_or_default();
    let mut notes = end.notes.clone();
    notes.extend(lost_note(p.lost));
    notes.extend(exec_note(end.freed_by_exec));
    if rec.end.is_none() {
        notes.push(format!(
            "the recording ends at {:.1} s, its last complete chunk: the recorder \
             stopped before the trace ended (killed?); what it holds is reported",
            p.duration_s
        ));
    }
    let report = Report {
        target: Target {
            command: rec.meta.command.clone(),
            pid: rec.meta.pid,
            exit_code: end.exit_code,
            signal: end.signal.clone(),
        },
        backend: if end.backend.is_empty() {
            "unknown".into()
        } else {
            end.backend.clone()
        },
        duration_s: p.duration_s,
        events: Counts {
            total: p.events,
            lost: p.lost,
            settled: p.settled,
        },
        notes,
        coverage: end
            .coverage
            .iter()
            .map(|c| Coverage {
                kind: c.kind.clone(),
                requested: c.requested,
                traced: match c.traced {
                    RecTraced::All => Traced::All,
                    RecTraced::Part => Traced::Part,
                    RecTraced::None => Traced::None,
                },
                reason: c.reason.clone(),
            })
            .collect(),
        leaks: groups,
        suppressed,
        preexisting: end
            .preexisting
            .iter()
            .map(|p| Preexisting {
                pid: p.pid,
                fd: p.fd,
                detail: p.detail.clone(),
            })
            .collect(),
    };
    (report, sources)
}

/// A suppression file for `report`'s groups: a comment saying what each
/// rule stands for, then `leak:FUNCTION` (the group's culprit), once per
/// function. Groups without a named frame get no rule (a comment says so).
fn suppressions_for(report: &Report) -> String {
    let mut out = format!(
        "# leakscope --gen-suppressions: a rule per leak group of `{}`\n",
        report.target.command.join(" ")
    );
    let mut seen = HashSet::new();
    for g in &report.leaks {
        let name = leakscope_report::culprit(&g.stack).and_then(|f| f.function.clone());
        let what = format!("{} {} ({} bytes)", g.count, g.resource, g.bytes);
        match name {
            Some(n) if seen.insert(n.clone()) => {
                out.push_str(&format!("# {what}\nleak:{n}\n"));
            }
            Some(n) => out.push_str(&format!("# {what}: leak:{n} above\n")),
            None => out.push_str(&format!("# {what}: no named frame, no rule\n")),
        }
    }
    out
}

/// Enough of a group to find it again among those it was kept from
/// (suppressions move groups, they never change them).
fn fingerprint(g: &Group) -> (u64, u64, u64, u64, usize) {
    (
        g.count,
        g.bytes,
        g.first_s.to_bits(),
        g.last_s.to_bits(),
        g.stack.len(),
    )
}

/// Outstanding count over time of a report group, from the series of its
/// stacks in the recording (those of its kind): `(seconds, count)` at
/// each commit where it changed.
pub fn growth_of(rec: &Recording, group: &Group, sources: &[StackId]) -> Vec<(f64, u64)> {
    let kind_matches = |code: u8| -> bool {
        let name = if code == leakscope_record::HEAP {
            "heap"
        } else {
            match FdKind::ALL.get(usize::from(code)) {
                Some(k) => k.name(),
                None => return false,
            }
        };
        name == group.resource || (group.kind == "tcp" && name == "socket")
    };
    let wanted: HashSet<u32> = sources.iter().map(|s| s.0 as u32).collect();
    let mut current: HashMap<(u32, u8), u64> = HashMap::new();
    let mut out: Vec<(f64, u64)> = Vec::new();
    for p in &rec.growth {
        let mut changed = false;
        for e in &p.changed {
            if wanted.contains(&e.stack) && kind_matches(e.kind) {
                current.insert((e.stack, e.kind), e.count);
                changed = true;
            }
        }
        if changed {
            out.push((p.time.secs(), current.values().sum()));
        }
    }
    out
}

fn choice(b: BackendChoice) -> backends::Choice {
    match b {
        BackendChoice::Auto => backends::Choice::Auto,
        BackendChoice::Ebpf => backends::Choice::Ebpf,
        BackendChoice::Preload => backends::Choice::Preload,
        BackendChoice::Ptrace => backends::Choice::Ptrace,
    }
}

fn tracking(track: &[Track]) -> Tracking {
    Tracking {
        fd: track.contains(&Track::Fd),
        heap: track.contains(&Track::Heap),
        tcp: track.contains(&Track::Tcp),
    }
}

/// `leakscope record`.
pub fn run(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let file = create(&args.output)?;
    let every = Duration::from_secs_f64(args.commit_every.clamp(0.1, 86400.0));
    let (file, code) = match args.pid {
        Some(pid) => (
            trace_attach(&args, Pid(pid), file, every)?,
            ExitCode::SUCCESS,
        ),
        None => {
            let track = args.track.clone().unwrap_or(vec![Track::Fd, Track::Heap]);
            let config = crate::pipeline::Config {
                command: args.command.clone(),
                tracking: tracking(&track),
                backend: choice(args.backend),
                suppressions: leakscope_report::Suppressions::none(),
                fd_optional: args.track.is_none(),
                wait_main: args.wait == crate::Wait::Main,
            };
            let (file, status) = crate::pipeline::trace(&config, file, every)?;
            let code = match status {
                crate::pipeline::Status::Code(c) => ExitCode::from(c as u8),
                crate::pipeline::Status::Signal(s) => ExitCode::from(128u8.wrapping_add(s as u8)),
            };
            (file, code)
        }
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "leakscope: recorded into {} ({size} bytes); `leakscope report {}` reports it",
        args.output.display(),
        args.output.display()
    );
    Ok(code)
}

/// `record -p`: traces a running process into `out` until it exits,
/// Ctrl-C or `--duration`.
fn trace_attach(args: &RecordArgs, pid: Pid, out: File, every: Duration) -> anyhow::Result<File> {
    if !crate::attach::alive(pid) {
        return Err(fatal(exit::ERROR, format!("no such process: {}", pid.0)));
    }
    let track = args.track.clone().unwrap_or(vec![Track::Fd]);
    let tracking = tracking(&track);
    let mut backend = backends::open(
        tracking,
        choice(args.backend),
        backends::Mode::Attach { sample_every: 1 },
        None,
        false,
    )?;
    let start = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let command: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", pid.0))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let meta = leakscope_record::Meta {
        command,
        pid: Some(pid.0),
        attach: true,
        fd: tracking.fd,
        heap: tracking.heap,
        tcp: tracking.tcp,
        started_unix_s,
    };
    let writer = leakscope_record::Writer::new(out, &meta)
        .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))?;
    let mut rec = leakscope_record::Recorder::new(writer)
        .with_min_age(leakscope_event::TimeNs(every.as_nanos() as u64));
    backend
        .attach(pid)
        .map_err(|e| fatal(exit::ERROR, format!("cannot attach to {}: {e}", pid.0)))?;
    for ev in crate::attach::current_maps(pid) {
        rec.maps.apply(&ev);
    }
    signals::install();
    let mut live: HashSet<Pid> = HashSet::from([pid]);
    let mut batch: Vec<Event> = Vec::new();
    let mut exit_code = None;
    let mut killed_by = None;
    let mut pump = |backend: &mut backends::Combined,
                    rec: &mut leakscope_record::Recorder<File>,
                    live: &mut HashSet<Pid>,
                    timeout: Duration|
     -> anyhow::Result<usize> {
        backend
            .poll(timeout, &mut |ev| batch.push(ev))
            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        let n = batch.len();
        for ev in batch.drain(..) {
            if let Some((code, signal)) = signals::exit_of(&ev, pid) {
                exit_code = Some(code);
                killed_by = signal;
            }
            apply(&ev, backend, &mut rec.ledger, &mut rec.maps, live);
        }
        Ok(n)
    };
    // What the process holds that tracing saw being acquired.
    backend.settle();
    let deadline = Instant::now() + Duration::from_secs(2);
    while pump(&mut backend, &mut rec, &mut live, Duration::ZERO)? > 0 && Instant::now() < deadline
    {
    }
    let traced: HashSet<i32> = rec.ledger.open_fds(pid).iter().map(|f| f.0).collect();
    let before = crate::attach::preexisting(pid, &traced);
    eprintln!(
        "Recording pid {} into {} ({}). Ctrl-C to end.",
        pid.0,
        args.output.display(),
        backend.name()
    );
    let stop_at = args.duration.map(|d| start + d);
    let mut last_commit = Instant::now();
    let mut gone_since: Option<Instant> = None;
    loop {
        pump(&mut backend, &mut rec, &mut live, Duration::from_millis(50))?;
        if signals::take().is_some() || stop_at.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if last_commit.elapsed() >= every {
            last_commit = Instant::now();
            let settled = backend.settled();
            rec.commit(&mut backend, start.elapsed().as_secs_f64(), settled)
                .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))?;
            backend.settle();
        }
        live.retain(|p| crate::attach::alive(*p));
        if live.is_empty() {
            let since = *gone_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= DRAIN {
                break;
            }
        }
    }
    backend.settle();
    let deadline = Instant::now() + Duration::from_secs(2);
    while pump(&mut backend, &mut rec, &mut live, Duration::from_millis(10))? > 0
        && Instant::now() < deadline
    {}
    let duration = start.elapsed();
    backend.stop();
    let end = leakscope_record::End {
        exit_code,
        signal: killed_by,
        backend: backend.name().to_string(),
        notes: backend.notes(),
        coverage: coverage_to_record(&backend.coverage()),
        preexisting: before
            .into_iter()
            .map(|p| leakscope_record::Preexisting {
                pid: p.pid,
                fd: p.fd,
                detail: p.detail,
            })
            .collect(),
        freed_by_exec: (0, 0),
    };
    rec.finish(&mut backend, duration.as_secs_f64(), end)
        .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))
}

/// `leakscope report`.
pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    crate::check_output(args.output.as_deref())?;
    if matches!(
        args.format,
        ReportFormat::Pprof | ReportFormat::Svg | ReportFormat::Html
    ) && args.output.is_none()
    {
        return Err(fatal(
            exit::ERROR,
            "--format pprof, svg and html write a file: give -o FILE (or -o - for stdout)".into(),
        ));
    }
    let suppressions = args.suppress.load()?;
    let rec = leakscope_record::read_file(&args.recording).map_err(|e| {
        let code = match e {
            leakscope_record::Error::Io { .. } => exit::ERROR,
            _ => exit::BAD_RECORDING,
        };
        fatal(code, format!("{}: {e}", args.recording.display()))
    })?;
    let (report, sources) = report_of_sourced(&rec, &suppressions, &args.debug_dirs);
    if args.gen_suppressions {
        let text = suppressions_for(&report);
        crate::write_report(Some(args.output.as_deref().unwrap_or(Path::new("-"))), text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = match args.format {
        ReportFormat::Html => {
            let growth: Vec<Vec<(f64, u64)>> = report
                .leaks
                .iter()
                .zip(&sources)
                .take(args.top)
                .map(|(g, s)| growth_of(&rec, g, s))
                .collect();
            leakscope_report::render_html(&report, &growth, args.top).into_bytes()
        }
        ReportFormat::Text => leakscope_report::render_text(&report, args.top).into_bytes(),
        ReportFormat::Json => leakscope_report::render_json(&report).into_bytes(),
        ReportFormat::Pprof => leakscope_report::render_pprof(&report, rec.meta.started_unix_s),
        ReportFormat::Svg => leakscope_report::render_svg(&report).into_bytes(),
    };
    crate::write_report(args.output.as_deref(), bytes)?;
    Ok(ExitCode::SUCCESS)
}
