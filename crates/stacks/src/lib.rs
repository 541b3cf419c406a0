//! leakscope-stacks: the unwinding stage.
//!
//! Input: the `Map`, `Fork` and `Exec` [`Event`]s of a stream (fed to
//! [`ModuleMaps`]) and the [`RawStack`] of a leaked resource.
//! Output: [`Unwound`], a list of [`RawFrame`]s, each naming the module
//! (path, build id) and the [`FileOffset`] of its address, which is what the
//! symbolize stage needs, even after the process is gone.
//!
//! Copied stacks (registers plus a copy of the stack, as eBPF captures them)
//! are unwound with framehop from each module's `.eh_frame`, so code built
//! without frame pointers unwinds correctly. Each module file is read once.
//! A return address that no call pushed is told apart by the code before
//! it (`leakscope_event::x86_64::planted`): the start of a `makecontext(3)`
//! context (glibc's `__start_context`) ends the stack, since what lies
//! beyond it is not its caller, and the signal trampoline (`__restore_rt`)
//! is crossed from the registers the kernel saved in the signal frame.
//! Neither is a return address, so both are symbolized at their own
//! address, as is the interrupted instruction after a signal frame.
//!
//! ```
//! use leakscope_event::{AbsAddr, Event, FileOffset, Mapping, Pid, RawStack, TimeNs};
//! use leakscope_stacks::{ModuleMaps, Unwinder};
//!
//! let mut maps = ModuleMaps::new();
//! maps.apply(&Event::Map {
//!     time: TimeNs(0),
//!     pid: Pid(7),
//!     mapping: Mapping {
//!         start: AbsAddr(0x5555_0000_1000),
//!         end: AbsAddr(0x5555_0000_9000),
//!         offset: FileOffset(0x1000),
//!         path: "/nonexistent/server".into(),
//!     },
//! });
//! let raw = RawStack::Unwound(vec![
//!     AbsAddr(0x5555_0000_1234), // ip
//!     AbsAddr(0x5555_0000_2000), // a return address
//!     AbsAddr(0x7fff_0000_0000), // in no known module
//! ]);
//! let mut unwinder = Unwinder::new();
//! let out = unwinder.unwind(&maps, Pid(7), TimeNs(5), &raw);
//! let m = out.frames[0].module.as_ref().unwrap();
//! assert_eq!(m.path, "/nonexistent/server");
//! assert_eq!(m.offset, FileOffset(0x1234));
//! assert_eq!(m.build_id, None); // the file could not be read
//! assert!(out.frames[1].is_return_address);
//! assert_eq!(out.frames[1].module.as_ref().unwrap().offset, FileOffset(0x2000));
//! assert_eq!(out.frames[2].module, None);
//! assert_eq!(out.truncated, None);
//! ```
//!
//! It does not:
//! - symbolize (that is `leakscope-symbolize`, which looks up `offset - 1`
//!   for return addresses);
//! - read `/proc`: module paths are taken as host paths, as the backend
//!   reported them;
//! - unwind on architectures other than x86_64.
#![deny(missing_docs)]

mod elf;
mod maps;

use std::collections::HashMap;
use std::sync::Arc;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{FrameAddress, Unwinder as _};
use leakscope_event::x86_64::{self, Planted};
#[cfg(doc)]
use leakscope_event::Event;
use leakscope_event::{AbsAddr, FileOffset, Pid, RawStack, TimeNs};

use crate::elf::{Bytes, ElfInfo};
pub use crate::maps::ModuleMaps;

/// The most frames [`Unwinder::unwind`] returns for a copied stack: of a
/// deeper one (recursion), the innermost and outermost `MAX_FRAMES / 2`,
/// and the note says which frames were left out.
pub const MAX_FRAMES: usize = 128;

/// The most frames walked at all: past this, a stack is taken to be
/// corrupt (a loop) rather than deep.
const MAX_WALK: usize = 16384;

/// Where a frame's address lives, in terms that survive the process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModuleRef {
    /// Path of the mapped file, as the backend reported it.
    pub path: String,
    /// `.note.gnu.build-id` of that file in lowercase hex, if it could be read.
    pub build_id: Option<String>,
    /// File offset of the frame's address (not adjusted for return addresses).
    pub offset: FileOffset,
}

