//! `attach`: trace a running process (and the children it forks from now
//! on) until it exits or Ctrl-C, optionally reporting every `--interval`
//! seconds with what grew. What was open before tracing began is listed
//! apart, without a stack, and never counted as a leak.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use leakscope_event::{AbsAddr, Backend, Event, FileOffset, Mapping, Pid, TimeNs};
use leakscope_ledger::{Ledger, Resource};
use leakscope_report::{Counts, Group, Preexisting, Report, Target};
use leakscope_stacks::ModuleMaps;

use crate::backends::{self, Tracking};
use crate::pipeline::{apply, build_groups, fatal, DRAIN};
use crate::{exit, signals, Format};

/// `leakscope attach` arguments.
#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    /// The process to trace.
    #[arg(short, long, value_name = "PID")]
    pid: u32,
    /// Print a report every SECS seconds, with the change since the last.
    #[arg(long, value_name = "SECS")]
    interval: Option<f64>,
    /// Stop after SECS seconds (default: when the process exits or Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Only report resources held for at least SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    min_age: f64,
    /// Heap (with --track heap): record 1 of N allocations. Allocator
    /// uprobes cost microseconds per call; sample busy processes.
    #[arg(long, value_name = "N", default_value_t = 1)]
    sample_every: u32,
    /// Heap (with --track heap): symbol prefix of another allocator, e.g.
    /// `je_` for jemalloc built with a prefix.
    #[arg(long, value_name = "PREFIX")]
    allocator: Option<String>,
    /// What to track (comma-separated): fd, heap, tcp.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fd")]
    track: Vec<crate::Track>,
    /// Tracing backend for fds: eBPF (root), or ptrace (the process's
    /// owner; every syscall of the process stops it while attached).
    #[arg(long, value_enum, default_value_t = crate::BackendChoice::Auto)]
    backend: crate::BackendChoice,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write reports to FILE (`-` for stdout) instead of stderr.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Show at most N leak groups in text output.
    #[arg(long, default_value_t = 20, value_name = "N")]
    top: usize,
    /// Exit with 3 when leaks were found.
    #[arg(long)]
    fail_on_leak: bool,
    #[command(flatten)]
    suppress: crate::SuppressArgs,
}

/// Executable file mappings of a running process, as if mapped at time 0.
pub(crate) fn current_maps(pid: Pid) -> Vec<Event> {
    let text = std::fs::read_to_string(format!("/proc/{}/maps", pid.0)).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(off)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(2).unwrap_or("");
        if !perms.contains('x') || !path.starts_with('/') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or(0);
        out.push(Event::Map {
            time: TimeNs(0),
            pid,
            mapping: Mapping {
                start: AbsAddr(hex(start)),
                end: AbsAddr(hex(end)),
                offset: FileOffset(hex(off)),
                path: path.to_string(),
            },
        });
    }
    out
}

/// TCP sockets by inode from /proc/PID/net/tcp{,6}: "local -> peer STATE".
fn tcp_table(pid: Pid) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text =
            std::fs::read_to_string(format!("/proc/{}/net/{file}", pid.0)).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let Ok(ino) = f[9].parse::<u64>() else {
                continue;
            };
            let state = u8::from_str_radix(f[3], 16).unwrap_or(0);
            let addr = |s: &str| -> String {
                let Some((a, p)) = s.split_once(':') else {
                    return s.to_string();
                };
                let port = u16::from_str_radix(p, 16).unwrap_or(0);
                if v6 {
                    let mut b = [0u8; 16];
                    for (i, chunk) in b.chunks_mut(4).enumerate() {
                        let w = u32::from_str_radix(a.get(i * 8..i * 8 + 8).unwrap_or("0"), 16)
                            .unwrap_or(0);
                        chunk.copy_from_slice(&w.to_ne_bytes());
                    }
                    format!("[{}]:{port}", std::net::Ipv6Addr::from(b))
                } else {
                    let w = u32::from_str_radix(a, 16).unwrap_or(0);
                    format!("{}:{port}", std::net::Ipv4Addr::from(w.to_ne_bytes()))
                }
            };
            let name = leakscope_event::TcpState(state).name();
            out.insert(ino, format!("{} -> {} {name}", addr(f[1]), addr(f[2])));
        }
    }
    out
}

