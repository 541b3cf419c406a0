//! What symbolization needs to know about one module file besides its
//! symbols: where its code is in the ELF address space, and where its
//! separate debug info is when the file itself has none.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSegment};

/// One `PT_LOAD` segment: file bytes `offset..offset + filesz` are mapped
/// at ELF virtual address `vaddr`.
#[derive(Debug, Clone, Copy)]
struct Load {
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// A module file, read once.
#[derive(Debug, Default)]
pub(crate) struct ModuleInfo {
    loads: Vec<Load>,
    /// `.note.gnu.build-id`, lowercase hex.
    pub(crate) build_id: Option<String>,
    /// The file name in `.gnu_debuglink`, if any.
    pub(crate) debuglink: Option<String>,
    /// Whether the file has DWARF (`.debug_info`) of its own.
    pub(crate) has_dwarf: bool,
    /// Whether the file has a full symbol table (`.symtab`), not only the
    /// dynamic one.
    pub(crate) has_symtab: bool,
}

impl ModuleInfo {
    /// Reads the headers of `path`; `None` if it cannot be read or parsed.
    pub(crate) fn read(path: &Path) -> Option<ModuleInfo> {
        let file = std::fs::File::open(path).ok()?;
        // SAFETY: read-only, and dropped before we return; the few values
        // kept are copied out. A concurrent truncation could still fault,
        // as for any mmap reader (leakscope-stacks reads modules the same
        // way).
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let obj = object::File::parse(&*map).ok()?;
        let loads = obj
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                Load {
                    offset,
                    vaddr: s.address(),
                    filesz,
                }
            })
            .collect();
        let build_id = obj.build_id().ok().flatten().map(hex);
        let debuglink = obj
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, _crc)| String::from_utf8_lossy(name).into_owned());
        // A stripped file may keep empty or NOBITS debug sections.
        let has_data = |name: &str| {
            obj.section_by_name(name)
                .is_some_and(|s| s.file_range().is_some_and(|(_, len)| len > 0))
        };
        Some(ModuleInfo {
            loads,
            build_id,
            debuglink,
            has_dwarf: has_data(".debug_info"),
            has_symtab: has_data(".symtab"),
        })
    }

    /// The ELF virtual address (as `nm`, `objdump` and `addr2line` use
    /// them) of a file offset, if a `PT_LOAD` segment maps it.
    pub(crate) fn vaddr(&self, offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|l| l.offset <= offset && offset - l.offset < l.filesz)
            .map(|l| l.vaddr + (offset - l.offset))
    }
}

/// Where gdb looks for the separate debug file of `path` (GDB manual,
/// "Separate Debug Files"): `DIR/.build-id/xx/yyyy.debug` for each debug
/// directory (Debian's `-dbgsym` packages install there), then the
/// `.gnu_debuglink` name next to the file, in its `.debug/` directory, and
/// under each debug directory followed by the file's own directory. The
/// first candidate with the module's build id wins: a debug file for
/// another build would give confident wrong names. A module without a
/// build id is left to blazesym, which checks the debug link's CRC.
pub(crate) fn find_debug_file(
    path: &Path,
    info: &ModuleInfo,
    debug_dirs: &[PathBuf],
) -> Option<PathBuf> {
    let want = info.build_id.as_deref()?;
    let mut candidates = Vec::new();
    if want.len() > 2 {
        let (head, tail) = want.split_at(2);
        for dir in debug_dirs {
            candidates.push(
                dir.join(".build-id")
                    .join(head)
                    .join(format!("{tail}.debug")),
            );
        }
    }
    if let Some(link) = &info.debuglink {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(dir) = canonical.parent() {
            candidates.push(dir.join(link));
            candidates.push(dir.join(".debug").join(link));
            let relative = dir.strip_prefix("/").unwrap_or(dir);
            for debug_dir in debug_dirs {
                candidates.push(debug_dir.join(relative).join(link));
            }
        }
    }
    candidates.into_iter().find(|c| {
        c.as_path() != path
            && c.is_file()
            && ModuleInfo::read(c).is_some_and(|d| d.build_id.as_deref() == Some(want))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
