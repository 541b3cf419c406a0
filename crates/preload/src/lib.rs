//! leakscope-preload: the preload backend for heap leaks, no privileges needed.
//!
//! Input: a command to launch. Output: [`Event::Alloc`], [`Event::Free`],
//! [`Event::Map`], [`Event::Fork`], [`Event::Exec`], [`Event::HeapEnd`] and
//! [`Event::Lost`] for the command and every child it forks or execs, plus
//! [`RawStack::Unwound`] stacks on demand.
//!
//! How: [`Preload::spawn`] starts the command with
//! `LD_PRELOAD=libleakscope_shim.so` (prepended to any existing value) and
//! `LEAKSCOPE_SHIM_SOCK` naming a unix socket in a private temporary
//! directory. Each process image the shim is loaded into (the command, each
//! fork child, each exec) connects once and streams records (format below);
//! [`Preload::poll`] accepts connections and decodes them without blocking.
//! When a connection ends and its process is gone (or exec'd) the image's
//! heap is gone, so [`Event::HeapEnd`] follows. The HELLO carries the
//! shim's journal (a memfd, `SCM_RIGHTS`): when a process died without
//! sending everything (`_exit`, a signal, SIGKILL) the rest is read from
//! there, and a connection the program closed is taken over by the one
//! the shim makes again (HELLO kind 2). Stacks were unwound in the traced process (from `.eh_frame`,
//! so frame pointers are not needed); stack ids are namespaced per
//! connection: `StackId(connection << 32 | id)`.
//!
//! ```no_run
//! use leakscope_event::{Backend, Event};
//! use leakscope_preload::Preload;
//!
//! let mut preload = Preload::new().unwrap();
//! let mut child = preload.spawn(&mut std::process::Command::new("/bin/ls")).unwrap();
//! let mut allocs = 0;
//! while preload.has_connections() || child.try_wait().unwrap().is_none() {
//!     preload
//!         .poll(std::time::Duration::from_millis(50), &mut |e| {
//!             if matches!(e, Event::Alloc { .. }) {
//!                 allocs += 1;
//!             }
//!         })
//!         .unwrap();
//! }
//! println!("{allocs} allocations");
//! ```
//!
//! `cargo run --release -p leakscope-preload --example heap_trace -- ./prog`
//! runs that loop, keeps a table of live blocks and prints the leaked ones
//! grouped by stack (see `examples/heap_trace.rs`).
//!
//! # Wire format (version 5)
//! A stream of records, little-endian, unpadded; a tag byte, then the body
//! (the shim's crate docs have the full table):
//!
//! | tag | record | body |
//! |-----|--------|------|
//! | 1 | HELLO | `version:u16 kind:u8 pid:u32 ppid:u32 time:u64 len:u16 exe:[u8; len] resume:u64`; kind 0: new image (start or exec), 1: fork child, 2: the same image on a new connection (the program closed the old one), its stream going on at offset `resume` |
//! | 5 | MAP | `time:u64 start:u64 end:u64 offset:u64 len:u16 path:[u8; len]` |
//! | 6 | LOST | `count:u64` |
//! | 7 | CHUNK | `tid:u32 len:u32 body`: one thread's ALLOC (2), FREE (3) and STACK (4) records, LEB128 and delta-encoded |
//! | 8 | END | the end of a batch |
//! | 9 | PAIRS | `count:u64`: allocations freed on their thread before a flush, settled in the shim ([`Preload::settled`]) |
//! | 10 | NOTE | `len:u16 text:[u8; len]`: a sentence for the report (e.g. the program's malloc comes before the shim's) |
//! | 11 | KEPT | `what:u8 addr:u64`: at exit, the buffer of stdin (0), stdout (1) or stderr (2), which glibc keeps ([`Backend::kept_by_runtime`]) |
//!
//! HELLO is first; a STACK precedes the first ALLOC naming it; stack id 0:
//! none captured. The shim flushes every thread's buffer at once, so a
//! batch (the chunks up to END) holds every ALLOC and FREE numbered below
//! its highest number: the collector emits a batch's allocations and frees
//! sorted by (number, FREE after ALLOC), which puts a free on one thread
//! before the allocation that reused the address on another. HELLO times
//! are `CLOCK_MONOTONIC` ns, the others `CLOCK_MONOTONIC_COARSE` (one tick
//! of resolution) raised to at least the HELLO's; events carry them
//! relative to [`Preload::new`].
//!
//! It does not:
//! - track fds (use the ebpf backend; glibc-internal fd calls bypass
//!   LD_PRELOAD hooks);
//! - trace statically linked or setuid programs (the loader ignores
//!   `LD_PRELOAD` for them) or attach to running processes;
//! - symbolize or decide what leaked (that is the ledger's job).
#![deny(missing_docs)]