/// What `pid` holds now, minus the fds the ledger learned about by tracing.
pub(crate) fn preexisting(pid: Pid, traced: &HashSet<i32>) -> Vec<Preexisting> {
    let tcp = tcp_table(pid);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", pid.0)) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if traced.contains(&fd) {
            continue;
        }
        let target = std::fs::read_link(entry.path())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let detail = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|ino| ino.parse::<u64>().ok())
            .and_then(|ino| tcp.get(&ino))
            .map(|t| format!("{target} {t}"))
            .unwrap_or(target);
        out.push(Preexisting {
            pid: pid.0,
            fd,
            detail,
        });
    }
    out.sort_by_key(|p| p.fd);
    out
}

pub(crate) fn alive(pid: Pid) -> bool {
    // A zombie has no fd table or memory left to trace.
    std::fs::read_to_string(format!("/proc/{}/stat", pid.0))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn group_key(g: &Group) -> String {
    let frames: Vec<String> = g
        .stack
        .iter()
        .map(|f| {
            format!(
                "{}@{}:{}",
                f.function.as_deref().unwrap_or(&f.addr),
                f.file.as_deref().unwrap_or(""),
                f.line.unwrap_or(0)
            )
        })
        .collect();
    format!("{}/{}/{}", g.kind, g.resource, frames.join(";"))
}

/// Growth of each group across periodic reports.
#[derive(Default)]
struct Growth {
    last: HashMap<String, (u64, u32)>,
}

impl Growth {
    fn update(&mut self, groups: &mut [Group]) {
        let mut next = HashMap::new();
        for g in groups.iter_mut() {
            let key = group_key(g);
            let (before, streak) = self.last.get(&key).copied().unwrap_or((0, 0));
            let change = g.count as i64 - before as i64;
            let streak = if change > 0 { streak + 1 } else { 0 };
            g.change = Some(change);
            g.growing_intervals = Some(streak);
            next.insert(key, (g.count, streak));
        }
        self.last = next;
    }
}

struct Session {
    backend: backends::Combined,
    ledger: Ledger,
    maps: ModuleMaps,
    live: HashSet<Pid>,
    batch: Vec<Event>,
}

impl Session {
    fn pump(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        self.backend
            .poll(timeout, &mut |ev| self.batch.push(ev))
            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        let n = self.batch.len();
        for ev in std::mem::take(&mut self.batch) {
            apply(
                &ev,
                &mut self.backend,
                &mut self.ledger,
                &mut self.maps,
                &mut self.live,
            );
        }
        Ok(n)
    }

    /// Brings the ledger up to date with what the processes hold now,
    /// including acquisitions the backend was still holding back.
    fn catch_up(&mut self) -> anyhow::Result<()> {
        self.backend.settle();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.pump(Duration::ZERO)? > 0 && Instant::now() < deadline {}
        Ok(())
    }
}

pub fn run(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let pid = Pid(args.pid);
    crate::check_output(args.output.as_deref())?;
    let suppressions = args.suppress.load()?;
    if !alive(pid) {
        return Err(fatal(exit::ERROR, format!("no such process: {}", pid.0)));
    }
    // /proc/TID exists for every thread too (proc(5)); a process is
    // traced by its id, the id of its first thread.
    let tgid = std::fs::read_to_string(format!("/proc/{}/status", pid.0))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    if let Some(tgid) = tgid.filter(|t| *t != pid.0) {
        return Err(fatal(
            exit::ERROR,
            format!(
                "{} is a thread of process {tgid}, not a process: attach -p {tgid} traces \
                 it with all its threads",
                pid.0
            ),
        ));
    }
    let tracking = Tracking {
        fd: args.track.contains(&crate::Track::Fd),
        heap: args.track.contains(&crate::Track::Heap),
        tcp: args.track.contains(&crate::Track::Tcp),
    };
    let choice = match args.backend {
        crate::BackendChoice::Auto => backends::Choice::Auto,
        crate::BackendChoice::Ebpf => backends::Choice::Ebpf,
        crate::BackendChoice::Ptrace => backends::Choice::Ptrace,
        crate::BackendChoice::Preload => {
            return Err(fatal(
                exit::ERROR,
                "the preload backend cannot attach (LD_PRELOAD takes effect at launch \
                 only): attach traces fds with --backend ebpf or ptrace, the heap with \
                 eBPF uprobes (--backend auto --track heap)"
                    .into(),
            ))
        }
    };
    let backend = backends::open(
        tracking,
        choice,
        backends::Mode::Attach {
            sample_every: args.sample_every.max(1),
        },
        args.allocator.clone(),
        false,
    )?;
    let start = Instant::now();
    let mut s = Session {
        backend,
        ledger: Ledger::default(),
        maps: ModuleMaps::new(),
        live: HashSet::from([pid]),
        batch: Vec::new(),
    };
    s.backend.attach(pid).map_err(|e| {
        // With ptrace, `e` says why the kernel refused and what to change;
        // after --backend auto fell back to it, eBPF's reason comes too.
        let also = s
            .backend
            .ebpf_refused()
            .map(|why| format!(" (and eBPF could not be used: {why})"))
            .unwrap_or_default();
        fatal(
            exit::ERROR,
            format!("cannot attach to {}: {e}{also}", pid.0),
        )
    })?;
    for ev in current_maps(pid) {
        s.maps.apply(&ev);
    }
    signals::install();
    s.catch_up()?;
    let traced: HashSet<i32> = s.ledger.open_fds(pid).iter().map(|f| f.0).collect();
    let before = preexisting(pid, &traced);
    if !alive(pid) {
        return Err(fatal(
            exit::ERROR,
            format!("process {} exited while attaching", pid.0),
        ));
    }
    let what: Vec<&str> = [
        (tracking.fd, "fds"),
        (tracking.heap, "heap"),
        (tracking.tcp, "TCP states"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, w)| *w)
    .collect();
    // A running process cannot be given a seccomp filter: under ptrace
    // every one of its syscalls stops it, twice (the notes say so too).
    let cost = if s.backend.name().starts_with("ptrace") {
        ": every syscall of the process stops it while attached"
    } else {
        ""
    };
    eprintln!(
        "Tracing {} of pid {} ({}{cost}). Ctrl-C to end.",
        what.join(", "),
        pid.0,
        s.backend.name()
    );

    let command: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", pid.0))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let reporting = Reporting {
        args: &args,
        suppressions: &suppressions,
        tracking,
        command: &command,
        pid,
        start,
    };
    let mut growth = Growth::default();
    let mut first_write = true;
    let mut next_interval = args.interval.map(|i| start + Duration::from_secs_f64(i));
    let deadline = args.duration.map(|d| start + Duration::from_secs_f64(d));
    let mut exit_code = None;
    let mut killed_by = None;
    let mut gone_since: Option<Instant> = None;
    loop {
        s.batch.clear();
        s.backend
            .poll(Duration::from_millis(50), &mut |ev| s.batch.push(ev))
            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        for ev in std::mem::take(&mut s.batch) {
            if let Some((code, signal)) = signals::exit_of(&ev, pid) {
                exit_code = Some(code);
                killed_by = signal;
            }
            apply(&ev, &mut s.backend, &mut s.ledger, &mut s.maps, &mut s.live);
        }
        if signals::take().is_some() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        s.live.retain(|p| alive(*p));
        if s.live.is_empty() {
            let since = *gone_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= DRAIN {
                break;
            }
        }
        if let (Some(at), Some(every)) = (next_interval, args.interval) {
            if Instant::now() >= at {
                next_interval = Some(at + Duration::from_secs_f64(every));
                s.catch_up()?;
                let mut report = reporting.report(&mut s, None);
                growth.update(&mut report.leaks);
                emit(&args, &report, true, &mut first_write)?;
            }
        }
    }
    s.catch_up()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while s.pump(Duration::from_millis(10))? > 0 && Instant::now() < deadline {}
    s.backend.stop();
    let mut report = reporting.report(&mut s, exit_code);
    report.target.signal = killed_by;
    if args.interval.is_some() {
        growth.update(&mut report.leaks);
    }
    report.preexisting = before;
    emit(&args, &report, false, &mut first_write)?;
    if args.fail_on_leak && !report.leaks.is_empty() {
        return Ok(ExitCode::from(exit::LEAKS_FOUND));
    }
    if args.fail_on_leak && !report.fully_traced() {
        return Ok(ExitCode::from(exit::NOT_TRACED));
    }
    Ok(ExitCode::SUCCESS)
}

