//! leakscope-report: renders leak groups for people (text, a flame graph)
//! and programs (JSON, contract v1; pprof).
//!
//! Input: a [`Report`] — what was traced, how many events, and symbolized
//! leak [`Group`]s. Output: text that fits 80 columns, or JSON whose field
//! names are a contract (fields may be added, never renamed; see
//! `tests/json_contract.rs`), or a gzipped pprof profile
//! ([`render_pprof`]), or a flame graph SVG ([`render_svg`]), or one
//! self-contained HTML page with growth charts ([`render_html`]).
//!
//! ```
//! use leakscope_report::{Coverage, Report, Target, Counts, render_text};
//! let r = Report {
//!     target: Target {
//!         command: vec!["./srv".into()], pid: Some(7), exit_code: Some(0), signal: None,
//!     },
//!     backend: "ebpf".into(), duration_s: 1.0,
//!     events: Counts { total: 10, lost: 0, settled: 0 }, notes: vec![],
//!     coverage: vec![Coverage::all("fd")], leaks: vec![],
//!     suppressed: vec![], preexisting: vec![],
//! };
//! let text = render_text(&r, 10);
//! assert!(text.starts_with("leakscope: `./srv` exited with 0; traced fds (ebpf)\n"));
//! assert!(text.contains("No leaks found"));
//! ```
//!
//! It does not: trace, unwind or symbolize.
#![deny(missing_docs)]

use std::fmt::Write;

use leakscope_symbolize::Frame;
use serde::Serialize;

pub mod flamegraph;
pub mod html;
pub mod pprof;
pub mod suppress;

pub use flamegraph::render_svg;
pub use html::render_html;
pub use pprof::render_pprof;
pub use suppress::{Suppressed, Suppressions};

/// JSON report format version.
pub const VERSION: u32 = 1;

/// What was traced.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The command line (launch mode).
    pub command: Vec<String>,
    /// The traced (root) process.
    pub pid: Option<u32>,
    /// Its exit code (or 128+signal).
    pub exit_code: Option<i32>,
    /// The signal that killed it (`SIGABRT`), if one did; `exit_code` is
    /// then 128 + its number.
    pub signal: Option<String>,
}

/// Event counts.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    /// Events seen.
    pub total: u64,
    /// Events lost (never hidden).
    pub lost: u64,
    /// Of `total`: acquisitions and releases that a backend matched and
    /// settled where they happened, without sending them (an fd closed
    /// again in the kernel before anything needed it; a block freed on its
    /// own thread before the preload shim's next flush).
    pub settled: u64,
}

/// One example of a leaked resource.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// The process that held it.
    pub pid: u32,
    /// The fd number (fd leaks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// The block address (heap leaks), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Bytes (heap leaks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Path, socket addresses, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Acquisition time, seconds since start.
    pub time_s: f64,
}

/// A stack frame as reported.
#[derive(Debug, Clone, Serialize)]
pub struct StackFrame {
    /// Absolute address, hex.
    pub addr: String,
    /// Function name, demangled.
    pub function: Option<String>,
    /// Source file.
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// Module path.
    pub module: Option<String>,
    /// Whether this frame was inlined into the next one.
    pub inlined: bool,
}

impl From<&Frame> for StackFrame {
    fn from(f: &Frame) -> Self {
        StackFrame {
            addr: format!("{:#x}", f.addr.0),
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
            module: f.module.clone(),
            inlined: f.inlined,
        }
    }
}

/// Leaks sharing a kind and an acquiring stack.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// `fd`, `heap` or `tcp`.
    pub kind: String,
    /// fd subtype (`file`, `socket`, ...), or `heap`.
    pub resource: String,
    /// How many.
    pub count: u64,
    /// Bytes (heap only, else 0).
    pub bytes: u64,
    /// Smallest block (heap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u64>,
    /// Largest block (heap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// TCP state (tcp only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The acquiring syscalls or functions (`openat`, `accept4`, `malloc`).
    pub acquired_by: Vec<String>,
    /// First acquisition, seconds since start.
    pub first_s: f64,
    /// Last acquisition, seconds since start.
    pub last_s: f64,
    /// A few of the leaked resources.
    pub examples: Vec<Example>,
    /// The acquiring stack, innermost first.
    pub stack: Vec<StackFrame>,
    /// Why the stack is missing or incomplete, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack_note: Option<String>,
    /// Periodic reports: change in count since the previous report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<i64>,
    /// Periodic reports: how many consecutive reports it grew in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growing_intervals: Option<u32>,
}

