//! leakscope-shim: the in-process half of the preload backend.
//!
//! `libleakscope_shim.so` is loaded with `LD_PRELOAD` into the traced
//! program (by `leakscope-preload`, which also runs the collector). It
//! interposes the heap API and streams, for every block, where and by which
//! stack it was allocated and when it was freed. Input: calls to `malloc`,
//! `calloc`, `realloc`, `reallocarray`, `free`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` (C++ `operator new` and
//! `delete` reach these through libstdc++). Output: the records below, on a
//! unix-socket connection of its own per process.
//!
//! ```text
//! $ LEAKSCOPE_SHIM_SOCK=/tmp/ls/sock LD_PRELOAD=libleakscope_shim.so ./prog
//! (the collector listening on /tmp/ls/sock receives HELLO, MAP..., then
//!  STACK/ALLOC/FREE records; see leakscope-preload for a runnable example)
//! ```
//!
//! # How
//! - The program's allocator is each function's next definition after the
//!   shim (`dlsym(RTLD_NEXT)`, see `real.rs`): glibc's, or a jemalloc or
//!   tcmalloc the program links or preloads, which keeps working as
//!   without the shim. The shim's own Rust heap (a `#[global_allocator]`)
//!   uses glibc's exported `__libc_malloc` family directly, so no hook ever
//!   calls back into a hook.
//! - A const thread-local flag guards against reentrancy (a signal handler
//!   allocating inside a hook): nested calls are passed through untracked
//!   and counted in a `LOST` record.
//! - Stacks are unwound in process by framehop over the `.eh_frame` of each
//!   module `dl_iterate_phdr(3)` lists, read in place, so code built
//!   without frame pointers (libc, `-fomit-frame-pointer` programs) unwinds
//!   correctly. The module list is rebuilt after dlopen/dlclose and when a
//!   frame falls outside every known module while the loader's counters moved.
//! - Code that runs on a stack the program allocated (a `makecontext(3)`
//!   coroutine, a green thread, a `sigaltstack(2)` signal handler) is
//!   unwound too: the thread's own stack is known (the `[stack]` mapping,
//!   or the one holding the thread pointer), and any other stack is read
//!   through `process_vm_readv(2)` on the process itself, which fails
//!   instead of faulting on memory freed meanwhile. Such a capture runs on
//!   a stack of the shim's own (it takes tens of KiB, more than a
//!   coroutine's or a signal handler's stack may have left), and is cached
//!   apart, its words checked in walk order. A context's stack ends at its
//!   start (glibc's `__start_context`, an address no call pushed); a
//!   signal frame is crossed from the registers the kernel saved in it. A
//!   stack that cannot be taken, or ends early, says why
//!   (`leakscope_event::StackCut`).
//! - The allocating hooks are naked trampolines that pass their entry stack
//!   and frame pointers on, so the walk starts at the caller. Each thread
//!   caches its last captures by (hook, return address, stack pointer, and
//!   frame pointer when the walk used it) together with every stack word
//!   the walk's result depended on (return addresses, followed saved frame
//!   pointers): a capture is reused only if all those words still hold the
//!   same values, which makes the walk's result the same (it is a pure
//!   function of them). A loop allocating from one place walks once.
//! - Stacks are deduplicated process-wide by a 64-bit hash of their
//!   addresses into small ids (only when a thread's cache misses).
//! - Each thread appends its records to its own buffer, with no atomic
//!   read-modify-write: a flag store and load against the flusher, whose
//!   side of the handshake is `membarrier(2)` (see `Thread`). A flush takes
//!   the flush lock, stops every thread's appends at once, and sends all
//!   buffers as one batch; each batch therefore holds every record
//!   numbered below its highest one. Records are numbered by `SEQ` (a
//!   sent free takes a number before libc gets the block back, allocations
//!   read the counter after libc returned it; see there), and the
//!   collector sorts each batch by that number, so a free on one thread
//!   always comes before the allocation that reuses the address on
//!   another. A flush happens when a thread's buffer reaches 32 KiB, 10 ms
//!   after the previous flush, before exec, and at exit (from then on
//!   every record is sent at once).
//! - Allocations wait in their thread's pending table (by address): a
//!   free of a block still pending there cancels the pair: nothing is
//!   sent, and the flush only reports how many pairs were settled
//!   (`PAIRS`). Most blocks die young on their own thread, so most pairs
//!   never leave the process, and a free takes no shared number. A flush
//!   sends only the pending allocations that lived through a whole epoch
//!   (100 ms at least; blocks that live longer than 100-200 ms are sent),
//!   those named by another thread's FREE in the same batch (so that the
//!   collector, sorting the batch, sees each ALLOC before its FREE), and
//!   all of them before exec and at exit. A table starts at 1024 slots and
//!   doubles, up to 131072, each time half full (its entries encoded
//!   first: they are sent, no longer cancellable).
//! - A free of a block already sent, or allocated by another thread, is
//!   sent, and raises its address class in `FREED`, so that the allocating
//!   thread never cancels a stale entry for an address that was freed and
//!   handed out again elsewhere before the next flush (which takes such
//!   entries out of every table, so only frees since then count).
//! - The per-thread block (reentrancy flag, recorder) is in static TLS
//!   reached with the initial-exec model, and event times come from the
//!   vDSO's `clock_gettime` called directly: a hook makes no call into
//!   the loader or glibc besides the allocator itself.
//! - At init the shim connects to `$LEAKSCOPE_SHIM_SOCK` and moves the fd
//!   to 1000 or above with `F_DUPFD_CLOEXEC`, so the program's fd numbers are
//!   untouched and exec closes it. `LD_PRELOAD` and `LEAKSCOPE_SHIM_SOCK`
//!   stay in the environment, so exec'd children are traced too. A
//!   `pthread_atfork` child handler connects afresh, so parent and child
//!   never share a stream.
//! - Every record lives in the journal until the collector has it (see
//!   `journal.rs`): a memfd shared with the collector (passed with the
//!   HELLO by `SCM_RIGHTS`, then closed here) holding the outbox, each
//!   recorder's encoded records and its pending table, each with a length
//!   or key committed after the bytes it covers. When a process ends
//!   without a last flush (`_exit`, `abort`, a fatal signal, SIGKILL) the
//!   collector reads what it had not sent from there.
//! - Before each send the shim checks that its fd is still its connection
//!   (`fstat`: device and inode). A program that closed it (`close_range`,
//!   a close loop, `closefrom`) or put an fd of its own at its number
//!   (`dup2`) gets no byte of ours: the shim connects again and says where
//!   the stream goes on (HELLO kind 2).
//! - If the collector goes away (`send` fails; `MSG_NOSIGNAL`, so no
//!   SIGPIPE) the shim prints one line to stderr, marks the journal, and
//!   stops tracking.
//!
//! # Wire format (version 5)
//! A stream of records, all fixed-size integers little-endian, no padding.
//! Each record is a tag byte followed by its body:
//!
//! | tag | record | body |
//! |-----|--------|------|
//! | 1 | HELLO | `version:u16 kind:u8 pid:u32 ppid:u32 time:u64 len:u16 exe:[u8; len] resume:u64`; kind 0: a new image (start or exec), 1: a fork child, 2: the same image on a new connection, its stream going on at stream offset `resume` (not itself part of the stream) |
//! | 5 | MAP | `time:u64 start:u64 end:u64 offset:u64 len:u16 path:[u8; len]`: an executable PT_LOAD, page-aligned |
//! | 6 | LOST | `count:u64`: events not recorded since the last LOST |
//! | 7 | CHUNK | `tid:u32 len:u32 body:[u8; len]`: one thread's records, below |
//! | 8 | END | (none): the end of a batch of chunks |
//! | 9 | PAIRS | `count:u64`: allocations freed again on their thread before a flush, never sent |
//! | 10 | NOTE | `len:u16 text:[u8; len]`: a sentence for the report (the program's malloc comes before the shim's) |
//! | 11 | KEPT | `what:u8 addr:u64`: at exit, the buffer of stdin (0), stdout (1) or stderr (2), which glibc keeps |
//!
//! Inside a chunk, `var` is LEB128, and seq, time and address are deltas
//! from the chunk's previous ALLOC/FREE (from 0 for the first), each
//! zigzag-encoded (pending allocations are encoded in table order, after
//! frees):
//!
//! | tag | record | body |
//! |-----|--------|------|
//! | 2 | ALLOC | `seq:var time:var addr:var size:var stack:var` |
//! | 3 | FREE | `seq:var time:var addr:var` |
//! | 4 | STACK | `id:var n:var addrs:[u64; n]`: `addrs[0]` is the address of the interposed function (stands for the ip), the rest are return addresses, innermost first |
//!
//! HELLO comes first on every connection. A STACK comes before the first
//! ALLOC that names its id, in the same or an earlier batch. A STACK's last
//! address may be an entry saying why the walk ended early
//! (`AbsAddr::stack_cut`, a kernel-half address); a stack that could not
//! be taken at all is that entry alone. (Id 0, "no stack", is no longer
//! sent.) Sort a batch's
//! ALLOCs and FREEs by (seq, FREE after ALLOC). HELLO's time is
//! `CLOCK_MONOTONIC` ns; the others are `CLOCK_MONOTONIC_COARSE` ns, read
//! from the collector's clock page (one load; the vDSO without it), which
//! the collector raises to the HELLO's time.

//! It does not:
//! - track fds, mmap or sbrk (glibc-internal fd calls bypass PLT hooks);
//! - catch allocators that do not go through malloc (jemalloc linked in,
//!   raw `mmap`);
//! - keep in the journal the records of threads beyond its 1024 slots
//!   (threads alive at once; the report says so if any were);
//! - follow children made by a raw `clone(2)` without `fork` (they would
//!   share the parent's connection), or flush before `fexecve` (records
//!   buffered then are lost; `execve`, `execv`, `execvp`, `execvpe` and the
//!   `execl*` family are hooked and flush);
//! - run on anything but x86_64 Linux with glibc.
#![deny(missing_docs)]
// The exported functions are C entry points; their safety contracts are
// their man pages (malloc(3), execve(2), ...).
#![allow(clippy::missing_safety_doc)]

mod journal;
mod pending;
mod real;
mod unwind;

use journal::Buf;

use pending::{Alloc, Cancel, Pending};

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use leakscope_event::{AbsAddr, StackCut};
use unwind::MAX_FRAMES;

extern "C" {
    fn malloc_usable_size(p: *mut c_void) -> usize;
}
use real::{__libc_calloc, __libc_free, __libc_malloc, __libc_memalign, __libc_realloc};

// ---------------------------------------------------------------------------
// The shim's own heap.

struct LibcAlloc;

// SAFETY: forwards to glibc's allocator, honouring alignment.
unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.align() <= 16 {
            __libc_malloc(l.size()) as *mut u8
        } else {
            __libc_memalign(l.align(), l.size()) as *mut u8
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.align() <= 16 {
            __libc_calloc(1, l.size()) as *mut u8
        } else {
            let p = self.alloc(l);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, l.size());
            }
            p
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, _l: Layout) {
        __libc_free(p as *mut c_void)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if l.align() <= 16 {
            return __libc_realloc(p as *mut c_void, new) as *mut u8;
        }
        let q = self.alloc(Layout::from_size_align_unchecked(new, l.align()));
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p, q, l.size().min(new));
            self.dealloc(p, l);
        }
        q
    }
}

#[global_allocator]
static ALLOC: LibcAlloc = LibcAlloc;

// ---------------------------------------------------------------------------
// Wire format.

use leakscope_event::wire::{
    CLOCK_FILE, CLOCK_LEN, CLOCK_MAGIC, CLOCK_NOW, HELLO_FORK, HELLO_IMAGE, HELLO_RESUME,
    J_COPYING, J_COPY_END, J_LOST, J_STOPPED, J_STREAM_OFF, J_UNJOURNALED, T_ALLOC, T_CHUNK, T_END,
    T_FREE, T_HELLO, T_KEPT, T_LOST, T_MAP, T_NOTE, T_PAIRS, T_STACK, VERSION,
};

/// A thread's buffer this big asks for a flush of every buffer.
const FLUSH_BYTES: usize = 32 * 1024;
/// A thread's buffer this big waits for the flush lock instead of trying.
const HARD_BYTES: usize = 512 * 1024;
const FLUSH_NS: u64 = 10_000_000;
const HIGH_FD: c_int = 1000;
// A recorder's buffer never fills: past HARD_BYTES its owner waits for a
// flush after each record, and the rest holds a spill of a full table (an
// ALLOC is at most 48 bytes) and a stack.
const _: () = assert!(HARD_BYTES + pending::FULL * 48 + 64 * 1024 <= journal::BUF_CAP);