/// What every report of one attach shares.
struct Reporting<'a> {
    args: &'a AttachArgs,
    suppressions: &'a leakscope_report::Suppressions,
    tracking: Tracking,
    command: &'a [String],
    pid: Pid,
    start: Instant,
}

impl Reporting<'_> {
    /// A report of what `s` holds now (`exit_code`: the process is gone).
    fn report(&self, s: &mut Session, exit_code: Option<i32>) -> Report {
        let Reporting {
            args,
            suppressions,
            tracking,
            command,
            pid,
            start,
        } = *self;
        let now = s.ledger.now();
        let min_age = Duration::from_secs_f64(args.min_age.max(0.0)).as_nanos() as u64;
        let leaks: Vec<_> = s
            .ledger
            .snapshot()
            .into_iter()
            .filter(|l| match l.resource {
                // Held at least --min-age when the report is made.
                Resource::Fd(_) | Resource::Heap(_) => {
                    l.at.0.max(now.0).saturating_sub(l.resource.time().0) >= min_age
                }
            })
            .collect();
        let (groups, kept) = build_groups(
            leaks,
            &mut s.backend,
            &s.maps,
            tracking,
            suppressions.has_defaults(),
        );
        let (groups, mut suppressed) = suppressions.apply(groups);
        suppressed.extend(kept);
        let lost = s.ledger.lost();
        Report {
            target: Target {
                command: command.to_vec(),
                pid: Some(pid.0),
                exit_code,
                signal: None,
            },
            backend: s.backend.name().to_string(),
            duration_s: start.elapsed().as_secs_f64(),
            events: Counts {
                total: s.ledger.events() + 2 * s.backend.settled(),
                lost,
                settled: 2 * s.backend.settled(),
            },
            notes: {
                let mut notes = s.backend.notes();
                notes.extend(crate::pipeline::lost_note(lost));
                notes.extend(crate::pipeline::exec_note(s.ledger.freed_by_exec()));
                notes
            },
            coverage: s.backend.coverage(),
            leaks: groups,
            suppressed,
            preexisting: Vec::new(),
        }
    }
}

