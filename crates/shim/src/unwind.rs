//! In-process stack capture: framehop over the `.eh_frame` of every module
//! `dl_iterate_phdr(3)` reports, read straight from memory.
//!
//! The module list lives in an immutable [`Snapshot`] published through an
//! atomic pointer, so unwinding threads never take a lock. A refresh (after
//! dlopen/dlclose, or when a frame falls outside every known module and the
//! loader's add/sub counters moved) builds a new snapshot; old ones are
//! leaked on purpose, since another thread may still be walking one.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _};
use leakscope_event::x86_64::{self, Planted};
use leakscope_event::StackCut;

/// Most frames kept per stack, the hook's own address included. Of a
/// deeper stack, the innermost `MAX_FRAMES - TAIL - 1` and the outermost
/// `TAIL` are kept, with an entry between them saying how many were left
/// out ([`leakscope_event::AbsAddr::frames_left_out`]).
pub const MAX_FRAMES: usize = 64;
/// Outermost frames kept of a stack deeper than [`MAX_FRAMES`].
const TAIL: usize = 16;
/// Innermost frames kept of such a stack.
const HEAD: usize = MAX_FRAMES - TAIL - 1;
/// The most frames walked: a longer walk is taken to be a loop.
const MAX_WALK: usize = 8192;

/// Bytes of a module mapped in this process, used in place.
#[derive(Clone, Copy)]
pub struct Mem {
    ptr: *const u8,
    len: usize,
}

// SAFETY: `Mem` points at read-only text/unwind data of a loaded module; it
// is only read, and only while the module is loaded (see the module docs).
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Default for Mem {
    fn default() -> Self {
        Mem {
            ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
            len: 0,
        }
    }
}

impl Deref for Mem {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: built from a PT_LOAD/PT_GNU_EH_FRAME range of a loaded module.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// One program header, as much of it as we use.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// PT_LOAD, PT_GNU_EH_FRAME, ...
    pub kind: u32,
    /// PF_X | PF_W | PF_R.
    pub flags: u32,
    /// p_vaddr.
    pub vaddr: u64,
    /// p_memsz.
    pub memsz: u64,
    /// p_offset.
    pub offset: u64,
}

/// One loaded object as `dl_iterate_phdr` described it.
#[derive(Clone, Debug)]
pub struct ModInfo {
    /// Host path (the main program's resolved through /proc/self/exe);
    /// empty for objects without a file (the vDSO).
    pub path: String,
    /// dlpi_addr: load bias.
    pub base: u64,
    /// Program headers.
    pub segs: Vec<Seg>,
}

impl ModInfo {
    /// Absolute ranges of executable PT_LOAD segments.
    pub fn exec_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.segs
            .iter()
            .filter(|s| s.kind == libc::PT_LOAD && s.flags & libc::PF_X != 0)
            .map(|s| self.base + s.vaddr..self.base + s.vaddr + s.memsz)
    }
}

/// An immutable view of the loaded modules, ready to unwind with.
pub struct Snapshot {
    unwinder: UnwinderX86_64<Mem>,
    /// Sorted executable ranges, for "is this address covered".
    ranges: Vec<Range<u64>>,
    /// dl_iterate_phdr's dlpi_adds/dlpi_subs when this was built.
    pub counters: (u64, u64),
}

impl Snapshot {
    fn covers(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.start <= addr);
        i > 0 && addr < self.ranges[i - 1].end
    }
}

static SNAPSHOT: AtomicPtr<Snapshot> = AtomicPtr::new(std::ptr::null_mut());
/// Set by the dlopen/dlclose hooks: refresh before the next capture.
pub static DIRTY: AtomicBool = AtomicBool::new(false);
/// Last time (monotonic ns) an uncovered frame made us ask the loader.
static LAST_COUNTER_CHECK: AtomicU64 = AtomicU64::new(0);

/// The current snapshot, if one was built.
pub fn snapshot() -> Option<&'static Snapshot> {
    let p = SNAPSHOT.load(Ordering::Acquire);
    // SAFETY: snapshots are never freed once published.
    unsafe { p.as_ref() }
}