/// A resource that was already open when tracing began: no stack, never
/// counted as a leak.
#[derive(Debug, Clone, Serialize)]
pub struct Preexisting {
    /// The holder.
    pub pid: u32,
    /// The fd.
    pub fd: i32,
    /// What it refers to (path, `socket:[inode]` with addresses and TCP state).
    pub detail: String,
}

/// How much of a kind of resource was traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Traced {
    /// Every process of the traced tree.
    All,
    /// Some processes but not others (a statically linked program started
    /// by a script ignores the heap shim).
    Part,
    /// None of it.
    None,
}

/// Whether one kind of resource (`fd`, `heap`, `tcp`) was traced, and why
/// not: a report says "no leaks" only of what it saw.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    /// `fd`, `heap` or `tcp`.
    pub kind: String,
    /// Asked for, by `--track` or by default. A requested kind that was
    /// not traced in full fails `--fail-on-leak`.
    pub requested: bool,
    /// How much of it was traced.
    pub traced: Traced,
    /// Why it was not (all) traced.
    pub reason: Option<String>,
}

impl Coverage {
    /// A kind traced in full.
    pub fn all(kind: &str) -> Coverage {
        Coverage {
            kind: kind.into(),
            requested: true,
            traced: Traced::All,
            reason: None,
        }
    }
}

/// A whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was traced.
    pub target: Target,
    /// Backend(s) used, e.g. `ebpf` or `ebpf+preload`.
    pub backend: String,
    /// Wall time traced.
    pub duration_s: f64,
    /// Event counts.
    pub events: Counts,
    /// Things the reader must know (lost stacks, skipped syscalls).
    pub notes: Vec<String>,
    /// What was traced and what was not, per kind; empty when not known
    /// (the report then makes no claim about it).
    pub coverage: Vec<Coverage>,
    /// Leak groups, largest first.
    pub leaks: Vec<Group>,
    /// What suppressions took out of `leaks`, per rule that matched.
    pub suppressed: Vec<Suppressed>,
    /// Attach mode: what was open before tracing began (reported apart).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preexisting: Vec<Preexisting>,
}

impl Report {
    /// Whether every kind that was asked for was traced in full, so that
    /// no leaks means none were there to see.
    pub fn fully_traced(&self) -> bool {
        self.coverage
            .iter()
            .all(|c| !c.requested || c.traced == Traced::All)
    }
}

#[derive(Serialize)]
struct Versioned<'a> {
    version: u32,
    #[serde(flatten)]
    report: &'a Report,
}

/// JSON, contract v1 (pretty-printed, trailing newline).
pub fn render_json(report: &Report) -> String {
    let mut s = serde_json::to_string_pretty(&Versioned {
        version: VERSION,
        report,
    })
    .expect("a report always serializes");
    s.push('\n');
    s
}

/// JSON on one line (periodic reports: one per line).
pub fn render_json_line(report: &Report) -> String {
    let mut s = serde_json::to_string(&Versioned {
        version: VERSION,
        report,
    })
    .expect("a report always serializes");
    s.push('\n');
    s
}

const WIDTH: usize = 80;

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let keep: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{keep}…")
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// A module that belongs to the system rather than to the program.
fn is_system(module: &str) -> bool {
    let base = basename(module);
    base.starts_with("libc.so")
        || base.starts_with("libc-")
        || base.starts_with("ld-linux")
        || base.starts_with("libpthread")
        || base.starts_with("libstdc++")
        || base.starts_with("libgcc_s")
        || base.starts_with("libleakscope_shim")
}

