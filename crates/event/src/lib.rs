//! leakscope-event: the vocabulary every stage shares.
//!
//! Backends (ebpf, later preload and ptrace) turn what they observe into
//! [`Event`]s; the ledger applies them with kernel semantics; the stacks stage
//! turns [`RawStack`]s into module-relative frames using the [`Event::Map`]
//! records that came through the same stream. Everything here is plain data,
//! so a recording can be replayed on another machine.
//!
//! ```
//! use leakscope_event::{Event, Acquire, FdKind, Fd, Pid, Tid, StackId, TimeNs};
//! let e = Event::Acquire(Acquire {
//!     time: TimeNs(5), pid: Pid(7), tid: Tid(7), fd: Fd(3),
//!     kind: FdKind::File, syscall: "openat".into(), cloexec: false, dup_of: None, inode: 0,
//!     detail: Some("/etc/hosts".into()), stack: StackId(1),
//! });
//! assert_eq!(e.pid(), Some(Pid(7)));
//! ```
//!
//! It does not: unwind, symbolize, or decide what is a leak.
#![deny(missing_docs)]

use std::fmt;

/// The preload shim's record tags and format version, shared by the
/// encoder (leakscope-shim) and the decoder (leakscope-preload); the record
/// layouts are documented in leakscope-preload.
pub mod wire {
    /// Format version.
    pub const VERSION: u16 = 6;
    /// A process image starts (or a fork child connects, or an image
    /// whose connection the program closed connects again).
    pub const T_HELLO: u8 = 1;
    /// An allocation.
    pub const T_ALLOC: u8 = 2;
    /// A free.
    pub const T_FREE: u8 = 3;
    /// An interned stack.
    pub const T_STACK: u8 = 4;
    /// An executable mapping.
    pub const T_MAP: u8 = 5;
    /// Records the shim could not keep.
    pub const T_LOST: u8 = 6;
    /// One thread's batch.
    pub const T_CHUNK: u8 = 7;
    /// The end of a flush.
    pub const T_END: u8 = 8;
    /// Allocations freed again on their thread before any flush, which
    /// the shim therefore never sent (each stands for two events).
    pub const T_PAIRS: u8 = 9;
    /// Something the reader of the report must know about this process
    /// image (its allocations cannot be seen, ...).
    pub const T_NOTE: u8 = 10;
    /// A live block the C runtime keeps on purpose until exit (`what`: 0,
    /// 1, 2 for the buffer of stdin, stdout, stderr), sent at exit.
    pub const T_KEPT: u8 = 11;

    /// HELLO kinds: a new image (a start or an exec).
    pub const HELLO_IMAGE: u8 = 0;
    /// HELLO kinds: a fork child.
    pub const HELLO_FORK: u8 = 1;
    /// HELLO kinds: the same image again, its stream continuing at the
    /// HELLO's `resume` offset (the program closed the shim's fd).
    pub const HELLO_RESUME: u8 = 2;