/// `struct dl_phdr_info` with the glibc fields the `libc` crate omits.
#[repr(C)]
struct DlPhdrInfo {
    addr: u64,
    name: *const libc::c_char,
    phdr: *const libc::Elf64_Phdr,
    phnum: u16,
    adds: u64,
    subs: u64,
}

extern "C" {
    fn dl_iterate_phdr(
        cb: unsafe extern "C" fn(*mut DlPhdrInfo, usize, *mut c_void) -> c_int,
        data: *mut c_void,
    ) -> c_int;
}

const ADDS_END: usize = std::mem::offset_of!(DlPhdrInfo, subs) + 8;

/// The loader's (adds, subs) counters: they change on every dlopen/dlclose.
pub fn loader_counters() -> (u64, u64) {
    unsafe extern "C" fn cb(info: *mut DlPhdrInfo, size: usize, data: *mut c_void) -> c_int {
        let out = data as *mut (u64, u64);
        if size >= ADDS_END {
            *out = ((*info).adds, (*info).subs);
        }
        1
    }
    let mut out = (0u64, 0u64);
    // SAFETY: the callback only reads `info` and writes `out`.
    unsafe { dl_iterate_phdr(cb, &mut out as *mut _ as *mut c_void) };
    out
}

/// Lists loaded objects. Must not be called with the shim's global lock
/// held: a program's own dl_iterate_phdr callback may allocate.
pub fn list_modules() -> (Vec<ModInfo>, (u64, u64)) {
    struct Acc {
        mods: Vec<ModInfo>,
        counters: (u64, u64),
    }
    unsafe extern "C" fn cb(info: *mut DlPhdrInfo, size: usize, data: *mut c_void) -> c_int {
        let acc = &mut *(data as *mut Acc);
        let info = &*info;
        if size >= ADDS_END {
            acc.counters = (info.adds, info.subs);
        }
        let name = if info.name.is_null() {
            ""
        } else {
            CStr::from_ptr(info.name).to_str().unwrap_or("")
        };
        let path = if acc.mods.is_empty() && name.is_empty() {
            // The main program (first entry, empty name).
            std::fs::read_link("/proc/self/exe")
                .ok()
                .and_then(|p| p.into_os_string().into_string().ok())
                .unwrap_or_default()
        } else if name.starts_with('/') {
            name.to_owned()
        } else if name.contains('/') {
            // dlopen("./plugin.so") keeps the name as given: resolve it
            // now, while the cwd is still the one it was opened from.
            std::fs::canonicalize(name)
                .ok()
                .and_then(|p| p.into_os_string().into_string().ok())
                .unwrap_or_default()
        } else {
            String::new() // linux-vdso.so.1 and friends: no file
        };
        let phdrs = std::slice::from_raw_parts(info.phdr, info.phnum as usize);
        acc.mods.push(ModInfo {
            path,
            base: info.addr,
            segs: phdrs
                .iter()
                .map(|p| Seg {
                    kind: p.p_type,
                    flags: p.p_flags,
                    vaddr: p.p_vaddr,
                    memsz: p.p_memsz,
                    offset: p.p_offset,
                })
                .collect(),
        });
        0
    }
    let mut acc = Acc {
        mods: Vec::new(),
        counters: (0, 0),
    };
    // SAFETY: the callback only reads what the loader hands it.
    unsafe { dl_iterate_phdr(cb, &mut acc as *mut Acc as *mut c_void) };
    (acc.mods, acc.counters)
}

/// Reads a DW_EH_PE-encoded pointer (the subset `.eh_frame_hdr` uses for
/// `eh_frame_ptr`) located at absolute address `at`.
fn eh_frame_ptr(enc: u8, at: u64) -> Option<u64> {
    // SAFETY: `at` is inside the module's mapped .eh_frame_hdr.
    unsafe {
        let val = match enc & 0x0f {
            0x00 | 0x04 => (at as *const u64).read_unaligned(),
            0x03 => (at as *const u32).read_unaligned() as u64,
            0x0b => (at as *const i32).read_unaligned() as i64 as u64,
            _ => return None,
        };
        match enc & 0x70 {
            0x00 => Some(val),
            0x10 => Some(at.wrapping_add(val)),
            _ => None,
        }
    }
}

