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
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};

/// Most frames kept per stack, the hook's own address included.
pub const MAX_FRAMES: usize = 64;

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
    /// The shim's own executable range: frames in it are skipped.
    shim: Range<u64>,
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
    let here = capture_stack as *const () as u64;
    let mut unwinder = UnwinderX86_64::new();
    let mut ranges = Vec::new();
    let mut shim = 0..0;
    for m in mods {
        for r in m.exec_ranges() {
            if r.contains(&here) {
                shim = r.clone();
            }
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
        shim,
        counters,
    });
    SNAPSHOT.store(Box::into_raw(snap), Ordering::Release);
}

type Cache = CacheX86_64;

thread_local! {
    /// This thread's framehop rule cache; null: not yet made; dangling:
    /// the thread is exiting and its cache is gone.
    static CACHE: Cell<*mut Cache> = const { Cell::new(std::ptr::null_mut()) };
    /// This thread's stack, [lo, hi); (0, 0): not yet known.
    static STACK: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

static CACHE_KEY: AtomicU64 = AtomicU64::new(u64::MAX);

unsafe extern "C" fn drop_cache(p: *mut c_void) {
    let _ = CACHE.try_with(|c| c.set(std::ptr::dangling_mut::<Cache>()));
    drop(Box::from_raw(p as *mut Cache));
}

/// Creates the pthread key whose destructor frees each thread's cache.
pub fn init_cache_key() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: plain pthread call.
    if unsafe { libc::pthread_key_create(&mut key, Some(drop_cache)) } == 0 {
        CACHE_KEY.store(key as u64, Ordering::Relaxed);
    }
}

fn thread_cache() -> Option<&'static mut Cache> {
    let p = CACHE.with(|c| c.get());
    if p == std::ptr::dangling_mut::<Cache>() {
        return None;
    }
    if !p.is_null() {
        // SAFETY: owned by this thread until drop_cache.
        return Some(unsafe { &mut *p });
    }
    let key = CACHE_KEY.load(Ordering::Relaxed);
    if key == u64::MAX {
        return None;
    }
    let p = Box::into_raw(Box::new(Cache::new()));
    // SAFETY: key was created by init_cache_key.
    unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, p as *const c_void) };
    CACHE.with(|c| c.set(p));
    // SAFETY: just allocated, owned by this thread.
    Some(unsafe { &mut *p })
}

fn stack_bounds() -> (u64, u64) {
    let b = STACK.with(|s| s.get());
    if b.1 != 0 {
        return b;
    }
    // SAFETY: pthread_getattr_np fills `attr`, which we destroy. For the
    // main thread glibc reads /proc/self/maps (with malloc): the caller
    // holds the reentrancy guard, so that goes straight to libc.
    let b = crate::internal(|| unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return (0, 0);
        }
        let mut addr: *mut c_void = std::ptr::null_mut();
        let mut size: usize = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        if !ok {
            return (0, 0);
        }
        (addr as u64, addr as u64 + size as u64)
    });
    STACK.with(|s| s.set(b));
    b
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

/// Captures the calling thread's stack into `out`: `out[0] = hook` (the
/// interposed function's address, standing in for the instruction
/// pointer), then the return addresses of every frame outside the shim.
/// Returns the number of entries, 0 when no stack could be taken, and
/// whether some frame lay outside every known module.
#[inline(never)]
pub fn capture_stack(hook: u64, out: &mut [u64; MAX_FRAMES]) -> (usize, bool) {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads registers only.
    unsafe {
        std::arch::asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    let Some(snap) = snapshot() else {
        return (0, false);
    };
    let (lo, hi) = stack_bounds();
    if sp < lo || sp >= hi {
        // A signal stack, or bounds unknown: reading would be guesswork.
        return (0, false);
    }
    let Some(cache) = thread_cache() else {
        return (0, false);
    };
    let mut read = |a: u64| -> Result<u64, ()> {
        if a >= sp && a.checked_add(8).is_some_and(|e| e <= hi) {
            // SAFETY: within this thread's live stack, [sp, hi).
            Ok(unsafe { (a as *const u64).read_unaligned() })
        } else {
            Err(())
        }
    };
    let mut it = snap
        .unwinder
        .iter_frames(ip, UnwindRegsX86_64::new(ip, sp, bp), cache, &mut read);
    out[0] = hook;
    let mut n = 1;
    let mut in_shim = true;
    let mut uncovered = false;
    while let Ok(Some(f)) = it.next() {
        let a = f.address();
        if in_shim && snap.shim.contains(&a) {
            continue;
        }
        in_shim = false;
        if !snap.covers(a.wrapping_sub(1)) {
            uncovered = true;
        }
        out[n] = a;
        n += 1;
        if n == MAX_FRAMES {
            break;
        }
    }
    (n, uncovered)
}