/// The frame a reader wants named: the first one outside libc and friends
/// that has source lines (in a static binary libc has none), else the
/// first one outside libc, else the first named one.
pub fn culprit(stack: &[StackFrame]) -> Option<&StackFrame> {
    // Code of the language runtimes inlined into the program (Rust's std,
    // C++ headers) is not where a leak is written either.
    let runtime_source = |f: &StackFrame| {
        f.file
            .as_deref()
            .is_some_and(|p| p.starts_with("/rustc/") || p.starts_with("/usr/include/"))
    };
    let own = |f: &&StackFrame| {
        f.function.is_some() && !f.module.as_deref().is_some_and(is_system) && !runtime_source(f)
    };
    stack
        .iter()
        .filter(own)
        .find(|f| f.line.is_some())
        .or_else(|| stack.iter().find(own))
        .or_else(|| stack.iter().find(|f| f.function.is_some()))
}

fn what(g: &Group) -> String {
    let n = g.count;
    match g.kind.as_str() {
        "heap" => format!(
            "{n} heap block{} ({} bytes)",
            if n == 1 { "" } else { "s" },
            g.bytes
        ),
        "tcp" => format!(
            "{n} TCP socket{} in {}",
            if n == 1 { "" } else { "s" },
            g.state.as_deref().unwrap_or("?")
        ),
        _ => format!("{n} {} fd{}", g.resource, if n == 1 { "" } else { "s" }),
    }
}