    /// The journal: a memfd each process image's shim creates, maps shared
    /// and passes to the collector (`SCM_RIGHTS`, with its HELLO). Every
    /// record not yet delivered lives there, so the collector reads what a
    /// process had not sent when it died, however it died (`_exit`, a
    /// signal, SIGKILL), and what it buffered after closing its connection.
    /// Layout: a header page of u64 words at the `J_*` offsets, the
    /// outbox (the stream's unsent tail: stream offset `J_STREAM_OFF`,
    /// [`J_OUT_LEN`] bytes committed), then one slot per recorder. A slot is
    /// a page of u64 words at the `S_*` offsets, its encoded records
    /// (a CHUNK body, `S_LEN` bytes committed), then its pending table:
    /// [`TABLE_SLOTS`] keys (block addresses, 0: empty) and as many values
    /// `seq:u64 time:u64 size:u64 stack:u32 pad:u32`.
    pub const J_MAGIC: u64 = u64::from_le_bytes(*b"LSJRNL01");
    /// Header: the magic.
    pub const J_MAGIC_OFF: usize = 0;
    /// Header: slots in use.
    pub const J_SLOTS: usize = 8;
    /// Header: committed bytes of the outbox.
    pub const J_OUT_LEN: usize = 16;
    /// Header: the stream offset of the outbox's first byte.
    pub const J_STREAM_OFF: usize = 24;
    /// Header: slot + 1 whose records are being moved into the outbox, 0:
    /// none; once the outbox's committed end reaches `J_COPY_END` they are
    /// in the stream and the slot's copy is stale.
    pub const J_COPYING: usize = 32;
    /// Header: see [`J_COPYING`].
    pub const J_COPY_END: usize = 40;
    /// Header: events lost and not reported in a LOST record yet.
    pub const J_LOST: usize = 48;
    /// Header: recorders whose records live outside the journal (more
    /// threads at once than it has slots): what they had not sent dies
    /// with the process.
    pub const J_UNJOURNALED: usize = 56;
    /// Header: nonzero once the shim stopped tracking (its collector
    /// connection failed and could not be made again).
    pub const J_STOPPED: usize = 64;
    /// Header: the outbox's capacity in bytes.
    pub const J_OUT_CAP: usize = 72;
    /// Header: a slot's record capacity in bytes.
    pub const J_BUF_CAP: usize = 80;
    /// Header: the number of slots.
    pub const J_SLOT_CAP: usize = 88;
    /// Header size; the outbox follows.
    pub const J_HEADER: usize = 4096;
    /// Slot header: committed bytes of its records.
    pub const S_LEN: usize = 0;
    /// Slot header: the thread owning it.
    pub const S_TID: usize = 8;
    /// Slot header size; the records follow.
    pub const S_HEADER: usize = 4096;
    /// Pending-table entries per slot.
    pub const TABLE_SLOTS: usize = 131072;
    /// Bytes of one pending-table value.
    pub const TABLE_VAL: usize = 32;

    /// Bytes of one slot with `buf_cap` bytes of records.
    pub const fn slot_size(buf_cap: usize) -> usize {
        S_HEADER + buf_cap + TABLE_SLOTS * (8 + TABLE_VAL)
    }

    /// The clock page: a file of [`CLOCK_LEN`] bytes beside the collector
    /// socket, named [`CLOCK_FILE`], that the collector keeps current and
    /// the shims map read-only, so that a hook reads the time with one
    /// load instead of a `clock_gettime` call.
    pub const CLOCK_FILE: &str = "clock";
    /// Its size.
    pub const CLOCK_LEN: usize = 4096;
    /// At offset 0: this value once the page is valid.
    pub const CLOCK_MAGIC: u64 = u64::from_le_bytes(*b"LSCLOCK1");
    /// At offset 8: `CLOCK_MONOTONIC_COARSE` in ns, refreshed every
    /// [`CLOCK_TICK_NS`] while the collector runs.
    pub const CLOCK_NOW: usize = 8;
    /// How often the collector refreshes the page.
    pub const CLOCK_TICK_NS: u64 = 1_000_000;
}

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $inner);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

newtype!(
    /// A process id (thread-group id in kernel terms).
    Pid(u32)
);
newtype!(
    /// A thread id.
    Tid(u32)
);
newtype!(
    /// A file descriptor number, valid within one process's fd table.
    Fd(i32)
);
newtype!(
    /// A backend-assigned handle for the stack captured at an acquisition.
    /// The backend resolves it to a [`RawStack`] on demand, so stacks of
    /// resources that were released never need unwinding.
    StackId(u64)
);
newtype!(
    /// Nanoseconds since tracing started (monotonic clock).
    TimeNs(u64)
);

