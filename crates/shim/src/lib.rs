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
//! - The real allocator is glibc's exported `__libc_malloc`, `__libc_calloc`,
//!   `__libc_realloc`, `__libc_free`, `__libc_memalign`, `__libc_valloc`,
//!   `__libc_pvalloc`; the shim's own Rust heap uses them too (a
//!   `#[global_allocator]`), so no hook ever calls back into a hook.
//! - A const thread-local flag guards against reentrancy (a signal handler
//!   allocating inside a hook): nested calls are passed through untracked
//!   and counted in a `LOST` record.
//! - Stacks are unwound in process by framehop over the `.eh_frame` of each
//!   module `dl_iterate_phdr(3)` lists, read in place, so code built
//!   without frame pointers (libc, `-fomit-frame-pointer` programs) unwinds
//!   correctly. The module list is rebuilt after dlopen/dlclose and when a
//!   frame falls outside every known module while the loader's counters moved.
//! - Stacks are deduplicated by a 64-bit hash of their addresses into small
//!   per-process ids; records go to one process-wide buffer under a mutex,
//!   which keeps the order of frees and allocations of one address across
//!   threads (a free is recorded before the block is handed back to libc,
//!   an allocation after libc returned it). The buffer is flushed at 64 KiB,
//!   10 ms after the previous flush, before exec, and at exit (from then on
//!   every record is sent at once).
//! - At init the shim connects to `$LEAKSCOPE_SHIM_SOCK` and moves the fd
//!   to 1000 or above with `F_DUPFD_CLOEXEC`, so the program's fd numbers are
//!   untouched and exec closes it. `LD_PRELOAD` and `LEAKSCOPE_SHIM_SOCK`
//!   stay in the environment, so exec'd children are traced too. A
//!   `pthread_atfork` child handler connects afresh, so parent and child
//!   never share a stream.
//! - If the collector goes away (`send` fails; `MSG_NOSIGNAL`, so no
//!   SIGPIPE) the shim prints one line to stderr and stops tracking.
//!
//! # Wire format (version 1)
//! A stream of records, all integers little-endian, no padding. Each record
//! is a tag byte followed by its body:
//!
//! | tag | record | body |
//! |-----|--------|------|
//! | 1 | HELLO | `version:u16 kind:u8 pid:u32 ppid:u32 time:u64 len:u16 exe:[u8; len]`; kind 0: a new image (start or exec), 1: a fork child |
//! | 2 | ALLOC | `time:u64 tid:u32 addr:u64 size:u64 stack:u32` |
//! | 3 | FREE | `time:u64 addr:u64` |
//! | 4 | STACK | `id:u32 n:u16 addrs:[u64; n]`: `addrs[0]` is the address of the interposed function (stands for the ip), the rest are return addresses, innermost first |
//! | 5 | MAP | `time:u64 start:u64 end:u64 offset:u64 len:u16 path:[u8; len]`: an executable PT_LOAD, page-aligned |
//! | 6 | LOST | `count:u64`: events not recorded since the last LOST |
//!
//! HELLO comes first on every connection. A STACK comes before the first
//! ALLOC that names its id; id 0 means "no stack could be taken" (signal
//! stack, thread teardown). Times are `CLOCK_MONOTONIC` nanoseconds.
//!
//! It does not:
//! - track fds, mmap or sbrk (glibc-internal fd calls bypass PLT hooks);
//! - catch allocators that do not go through malloc (jemalloc linked in,
//!   raw `mmap`), nor processes that `_exit` or die by a signal with records
//!   still buffered (at most 10 ms or 64 KiB of them);
//! - follow children made by a raw `clone(2)` without `fork` (they would
//!   share the parent's connection), or flush before `fexecve` (records
//!   buffered then are lost; `execve`, `execv`, `execvp`, `execvpe` and the
//!   `execl*` family are hooked and flush);
//! - run on anything but x86_64 Linux with glibc.
#![deny(missing_docs)]
// The exported functions are C entry points; their safety contracts are
// their man pages (malloc(3), execve(2), ...).
#![allow(clippy::missing_safety_doc)]

mod unwind;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use unwind::MAX_FRAMES;

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_valloc(size: usize) -> *mut c_void;
    fn __libc_pvalloc(size: usize) -> *mut c_void;
    fn malloc_usable_size(p: *mut c_void) -> usize;
}

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