// ---------------------------------------------------------------------------
// Per-thread state: plain const TLS (no destructor, so no lazy registration
// that would allocate).

/// One TLS block, so that a hook looks its thread up once. All zero bytes
/// is its initial value (not in a hook, no recorder).
#[repr(C)]
struct Tls {
    in_hook: Cell<bool>,
    /// Set around shim-internal calls into libc that may allocate: those
    /// allocations are ours, not lost program events.
    internal: Cell<bool>,
    /// Set while this thread looks the program's allocator up (see
    /// `real`): its allocations come from a static arena meanwhile.
    resolving: Cell<bool>,
    /// This thread's recorder; null: none yet.
    me: Cell<*mut Thread>,
}

// The block lives in static TLS, reached with the initial-exec model (the
// thread pointer plus a GOT offset): Rust's `thread_local!` in a shared
// object uses the general-dynamic model, a `__tls_get_addr` call on every
// hook. Initial-exec suits a library loaded at startup (LD_PRELOAD), whose
// TLS the loader places in the static block; the linker marks the shim
// DF_STATIC_TLS.
std::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".hidden leakscope_shim_tls",
    "leakscope_shim_tls:",
    ".zero 16",
    ".popsection",
);
const _: () = assert!(std::mem::size_of::<Tls>() == 16 && std::mem::align_of::<Tls>() == 8);

/// This thread's TLS block. (An `Option` for the callers' sake: it is
/// always there.)
#[inline]
fn tls() -> Option<&'static Tls> {
    let p: *const Tls;
    // SAFETY: %fs:0 is the thread pointer (x86_64 TLS ABI) and the GOT slot
    // holds the block's offset from it; the block lives as long as the
    // thread, which outlives every hook call that uses the reference, and
    // zero bytes are a valid `Tls`.
    unsafe {
        std::arch::asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + leakscope_shim_tls@GOTTPOFF]",
            p = out(reg) p,
            options(pure, readonly, nostack),
        );
        Some(&*p)
    }
}

/// This thread's `resolving` flag, for [`real`].
fn resolving() -> &'static Cell<bool> {
    let Some(t) = tls() else {
        unreachable!("static TLS is always there")
    };
    &t.resolving
}