mod clock;
mod journal;
mod wire;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use leakscope_event::{
    AbsAddr, Backend, Event, FileOffset, Mapping, Pid, RawStack, StackId, Tid, TimeNs,
};

use crate::wire::{decode, decode_chunk, Decoded, Item, Record};
use leakscope_event::wire::{HELLO_FORK, HELLO_RESUME};

/// File name of the shim library.
pub const SHIM_NAME: &str = "libleakscope_shim.so";

/// Environment variable overriding where the shim is.
pub const SHIM_ENV: &str = "LEAKSCOPE_SHIM";

/// Environment variable through which the shim learns the socket path.
pub const SOCK_ENV: &str = "LEAKSCOPE_SHIM_SOCK";

/// How much one connection may read per [`Preload::poll`] before the others
/// get their turn.
const READ_BUDGET: usize = 8 << 20;

/// How long to wait for an exec'd image's old connection to end.
const EXEC_DRAIN: Duration = Duration::from_secs(2);

/// Errors of the preload backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The shim library is not where it should be.
    #[error(
        "the heap shim {path} is missing (build it with `cargo build -p leakscope-shim`, \
         or point {SHIM_ENV} at libleakscope_shim.so)"
    )]
    ShimMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The current executable's path is unknown.
    #[error("cannot find the current executable to locate the heap shim")]
    CurrentExe {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The collector socket could not be set up.
    #[error("cannot create the collector socket in {dir}")]
    Socket {
        /// The directory it was made in.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading from the shim or waiting for it failed.
    #[error("reading heap events from the shim failed")]
    Io {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A shim sent bytes that are not records (a version mismatch or a bug).
    #[error("malformed record from pid {pid}: {what}")]
    Protocol {
        /// The sender (0 before its HELLO).
        pid: u32,
        /// What was wrong.
        what: String,
    },
}

/// Where the shim is: `$LEAKSCOPE_SHIM` if set, else `libleakscope_shim.so`
/// next to the current executable, or one directory up (so that cargo's
/// `target/<profile>/{deps,examples}/` binaries find
/// `target/<profile>/libleakscope_shim.so`).
pub fn shim_path() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(SHIM_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::ShimMissing { path: p })
        };
    }
    let exe = std::env::current_exe().map_err(|source| Error::CurrentExe { source })?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let here = dir.join(SHIM_NAME);
    if here.is_file() {
        return Ok(here);
    }
    if let Some(up) = dir.parent().map(|d| d.join(SHIM_NAME)) {
        if up.is_file() {
            return Ok(up);
        }
    }
    Err(Error::ShimMissing { path: here })
}

/// One shim connection: one process image.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet decoded.
    buf: Vec<u8>,
    /// Namespace of its stack ids.
    ns: u64,
    /// From its HELLO.
    pid: Option<u32>,
    /// Read to EOF and finished (HeapEnd sent).
    done: bool,
    /// Read to EOF, not finished yet: an exec whose new image has not
    /// connected yet, a program that closed the connection, or a process
    /// that died. Finished once that is known (see [`Preload::end_dead`]).
    eof: bool,
    /// Allocations and frees of the batch being received, emitted in
    /// sequence order at its end.
    pending: Vec<Pending>,
    /// The HELLO's time: this image's events are no earlier.
    floor: u64,
    /// Bytes read from the socket, and the stream offset of its first
    /// byte (a resumed connection's HELLO is not part of the stream, so
    /// this may be "negative" by its size: wrapping arithmetic).
    received: u64,
    base: u64,
    /// The shim's journal (see `journal.rs`), from its HELLO.
    journal: Option<journal::Journal>,
    /// Set by a resuming HELLO: the bytes of a record the connection it
    /// took over cut short, to go before this connection's.
    carry: Option<Vec<u8>>,
}

