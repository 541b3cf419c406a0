//! The journal: where every record lives until the collector has it (see
//! `leakscope_event::wire::J_MAGIC` for the layout).
//!
//! A memfd mapped shared, passed to the collector with the HELLO and then
//! closed here, so the program can close every fd it has without cutting
//! it off. The outbox (the stream's unsent tail), each recorder's encoded
//! records and its pending table are in it, each with a committed length
//! or key written after the bytes it covers: when the process dies, by
//! `_exit`, a signal or SIGKILL, the collector reads what was committed
//! and not delivered. Stores into it are plain (x86_64 keeps stores in
//! program order; a compiler fence keeps the compiler from reordering the
//! ones that matter), and nobody reads it while the process runs.
//!
//! Without a journal (memfd_create refused, or more threads at once than
//! it has slots) buffers live on the shim's heap, as before, and what they
//! hold dies with the process; the header counts such recorders.

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use leakscope_event::wire::{
    slot_size, J_BUF_CAP, J_HEADER, J_MAGIC, J_MAGIC_OFF, J_OUT_CAP, J_SLOTS, J_SLOT_CAP, S_HEADER,
    S_LEN, S_TID,
};

/// Outbox capacity: a flush moves one recorder at a time into it and sends
/// what it holds when the next one does not fit.
pub const OUT_CAP: usize = 2 << 20;
/// A recorder's record capacity: it flushes at 32 KiB and waits for the
/// flush at 512 KiB; the rest holds a spill of its full table.
pub const BUF_CAP: usize = 8 << 20;
/// Recorders with a slot: threads alive at once (recorders are reused).
pub const SLOT_CAP: usize = 1024;

const SIZE: usize = J_HEADER + OUT_CAP + SLOT_CAP * slot_size(BUF_CAP);

/// The mapping's base; null: no journal.
static BASE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// A header word.
pub fn word(off: usize) -> Option<&'static AtomicU64> {
    let b = BASE.load(Ordering::Relaxed);
    // SAFETY: the header is mapped for the life of the process, and `off`
    // is one of the 8-aligned `J_*` offsets inside it.
    (!b.is_null()).then(|| unsafe { &*(b.add(off) as *const AtomicU64) })
}

