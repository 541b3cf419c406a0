//! `run`: launch under a backend and record the trace (the ledger and, at
//! each commit, what it holds: leakscope-record) until the process tree is
//! gone; then the report of that recording, as `report` makes it of a
//! file: group by unwound stack, symbolize, merge by source line.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use leakscope_event::{Backend, Event, FileOffset, Pid, RawStack, StackId, TcpState};
use leakscope_ledger::{group, Leak, Resource};
use leakscope_record::Stack;
use leakscope_report::{Example, Group, Report, StackFrame, Suppressed};
use leakscope_stacks::{ModuleMaps, RawFrame, Unwinder};
use leakscope_symbolize::Symbolizer;

use crate::{exit, signals};

/// An error with its own exit code.
#[derive(Debug)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

pub(crate) fn fatal(code: u8, message: String) -> anyhow::Error {
    Fatal { code, message }.into()
}

pub struct Config {
    pub command: Vec<String>,
    pub tracking: crate::backends::Tracking,
    pub backend: crate::backends::Choice,
    pub suppressions: leakscope_report::Suppressions,
    /// fds were not asked for by name: without eBPF, trace the rest.
    pub fd_optional: bool,
    /// Stop when the launched process exits, not when every process it
    /// started has (`--wait main`).
    pub wait_main: bool,
}

/// How long processes the command started may outlive it before
/// leakscope says on stderr that it waits for them.
const WAIT_NOTICE: Duration = Duration::from_secs(1);

pub enum Status {
    Code(i32),
    Signal(i32),
}

pub struct Outcome {
    pub report: Report,
    pub status: Status,
}

/// Finds `prog` the way execvp(3) would, so a missing command is a clear
/// error before any tracing starts.
fn resolve(prog: &str) -> anyhow::Result<PathBuf> {
    let check = |p: &Path| -> Option<anyhow::Result<PathBuf>> {
        let meta = std::fs::metadata(p).ok()?;
        if meta.is_dir() || meta.permissions().mode() & 0o111 == 0 {
            return Some(Err(fatal(
                exit::NOT_EXECUTABLE,
                format!("{} is not executable", p.display()),
            )));
        }
        Some(Ok(p.to_path_buf()))
    };
    if prog.contains('/') {
        return check(Path::new(prog))
            .unwrap_or_else(|| Err(fatal(exit::NOT_FOUND, format!("command not found: {prog}"))));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        if let Some(found) = check(&dir.join(prog)) {
            if found.is_ok() {
                return found;
            }
        }
    }
    Err(fatal(exit::NOT_FOUND, format!("command not found: {prog}")))
}

/// How long to keep reading after the last process exited, for events
/// still in flight.
/// Every process's exit event is written before its parent can reap it;
/// this covers records other CPUs were still writing.
pub(crate) const DRAIN: Duration = Duration::from_millis(10);

/// How often a recording commits what changed: the most a killed
/// recorder loses, and the resolution of growth over time.
pub const COMMIT_EVERY: Duration = Duration::from_secs(10);

/// `run`: [`trace`] into memory, then the report of that recording, the
/// one `leakscope report` makes of a recording file. With `record_to`, the
/// recording is also saved there.
pub fn run(config: &Config, record_to: Option<&Path>) -> anyhow::Result<Outcome> {
    let (bytes, status) = trace(config, Vec::new(), COMMIT_EVERY)?;
    if let Some(path) = record_to {
        use std::io::Write;
        crate::record::create(path).and_then(|mut f| f.write_all(&bytes).map_err(Into::into))?;
    }
    let recording = leakscope_record::read(&bytes)
        .map_err(|e| anyhow::anyhow!("reading back the recording: {e}"))?;
    let report = crate::record::report_of(&recording, &config.suppressions);
    Ok(Outcome { report, status })
}