impl TimeNs {
    /// Seconds as a float, for reports.
    pub fn secs(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

/// An address in a process's virtual address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbsAddr(pub u64);

/// Tag of a [`RawStack::Unwound`] entry that stands for frames left out of
/// a deep stack (the count is in the low 32 bits): a kernel-half address,
/// never a user return address.
const LEFT_OUT_TAG: u64 = 0xffff_ff00_0000_0000;

impl AbsAddr {
    /// The entry that stands for `n` frames left out of a deep stack.
    pub fn frames_left_out(n: u32) -> AbsAddr {
        AbsAddr(LEFT_OUT_TAG | u64::from(n))
    }

    /// How many frames this entry stands for, if it is such an entry.
    pub fn left_out(self) -> Option<u32> {
        (self.0 & !0xffff_ffff == LEFT_OUT_TAG).then_some(self.0 as u32)
    }
}

/// Tag of the [`RawStack::Unwound`] entry, always the last, that says why
/// the stack is missing or ends early (a [`StackCut`] in the low 32
/// bits): a kernel-half address, never a user return address.
const CUT_TAG: u64 = 0xffff_fe00_0000_0000;

impl AbsAddr {
    /// The entry that says why a stack unwound in process ends here.
    pub fn stack_cut(cut: StackCut) -> AbsAddr {
        AbsAddr(CUT_TAG | u64::from(cut.code()))
    }

    /// Why the stack ends here, if this is such an entry.
    pub fn cut(self) -> Option<StackCut> {
        if self.0 & !0xffff_ffff != CUT_TAG {
            return None;
        }
        StackCut::from_code(self.0 as u32)
    }
}

/// Why a stack taken in process (by the preload shim) is missing or ends
/// before its outermost frame. Its `Display` is the report's note, worded
/// to follow the word "stack".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StackCut {
    /// Not taken: allocated before the shim had its module list (early
    /// start-up).
    NotReady,
    /// Not taken: allocated while its thread was exiting, after its
    /// recorder was handed back.
    ThreadExit,
    /// Not taken: the code ran on a stack that is not its thread's own (a
    /// coroutine, green thread or signal stack), and reading that memory
    /// failed with this errno.
    Unreadable(u16),
    /// Not taken: the shim could not map the stack it unwinds on, off the
    /// thread's own stack.
    NoMemory,
    /// The next frame would lie outside the thread's stack.
    OutsideStack,
    /// On a stack that is not the thread's own: the next frame's memory
    /// could not be read.
    Unmapped,
    /// Frame-pointer unwinding went backwards (a frame without unwind
    /// information and a frame pointer that is not one).
    Backwards,
    /// The next frame would be this one again.
    Loop,
    /// An address overflowed while computing the next frame.
    Overflow,
}

impl StackCut {
    fn code(self) -> u32 {
        match self {
            StackCut::NotReady => 1,
            StackCut::ThreadExit => 2,
            StackCut::Unreadable(errno) => 3 << 16 | u32::from(errno),
            StackCut::OutsideStack => 4,
            StackCut::Unmapped => 5,
            StackCut::Backwards => 6,
            StackCut::Loop => 7,
            StackCut::Overflow => 8,
            StackCut::NoMemory => 9,
        }
    }

    fn from_code(code: u32) -> Option<StackCut> {
        Some(match code {
            1 => StackCut::NotReady,
            2 => StackCut::ThreadExit,
            c if c >> 16 == 3 => StackCut::Unreadable(c as u16),
            4 => StackCut::OutsideStack,
            5 => StackCut::Unmapped,
            6 => StackCut::Backwards,
            7 => StackCut::Loop,
            8 => StackCut::Overflow,
            9 => StackCut::NoMemory,
            _ => return None,
        })
    }

    /// Whether no frame at all could be taken.
    pub fn is_missing(self) -> bool {
        matches!(
            self,
            StackCut::NotReady
                | StackCut::ThreadExit
                | StackCut::Unreadable(_)
                | StackCut::NoMemory
        )
    }
}

impl fmt::Display for StackCut {
    /// Short enough to follow "    (stack " on an 80-column line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackCut::NotReady => f.write_str("not taken: allocated before the shim could unwind"),
            StackCut::ThreadExit => {
                f.write_str("not taken: allocated while its thread was exiting")
            }
            StackCut::Unreadable(errno) => {
                let name = match i32::from(*errno) {
                    1 => "EPERM".to_string(),
                    12 => "ENOMEM".to_string(),
                    13 => "EACCES".to_string(),
                    14 => "EFAULT".to_string(),
                    38 => "ENOSYS".to_string(),
                    n => format!("errno {n}"),
                };
                write!(
                    f,
                    "not taken: its coroutine or signal stack is unreadable ({name})"
                )
            }
            StackCut::NoMemory => f.write_str("not taken: no memory to map a stack to unwind on"),
            StackCut::OutsideStack => {
                f.write_str("truncated: the next frame lies outside the thread's stack")
            }
            StackCut::Unmapped => f.write_str("truncated: the next frame's memory is unreadable"),
            StackCut::Backwards => {
                f.write_str("unwinding stopped: frame pointer unwinding went backwards")
            }
            StackCut::Loop => f.write_str("unwinding stopped: the next frame is this one again"),
            StackCut::Overflow => f.write_str("unwinding stopped: an address overflowed"),
        }
    }
}

