//! leakscope-symbolize: the symbolization stage.
//!
//! Input: [`RawFrame`]s from `leakscope-stacks` (module path, build id and
//! file offset). Output: [`Frame`]s with function, source file and line, one
//! per inlined call as well. It uses blazesym on the module files themselves
//! (`Source::Elf` with file offsets), so it works after the traced process
//! exited.
//!
//! Names (issue 14):
//! - Only mangled names are demangled ([`demangle`]): C++ by libiberty, so
//!   they read exactly as `c++filt` prints them, Rust by rustc-demangle. A
//!   C function `f` stays `f`.
//! - A function whose debug info has no linkage name (GCC gives none to a
//!   lambda's `operator()`) is named from the symbol table when a mangled
//!   symbol starts where it does, so a lambda keeps its class.
//! - A module without debug info of its own is looked up in its separate
//!   debug file: `/usr/lib/debug/.build-id/xx/yyyy.debug` (Debian's
//!   `-dbgsym` packages) or the file named by `.gnu_debuglink`, checked by
//!   build id; failing that, `.symtab`, then `.dynsym`.
//! - A frame in a module with no symbol for it is named `module+0xVADDR`
//!   (`git+0x1a2b3`): the frame's address (unadjusted, as `addr`) as an ELF
//!   virtual address of the module, the address `nm`, `objdump -d` and
//!   `addr2line -e MODULE` use. When the module file cannot be read any
//!   more, or is not the file that was mapped (another build id), there is
//!   no ELF address to give: `module+0xOFFSET (file offset)`.
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
//! // Nothing is known, and nothing is made up: an address outside any
//! // module has no name; one in a module is named by its place there.
//! assert_eq!(out, [
//!     Frame { addr: AbsAddr(0x7f00_0000_1234), function: None, file: None, line: None,
//!             module: None, inlined: false },
//!     Frame { addr: AbsAddr(0x5555_0000_2000),
//!             function: Some("server+0x2000 (file offset)".into()), file: None, line: None,
//!             module: Some("/nonexistent/server".into()), inlined: false },
//! ]);
//! ```
//!
//! It does not:
//! - unwind or map addresses to modules (that is `leakscope-stacks`);
//! - fetch debug info from the network (no debuginfod);
//! - symbolize kernel, JIT or vDSO frames: they come out with no function;
//! - name an inlined function that has no linkage name in the debug info
//!   (GCC's lambdas, constructors) other than as the debug info does
//!   (`operator()`).
#![deny(missing_docs)]

mod demangle;
mod module;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Sym, Symbolized};
use leakscope_event::AbsAddr;
use leakscope_stacks::RawFrame;

pub use crate::demangle::demangle;
use crate::module::{find_debug_file, ModuleInfo};

/// Where separate debug files are looked for by default, as gdb and
/// blazesym do.
pub const DEFAULT_DEBUG_DIRS: &[&str] = &["/usr/lib/debug", "/lib/debug"];

/// One symbolized frame. A [`RawFrame`] whose address falls in inlined code
/// becomes several: the inlined callees (innermost first, `inlined: true`),
/// then the function they were inlined into.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The raw frame's address (for a return address, not adjusted).
    pub addr: AbsAddr,
    /// Function name, demangled if it was mangled; for a frame in a module
    /// with no symbol for it, `module+0xVADDR` (see the crate docs). `None`
    /// only for an address in no known module.
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

/// A module file as read once: its headers, and its separate debug file
/// when it has no DWARF of its own.
#[derive(Debug)]
struct Module {
    info: ModuleInfo,
    debug_file: Option<PathBuf>,
}

