//! The program's allocator: the definitions of the heap API that come
//! after the shim in the loader's search order. That is glibc's, unless the
//! program links an allocator library (jemalloc, tcmalloc, mimalloc) or one
//! is preloaded after the shim. Forwarding to glibc's `__libc_malloc`
//! instead would hand such a program glibc's blocks, which its allocator's
//! own `malloc_usable_size`, `sallocx` or sized delete then crash on.
//!
//! The functions are looked up with `dlsym(RTLD_NEXT)` on first use. dlsym
//! may allocate; while a thread looks them up, its allocations come from a
//! small static arena whose blocks are never given back (a `free` of one is
//! ignored, a `realloc` copies it out).

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One looked-up function (0: not yet).
struct Slot(AtomicUsize);

impl Slot {
    const fn new() -> Slot {
        Slot(AtomicUsize::new(0))
    }
}

static MALLOC: Slot = Slot::new();
static CALLOC: Slot = Slot::new();
static REALLOC: Slot = Slot::new();
static FREE: Slot = Slot::new();
static MEMALIGN: Slot = Slot::new();
static ALIGNED_ALLOC: Slot = Slot::new();
static POSIX_MEMALIGN: Slot = Slot::new();
static VALLOC: Slot = Slot::new();
static PVALLOC: Slot = Slot::new();

// glibc's allocator under its own names: the shim's own heap, and the
// fallback for a name nothing after the shim defines.
extern "C" {
    pub(crate) fn __libc_malloc(size: usize) -> *mut c_void;
    pub(crate) fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    pub(crate) fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    pub(crate) fn __libc_free(p: *mut c_void);
    pub(crate) fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn __libc_valloc(size: usize) -> *mut c_void;
    fn __libc_pvalloc(size: usize) -> *mut c_void;
}

/// glibc's own, for a name nothing after the shim defines (it always
/// would: libc is last; kept so that a failed lookup cannot crash).
unsafe extern "C" fn libc_aligned_alloc(align: usize, size: usize) -> *mut c_void {
    __libc_memalign(align, size)
}

unsafe extern "C" fn libc_posix_memalign(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if !align.is_multiple_of(std::mem::size_of::<usize>()) || !align.is_power_of_two() {
        return libc::EINVAL;
    }
    let p = __libc_memalign(align, size);
    if p.is_null() && size != 0 {
        return libc::ENOMEM;
    }
    *out = p;
    0
}

/// Looks every function up, once per process (racing threads each look
/// up the same values). `resolving` is this thread's flag: set, its
/// allocations come from the arena.
#[cold]
#[inline(never)]
fn resolve(resolving: &std::cell::Cell<bool>) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.load(Ordering::Acquire) {
        return;
    }
    resolving.set(true);
    let table: [(&Slot, &CStr, usize); 9] = [
        (&MALLOC, c"malloc", __libc_malloc as *const () as usize),
        (&CALLOC, c"calloc", __libc_calloc as *const () as usize),
        (&REALLOC, c"realloc", __libc_realloc as *const () as usize),
        (&FREE, c"free", __libc_free as *const () as usize),
        (
            &MEMALIGN,
            c"memalign",
            __libc_memalign as *const () as usize,
        ),
        (
            &ALIGNED_ALLOC,
            c"aligned_alloc",
            libc_aligned_alloc as *const () as usize,
        ),
        (
            &POSIX_MEMALIGN,
            c"posix_memalign",
            libc_posix_memalign as *const () as usize,
        ),
        (&VALLOC, c"valloc", __libc_valloc as *const () as usize),
        (&PVALLOC, c"pvalloc", __libc_pvalloc as *const () as usize),
    ];
    // Another thread may use a slot as soon as it is stored: each holds
    // a complete function (a free of an arena block never reaches one).
    for (slot, name, fallback) in table {
        // SAFETY: a NUL-terminated name; RTLD_NEXT from this object.
        let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        slot.0
            .store(if f == 0 { fallback } else { f }, Ordering::Release);
    }
    resolving.set(false);
    DONE.store(true, Ordering::Release);
}