/// One frame of an unwound stack, before symbolization.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// The address: the instruction pointer for the first frame, otherwise
    /// a return address (the instruction after the call).
    pub addr: AbsAddr,
    /// Whether `addr` is a return address; symbolize `addr - 1` if so.
    pub is_return_address: bool,
    /// The module that held `addr` when the stack was captured.
    pub module: Option<ModuleRef>,
}

/// The result of unwinding one stack.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unwound {
    /// Frames, innermost first.
    pub frames: Vec<RawFrame>,
    /// Why the stack may be incomplete, if it may be.
    pub truncated: Option<String>,
}

/// Parsed module files by path; `None`: the file could not be read.
type Elves = HashMap<String, Option<Arc<ElfInfo>>>;

/// The identity of one framehop module: a file mapped at some place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ModKey {
    path: String,
    start: u64,
    end: u64,
    offset: u64,
}

type Framehop = UnwinderX86_64<Bytes>;

/// When more distinct module sets than this were seen, the cached framehop
/// unwinders are dropped and rebuilt on demand (modules stay cached).
const MAX_CACHED_UNWINDERS: usize = 64;

/// Unwinds [`RawStack`]s into [`RawFrame`]s.
///
/// Caches, per module path, the parsed unwind sections and build id; per
/// placement of a module, the framehop module; and per set of modules (what
/// one process had mapped at one time) a framehop unwinder with its rule
/// cache. Processes forked from one parent share the set and its cache.
#[derive(Default)]
pub struct Unwinder {
    /// `None`: the file could not be read; remembered so we try once.
    elves: Elves,
    modules: HashMap<ModKey, framehop::Module<Bytes>>,
    unwinders: HashMap<Vec<ModKey>, (Framehop, CacheX86_64)>,
}

impl std::fmt::Debug for Unwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwinder")
            .field("files", &self.elves.len())
            .field("modules", &self.modules.len())
            .field("module_sets", &self.unwinders.len())
            .finish()
    }
}

impl Unwinder {
    /// An unwinder with empty caches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Unwinds `raw`, captured in `pid` at `time`, using the mappings `maps`
    /// knew at that time.
    pub fn unwind(&mut self, maps: &ModuleMaps, pid: Pid, time: TimeNs, raw: &RawStack) -> Unwound {
        match raw {
            RawStack::Missing(reason) => Unwound {
                frames: Vec::new(),
                truncated: Some(reason.clone()),
            },
            RawStack::Unwound(addrs) => {
                let mut notes: Vec<String> = Vec::new();
                let mut frames = Vec::with_capacity(addrs.len());
                // The entry after the signal trampoline is the interrupted
                // instruction.
                let mut after_signal = false;
                for (i, a) in addrs.iter().enumerate() {
                    if let Some(n) = a.left_out() {
                        let deep = addrs.len() - 1 + n as usize;
                        let at = frames.len();
                        notes.push(format!(
                            "{deep} frames deep: {n} frames left out between #{} and #{at}",
                            at.saturating_sub(1)
                        ));
                    } else if let Some(cut) = a.cut() {
                        notes.push(cut.to_string());
                    } else {
                        // A planted return address (a context's start, the
                        // signal trampoline) is the code itself, not the
                        // instruction after a call.
                        let kind = if i > 0 && !after_signal {
                            self.planted(maps, pid, time, a.0)
                        } else {
                            Planted::No
                        };
                        let ret = i > 0 && !after_signal && kind == Planted::No;
                        after_signal = kind == Planted::Sigreturn;
                        frames.push(self.frame(maps, pid, time, a.0, ret));
                    }
                }
                Unwound {
                    frames,
                    truncated: (!notes.is_empty()).then(|| notes.join("; ")),
                }
            }
            RawStack::Copied { ip, sp, bp, bytes } => {
                let (addrs, truncated) = self.walk(maps, pid, time, *ip, *sp, *bp, bytes);
                Unwound {
                    frames: addrs
                        .into_iter()
                        .map(|(a, ret)| self.frame(maps, pid, time, a, ret))
                        .collect(),
                    truncated,
                }
            }
        }
    }