/// Human text: one block per group (at most `top`), then a summary line.
pub fn render_text(report: &Report, top: usize) -> String {
    let mut out = String::new();
    for line in header(report) {
        let _ = writeln!(out, "{line}");
    }
    let total = report.leaks.len();
    for (i, g) in report.leaks.iter().take(top).enumerate() {
        let _ = writeln!(out);
        let from = culprit(&g.stack)
            .and_then(|f| f.function.as_deref())
            .map(|f| format!(" from {f}"))
            .unwrap_or_default();
        let head = format!("{} leaked{from}", what(g));
        let tag = format!("[{}/{}]", i + 1, total);
        let room = WIDTH.saturating_sub(tag.len() + 1);
        let head = clip(&head, room);
        let _ = writeln!(out, "{head:<room$} {tag}");
        if let (Some(change), Some(n)) = (g.change, g.growing_intervals) {
            let grew = if n > 0 {
                format!(
                    ", grew in the last {n} report{}",
                    if n == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            };
            let _ = writeln!(out, "  change since last report: {change:+}{grew}");
        }
        let mut when = format!(
            "  acquired by {} between {:.3} s and {:.3} s",
            g.acquired_by.join(", "),
            g.first_s,
            g.last_s
        );
        if let (Some(lo), Some(hi)) = (g.min_size, g.max_size) {
            let _ = write!(when, ", {lo}..{hi} bytes each");
        }
        let _ = writeln!(out, "{}", clip(&when, WIDTH));
        for e in g.examples.iter().take(3) {
            let id = match (e.fd, &e.addr) {
                (Some(fd), _) => format!("fd {fd}"),
                (None, Some(a)) => a.clone(),
                _ => String::new(),
            };
            // The pid is worth the space only when it is not the command's.
            let pid = match report.target.pid {
                Some(p) if p == e.pid => String::new(),
                _ => format!("  (pid {})", e.pid),
            };
            let line = format!("    {id:<7} {}{pid}", e.detail.as_deref().unwrap_or(""));
            let _ = writeln!(out, "{}", clip(line.trim_end(), WIDTH));
        }
        if g.count > 3 {
            let _ = writeln!(out, "    ... and {} more", g.count - 3);
        }
        // Frames past `main` are libc's start-up, the same for every leak:
        // the text stops there (JSON keeps them).
        let shown = g
            .stack
            .iter()
            .position(|f| f.function.as_deref() == Some("main") && !f.inlined)
            .map_or(g.stack.len(), |i| i + 1);
        for (n, f) in g.stack.iter().take(shown).enumerate() {
            let func = f.function.as_deref().unwrap_or("??");
            let loc = match (&f.file, f.line) {
                (Some(file), Some(line)) => format!(" {}:{line}", basename(file)),
                (Some(file), None) => format!(" {}", basename(file)),
                _ => String::new(),
            };
            let module = f
                .module
                .as_deref()
                .map(|m| format!(" [{}]", basename(m)))
                .unwrap_or_else(|| format!(" [{}]", f.addr));
            let inl = if f.inlined { " (inlined)" } else { "" };
            let line = format!("    #{n:<2} {func}{inl}{loc}{module}");
            let _ = writeln!(out, "{}", clip(&line, WIDTH));
        }
        if let Some(note) = &g.stack_note {
            let _ = writeln!(out, "{}", clip(&format!("    (stack {note})"), WIDTH));
        }
    }
    if total > top {
        let _ = writeln!(
            out,
            "\n{} more group{} not shown (--top {top}).",
            total - top,
            if total - top == 1 { "" } else { "s" }
        );
    }
    if total == 0 {
        let _ = writeln!(out);
        for line in wrap(&no_leaks(report), "", "  ") {
            let _ = writeln!(out, "{line}");
        }
    }
    if !report.preexisting.is_empty() {
        let _ = writeln!(
            out,
            "\n{} fds were open before tracing began (no stack, not counted):",
            report.preexisting.len()
        );
        for p in report.preexisting.iter().take(10) {
            let line = format!("    fd {:<5} {}", p.fd, p.detail);
            let _ = writeln!(out, "{}", clip(&line, WIDTH));
        }
        if report.preexisting.len() > 10 {
            let _ = writeln!(out, "    ... and {} more", report.preexisting.len() - 10);
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out, "\n{}", summary(report));
    out
}

/// How a kind is named: in a list of what was traced (`fds`, `heap`),
/// as a subject with its verb (`fds` were, `the heap` was), and before
/// "leaks" (`fd`, `heap`).
fn kind_words(kind: &str) -> (&str, &str, &str, &str) {
    match kind {
        "fd" => ("fds", "fds", "were", "fd"),
        "heap" => ("heap", "the heap", "was", "heap"),
        "tcp" => ("TCP states", "TCP states", "were", "TCP"),
        other => (other, other, "was", other),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String], and: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} {and} {last}", rest.join(", ")),
    }
}

/// What was asked for and was not traced in full.
fn untraced(report: &Report) -> impl Iterator<Item = &Coverage> {
    report
        .coverage
        .iter()
        .filter(|c| c.requested && c.traced != Traced::All)
}

/// "the heap was not traced", "part of the heap was not traced".
fn not_traced(c: &Coverage) -> String {
    let (_, subject, verb, _) = kind_words(&c.kind);
    match c.traced {
        Traced::Part => format!("part of {subject} was not traced"),
        _ => format!("{subject} {verb} not traced"),
    }
}