/// Launches the command under its backends and records the trace into
/// `out` until the process tree is gone, committing every `every`.
pub fn trace<W: std::io::Write>(
    config: &Config,
    out: W,
    every: Duration,
) -> anyhow::Result<(W, Status)> {
    let prog = resolve(&config.command[0])?;
    let mut backend = crate::backends::open(
        config.tracking,
        config.backend,
        crate::backends::Mode::Launch,
        None,
        config.fd_optional,
    )?;
    signals::install();

    let start = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut cmd = Command::new(&prog);
    cmd.arg0(&config.command[0]).args(&config.command[1..]);
    let mut child = backend.spawn(&mut cmd).map_err(|e| {
        fatal(
            exit::NOT_EXECUTABLE,
            format!("cannot run {}: {e}", prog.display()),
        )
    })?;
    let root = Pid(child.id());
    let meta = leakscope_record::Meta {
        command: config.command.clone(),
        pid: Some(root.0),
        attach: false,
        fd: config.tracking.fd,
        heap: config.tracking.heap,
        tcp: backend.tracking().tcp,
        started_unix_s,
    };
    let writer = leakscope_record::Writer::new(out, &meta)
        .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))?;
    let mut rec = leakscope_record::Recorder::new(writer)
        .with_min_age(leakscope_event::TimeNs(every.as_nanos() as u64));
    let mut live: HashSet<Pid> = HashSet::from([root]);
    let mut status = None;
    let mut gone_since: Option<Instant> = None;
    // When the command exited, and whether the wait for what it left
    // running was announced / given up (Ctrl-C, --wait main).
    let mut exited_at: Option<Instant> = None;
    let mut announced = false;
    let mut stop_waiting = false;
    let mut last_commit = Instant::now();
    let mut batch = Vec::new();
    loop {
        // Once the command has exited, only a short drain remains.
        let timeout = Duration::from_millis(if status.is_some() { 5 } else { 50 });
        backend
            .poll(timeout, &mut |ev| batch.push(ev))
            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        for ev in batch.drain(..) {
            apply(&ev, &mut backend, &mut rec.ledger, &mut rec.maps, &mut live);
        }
        if last_commit.elapsed() >= every && status.is_none() {
            last_commit = Instant::now();
            let settled = backend.settled();
            rec.commit(&mut backend, start.elapsed().as_secs_f64(), settled)
                .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))?;
            // What the backend holds back reaches the ledger by the next
            // commit.
            backend.settle();
        }
        if let Some(sig) = signals::take() {
            if signals::forwarded(sig) && status.is_none() {
                // SAFETY: sending a signal to our own child.
                unsafe { libc::kill(child.id() as i32, sig) };
            } else if status.is_some() && sig == libc::SIGINT {
                // Ctrl-C while waiting for what the command left running.
                stop_waiting = true;
            }
        }
        if status.is_none() {
            if let Some(s) = backend.try_wait(&mut child)? {
                status = Some(s);
                exited_at = Some(Instant::now());
                stop_waiting |= config.wait_main;
            }
        }
        if status.is_some() {
            // Descendants may live on; the trace ends when all are gone.
            // Exits we did not see (lost events) are found through /proc.
            live.retain(|p| *p == root || Path::new(&format!("/proc/{}", p.0)).exists());
            let running: Vec<Pid> = live.iter().copied().filter(|p| *p != root).collect();
            if !announced
                && !stop_waiting
                && !running.is_empty()
                && exited_at.is_some_and(|t| t.elapsed() >= WAIT_NOTICE)
            {
                announced = true;
                eprintln!("{}", waiting_notice(&config.command[0], &running));
            }
            let done = stop_waiting || live.is_empty() || live == HashSet::from([root]);
            if done {
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DRAIN {
                    // Read until nothing more arrives (bounded).
                    let deadline = Instant::now() + Duration::from_secs(2);
                    loop {
                        backend
                            .poll(Duration::from_millis(5), &mut |ev| batch.push(ev))
                            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
                        if batch.is_empty() || Instant::now() > deadline {
                            break;
                        }
                        for ev in batch.drain(..) {
                            apply(&ev, &mut backend, &mut rec.ledger, &mut rec.maps, &mut live);
                        }
                    }
                    break;
                }
            }
        }
    }
    let duration = start.elapsed();
    live.remove(&root);
    let mut still_running: Vec<Pid> = live
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{}", p.0)).exists())
        .collect();
    still_running.sort();
    backend.stop();
    let status = status.expect("the loop ends after the child was reaped");
    let status = match (status.code(), status.signal()) {
        (Some(c), _) => Status::Code(c),
        (None, Some(s)) => Status::Signal(s),
        _ => Status::Code(0),
    };
    let end = leakscope_record::End {
        exit_code: Some(match status {
            Status::Code(c) => c,
            Status::Signal(s) => 128 + s,
        }),
        signal: match status {
            Status::Code(_) => None,
            Status::Signal(s) => Some(signals::name(s)),
        },
        backend: backend.name().to_string(),
        notes: backend
            .notes()
            .into_iter()
            .chain(running_note(&still_running))
            .collect(),
        coverage: crate::record::coverage_to_record(&backend.coverage()),
        preexisting: Vec::new(),
        freed_by_exec: (0, 0),
    };
    let out = rec
        .finish(&mut backend, duration.as_secs_f64(), end)
        .map_err(|e| anyhow::anyhow!("writing the recording: {e}"))?;
    Ok((out, status))
}