/// x86-64 machine code around return addresses, read by the unwinders to
/// tell a return address that a `call` pushed from one that was planted.
pub mod x86_64 {
    /// Bytes of code before a return address that [`follows_call`] reads.
    pub const BEFORE: usize = 9;
    /// Bytes of code at a return address that [`is_sigreturn`] reads.
    pub const AT: usize = 9;

    /// Whether the code `before` (the [`BEFORE`] bytes that end at a
    /// return address) ends with a call instruction: `call rel32` (`e8`)
    /// or an indirect `call` (`ff /2`, any addressing form, any prefix).
    /// Loose by design: bytes that merely look like a call count as one.
    pub fn follows_call(before: &[u8; BEFORE]) -> bool {
        if before[BEFORE - 5] == 0xe8 {
            return true;
        }
        (2..=8).any(|len| {
            let p = BEFORE - len;
            if before[p] != 0xff {
                return false;
            }
            let m = before[p + 1];
            let (md, reg, rm) = (m >> 6, (m >> 3) & 7, m & 7);
            if reg != 2 {
                return false;
            }
            let mut n = 2;
            if md != 3 && rm == 4 {
                n += 1; // SIB
                if md == 0 && p + 2 < BEFORE && before[p + 2] & 7 == 5 {
                    n += 4; // SIB without base: disp32
                }
            }
            match md {
                0 if rm == 5 => n += 4, // RIP-relative
                1 => n += 1,
                2 => n += 4,
                _ => {}
            }
            n == len
        })
    }

    /// Whether `at` (the [`AT`] bytes at an address) is a signal return
    /// trampoline, `rt_sigreturn(2)` as glibc (`mov $15, %rax; syscall`)
    /// or musl (`mov $15, %eax; syscall`) write it: the kernel makes a
    /// signal handler return there.
    pub fn is_sigreturn(at: &[u8; AT]) -> bool {
        at == &[0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05]
            || at[..7] == [0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05]
    }

    /// Where the kernel's signal frame keeps the interrupted code's
    /// `rbp`, `rsp` and `rip`: offsets from the handler's canonical frame
    /// address, which is the `struct ucontext` right above the return
    /// address the kernel pushed (its `uc_mcontext` is at 40; glibc's
    /// unwind information for `__restore_rt` reads the same offsets).
    pub const UC_RBP: u64 = 120;
    /// See [`UC_RBP`].
    pub const UC_RSP: u64 = 160;
    /// See [`UC_RBP`].
    pub const UC_RIP: u64 = 168;

    /// What the code around return address `ra` says of its frame.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Planted {
        /// A call pushed it: an ordinary return address.
        No,
        /// The kernel's signal frame: the handler returns to
        /// `rt_sigreturn`, and the interrupted code is the next frame.
        Sigreturn,
        /// Neither a call nor a signal frame: the address was stored as a
        /// function's return address before it started, as
        /// `makecontext(3)` stores glibc's `__start_context` for the
        /// context's function. The address is the start of the code that
        /// runs when the function returns, and nothing is below it.
        ContextStart,
    }

    /// Classifies return address `ra` from the code `before` it and `at`
    /// it.
    pub fn planted(before: &[u8; BEFORE], at: &[u8; AT]) -> Planted {
        if is_sigreturn(at) {
            Planted::Sigreturn
        } else if follows_call(before) {
            Planted::No
        } else {
            Planted::ContextStart
        }
    }
}

/// An offset into an ELF file (what `/proc/PID/maps` calls the offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileOffset(pub u64);

/// What kind of object an fd refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum FdKind {
    File,
    Dir,
    Socket,
    Pipe,
    EventFd,
    Epoll,
    TimerFd,
    SignalFd,
    Inotify,
    Memfd,
    Pidfd,
    Fanotify,
    Userfaultfd,
    PerfEvent,
    Bpf,
    Other,
}