/// The function in `slot`, looking all of them up first if needed; None:
/// this thread is looking them up (use the arena).
#[inline(always)]
fn get(slot: &Slot, resolving: impl FnOnce() -> &'static std::cell::Cell<bool>) -> Option<usize> {
    let f = slot.0.load(Ordering::Acquire);
    if f != 0 {
        return Some(f);
    }
    let flag = resolving();
    if flag.get() {
        return None;
    }
    resolve(flag);
    Some(slot.0.load(Ordering::Acquire))
}

// ---------------------------------------------------------------------------
// The bootstrap arena.

const ARENA_LEN: usize = 64 * 1024;
/// Each block is preceded by 16 bytes holding its size.
const HEADER: usize = 16;

#[repr(C, align(4096))]
struct Arena(std::cell::UnsafeCell<[u8; ARENA_LEN]>);

// SAFETY: blocks are handed out once each through the atomic bump pointer.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(std::cell::UnsafeCell::new([0; ARENA_LEN]));
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

fn arena_base() -> usize {
    ARENA.0.get() as usize
}

/// Whether `p` is an arena block.
#[inline(always)]
fn in_arena(p: *mut c_void) -> bool {
    (p as usize).wrapping_sub(arena_base()) < ARENA_LEN
}

/// A zeroed arena block of `size` bytes aligned to `align` (at most 4096),
/// or null when the arena is spent.
fn arena_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(16);
    let mut used = ARENA_USED.load(Ordering::Relaxed);
    loop {
        let start = (used + HEADER).next_multiple_of(align);
        let Some(end) = start.checked_add(size).filter(|&e| e <= ARENA_LEN) else {
            return std::ptr::null_mut();
        };
        match ARENA_USED.compare_exchange_weak(used, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let p = (arena_base() + start) as *mut u8;
                // SAFETY: [start - HEADER, end) is ours alone now.
                unsafe { (p.sub(HEADER) as *mut usize).write(size) };
                return p as *mut c_void;
            }
            Err(u) => used = u,
        }
    }
}

/// The size an arena block was asked with.
fn arena_size(p: *mut c_void) -> usize {
    // SAFETY: arena blocks are preceded by their size.
    unsafe { ((p as *mut u8).sub(HEADER) as *const usize).read() }
}

// ---------------------------------------------------------------------------
// The API, as the hooks call it. `tls` gives this thread's `resolving` flag.

type Tls = fn() -> &'static std::cell::Cell<bool>;

macro_rules! call {
    ($slot:expr, $tls:expr, fn($($a:ident: $t:ty),*) -> $r:ty, $arena:expr) => {{
        match get($slot, $tls) {
            // SAFETY: the slot holds this function's next definition (or
            // glibc's), which has this signature.
            Some(f) => unsafe {
                let f: unsafe extern "C" fn($($t),*) -> $r = std::mem::transmute(f);
                f($($a),*)
            },
            None => $arena,
        }
    }};
}

/// malloc(3).
#[inline(always)]
pub fn malloc(size: usize, tls: Tls) -> *mut c_void {
    call!(
        &MALLOC,
        tls,
        fn(size: usize) -> *mut c_void,
        arena_alloc(size, 16)
    )
}

/// calloc(3).
#[inline(always)]
pub fn calloc(n: usize, size: usize, tls: Tls) -> *mut c_void {
    call!(
        &CALLOC,
        tls,
        fn(n: usize, size: usize) -> *mut c_void,
        match n.checked_mul(size) {
            Some(total) => arena_alloc(total, 16),
            None => std::ptr::null_mut(),
        }
    )
}

/// realloc(3). An arena block is copied out into a new block.
#[inline(always)]
pub fn realloc(p: *mut c_void, size: usize, tls: Tls) -> *mut c_void {
    if in_arena(p) {
        return realloc_arena(p, size, tls);
    }
    call!(
        &REALLOC,
        tls,
        fn(p: *mut c_void, size: usize) -> *mut c_void,
        arena_alloc(size, 16)
    )
}