/// The line leakscope prints when the command exited and processes it
/// started keep running (a daemon): whom it waits for and how to stop.
fn waiting_notice(command: &str, running: &[Pid]) -> String {
    format!(
        "leakscope: `{command}` exited; waiting for {} {} it started that still {} \
         ({}): Ctrl-C stops waiting and reports (--wait main does not wait)",
        running.len(),
        if running.len() == 1 {
            "process"
        } else {
            "processes"
        },
        if running.len() == 1 { "runs" } else { "run" },
        pid_list(running)
    )
}

/// "pid 12 (nginx), pid 13 (nginx)", at most 8 named.
fn pid_list(pids: &[Pid]) -> String {
    let mut parts: Vec<String> = pids
        .iter()
        .take(8)
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.0)).unwrap_or_default();
            match comm.trim() {
                "" => format!("pid {p}"),
                c => format!("pid {p} ({c})"),
            }
        })
        .collect();
    if pids.len() > 8 {
        parts.push(format!("{} more", pids.len() - 8));
    }
    parts.join(", ")
}

/// What the reader must know of processes still running when tracing
/// stopped: what they hold is listed, but they may still release it.
fn running_note(running: &[Pid]) -> Option<String> {
    (!running.is_empty()).then(|| {
        format!(
            "still running when tracing stopped: {}; what they hold is listed as \
             outstanding: not leaked yet, they may still release it",
            pid_list(running)
        )
    })
}

/// What the reader must know when events were lost.
pub(crate) fn lost_note(lost: u64) -> Option<String> {
    (lost > 0).then(|| {
        format!(
            "{lost} events were not recorded (a full ring buffer, or sampling): \
             counts are lower bounds"
        )
    })
}

/// Applies one event, first letting the backend keep the stacks that a
/// fork or an exit is about to make outlive their acquirer's bookkeeping.
pub(crate) fn apply(
    ev: &Event,
    backend: &mut dyn Backend,
    ledger: &mut leakscope_ledger::Ledger,
    maps: &mut ModuleMaps,
    live: &mut HashSet<Pid>,
) {
    match ev {
        Event::Fork {
            parent,
            child,
            shares_table,
            ..
        } if parent != child => {
            if !shares_table {
                for s in ledger.fd_stacks(*parent) {
                    backend.retain_stack(s);
                }
            }
            live.insert(*child);
        }
        Event::Exit { pid, .. } => {
            for s in ledger.fd_stacks(*pid) {
                backend.retain_stack(s);
            }
            backend.forget_process(*pid, &ledger.open_fds(*pid));
            live.remove(pid);
        }
        _ => {}
    }
    maps.apply(ev);
    ledger.apply(ev);
}