    /// Runs framehop over a copied stack; returns (address, is return
    /// address) pairs and why it stopped early, if it did.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        maps: &ModuleMaps,
        pid: Pid,
        time: TimeNs,
        ip: u64,
        sp: u64,
        bp: u64,
        bytes: &[u8],
    ) -> (Vec<(u64, bool)>, Option<String>) {
        let key: Vec<ModKey> = maps
            .mappings_at(pid, time)
            .into_iter()
            .map(|m| ModKey {
                path: m.path.clone(),
                start: m.start.0,
                end: m.end.0,
                offset: m.offset.0,
            })
            .collect();
        if !self.unwinders.contains_key(&key) {
            if self.unwinders.len() >= MAX_CACHED_UNWINDERS {
                self.unwinders.clear();
            }
            let mut fh = Framehop::new();
            for k in &key {
                fh.add_module(self.module(k));
            }
            self.unwinders.insert(key.clone(), (fh, CacheX86_64::new()));
        }
        let (fh, cache) = self.unwinders.get_mut(&key).expect("inserted above");
        let elves = &mut self.elves;

        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let word = bytes.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut out = Vec::new();
        // Beyond MAX_FRAMES / 2, the latest MAX_FRAMES / 2 frames, as a ring.
        let mut tail = std::collections::VecDeque::with_capacity(MAX_FRAMES / 2);
        let mut walked = 0usize;
        let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut addr = FrameAddress::from_instruction_pointer(ip);
        // (address, is a return address) of each frame, innermost first.
        let mut frame = (ip, false);
        let too_short = || {
            format!(
                "truncated: the next frame lies beyond the {}-byte stack copy",
                bytes.len()
            )
        };
        let mut stop = loop {
            if walked == MAX_WALK {
                break Some(format!("stopped after {MAX_WALK} frames"));
            }
            walked += 1;
            let kind = if frame.1 {
                planted(elves, maps, pid, time, frame.0)
            } else {
                Planted::No
            };
            // A planted return address is the code itself, not the
            // instruction after a call.
            let f = (frame.0, frame.1 && kind == Planted::No);
            if out.len() < MAX_FRAMES / 2 {
                out.push(f);
            } else {
                if tail.len() == MAX_FRAMES / 2 {
                    tail.pop_front();
                }
                tail.push_back(f);
            }
            match kind {
                Planted::No => {}
                // A makecontext(3) context's start: what lies beyond it
                // on the stack is not its caller.
                Planted::ContextStart => break None,
                Planted::Sigreturn => {
                    // The handler returns to rt_sigreturn(2): the kernel's
                    // signal frame is at the CFA, with the interrupted
                    // code's registers in it. Its next frame is the
                    // interrupted instruction, not a return address.
                    let uc = regs.sp();
                    let mut saved =
                        |off: u64| uc.checked_add(off).ok_or(()).and_then(&mut read_stack);
                    let (Ok(i_ip), Ok(i_sp), Ok(i_bp)) = (
                        saved(x86_64::UC_RIP),
                        saved(x86_64::UC_RSP),
                        saved(x86_64::UC_RBP),
                    ) else {
                        break Some(too_short());
                    };
                    regs = UnwindRegsX86_64::new(i_ip, i_sp, i_bp);
                    addr = FrameAddress::from_instruction_pointer(i_ip);
                    frame = (i_ip, false);
                    if read_stack(i_sp).is_err() {
                        // On another stack (sigaltstack(2)): not copied.
                        break Some(
                            "truncated at a signal frame: the interrupted stack was not copied"
                                .into(),
                        );
                    }
                    continue;
                }
            }
            match fh.unwind_frame(addr, &mut regs, cache, &mut read_stack) {
                Ok(Some(ra)) => match FrameAddress::from_return_address(ra) {
                    Some(a) => {
                        addr = a;
                        frame = (ra, true);
                    }
                    None => break Some("unwinding stopped: Return address is null".into()),
                },
                Ok(None) => break None,
                Err(framehop::Error::CouldNotReadStack(_)) => break Some(too_short()),
                Err(e) => break Some(format!("unwinding stopped: {e}")),
            }
        };
        let left_out = walked - out.len() - tail.len();
        if left_out > 0 {
            let first = out.len();
            let note = format!(
                "{walked} frames deep: {left_out} frames left out between #{} and #{first}",
                first - 1
            );
            stop = Some(match stop {
                Some(why) => format!("{note}; {why}"),
                None => note,
            });
        }
        out.extend(tail);
        (out, stop)
    }

    /// The framehop module for `k`, built on first use.
    fn module(&mut self, k: &ModKey) -> framehop::Module<Bytes> {
        if let Some(m) = self.modules.get(k) {
            return m.clone();
        }
        let m = match self.elf(&k.path) {
            Some(elf) => framehop::Module::new(
                k.path.clone(),
                k.start..k.end,
                elf.base_avma(k.start, k.offset),
                elf.section_info(),
            ),
            // No unwind info: framehop falls back to frame pointers here.
            None => framehop::Module::new(
                k.path.clone(),
                k.start..k.end,
                k.start.wrapping_sub(k.offset),
                framehop::ExplicitModuleSectionInfo::<Bytes>::default(),
            ),
        };
        self.modules.insert(k.clone(), m.clone());
        m
    }

    /// The parsed file at `path`, read on first use.
    fn elf(&mut self, path: &str) -> Option<Arc<ElfInfo>> {
        elf(&mut self.elves, path)
    }

    /// See [`planted`].
    fn planted(&mut self, maps: &ModuleMaps, pid: Pid, time: TimeNs, ra: u64) -> Planted {
        planted(&mut self.elves, maps, pid, time, ra)
    }

    fn frame(
        &mut self,
        maps: &ModuleMaps,
        pid: Pid,
        time: TimeNs,
        addr: u64,
        is_return_address: bool,
    ) -> RawFrame {
        // A return address can sit one past the end of its mapping (a call
        // that never returns, as the last instruction): look up the call.
        let lookup = if is_return_address {
            addr.saturating_sub(1)
        } else {
            addr
        };
        let module = maps
            .lookup(pid, time, AbsAddr(lookup))
            .map(|m| ModuleRef {
                path: m.path.clone(),
                build_id: None,
                offset: FileOffset(m.offset.0 + (addr - m.start.0)),
            })
            .map(|mut r| {
                r.build_id = self.elf(&r.path).and_then(|e| e.build_id.clone());
                r
            });
        RawFrame {
            addr: AbsAddr(addr),
            is_return_address,
            module,
        }
    }
}