impl FdKind {
    /// What an fd refers to: by the syscall that made it (`openat`,
    /// `eventfd2`, ...), else by the mode of its inode (`st_mode`), the
    /// same for every backend.
    pub fn of(syscall: &str, mode: u32) -> FdKind {
        let by_mode = || match mode & 0o170000 {
            0o140000 => FdKind::Socket,
            0o010000 => FdKind::Pipe,
            0o040000 => FdKind::Dir,
            0o100000 | 0o020000 | 0o060000 | 0o120000 => FdKind::File,
            _ => FdKind::Other,
        };
        match syscall {
            "open" | "openat" | "openat2" | "creat" | "open_by_handle_at" => match by_mode() {
                FdKind::Other => FdKind::File,
                k => k,
            },
            "socket" | "socketpair" | "accept" | "accept4" => FdKind::Socket,
            "pipe" | "pipe2" => FdKind::Pipe,
            "eventfd" | "eventfd2" => FdKind::EventFd,
            "epoll_create" | "epoll_create1" => FdKind::Epoll,
            "timerfd_create" => FdKind::TimerFd,
            "signalfd" | "signalfd4" => FdKind::SignalFd,
            "inotify_init" | "inotify_init1" => FdKind::Inotify,
            "memfd_create" | "memfd_secret" => FdKind::Memfd,
            "pidfd_open" => FdKind::Pidfd,
            "fanotify_init" => FdKind::Fanotify,
            "userfaultfd" => FdKind::Userfaultfd,
            "perf_event_open" => FdKind::PerfEvent,
            "bpf" => FdKind::Bpf,
            _ => by_mode(),
        }
    }
}

/// A socket's address family (socket(2)'s first argument), for reports.
pub fn socket_family(f: u64) -> String {
    match f {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        n => format!("family {n}"),
    }
}

/// A socket's type (socket(2)'s second argument, flags ignored).
pub fn socket_type(t: u64) -> String {
    match t & 0xf {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        5 => "seqpacket".into(),
        n => format!("type {n}"),
    }
}

impl FdKind {
    /// Every kind, in report order.
    pub const ALL: [FdKind; 16] = [
        FdKind::File,
        FdKind::Dir,
        FdKind::Socket,
        FdKind::Pipe,
        FdKind::EventFd,
        FdKind::Epoll,
        FdKind::TimerFd,
        FdKind::SignalFd,
        FdKind::Inotify,
        FdKind::Memfd,
        FdKind::Pidfd,
        FdKind::Fanotify,
        FdKind::Userfaultfd,
        FdKind::PerfEvent,
        FdKind::Bpf,
        FdKind::Other,
    ];

    /// The lowercase name used in reports and the JSON contract.
    pub fn name(self) -> &'static str {
        match self {
            FdKind::File => "file",
            FdKind::Dir => "dir",
            FdKind::Socket => "socket",
            FdKind::Pipe => "pipe",
            FdKind::EventFd => "eventfd",
            FdKind::Epoll => "epoll",
            FdKind::TimerFd => "timerfd",
            FdKind::SignalFd => "signalfd",
            FdKind::Inotify => "inotify",
            FdKind::Memfd => "memfd",
            FdKind::Pidfd => "pidfd",
            FdKind::Fanotify => "fanotify",
            FdKind::Userfaultfd => "userfaultfd",
            FdKind::PerfEvent => "perf_event",
            FdKind::Bpf => "bpf",
            FdKind::Other => "other",
        }
    }
}

impl fmt::Display for FdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resource was acquired: an fd was created by a successful syscall.
#[derive(Debug, Clone, PartialEq)]
pub struct Acquire {
    /// When the syscall returned.
    pub time: TimeNs,
    /// The process whose fd table now holds the fd.
    pub pid: Pid,
    /// The thread that made the call.
    pub tid: Tid,
    /// The new fd.
    pub fd: Fd,
    /// What it refers to.
    pub kind: FdKind,
    /// The syscall that created it (`openat`, `socket`, `dup2`, ...).
    pub syscall: String,
    /// Whether it was created close-on-exec.
    pub cloexec: bool,
    /// For dup(2), dup2(2), dup3(2) and fcntl(F_DUPFD): the fd it copies.
    pub dup_of: Option<Fd>,
    /// Inode of the open file (0 if unknown); ties TCP states to sockets.
    pub inode: u64,
    /// Path, socket family/addresses, or nothing known.
    pub detail: Option<String>,
    /// The acquiring stack, resolved by the backend on demand.
    pub stack: StackId,
}

/// One executable file mapping of a traced process, as a module-map entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address of the mapping.
    pub start: AbsAddr,
    /// One past the last address.
    pub end: AbsAddr,
    /// File offset that `start` maps.
    pub offset: FileOffset,
    /// Path of the mapped file, as the kernel names it.
    pub path: String,
}

