//! leakscope-record: recordings (`.lsr` files), between the ledger and the
//! report.
//!
//! Input: the events of a trace, applied to a [`Recorder`] (which owns the
//! ledger and the module maps), and the backend that resolves their stack
//! handles. Output: a recording — [`Writer`] puts it in any `io::Write`
//! (a file for `leakscope record`, memory for `leakscope run`), [`read`]
//! turns its bytes back into a [`Recording`]: what was outstanding at the
//! end, each with its unwound stack, the growth of each group over time,
//! and what the report's header and summary need.
//!
//! What is written, and why it stays small: at each commit (every few
//! seconds, and at the end) the recorder compares what the ledger holds
//! with what it wrote before, and writes only the difference — a resource
//! acquired and released between two commits is never written; one that
//! outlives a commit is written once in full and removed later by its
//! number. Stacks are unwound when first needed and written once per
//! distinct stack (module path, build id, file offset per frame, so that
//! `report` symbolizes later, on this machine or one with the same files).
//! Each commit also writes the outstanding count of every group that
//! changed since the last one. Chunks carry a CRC-32, so a recording whose
//! recorder was killed reads up to its last complete chunk.
//!
//! ```
//! use leakscope_event::{Acquire, Event, Fd, FdKind, Pid, RawStack, StackId, Tid, TimeNs};
//! use leakscope_record::{read, End, Meta, Recorder, Writer};
//!
//! struct NoStacks;
//! impl leakscope_event::Backend for NoStacks {
//!     fn name(&self) -> &'static str { "test" }
//!     fn spawn(&mut self, _: &mut std::process::Command) -> std::io::Result<std::process::Child> {
//!         Err(std::io::Error::other("this example launches nothing"))
//!     }
//!     fn poll(&mut self, _: std::time::Duration, _: &mut dyn FnMut(Event))
//!         -> Result<(), Box<dyn std::error::Error + Send + Sync>> { Ok(()) }
//!     fn raw_stack(&mut self, _: StackId) -> RawStack { RawStack::Missing("none".into()) }
//! }
//!
//! let meta = Meta { command: vec!["./srv".into()], pid: Some(9), ..Meta::default() };
//! let mut rec = Recorder::new(Writer::new(Vec::new(), &meta).unwrap());
//! let open = |fd, t| Event::Acquire(Acquire {
//!     time: TimeNs(t), pid: Pid(9), tid: Tid(9), fd: Fd(fd), kind: FdKind::File,
//!     syscall: "openat".into(), cloexec: false, dup_of: None, inode: 0,
//!     detail: Some("/etc/hosts".into()), stack: StackId(1),
//! });
//! rec.ledger.apply(&open(3, 1));
//! rec.ledger.apply(&open(4, 2));
//! rec.ledger.apply(&Event::Release { time: TimeNs(3), pid: Pid(9), fd: Fd(3) });
//! let bytes = rec.finish(&mut NoStacks, 0.5, End::default()).unwrap();
//! let r = read(&bytes).unwrap();
//! assert_eq!(r.leaks.len(), 1);
//! assert_eq!(r.leaks[0].leak.fd, Some(Fd(4)));
//! assert_eq!(r.stacks[0].note.as_deref(), Some("none"));
//! assert!(r.end.is_some());
//! ```
//!
//! It does not: trace, symbolize, group leaks the way the report does
//! (groups here are by unwound stack), or apply suppressions.
#![deny(missing_docs)]

mod format;
mod reader;
mod recorder;
mod writer;

pub use format::{MAGIC, VERSION};
pub use reader::{read, read_file};
pub use recorder::Recorder;
pub use writer::Writer;

use leakscope_event::TimeNs;
use leakscope_ledger::Leak;
use leakscope_stacks::RawFrame;

/// What was traced, and how: known when recording starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Meta {
    /// The command line (launched), or the process's (attached).
    pub command: Vec<String>,
    /// The launched or attached process.
    pub pid: Option<u32>,
    /// Attached to a running process rather than launched.
    pub attach: bool,
    /// fds were traced.
    pub fd: bool,
    /// The heap was traced.
    pub heap: bool,
    /// TCP states were traced.
    pub tcp: bool,
    /// Wall-clock start, seconds since the Unix epoch.
    pub started_unix_s: u64,
}