impl Conn {
    fn new(stream: UnixStream, ns: u64) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            ns,
            pid: None,
            done: false,
            eof: false,
            pending: Vec::new(),
            floor: 0,
            received: 0,
            base: 0,
            journal: None,
            carry: None,
        }
    }

    /// The stream offset of the next byte to arrive.
    fn stream_at(&self) -> u64 {
        self.base.wrapping_add(self.received)
    }
}

/// An ALLOC (`size: Some`) or FREE waiting for the end of its batch.
struct Pending {
    seq: u64,
    time: u64,
    tid: u32,
    addr: u64,
    size: Option<u64>,
    stack: u32,
}

/// The preload backend: launches commands with the heap shim and collects
/// its records. See the crate docs.
pub struct Preload {
    shim: PathBuf,
    dir: PathBuf,
    sock: PathBuf,
    listener: UnixListener,
    conns: Vec<Conn>,
    next_ns: u64,
    stacks: HashMap<u64, Vec<AbsAddr>>,
    /// Pids that had a connection, to tell an exec from a first start.
    seen: HashSet<u32>,
    /// CLOCK_MONOTONIC at creation: time zero of the events.
    t0: u64,
    /// Allocations freed again that the shims cancelled without sending.
    settled: u64,
    /// Read buffer, reused.
    chunk: Vec<u8>,
    /// A pidfd of the child [`Preload::spawn`] started, until it exited.
    child_exit: Option<OwnedFd>,
    /// What the shims said the report must say.
    notes: Vec<String>,
    /// Whether a command was prepared for the shim.
    launched: bool,
    /// Blocks the C runtime keeps until exit, by (pid, address).
    kept: HashMap<(u32, u64), &'static str>,
    /// The shims' clock; None if it could not be made (they then call
    /// `clock_gettime`).
    clock: Option<clock::ClockPage>,
}

impl std::fmt::Debug for Preload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preload")
            .field("shim", &self.shim)
            .field("sock", &self.sock)
            .field("connections", &self.conns.len())
            .field("stacks", &self.stacks.len())
            .finish()
    }
}

/// `clock_gettime(id)` in ns.
fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// mkdtemp(3) under `base`: a directory only we can enter.
fn private_dir(base: &Path) -> io::Result<PathBuf> {
    let mut tmpl = base.join("leakscope-XXXXXX").into_os_string().into_vec();
    tmpl.push(0);
    // SAFETY: `tmpl` is NUL-terminated and writable.
    let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    tmpl.pop();
    Ok(PathBuf::from(OsString::from_vec(tmpl)))
}

impl Preload {
    /// Finds the shim with [`shim_path`] and listens on a fresh socket.
    pub fn new() -> Result<Preload, Error> {
        Self::with_shim(shim_path()?)
    }