const VERSION: u16 = 1;
const T_HELLO: u8 = 1;
const T_ALLOC: u8 = 2;
const T_FREE: u8 = 3;
const T_STACK: u8 = 4;
const T_MAP: u8 = 5;
const T_LOST: u8 = 6;

const FLUSH_BYTES: usize = 64 * 1024;
const FLUSH_NS: u64 = 10_000_000;
const HIGH_FD: c_int = 1000;

// ---------------------------------------------------------------------------
// Per-thread state: plain const TLS (no destructor, so no lazy registration
// that would allocate).

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    /// Set around shim-internal calls into libc that may allocate: those
    /// allocations are ours, not lost program events.
    static INTERNAL: Cell<bool> = const { Cell::new(false) };
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// Holds the reentrancy flag for the current thread.
struct Guard;

impl Guard {
    fn enter() -> Option<Guard> {
        let was = IN_HOOK.try_with(|f| f.replace(true)).unwrap_or(true);
        if was {
            if !INTERNAL.try_with(|f| f.get()).unwrap_or(false) {
                LOST.fetch_add(1, Ordering::Relaxed);
            }
            None
        } else {
            Some(Guard)
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = IN_HOOK.try_with(|f| f.set(false));
    }
}

/// Runs `f` marked as shim-internal (nested allocations are not "lost").
fn internal<R>(f: impl FnOnce() -> R) -> R {
    let was = INTERNAL.with(|i| i.replace(true));
    let r = f();
    INTERNAL.with(|i| i.set(was));
    r
}

fn tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        // SAFETY: gettid(2) has no failure mode.
        let v = unsafe { libc::gettid() } as u32;
        t.set(v);
        v
    })
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------
// Process-wide state.

const UNINIT: u8 = 0;
const INITING: u8 = 1;
const ON: u8 = 2;
const OFF: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static LOST: AtomicU64 = AtomicU64::new(0);

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

struct State {
    fd: c_int,
    sock: libc::sockaddr_un,
    buf: Vec<u8>,
    stacks: HashMap<u64, u32, BuildHasherDefault<Id>>,
    next_stack: u32,
    /// Mappings already announced: (start, end, offset, path).
    maps: Vec<(u64, u64, u64, String)>,
    last_flush: u64,
    unbuffered: bool,
}

/// A spin-then-yield lock. Critical sections are a few dozen ns (append a
/// record), so a futex mutex mostly paid for sleeping and waking (measured:
/// ~25% of the traced run's CPU in futex calls on the 2-thread storm).
struct SpinLock(AtomicBool);

impl SpinLock {
    fn lock(&self) {
        let mut spins = 0u32;
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                // The holder may be preempted: let it run.
                // SAFETY: plain syscall.
                unsafe { libc::sched_yield() };
            }
        }
    }
    fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

struct Global {
    lock: SpinLock,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only touched with `lock` held.
unsafe impl Sync for Global {}

static G: Global = Global {
    lock: SpinLock(AtomicBool::new(false)),
    state: UnsafeCell::new(None),
};

/// Runs `f` on the state with the global lock held.
fn locked<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    G.lock.lock();
    // SAFETY: `state` is only reached with the lock held (here and in the
    // fork handlers).
    let r = unsafe { (*G.state.get()).as_mut().map(f) };
    G.lock.unlock();
    r
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_u16(b, s.len() as u16);
    b.extend_from_slice(s);
}

impl State {
    fn hello(&mut self, kind: u8) {
        let exe = std::fs::read_link("/proc/self/exe")
            .ok()
            .and_then(|p| p.into_os_string().into_string().ok())
            .unwrap_or_default();
        let b = &mut self.buf;
        b.push(T_HELLO);
        put_u16(b, VERSION);
        b.push(kind);
        // SAFETY: getpid/getppid cannot fail.
        put_u32(b, unsafe { libc::getpid() } as u32);
        put_u32(b, unsafe { libc::getppid() } as u32);
        put_u64(b, now_ns());
        put_str(b, &exe);
    }