fn framehop_module(m: &ModInfo) -> Option<Module<Mem>> {
    let text = m
        .segs
        .iter()
        .find(|s| s.kind == libc::PT_LOAD && s.flags & libc::PF_X != 0)?;
    let lo = m.exec_ranges().map(|r| r.start).min()?;
    let hi = m.exec_ranges().map(|r| r.end).max()?;
    let mut info = ExplicitModuleSectionInfo::<Mem> {
        base_svma: 0,
        text_svma: Some(text.vaddr..text.vaddr + text.memsz),
        text: Some(Mem {
            ptr: (m.base + text.vaddr) as *const u8,
            len: text.memsz as usize,
        }),
        ..Default::default()
    };
    if let Some(hdr) = m.segs.iter().find(|s| s.kind == libc::PT_GNU_EH_FRAME) {
        let hdr_avma = m.base + hdr.vaddr;
        // SAFETY: PT_GNU_EH_FRAME is mapped; byte 0 is the version, byte 1
        // the encoding of eh_frame_ptr, which starts at byte 4.
        let (version, enc) = unsafe { (*(hdr_avma as *const u8), *((hdr_avma + 1) as *const u8)) };
        if version == 1 {
            if let Some(eh_avma) = eh_frame_ptr(enc, hdr_avma + 4) {
                let eh_svma = eh_avma.wrapping_sub(m.base);
                // .eh_frame runs to the end of the PT_LOAD that holds it at
                // most; framehop only follows offsets the header's table gives.
                let seg_end = m
                    .segs
                    .iter()
                    .filter(|s| s.kind == libc::PT_LOAD)
                    .find(|s| s.vaddr <= eh_svma && eh_svma < s.vaddr + s.memsz)
                    .map(|s| s.vaddr + s.memsz);
                if let Some(seg_end) = seg_end {
                    info.eh_frame_svma = Some(eh_svma..seg_end);
                    info.eh_frame = Some(Mem {
                        ptr: eh_avma as *const u8,
                        len: (seg_end - eh_svma) as usize,
                    });
                    info.eh_frame_hdr_svma = Some(hdr.vaddr..hdr.vaddr + hdr.memsz);
                    info.eh_frame_hdr = Some(Mem {
                        ptr: hdr_avma as *const u8,
                        len: hdr.memsz as usize,
                    });
                }
            }
        }
    }
    Some(Module::new(m.path.clone(), lo..hi, m.base, info))
}

/// Builds and publishes a snapshot of `mods`.
pub fn publish(mods: &[ModInfo], counters: (u64, u64)) {
    let mut unwinder = UnwinderX86_64::new();
    let mut ranges = Vec::new();
    for m in mods {
        for r in m.exec_ranges() {
            ranges.push(r);
        }
        if let Some(fm) = framehop_module(m) {
            unwinder.add_module(fm);
        }
    }
    ranges.sort_by_key(|r| r.start);
    let snap = Box::new(Snapshot {
        unwinder,
        ranges,
        counters,
    });
    SNAPSHOT.store(Box::into_raw(snap), Ordering::Release);
    SNAP_GEN.fetch_add(1, Ordering::Release);
}

/// framehop's per-thread rule cache.
pub type Cache = CacheX86_64;