/// How much of a kind was traced (as the report's coverage says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traced {
    /// Every process.
    All,
    /// Some processes.
    Part,
    /// None.
    None,
}

/// Coverage of one kind (`fd`, `heap`, `tcp`).
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage {
    /// The kind.
    pub kind: String,
    /// Asked for.
    pub requested: bool,
    /// How much was traced.
    pub traced: Traced,
    /// Why not all.
    pub reason: Option<String>,
}

/// An fd open before tracing began (attach).
#[derive(Debug, Clone, PartialEq)]
pub struct Preexisting {
    /// Holder.
    pub pid: u32,
    /// The fd.
    pub fd: i32,
    /// What it refers to.
    pub detail: String,
}

/// How the trace ended: known once it has.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct End {
    /// The exit code (128+N after signal N).
    pub exit_code: Option<i32>,
    /// The signal's name, if one killed it.
    pub signal: Option<String>,
    /// Backend(s) used.
    pub backend: String,
    /// The backends' notes for the reader.
    pub notes: Vec<String>,
    /// What was traced per kind.
    pub coverage: Vec<Coverage>,
    /// Attach: fds open before tracing began.
    pub preexisting: Vec<Preexisting>,
    /// Heap blocks (and bytes) that images replaced by execve still held.
    pub freed_by_exec: (u64, u64),
}

/// Counts and the clock at the last commit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Progress {
    /// The latest event time.
    pub now: TimeNs,
    /// Wall time traced, seconds.
    pub duration_s: f64,
    /// Events seen (with settled pairs).
    pub events: u64,
    /// Events lost.
    pub lost: u64,
    /// Of `events`: acquisitions and releases settled by a backend.
    pub settled: u64,
}

/// An unwound stack, innermost frame first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Stack {
    /// The frames.
    pub frames: Vec<RawFrame>,
    /// Why it is missing or incomplete, if it is.
    pub note: Option<String>,
}

/// An outstanding resource as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The leak; its stack handle is an index into [`Recording::stacks`].
    pub leak: Leak,
    /// A heap block the C runtime keeps on purpose (`stdout's buffer`).
    pub kept: Option<String>,
}

/// The kind of resource of a growth series: an fd kind's index in
/// [`leakscope_event::FdKind::ALL`], or [`HEAP`].
pub type KindCode = u8;
/// The [`KindCode`] of heap blocks.
pub const HEAP: KindCode = 255;

/// One group's outstanding count at a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrowthEntry {
    /// Index into [`Recording::stacks`].
    pub stack: u32,
    /// Which kind.
    pub kind: KindCode,
    /// Outstanding resources.
    pub count: u64,
    /// Their bytes (heap).
    pub bytes: u64,
}

/// The groups that changed at one commit, with their new counts.
#[derive(Debug, Clone, PartialEq)]
pub struct GrowthPoint {
    /// When.
    pub time: TimeNs,
    /// Groups whose count changed since the previous point.
    pub changed: Vec<GrowthEntry>,
}

/// A recording read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// How it was made.
    pub meta: Meta,
    /// Stacks by index.
    pub stacks: Vec<Stack>,
    /// What was outstanding at the end (or at the last complete chunk),
    /// in the order it was recorded.
    pub leaks: Vec<Recorded>,
    /// Outstanding counts over time.
    pub growth: Vec<GrowthPoint>,
    /// Counts at the last commit.
    pub progress: Progress,
    /// How the trace ended; `None` when the recorder stopped before the
    /// end (killed), and the recording ends at its last complete chunk.
    pub end: Option<End>,
    /// Bytes after the last complete chunk (an unfinished write).
    pub torn_tail: bool,
}

/// Why a recording cannot be read. Each message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a recording at all.
    #[error("not a leakscope recording (no LSREC header)")]
    NotARecording,
    /// Written by a newer leakscope.
    #[error("recording format {found} is newer than this leakscope reads ({VERSION}); report it with a newer leakscope")]
    Newer {
        /// The file's version.
        found: u16,
    },
    /// It ends before anything useful.
    #[error("truncated recording: it ends before its first complete chunk")]
    Truncated,
    /// Something in it is wrong.
    #[error("corrupt recording: {what} (at byte {offset})")]
    Corrupt {
        /// Offset of the chunk (or header field).
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
}