/// Something a backend saw, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An fd was created.
    Acquire(Acquire),
    /// An fd was released by close(2) (or dup2/dup3 replacing it).
    Release {
        /// When.
        time: TimeNs,
        /// Whose table.
        pid: Pid,
        /// Which fd.
        fd: Fd,
    },
    /// close_range(2) over `first..=last`.
    CloseRange {
        /// When.
        time: TimeNs,
        /// Whose table.
        pid: Pid,
        /// First fd of the range.
        first: Fd,
        /// Last fd of the range (inclusive).
        last: Fd,
        /// CLOSE_RANGE_CLOEXEC: mark close-on-exec instead of closing.
        cloexec_only: bool,
    },
    /// The close-on-exec flag of an fd changed (fcntl F_SETFD, ioctl FIOCLEX).
    SetCloexec {
        /// When.
        time: TimeNs,
        /// Whose table.
        pid: Pid,
        /// Which fd.
        fd: Fd,
        /// New value.
        cloexec: bool,
    },
    /// More is known about an fd (e.g. the peer after connect(2)).
    Describe {
        /// When.
        time: TimeNs,
        /// Whose table.
        pid: Pid,
        /// Which fd.
        fd: Fd,
        /// Replacement detail text.
        detail: String,
    },
    /// A new process (or thread, when `shares_table`) was created.
    Fork {
        /// When.
        time: TimeNs,
        /// Parent process.
        parent: Pid,
        /// New task's process id (equal to `parent` for a thread).
        child: Pid,
        /// CLONE_FILES: the child shares the parent's fd table.
        shares_table: bool,
    },
    /// A process called execve successfully. `open_fds`, when known, lists
    /// every fd still open after the kernel closed the close-on-exec ones.
    Exec {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// The new program's path.
        path: String,
        /// Kernel truth after exec, if the backend could read it.
        open_fds: Option<Vec<Fd>>,
    },
    /// An executable file was mapped (by the kernel at exec, by ld.so or dlopen).
    Map {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// The mapping.
        mapping: Mapping,
    },
    /// A whole process exited (its last thread).
    Exit {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// Exit status as wait(2) encodes it, if known.
        status: Option<i32>,
    },
    /// A heap block was allocated (malloc, calloc, the new address of a
    /// realloc, posix_memalign, ...).
    Alloc {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// Which thread.
        tid: Tid,
        /// The block's address.
        addr: AbsAddr,
        /// Requested size in bytes.
        size: u64,
        /// The allocating stack.
        stack: StackId,
    },
    /// A heap block was freed (free, or the old address of a realloc).
    Free {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// The block's address.
        addr: AbsAddr,
    },
    /// The heap of the program image running in `pid` is gone (exec or
    /// exit): blocks still allocated were never freed.
    HeapEnd {
        /// When.
        time: TimeNs,
        /// Which process.
        pid: Pid,
        /// The image was replaced by execve(2), which frees its memory:
        /// its blocks are not leaks (valgrind does not report them either).
        by_exec: bool,
    },
    /// A TCP socket changed state (`sock:inet_sock_set_state`).
    TcpState {
        /// When.
        time: TimeNs,
        /// The socket's inode (see [`Acquire::inode`]).
        inode: u64,
        /// Previous state.
        old: TcpState,
        /// New state.
        new: TcpState,
        /// `local -> peer` addresses.
        detail: String,
    },
    /// The backend lost events (ring buffer full, ...).
    Lost {
        /// When it noticed.
        time: TimeNs,
        /// How many.
        count: u64,
    },
}

/// The `time` field of any event, as `&` or `&mut` (match ergonomics bind
/// `time` the way the scrutinee is borrowed).
macro_rules! time_field {
    ($ev:expr, $($mut:tt)?) => {
        match $ev {
            Event::Acquire(a) => &$($mut)? a.time,
            Event::Release { time, .. }
            | Event::CloseRange { time, .. }
            | Event::SetCloexec { time, .. }
            | Event::Describe { time, .. }
            | Event::Fork { time, .. }
            | Event::Exec { time, .. }
            | Event::Map { time, .. }
            | Event::Exit { time, .. }
            | Event::Alloc { time, .. }
            | Event::Free { time, .. }
            | Event::HeapEnd { time, .. }
            | Event::TcpState { time, .. }
            | Event::Lost { time, .. } => time,
        }
    };
}