thread_local! {
    /// This thread's stack, [lo, hi); (0, 0): not yet known.
    static STACK: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Bumped whenever a new snapshot is published: cached stacks taken with
/// an older one are stale.
pub static SNAP_GEN: AtomicU32 = AtomicU32::new(0);

/// Most stack words one capture may read and still be cached.
pub const SLOTS: usize = 32;

/// What one capture did.
pub struct Capture {
    /// Entries of `out` filled.
    pub n: usize,
    /// Some frame lay outside every known module.
    pub uncovered: bool,
    /// The walk ended at a root frame or at `MAX_FRAMES`, not at an error.
    pub clean: bool,
    /// The result depends on the initial bp.
    pub bp_used: bool,
    /// How many of the stack words the result depends on were logged in
    /// `slots` as (address, value); `None`: the dependencies could not be
    /// pinned down (or were more than [`SLOTS`]).
    pub nslots: Option<usize>,
    /// [`SNAP_GEN`] of the snapshot used.
    pub gen: u32,
    /// Why the walk ended before the outermost frame, if it did.
    pub cut: Option<StackCut>,
}

/// This thread's own stack, found on first use: the main thread's is the
/// `[stack]` mapping, another thread's the mapping that holds its thread
/// pointer (glibc and musl put the thread control block at the top of the
/// thread's stack, in the same mapping, also for a stack the program gave
/// pthread_attr_setstack(3)). Not the mapping that holds the stack pointer
/// at first use: that may be a coroutine's stack, freed while the thread
/// lives on, and then reading inside stale bounds could fault.
fn stack_bounds() -> (u64, u64) {
    let b = STACK.with(|s| s.get());
    if b.1 != 0 {
        return b;
    }
    let b = thread_stack().unwrap_or((0, 0));
    STACK.with(|s| s.set(b));
    b
}

/// Whether `sp` is on this thread's own stack (see [`stack_bounds`]).
pub fn on_thread_stack(sp: u64) -> bool {
    let (lo, hi) = stack_bounds();
    lo <= sp && sp < hi
}

/// The thread pointer (`%fs` base), which points at itself (x86_64 TLS ABI).
fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: reads the TCB's self pointer at %fs:0.
    unsafe {
        std::arch::asm!(
            "mov {tp}, qword ptr fs:[0]",
            tp = out(reg) tp,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
    tp
}

/// See [`stack_bounds`].
fn thread_stack() -> Option<(u64, u64)> {
    // SAFETY: plain syscalls.
    let main = unsafe { libc::syscall(libc::SYS_gettid) == libc::syscall(libc::SYS_getpid) };
    let (start, end) = if main {
        find_mapping(|_, _, tail| tail == b"[stack]")?
    } else {
        let tp = thread_pointer();
        find_mapping(|start, end, _| start <= tp && tp < end)?
    };
    if !main {
        return Some((start, end));
    }
    // The main thread's stack grows: its low bound is the top minus
    // RLIMIT_STACK, as glibc computes it.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a raw syscall filling `lim`.
    let rc = unsafe { libc::syscall(libc::SYS_getrlimit, libc::RLIMIT_STACK, &mut lim) };
    let size = if rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        lim.rlim_cur
    } else {
        8 << 20
    };
    Some((end.saturating_sub(size).min(start), end))
}

/// The first mapping of /proc/self/maps for which `want(start, end, the
/// line's last 7 bytes)` holds, read with raw syscalls into a buffer on
/// the stack. Not pthread_getattr_np: glibc holds the thread's lock while
/// it mallocs inside that call (fopen of /proc/self/maps, the affinity
/// buffer), so calling it from a hook that the program entered from
/// pthread_getattr_np deadlocked (Rust's runtime does exactly that at
/// startup).
fn find_mapping(want: impl Fn(u64, u64, &[u8; 7]) -> bool) -> Option<(u64, u64)> {
    // SAFETY: raw syscalls on a NUL-terminated path and our own buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    } as i32;
    if fd < 0 {
        return None;
    }
    // Small: this may run on a small coroutine or signal stack.
    let mut buf = [0u8; 512];
    // Per line: start, end, and the last bytes (to spot "[stack]").
    let (mut start, mut end, mut field) = (0u64, 0u64, 0u8);
    let mut tail = [0u8; 7];
    let mut found = None;
    'read: loop {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        for &c in &buf[..n as usize] {
            match (field, c) {
                (_, b'\n') => {
                    if want(start, end, &tail) {
                        found = Some((start, end));
                        break 'read;
                    }
                    (start, end, field) = (0, 0, 0);
                    tail = [0; 7];
                }
                (0, b'-') => field = 1,
                (0 | 1, _) => {
                    let d = (c as char).to_digit(16).map(u64::from);
                    match (field, d) {
                        (0, Some(d)) => start = start << 4 | d,
                        (1, Some(d)) => end = end << 4 | d,
                        _ => field = 2,
                    }
                }
                _ => {
                    tail.copy_within(1.., 0);
                    tail[6] = c;
                }
            }
        }
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    found
}