    /// Uses the shim at `shim` and listens on a fresh socket.
    pub fn with_shim(shim: PathBuf) -> Result<Preload, Error> {
        if !shim.is_file() {
            return Err(Error::ShimMissing { path: shim });
        }
        let shim = shim.canonicalize().unwrap_or(shim);
        // sun_path holds 108 bytes: fall back to /tmp for long $TMPDIRs.
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 64 {
            base = PathBuf::from("/tmp");
        }
        let dir = private_dir(&base).map_err(|source| Error::Socket {
            dir: base.clone(),
            source,
        })?;
        let sock = dir.join("shim.sock");
        // std creates the socket with SOCK_CLOEXEC.
        let listener = UnixListener::bind(&sock)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| {
                let _ = std::fs::remove_dir_all(&dir);
                Error::Socket {
                    dir: dir.clone(),
                    source,
                }
            })?;
        let clock = clock::ClockPage::create(&dir.join(leakscope_event::wire::CLOCK_FILE)).ok();
        Ok(Preload {
            shim,
            dir,
            sock,
            listener,
            conns: Vec::new(),
            next_ns: 1,
            stacks: HashMap::new(),
            seen: HashSet::new(),
            t0: monotonic_ns(),
            settled: 0,
            chunk: Vec::new(),
            child_exit: None,
            notes: Vec::new(),
            launched: false,
            kept: HashMap::new(),
            clock,
        })
    }

    /// The shim library this backend preloads.
    pub fn shim(&self) -> &Path {
        &self.shim
    }

    /// The socket the shims connect to.
    pub fn socket_path(&self) -> &Path {
        &self.sock
    }

    /// Whether some traced process image is still connected (or has
    /// unread records), counting connections not accepted yet: an image
    /// that connected and exited after the last [`Preload::poll`] (a short
    /// exec'd child) still has its records waiting in the listen queue.
    pub fn has_connections(&self) -> bool {
        if !self.conns.is_empty() {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Starts `cmd` with the shim preloaded (see [`Backend::spawn`]).
    pub fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        self.prepare(cmd);
        let child = cmd.spawn()?;
        // pidfd_open(2) (Linux 5.3): readable once the child exits, so a
        // poll waiting for records returns at its exit instead of sleeping
        // out its timeout. Without it, polls just time out.
        // SAFETY: plain syscall; the fd is ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: a fresh fd we own (close-on-exec, as pidfd_open(2)
            // always makes it).
            self.child_exit = Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        Ok(child)
    }

    /// Sets `LD_PRELOAD` (prepended to any existing value) and the collector
    /// socket in `cmd`'s environment, for a launcher that spawns it itself.
    pub fn prepare(&mut self, cmd: &mut Command) {
        let existing = cmd
            .get_envs()
            .find(|(k, _)| *k == "LD_PRELOAD")
            .map(|(_, v)| v.map(|v| v.to_owned()))
            .unwrap_or_else(|| std::env::var_os("LD_PRELOAD"));
        let mut value = self.shim.clone().into_os_string();
        if let Some(e) = existing.filter(|e| !e.is_empty()) {
            value.push(":");
            value.push(e);
        }
        cmd.env("LD_PRELOAD", value).env(SOCK_ENV, &self.sock);
        self.launched = true;
    }

    fn rel(&self, t: u64) -> TimeNs {
        TimeNs(t.saturating_sub(self.t0))
    }

    fn now(&self) -> TimeNs {
        self.rel(monotonic_ns())
    }

    /// Accepts pending connections.
    fn accept(&mut self) -> Result<(), Error> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(true)
                        .map_err(|source| Error::Io { source })?;
                    self.conns.push(Conn::new(stream, self.next_ns));
                    self.next_ns += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(Error::Io { source }),
            }
        }
    }

    /// Reads what connection `i` has (up to `budget` bytes, or to EOF when
    /// `wait` is set, waiting at most that long), decodes it, and finishes
    /// it at EOF.
    fn service(
        &mut self,
        i: usize,
        budget: usize,
        wait: Option<Duration>,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Error> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut eof = false;
        let mut got = 0;
        // One read buffer for every call (256 KiB zeroed anew each time
        // was an mmap, page faults and a munmap per poll).
        let mut chunk = std::mem::take(&mut self.chunk);
        chunk.resize(256 * 1024, 0);
        while got < budget {
            let fd = self.conns[i].stream.as_raw_fd();
            match journal::recv(fd, &mut chunk) {
                Ok((0, _)) => {
                    eof = true;
                    break;
                }
                Ok((n, passed)) => {
                    got += n;
                    let c = &mut self.conns[i];
                    c.received += n as u64;
                    c.buf.extend_from_slice(&chunk[..n]);
                    if let Some(fd) = passed {
                        match journal::Journal::map(fd) {
                            Ok(j) => c.journal = Some(j),
                            Err(e) => self.notes.push(format!(
                                "a process's journal could not be read ({e}): what it had \
                                 not sent when it ended is missing"
                            )),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let Some(deadline) = deadline else { break };
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let mut pfd = libc::pollfd {
                        fd: self.conns[i].stream.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32 + 1) };
                }
                // ECONNRESET and the like: the process is gone.
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        self.chunk = chunk;
        self.decode_buffered(i, sink)?;
        if eof {
            // execve(2) closes the connection (close-on-exec) before the
            // new image connects: while the process lives on, wait for
            // that (or for its death) to say how its heap ended.
            // [`Preload::end_dead`] decides, after the connections the
            // process made before it died (a new image's) are read.
            self.conns[i].eof = true;
        }
        Ok(())
    }

    /// Finishes the connections read to EOF whose process has died since:
    /// their image's heap ended with the process.
    fn end_dead(&mut self, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        let dead = |c: &Conn| c.eof && !c.done && !c.pid.is_some_and(alive);
        if !self.conns.iter().any(dead) {
            return Ok(());
        }
        // An image that execs and then exits at once leaves both its
        // connections behind: the new one, still in the listener's queue,
        // says (by its HELLO) that the old image's heap ended by execve.
        let before = self.conns.len();
        self.accept()?;
        for i in before..self.conns.len() {
            self.service(i, READ_BUDGET, None, sink)?;
        }
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if c.eof && !c.done && !c.pid.is_some_and(alive) {
                self.finish(i, false, sink);
            }
        }
        Ok(())
    }

    /// Ends connection `i`: its image's heap is gone, freed by execve if
    /// `by_exec`, else with blocks never freed.
    fn finish(&mut self, i: usize, by_exec: bool, sink: &mut dyn FnMut(Event)) {
        let c = &mut self.conns[i];
        if c.done {
            return;
        }
        c.done = true;
        if !by_exec {
            // The process is gone: what it had not sent is in its journal.
            self.read_journal(i, sink);
        }
        // A batch cut short (the process died mid-send): what arrived.
        self.emit_pending(i, sink);
        let c = &mut self.conns[i];
        c.journal = None;
        let leftover = !c.buf.is_empty();
        let pid = c.pid;
        let time = self.now();
        if leftover {
            // A record cut short: the process died mid-write.
            sink(Event::Lost { time, count: 1 });
        }
        if let Some(pid) = pid {
            sink(Event::HeapEnd {
                time,
                pid: Pid(pid),
                by_exec,
            });
        }
    }

    /// Reads what connection `i`'s process had not sent when it ended
    /// from its journal: the outbox's tail the collector has not received,
    /// then each recorder's records and pending allocations. Queued like a
    /// batch (the caller emits it).
    fn read_journal(&mut self, i: usize, sink: &mut dyn FnMut(Event)) {
        let Some(j) = self.conns[i].journal.take() else {
            return;
        };
        let pid = self.conns[i].pid.unwrap_or(0);
        match j.unsent(self.conns[i].stream_at()) {
            Ok(tail) if !tail.is_empty() => {
                self.conns[i].buf.extend_from_slice(tail);
                if let Err(e) = self.decode_buffered(i, sink) {
                    self.notes.push(format!("pid {pid}: its journal's outbox: {e}"));
                }
            }
            Ok(_) => {}
            Err(gap) => self.notes.push(format!(
                "pid {pid}: {gap} bytes of its records never arrived (the journal starts after them)"
            )),
        }
        for slot in j.slots() {
            let before = self.conns[i].pending.len();
            if let Err(e) = self.chunk(i, slot.tid, slot.records) {
                self.notes.push(format!("pid {pid}: its journal: {e}"));
                continue;
            }
            let c = &mut self.conns[i];
            // A table entry caught while it was being encoded is in the
            // records too.
            let encoded: HashSet<(u64, u64)> = c.pending[before..]
                .iter()
                .filter(|p| p.size.is_some())
                .map(|p| (p.addr, p.seq))
                .collect();
            for e in slot.pending {
                if !encoded.contains(&(e.addr, e.seq)) {
                    c.pending.push(Pending {
                        seq: e.seq,
                        time: e.time,
                        tid: slot.tid,
                        addr: e.addr,
                        size: Some(e.size),
                        stack: e.stack,
                    });
                }
            }
        }
        let lost = j.lost();
        if lost > 0 {
            sink(Event::Lost {
                time: self.now(),
                count: lost,
            });
        }
        if j.unjournaled() > 0 {
            self.notes.push(format!(
                "pid {pid}: {} of its threads ran at once beyond the journal's slots: what \
                 they had not sent when it ended is missing",
                j.unjournaled()
            ));
        }
        if j.stopped() {
            self.notes.push(format!(
                "pid {pid}: heap tracking stopped before it ended (its connection to \
                 leakscope failed; see its stderr): later blocks are not seen"
            ));
        }
    }

    fn decode_buffered(&mut self, i: usize, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        let mut buf = std::mem::take(&mut self.conns[i].buf);
        let mut off = 0;
        let result = loop {
            match decode(&buf[off..]) {
                Decoded::Incomplete => break Ok(()),
                Decoded::BadTag(t) => {
                    break Err(Error::Protocol {
                        pid: self.conns[i].pid.unwrap_or(0),
                        what: format!("unknown tag {t} at byte {off} of a batch"),
                    })
                }
                Decoded::Record(Record::Chunk { tid, body }, used) => {
                    let body = &buf[off + body.start..off + body.end];
                    if let Err(e) = self.chunk(i, tid, body) {
                        break Err(e);
                    }
                    off += used;
                }
                Decoded::Record(rec, used) => {
                    off += used;
                    let hello = matches!(rec, Record::Hello { .. });
                    if let Err(e) = self.apply(i, rec, sink) {
                        break Err(e);
                    }
                    if let Some(carry) = self.conns[i].carry.take().filter(|_| hello) {
                        // A resumed stream: its HELLO (`off` bytes) is no
                        // part of it, and the bytes of a record the old
                        // connection cut short go first.
                        let c = &mut self.conns[i];
                        c.base = c.base.wrapping_sub(off as u64);
                        let mut b = carry;
                        b.extend_from_slice(&buf[off..]);
                        buf = b;
                        off = 0;
                    }
                }
            }
        };
        let rest = buf[off..].to_vec();
        let c = &mut self.conns[i];
        // Records that arrived while we drained another connection first.
        let newer = std::mem::take(&mut c.buf);
        c.buf = rest;
        c.buf.extend_from_slice(&newer);
        result
    }

    /// Queues one thread's allocations and frees; records its stacks.
    fn chunk(&mut self, i: usize, tid: u32, body: &[u8]) -> Result<(), Error> {
        let ns = self.conns[i].ns;
        let Some(pid) = self.conns[i].pid else {
            return Err(Error::Protocol {
                pid: 0,
                what: "the first record is not HELLO".into(),
            });
        };
        let stacks = &mut self.stacks;
        let pending = &mut self.conns[i].pending;
        decode_chunk(body, |item| match item {
            Item::Alloc {
                seq,
                time,
                addr,
                size,
                stack,
            } => pending.push(Pending {
                seq,
                time,
                tid,
                addr,
                size: Some(size),
                stack,
            }),
            Item::Free { seq, time, addr } => pending.push(Pending {
                seq,
                time,
                tid,
                addr,
                size: None,
                stack: 0,
            }),
            Item::Stack { id, addrs } => {
                stacks.insert(
                    ns << 32 | id as u64,
                    addrs.into_iter().map(AbsAddr).collect(),
                );
            }
        })
        .map_err(|(at, what)| Error::Protocol {
            pid,
            what: format!("{what} at byte {at} of a chunk"),
        })
    }

    /// Emits the queued allocations and frees of connection `i` in
    /// sequence order. Each batch holds every record numbered below its
    /// highest one (the shim flushes all threads at once), so sorting a
    /// batch orders a free on one thread before the allocation that
    /// reused its address on another (see the shim's `SEQ`).
    fn emit_pending(&mut self, i: usize, sink: &mut dyn FnMut(Event)) {
        let mut pending = std::mem::take(&mut self.conns[i].pending);
        // An ALLOC reads the number a later FREE of its block may take:
        // ALLOC first on ties. Other ties are of different addresses (every
        // sent FREE has a number of its own, and an address allocated again
        // after a sent FREE reads a larger one), so their order is free.
        pending.sort_unstable_by_key(|p| (p.seq, p.size.is_none()));
        let c = &self.conns[i];
        let (ns, floor) = (c.ns, c.floor);
        let pid = Pid(c.pid.unwrap_or(0));
        for p in pending.drain(..) {
            let time = self.rel(p.time.max(floor));
            let addr = AbsAddr(p.addr);
            sink(match p.size {
                Some(size) => Event::Alloc {
                    time,
                    pid,
                    tid: Tid(p.tid),
                    addr,
                    size,
                    stack: StackId(ns << 32 | p.stack as u64),
                },
                None => Event::Free { time, pid, addr },
            });
        }
        // Keep the allocation for the next batch.
        self.conns[i].pending = pending;
    }

    fn apply(&mut self, i: usize, rec: Record, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        let Some(pid) = self.conns[i].pid else {
            let Record::Hello {
                version,
                kind,
                pid,
                ppid,
                time,
                exe,
                resume,
            } = rec
            else {
                return Err(Error::Protocol {
                    pid: 0,
                    what: "the first record is not HELLO".into(),
                });
            };
            if version != wire::VERSION {
                return Err(Error::Protocol {
                    pid,
                    what: format!("shim speaks version {version}, expected {}", wire::VERSION),
                });
            }
            if kind == HELLO_RESUME {
                return self.resume(i, pid, resume, sink);
            }
            self.conns[i].pid = Some(pid);
            self.conns[i].floor = time;
            let time = self.rel(time);
            if kind == HELLO_FORK {
                sink(Event::Fork {
                    time,
                    parent: Pid(ppid),
                    child: Pid(pid),
                    shares_table: false,
                });
            } else if self.seen.contains(&pid) {
                // execve(2) closed the old image's connection (CLOEXEC):
                // read it to its end so its HeapEnd comes before the new
                // image's events.
                for j in 0..self.conns.len() {
                    if j != i && !self.conns[j].done && self.conns[j].pid == Some(pid) {
                        if !self.conns[j].eof {
                            self.service(j, usize::MAX, Some(EXEC_DRAIN), sink)?;
                        }
                        self.finish(j, true, sink);
                    }
                }
                sink(Event::Exec {
                    time,
                    pid: Pid(pid),
                    path: exe,
                    open_fds: None,
                });
            }
            self.seen.insert(pid);
            return Ok(());
        };
        let pid = Pid(pid);
        match rec {
            Record::Hello { .. } => {
                return Err(Error::Protocol {
                    pid: pid.0,
                    what: "a second HELLO".into(),
                })
            }
            Record::Chunk { .. } => unreachable!("chunks are decoded in place"),
            Record::End => self.emit_pending(i, sink),
            Record::Map {
                time,
                start,
                end,
                offset,
                path,
            } => sink(Event::Map {
                time: self.rel(time.max(self.conns[i].floor)),
                pid,
                mapping: Mapping {
                    start: AbsAddr(start),
                    end: AbsAddr(end),
                    offset: FileOffset(offset),
                    path,
                },
            }),
            Record::Lost { count } => sink(Event::Lost {
                time: self.now(),
                count,
            }),
            Record::Pairs { count } => self.settled += count,
            Record::Kept { what, addr } => {
                let name = match what {
                    0 => "stdin's buffer",
                    1 => "stdout's buffer",
                    _ => "stderr's buffer",
                };
                self.kept.insert((pid.0, addr), name);
            }
            Record::Note { text } => {
                let note = format!("pid {}: {text}", pid.0);
                if !self.notes.contains(&note) {
                    self.notes.push(note);
                }
            }
        }
        Ok(())
    }

    /// Connection `i` goes on with the stream of process `pid`'s current
    /// image at stream offset `resume` (the program closed the old
    /// connection): it takes the old one's state over.
    fn resume(
        &mut self,
        i: usize,
        pid: u32,
        resume: u64,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Error> {
        let Some(j) = (0..self.conns.len())
            .find(|&j| j != i && !self.conns[j].done && self.conns[j].pid == Some(pid))
        else {
            return Err(Error::Protocol {
                pid,
                what: "a resumed connection without one to resume".into(),
            });
        };
        if !self.conns[j].eof {
            self.service(j, usize::MAX, Some(EXEC_DRAIN), sink)?;
        }
        let at = self.conns[j].stream_at();
        if at != resume {
            return Err(Error::Protocol {
                pid,
                what: format!("resumed at stream offset {resume}, {at} received"),
            });
        }
        let old = &mut self.conns[j];
        old.done = true;
        let carry = std::mem::take(&mut old.buf);
        let pending = std::mem::take(&mut old.pending);
        let (ns, floor, journal) = (old.ns, old.floor, old.journal.take());
        let c = &mut self.conns[i];
        c.pid = Some(pid);
        c.ns = ns;
        c.floor = floor;
        c.pending = pending;
        c.journal = journal;
        c.base = resume;
        c.carry = Some(carry);
        Ok(())
    }

    /// Waits up to `timeout` for records and hands the events to `sink`
    /// (see [`Backend::poll`]).
    pub fn poll(&mut self, timeout: Duration, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        // Connections at EOF stay readable: they are not polled.
        let active: Vec<usize> = (0..self.conns.len())
            .filter(|&i| !self.conns[i].eof)
            .collect();
        let mut pfds: Vec<libc::pollfd> = std::iter::once(self.listener.as_raw_fd())
            .chain(active.iter().map(|&i| self.conns[i].stream.as_raw_fd()))
            .chain(self.child_exit.as_ref().map(|f| f.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfds` is a valid array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let source = io::Error::last_os_error();
            if source.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::Io { source });
        }
        if self.child_exit.is_some() && pfds.pop().is_some_and(|p| p.revents != 0) {
            // The spawned child exited: this poll returned for it; later
            // ones wait for records (or time out) again.
            self.child_exit = None;
        }
        let ready: Vec<bool> = pfds[1..].iter().map(|p| p.revents != 0).collect();
        // Existing connections first: a new connection may be an exec that
        // needs the old one finished.
        for (&i, r) in active.iter().zip(ready) {
            if r && !self.conns[i].done {
                self.service(i, READ_BUDGET, None, sink)?;
            }
        }
        if pfds[0].revents != 0 {
            let before = self.conns.len();
            self.accept()?;
            for i in before..self.conns.len() {
                self.service(i, READ_BUDGET, None, sink)?;
            }
        }
        self.end_dead(sink)?;
        self.conns.retain(|c| !c.done);
        Ok(())
    }

    /// Allocations that were freed again on their own thread before the
    /// shim's next flush, which it therefore never sent: each stands for an
    /// ALLOC and a FREE that cancel out (never for a leak).
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// The stack behind `id` (see [`Backend::raw_stack`]).
    pub fn raw_stack(&self, id: StackId) -> RawStack {
        match self.stacks.get(&id.0) {
            Some(a) => RawStack::Unwound(a.clone()),
            // The shim of this version sends a reason instead (a stack
            // of one `AbsAddr::stack_cut` entry).
            None if id.0 & 0xffff_ffff == 0 => {
                RawStack::Missing("not taken by the shim (no reason given)".into())
            }
            None => RawStack::Missing(format!("unknown stack id {:#x}", id.0)),
        }
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        self.clock = None;
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(self.dir.join(leakscope_event::wire::CLOCK_FILE));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Backend for Preload {
    fn name(&self) -> &'static str {
        "preload"
    }

    fn kept_by_runtime(&self, pid: Pid, addr: AbsAddr) -> Option<&'static str> {
        self.kept.get(&(pid.0, addr.0)).copied()
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        if self.launched && self.seen.is_empty() {
            notes.push(
                "the heap was not traced: no process loaded the shim (statically \
                 linked and setuid programs ignore LD_PRELOAD)"
                    .into(),
            );
        }
        notes
    }

    fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        Preload::spawn(self, cmd)
    }

    fn prepare(&mut self, cmd: &mut Command) {
        Preload::prepare(self, cmd)
    }

    fn time_base(&self) -> u64 {
        self.t0
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(Preload::poll(self, timeout, sink)?)
    }

    fn raw_stack(&mut self, id: StackId) -> RawStack {
        Preload::raw_stack(self, id)
    }

    fn settled(&self) -> u64 {
        Preload::settled(self)
    }
}

/// Whether process `pid` still runs: it exists and is not a zombie (an
/// exited process its parent has not reaped yet).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses
        // and may itself hold ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}