/// The first lines: the command, how it ended, what was traced and what
/// was not, each kind not traced with its reason.
fn header(report: &Report) -> Vec<String> {
    let cmd = report.target.command.join(" ");
    let exit = match (report.target.exit_code, report.target.pid) {
        _ if report.target.signal.is_some() => {
            format!(
                "killed by {}",
                report.target.signal.as_deref().unwrap_or("")
            )
        }
        (Some(c), _) => format!("exited with {c}"),
        (None, Some(pid)) => format!("(pid {pid}) still running"),
        (None, None) => "was traced".to_string(),
    };
    let asked: Vec<&Coverage> = report.coverage.iter().filter(|c| c.requested).collect();
    let mut traced: Vec<String> = Vec::new();
    let mut not: Vec<String> = Vec::new();
    for c in &asked {
        let (list, alone, _, _) = kind_words(&c.kind);
        match c.traced {
            Traced::All => traced.push(list.to_string()),
            Traced::Part => {
                traced.push(list.to_string());
                not.push(format!("all of {alone}"));
            }
            Traced::None => not.push(alone.to_string()),
        }
    }
    // The heap shim that saw no process traced nothing: not named.
    let heap_none = asked
        .iter()
        .any(|c| c.kind == "heap" && c.traced == Traced::None);
    let backend = match report.backend.split_once('+') {
        Some((fd, "preload")) if heap_none => fd,
        _ => &report.backend,
    };
    let mut tail = if asked.is_empty() {
        format!("traced ({backend})")
    } else if traced.is_empty() {
        "traced NOTHING".to_string()
    } else {
        format!("traced {} ({backend})", and_list(&traced, "and"))
    };
    if !not.is_empty() {
        let _ = write!(tail, ", NOT {}", and_list(&not, "or"));
    }
    // The command gives way when the line is too long: what was traced
    // and what was not must never be clipped.
    let fixed = format!("leakscope: `` {exit}; {tail}").chars().count();
    let cmd = clip(&cmd, WIDTH.saturating_sub(fixed).max(10));
    let mut lines = vec![format!("leakscope: `{cmd}` {exit}; {tail}")];
    for c in untraced(report) {
        if let Some(why) = &c.reason {
            lines.extend(wrap(&format!("{}: {why}", not_traced(c)), "  ", "    "));
        }
    }
    lines
}

/// The verdict when no leak group is left: only of what was traced.
fn no_leaks(report: &Report) -> String {
    let missing: Vec<&Coverage> = untraced(report).collect();
    if missing.is_empty() {
        return "No leaks found.".into();
    }
    let why: Vec<String> = missing
        .iter()
        .map(|c| match &c.reason {
            Some(r) => format!("{}: {r}", not_traced(c)),
            None => not_traced(c),
        })
        .collect();
    let seen: Vec<String> = report
        .coverage
        .iter()
        .filter(|c| c.requested && c.traced != Traced::None)
        .map(|c| kind_words(&c.kind).3.to_string())
        .collect();
    if seen.is_empty() {
        return format!(
            "Nothing was traced, so no leaks can be reported; {}.",
            why.join("; ")
        );
    }
    format!(
        "No {} leaks found; {}.",
        and_list(&seen, "or"),
        why.join("; ")
    )
}

/// `text` in lines of at most 80 columns, broken between words; the first
/// line starts with `first`, the others with `rest`. A word longer than a
/// line stays whole.
fn wrap(text: &str, first: &str, rest: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            lines.push(std::mem::replace(&mut line, rest.to_string()));
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    lines.push(line);
    lines
}