/// Bytes of one page of [`AltMem`].
const PAGE: usize = 4096;
/// Pages [`AltMem`] keeps.
const ALT_PAGES: usize = 4;

/// Reads a stack that is not the thread's own: a coroutine's
/// (makecontext(3), a green thread's), or a signal stack (sigaltstack(2)).
/// Its extent is unknown and another thread may free or unmap it at any
/// time (only the frames between the stack pointer and the context's
/// start are sure to live while the hook runs), so it is read with
/// process_vm_readv(2) on this very process, a page at a time: a read of
/// memory that is gone fails instead of faulting. Only for captures off
/// the thread's stack (cached only when clean, see the shim's
/// `unchanged_in_order`).
pub struct AltMem {
    pid: i32,
    /// Page address of each buffer; `u64::MAX`: empty.
    base: [u64; ALT_PAGES],
    /// The buffer to refill next (round robin).
    next: usize,
    /// `ALT_PAGES` pages, allocated on first use (not on the stack the
    /// hook runs on, which may be a small coroutine stack).
    data: Vec<u8>,
}

impl Default for AltMem {
    fn default() -> AltMem {
        AltMem {
            pid: 0,
            base: [u64::MAX; ALT_PAGES],
            next: 0,
            data: Vec::new(),
        }
    }
}

impl AltMem {
    /// Forgets what an earlier capture read (the memory may have changed).
    fn reset(&mut self) {
        self.base = [u64::MAX; ALT_PAGES];
        // SAFETY: plain syscall (not cached: a fork child has another pid).
        self.pid = unsafe { libc::syscall(libc::SYS_getpid) } as i32;
        if self.data.is_empty() {
            self.data = vec![0; PAGE * ALT_PAGES];
        }
    }