impl Event {
    /// The event's timestamp.
    pub fn time(&self) -> TimeNs {
        *time_field!(self,)
    }

    /// The event's timestamp, to change it.
    pub fn time_mut(&mut self) -> &mut TimeNs {
        time_field!(self, mut)
    }

    /// The process an event concerns, if one.
    pub fn pid(&self) -> Option<Pid> {
        match self {
            Event::Acquire(a) => Some(a.pid),
            Event::Release { pid, .. }
            | Event::CloseRange { pid, .. }
            | Event::SetCloexec { pid, .. }
            | Event::Describe { pid, .. }
            | Event::Exec { pid, .. }
            | Event::Map { pid, .. }
            | Event::Exit { pid, .. }
            | Event::Alloc { pid, .. }
            | Event::Free { pid, .. }
            | Event::HeapEnd { pid, .. } => Some(*pid),
            Event::Fork { child, .. } => Some(*child),
            Event::Lost { .. } | Event::TcpState { .. } => None,
        }
    }
}

/// A TCP state, numbered as in the kernel (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl TcpState {
    /// The peer closed its side; we have not closed ours.
    pub const CLOSE_WAIT: TcpState = TcpState(8);

    /// The kernel's name for the state.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "ESTABLISHED",
            2 => "SYN_SENT",
            3 => "SYN_RECV",
            4 => "FIN_WAIT1",
            5 => "FIN_WAIT2",
            6 => "TIME_WAIT",
            7 => "CLOSE",
            8 => "CLOSE_WAIT",
            9 => "LAST_ACK",
            10 => "LISTEN",
            11 => "CLOSING",
            12 => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

/// The stack captured at an acquisition, before unwinding.
#[derive(Debug, Clone, PartialEq)]
pub enum RawStack {
    /// Registers and a copy of the user stack starting at `sp`
    /// (what eBPF captures); unwound later from `.eh_frame`.
    Copied {
        /// Instruction pointer at capture.
        ip: u64,
        /// Stack pointer at capture; `bytes[0]` is the byte at `sp`.
        sp: u64,
        /// Frame pointer register at capture (may hold anything).
        bp: u64,
        /// The copied stack.
        bytes: Vec<u8>,
    },
    /// Already unwound in process: the ip followed by return addresses;
    /// of a deep stack, one entry in the middle may stand for frames left
    /// out ([`AbsAddr::left_out`]).
    Unwound(Vec<AbsAddr>),
    /// No stack could be captured, and why.
    Missing(String),
}