fn emit(
    args: &AttachArgs,
    report: &Report,
    periodic: bool,
    first: &mut bool,
) -> anyhow::Result<()> {
    let text = match (args.format, periodic) {
        (Format::Text, _) => leakscope_report::render_text(report, args.top),
        (Format::Json, true) => leakscope_report::render_json_line(report),
        (Format::Json, false) => leakscope_report::render_json(report),
    };
    match args.output.as_deref() {
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
            Ok(())
        }
        Some(p) if p == Path::new("-") => {
            let mut out = std::io::stdout();
            match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Some(p) => {
            // The first report replaces the file; later ones follow it.
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(!*first)
                .write(true)
                .truncate(*first)
                .open(p)?;
            *first = false;
            f.write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(count: u64, function: &str) -> Group {
        Group {
            kind: "fd".into(),
            resource: "file".into(),
            count,
            bytes: 0,
            min_size: None,
            max_size: None,
            state: None,
            acquired_by: vec!["openat".into()],
            first_s: 0.0,
            last_s: 0.0,
            examples: vec![],
            stack: vec![leakscope_report::StackFrame {
                addr: "0x1".into(),
                function: Some(function.into()),
                file: None,
                line: None,
                module: None,
                inlined: false,
            }],
            stack_note: None,
            change: None,
            growing_intervals: None,
        }
    }

    /// A slow leak grows in every report; a stable pool does not.
    #[test]
    fn growth_is_counted_in_consecutive_reports() {
        let mut growth = Growth::default();
        let mut last = Vec::new();
        for (leak, pool) in [(1, 10), (2, 10), (3, 10), (4, 9)] {
            let mut groups = vec![group(leak, "drip"), group(pool, "pool")];
            growth.update(&mut groups);
            last = groups;
        }
        assert_eq!(
            (last[0].change, last[0].growing_intervals),
            (Some(1), Some(4))
        );
        assert_eq!(
            (last[1].change, last[1].growing_intervals),
            (Some(-1), Some(0))
        );
    }
}