/// A frame as a grouping key: module and file offset when known, so the
/// same code in different processes (other load addresses) groups together.
#[derive(Clone, PartialEq, Eq, Hash)]
enum FrameKey<'s> {
    Module(&'s str, FileOffset),
    Addr(u64),
}

fn frame_key(f: &RawFrame) -> FrameKey<'_> {
    match &f.module {
        Some(m) => FrameKey::Module(&m.path, m.offset),
        None => FrameKey::Addr(f.addr.0),
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct GroupKey<'s> {
    kind: &'static str,
    resource: &'static str,
    frames: Vec<FrameKey<'s>>,
}

/// The leak groups of `leaks`, and (with `runtime_kept`, the default
/// suppressions) what was left out because the C runtime keeps it on
/// purpose ([`Backend::kept_by_runtime`]), counted as suppressed. Stacks
/// are unwound now, from the backend and the maps (periodic `attach`
/// reports, made while the trace goes on).
pub(crate) fn build_groups(
    leaks: Vec<Leak>,
    backend: &mut dyn Backend,
    maps: &ModuleMaps,
    tracking: crate::backends::Tracking,
    runtime_kept: bool,
) -> (Vec<Group>, Vec<Suppressed>) {
    let leaks: Vec<(Leak, Option<String>)> = leaks
        .into_iter()
        .map(|l| {
            let kept = match &l.resource {
                Resource::Heap(b) => backend.kept_by_runtime(l.holder, b.addr),
                Resource::Fd(_) => None,
            };
            (l, kept.map(str::to_string))
        })
        .collect();
    let mut unwinder = Unwinder::new();
    let mut unwound: HashMap<StackId, Stack> = HashMap::new();
    for (leak, _) in &leaks {
        let id = leak.resource.stack();
        if unwound.contains_key(&id) {
            continue;
        }
        let u = match backend.raw_stack(id) {
            RawStack::Missing(why) => Stack {
                frames: Vec::new(),
                note: Some(why),
            },
            raw => {
                let u = unwinder.unwind(
                    maps,
                    leak.resource.acquired_by(),
                    leak.resource.time(),
                    &raw,
                );
                Stack {
                    frames: u.frames,
                    note: u.truncated,
                }
            }
        };
        unwound.insert(id, u);
    }
    group_leaks(leaks, &|id| &unwound[&id], tracking, runtime_kept)
}

/// The leak groups of `leaks` (each with what the C runtime keeps it as,
/// if it does), their stacks found by `stack`: grouped by kind and
/// unwound stack, symbolized, merged by source line. With `runtime_kept`
/// (the default suppressions), what the runtime keeps is counted as
/// suppressed instead.
pub(crate) fn group_leaks<'s>(
    leaks: Vec<(Leak, Option<String>)>,
    stack: &dyn Fn(StackId) -> &'s Stack,
    tracking: crate::backends::Tracking,
    runtime_kept: bool,
) -> (Vec<Group>, Vec<Suppressed>) {
    let mut symbolizer = Symbolizer::new();
    let (groups, kept) = group_leaks_sourced(leaks, stack, tracking, runtime_kept, &mut symbolizer);
    (groups.into_iter().map(|(g, _)| g).collect(), kept)
}