    /// The buffer holding the page at `base`, read if need be; the errno.
    fn page(&mut self, base: u64) -> Result<usize, i32> {
        if let Some(i) = self.base.iter().position(|&b| b == base) {
            return Ok(i);
        }
        let i = self.next;
        self.next = (i + 1) % ALT_PAGES;
        self.base[i] = u64::MAX;
        let local = libc::iovec {
            iov_base: self.data[i * PAGE..].as_mut_ptr() as *mut c_void,
            iov_len: PAGE,
        };
        let remote = libc::iovec {
            iov_base: base as *mut c_void,
            iov_len: PAGE,
        };
        // SAFETY: reads into our own buffer; the remote side is checked by
        // the kernel, which fails with EFAULT where nothing is mapped. The
        // variadic arguments are register-wide: a 32-bit 0 for `flags`
        // leaves the register's upper half as it was (EINVAL).
        let n = unsafe {
            libc::syscall(
                libc::SYS_process_vm_readv,
                self.pid as libc::c_long,
                &local as *const libc::iovec,
                1 as libc::c_ulong,
                &remote as *const libc::iovec,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if n != PAGE as i64 {
            return Err(if n < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                libc::EFAULT
            });
        }
        self.base[i] = base;
        Ok(i)
    }

    /// The word at `a`.
    fn read(&mut self, a: u64) -> Result<u64, i32> {
        let off = (a & (PAGE as u64 - 1)) as usize;
        if off <= PAGE - 8 {
            let at = self.page(a - off as u64)? * PAGE + off;
            let mut w = [0u8; 8];
            w.copy_from_slice(&self.data[at..at + 8]);
            return Ok(u64::from_le_bytes(w));
        }
        let mut w = [0u8; 8];
        for (k, byte) in w.iter_mut().enumerate() {
            let at = a.checked_add(k as u64).ok_or(libc::EFAULT)?;
            let base = at & !(PAGE as u64 - 1);
            let i = self.page(base)?;
            *byte = self.data[i * PAGE + (at - base) as usize];
        }
        Ok(u64::from_le_bytes(w))
    }
}

/// Rebuilds the snapshot if dlopen/dlclose happened or the loader's
/// counters moved. Returns whether a new snapshot was published.
pub fn refresh_if_needed(force_check: bool, now: u64) -> bool {
    let dirty = DIRTY.swap(false, Ordering::AcqRel);
    if !dirty && !force_check {
        return false;
    }
    if !dirty {
        // An uncovered frame: ask the loader, at most once per millisecond.
        let last = LAST_COUNTER_CHECK.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1_000_000 {
            return false;
        }
        LAST_COUNTER_CHECK.store(now, Ordering::Relaxed);
        if snapshot().is_some_and(|s| s.counters == loader_counters()) {
            return false;
        }
    }
    crate::refresh_modules();
    true
}

/// What the code around return address `r` says of its frame (see
/// [`x86_64::planted`]); `Planted::No` where the code is not mapped in a
/// known module.
fn planted(snap: &Snapshot, r: u64) -> Planted {
    let (Some(lo), Some(hi)) = (
        r.checked_sub(x86_64::BEFORE as u64),
        r.checked_add(x86_64::AT as u64 - 1),
    ) else {
        return Planted::No;
    };
    if !(snap.covers(lo) && snap.covers(r - 1) && snap.covers(r) && snap.covers(hi)) {
        return Planted::No;
    }
    // SAFETY: inside executable PT_LOAD segments of loaded modules (module
    // ranges lie pages apart, so no gap hides between the ends checked).
    let (before, at) = unsafe {
        (
            (lo as *const [u8; x86_64::BEFORE]).read_unaligned(),
            (r as *const [u8; x86_64::AT]).read_unaligned(),
        )
    };
    x86_64::planted(&before, &at)
}

/// Captures the stack of a hook's caller: `out[0] = hook` (the interposed
/// function's address, standing in for the instruction pointer), `out[1] =
/// ra` (the return address the hook was called with, read at `sp`), then
/// the return addresses found by unwinding from there. `sp` and `bp` are
/// the stack and frame pointers at the hook's entry.
///
/// On the thread's own stack, every stack word read that the result
/// depends on is logged in `slots`: the walk is a pure function of (`ra`,
/// `sp`, `bp` if `bp_used`, the snapshot, those words), which is what makes
/// caching it sound. A word counts when it held a return address, or a
/// saved bp that a later step followed (found by repeating each step with
/// an unusable bp), or was read by the last step.
///
/// Off the thread's stack (a coroutine, green thread or signal stack) the
/// words are read through `alt`. A walk through a signal frame is not
/// cachable (`nslots` is `None`). The walk
/// ends at the start of a `makecontext(3)` context (a return address no
/// call pushed, see [`x86_64::planted`]): that address is the last frame,
/// and what lies beyond it on the stack is not the context's caller. A
/// signal frame is crossed from the registers the kernel saved in it: the
/// entry after the signal trampoline `__restore_rt` is the interrupted
/// instruction's address, not a return address.
///
/// `Err` when no stack can be taken, and why.
#[allow(clippy::too_many_arguments)]
pub fn capture(
    hook: u64,
    ra: u64,
    sp: u64,
    bp: u64,
    cache: &mut Cache,
    alt: &mut AltMem,
    out: &mut [u64; MAX_FRAMES],
    slots: &mut [(u64, u64); SLOTS],
) -> Result<Capture, StackCut> {
    let gen = SNAP_GEN.load(Ordering::Acquire);
    let snap = snapshot().ok_or(StackCut::NotReady)?;
    let (lo, hi) = stack_bounds();
    // The caller's frame as it will be after the hook returns: nothing
    // below it is read (below a signal frame's saved sp, once crossed).
    let mut floor = sp + 8;
    // Reading the thread's own stack, in place.
    let mut own = lo <= sp && sp < hi;
    if !own {
        alt.reset();
        alt.read(floor)
            .map_err(|e| StackCut::Unreadable(e as u16))?;
    }
    out[0] = hook;
    let mut c = Capture {
        n: 1,
        uncovered: false,
        clean: false,
        bp_used: false,
        nslots: Some(0),
        gen,
        cut: None,
    };
    let Some(mut addr) = FrameAddress::from_return_address(ra) else {
        c.clean = true;
        return Ok(c);
    };
    out[1] = ra;
    c.n = 2;
    c.uncovered = !snap.covers(ra.wrapping_sub(1));
    // Every word read by the current step.
    let mut step = [(0u64, 0u64); 16];
    // The words the result depends on.
    let mut nslots = 0usize;
    let mut precise = true;
    fn keep(w: (u64, u64), slots: &mut [(u64, u64); SLOTS], n: &mut usize, precise: &mut bool) {
        if *n < SLOTS {
            slots[*n] = w;
            *n += 1;
        } else {
            *precise = false;
        }
    }
    // Frames past MAX_FRAMES: how many, and the latest TAIL of them.
    let mut deeper = 0usize;
    let mut tail = [0u64; TAIL];
    let mut push = |c: &mut Capture, deeper: &mut usize, f: u64| {
        if c.n < MAX_FRAMES {
            out[c.n] = f;
            c.n += 1;
        } else {
            // Deeper than MAX_FRAMES: the latest TAIL frames, in a ring.
            tail[*deeper % TAIL] = f;
            *deeper += 1;
        }
    };
    // Where the current bp came from: None, the initial bp.
    let mut bp_src: Option<(u64, u64)> = None;
    let mut regs = UnwindRegsX86_64::new(ra, floor, bp);
    // One word of the stack, or why not.
    fn word(alt: &mut AltMem, own: bool, floor: u64, hi: u64, a: u64) -> Result<u64, ()> {
        if a < floor {
            Err(())
        } else if !own {
            alt.read(a).map_err(|_| ())
        } else if a.checked_add(8).is_some_and(|e| e <= hi) {
            // SAFETY: within this thread's live stack, above the hook's frame.
            Ok(unsafe { (a as *const u64).read_unaligned() })
        } else {
            Err(())
        }
    }
    while MAX_FRAMES + deeper < MAX_WALK {
        let pre = regs;
        let mut nstep = 0usize;
        let res = {
            let mut read = |a: u64| -> Result<u64, ()> {
                let v = word(alt, own, floor, hi, a)?;
                if nstep < step.len() {
                    step[nstep] = (a, v);
                }
                nstep += 1;
                Ok(v)
            };
            snap.unwinder
                .unwind_frame(addr, &mut regs, cache, &mut read)
        };
        if nstep > step.len() {
            precise = false;
            nstep = step.len();
        }
        let step = &step[..nstep];
        let next = match res {
            Ok(Some(0)) | Ok(None) | Err(framehop::Error::ReturnAddressIsNull) => {
                c.clean = true;
                None
            }
            Ok(Some(r)) => FrameAddress::from_return_address(r).map(|a| (r, a)),
            Err(e) => {
                c.cut = Some(match e {
                    framehop::Error::CouldNotReadStack(_) if own => StackCut::OutsideStack,
                    framehop::Error::CouldNotReadStack(_) => StackCut::Unmapped,
                    framehop::Error::FramepointerUnwindingMovedBackwards => StackCut::Backwards,
                    framehop::Error::IntegerOverflow => StackCut::Overflow,
                    _ => StackCut::Loop,
                });
                None
            }
        };
        let Some((r, next)) = next else {
            // The last step: its result depends on everything it saw.
            for &w in step {
                keep(w, slots, &mut nslots, &mut precise);
            }
            match bp_src {
                Some(w) => keep(w, slots, &mut nslots, &mut precise),
                None => c.bp_used = true,
            }
            break;
        };
        // Does this step depend on the incoming bp? Run it again with a bp
        // that cannot be followed: a step that uses it then fails or ends.
        // (A capture that will not be cached need not know.)
        let same = !precise || {
            let mut alt_regs = pre;
            alt_regs.set_bp(0);
            let mut quiet = |a: u64| word(alt, own, floor, hi, a);
            matches!(
                snap.unwinder.unwind_frame(addr, &mut alt_regs, cache, &mut quiet),
                Ok(Some(r2)) if r2 == r && alt_regs.sp() == regs.sp()
            )
        };
        if !same {
            match bp_src {
                Some(w) => keep(w, slots, &mut nslots, &mut precise),
                None => c.bp_used = true,
            }
        }
        // The return address was read at the new CFA - 8.
        match step
            .iter()
            .find(|w| w.0 == regs.sp().wrapping_sub(8) && w.1 == r)
        {
            Some(&w) => keep(w, slots, &mut nslots, &mut precise),
            None => precise = false,
        }
        // A restored bp comes from a word read with its value.
        if let Some(&w) = step
            .iter()
            .find(|w| w.1 == regs.bp() && w.0 != regs.sp().wrapping_sub(8))
        {
            bp_src = Some(w);
        } else if regs.bp() != pre.bp() {
            precise = false;
        }
        if !snap.covers(r.wrapping_sub(1)) {
            c.uncovered = true;
        }
        push(&mut c, &mut deeper, r);
        addr = next;
        match planted(snap, r) {
            Planted::No => {}
            Planted::ContextStart => {
                // The context's start: the function it ran returns there,
                // and the stack beyond is not its caller's.
                c.clean = true;
                break;
            }
            Planted::Sigreturn => {
                // The handler returns to rt_sigreturn(2): the kernel's
                // signal frame is at the CFA, with the interrupted code's
                // registers in it, on this stack or (sigaltstack) another.
                precise = false;
                let uc = regs.sp();
                let mut saved = |off: u64| {
                    uc.checked_add(off)
                        .ok_or(())
                        .and_then(|a| word(alt, own, floor, hi, a))
                };
                let (Ok(ip), Ok(isp), Ok(ibp)) = (
                    saved(x86_64::UC_RIP),
                    saved(x86_64::UC_RSP),
                    saved(x86_64::UC_RBP),
                ) else {
                    c.cut = Some(if own {
                        StackCut::OutsideStack
                    } else {
                        StackCut::Unmapped
                    });
                    break;
                };
                if !(lo <= isp && isp < hi) && own {
                    own = false;
                    alt.reset();
                }
                floor = isp;
                regs = UnwindRegsX86_64::new(ip, isp, ibp);
                if !snap.covers(ip) {
                    c.uncovered = true;
                }
                push(&mut c, &mut deeper, ip);
                addr = FrameAddress::from_instruction_pointer(ip);
            }
        }
    }
    if deeper > 0 {
        keep_outermost(out, &tail, deeper);
    }
    c.nslots = precise.then_some(nslots);
    Ok(c)
}

/// Of a walk `MAX_FRAMES + deeper` frames deep (`out` full, the latest
/// frames in the ring `tail`): keeps `out[..HEAD]`, then the entry for the
/// frames left out, then the outermost TAIL frames.
fn keep_outermost(out: &mut [u64; MAX_FRAMES], tail: &[u64; TAIL], deeper: usize) {
    // Every frame past HEAD, in order: out[HEAD..] and then the ring's.
    let mut past = [0u64; MAX_FRAMES - HEAD + TAIL];
    let mut n = 0;
    for &f in &out[HEAD..] {
        past[n] = f;
        n += 1;
    }
    let in_ring = deeper.min(TAIL);
    for k in 0..in_ring {
        past[n] = tail[(deeper - in_ring + k) % TAIL];
        n += 1;
    }
    let left = MAX_FRAMES + deeper - HEAD - TAIL;
    out[HEAD] = leakscope_event::AbsAddr::frames_left_out(left as u32).0;
    out[HEAD + 1..].copy_from_slice(&past[n - TAIL..n]);
}