#[cold]
fn realloc_arena(p: *mut c_void, size: usize, tls: Tls) -> *mut c_void {
    let q = malloc(size, tls);
    if !q.is_null() {
        // SAFETY: both blocks hold at least the smaller size.
        unsafe {
            std::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, arena_size(p).min(size))
        };
    }
    q
}

/// free(3). Arena blocks are never given back.
#[inline(always)]
pub fn free(p: *mut c_void, tls: Tls) {
    if in_arena(p) {
        return;
    }
    call!(&FREE, tls, fn(p: *mut c_void) -> (), ())
}

/// memalign(3).
pub fn memalign(align: usize, size: usize, tls: Tls) -> *mut c_void {
    call!(
        &MEMALIGN,
        tls,
        fn(align: usize, size: usize) -> *mut c_void,
        arena_alloc(size, align)
    )
}

/// aligned_alloc(3).
pub fn aligned_alloc(align: usize, size: usize, tls: Tls) -> *mut c_void {
    call!(
        &ALIGNED_ALLOC,
        tls,
        fn(align: usize, size: usize) -> *mut c_void,
        arena_alloc(size, align)
    )
}

/// posix_memalign(3).
pub fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize, tls: Tls) -> c_int {
    call!(
        &POSIX_MEMALIGN,
        tls,
        fn(out: *mut *mut c_void, align: usize, size: usize) -> c_int,
        {
            let p = arena_alloc(size, align);
            if p.is_null() {
                libc::ENOMEM
            } else {
                // SAFETY: the caller's out pointer.
                unsafe { *out = p };
                0
            }
        }
    )
}

/// valloc(3).
pub fn valloc(size: usize, tls: Tls) -> *mut c_void {
    call!(
        &VALLOC,
        tls,
        fn(size: usize) -> *mut c_void,
        arena_alloc(size, 4096)
    )
}

/// pvalloc(3).
pub fn pvalloc(size: usize, tls: Tls) -> *mut c_void {
    call!(
        &PVALLOC,
        tls,
        fn(size: usize) -> *mut c_void,
        arena_alloc(size.next_multiple_of(4096), 4096)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn flag() -> &'static Cell<bool> {
        thread_local!(static F: &'static Cell<bool> = Box::leak(Box::new(Cell::new(false))));
        F.with(|f| *f)
    }

    #[test]
    fn arena_blocks_are_aligned_kept_and_copied_out_by_realloc() {
        let a = arena_alloc(10, 16);
        let b = arena_alloc(100, 256);
        assert!(in_arena(a) && in_arena(b) && a != b);
        assert_eq!(b as usize % 256, 0);
        assert_eq!((arena_size(a), arena_size(b)), (10, 100));
        // SAFETY: `a` holds 10 bytes.
        unsafe { std::ptr::copy_nonoverlapping(b"0123456789".as_ptr(), a as *mut u8, 10) };
        // A free of an arena block is ignored; realloc copies it into a
        // block of the real allocator.
        free(a, flag);
        let c = realloc(a, 20, flag);
        assert!(!c.is_null() && !in_arena(c));
        // SAFETY: `c` holds at least 10 copied bytes.
        assert_eq!(
            unsafe { std::slice::from_raw_parts(c as *const u8, 10) },
            b"0123456789"
        );
        free(c, flag);
        assert!(
            arena_alloc(ARENA_LEN, 16).is_null(),
            "a request larger than the arena fails"
        );
    }

    #[test]
    fn while_resolving_allocations_come_from_the_arena() {
        flag().set(true);
        // Not resolved by this thread yet, or resolved: either way a thread
        // that is resolving never calls dlsym again.
        let p = if MALLOC.0.load(Ordering::Acquire) == 0 {
            malloc(24, flag)
        } else {
            arena_alloc(24, 16)
        };
        flag().set(false);
        assert!(in_arena(p));
        let q = malloc(24, flag);
        assert!(!q.is_null() && !in_arena(q));
        free(q, flag);
    }
}