    fn map(&mut self, time: u64, m: &(u64, u64, u64, String)) {
        let b = &mut self.buf;
        b.push(T_MAP);
        put_u64(b, time);
        put_u64(b, m.0);
        put_u64(b, m.1);
        put_u64(b, m.2);
        put_str(b, &m.3);
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

    fn stack_id(&mut self, frames: &[u64]) -> u32 {
        if frames.is_empty() {
            return 0;
        }
        let mut h: u64 = frames.len() as u64;
        for &a in frames {
            h = (h.rotate_left(5) ^ a).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        if let Some(&id) = self.stacks.get(&h) {
            return id;
        }
        self.next_stack += 1;
        let id = self.next_stack;
        self.stacks.insert(h, id);
        let b = &mut self.buf;
        b.push(T_STACK);
        put_u32(b, id);
        put_u16(b, frames.len() as u16);
        for &a in frames {
            put_u64(b, a);
        }
        id
    }

    fn after_record(&mut self, now: u64) {
        if self.unbuffered
            || self.buf.len() >= FLUSH_BYTES
            || now.saturating_sub(self.last_flush) >= FLUSH_NS
        {
            self.flush(now);
        }
    }

    fn flush(&mut self, now: u64) {
        self.last_flush = now;
        let lost = LOST.swap(0, Ordering::Relaxed);
        if lost > 0 {
            self.buf.push(T_LOST);
            put_u64(&mut self.buf, lost);
        }
        let mut off = 0;
        while off < self.buf.len() {
            // SAFETY: sending from our own buffer; MSG_NOSIGNAL: no SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.fd,
                    self.buf[off..].as_ptr() as *const c_void,
                    self.buf.len() - off,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.stop(&err);
                return;
            }
            off += n as usize;
        }
        self.buf.clear();
    }

    fn stop(&mut self, err: &std::io::Error) {
        STATE.store(OFF, Ordering::Relaxed);
        self.buf = Vec::new();
        let msg = format!("leakscope-shim: collector gone ({err}); heap tracking stopped\n");
        // SAFETY: writing our own bytes to stderr; failure is ignored.
        unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
        self.fd = -1;
    }
}

/// Connects to the collector; returns an fd >= HIGH_FD, CLOEXEC.
fn connect(sock: &libc::sockaddr_un) -> Option<c_int> {
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
        (high >= 0).then_some(high)
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
        let Some(fd) = connect(&sock) else {
            let msg = b"leakscope-shim: cannot connect to the collector; heap tracking off\n";
            // SAFETY: writing our own bytes to stderr.
            unsafe { libc::write(2, msg.as_ptr() as *const c_void, msg.len()) };
            return false;
        };
        unwind::init_cache_key();
        let mut st = State {
            fd,
            sock,
            buf: Vec::with_capacity(FLUSH_BYTES + 4096),
            stacks: HashMap::default(),
            next_stack: 0,
            maps: Vec::new(),
            last_flush: now_ns(),
            unbuffered: false,
        };
        st.hello(0);
        // SAFETY: state is only reached under the lock, which nobody else
        // can take yet in a meaningful way (STATE is INITING: hooks pass
        // through).
        G.lock.lock();
        unsafe { *G.state.get() = Some(st) };
        G.lock.unlock();
        // SAFETY: registers our handlers once.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
        refresh_modules();
        locked(|s| s.flush(now_ns()));
        true
    });
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
}

unsafe extern "C" fn fork_prepare() {
    G.lock.lock();
}

unsafe extern "C" fn fork_parent() {
    G.lock.unlock();
}