/// Holds the reentrancy flag for the current thread.
struct Guard(&'static Tls);

impl Guard {
    #[inline]
    fn enter() -> Option<Guard> {
        let Some(t) = tls() else {
            lost(1);
            return None;
        };
        if t.in_hook.replace(true) {
            if !t.internal.get() {
                lost(1);
            }
            None
        } else {
            Some(Guard(t))
        }
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        self.0.in_hook.set(false);
    }
}

/// Runs `f` marked as shim-internal (nested allocations are not "lost").
fn internal<R>(f: impl FnOnce() -> R) -> R {
    let Some(t) = tls() else { return f() };
    let was = t.internal.replace(true);
    let r = f();
    t.internal.set(was);
    r
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> c_int;

/// The vDSO's own `clock_gettime`, found at init (0: use glibc's wrapper,
/// which checks the clock id and calls this through a pointer).
static VDSO_CLOCK: AtomicUsize = AtomicUsize::new(0);

/// Looks the vDSO's `__vdso_clock_gettime` up (linux-vdso.so.1 is in the
/// loader's list from the start, so `RTLD_NOLOAD` finds it).
fn find_vdso_clock() {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is not
    // closed (the vDSO is never unloaded).
    let f = unsafe {
        let h = libc::dlopen(
            c"linux-vdso.so.1".as_ptr(),
            libc::RTLD_LAZY | libc::RTLD_NOLOAD,
        );
        if h.is_null() {
            return;
        }
        libc::dlsym(h, c"__vdso_clock_gettime".as_ptr())
    };
    VDSO_CLOCK.store(f as usize, Ordering::Relaxed);
}

/// Event times: `CLOCK_MONOTONIC_COARSE` (resolution one tick), from the
/// collector's clock page: one load, where even the vDSO's coarse clock
/// took ~3.4 ns, as much as the rest of recording an allocation. Order
/// comes from [`SEQ`], not from times.
#[inline]
fn now_ns() -> u64 {
    let p = CLOCK_PAGE.load(Ordering::Relaxed);
    if !p.is_null() {
        // SAFETY: a valid page maps `CLOCK_LEN` bytes for the life of the
        // process (never unmapped); `CLOCK_NOW` is 8-aligned in it.
        return unsafe { (*(p.add(CLOCK_NOW) as *const AtomicU64)).load(Ordering::Relaxed) };
    }
    vdso_now_ns()
}

/// `CLOCK_MONOTONIC_COARSE` from the vDSO (or glibc).
#[cold]
fn vdso_now_ns() -> u64 {
    let f = VDSO_CLOCK.load(Ordering::Relaxed);
    if f == 0 {
        return clock(libc::CLOCK_MONOTONIC_COARSE);
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `f` is the vDSO's clock_gettime (same signature); valid out
    // pointer. COARSE never falls back to a syscall.
    unsafe {
        let f: ClockGettime = std::mem::transmute(f);
        f(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The collector's clock page (`wire::CLOCK_FILE`), mapped read-only at
/// init; null: none, [`now_ns`] calls the vDSO.
static CLOCK_PAGE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// Maps the clock page beside the collector socket `sock`, if it is there
/// and valid. Its fd is closed again at once.
fn map_clock_page(sock: &libc::sockaddr_un) {
    let path: Vec<u8> = sock
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let Some(slash) = path.iter().rposition(|&c| c == b'/') else {
        return;
    };
    let mut file = path[..=slash].to_vec();
    file.extend_from_slice(CLOCK_FILE.as_bytes());
    file.push(0);
    // SAFETY: a NUL-terminated path; the fd is ours and closed below; the
    // mapping is read-only and kept for the life of the process.
    unsafe {
        let fd = libc::open(
            file.as_ptr() as *const c_char,
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            CLOCK_LEN,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        );
        libc::close(fd);
        if p == libc::MAP_FAILED {
            return;
        }
        let p = p as *mut u8;
        if (*(p as *const AtomicU64)).load(Ordering::Acquire) != CLOCK_MAGIC {
            libc::munmap(p as *mut c_void, CLOCK_LEN);
            return;
        }
        CLOCK_PAGE.store(p, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Process-wide state.

const UNINIT: u8 = 0;
const INITING: u8 = 1;
const ON: u8 = 2;
const OFF: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// Events lost before the journal exists (then its `J_LOST` word).
static LOST: AtomicU64 = AtomicU64::new(0);

/// Counts an event not recorded.
#[cold]
fn lost(n: u64) {
    match journal::word(J_LOST) {
        Some(w) => w.fetch_add(n, Ordering::Relaxed),
        None => LOST.fetch_add(n, Ordering::Relaxed),
    };
}

/// Events lost and not reported yet.
fn lost_now() -> u64 {
    LOST.load(Ordering::Relaxed) + journal::word(J_LOST).map_or(0, |w| w.load(Ordering::Relaxed))
}

/// Takes `n` off the unreported losses (they are in a committed LOST).
fn lost_reported(mut n: u64) {
    let pre = LOST.load(Ordering::Relaxed).min(n);
    LOST.fetch_sub(pre, Ordering::Relaxed);
    n -= pre;
    if let Some(w) = journal::word(J_LOST) {
        w.fetch_sub(n, Ordering::Relaxed);
    }
}
/// Orders the ALLOCs and FREEs of the process, read under the recording
/// thread's buffer lock. A FREE takes a number (`fetch_add`) before libc
/// gets the block back; an ALLOC only reads the counter, after libc
/// returned the block. libc hands a freed block to a `malloc` on another
/// thread only after the free's `fetch_add` (through its arena lock), so
/// the ALLOC reads a larger number; an ALLOC followed by the FREE of its
/// block may read the same number, and the collector sorts by (number,
/// FREE after ALLOC). Within a thread the numbers never decrease. Only
/// sent frees write the counter (a free that cancels a pending allocation
/// takes no number: neither record exists for the collector), so
/// allocations pay a shared read of a line that is rarely written.
static SEQ: Line<AtomicU64> = Line(AtomicU64::new(1));

/// A cache line of its own: `SEQ` and `FREED` are written by sent frees,
/// and must not drag the read-mostly flags every hook reads with them.
#[repr(C, align(64))]
struct Line<T>(T);

/// Bumped in a fork child: every stack id must be re-announced.
static ID_GEN: AtomicU32 = AtomicU32::new(0);

/// Process-wide stack dedup, taken only when a thread's capture cache
/// misses: frame hash -> id. Lock order: `STACKS`, then a recorder's lock.
struct Stacks {
    lock: SpinLock,
    map: UnsafeCell<Option<HashMap<u64, u32, BuildHasherDefault<Id>>>>,
    next: UnsafeCell<u32>,
}

// SAFETY: only touched with `lock` held.
unsafe impl Sync for Stacks {}

static STACKS: Stacks = Stacks {
    lock: SpinLock::new(),
    map: UnsafeCell::new(None),
    next: UnsafeCell::new(0),
};
/// When the next flush is due (coarse clock): the last flush plus
/// FLUSH_NS, or 0 once UNBUFFERED (every record flushes). One load for
/// the hooks to test.
static FLUSH_AT: AtomicU64 = AtomicU64::new(0);

/// Sets [`FLUSH_AT`] after a flush at `now`.
fn flushed_at(now: u64) {
    let at = if UNBUFFERED.load(Ordering::Relaxed) {
        0
    } else {
        now + FLUSH_NS
    };
    FLUSH_AT.store(at, Ordering::Relaxed);
}
/// After the shim's destructor: every record is flushed at once.
static UNBUFFERED: AtomicBool = AtomicBool::new(false);

/// Key is already a hash: pass it through.
#[derive(Default)]
struct Id(u64);

impl Hasher for Id {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A spin-then-yield lock. Critical sections are a few dozen ns (append a
/// record), so a futex mutex mostly paid for sleeping and waking.
struct SpinLock(AtomicBool);

impl SpinLock {
    const fn new() -> SpinLock {
        SpinLock(AtomicBool::new(false))
    }
    #[inline]
    fn lock(&self) {
        if self
            .0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_slow();
        }
    }
    #[cold]
    fn lock_slow(&self) {
        let mut spins = 0u32;
        loop {
            if !self.0.load(Ordering::Relaxed)
                && self
                    .0
                    .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else if spins < 400 {
                // The holder may be preempted: let it run.
                // SAFETY: plain syscall.
                unsafe { libc::sched_yield() };
            } else {
                // A long wait: the flusher is blocked sending to a busy
                // collector. Sleep rather than take the CPU it needs.
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000,
                };
                // SAFETY: plain syscall on a valid timespec.
                unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            }
        }
    }
    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
    #[inline]
    fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

fn put_u16(b: &mut Buf, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Buf, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Buf, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str(b: &mut Buf, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_u16(b, s.len() as u16);
    b.extend_from_slice(s);
}
/// LEB128 (at most 10 bytes; a buffer always has room, see `HARD_BYTES`).
#[inline]
fn put_var(b: &mut Buf, mut v: u64) {
    while v >= 0x80 {
        b.push(v as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}
#[inline]
fn zigzag(v: u64) -> u64 {
    ((v as i64) << 1 ^ (v as i64) >> 63) as u64
}

// ---------------------------------------------------------------------------
// Per-thread recorders.

/// One thread's records, encoded relative to the previous record of the
/// same buffer (the first one of a buffer relative to zero), and its
/// allocations not sent yet.
struct Enc {
    buf: Buf,
    seq: u64,
    time: u64,
    addr: u64,
    /// Allocations waiting for their free (which cancels both) or for the
    /// next flush (which encodes them into `buf`).
    pending: Pending,
    /// Pairs cancelled since the last flush.
    cancelled: u64,
    /// Blocks whose FREE this buffer holds: an allocation of one of them
    /// still pending on another thread goes out in the same batch (see
    /// [`State::flush`]).
    freed: Vec<u64>,
    /// Scratch for [`Pending::spill_old`].
    keys: Vec<u64>,
}

impl Enc {
    /// A recorder's encoder over its journal slot, or on the heap.
    fn new(slot: Option<&journal::Slot>) -> Enc {
        match slot {
            Some(s) => Enc {
                buf: Buf::at(s.buf, journal::BUF_CAP, s.len),
                pending: Pending::at(s.table),
                ..Enc::on_heap()
            },
            None => Enc::on_heap(),
        }
    }

    fn on_heap() -> Enc {
        Enc {
            buf: Buf::on_heap(journal::BUF_CAP),
            seq: 0,
            time: 0,
            addr: 0,
            pending: Pending::new(),
            cancelled: 0,
            freed: Vec::new(),
            keys: Vec::new(),
        }
    }

    #[inline]
    fn start(&mut self) {
        if self.buf.is_empty() {
            self.seq = 0;
            self.time = 0;
            self.addr = 0;
        }
    }
    #[inline]
    fn head(&mut self, tag: u8, seq: u64, time: u64, addr: u64) {
        self.start();
        self.buf.push(tag);
        // Zigzag: pending allocations are encoded in table order at a
        // flush, after frees that may have larger numbers.
        put_var(&mut self.buf, zigzag(seq.wrapping_sub(self.seq)));
        put_var(&mut self.buf, zigzag(time.wrapping_sub(self.time)));
        put_var(&mut self.buf, zigzag(addr.wrapping_sub(self.addr)));
        self.seq = seq;
        self.time = time;
        self.addr = addr;
    }
    #[inline]
    fn alloc(&mut self, a: &Alloc) {
        self.head(T_ALLOC, a.seq, a.time, a.addr);
        put_var(&mut self.buf, a.size);
        put_var(&mut self.buf, a.stack as u64);
        self.buf.commit();
    }
    #[inline]
    fn free(&mut self, seq: u64, time: u64, addr: u64) {
        self.head(T_FREE, seq, time, addr);
        self.buf.commit();
    }
    /// Encodes every pending allocation (a flush, or exit).
    #[cold]
    #[inline(never)]
    fn spill(&mut self) {
        let mut pending = std::mem::replace(&mut self.pending, Pending::new());
        pending.drain(|a| self.alloc(a));
        self.pending = pending;
    }
    /// Encodes the pending allocations made before epoch `before` (they
    /// outlived a flush interval: not likely to die soon).
    fn spill_old(&mut self, before: u32) {
        let mut pending = std::mem::replace(&mut self.pending, Pending::new());
        let mut keys = std::mem::take(&mut self.keys);
        pending.spill_old(before, &mut keys, |a| self.alloc(a));
        self.keys = keys;
        self.pending = pending;
    }
    fn stack(&mut self, id: u32, frames: &[u64]) {
        self.start();
        self.buf.push(T_STACK);
        put_var(&mut self.buf, id as u64);
        put_var(&mut self.buf, frames.len() as u64);
        for &a in frames {
            put_u64(&mut self.buf, a);
        }
        self.buf.commit();
    }
}

/// A cached capture: valid while the same hook is called with the same
/// return address and stack pointer (and frame pointer, if the walk used
/// it), the snapshot is the same and every stack word the walk read still
/// holds the value it read then.
///
/// The fields a hit compares come first, in the cache line that also holds
/// the first stack words.
#[derive(Clone, Copy)]
#[repr(C)]
struct Cached {
    ra: u64,
    sp: u64,
    hook: u64,
    bp: u64,
    gen: u32,
    id: u32,
    n: u32,
    bp_free: bool,
    slots: [(u64, u64); unwind::SLOTS],
}

const CACHED: usize = 64;

/// State only the owning thread touches (no lock).
struct Own {
    cache: unwind::Cache,
    /// Reads stacks other than the thread's own.
    alt: unwind::AltMem,
    /// Top of the stack captures off the thread's own stack run on; 0:
    /// not mapped yet.
    ustack: u64,
    /// Like `cached`, for captures off the thread's own stack, checked
    /// word by word in walk order (see [`unchanged_in_order`]).
    alt_cached: Vec<Cached>,
    id_gen: u32,
    cached: Vec<Cached>,
}

/// One thread's recorder. Recorders are never freed: one whose thread
/// exited is handed to the next new thread.
///
/// The owner appends between [`Thread::begin`] and [`Thread::end`]; a
/// flush (or fork) stops every recorder with [`hold_all`]. That is
/// Dekker's handshake on `busy` (owner) and `hold` (flusher) with an
/// asymmetric fence: the owner's side is a plain store and load, the
/// flusher's side `membarrier(2)`, which runs a full barrier on every
/// thread of the process. Without membarrier both sides use `mfence`.
struct Thread {
    /// Only for the shared spare recorder: its owners exclude each other.
    lock: SpinLock,
    shared: bool,
    /// The owner is appending.
    busy: AtomicBool,
    /// A flush or fork has stopped this recorder.
    hold: AtomicBool,
    /// Held by a live thread.
    owned: AtomicBool,
    tid: AtomicU32,
    /// Its journal slot's index, u32::MAX: none (its buffers are on the
    /// heap); and the slot's thread id word.
    slot: u32,
    slot_tid: *const AtomicU64,
    /// The registry list (set before the recorder is published).
    next: *mut Thread,
    /// Between begin() and end(), or under hold_all().
    enc: UnsafeCell<Enc>,
    /// Owner only.
    own: UnsafeCell<Own>,
}

// SAFETY: `enc` is only touched between begin() and end() or under
// hold_all(), `own` only by the owner.
unsafe impl Sync for Thread {}
// SAFETY: as above.
unsafe impl Send for Thread {}

/// Head of the registry; pushed to only with `G.lock` held.
static THREADS: AtomicPtr<Thread> = AtomicPtr::new(std::ptr::null_mut());
/// The recorder of threads whose own recorder is gone (thread teardown):
/// shared, so its `own` is never used and its records have no stack.
static SPARE: AtomicPtr<Thread> = AtomicPtr::new(std::ptr::null_mut());
static THREAD_KEY: AtomicU64 = AtomicU64::new(u64::MAX);

/// membarrier(2) works here: owners need no fence.
static ASYM: AtomicBool = AtomicBool::new(false);

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: c_int = 8;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: c_int = 16;

fn register_membarrier() {
    // SAFETY: plain syscall.
    let ok = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
            0,
            0,
        )
    } == 0;
    ASYM.store(ok, Ordering::Relaxed);
}

/// A full barrier on every thread of the process (the flusher's side).
fn heavy_fence() {
    std::sync::atomic::fence(Ordering::SeqCst);
    if ASYM.load(Ordering::Relaxed) {
        // SAFETY: plain syscall; registered at init (and in fork children).
        let r =
            unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
        // membarrier(2): the command cannot fail once registered, and ASYM
        // is only set after a successful registration.
        debug_assert_eq!(r, 0);
    }
}

impl Thread {
    /// Names the thread owning the recorder (in its journal slot too).
    fn set_tid(&self, tid: u32) {
        self.tid.store(tid, Ordering::Relaxed);
        // SAFETY: a live word (the slot's, or a dummy).
        unsafe { (*self.slot_tid).store(tid as u64, Ordering::Relaxed) };
    }

    /// Starts appending (owner side).
    #[inline]
    fn begin(&self) {
        if self.shared {
            self.lock.lock();
        }
        loop {
            self.busy.store(true, Ordering::Relaxed);
            if ASYM.load(Ordering::Relaxed) {
                std::sync::atomic::compiler_fence(Ordering::SeqCst);
            } else {
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            if !self.hold.load(Ordering::Acquire) {
                return;
            }
            self.busy.store(false, Ordering::Release);
            let mut spins = 0u32;
            while self.hold.load(Ordering::Acquire) {
                spins += 1;
                if spins < 200 {
                    std::hint::spin_loop();
                } else {
                    // SAFETY: plain syscall.
                    unsafe { libc::sched_yield() };
                }
            }
        }
    }

    /// Ends appending (owner side).
    #[inline]
    fn end(&self) {
        self.busy.store(false, Ordering::Release);
        if self.shared {
            self.lock.unlock();
        }
    }
}

/// Stops every recorder (flush lock held): when this returns no owner is
/// appending and none will until [`release_all`].
fn hold_all() {
    for t in threads() {
        t.hold.store(true, Ordering::Relaxed);
    }
    heavy_fence();
    for t in threads() {
        let mut spins = 0u32;
        while t.busy.load(Ordering::Acquire) {
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                // SAFETY: plain syscall.
                unsafe { libc::sched_yield() };
            }
        }
    }
}

fn release_all() {
    for t in threads() {
        t.hold.store(false, Ordering::Release);
    }
}

/// A new recorder (flush lock held, or at init), with a journal slot if
/// one is left.
fn new_thread(shared: bool) -> *mut Thread {
    let slot = journal::take_slot();
    if slot.is_none() {
        if let Some(w) = journal::word(J_UNJOURNALED) {
            w.fetch_add(1, Ordering::Relaxed);
        }
    }
    static NO_TID: AtomicU64 = AtomicU64::new(0);
    Box::into_raw(Box::new(Thread {
        lock: SpinLock::new(),
        shared,
        busy: AtomicBool::new(false),
        hold: AtomicBool::new(false),
        owned: AtomicBool::new(true),
        tid: AtomicU32::new(0),
        slot: slot.as_ref().map_or(u32::MAX, |s| s.index),
        slot_tid: slot.as_ref().map_or(&NO_TID as *const AtomicU64, |s| s.tid),
        next: THREADS.load(Ordering::Relaxed),
        enc: UnsafeCell::new(Enc::new(slot.as_ref())),
        own: UnsafeCell::new(Own {
            cache: unwind::Cache::new(),
            alt: unwind::AltMem::default(),
            ustack: 0,
            alt_cached: Vec::new(),
            id_gen: ID_GEN.load(Ordering::Relaxed),
            cached: Vec::new(),
        }),
    }))
}

fn threads() -> impl Iterator<Item = &'static Thread> {
    let mut p = THREADS.load(Ordering::Acquire);
    std::iter::from_fn(move || {
        // SAFETY: recorders are never freed.
        let t = unsafe { p.as_ref()? };
        p = t.next;
        Some(t)
    })
}

unsafe extern "C" fn thread_exit(p: *mut c_void) {
    if let Some(t) = tls() {
        t.me.set(SPARE.load(Ordering::Relaxed));
    }
    (*(p as *mut Thread)).owned.store(false, Ordering::Release);
}

/// This thread's recorder, made or adopted on first use.
#[inline]
fn me(g: &Guard) -> &'static Thread {
    let p = g.0.me.get();
    if !p.is_null() {
        // SAFETY: recorders are never freed.
        return unsafe { &*p };
    }
    adopt(g)
}

/// [`me`] for a thread without a recorder yet.
#[cold]
#[inline(never)]
fn adopt(g: &Guard) -> &'static Thread {
    let spare = SPARE.load(Ordering::Relaxed);
    // Registered under the flush lock, so that a flush holding every
    // recorder's lock holds every recorder that may have records.
    G.lock.lock();
    let t = match threads().find(|t| {
        !std::ptr::eq(*t, spare)
            && t.owned
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }) {
        Some(t) => t as *const Thread as *mut Thread,
        None => {
            let t = new_thread(false);
            THREADS.store(t, Ordering::Release);
            t
        }
    };
    G.lock.unlock();
    // SAFETY: we own it now; `own` is ours alone.
    unsafe {
        (*t).set_tid(libc::gettid() as u32);
        // Another thread's stack: its cached captures mean nothing here.
        (*(*t).own.get()).cached.clear();
        (*(*t).own.get()).alt_cached.clear();
        let key = THREAD_KEY.load(Ordering::Relaxed);
        if key != u64::MAX {
            libc::pthread_setspecific(key as libc::pthread_key_t, t as *const c_void);
        }
    }
    g.0.me.set(t);
    // SAFETY: never freed.
    unsafe { &*t }
}

// ---------------------------------------------------------------------------
// The connection and the flush.

struct State {
    fd: c_int,
    /// The connection's (device, inode): an fd of that number that is not
    /// it was closed or replaced by the program.
    ino: (u64, u64),
    sock: libc::sockaddr_un,
    /// The outbox: the stream's tail not sent yet (HELLO, MAP, LOST,
    /// batches), in the journal.
    buf: Buf,
    /// The stream offset of `buf`'s first byte.
    stream_off: u64,
    /// The journal's memfd, passed with the next send; -1: passed.
    pass_fd: c_int,
    /// Mappings already announced: (start, end, offset, path).
    maps: Vec<(u64, u64, u64, String)>,
}

/// The outbox: in the journal, or on the heap without one.
fn outbox() -> Buf {
    match (
        journal::outbox(),
        journal::word(leakscope_event::wire::J_OUT_LEN),
    ) {
        (Some(p), Some(len)) => Buf::at(p, journal::OUT_CAP, len),
        _ => Buf::on_heap(journal::OUT_CAP),
    }
}

struct Global {
    /// The flush lock: taken before any recorder's lock, never the other
    /// way round.
    lock: SpinLock,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only touched with `lock` held.
unsafe impl Sync for Global {}

static G: Global = Global {
    lock: SpinLock::new(),
    state: UnsafeCell::new(None),
};

/// Runs `f` on the state with the flush lock held.
fn locked<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    G.lock.lock();
    // SAFETY: `state` is only reached with the lock held (here and in the
    // fork handlers).
    let r = unsafe { (*G.state.get()).as_mut().map(f) };
    G.lock.unlock();
    r
}

/// A HELLO record of `kind` (the stream continues at `resume`).
fn hello_into(b: &mut Buf, kind: u8, resume: u64) {
    let exe = std::fs::read_link("/proc/self/exe")
        .ok()
        .and_then(|p| p.into_os_string().into_string().ok())
        .unwrap_or_default();
    b.push(T_HELLO);
    put_u16(b, VERSION);
    b.push(kind);
    // SAFETY: getpid/getppid cannot fail.
    put_u32(b, unsafe { libc::getpid() } as u32);
    put_u32(b, unsafe { libc::getppid() } as u32);
    // The precise clock: the collector clamps this image's event times
    // to at least this, so they all fall after its exec or fork.
    put_u64(b, clock(libc::CLOCK_MONOTONIC));
    put_str(b, &exe);
    put_u64(b, resume);
    b.commit();
}

impl State {
    fn hello(&mut self, kind: u8) {
        hello_into(&mut self.buf, kind, 0);
    }

    /// Names the standard streams' buffers, which glibc allocates on their
    /// first use and keeps until exit (only `__libc_freeres` frees them):
    /// they are the runtime's, not leaks of the program. A buffer the
    /// program set with setvbuf (`_IO_USER_BUF`) is the program's.
    fn kept_buffers(&mut self) {
        extern "C" {
            static stdin: *mut libc::FILE;
            static stdout: *mut libc::FILE;
            static stderr: *mut libc::FILE;
        }
        // glibc's struct _IO_FILE (a public, stable layout): int _flags,
        // then seven pointers of which _IO_buf_base is the seventh.
        const IO_USER_BUF: c_int = 0x0001;
        const BUF_BASE: usize = 8 + 6 * 8;
        // SAFETY: the three streams are glibc's FILE objects, alive until
        // exit (we run in a destructor, before libc's own teardown).
        let streams = unsafe { [stdin, stdout, stderr] };
        for (what, f) in streams.into_iter().enumerate() {
            if f.is_null() {
                continue;
            }
            // SAFETY: reads of the documented fields of a live FILE.
            let (flags, base) = unsafe {
                (
                    *(f as *const c_int),
                    *((f as *const u8).add(BUF_BASE) as *const u64),
                )
            };
            if flags & IO_USER_BUF == 0 && base != 0 && self.buf.room(16) {
                self.buf.push(T_KEPT);
                self.buf.push(what as u8);
                put_u64(&mut self.buf, base);
                self.buf.commit();
            }
        }
    }

    fn no_journal_note(&mut self) {
        self.note(
            "its records were not kept in a journal (memfd_create failed): what it \
             had not sent when it ended may be missing",
        );
    }

    fn note(&mut self, text: &str) {
        if self.buf.room(3 + text.len()) {
            self.buf.push(T_NOTE);
            put_str(&mut self.buf, text);
            self.buf.commit();
        }
    }

    /// Notes it when the process's `malloc` is not the shim's: something
    /// ahead of the shim in the search order (the executable, with an
    /// allocator linked in statically) defines it, and the hooks see none
    /// of its allocations.
    fn check_interposed(&mut self) {
        // The shim's own `malloc` cannot be named here: a default-visibility
        // symbol of a shared object is reached through the GOT, that is,
        // as whatever comes first. Compare the objects instead, by a
        // function of the shim's that nothing interposes.
        // SAFETY: dlsym/dladdr/dladdr1 with a NUL-terminated name and valid
        // out structs; the returned name is copied.
        let theirs = unsafe {
            let f = libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            let mut mine: libc::Dl_info = std::mem::zeroed();
            let mut sym: *mut c_void = std::ptr::null_mut();
            if f.is_null()
                || libc::dladdr1(f, &mut info, &mut sym, RTLD_DL_SYMENT) == 0
                || libc::dladdr(init as *const c_void, &mut mine) == 0
                || info.dli_fbase == mine.dli_fbase
                || !defines_malloc(f, &info, sym as *const ElfSym)
            {
                None
            } else if info.dli_fname.is_null() {
                Some(String::new())
            } else {
                Some(
                    CStr::from_ptr(info.dli_fname)
                        .to_string_lossy()
                        .into_owned(),
                )
            }
        };
        if let Some(path) = theirs {
            let path = if path.is_empty() {
                "the executable".to_string()
            } else {
                path
            };
            self.note(&format!(
                "malloc is defined by {path}, ahead of the preload shim: its \
                 allocations are not seen (`leakscope attach --track heap \
                 --allocator ''` probes them with uprobes)"
            ));
        }
    }

    fn map(&mut self, time: u64, m: &(u64, u64, u64, String)) {
        if !self.buf.room(64 + m.3.len()) {
            // An outbox full of MAPs (thousands of modules): send it.
            self.send();
        }
        let b = &mut self.buf;
        b.push(T_MAP);
        put_u64(b, time);
        put_u64(b, m.0);
        put_u64(b, m.1);
        put_u64(b, m.2);
        put_str(b, &m.3);
        b.commit();
    }

    /// Announces the mappings of `mods` not announced yet.
    fn maps_of(&mut self, mods: &[unwind::ModInfo]) {
        let time = now_ns();
        // SAFETY: sysconf cannot fail for _SC_PAGESIZE.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        for m in mods.iter().filter(|m| !m.path.is_empty()) {
            for s in &m.segs {
                if s.kind != libc::PT_LOAD || s.flags & libc::PF_X == 0 {
                    continue;
                }
                let start = (m.base + s.vaddr) & !(page - 1);
                let end = (m.base + s.vaddr + s.memsz + page - 1) & !(page - 1);
                let entry = (start, end, s.offset & !(page - 1), m.path.clone());
                if !self.maps.contains(&entry) {
                    self.map(time, &entry);
                    self.maps.push(entry);
                }
            }
        }
    }

    /// Moves every recorder's records into one batch and sends it. Holding
    /// every recorder's lock at once means no record is half-written and
    /// every number below the highest one sent has been sent: each batch
    /// is a complete prefix of [`SEQ`], which the collector sorts.
    fn flush(&mut self) {
        flushed_at(now_ns());
        let lost = lost_now();
        if lost > 0 && self.buf.room(9) {
            self.buf.push(T_LOST);
            put_u64(&mut self.buf, lost);
            self.buf.commit();
            lost_reported(lost);
        }
        hold_all();
        settle_pending();
        let mut any = false;
        let mut pairs = 0;
        for t in threads() {
            // SAFETY: held.
            let enc = unsafe { &mut *t.enc.get() };
            pairs += std::mem::take(&mut enc.cancelled);
            if enc.buf.is_empty() {
                continue;
            }
            any = true;
            self.move_chunk(t, enc);
        }
        release_all();
        if !self.buf.room(10) {
            self.send();
        }
        if any {
            self.buf.push(T_END);
        }
        if pairs > 0 {
            self.buf.push(T_PAIRS);
            put_u64(&mut self.buf, pairs);
        }
        self.buf.commit();
        self.send();
    }

    /// Moves recorder `t`'s records into the outbox as a CHUNK (every
    /// recorder held). Until the chunk is committed the slot's copy is the
    /// one the collector would read; from then on the header says the
    /// slot's copy is stale, until the slot is empty.
    fn move_chunk(&mut self, t: &Thread, enc: &mut Enc) {
        if !self.buf.room(9 + enc.buf.len()) {
            self.send();
        }
        self.buf.push(T_CHUNK);
        put_u32(&mut self.buf, t.tid.load(Ordering::Relaxed));
        put_u32(&mut self.buf, enc.buf.len() as u32);
        self.buf.extend_from_slice(enc.buf.as_slice());
        let copying = journal::word(J_COPYING).filter(|_| t.slot != u32::MAX);
        if let (Some(c), Some(end)) = (copying, journal::word(J_COPY_END)) {
            end.store(self.stream_off + self.buf.len() as u64, Ordering::Relaxed);
            c.store(t.slot as u64 + 1, Ordering::Relaxed);
        }
        self.buf.commit();
        enc.buf.clear();
        if let Some(c) = copying {
            std::sync::atomic::compiler_fence(Ordering::Release);
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Sends the outbox. A connection the program closed (or replaced
    /// with an fd of its own) is made again and the stream goes on there;
    /// one the collector closed stops tracking.
    fn send(&mut self) {
        if self.fd < 0 {
            return;
        }
        if !self.connection_is_ours() && !self.reconnect(self.stream_off) {
            return;
        }
        let mut off = 0;
        while off < self.buf.len() {
            let rest = &self.buf.as_slice()[off..];
            let n = send_bytes(self.fd, rest, self.pass_fd);
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EBADF | libc::ENOTSOCK | libc::ENOTCONN) => {
                        // The collector has the bytes before `off`.
                        if !self.reconnect(self.stream_off + off as u64) {
                            return;
                        }
                        continue;
                    }
                    _ => {
                        self.stop(&err);
                        return;
                    }
                }
            }
            if self.pass_fd >= 0 {
                // SAFETY: our fd, in the collector's hands now.
                unsafe { libc::close(self.pass_fd) };
                self.pass_fd = -1;
            }
            off += n as usize;
        }
        // The bytes go first, then the offset moves past them: a process
        // dying in between leaves an empty outbox, never one read twice.
        let sent = self.buf.len() as u64;
        self.buf.clear();
        self.stream_off += sent;
        self.publish_stream_off();
    }

    fn publish_stream_off(&self) {
        if let Some(w) = journal::word(J_STREAM_OFF) {
            std::sync::atomic::compiler_fence(Ordering::Release);
            w.store(self.stream_off, Ordering::Relaxed);
        }
    }

    /// Whether `fd` is still the connection this shim made.
    fn connection_is_ours(&self) -> bool {
        // SAFETY: all-zero is a valid stat; fstat fills it or fails.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out pointer.
        (unsafe { libc::fstat(self.fd, &mut st) }) == 0
            && (st.st_dev as u64, st.st_ino as u64) == self.ino
    }

    /// Connects again after the program closed the connection (or put an
    /// fd of its own at its number, which is left alone): the collector
    /// continues this image's stream at stream offset `resume`.
    fn reconnect(&mut self, resume: u64) -> bool {
        let Some((fd, ino)) = connect(&self.sock) else {
            self.stop(&std::io::Error::other(
                "the program closed the connection and it could not be made again",
            ));
            return false;
        };
        self.fd = fd;
        self.ino = ino;
        let mut b = Buf::on_heap(8 * 1024);
        hello_into(&mut b, HELLO_RESUME, resume);
        let mut off = 0;
        while off < b.len() {
            let n = send_bytes(fd, &b.as_slice()[off..], -1);
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.stop(&err);
                return false;
            }
            off += n as usize;
        }
        true
    }

    fn stop(&mut self, err: &std::io::Error) {
        STATE.store(OFF, Ordering::Relaxed);
        if let Some(w) = journal::word(J_STOPPED) {
            w.store(now_ns().max(1), Ordering::Relaxed);
        }
        let msg = format!("leakscope-shim: collector gone ({err}); heap tracking stopped\n");
        // SAFETY: writing our own bytes to stderr; failure is ignored.
        unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
        if self.connection_is_ours() {
            // SAFETY: our fd.
            unsafe { libc::close(self.fd) };
        }
        self.fd = -1;
    }
}

/// Sends `b` on `fd` (MSG_NOSIGNAL: no SIGPIPE), with `pass` (if not -1)
/// as SCM_RIGHTS. Returns send(2)'s result.
fn send_bytes(fd: c_int, b: &[u8], pass: c_int) -> isize {
    if pass < 0 {
        // SAFETY: sending from a live slice.
        return unsafe { libc::send(fd, b.as_ptr() as *const c_void, b.len(), libc::MSG_NOSIGNAL) };
    }
    let mut iov = libc::iovec {
        iov_base: b.as_ptr() as *mut c_void,
        iov_len: b.len(),
    };
    // Room for one cmsghdr with one int, 8-aligned.
    let mut space = [0u64; 4];
    // SAFETY: msghdr/cmsghdr built over live buffers, as cmsg(3) shows.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr() as *mut c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
        *(libc::CMSG_DATA(c) as *mut c_int) = pass;
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    }
}

/// The epoch of new pending allocations (see [`settle_pending`]), and
/// when it began.
static EPOCH: AtomicU32 = AtomicU32::new(0);
static EPOCH_AT: AtomicU64 = AtomicU64::new(0);
/// An epoch's length: a block that lives longer (100 to 200 ms) is sent;
/// one that dies sooner on its thread, as request buffers and parse trees
/// do, never leaves the process. Nothing waits for it: a report reads the
/// tables too (the journal), and a process that ends sends them all.
const EPOCH_NS: u64 = 100_000_000;

/// Decides, every recorder held, which pending allocations go out with
/// this batch: those another thread's FREE in the batch names (so the
/// collector, sorting the batch, sees the ALLOC before it), those made two
/// epochs ago or earlier (they lived through a whole one), and all of them
/// once the process is ending. Younger ones stay, cancellable.
fn settle_pending() {
    let all: Vec<&Thread> = threads().collect();
    for (i, t) in all.iter().enumerate() {
        // SAFETY: held; `t` and `u` are distinct recorders.
        let freed = std::mem::take(unsafe { &mut (*t.enc.get()).freed });
        for &addr in &freed {
            for (j, u) in all.iter().enumerate() {
                if i != j {
                    // SAFETY: as above.
                    let other = unsafe { &mut *u.enc.get() };
                    if let Some(a) = other.pending.remove(addr) {
                        other.alloc(&a);
                    }
                }
            }
        }
        // SAFETY: as above; the list keeps its capacity.
        let keep = unsafe { &mut (*t.enc.get()).freed };
        *keep = freed;
        keep.clear();
    }
    // An epoch is EPOCH_NS long at least, and a flush moves it on by one
    // at most: not by size-triggered flushes (frequent on a busy
    // thread), nor by a jump of the coarse clock (its page is updated by
    // the collector, which a loaded machine may not run for a while).
    let now = now_ns();
    if now >= EPOCH_AT.load(Ordering::Relaxed) + EPOCH_NS {
        EPOCH.fetch_add(1, Ordering::Relaxed);
        EPOCH_AT.store(now, Ordering::Relaxed);
    }
    let before = EPOCH.load(Ordering::Relaxed).wrapping_sub(1);
    // Every sent free numbered below `seq` is in this batch or an earlier
    // one, and was reconciled above. A free without a record holds that
    // back until the entries it could make stale are spilled below.
    let seq = SEQ.0.load(Ordering::SeqCst);
    let unrecorded = UNRECORDED.load(Ordering::SeqCst);
    if unrecorded != u64::MAX
        && (before.wrapping_sub(UNRECORDED_EPOCH.load(Ordering::Relaxed)) as i32) > 0
    {
        UNRECORDED.store(u64::MAX, Ordering::Relaxed);
    }
    RECONCILED.store(
        seq.min(UNRECORDED.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    let ending = UNBUFFERED.load(Ordering::Relaxed) || SPILL_ALL.load(Ordering::Relaxed);
    for t in &all {
        // SAFETY: held.
        let enc = unsafe { &mut *t.enc.get() };
        if ending {
            enc.spill();
        } else {
            enc.spill_old(before);
        }
    }
}

/// Flushes every recorder. `wait`: take the flush lock even if another
/// thread holds it (else leave the flush to that thread).
fn flush_all(wait: bool) {
    if wait {
        G.lock.lock();
    } else if !G.lock.try_lock() {
        return;
    }
    // SAFETY: the lock is held.
    if let Some(st) = unsafe { (*G.state.get()).as_mut() } {
        if STATE.load(Ordering::Relaxed) == ON {
            st.flush();
        }
    }
    G.lock.unlock();
}

/// Connects to the collector; returns an fd >= HIGH_FD, CLOEXEC, and its
/// (device, inode).
fn connect(sock: &libc::sockaddr_un) -> Option<(c_int, (u64, u64))> {
    // SAFETY: plain syscalls on our own fds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(fd, sock as *const _ as *const libc::sockaddr, len) != 0 {
            libc::close(fd);
            return None;
        }
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HIGH_FD);
        libc::close(fd);
        if high < 0 {
            return None;
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(high, &mut st) != 0 {
            libc::close(high);
            return None;
        }
        Some((high, (st.st_dev as u64, st.st_ino as u64)))
    }
}

fn sockaddr_from_env() -> Option<libc::sockaddr_un> {
    // SAFETY: getenv returns a pointer into the environment or null; we copy.
    let path = unsafe {
        let p = libc::getenv(c"LEAKSCOPE_SHIM_SOCK".as_ptr());
        if p.is_null() {
            return None;
        }
        CStr::from_ptr(p).to_bytes().to_vec()
    };
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.is_empty() || path.len() >= sa.sun_path.len() {
        return None;
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(&path) {
        *d = *s as c_char;
    }
    Some(sa)
}

/// Rebuilds the module snapshot and announces new mappings. Called without
/// the global lock (dl_iterate_phdr callbacks of the program may allocate).
fn refresh_modules() {
    let (mods, counters) = internal(unwind::list_modules);
    unwind::publish(&mods, counters);
    locked(|s| s.maps_of(&mods));
}

fn init() {
    if STATE
        .compare_exchange(UNINIT, INITING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let Some(_g) = Guard::enter() else {
        STATE.store(UNINIT, Ordering::Release);
        return;
    };
    let on = internal(|| {
        let Some(sock) = sockaddr_from_env() else {
            return false; // not under leakscope: stay out of the way
        };
        let Some((fd, ino)) = connect(&sock) else {
            let msg = b"leakscope-shim: cannot connect to the collector; heap tracking off\n";
            // SAFETY: writing our own bytes to stderr.
            unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
            return false;
        };
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: plain pthread call.
        if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
            THREAD_KEY.store(key as u64, Ordering::Relaxed);
        }
        register_membarrier();
        find_vdso_clock();
        map_clock_page(&sock);
        // Without a journal, records live on the heap (not durable).
        let pass_fd = journal::create().unwrap_or(-1);
        let spare = new_thread(true);
        THREADS.store(spare, Ordering::Release);
        SPARE.store(spare, Ordering::Release);
        let mut st = State {
            fd,
            ino,
            sock,
            buf: outbox(),
            stream_off: 0,
            pass_fd,
            maps: Vec::new(),
        };
        st.hello(HELLO_IMAGE);
        if pass_fd < 0 {
            st.no_journal_note();
        }
        st.check_interposed();
        flushed_at(now_ns());
        // SAFETY: STATE is INITING, so hooks pass through and nobody else
        // reaches the state.
        G.lock.lock();
        unsafe { *G.state.get() = Some(st) };
        G.lock.unlock();
        // SAFETY: registers our handlers once.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
        refresh_modules();
        locked(|s| s.send());
        true
    });
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
}

unsafe extern "C" fn fork_prepare() {
    STACKS.lock.lock();
    G.lock.lock();
    hold_all();
}

unsafe extern "C" fn fork_parent() {
    release_all();
    G.lock.unlock();
    STACKS.lock.unlock();
}

unsafe extern "C" fn fork_child() {
    // Only this thread exists now; its tid changed. The parent's buffered
    // records are the parent's to send.
    let me = tls().map_or(std::ptr::null_mut(), |t| t.me.get());
    let spare = SPARE.load(Ordering::Relaxed);
    // The journal is shared with the parent: a fresh one at the same place
    // (its slots zeroed; the buffers over them are emptied below).
    let pass_fd = journal::renew().unwrap_or(-1);
    for t in threads() {
        (*t.enc.get()).buf.clear();
        (*t.enc.get()).pending.clear();
        (*t.enc.get()).cancelled = 0;
        let p = t as *const Thread as *mut Thread;
        if p == me {
            t.set_tid(libc::gettid() as u32);
        } else if p != spare {
            t.owned.store(false, Ordering::Relaxed);
        }
        // Threads that were appending in the parent do not exist here.
        t.busy.store(false, Ordering::Relaxed);
        t.lock.0.store(false, Ordering::Relaxed);
        t.hold.store(false, Ordering::Relaxed);
    }
    // The child is a new address space: register it (if this fails, owners
    // fall back to mfence).
    register_membarrier();
    // The child's connection has its own stack ids.
    if let Some(m) = (*STACKS.map.get()).as_mut() {
        m.clear();
    }
    *STACKS.next.get() = 0;
    STACKS.lock.unlock();
    ID_GEN.fetch_add(1, Ordering::Relaxed);
    if let Some(st) = (*G.state.get()).as_mut() {
        if STATE.load(Ordering::Relaxed) == ON {
            st.buf = outbox();
            st.stream_off = 0;
            st.pass_fd = pass_fd;
            let old = st.fd;
            let ours = st.connection_is_ours();
            match connect(&st.sock) {
                Some((fd, ino)) => {
                    // Replace the inherited connection at the same number
                    // (if the program has not taken that number over).
                    if ours && libc::dup3(fd, old, libc::O_CLOEXEC) == old {
                        libc::close(fd);
                    } else {
                        st.fd = fd;
                    }
                    let mut sb: libc::stat = std::mem::zeroed();
                    st.ino = if libc::fstat(st.fd, &mut sb) == 0 {
                        (sb.st_dev as u64, sb.st_ino as u64)
                    } else {
                        ino
                    };
                    st.hello(HELLO_FORK);
                    if pass_fd < 0 {
                        st.no_journal_note();
                    }
                    let maps = std::mem::take(&mut st.maps);
                    let t = now_ns();
                    for m in &maps {
                        st.map(t, m);
                    }
                    st.maps = maps;
                    st.send();
                }
                None => {
                    if ours {
                        libc::close(old);
                    }
                    if pass_fd >= 0 {
                        libc::close(pass_fd);
                    }
                    st.fd = -1;
                    STATE.store(OFF, Ordering::Relaxed);
                }
            }
        }
    }
    G.lock.unlock();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = {
    extern "C" fn ctor() {
        init();
    }
    ctor
};

#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = {
    extern "C" fn dtor() {
        if STATE.load(Ordering::Acquire) == ON {
            locked(|s| s.kept_buffers());
            // Later destructors may still allocate and free: send those at once.
            UNBUFFERED.store(true, Ordering::Relaxed);
            FLUSH_AT.store(0, Ordering::Relaxed);
            flush_all(true);
        }
    }
    dtor
};

// ---------------------------------------------------------------------------
// Recording.

#[inline]
fn active() -> bool {
    let s = STATE.load(Ordering::Acquire);
    s == ON || active_slow(s)
}

/// [`active`] before init is done (or after the shim turned off).
#[cold]
#[inline(never)]
fn active_slow(state: u8) -> bool {
    match state {
        UNINIT => {
            init();
            STATE.load(Ordering::Acquire) == ON
        }
        INITING => {
            // Another thread is initializing (the initializing thread itself
            // holds the guard: its libc calls allocate for us, not the program).
            if !tls().is_none_or(|t| t.in_hook.get()) {
                lost(1);
            }
            false
        }
        _ => false,
    }
}

fn frames_hash(frames: &[u64]) -> u64 {
    let mut h: u64 = frames.len() as u64;
    for &a in frames {
        h = (h.rotate_left(5) ^ a).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    h
}

/// The id of `frames`, announced (a STACK record in `t`'s buffer) if new.
/// The announcement is written before the id is visible to other
/// threads, so every ALLOC naming it comes after it in the collector.
fn stack_id(t: &Thread, frames: &[u64]) -> u32 {
    let h = frames_hash(frames);
    STACKS.lock.lock();
    // SAFETY: STACKS.lock is held.
    let map = unsafe { (*STACKS.map.get()).get_or_insert_with(HashMap::default) };
    let id = match map.get(&h) {
        Some(&id) => id,
        None => {
            // SAFETY: STACKS.lock is held.
            let id = unsafe {
                *STACKS.next.get() += 1;
                *STACKS.next.get()
            };
            map.insert(h, id);
            t.begin();
            // SAFETY: between begin() and end().
            unsafe { (*t.enc.get()).stack(id, frames) };
            t.end();
            id
        }
    };
    STACKS.lock.unlock();
    id
}

/// Whether every (address, value) stack word still holds its value. No
/// early exit: the words are few and all usually match, so a branch-free
/// fold lets the loads overlap.
#[inline]
fn unchanged(words: &[(u64, u64)]) -> bool {
    let mut diff = 0u64;
    for &(a, v) in words {
        // SAFETY: these words were read from this thread's live stack,
        // above the hook's `sp`, which is live as long as the hook runs.
        diff |= unsafe { *(a as *const u64) } ^ v;
    }
    diff == 0
}

/// [`unchanged`] for a capture off the thread's own stack, whose extent is
/// unknown: the words in the order the walk read them, stopping at the
/// first that changed. Each word's address follows from `sp`, `bp` and
/// the words before it, so while they match, the next word is in a frame
/// that is live on this very stack (the frame a matching return address
/// returns into), never in memory freed since. The walks cached are the
/// clean ones through no signal frame.
fn unchanged_in_order(words: &[(u64, u64)]) -> bool {
    words.iter().all(|&(a, v)| {
        // SAFETY: as above; volatile, so that no load is made before the
        // comparisons that come first.
        unsafe { std::ptr::read_volatile(a as *const u64) == v }
    })
}

/// The stack id for a hook called with return address `*sp` and frame
/// pointer `bp`, from `t`'s (this thread's) capture cache or a capture.
#[inline(always)]
fn stack_of(t: &Thread, own: &mut Own, hook: u64, sp: u64, bp: u64) -> u32 {
    let id_gen = ID_GEN.load(Ordering::Relaxed);
    if own.id_gen != id_gen {
        own.id_gen = id_gen;
        own.cached.clear();
        own.alt_cached.clear();
    }
    // Every hook's `sp` comes from its entry trampoline: the stack pointer
    // at the call, 8-aligned and pointing at the return address.
    debug_assert!(sp != 0 && sp & 7 == 0);
    // SAFETY: `sp` is the hook's entry stack pointer: it points at the
    // return address the call pushed.
    let ra = unsafe { *(sp as *const u64) };
    let gen = unwind::SNAP_GEN.load(Ordering::Acquire);
    let slot =
        ((ra ^ sp.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % CACHED;
    if let Some(c) = own.cached.get(slot) {
        if c.gen == gen
            && c.ra == ra
            && c.sp == sp
            && c.hook == hook
            && (c.bp_free || c.bp == bp)
            && unchanged(&c.slots[..c.n as usize])
        {
            return c.id;
        }
    }
    capture_stack(t, own, hook, ra, sp, bp, slot)
}

/// Bytes of the stack that a thread's captures off its own stack run on.
const UNWIND_STACK: usize = 128 * 1024;

/// The top of this recorder's unwind stack, mapped on first use (with a
/// guard page below); `None` if it cannot be mapped. Kept with the
/// recorder, which outlives its thread and serves the next one.
fn unwind_stack(own: &mut Own) -> Option<u64> {
    if own.ustack == 0 {
        // SAFETY: a fresh anonymous mapping; raw libc calls, no allocation.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                UNWIND_STACK + 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            libc::mprotect(p, 4096, libc::PROT_NONE);
            own.ustack = p as u64 + 4096 + UNWIND_STACK as u64;
        }
    }
    Some(own.ustack)
}

/// Runs `f` with the stack pointer at `top` (16-byte aligned), back on the
/// caller's stack when it returns.
///
/// # Safety
/// `top` is the top of a mapped, writable stack that nothing else uses,
/// large enough for `f`.
unsafe fn on_stack(top: u64, f: &mut dyn FnMut()) {
    unsafe extern "C" fn tramp(arg: *mut c_void) {
        // SAFETY: `arg` is the `&mut dyn FnMut()` below, alive meanwhile.
        let f = unsafe { &mut *(arg as *mut &mut dyn FnMut()) };
        f();
    }
    let mut f = f;
    let arg = &mut f as *mut &mut dyn FnMut() as *mut c_void;
    // SAFETY: r12 is callee-saved, so it holds the caller's stack pointer
    // across the call; every caller-saved register is declared clobbered.
    // `top` is 16-byte aligned, as the call wants.
    unsafe {
        std::arch::asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "call {tramp}",
            "mov rsp, r12",
            top = in(reg) top,
            tramp = in(reg) tramp as *const () as usize,
            in("rdi") arg,
            out("r12") _,
            clobber_abi("C"),
        );
    }
}

/// [`stack_of`] when the cache cannot answer: unwind, intern, cache. Off
/// the thread's own stack, on the recorder's unwind stack: a capture
/// takes tens of KiB of stack (framehop's DWARF evaluation; twice that
/// unoptimized), more than a coroutine's or a signal handler's stack may
/// have left.
#[cold]
#[inline(never)]
fn capture_stack(
    t: &Thread,
    own: &mut Own,
    hook: u64,
    ra: u64,
    sp: u64,
    bp: u64,
    slot: usize,
) -> u32 {
    if unwind::on_thread_stack(sp) {
        return capture_here(t, own, hook, ra, sp, bp, slot, false);
    }
    let gen = unwind::SNAP_GEN.load(Ordering::Acquire);
    if let Some(c) = own.alt_cached.get(slot) {
        if c.gen == gen
            && c.ra == ra
            && c.sp == sp
            && c.hook == hook
            && (c.bp_free || c.bp == bp)
            && unchanged_in_order(&c.slots[..c.n as usize])
        {
            return c.id;
        }
    }
    let Some(top) = unwind_stack(own) else {
        return cut_stack(t, StackCut::NoMemory);
    };
    let mut id = 0;
    // SAFETY: the recorder's own unwind stack, unused meanwhile (a signal
    // handler that allocates now is not recorded: the hook is busy).
    unsafe {
        on_stack(top, &mut || {
            id = capture_here(t, own, hook, ra, sp, bp, slot, true)
        })
    };
    id
}

/// [`capture_stack`] on the current stack; `alt`: `sp` is off the
/// thread's own stack.
#[allow(clippy::too_many_arguments)]
fn capture_here(
    t: &Thread,
    own: &mut Own,
    hook: u64,
    ra: u64,
    sp: u64,
    bp: u64,
    slot: usize,
    alt: bool,
) -> u32 {
    // One more than a capture fills: room for the entry saying why the
    // walk ended early.
    let mut frames = [0u64; MAX_FRAMES + 1];
    let mut slots = [(0u64, 0u64); unwind::SLOTS];
    let walk = |own: &mut Own, frames: &mut [u64; MAX_FRAMES + 1], slots: &mut _| {
        let out: &mut [u64; MAX_FRAMES] = (&mut frames[..MAX_FRAMES]).try_into().unwrap();
        unwind::capture(hook, ra, sp, bp, &mut own.cache, &mut own.alt, out, slots)
    };
    let mut cap = match walk(own, &mut frames, &mut slots) {
        Ok(c) => c,
        Err(cut) => return cut_stack(t, cut),
    };
    if cap.uncovered && unwind::refresh_if_needed(true, now_ns()) {
        match walk(own, &mut frames, &mut slots) {
            Ok(c) => cap = c,
            Err(cut) => return cut_stack(t, cut),
        }
    }
    let mut n = cap.n;
    if let Some(cut) = cap.cut {
        frames[n] = AbsAddr::stack_cut(cut).0;
        n += 1;
    }
    let id = stack_id(t, &frames[..n]);
    // Cache it unless a frame was outside every module (a refresh may yet
    // help) or its dependencies are unclear; off the thread's stack, only
    // a walk that ended cleanly (see `unchanged_in_order`).
    if let (false, Some(nslots), false) = (cap.uncovered, cap.nslots, alt && cap.cut.is_some()) {
        let bp_free = !cap.bp_used;
        let cached = if alt {
            &mut own.alt_cached
        } else {
            &mut own.cached
        };
        if cached.is_empty() {
            cached.resize(
                CACHED,
                Cached {
                    hook: 0,
                    ra: 0,
                    sp: 0,
                    bp: 0,
                    bp_free: false,
                    gen: u32::MAX,
                    id: 0,
                    n: 0,
                    slots: [(0, 0); unwind::SLOTS],
                },
            );
        }
        cached[slot] = Cached {
            hook,
            ra,
            sp,
            bp,
            bp_free,
            gen: cap.gen,
            id,
            n: nslots as u32,
            slots,
        };
    }
    id
}

/// The id of a stack that could not be taken: one entry saying why.
#[cold]
fn cut_stack(t: &Thread, cut: StackCut) -> u32 {
    stack_id(t, &[AbsAddr::stack_cut(cut).0])
}

/// After a record: flush if this buffer is full or the last flush is old.
#[inline]
fn after_record(len: usize, time: u64) {
    if len >= FLUSH_BYTES || time >= FLUSH_AT.load(Ordering::Relaxed) {
        flush_all(len >= HARD_BYTES || UNBUFFERED.load(Ordering::Relaxed));
    }
}

/// Records an allocation (out of line, for the less frequent hooks).
#[inline(never)]
fn on_alloc(p: *mut c_void, size: usize, hook: u64, sp: u64, bp: u64) {
    on_alloc_inline(p, size, hook, sp, bp)
}

/// [`on_alloc`] inlined into `malloc`: a call and return less per
/// allocation was measurable.
#[inline(always)]
fn on_alloc_inline(p: *mut c_void, size: usize, hook: u64, sp: u64, bp: u64) {
    if p.is_null() || !active() {
        return;
    }
    let Some(g) = Guard::enter() else { return };
    if unwind::DIRTY.load(Ordering::Relaxed) {
        unwind::refresh_if_needed(false, 0);
    }
    let t = me(&g);
    let id = if std::ptr::eq(t, SPARE.load(Ordering::Relaxed)) {
        // Shared: it has no capture state of its own to walk with.
        cut_stack(t, StackCut::ThreadExit)
    } else {
        // SAFETY: `own` is this thread's alone.
        stack_of(t, unsafe { &mut *t.own.get() }, hook, sp, bp)
    };
    let time = now_ns();
    t.begin();
    // SAFETY: between begin() and end().
    let enc = unsafe { &mut *t.enc.get() };
    enc.on_alloc(Alloc {
        addr: p as u64,
        seq: SEQ.0.load(Ordering::Acquire),
        time,
        size: size as u64,
        stack: id,
        epoch: EPOCH.load(Ordering::Relaxed),
    });
    let len = enc.buf.len();
    t.end();
    after_record(len, time);
}

/// Address classes of [`Freed`].
/// Many: a pending allocation cannot cancel once any sent free in its
/// class came after it (and after the last flush, see [`RECONCILED`]), and
/// with few classes a busy thread's sent frees raise them all within a
/// block's lifetime (1024 classes let 2% of the blocks of a ring of 4096
/// cancel, which sent the rest, which raised the classes again). 2 MiB,
/// touched where used.
const FREED_SLOTS: usize = 1 << 18;

/// Sent frees numbered below this were in a flushed batch, whose flush
/// took every pending allocation they name out of every table (see
/// [`settle_pending`]): an entry still pending cannot be stale by them.
/// Held lower, until the entries older than it are spilled, by a free no
/// record was made of ([`UNRECORDED`]).
static RECONCILED: AtomicU64 = AtomicU64::new(0);
/// The lowest number a free took without a record since the epoch in
/// [`UNRECORDED_EPOCH`] (u64::MAX: none).
static UNRECORDED: AtomicU64 = AtomicU64::new(u64::MAX);
static UNRECORDED_EPOCH: AtomicU32 = AtomicU32::new(0);

/// For each class of addresses, one more than the highest [`SEQ`] number a
/// sent FREE of an address in it took (raised before libc gets the block
/// back). A free cancels a pending allocation `a` only if its class is at
/// most `a.seq`; above, the block may have been freed by another thread
/// since (and the address handed out again, and handed back to this
/// thread): its free is then sent, not cancelled. Equal classes of other
/// addresses only make that conservative. Whoever gets the block next
/// from libc (through its arena lock) sees the raised value, so the check
/// never misses a free.
#[repr(C, align(64))]
struct Freed([AtomicU64; FREED_SLOTS]);

impl Freed {
    const fn new() -> Freed {
        Freed([const { AtomicU64::new(0) }; FREED_SLOTS])
    }

    #[inline]
    fn class(&self, addr: u64) -> &AtomicU64 {
        let bits = FREED_SLOTS.trailing_zeros();
        &self.0[((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize]
    }

    /// A free of `addr` that the collector will see (or that nobody will):
    /// takes its number from `seq` and raises the class.
    #[inline]
    fn raise(&self, seq: &AtomicU64, addr: u64) -> u64 {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        self.class(addr).fetch_max(n + 1, Ordering::Relaxed);
        n
    }
}

static FREED: Freed = Freed::new();

impl Enc {
    /// An allocation: pending, so that its free may cancel it. A full
    /// table is encoded into the buffer first (by its owner: a flush would
    /// stop every thread), and then flushes by size like any record.
    #[inline(always)]
    fn on_alloc(&mut self, a: Alloc) {
        if self.pending.full() {
            self.spill();
            self.pending.grow();
        }
        if let Some(old) = self.pending.insert(a) {
            // The old block was freed by another thread and the address
            // came back here: its record still goes out (before that free).
            self.alloc(&old);
        }
    }

    /// A free of `addr` by the owning thread. Cancels a pending allocation
    /// of it (returns None: nothing to send), or appends a FREE numbered
    /// from `seq` at time `now()` (returns that time). The hook runs the
    /// two halves itself, the second out of line.
    #[cfg(test)]
    fn on_free(
        &mut self,
        addr: u64,
        seq: &AtomicU64,
        freed: &Freed,
        now: impl FnOnce() -> u64,
    ) -> Option<u64> {
        match self.cancel_free(addr, freed) {
            Cancel::Done => None,
            c => Some(self.send_free(addr, c, seq, freed, now())),
        }
    }

    /// The first half of [`Enc::on_free`]: `Done` if the free cancelled a
    /// pending allocation (counted).
    #[inline(always)]
    fn cancel_free(&mut self, addr: u64, freed: &Freed) -> Cancel {
        let class = freed.class(addr);
        let c = self.pending.cancel(addr, |n| {
            class.load(Ordering::Relaxed) <= n.max(RECONCILED.load(Ordering::Relaxed))
        });
        if c == Cancel::Done {
            // Allocated and freed on this thread since the last flush:
            // neither record is sent.
            self.cancelled += 1;
        }
        c
    }

    /// The second half: the free is sent, after the pending allocation the
    /// check refused (freed elsewhere since, and handed back), if any.
    #[inline]
    fn send_free(
        &mut self,
        addr: u64,
        c: Cancel,
        seq: &AtomicU64,
        freed: &Freed,
        time: u64,
    ) -> u64 {
        if let Cancel::Kept(a) = c {
            self.alloc(&a);
        }
        let n = freed.raise(seq, addr);
        self.free(n, time, addr);
        self.freed.push(addr);
        time
    }
}

/// Records a free (out of line, for realloc).
#[inline(never)]
fn on_free(p: *mut c_void) {
    on_free_inline(p)
}

/// [`on_free`] inlined into `free`.
#[inline(always)]
fn on_free_inline(p: *mut c_void) {
    if p.is_null() || !active() {
        return;
    }
    let Some(g) = Guard::enter() else {
        // Not recorded (a hook interrupted by a signal handler that frees):
        // a pending allocation of this block must not be cancelled later.
        // (Lowered before the number is taken: a flush that reads SEQ
        // after it reads this low enough.)
        UNRECORDED.fetch_min(SEQ.0.load(Ordering::Relaxed), Ordering::SeqCst);
        UNRECORDED_EPOCH.store(EPOCH.load(Ordering::Relaxed), Ordering::Relaxed);
        FREED.raise(&SEQ.0, p as u64);
        return;
    };
    let t = me(&g);
    t.begin();
    // SAFETY: between begin() and end().
    let enc = unsafe { &mut *t.enc.get() };
    match enc.cancel_free(p as u64, &FREED) {
        Cancel::Done => t.end(),
        c => sent_free(t, enc, p as u64, c),
    }
}

/// [`on_free`] when the free is sent (out of line: the cancelled case is
/// the common one and wants a small frame).
#[inline(never)]
fn sent_free(t: &Thread, enc: &mut Enc, addr: u64, c: Cancel) {
    let time = enc.send_free(addr, c, &SEQ.0, &FREED, now_ns());
    let len = enc.buf.len();
    t.end();
    after_record(len, time);
}

/// Flushes everything, pending allocations included (before an exec: the
/// collector counts what the old image held when exec freed it).
fn flush_now() {
    if STATE.load(Ordering::Acquire) == ON {
        if let Some(_g) = Guard::enter() {
            SPILL_ALL.store(true, Ordering::Relaxed);
            flush_all(true);
            SPILL_ALL.store(false, Ordering::Relaxed);
        }
    }
}

/// Set while [`flush_now`] flushes.
static SPILL_ALL: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------
// The interposed API. The allocating functions are naked trampolines that
// hand the entry stack and frame pointers to their implementation (a tail
// jump, so the caller's return address stays where it is): unwinding
// starts at the caller, with no shim frames to walk through.

macro_rules! entry {
    ($(#[$m:meta])* $name:ident => $imp:ident, $sp:literal, $bp:literal) => {
        $(#[$m])*
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name() {
            std::arch::naked_asm!(
                concat!("mov ", $sp, ", rsp"),
                concat!("mov ", $bp, ", rbp"),
                "jmp {imp}",
                imp = sym $imp,
            )
        }
    };
}

entry!(
    /// malloc(3).
    malloc => malloc_imp, "rsi", "rdx"
);
unsafe extern "C" fn malloc_imp(size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::malloc(size, resolving);
    on_alloc_inline(p, size, malloc as *const () as u64, sp, bp);
    p
}

entry!(
    /// calloc(3).
    calloc => calloc_imp, "rdx", "rcx"
);
unsafe extern "C" fn calloc_imp(n: usize, size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::calloc(n, size, resolving);
    on_alloc(p, n.wrapping_mul(size), calloc as *const () as u64, sp, bp);
    p
}

entry!(
    /// realloc(3): the old block is freed and a new one allocated, even when
    /// glibc resizes in place. `realloc(NULL, n)` is `malloc(n)`;
    /// `realloc(p, 0)` frees `p` and returns NULL (glibc).
    realloc => realloc_imp, "rdx", "rcx"
);
unsafe extern "C" fn realloc_imp(p: *mut c_void, size: usize, sp: u64, bp: u64) -> *mut c_void {
    realloc_from(p, size, realloc as *const () as u64, sp, bp)
}

unsafe fn realloc_from(p: *mut c_void, size: usize, hook: u64, sp: u64, bp: u64) -> *mut c_void {
    if p.is_null() {
        let q = real::malloc(size, resolving);
        on_alloc(q, size, hook, sp, bp);
        return q;
    }
    // Record the free while `p` is still ours: once libc has it back,
    // another thread may get the same address and record it first.
    on_free(p);
    let q = real::realloc(p, size, resolving);
    if !q.is_null() {
        on_alloc(q, size, hook, sp, bp);
    } else if size != 0 {
        // Failed: `p` is still allocated (its requested size is unknown).
        on_alloc(p, malloc_usable_size(p), hook, sp, bp);
    }
    q
}

entry!(
    /// reallocarray(3).
    reallocarray => reallocarray_imp, "rcx", "r8"
);
unsafe extern "C" fn reallocarray_imp(
    p: *mut c_void,
    n: usize,
    size: usize,
    sp: u64,
    bp: u64,
) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        *libc::__errno_location() = libc::ENOMEM;
        return std::ptr::null_mut();
    };
    realloc_from(p, total, reallocarray as *const () as u64, sp, bp)
}

/// free(3).
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    on_free_inline(p);
    real::free(p, resolving);
}

entry!(
    /// posix_memalign(3).
    posix_memalign => posix_memalign_imp, "rcx", "r8"
);
unsafe extern "C" fn posix_memalign_imp(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
    sp: u64,
    bp: u64,
) -> c_int {
    let mut p = std::ptr::null_mut();
    let rc = real::posix_memalign(&mut p, align, size, resolving);
    if rc == 0 {
        *out = p;
        on_alloc(p, size, posix_memalign as *const () as u64, sp, bp);
    }
    rc
}

entry!(
    /// aligned_alloc(3) (C11).
    aligned_alloc => aligned_alloc_imp, "rdx", "rcx"
);
unsafe extern "C" fn aligned_alloc_imp(align: usize, size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::aligned_alloc(align, size, resolving);
    on_alloc(p, size, aligned_alloc as *const () as u64, sp, bp);
    p
}

entry!(
    /// memalign(3).
    memalign => memalign_imp, "rdx", "rcx"
);
unsafe extern "C" fn memalign_imp(align: usize, size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::memalign(align, size, resolving);
    on_alloc(p, size, memalign as *const () as u64, sp, bp);
    p
}

entry!(
    /// valloc(3).
    valloc => valloc_imp, "rsi", "rdx"
);
unsafe extern "C" fn valloc_imp(size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::valloc(size, resolving);
    on_alloc(p, size, valloc as *const () as u64, sp, bp);
    p
}

entry!(
    /// pvalloc(3).
    pvalloc => pvalloc_imp, "rsi", "rdx"
);
unsafe extern "C" fn pvalloc_imp(size: usize, sp: u64, bp: u64) -> *mut c_void {
    let p = real::pvalloc(size, resolving);
    on_alloc(p, size, pvalloc as *const () as u64, sp, bp);
    p
}

// ---------------------------------------------------------------------------
// Loader and exec: keep the module list fresh, flush before the image goes.

/// The next definition of `name` after the shim (glibc's), cached in `slot`.
unsafe fn next(slot: &AtomicUsize, name: &CStr) -> usize {
    let f = slot.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    let f = internal(|| libc::dlsym(libc::RTLD_NEXT, name.as_ptr())) as usize;
    slot.store(f, Ordering::Relaxed);
    f
}

macro_rules! forward {
    ($slot:ident, $name:literal, fn($($a:ident: $t:ty),*) -> $r:ty, $fail:expr) => {{
        static $slot: AtomicUsize = AtomicUsize::new(0);
        let f = next(&$slot, $name);
        if f == 0 {
            *libc::__errno_location() = libc::ENOSYS;
            return $fail;
        }
        let f: unsafe extern "C" fn($($t),*) -> $r = std::mem::transmute(f);
        f($($a),*)
    }};
}

/// dlopen(3): the new module is unwound and announced from the next
/// allocation on.
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    let h = forward!(
        DLOPEN,
        c"dlopen",
        fn(file: *const c_char, mode: c_int) -> *mut c_void,
        std::ptr::null_mut()
    );
    unwind::DIRTY.store(true, Ordering::Release);
    h
}

/// dlclose(3): the snapshot must stop using the module's memory.
#[no_mangle]
pub unsafe extern "C" fn dlclose(h: *mut c_void) -> c_int {
    let r = forward!(DLCLOSE, c"dlclose", fn(h: *mut c_void) -> c_int, -1);
    unwind::DIRTY.store(true, Ordering::Release);
    r
}

type Argv = *const *const c_char;

/// execve(2): flush first; exec discards the buffer.
#[no_mangle]
pub unsafe extern "C" fn execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int {
    flush_now();
    forward!(
        EXECVE,
        c"execve",
        fn(path: *const c_char, argv: Argv, envp: Argv) -> c_int,
        -1
    )
}

/// execv(3).
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: Argv) -> c_int {
    flush_now();
    forward!(
        EXECV,
        c"execv",
        fn(path: *const c_char, argv: Argv) -> c_int,
        -1
    )
}

/// execvp(3).
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: Argv) -> c_int {
    flush_now();
    forward!(
        EXECVP,
        c"execvp",
        fn(file: *const c_char, argv: Argv) -> c_int,
        -1
    )
}

/// execvpe(3).
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int {
    flush_now();
    forward!(
        EXECVPE,
        c"execvpe",
        fn(file: *const c_char, argv: Argv, envp: Argv) -> c_int,
        -1
    )
}

// execl(3), execlp(3), execle(3): glibc's versions call __execve past the
// PLT, so the hooks above would miss them and the records buffered for the
// old image would be lost. Stable Rust cannot define C-variadic functions,
// so these naked trampolines spill the five register arguments after
// `path` and hand them, with a pointer to the stack arguments, to a Rust
// function that rebuilds argv and calls the hooked execv/execvp/execve.

const EXECL: u32 = 0;
const EXECLP: u32 = 1;
const EXECLE: u32 = 2;

/// Most arguments an execl-style call may pass (glibc has no limit; a
/// fixed array keeps this heap-free, which matters after vfork).
const MAX_EXEC_ARGS: usize = 4096;

unsafe extern "C" fn execl_common(
    path: *const c_char,
    regs: *const *const c_char,
    stack: *const *const c_char,
    kind: u32,
) -> c_int {
    let mut argv = [std::ptr::null::<c_char>(); MAX_EXEC_ARGS];
    let arg = |i: usize| {
        if i < 5 {
            *regs.add(i)
        } else {
            *stack.add(i - 5)
        }
    };
    let mut n = 0;
    loop {
        if n == MAX_EXEC_ARGS {
            *libc::__errno_location() = libc::E2BIG;
            return -1;
        }
        argv[n] = arg(n);
        if argv[n].is_null() {
            break;
        }
        n += 1;
    }
    match kind {
        EXECLP => execvp(path, argv.as_ptr()),
        EXECLE => execve(path, argv.as_ptr(), arg(n + 1) as Argv),
        _ => execv(path, argv.as_ptr()),
    }
}

macro_rules! execl_trampoline {
    ($(#[$m:meta])* $name:ident, $kind:expr) => {
        $(#[$m])*
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name() {
            // At entry rsp = 8 (mod 16); 56 bytes keep the call aligned.
            std::arch::naked_asm!(
                "sub rsp, 56",
                "mov [rsp], rsi",
                "mov [rsp + 8], rdx",
                "mov [rsp + 16], rcx",
                "mov [rsp + 24], r8",
                "mov [rsp + 32], r9",
                "mov rsi, rsp",
                "lea rdx, [rsp + 64]",
                "mov ecx, {kind}",
                "call {common}",
                "add rsp, 56",
                "ret",
                kind = const $kind,
                common = sym execl_common,
            )
        }
    };
}

execl_trampoline!(
    /// execl(3), `(path, arg0, ..., NULL)`.
    execl,
    EXECL
);
execl_trampoline!(
    /// execlp(3), `(file, arg0, ..., NULL)`.
    execlp,
    EXECLP
);
execl_trampoline!(
    /// execle(3), `(path, arg0, ..., NULL, envp)`.
    execle,
    EXECLE
);

/// dladdr1(3): return the matching symbol's table entry.
const RTLD_DL_SYMENT: c_int = 1;

#[cfg(target_pointer_width = "64")]
type ElfSym = libc::Elf64_Sym;
#[cfg(target_pointer_width = "32")]
type ElfSym = libc::Elf32_Sym;

/// Whether `f`, what `dlsym(RTLD_DEFAULT, "malloc")` found in the object
/// `info` names, is a definition of `malloc` there (`sym`: its symbol
/// entry from dladdr1). A non-PIE executable that takes malloc's address
/// holds an *undefined* `malloc` whose value is the address of its PLT
/// stub (a canonical PLT entry, which keeps function pointers equal
/// across objects), and glibc's lookup returns that stub (do_lookup_x
/// skips undefined symbols only when their value is 0): Debian's python3
/// is such an executable. The stub jumps to the shim's malloc, so it is
/// no reason for a note (issue 10). Only a defined function symbol named
/// `malloc` that starts at `f` is.
fn defines_malloc(f: *mut c_void, info: &libc::Dl_info, sym: *const ElfSym) -> bool {
    const SHN_UNDEF: u16 = 0;
    const STT_FUNC: u8 = 2;
    const STT_GNU_IFUNC: u8 = 10;
    if sym.is_null() || info.dli_sname.is_null() || info.dli_saddr != f {
        return false;
    }
    // SAFETY: dladdr1 set `sym` to an entry of the object's symbol table
    // and `dli_sname` to a NUL-terminated name in its string table.
    let (sym, name) = unsafe { (&*sym, CStr::from_ptr(info.dli_sname)) };
    name.to_bytes() == b"malloc"
        && sym.st_shndx != SHN_UNDEF
        && sym.st_value != 0
        && matches!(sym.st_info & 0xf, STT_FUNC | STT_GNU_IFUNC)
}

#[cfg(test)]
mod tests {
    //! The recording rules, with two or three `Enc`s standing for threads
    //! and a model collector: decode, sort by (number, FREE after ALLOC),
    //! keep a table of live blocks.

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Rec {
        Alloc { seq: u64, addr: u64, size: u64 },
        Free { seq: u64, addr: u64 },
    }

    fn var(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    fn unzigzag(z: u64) -> u64 {
        (z >> 1) ^ (z & 1).wrapping_neg()
    }

    /// A flush of one thread: its pending allocations encoded, its buffer
    /// taken and decoded.
    fn flush(enc: &mut Enc) -> Vec<Rec> {
        enc.spill();
        flush_buf(enc)
    }

    /// The records in a thread's buffer, which is emptied.
    fn flush_buf(enc: &mut Enc) -> Vec<Rec> {
        let b = enc.buf.as_slice().to_vec();
        enc.buf.clear();
        let (mut i, mut seq, mut addr) = (0, 0u64, 0u64);
        let mut out = Vec::new();
        while i < b.len() {
            let tag = b[i];
            i += 1;
            seq = seq.wrapping_add(unzigzag(var(&b, &mut i)));
            let _time = var(&b, &mut i);
            addr = addr.wrapping_add(unzigzag(var(&b, &mut i)));
            out.push(match tag {
                T_ALLOC => {
                    let size = var(&b, &mut i);
                    let _stack = var(&b, &mut i);
                    Rec::Alloc { seq, addr, size }
                }
                T_FREE => Rec::Free { seq, addr },
                t => panic!("unexpected tag {t}"),
            });
        }
        out
    }

    /// The collector: each batch sorted, applied in order.
    fn live(batches: &[Vec<Rec>]) -> Vec<(u64, u64)> {
        let mut live = std::collections::BTreeMap::new();
        for batch in batches {
            let mut b = batch.clone();
            b.sort_by_key(|r| match *r {
                Rec::Alloc { seq, .. } => (seq, false),
                Rec::Free { seq, .. } => (seq, true),
            });
            for r in b {
                match r {
                    Rec::Alloc { addr, size, .. } => {
                        live.insert(addr, size);
                    }
                    Rec::Free { addr, .. } => {
                        live.remove(&addr);
                    }
                }
            }
        }
        live.into_iter().collect()
    }

    /// A program's view: allocation numbers come from `seq` as the shim
    /// reads them, after libc returned the block.
    struct World {
        seq: AtomicU64,
        freed: Box<Freed>,
    }

    impl World {
        fn new() -> World {
            World {
                seq: AtomicU64::new(1),
                // 2 MiB: zeroed on the heap, not built on the stack.
                // SAFETY: all-zero bytes are a valid `Freed` (atomics).
                freed: unsafe {
                    let l = std::alloc::Layout::new::<Freed>();
                    Box::from_raw(std::alloc::alloc_zeroed(l) as *mut Freed)
                },
            }
        }
        fn alloc(&self, t: &mut Enc, addr: u64, size: u64) {
            t.on_alloc(Alloc {
                addr,
                seq: self.seq.load(Ordering::Acquire),
                time: 1,
                size,
                stack: 1,
                epoch: 0,
            });
        }
        /// Whether the free was sent.
        fn free(&self, t: &mut Enc, addr: u64) -> bool {
            t.on_free(addr, &self.seq, &self.freed, || 2).is_some()
        }
    }

    #[test]
    fn alloc_and_free_on_one_thread_cancel() {
        let w = World::new();
        let mut a = Enc::on_heap();
        w.alloc(&mut a, 0x1000, 16);
        w.alloc(&mut a, 0x2000, 32);
        assert!(!w.free(&mut a, 0x1000));
        assert_eq!(a.cancelled, 1);
        // No shared number taken for it.
        assert_eq!(w.seq.load(Ordering::Relaxed), 1);
        let batch = flush(&mut a);
        assert_eq!(
            batch,
            [Rec::Alloc {
                seq: 1,
                addr: 0x2000,
                size: 32
            }]
        );
        assert_eq!(live(&[batch]), [(0x2000, 32)]);
    }

    #[test]
    fn free_of_a_sent_block_is_sent_after_its_allocation() {
        let w = World::new();
        let mut a = Enc::on_heap();
        w.alloc(&mut a, 0x1000, 16);
        let first = flush(&mut a);
        assert!(w.free(&mut a, 0x1000));
        // The same address again, freed again: cancelled this time.
        w.alloc(&mut a, 0x1000, 24);
        assert!(!w.free(&mut a, 0x1000));
        let second = flush(&mut a);
        let (Rec::Alloc { seq: s1, .. }, [Rec::Free { seq: s2, addr }]) =
            (first[0], second.as_slice())
        else {
            panic!("{first:?} {second:?}");
        };
        assert!(*s2 >= s1 && *addr == 0x1000);
        assert!(live(&[first, second]).is_empty());
    }

    /// A allocates p; B frees it (libc hands p to B's next malloc); B
    /// allocates p and hands it back; A frees it. A's pending entry for p
    /// is stale: cancelling it would leave B's allocation as a false leak.
    #[test]
    fn cross_thread_free_and_reuse_never_cancel_a_stale_entry() {
        let w = World::new();
        let (mut a, mut b) = (Enc::on_heap(), Enc::on_heap());
        w.alloc(&mut a, 0x1000, 16);
        assert!(w.free(&mut b, 0x1000), "B never allocated p: sent");
        w.alloc(&mut b, 0x1000, 48);
        assert!(w.free(&mut a, 0x1000), "A's entry is stale: sent");
        assert_eq!(a.cancelled + b.cancelled, 0);
        let batch: Vec<Rec> = [flush(&mut a), flush(&mut b)].concat();
        assert_eq!(batch.len(), 4, "{batch:?}");
        assert!(live(&[batch]).is_empty());
    }

    /// The address comes back to the allocating thread itself after
    /// another thread freed it: the old entry is sent, the new one may
    /// still cancel.
    #[test]
    fn address_back_on_the_allocating_thread() {
        let w = World::new();
        let (mut a, mut b) = (Enc::on_heap(), Enc::on_heap());
        w.alloc(&mut a, 0x1000, 16);
        assert!(w.free(&mut b, 0x1000));
        w.alloc(&mut a, 0x1000, 32);
        assert!(!w.free(&mut a, 0x1000));
        w.alloc(&mut a, 0x1000, 64);
        let batch: Vec<Rec> = [flush(&mut a), flush(&mut b)].concat();
        assert_eq!(live(&[batch]), [(0x1000, 64)]);
    }

    /// realloc(p, n) is a free of p then an allocation of q.
    #[test]
    fn realloc_moving_a_block() {
        let w = World::new();
        let mut a = Enc::on_heap();
        // Pending block moved: only the new one is ever sent.
        w.alloc(&mut a, 0x1000, 16);
        assert!(!w.free(&mut a, 0x1000));
        w.alloc(&mut a, 0x2000, 64);
        let first = flush(&mut a);
        assert_eq!(
            first,
            [Rec::Alloc {
                seq: 1,
                addr: 0x2000,
                size: 64
            }]
        );
        // A sent block moved: its free is sent, the new block pending.
        assert!(w.free(&mut a, 0x2000));
        w.alloc(&mut a, 0x3000, 128);
        let second = flush(&mut a);
        assert_eq!(second.len(), 2, "{second:?}");
        assert_eq!(live(&[first, second]), [(0x3000, 128)]);
    }

    /// Entries that lived through a whole epoch are encoded at a flush;
    /// younger ones stay pending, cancellable.
    #[test]
    fn old_entries_are_spilled_young_ones_stay() {
        let w = World::new();
        let mut a = Enc::on_heap();
        for (i, epoch) in [(1u64, 0u32), (2, 0), (3, 1), (4, 2)] {
            a.on_alloc(Alloc {
                addr: i * 16,
                seq: w.seq.load(Ordering::Acquire),
                time: 1,
                size: 8,
                stack: 1,
                epoch,
            });
        }
        a.spill_old(1);
        let sent = flush_buf(&mut a);
        let mut sent = sent;
        sent.sort_by_key(|r| match *r {
            Rec::Alloc { addr, .. } | Rec::Free { addr, .. } => addr,
        });
        assert_eq!(
            sent,
            [
                Rec::Alloc {
                    seq: 1,
                    addr: 16,
                    size: 8
                },
                Rec::Alloc {
                    seq: 1,
                    addr: 32,
                    size: 8
                }
            ]
        );
        assert_eq!(a.pending.len(), 2);
    }

    /// A full table is encoded into the thread's buffer: those allocations
    /// are no longer cancellable and their frees are sent; nothing is lost.
    #[test]
    fn a_full_table_is_encoded_by_its_owner() {
        let w = World::new();
        let mut a = Enc::on_heap();
        let n = pending::FIRST as u64 / 2 + 10;
        for i in 1..=n {
            w.alloc(&mut a, i * 16, 8);
        }
        assert_eq!(a.pending.len(), 10);
        // Newest first: the pending ones cancel (before any sent free could
        // make their address classes look freed elsewhere).
        for i in (1..=n).rev() {
            w.free(&mut a, i * 16);
        }
        assert_eq!(a.cancelled, 10);
        let batch = flush(&mut a);
        assert_eq!(
            batch.len(),
            pending::FIRST,
            "encoded allocations and their frees"
        );
        assert!(live(&[batch]).is_empty());
    }
}