fn summary(report: &Report) -> String {
    let mut parts = Vec::new();
    for (kind, unit) in [("fd", "fd"), ("heap", "heap block"), ("tcp", "TCP socket")] {
        let gs: Vec<&Group> = report.leaks.iter().filter(|g| g.kind == kind).collect();
        if gs.is_empty() {
            continue;
        }
        let n: u64 = gs.iter().map(|g| g.count).sum();
        let mut p = format!(
            "{n} {unit}{} in {} group{}",
            if n == 1 { "" } else { "s" },
            gs.len(),
            if gs.len() == 1 { "" } else { "s" }
        );
        if kind == "heap" {
            let b: u64 = gs.iter().map(|g| g.bytes).sum();
            let _ = write!(p, " ({b} bytes)");
        }
        parts.push(p);
    }
    let seen: Vec<String> = report
        .coverage
        .iter()
        .filter(|c| c.requested && c.traced != Traced::None)
        .map(|c| kind_words(&c.kind).3.to_string())
        .collect();
    let missing: Vec<String> = untraced(report).map(not_traced).collect();
    let mut leaked = match (parts.is_empty(), missing.is_empty(), seen.is_empty()) {
        (false, _, _) => format!("{} leaked", parts.join(", ")),
        (true, true, _) => "no leaks".to_string(),
        (true, false, true) => "nothing traced".to_string(),
        (true, false, false) => format!("no {} leaks", and_list(&seen, "or")),
    };
    if !missing.is_empty() {
        let _ = write!(leaked, " ({})", missing.join(", "));
    }
    let settled = match report.events.settled {
        0 => String::new(),
        n => format!(" ({n} settled in place)"),
    };
    let mut line = format!(
        "Summary: {leaked}; {} events{settled} in {:.2} s, {} lost.",
        report.events.total, report.duration_s, report.events.lost
    );
    if !report.suppressed.is_empty() {
        let n: u64 = report.suppressed.iter().map(|s| s.count).sum();
        let g: u64 = report.suppressed.iter().map(|s| s.groups).sum();
        let b: u64 = report.suppressed.iter().map(|s| s.bytes).sum();
        let mine = report
            .suppressed
            .iter()
            .any(|s| s.origin != suppress::DEFAULT_ORIGIN);
        let glibc = report
            .suppressed
            .iter()
            .any(|s| s.origin == suppress::DEFAULT_ORIGIN);
        let by = match (mine, glibc) {
            (true, true) => "your suppressions and the runtimes' caches",
            (true, false) => "your suppressions",
            _ => "the runtimes' caches (glibc, libstdc++, Rust's std); --no-default-suppressions shows them",
        };
        let bytes = if b > 0 {
            format!(", {b} bytes")
        } else {
            String::new()
        };
        let _ = write!(
            line,
            "\nSuppressed {g} group{} ({n} leaked{bytes}): {by}.",
            if g == 1 { "" } else { "s" },
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(total: u64, settled: u64, lost: u64) -> Report {
        Report {
            target: Target {
                command: vec!["./srv".into()],
                pid: Some(7),
                exit_code: Some(0),
                signal: None,
            },
            backend: "ebpf".into(),
            duration_s: 1.0,
            events: Counts {
                total,
                lost,
                settled,
            },
            notes: vec![],
            coverage: vec![],
            leaks: vec![],
            suppressed: vec![],
            preexisting: vec![],
        }
    }

    #[test]
    fn summary_says_how_many_events_were_settled_in_place() {
        assert_eq!(
            summary(&report(695, 370, 0)),
            "Summary: no leaks; 695 events (370 settled in place) in 1.00 s, 0 lost."
        );
        assert_eq!(
            summary(&report(10, 0, 3)),
            "Summary: no leaks; 10 events in 1.00 s, 3 lost."
        );
    }

    fn not_traced(kind: &str, traced: Traced, reason: &str) -> Coverage {
        Coverage {
            kind: kind.into(),
            requested: true,
            traced,
            reason: Some(reason.into()),
        }
    }

    /// "No leaks found" only of what was traced (issue 10): the first
    /// line says what was and what was not, the verdict and the summary
    /// name what was not.
    #[test]
    fn no_leaks_is_said_only_of_what_was_traced() {
        let mut r = report(6, 0, 0);
        r.backend = "ebpf+preload".into();
        r.coverage = vec![Coverage::all("fd"), Coverage::all("heap")];
        let text = render_text(&r, 10);
        assert_eq!(
            text,
            "leakscope: `./srv` exited with 0; traced fds and heap (ebpf+preload)\n\
             \n\
             No leaks found.\n\
             \n\
             Summary: no leaks; 6 events in 1.00 s, 0 lost.\n"
        );
        let static_ = "./srv is statically linked: the loader ignores LD_PRELOAD";
        r.coverage[1] = not_traced("heap", Traced::None, static_);
        r.backend = "ebpf".into();
        let text = render_text(&r, 10);
        assert_eq!(
            text,
            "leakscope: `./srv` exited with 0; traced fds (ebpf), NOT the heap\n  \
             the heap was not traced: ./srv is statically linked: the loader ignores\n    \
             LD_PRELOAD\n\
             \n\
             No fd leaks found; the heap was not traced: ./srv is statically linked: the\n  \
             loader ignores LD_PRELOAD.\n\
             \n\
             Summary: no fd leaks (the heap was not traced); 6 events in 1.00 s, 0 lost.\n"
        );
        r.coverage = vec![not_traced("heap", Traced::None, static_)];
        let text = render_text(&r, 10);
        assert!(
            text.starts_with("leakscope: `./srv` exited with 0; traced NOTHING, NOT the heap\n"),
            "{text}"
        );
        assert!(
            text.contains("\nNothing was traced, so no leaks can be reported; the heap was not"),
            "{text}"
        );
        assert!(
            text.contains("Summary: nothing traced (the heap was not traced);"),
            "{text}"
        );
        r.coverage = vec![
            Coverage::all("fd"),
            not_traced("heap", Traced::Part, "pid 9 `/sbin/x` is statically linked"),
        ];
        r.target.command = vec![
            "sh".into(),
            "-c".into(),
            "a-long-script-name; exec /sbin/x".into(),
        ];
        let text = render_text(&r, 10);
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            "leakscope: `sh -c a-l…` exited with 0; traced fds and heap (ebpf), NOT all of \
             the heap"
        );
        assert!(
            text.contains("\nNo fd or heap leaks found; part of the heap was not traced: pid 9"),
            "{text}"
        );
        // A kind the user did not ask for is not the report's business.
        r.coverage = vec![
            Coverage::all("fd"),
            Coverage {
                requested: false,
                ..not_traced("heap", Traced::None, "not asked for")
            },
        ];
        assert!(r.fully_traced());
        let text = render_text(&r, 10);
        assert!(
            text.starts_with(
                "leakscope: `sh -c a-long-script-name; exec /s…` exited with 0; traced fds \
                 (ebpf)\n"
            ),
            "{text}"
        );
        assert!(text.contains("\nNo leaks found.\n"), "{text}");
    }

    #[test]
    fn text_stacks_stop_at_main() {
        let frame = |name: &str| StackFrame {
            addr: "0x1".into(),
            function: Some(name.into()),
            file: None,
            line: None,
            module: Some("/bin/prog".into()),
            inlined: false,
        };
        let mut r = report(2, 0, 0);
        r.leaks = vec![Group {
            kind: "heap".into(),
            resource: "heap".into(),
            count: 1,
            bytes: 8,
            min_size: Some(8),
            max_size: Some(8),
            state: None,
            acquired_by: vec!["malloc".into()],
            first_s: 0.0,
            last_s: 0.0,
            examples: vec![],
            stack: [
                "malloc",
                "leaky",
                "main",
                "__libc_start_call_main",
                "_start",
            ]
            .into_iter()
            .map(frame)
            .collect(),
            stack_note: None,
            change: None,
            growing_intervals: None,
        }];
        let text = render_text(&r, 10);
        assert!(text.contains("#2  main [prog]"), "{text}");
        assert!(
            !text.contains("__libc_start_call_main") && !text.contains("_start"),
            "{text}"
        );
        assert!(render_json(&r).contains("__libc_start_call_main"));
    }

    #[test]
    fn summary_counts_what_was_suppressed_and_by_whom() {
        let hit = |origin: &str, groups, count, bytes| Suppressed {
            pattern: "x".into(),
            origin: origin.into(),
            groups,
            count,
            bytes,
        };
        let mut r = report(10, 0, 0);
        r.suppressed = vec![hit("default", 2, 5, 100), hit("default", 1, 1, 0)];
        assert_eq!(
            summary(&r).lines().nth(1),
            Some(
                "Suppressed 3 groups (6 leaked, 100 bytes): the runtimes' caches \
                 (glibc, libstdc++, Rust's std); --no-default-suppressions shows them."
            )
        );
        r.suppressed = vec![hit("my.supp:3", 1, 2, 0)];
        assert_eq!(
            summary(&r).lines().nth(1),
            Some("Suppressed 1 group (2 leaked): your suppressions.")
        );
        r.suppressed.push(hit("default", 1, 1, 8));
        assert!(summary(&r).ends_with("your suppressions and the runtimes' caches."));
    }
}