/// Symbolizes [`RawFrame`]s, caching results by module path and offset.
///
/// Not `Send` (blazesym's symbolizer is not): create it on the thread that
/// renders the report.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    /// (path, looked-up offset) -> entries, innermost first; empty: unknown.
    cache: HashMap<(String, u64), Arc<[Entry]>>,
    /// path -> the file now at that path; `None`: unreadable.
    modules: HashMap<String, Option<Arc<Module>>>,
    debug_dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer")
            .field("cached", &self.cache.len())
            .field("debug_dirs", &self.debug_dirs)
            .finish_non_exhaustive()
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// A symbolizer with inlined functions and file/line, looking for
    /// separate debug files in [`DEFAULT_DEBUG_DIRS`].
    pub fn new() -> Self {
        Self::with_debug_dirs(DEFAULT_DEBUG_DIRS.iter().map(PathBuf::from).collect())
    }

    /// Like [`new`](Self::new), with other directories for separate debug
    /// files (each holding a `.build-id/` tree and/or debug-link targets).
    pub fn with_debug_dirs(debug_dirs: Vec<PathBuf>) -> Self {
        let inner = blazesym::symbolize::Symbolizer::builder()
            // Names are demangled by `demangle`, which leaves names that
            // are not mangled alone; blazesym's would turn `f` into `float`.
            .enable_demangling(false)
            .enable_inlined_fns(true)
            .enable_code_info(true)
            .set_debug_dirs(Some(&debug_dirs))
            .build();
        Self {
            inner,
            cache: HashMap::new(),
            modules: HashMap::new(),
            debug_dirs,
        }
    }

    /// Symbolizes `frames` (innermost first) into one or more [`Frame`]s
    /// each, in the same order.
    ///
    /// Return addresses are looked up at `offset - 1`, inside the call
    /// instruction. Offsets are batched per module and deduplicated; results
    /// are cached across calls. A frame whose module has no symbol for it,
    /// is unreadable, or whose file now has a different build id than at
    /// capture time is named `module+0x...` with its module path kept.
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
                    function: self.place_of(f),
                    file: None,
                    line: None,
                    module,
                    inlined: false,
                }),
            }
        }
        out
    }

    /// The file now at `path`, read once.
    fn module(&mut self, path: &str) -> Option<Arc<Module>> {
        if let Some(m) = self.modules.get(path) {
            return m.clone();
        }
        let m = ModuleInfo::read(Path::new(path)).map(|info| {
            let debug_file = if info.has_dwarf {
                None
            } else {
                find_debug_file(Path::new(path), &info, &self.debug_dirs)
            };
            Arc::new(Module { info, debug_file })
        });
        self.modules.insert(path.to_owned(), m.clone());
        m
    }

    /// Whether the file at the frame's path is the one that was mapped.
    fn same_file(&mut self, m: &leakscope_stacks::ModuleRef) -> bool {
        let Some(want) = &m.build_id else {
            return true;
        };
        // A rebuilt or replaced file would give confident wrong names.
        match self.module(&m.path) {
            Some(now) => now.info.build_id.as_ref().is_none_or(|have| have == want),
            None => true,
        }
    }

    /// The (path, offset to look up) of a frame we may symbolize.
    fn key_of<'f>(&mut self, f: &'f RawFrame) -> Option<(&'f str, u64)> {
        let m = f.module.as_ref()?;
        if !self.same_file(m) {
            return None;
        }
        let off = if f.is_return_address {
            m.offset.0.checked_sub(1)?
        } else {
            m.offset.0
        };
        Some((&m.path, off))
    }

    /// `git+0x1a2b3` for a frame no symbol covers: its ELF virtual address
    /// in its module, or its file offset when the module's headers are not
    /// those of the file that was mapped (see the crate docs).
    fn place_of(&mut self, f: &RawFrame) -> Option<String> {
        let m = f.module.as_ref()?;
        let base = m.path.rsplit('/').next().unwrap_or(&m.path);
        let vaddr = if self.same_file(m) {
            self.module(&m.path)
                .and_then(|now| now.info.vaddr(m.offset.0))
        } else {
            None
        };
        Some(match vaddr {
            Some(v) => format!("{base}+{v:#x}"),
            None => format!("{base}+{:#x} (file offset)", m.offset.0),
        })
    }

    /// Symbolizes sorted, distinct `offsets` of `path` into the cache.
    fn resolve(&mut self, path: &str, offsets: &[u64]) {
        let module = self.module(path);
        // A module without DWARF is looked up in its debug file, by ELF
        // virtual address (the debug file's segments have no file bytes).
        let debug_file = module.as_ref().and_then(|m| m.debug_file.clone());
        let lookup = |off: u64| match (&module, &debug_file) {
            (Some(m), Some(_)) => m.info.vaddr(off),
            _ => Some(off),
        };
        let valid: Vec<(u64, u64)> = offsets
            .iter()
            .filter_map(|&off| lookup(off).map(|at| (off, at)))
            .collect();
        let addrs: Vec<u64> = valid.iter().map(|&(_, at)| at).collect();
        let (src, input): (Source, Input<&[u64]>) = match &debug_file {
            Some(d) => (Source::Elf(Elf::new(d)), Input::VirtOffset(&addrs)),
            None => (Source::Elf(Elf::new(path)), Input::FileOffset(&addrs)),
        };
        // A missing or unreadable file fails the whole batch: every offset
        // is then unknown.
        let results = self.inner.symbolize(&src, input).unwrap_or_default();

        // Debug info without a linkage name (GCC gives a lambda's
        // operator() none, and C functions never have one) names a
        // function as it is spelled in the source. The symbol table, when
        // it has a mangled symbol starting at the same place, has the
        // full name.
        let plain: Vec<(usize, u64)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Symbolized::Sym(sym) if !is_mangled(&sym.name) => Some((i, addrs[i])),
                _ => None,
            })
            .collect();
        let mut symtab_names: HashMap<usize, String> = HashMap::new();
        if !plain.is_empty() {
            let own_symtab = module.as_ref().is_some_and(|m| m.info.has_symtab);
            let syms = match &debug_file {
                // A stripped module's full symbol table went to its debug
                // file with its DWARF.
                Some(d) if !own_symtab => {
                    let at: Vec<u64> = plain.iter().map(|&(_, a)| a).collect();
                    self.inner
                        .symbolize(&Source::Elf(elf_symbols_only(d)), Input::VirtOffset(&at))
                }
                _ => {
                    let offs: Vec<u64> = plain.iter().map(|&(i, _)| valid[i].0).collect();
                    self.inner.symbolize(
                        &Source::Elf(elf_symbols_only(Path::new(path))),
                        Input::FileOffset(&offs),
                    )
                }
            };
            collect_mangled(
                &plain,
                &results,
                syms.unwrap_or_default(),
                &mut symtab_names,
            );
        }

        let mut found: HashMap<u64, Vec<Entry>> = HashMap::new();
        for (i, (r, &(off, _))) in results.iter().zip(&valid).enumerate() {
            let Symbolized::Sym(sym) = r else {
                continue;
            };
            let mut v: Vec<Entry> = sym
                .inlined
                .iter()
                .rev()
                .map(|inl| Entry {
                    function: demangle(&inl.name).into_owned(),
                    file: inl.code_info.as_ref().map(|c| path_string(&c.to_path())),
                    line: inl.code_info.as_ref().and_then(|c| c.line),
                    inlined: true,
                })
                .collect();
            let name = symtab_names.get(&i).map_or(&*sym.name, String::as_str);
            v.push(Entry {
                function: demangle(name).into_owned(),
                file: sym.code_info.as_ref().map(|c| path_string(&c.to_path())),
                line: sym.code_info.as_ref().and_then(|c| c.line),
                inlined: false,
            });
            found.insert(off, v);
        }
        for &off in offsets {
            let entries = found.remove(&off).unwrap_or_default();
            self.cache.insert((path.to_owned(), off), entries.into());
        }
    }
}