unsafe extern "C" fn fork_child() {
    // Only this thread exists now; its tid changed.
    let _ = TID.try_with(|t| t.set(0));
    if let Some(st) = (*G.state.get()).as_mut() {
        if STATE.load(Ordering::Relaxed) == ON {
            // The parent's buffered records are the parent's to send.
            st.buf.clear();
            st.stacks.clear();
            st.next_stack = 0;
            let old = st.fd;
            match connect(&st.sock) {
                Some(fd) => {
                    // Replace the inherited connection at the same number.
                    libc::dup3(fd, old, libc::O_CLOEXEC);
                    libc::close(fd);
                    st.hello(1);
                    let maps = std::mem::take(&mut st.maps);
                    let t = now_ns();
                    for m in &maps {
                        st.map(t, m);
                    }
                    st.maps = maps;
                    st.flush(now_ns());
                }
                None => {
                    libc::close(old);
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
            // Later destructors may still allocate and free: send those at once.
            locked(|s| {
                s.unbuffered = true;
                s.flush(now_ns());
            });
        }
    }
    dtor
};

// ---------------------------------------------------------------------------
// Recording.

#[inline]
fn active() -> bool {
    match STATE.load(Ordering::Acquire) {
        ON => true,
        UNINIT => {
            init();
            STATE.load(Ordering::Acquire) == ON
        }
        INITING => {
            // Another thread is initializing (the initializing thread itself
            // holds the guard: its libc calls allocate for us, not the program).
            if !IN_HOOK.try_with(|f| f.get()).unwrap_or(true) {
                LOST.fetch_add(1, Ordering::Relaxed);
            }
            false
        }
        _ => false,
    }
}

#[inline(never)]
fn on_alloc(p: *mut c_void, size: usize, hook: u64) {
    if p.is_null() || !active() {
        return;
    }
    let Some(_g) = Guard::enter() else { return };
    let mut frames = [0u64; MAX_FRAMES];
    if unwind::DIRTY.load(Ordering::Relaxed) {
        unwind::refresh_if_needed(false, 0);
    }
    let (mut n, uncovered) = unwind::capture_stack(hook, &mut frames);
    if uncovered && unwind::refresh_if_needed(true, now_ns()) {
        n = unwind::capture_stack(hook, &mut frames).0;
    }
    let time = now_ns();
    let tid = tid();
    locked(|s| {
        if STATE.load(Ordering::Relaxed) != ON {
            return;
        }
        let id = s.stack_id(&frames[..n]);
        let b = &mut s.buf;
        b.push(T_ALLOC);
        put_u64(b, time);
        put_u32(b, tid);
        put_u64(b, p as u64);
        put_u64(b, size as u64);
        put_u32(b, id);
        s.after_record(time);
    });
}

#[inline(never)]
fn on_free(p: *mut c_void) {
    if p.is_null() || !active() {
        return;
    }
    let Some(_g) = Guard::enter() else { return };
    let time = now_ns();
    locked(|s| {
        if STATE.load(Ordering::Relaxed) != ON {
            return;
        }
        let b = &mut s.buf;
        b.push(T_FREE);
        put_u64(b, time);
        put_u64(b, p as u64);
        s.after_record(time);
    });
}

fn flush_now() {
    if STATE.load(Ordering::Acquire) == ON {
        if let Some(_g) = Guard::enter() {
            locked(|s| s.flush(now_ns()));
        }
    }
}

// ---------------------------------------------------------------------------
// The interposed API.

/// malloc(3).
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    let p = __libc_malloc(size);
    on_alloc(p, size, malloc as *const () as u64);
    p
}

/// calloc(3).
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let p = __libc_calloc(n, size);
    on_alloc(p, n.wrapping_mul(size), calloc as *const () as u64);
    p
}

/// realloc(3): the old block is freed and a new one allocated, even when
/// glibc resizes in place. `realloc(NULL, n)` is `malloc(n)`;
/// `realloc(p, 0)` frees `p` and returns NULL (glibc).
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    realloc_from(p, size, realloc as *const () as u64)
}

unsafe fn realloc_from(p: *mut c_void, size: usize, hook: u64) -> *mut c_void {
    if p.is_null() {
        let q = __libc_malloc(size);
        on_alloc(q, size, hook);
        return q;
    }
    // Record the free while `p` is still ours: once libc has it back,
    // another thread may get the same address and record it first.
    on_free(p);
    let q = __libc_realloc(p, size);
    if !q.is_null() {
        on_alloc(q, size, hook);
    } else if size != 0 {
        // Failed: `p` is still allocated (its requested size is unknown).
        on_alloc(p, malloc_usable_size(p), hook);
    }
    q
}

/// reallocarray(3).
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        *libc::__errno_location() = libc::ENOMEM;
        return std::ptr::null_mut();
    };
    realloc_from(p, total, reallocarray as *const () as u64)
}

/// free(3).
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    on_free(p);
    __libc_free(p);
}

/// posix_memalign(3).
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let p = __libc_memalign(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    *out = p;
    on_alloc(p, size, posix_memalign as *const () as u64);
    0
}

/// aligned_alloc(3) (C11): glibc 2.38 rejects alignments that are not a
/// power of two; so do we.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        *libc::__errno_location() = libc::EINVAL;
        return std::ptr::null_mut();
    }
    let p = __libc_memalign(align, size);
    on_alloc(p, size, aligned_alloc as *const () as u64);
    p
}

/// memalign(3).
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    let p = __libc_memalign(align, size);
    on_alloc(p, size, memalign as *const () as u64);
    p
}

/// valloc(3).
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    let p = __libc_valloc(size);
    on_alloc(p, size, valloc as *const () as u64);
    p
}

/// pvalloc(3).
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let p = __libc_pvalloc(size);
    on_alloc(p, size, pvalloc as *const () as u64);
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