/// The parsed file at `path` from `elves`, read on first use.
fn elf(elves: &mut Elves, path: &str) -> Option<Arc<ElfInfo>> {
    if let Some(e) = elves.get(path) {
        return e.clone();
    }
    let e = ElfInfo::read(path).ok().map(Arc::new);
    elves.insert(path.to_owned(), e.clone());
    e
}

/// What the code around return address `ra` says of its frame (see
/// [`x86_64::planted`]), read from the module file; `Planted::No` when the
/// file or the code is not there.
fn planted(elves: &mut Elves, maps: &ModuleMaps, pid: Pid, time: TimeNs, ra: u64) -> Planted {
    let Some(m) = maps.lookup(pid, time, AbsAddr(ra.wrapping_sub(1))) else {
        return Planted::No;
    };
    let Some(e) = elf(elves, &m.path) else {
        return Planted::No;
    };
    let off = m.offset.0 + (ra - m.start.0);
    let Some(before_off) = off.checked_sub(x86_64::BEFORE as u64) else {
        return Planted::No;
    };
    match (e.code(before_off), e.code(off)) {
        (Some(before), Some(at)) => x86_64::planted(&before, &at),
        _ => Planted::No,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unwinder_and_maps_are_send() {
        fn send<T: Send>() {}
        send::<super::Unwinder>();
        send::<super::ModuleMaps>();
    }
}