/// Whether `name` is a mangled C++ or Rust name (not whether it demangles).
fn is_mangled(name: &str) -> bool {
    name.starts_with("_Z") || name.starts_with("_R")
}

/// A source that reads only the ELF symbol tables of `path`.
fn elf_symbols_only(path: &Path) -> Elf {
    let mut elf = Elf::new(path);
    elf.debug_syms = false;
    elf
}

/// For each `plain[k] = (i, _)`, records in `names[i]` the symbol-table
/// name `syms[k]` if it is mangled and starts where `results[i]` does.
fn collect_mangled(
    plain: &[(usize, u64)],
    results: &[Symbolized<'_>],
    syms: Vec<Symbolized<'_>>,
    names: &mut HashMap<usize, String>,
) {
    for (&(i, _), s) in plain.iter().zip(syms) {
        let (Symbolized::Sym(from_symtab), Symbolized::Sym(from_dwarf)) = (s, &results[i]) else {
            continue;
        };
        if is_mangled(&from_symtab.name) && starts_alike(&from_symtab, from_dwarf) {
            names.insert(i, from_symtab.name.into_owned());
        }
    }
}

/// Whether two lookups of one address found functions that start at the
/// same place (a `.cold` part has a symbol of its own, elsewhere).
fn starts_alike(a: &Sym<'_>, b: &Sym<'_>) -> bool {
    a.addr == b.addr
}

fn path_string(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}