fn memfd() -> Option<libc::c_int> {
    // SAFETY: a NUL-terminated name; the fd is the caller's.
    let fd = unsafe { libc::memfd_create(c"leakscope-journal".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: our fd.
    if unsafe { libc::ftruncate(fd, SIZE as libc::off_t) } != 0 {
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        return None;
    }
    Some(fd)
}

/// Maps `fd` at `at` (null: anywhere).
fn map(fd: libc::c_int, at: *mut u8) -> Option<*mut u8> {
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: a shared mapping of our memfd; MAP_FIXED only replaces the
    // journal's own old mapping (a fork child's).
    let p = unsafe {
        libc::mmap(
            at as *mut c_void,
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE | fixed,
            fd,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

fn init_header(base: *mut u8) {
    // SAFETY: the header page of a fresh (zeroed) mapping.
    unsafe {
        let w = |off: usize, v: u64| *(base.add(off) as *mut u64) = v;
        w(J_OUT_CAP, OUT_CAP as u64);
        w(J_BUF_CAP, BUF_CAP as u64);
        w(J_SLOT_CAP, SLOT_CAP as u64);
        std::sync::atomic::compiler_fence(Ordering::Release);
        w(J_MAGIC_OFF, J_MAGIC);
    }
}

/// Creates the journal; returns the memfd to hand to the collector (the
/// caller closes it).
pub fn create() -> Option<libc::c_int> {
    let fd = memfd()?;
    let Some(base) = map(fd, std::ptr::null_mut()) else {
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        return None;
    };
    init_header(base);
    BASE.store(base, Ordering::Release);
    Some(fd)
}

/// In a fork child: the inherited mapping is the parent's journal, shared
/// with it. Replaces it at the same address with a fresh one (every slot
/// empty, the same slots in use) and returns its memfd; None: no journal
/// here any more (the old mapping is dropped, recorders are not used
/// until their buffers are rebound).
pub fn renew() -> Option<libc::c_int> {
    let base = BASE.load(Ordering::Relaxed);
    if base.is_null() {
        return None;
    }
    let slots = word(J_SLOTS).map_or(0, |w| w.load(Ordering::Relaxed));
    let fresh = memfd().and_then(|fd| match map(fd, base) {
        Some(_) => Some(fd),
        None => {
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            None
        }
    });
    match fresh {
        Some(fd) => {
            init_header(base);
            if let Some(w) = word(J_SLOTS) {
                w.store(slots, Ordering::Relaxed);
            }
            Some(fd)
        }
        None => {
            // Private zero pages instead: recorders keep working, nothing
            // is shared with the parent, and nothing is durable.
            // SAFETY: replaces our own mapping.
            unsafe {
                libc::mmap(
                    base as *mut c_void,
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            None
        }
    }
}

/// Where a recorder keeps its records and pending table.
pub struct Slot {
    pub index: u32,
    pub buf: *mut u8,
    pub len: *const AtomicU64,
    pub tid: *const AtomicU64,
    pub table: *mut u8,
}

/// A free slot (caller holds the flush lock), or None.
pub fn take_slot() -> Option<Slot> {
    let base = BASE.load(Ordering::Relaxed);
    let n = word(J_SLOTS)?;
    let i = n.load(Ordering::Relaxed) as usize;
    if i >= SLOT_CAP {
        return None;
    }
    n.store(i as u64 + 1, Ordering::Relaxed);
    // SAFETY: slot `i` lies inside the mapping (i < SLOT_CAP).
    unsafe {
        let s = base.add(J_HEADER + OUT_CAP + i * slot_size(BUF_CAP));
        Some(Slot {
            index: i as u32,
            buf: s.add(S_HEADER),
            len: s.add(S_LEN) as *const AtomicU64,
            tid: s.add(S_TID) as *const AtomicU64,
            table: s.add(S_HEADER + BUF_CAP),
        })
    }
}

/// The outbox's bytes, or None without a journal.
pub fn outbox() -> Option<*mut u8> {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: the outbox follows the header page.
    (!base.is_null()).then(|| unsafe { base.add(J_HEADER) })
}

/// An append-only byte buffer of fixed capacity, in the journal or on the
/// heap, with a committed length: bytes past it are a record being written.
pub struct Buf {
    ptr: *mut u8,
    cap: usize,
    len: usize,
    commit: *const AtomicU64,
}

impl Buf {
    /// A buffer over `cap` bytes at `ptr`, committed to `*commit`.
    pub fn at(ptr: *mut u8, cap: usize, commit: *const AtomicU64) -> Buf {
        Buf {
            ptr,
            cap,
            len: 0,
            commit,
        }
    }

    /// A buffer on the shim's heap (its committed length goes nowhere
    /// anyone reads).
    pub fn on_heap(cap: usize) -> Buf {
        let mem: &'static mut [u8] = Vec::leak(vec![0u8; cap]);
        let commit: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        Buf::at(mem.as_mut_ptr(), cap, commit)
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `n` more bytes fit. Writers ask before each record and drop
    /// (and count) a record that does not fit.
    #[inline]
    pub fn room(&self, n: usize) -> bool {
        self.cap - self.len >= n
    }

    /// Appends a byte (dropped if there is no room: callers asked first).
    #[inline]
    pub fn push(&mut self, b: u8) {
        if self.len < self.cap {
            // SAFETY: in bounds.
            unsafe { *self.ptr.add(self.len) = b };
            self.len += 1;
        }
    }

    /// Appends bytes (cut at the capacity: callers asked first).
    #[inline]
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        let n = b.len().min(self.cap - self.len);
        // SAFETY: in bounds; `b` never points into this buffer.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(self.len), n) };
        self.len += n;
    }

    /// The bytes written.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes were written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Marks every byte written so far as a complete record.
    #[inline]
    pub fn commit(&self) {
        std::sync::atomic::compiler_fence(Ordering::Release);
        // SAFETY: `commit` points at a live word (journal or leaked box).
        unsafe { (*self.commit).store(self.len as u64, Ordering::Relaxed) };
    }

    /// Empties the buffer (committed at once).
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
        self.commit();
    }
}