/// What every backend offers the pipeline: launch a command traced from
/// its first instruction, stream its events, and resolve stack handles.
pub trait Backend {
    /// Short name for reports (`ebpf`, `preload`, ...).
    fn name(&self) -> &'static str;
    /// Adjusts `cmd` (environment, ...) so that it is traced once another
    /// backend spawns it; used when several backends trace one launch.
    fn prepare(&mut self, _cmd: &mut std::process::Command) {}
    /// The CLOCK_MONOTONIC nanoseconds that this backend's `TimeNs(0)`
    /// stands for, so streams of several backends can share one clock.
    fn time_base(&self) -> u64 {
        0
    }
    /// Starts `cmd` under tracing.
    fn spawn(&mut self, cmd: &mut std::process::Command) -> std::io::Result<std::process::Child>;
    /// Starts tracing a running process and the children it forks from
    /// now on. Backends that can only launch say so.
    fn attach(&mut self, _pid: Pid) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "the {} backend cannot attach to a running process",
                self.name()
            ),
        ))
    }
    /// Waits up to `timeout` for events and hands each to `sink` in order.
    fn poll(
        &mut self,
        timeout: std::time::Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// The stack behind a handle found in an event.
    fn raw_stack(&mut self, id: StackId) -> RawStack;
    /// Keep the stack of `id` available even after the backend would
    /// otherwise drop it (the fd was inherited by a fork, or its process
    /// exited). Backends that keep every stack need not do anything.
    fn retain_stack(&mut self, _id: StackId) {}
    /// Things the reader of a report must know about this backend's data
    /// (sampling, stacks that could not be kept, ...).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// `pid` exited holding `fds`: the backend may drop its per-process state.
    fn forget_process(&mut self, _pid: Pid, _fds: &[Fd]) {}
    /// Makes the backend send, with its next [`Backend::poll`]s, what it
    /// holds back for now (acquisitions that may still be released before
    /// anything needs them). Call it before reading a ledger of processes
    /// that still run.
    fn settle(&mut self) {}
    /// Stops recording (the trace is over); stacks stay readable.
    fn stop(&mut self) {}
    /// What owns `addr`, a heap block `pid` still held at the end, when it
    /// is the C runtime's on purpose rather than the program's (e.g.
    /// "stdout's buffer"). Such blocks are reported as suppressed.
    fn kept_by_runtime(&self, _pid: Pid, _addr: AbsAddr) -> Option<&'static str> {
        None
    }
    /// Acquisitions released again that the backend settled itself
    /// without sending events (each stands for two events).
    fn settled(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::x86_64::{follows_call, planted, Planted, BEFORE};
    use super::{AbsAddr, StackCut};

    /// `code` padded in front to [`BEFORE`] bytes with `int3`.
    fn before(code: &[u8]) -> [u8; BEFORE] {
        let mut b = [0xcc; BEFORE];
        b[BEFORE - code.len()..].copy_from_slice(code);
        b
    }

    #[test]
    fn every_call_form_is_a_call() {
        for code in [
            &[0xe8, 1, 2, 3, 4][..],               // call rel32
            &[0xff, 0xd0],                         // call *%rax
            &[0x41, 0xff, 0xd4],                   // call *%r12
            &[0x3e, 0xff, 0xd0],                   // notrack call *%rax
            &[0xff, 0x15, 1, 2, 3, 4],             // call *x(%rip)
            &[0xff, 0x50, 0x08],                   // call *8(%rax)
            &[0xff, 0x14, 0x24],                   // call *(%rsp)
            &[0xff, 0x54, 0x24, 0x08],             // call *8(%rsp)
            &[0xff, 0x94, 0x24, 1, 2, 3, 4],       // call *x(%rsp)
            &[0xff, 0x14, 0xc5, 1, 2, 3, 4],       // call *x(,%rax,8)
            &[0x41, 0xff, 0x94, 0xc4, 1, 2, 3, 4], // call *x(%r12,%rax,8)
            &[0xff, 0x90, 1, 2, 3, 4],             // call *x(%rax)
        ] {
            assert!(follows_call(&before(code)), "{code:x?}");
        }
    }

    #[test]
    fn what_is_not_a_call() {
        // glibc 2.36's __start_context follows a jmp and a 7-byte nop.
        let start_context = [0xff, 0xff, 0x0f, 0x1f, 0x80, 0, 0, 0, 0];
        assert!(!follows_call(&start_context));
        assert!(!follows_call(&before(&[0xff, 0xe3]))); // jmp *%rbx
        assert!(!follows_call(&before(&[0xc3]))); // ret
        let at = [0x48, 0x89, 0xdc, 0x48, 0x8b, 0x3c, 0x24, 0x48, 0x85];
        assert_eq!(planted(&start_context, &at), Planted::ContextStart);
        // glibc's __restore_rt is preceded by a nop.
        let restore_rt = [0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05];
        assert_eq!(planted(&before(&[0x90]), &restore_rt), Planted::Sigreturn);
        assert_eq!(planted(&before(&[0xff, 0xd0]), &at), Planted::No);
    }

    #[test]
    fn stack_cuts_round_trip() {
        for cut in [
            StackCut::NotReady,
            StackCut::ThreadExit,
            StackCut::Unreadable(1),
            StackCut::Unreadable(38),
            StackCut::NoMemory,
            StackCut::OutsideStack,
            StackCut::Unmapped,
            StackCut::Backwards,
            StackCut::Loop,
            StackCut::Overflow,
        ] {
            let a = AbsAddr::stack_cut(cut);
            assert_eq!(a.cut(), Some(cut));
            assert_eq!(a.left_out(), None);
            // "    (stack {note})" fits in 80 columns.
            assert!(cut.to_string().len() <= 68, "{cut}");
        }
        assert_eq!(AbsAddr::frames_left_out(3).cut(), None);
        assert_eq!(AbsAddr(0x7f00_0000_1000).cut(), None);
    }
}