/// [`group_leaks`], each group with the stack handles of its leaks (a
/// recording's growth series are per handle).
pub(crate) fn group_leaks_sourced<'s>(
    leaks: Vec<(Leak, Option<String>)>,
    stack: &dyn Fn(StackId) -> &'s Stack,
    tracking: crate::backends::Tracking,
    runtime_kept: bool,
    symbolizer: &mut Symbolizer,
) -> (Vec<(Group, Vec<StackId>)>, Vec<Suppressed>) {
    let mut kept: Vec<Suppressed> = Vec::new();
    let leaks: Vec<Leak> = leaks
        .into_iter()
        .filter_map(|(l, what)| {
            let Resource::Heap(b) = &l.resource else {
                return Some(l);
            };
            if !runtime_kept {
                return Some(l);
            }
            let Some(what) = what else {
                return Some(l);
            };
            let pattern = format!("<{what}, kept by glibc>");
            let i = match kept.iter().position(|k| k.pattern == pattern) {
                Some(i) => i,
                None => {
                    kept.push(Suppressed {
                        pattern,
                        origin: leakscope_report::suppress::DEFAULT_ORIGIN.into(),
                        groups: 1,
                        count: 0,
                        bytes: 0,
                    });
                    kept.len() - 1
                }
            };
            kept[i].count += 1;
            kept[i].bytes += b.size;
            None
        })
        .collect();
    // The preload shim's connection to leakscope lives in the traced
    // process; it is ours, not the program's.
    let leaks: Vec<Leak> = leaks
        .into_iter()
        .filter(|l| {
            !matches!(l.resource, Resource::Fd(_))
                || !stack(l.resource.stack()).frames.iter().any(|f| {
                    f.module
                        .as_ref()
                        .is_some_and(|m| m.path.ends_with(leakscope_preload::SHIM_NAME))
                })
        })
        .collect();
    // A socket stranded in CLOSE_WAIT is reported as such under --track
    // tcp; other fds only when fds are tracked.
    let close_wait = |l: &Leak| matches!(l.tcp, Some((s, _)) if s == TcpState::CLOSE_WAIT);
    let leaks: Vec<Leak> = leaks
        .into_iter()
        .filter(|l| match l.resource {
            Resource::Fd(_) => tracking.fd || (tracking.tcp && close_wait(l)),
            Resource::Heap(_) => true,
        })
        .collect();
    let groups = group(leaks, |l| {
        let frames = &stack(l.resource.stack()).frames;
        let (kind, resource) = match &l.resource {
            Resource::Fd(_) if tracking.tcp && close_wait(l) => ("tcp", "tcp"),
            Resource::Fd(a) => ("fd", a.kind.name()),
            Resource::Heap(_) => ("heap", "heap"),
        };
        GroupKey {
            kind,
            resource,
            frames: frames.iter().map(frame_key).collect(),
        }
    });
    let groups: Vec<(Group, Vec<StackId>)> = groups
        .into_iter()
        .map(|g| {
            let mut sources: Vec<StackId> = g.leaks.iter().map(|l| l.resource.stack()).collect();
            sources.sort();
            sources.dedup();
            let first = &g.leaks[0];
            let Stack { frames, note } = stack(first.resource.stack());
            let stack: Vec<StackFrame> = symbolizer
                .symbolize(frames)
                .iter()
                .map(StackFrame::from)
                .collect();
            // A copy that ends right after main only lost libc's start-up
            // frames, which say nothing about the leak.
            let note = match stack.last() {
                Some(f) if f.function.as_deref() == Some("main") => &None,
                _ => note,
            };
            let mut acquired_by: Vec<String> = Vec::new();
            for l in &g.leaks {
                let by = match &l.resource {
                    Resource::Fd(a) => a.syscall.clone(),
                    // The allocator entry point the shim interposed.
                    Resource::Heap(_) => stack
                        .first()
                        .and_then(|f| f.function.clone())
                        .unwrap_or_else(|| "malloc".into()),
                };
                if !acquired_by.contains(&by) {
                    acquired_by.push(by);
                }
            }
            let examples = g
                .leaks
                .iter()
                .take(5)
                .map(|l| match &l.resource {
                    Resource::Fd(a) => Example {
                        pid: l.holder.0,
                        fd: l.fd.map(|f| f.0),
                        addr: None,
                        size: None,
                        detail: match (&a.detail, l.tcp) {
                            (Some(d), Some((state, since))) if g.key.kind == "tcp" => {
                                Some(format!(
                                    "{d}, {} for {:.2} s",
                                    state.name(),
                                    l.at.secs() - since.secs()
                                ))
                            }
                            (d, _) => d.clone(),
                        },
                        time_s: a.time.secs(),
                    },
                    Resource::Heap(b) => Example {
                        pid: l.holder.0,
                        fd: None,
                        addr: Some(format!("{:#x}", b.addr.0)),
                        size: Some(b.size),
                        detail: None,
                        time_s: b.time.secs(),
                    },
                })
                .collect();
            let group = Group {
                kind: g.key.kind.to_string(),
                resource: g.key.resource.to_string(),
                count: g.count,
                bytes: g.bytes,
                min_size: g.size_range.map(|r| r.0),
                max_size: g.size_range.map(|r| r.1),
                state: (g.key.kind == "tcp").then(|| TcpState::CLOSE_WAIT.name().to_string()),
                acquired_by,
                first_s: g.first.secs(),
                last_s: g.last.secs(),
                examples,
                stack,
                stack_note: note.clone(),
                change: None,
                growing_intervals: None,
            };
            (group, sources)
        })
        .collect();
    (merge_same_source(groups), kept)
}

