//! leakscope-symbolize: the symbolization stage.
//!
//! Input: [`RawFrame`]s from `leakscope-stacks` (module path, build id and
//! file offset). Output: [`Frame`]s with function, source file and line, one
//! per inlined call as well. It uses blazesym on the module files themselves
//! (`Source::Elf` with file offsets), so it works after the traced process
//! exited, and blazesym finds separate debug info in `/usr/lib/debug` by
//! build id or debug link.
//!
//! ```
//! use leakscope_event::{AbsAddr, FileOffset};
//! use leakscope_stacks::{ModuleRef, RawFrame};
//! use leakscope_symbolize::{Frame, Symbolizer};
//!
//! let frames = [
//!     RawFrame { addr: AbsAddr(0x7f00_0000_1234), is_return_address: false, module: None },
//!     RawFrame {
//!         addr: AbsAddr(0x5555_0000_2000),
//!         is_return_address: true,
//!         module: Some(ModuleRef {
//!             path: "/nonexistent/server".into(),
//!             build_id: None,
//!             offset: FileOffset(0x2000),
//!         }),
//!     },
//! ];
//! let mut symbolizer = Symbolizer::new();
//! let out = symbolizer.symbolize(&frames);
//! // Nothing is known, and nothing is made up.
//! assert_eq!(out, [
//!     Frame { addr: AbsAddr(0x7f00_0000_1234), function: None, file: None, line: None,
//!             module: None, inlined: false },
//!     Frame { addr: AbsAddr(0x5555_0000_2000), function: None, file: None, line: None,
//!             module: Some("/nonexistent/server".into()), inlined: false },
//! ]);
//! ```
//!
//! It does not:
//! - unwind or map addresses to modules (that is `leakscope-stacks`);
//! - fetch debug info from the network (no debuginfod);
//! - symbolize kernel, JIT or vDSO frames: they come out with no function.
#![deny(missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized};
use leakscope_event::AbsAddr;
use leakscope_stacks::RawFrame;

/// One symbolized frame. A [`RawFrame`] whose address falls in inlined code
/// becomes several: the inlined callees (innermost first, `inlined: true`),
/// then the function they were inlined into.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The raw frame's address (for a return address, not adjusted).
    pub addr: AbsAddr,
    /// Demangled function name, if known.
    pub function: Option<String>,
    /// Source file (with its directory when the debug info has one).
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// Path of the module holding `addr`, if known.
    pub module: Option<String>,
    /// Whether this function was inlined into the next frame.
    pub inlined: bool,
}

/// What one file offset symbolizes to, without the per-frame address.
#[derive(Debug, Clone)]
struct Entry {
    function: String,
    file: Option<String>,
    line: Option<u32>,
    inlined: bool,
}

/// Symbolizes [`RawFrame`]s, caching results by module path and offset.
///
/// Not `Send` (blazesym's symbolizer is not): create it on the thread that
/// renders the report.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    /// (path, looked-up offset) -> entries, innermost first; empty: unknown.
    cache: HashMap<(String, u64), Arc<[Entry]>>,
    /// path -> build id of the file now at that path (hex), read once.
    build_ids: HashMap<String, Option<String>>,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer")
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with demangling, inlined functions and file/line enabled.
    pub fn new() -> Self {
        let inner = blazesym::symbolize::Symbolizer::builder()
            .enable_demangling(true)
            .enable_inlined_fns(true)
            .enable_code_info(true)
            .build();
        Self {
            inner,
            cache: HashMap::new(),
            build_ids: HashMap::new(),
        }
    }

    /// Symbolizes `frames` (innermost first) into one or more [`Frame`]s
    /// each, in the same order.
    ///
    /// Return addresses are looked up at `offset - 1`, inside the call
    /// instruction. Offsets are batched per module and deduplicated; results
    /// are cached across calls. A frame whose module is unknown, unreadable,
    /// or whose file now has a different build id than at capture time comes
    /// out with `function: None` and its module path kept.
    pub fn symbolize(&mut self, frames: &[RawFrame]) -> Vec<Frame> {
        let mut wanted: HashMap<&str, BTreeSet<u64>> = HashMap::new();
        for f in frames {
            if let Some((path, off)) = self.key_of(f) {
                if !self.cache.contains_key(&(path.to_owned(), off)) {
                    wanted.entry(path).or_default().insert(off);
                }
            }
        }
        for (path, offsets) in wanted {
            self.resolve(path, &offsets.into_iter().collect::<Vec<_>>());
        }

        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            let module = f.module.as_ref().map(|m| m.path.clone());
            let entries = self
                .key_of(f)
                .and_then(|(path, off)| self.cache.get(&(path.to_owned(), off)))
                .filter(|e| !e.is_empty());
            match entries {
                Some(entries) => out.extend(entries.iter().map(|e| Frame {
                    addr: f.addr,
                    function: Some(e.function.clone()),
                    file: e.file.clone(),
                    line: e.line,
                    module: module.clone(),
                    inlined: e.inlined,
                })),
                None => out.push(Frame {
                    addr: f.addr,
                    function: None,
                    file: None,
                    line: None,
                    module,
                    inlined: false,
                }),
            }
        }
        out
    }

    /// The (path, offset to look up) of a frame we may symbolize.
    fn key_of<'f>(&mut self, f: &'f RawFrame) -> Option<(&'f str, u64)> {
        let m = f.module.as_ref()?;
        if let Some(want) = &m.build_id {
            let have = self
                .build_ids
                .entry(m.path.clone())
                .or_insert_with(|| read_build_id(&m.path));
            // A rebuilt or replaced file would give confident wrong names.
            if have.as_ref().is_some_and(|have| have != want) {
                return None;
            }
        }
        let off = if f.is_return_address {
            m.offset.0.checked_sub(1)?
        } else {
            m.offset.0
        };
        Some((&m.path, off))
    }

    /// Symbolizes sorted, distinct `offsets` of `path` into the cache.
    fn resolve(&mut self, path: &str, offsets: &[u64]) {
        let src = Source::Elf(Elf::new(path));
        // A missing or unreadable file fails the whole batch: every offset
        // is then unknown.
        let results = self
            .inner
            .symbolize(&src, Input::FileOffset(offsets))
            .unwrap_or_default();
        let mut results = results.into_iter();
        for &off in offsets {
            let entries: Vec<Entry> = match results.next() {
                Some(Symbolized::Sym(sym)) => {
                    let mut v: Vec<Entry> = sym
                        .inlined
                        .iter()
                        .rev()
                        .map(|i| Entry {
                            function: i.name.to_string(),
                            file: i.code_info.as_ref().map(|c| path_string(&c.to_path())),
                            line: i.code_info.as_ref().and_then(|c| c.line),
                            inlined: true,
                        })
                        .collect();
                    v.push(Entry {
                        function: sym.name.to_string(),
                        file: sym.code_info.as_ref().map(|c| path_string(&c.to_path())),
                        line: sym.code_info.as_ref().and_then(|c| c.line),
                        inlined: false,
                    });
                    v
                }
                Some(Symbolized::Unknown(_)) | None => Vec::new(),
            };
            self.cache.insert((path.to_owned(), off), entries.into());
        }
    }
}

fn path_string(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn read_build_id(path: &str) -> Option<String> {
    let id = blazesym::helper::read_elf_build_id(&path).ok()??;
    Some(id.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}
