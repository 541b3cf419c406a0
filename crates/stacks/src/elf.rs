//! What the unwinder needs from one ELF file, read once per path.

use std::fmt::Write as _;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSegment};

/// Section bytes shared between every framehop module made from one file.
pub(crate) type Bytes = Arc<[u8]>;

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) offset: u64,
    pub(crate) vaddr: u64,
    pub(crate) filesz: u64,
    pub(crate) exec: bool,
}

/// The parts of an ELF file that unwinding and module naming use.
#[derive(Debug, Default)]
pub(crate) struct ElfInfo {
    /// `.note.gnu.build-id`, lowercase hex.
    pub(crate) build_id: Option<String>,
    pub(crate) loads: Vec<Load>,
    pub(crate) text_svma: Option<Range<u64>>,
    pub(crate) got_svma: Option<Range<u64>>,
    pub(crate) eh_frame: Option<(Range<u64>, Bytes)>,
    pub(crate) eh_frame_hdr: Option<(Range<u64>, Bytes)>,
    pub(crate) debug_frame: Option<Bytes>,
    /// The file bytes of each executable `PT_LOAD`, by file offset: the
    /// code around return addresses (see [`ElfInfo::code`]).
    pub(crate) code: Vec<(u64, Bytes)>,
}

impl ElfInfo {
    /// Reads `path`. The file is mapped only while reading: the few sections
    /// kept are copied, so a file replaced later cannot fault us (SIGBUS).
    pub(crate) fn read(path: &str) -> Result<ElfInfo, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
        // SAFETY: the mapping is read-only and dropped before we return; a
        // concurrent truncation could still fault, as for any mmap reader.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map {path}: {e}"))?;
        let obj = object::File::parse(&*map).map_err(|e| format!("cannot parse {path}: {e}"))?;

        let build_id = obj.build_id().ok().flatten().map(|id| {
            id.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        });
        let loads = obj
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                Load {
                    offset,
                    vaddr: s.address(),
                    filesz,
                    exec: matches!(
                        s.flags(),
                        object::SegmentFlags::Elf { p_flags, .. } if p_flags.contains(object::elf::PF_X)
                    ),
                }
            })
            .collect();
        let range = |name: &str| {
            obj.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        let data = |name: &str| -> Option<(Range<u64>, Bytes)> {
            let s = obj.section_by_name(name)?;
            let bytes = s.data().ok()?;
            Some((s.address()..s.address() + s.size(), Arc::from(bytes)))
        };
        let eh_frame = data(".eh_frame");
        // .debug_frame is only worth copying when there is no .eh_frame.
        let debug_frame = if eh_frame.is_none() {
            data(".debug_frame").map(|(_, d)| d)
        } else {
            None
        };
        let code = obj
            .segments()
            .filter(|s| {
                matches!(
                    s.flags(),
                    object::SegmentFlags::Elf { p_flags, .. } if p_flags.contains(object::elf::PF_X)
                )
            })
            .filter_map(|s| {
                let (offset, _) = s.file_range();
                Some((offset, Arc::from(s.data().ok()?)))
            })
            .collect();
        Ok(ElfInfo {
            code,
            build_id,
            loads,
            text_svma: range(".text"),
            got_svma: range(".got"),
            eh_frame,
            eh_frame_hdr: data(".eh_frame_hdr"),
            debug_frame,
        })
    }

    /// The address where the file's virtual address 0 sits in a process that
    /// mapped file offset `offset` at `start` (the "load bias").
    pub(crate) fn base_avma(&self, start: u64, offset: u64) -> u64 {
        // The kernel maps whole pages, so the mapping's offset is the
        // segment's p_offset rounded down to a page.
        // Segments can share a page in older layouts (no -z separate-code),
        // so prefer the executable one that starts in the mapping's first page.
        let starts_here = |l: &&Load| l.offset & !0xfff == offset;
        let seg = self
            .loads
            .iter()
            .filter(starts_here)
            .find(|l| l.exec)
            .or_else(|| self.loads.iter().find(starts_here))
            .or_else(|| {
                self.loads
                    .iter()
                    .find(|l| l.offset & !0xfff <= offset && offset < l.offset + l.filesz)
            });
        match seg {
            // vaddr of `offset` = p_vaddr + (offset - p_offset)
            Some(l) => start
                .wrapping_sub(l.vaddr)
                .wrapping_sub(offset)
                .wrapping_add(l.offset),
            None => start.wrapping_sub(offset),
        }
    }

    /// `N` bytes of code at file offset `off`, if an executable segment
    /// holds them all.
    pub(crate) fn code<const N: usize>(&self, off: u64) -> Option<[u8; N]> {
        self.code.iter().find_map(|(start, bytes)| {
            let at = usize::try_from(off.checked_sub(*start)?).ok()?;
            bytes.get(at..at.checked_add(N)?)?.try_into().ok()
        })
    }

    /// Section ranges and data in framehop's form.
    pub(crate) fn section_info(&self) -> framehop::ExplicitModuleSectionInfo<Bytes> {
        framehop::ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text_svma.clone(),
            got_svma: self.got_svma.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, d)| d.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
            debug_frame: self.debug_frame.clone(),
            ..Default::default()
        }
    }
}