/// Whether two groups read the same to a person: kind, resource, and
/// per frame the function, file, line and module (the address when
/// unnamed).
fn same_source(a: &Group, b: &Group) -> bool {
    a.kind == b.kind
        && a.resource == b.resource
        && a.stack.len() == b.stack.len()
        && a.stack.iter().zip(&b.stack).all(|(x, y)| {
            x.function == y.function
                && x.module == y.module
                && match x.function {
                    Some(_) => x.file == y.file && x.line == y.line,
                    None => x.addr == y.addr,
                }
        })
}

/// A hash of what [`same_source`] compares, without copying it.
fn source_hash(g: &Group) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = leakscope_ledger::WordHasher::default();
    (&g.kind, &g.resource).hash(&mut h);
    // Enough to tell most groups apart; same_source compares the rest.
    for f in &g.stack {
        match &f.function {
            Some(name) => (name, f.line).hash(&mut h),
            None => f.addr.hash(&mut h),
        }
    }
    h.finish()
}

/// Groups whose stacks differ only in addresses that symbolize to the same
/// source lines (an unrolled loop, two calls on one line) read as one to a
/// person: merge them. Frames without a name keep their address, so
/// unknown code never merges by accident.
fn merge_same_source(groups: Vec<(Group, Vec<StackId>)>) -> Vec<(Group, Vec<StackId>)> {
    let mut out: Vec<(Group, Vec<StackId>)> = Vec::new();
    let mut index: leakscope_ledger::WordMap<u64, Vec<usize>> = Default::default();
    for (g, sources) in groups {
        if g.stack.is_empty() {
            out.push((g, sources));
            continue;
        }
        let h = source_hash(&g);
        let same = index
            .get(&h)
            .and_then(|c| c.iter().copied().find(|i| same_source(&out[*i].0, &g)));
        match same {
            Some(i) => {
                let (m, ms) = &mut out[i];
                ms.extend(sources);
                m.count += g.count;
                m.bytes += g.bytes;
                m.min_size = m.min_size.min(g.min_size).or(m.min_size.or(g.min_size));
                m.max_size = m.max_size.max(g.max_size);
                m.first_s = m.first_s.min(g.first_s);
                m.last_s = m.last_s.max(g.last_s);
                for a in g.acquired_by {
                    if !m.acquired_by.contains(&a) {
                        m.acquired_by.push(a);
                    }
                }
                m.examples.extend(g.examples);
                m.examples.sort_by(|a, b| a.time_s.total_cmp(&b.time_s));
                m.examples.truncate(5);
                if m.stack_note.is_none() {
                    m.stack_note = g.stack_note;
                }
            }
            None => {
                index.entry(h).or_default().push(out.len());
                out.push((g, sources));
            }
        }
    }
    out.sort_by(|(a, _), (b, _)| b.count.cmp(&a.count).then(b.bytes.cmp(&a.bytes)));
    out
}

/// Heap blocks that images replaced by execve(2) still held: not leaks,
/// and said so rather than silently left out.
pub(crate) fn exec_note((blocks, bytes): (u64, u64)) -> Option<String> {
    (blocks > 0).then(|| {
        format!(
            "{blocks} heap blocks ({bytes} bytes) held by program images that execve replaced \
             are not leaks (execve frees them) and are not listed"
        )
    })
}
