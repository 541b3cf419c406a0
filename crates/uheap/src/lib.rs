//! leakscope-uheap: the eBPF heap backend for a process that is already
//! running.
//!
//! Input: a pid (and, with [`Config`], another allocator's symbol prefix or
//! a sampling rate). Output: [`Event::Alloc`] / [`Event::Free`] for the
//! blocks the process allocates from now on, [`Event::Map`] for its
//! executable mappings (read from `/proc/PID/maps` at attach, with time 0;
//! later `mmap(PROT_EXEC)`s such as `dlopen` as they happen),
//! [`Event::Fork`] / [`Event::Exec`] / [`Event::Exit`] and [`Event::HeapEnd`],
//! plus [`RawStack`]s on demand. The ledger does the bookkeeping.
//!
//! How: uprobes on the allocator that the process maps (`libc.so.6`; for a
//! static executable the executable itself; with
//! [`Config::allocator_prefix`] the first module defining
//! `<prefix>malloc`, e.g. `je_malloc`), attached for that pid only, on
//! `malloc`, `calloc`, `realloc`, `reallocarray`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` (each if defined) and
//! `free`. The entry probe keeps the size per thread; the return probe gets
//! the address and copies the registers and up to 8 KiB of user stack into
//! a kernel hash map keyed by (tgid, address). At a uretprobe the registers
//! are the caller's right after the call returned, so the copy unwinds from
//! the allocator's caller. `free` deletes the entry, so only stacks of
//! blocks still allocated ever reach user space. Frees of blocks allocated
//! before attach are ignored. A `realloc` is a free of the old block (at its
//! entry, before another thread can get the address) and an allocation of
//! the new one. Children forked after attach are followed: a
//! `tp_btf/sched_process_fork` program marks them, and this loader attaches
//! their probes when it reads the fork record (what they allocate before
//! that is not seen).
//!
//! ```no_run
//! use leakscope_event::{Backend, Pid};
//! let mut tracer = leakscope_uheap::HeapTracer::new(Default::default()).unwrap();
//! tracer.attach(Pid(4242)).unwrap();
//! let mut events = Vec::new();
//! tracer.poll(std::time::Duration::from_millis(100), &mut |e| events.push(e)).unwrap();
//! // Event::Map { time: TimeNs(0), .. } for each executable mapping, then
//! // Event::Alloc { pid: Pid(4242), size: 64, stack: StackId(17), .. }, ...
//! ```
//!
//! Costs (see `bench/heap_attach.sh`): each traced allocation costs a
//! uprobe, a uretprobe and an 8 KiB stack copy (a few µs); `free` one
//! uprobe, placed past glibc's first instruction so that the kernel need
//! not single-step it. [`Config::sample_every`] records 1 of N allocations.
//!
//! It does not:
//! - launch programs (the preload shim does; [`Backend::spawn`] fails);
//! - unwind, symbolize, or decide what leaked;
//! - follow a traced process across `execve` (its heap ends there);
//! - see `operator new` or jemalloc's `mallocx` family unless they call the
//!   probed functions (glibc's libstdc++ `operator new` calls `malloc`);
//! - see blocks a forked child allocates before its probes are attached.
#![deny(missing_docs)]

mod records;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::rc::Rc;
use std::time::Duration;

use leakscope_event::{
    AbsAddr, Backend, Event, FileOffset, Mapping, Pid, RawStack, StackId, Tid, TimeNs,
};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder, UprobeOpts};

use records::*;

#[allow(clippy::all, missing_docs, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/uheap.skel.rs"));
}

/// Errors of the heap uprobe backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or attaching the BPF programs failed.
    #[error(transparent)]
    Load(#[from] leakscope_bpf::LoadError),
    /// `/proc/PID/maps` could not be read (no such process, or not ours).
    #[error("cannot read /proc/{pid}/maps")]
    Maps {
        /// The process.
        pid: Pid,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No mapped module defines the allocator's functions.
    #[error("pid {pid} maps no module defining `{symbol}` and `{free}` (looked in: {looked})")]
    NoAllocator {
        /// The process.
        pid: Pid,
        /// The malloc symbol looked for (`malloc`, `je_malloc`, ...).
        symbol: String,
        /// The free symbol looked for.
        free: String,
        /// Modules searched.
        looked: String,
    },
    /// A uprobe was refused with EINVAL: most likely another tool holds a
    /// uprobe at the same offset with a different `ref_ctr_offset`.
    #[error(
        "attaching a uprobe to {func} in {path} for pid {pid} failed with EINVAL: another \
         tool (memleak-bpfcc, bpftrace, a USDT user) probably holds uprobes at the same \
         offsets with a different ref_ctr_offset, and the kernel allows one per inode and \
         offset (dmesg: \"ref_ctr_offset mismatch\"); stop it and retry"
    )]
    UprobeConflict {
        /// The process.
        pid: Pid,
        /// The allocator file.
        path: String,
        /// The function.
        func: String,
        /// What libbpf said.
        #[source]
        source: libbpf_rs::Error,
    },
    /// A uprobe could not be attached for another reason.
    #[error("attaching a uprobe to {func} in {path} for pid {pid} failed")]
    Attach {
        /// The process.
        pid: Pid,
        /// The allocator file.
        path: String,
        /// The function.
        func: String,
        /// What libbpf said.
        #[source]
        source: libbpf_rs::Error,
    },
}

/// Tracer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Symbol prefix of the allocator to probe instead of libc's, e.g.
    /// `je_` for a jemalloc built with a prefix (`je_malloc`, `je_free`).
    /// `Some("")` probes the first module that defines `malloc` and `free`
    /// (an executable that links its own allocator statically).
    pub allocator_prefix: Option<String>,
    /// Record 1 of every N allocations (and all their frees); 0 or 1
    /// records all. Counts and bytes are then those of the sample; the
    /// skipped allocations are reported as [`Event::Lost`] and in
    /// [`HeapTracer::notes`].
    pub sample_every: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allocator_prefix: None,
            sample_every: 1,
        }
    }
}

/// The allocator module chosen in one process.
#[derive(Debug, Clone)]
struct Allocator {
    /// Path as the process maps it.
    path: String,
    /// Path to open from here (`/proc/PID/root/...`).
    open_path: PathBuf,
    /// (function kind, symbol name, offset into the function for the probe).
    functions: Vec<(usize, String, usize)>,
}

/// A record decoded from the ring buffer, before the loader acts on it.
enum Record {
    Alloc {
        event: Event,
        seq: u64,
    },
    Free {
        event: Event,
        seq: u64,
    },
    Fork {
        time: TimeNs,
        parent: Pid,
        child: Pid,
    },
    Exec {
        time: TimeNs,
        pid: Pid,
    },
    Exit {
        time: TimeNs,
        pid: Pid,
    },
    Mmap {
        time: TimeNs,
        pid: Pid,
        addr: u64,
    },
}

/// A loaded eBPF heap tracer; [`Backend::attach`] adds processes.
pub struct HeapTracer {
    config: Config,
    base: u64,
    skel: skel::UheapSkel<'static>,
    ring: RingBuffer<'static>,
    queue: Rc<RefCell<Vec<Record>>>,
    /// Events produced by the loader itself (attach-time maps).
    pending: Vec<Event>,
    /// Tracepoint links (fork, exec, exit, mmap).
    links: Vec<libbpf_rs::Link>,
    /// Uprobe links per traced process.
    probes: HashMap<Pid, Vec<libbpf_rs::Link>>,
    allocators: HashMap<Pid, Allocator>,
    /// Stack id -> the block it belongs to.
    ids: HashMap<u64, (Pid, u64)>,
    /// Stacks read out of the kernel.
    stacks: HashMap<u64, RawStack>,
    /// Counter values already reported.
    lost_seen: u64,
    sampled_seen: u64,
    /// Things the report should say (failed child attaches, ...).
    notes: Vec<String>,
}

fn is_einval(e: &libbpf_rs::Error) -> bool {
    matches!(e.kind(), libbpf_rs::ErrorKind::InvalidInput)
        || e.to_string().contains("Invalid argument")
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq)]
struct MapsLine {
    start: u64,
    end: u64,
    exec: bool,
    offset: u64,
    path: String,
}

fn parse_maps(text: &str) -> Vec<MapsLine> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (range, perms, off) = (f.next()?, f.next()?, f.next()?);
            let _dev = f.next()?;
            let _inode = f.next()?;
            let path = f.collect::<Vec<_>>().join(" ");
            let path = path.strip_suffix(" (deleted)").unwrap_or(&path).to_string();
            let (s, e) = range.split_once('-')?;
            Some(MapsLine {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                offset: u64::from_str_radix(off, 16).ok()?,
                path,
            })
        })
        .collect()
}

fn read_maps(pid: Pid) -> io::Result<Vec<MapsLine>> {
    Ok(parse_maps(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

fn file_mapping(l: &MapsLine) -> Option<Mapping> {
    (l.exec && l.path.starts_with('/')).then(|| Mapping {
        start: AbsAddr(l.start),
        end: AbsAddr(l.end),
        offset: FileOffset(l.offset),
        path: l.path.clone(),
    })
}

/// Defined function symbols of an ELF file: name -> file offset of the code.
fn elf_functions(data: &[u8]) -> HashMap<String, u64> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    use object::{Endianness, Object, ObjectSymbol, SymbolKind};
    let mut out = HashMap::new();
    let Ok(elf) = ElfFile64::<Endianness>::parse(data) else {
        return out;
    };
    let endian = elf.endian();
    let loads: Vec<(u64, u64, u64)> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| (ph.p_vaddr(endian), ph.p_filesz(endian), ph.p_offset(endian)))
        .collect();
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if !sym.is_definition() || sym.kind() != SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let addr = sym.address();
        let Some(off) = loads
            .iter()
            .find(|(v, sz, _)| *v <= addr && addr < v + sz)
            .map(|(v, _, o)| addr - v + o)
        else {
            continue;
        };
        out.entry(name.to_string()).or_insert(off);
    }
    out
}

/// Where to place the probe on `free`, given its first bytes.
///
/// A uprobe on an instruction the kernel cannot emulate is single-stepped
/// out of line: on this VM that made each `free` cost ~15 µs instead of
/// ~0.44 µs (PLATFORM.md §10). glibc's `free` starts with `test %rdi,%rdi`
/// (single-stepped) followed by a conditional jump (emulated); the argument
/// is still in %rdi at the jump, so the probe goes there.
fn free_probe_offset(code: &[u8]) -> usize {
    let test_rdi = [0x48, 0x85, 0xff];
    let jcc = match code.get(3..) {
        Some([0x0f, b, ..]) => (0x80..=0x8f).contains(b),
        Some([b, ..]) => (0x70..=0x7f).contains(b),
        _ => false,
    };
    if cfg!(target_arch = "x86_64") && code.starts_with(&test_rdi) && jcc {
        3
    } else {
        0
    }
}

impl HeapTracer {
    /// Loads the programs and attaches the tracepoints. Nothing is traced
    /// until [`Backend::attach`].
    pub fn new(config: Config) -> Result<HeapTracer, Error> {
        leakscope_bpf::quiet_libbpf();
        leakscope_bpf::ensure_tracefs()
            .map_err(|e| Error::from(leakscope_bpf::LoadError::Tracefs(e)))?;
        let open_object = Box::leak(Box::new(MaybeUninit::uninit()));
        let builder = skel::UheapSkelBuilder::default();
        let mut open = builder
            .open(open_object)
            .map_err(leakscope_bpf::step("open"))?;
        leakscope_bpf::request_verifier_log(open.open_object_mut());
        if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
            ro.sample_every = config.sample_every.max(1);
            ro.follow_forks = 1;
        }
        let skel = open.load().map_err(leakscope_bpf::step("load"))?;
        let mut links = Vec::new();
        for prog in [
            &skel.progs.on_fork,
            &skel.progs.on_exec,
            &skel.progs.on_exit_task,
            &skel.progs.on_mmap_enter,
            &skel.progs.on_mmap_exit,
        ] {
            let link = prog.attach().map_err(leakscope_bpf::step("attach"))?;
            links.push(link);
        }
        let handle =
            MapHandle::try_from(&skel.maps.events).map_err(leakscope_bpf::step("ring buffer"))?;
        let handle: &'static MapHandle = Box::leak(Box::new(handle));
        let queue: Rc<RefCell<Vec<Record>>> = Rc::default();
        let q = queue.clone();
        let base = leakscope_bpf::monotonic_ns();
        let mut rb = RingBufferBuilder::new();
        rb.add(handle, move |bytes: &[u8]| {
            if let Some(r) = decode(bytes, base) {
                q.borrow_mut().push(r);
            }
            0
        })
        .map_err(leakscope_bpf::step("ring buffer"))?;
        let ring = rb.build().map_err(leakscope_bpf::step("ring buffer"))?;
        Ok(HeapTracer {
            config,
            base,
            skel,
            ring,
            queue,
            pending: Vec::new(),
            links,
            probes: HashMap::new(),
            allocators: HashMap::new(),
            ids: HashMap::new(),
            stacks: HashMap::new(),
            lost_seen: 0,
            sampled_seen: 0,
            notes: Vec::new(),
        })
    }

    /// Starts tracing the heap of the running process `pid` (and of the
    /// children it forks from now on). Its executable mappings arrive as
    /// [`Event::Map`] at time 0 with the next [`HeapTracer::poll`].
    pub fn trace_pid(&mut self, pid: Pid) -> Result<(), Error> {
        let maps = read_maps(pid).map_err(|source| Error::Maps { pid, source })?;
        let alloc = self.find_allocator(pid, &maps)?;
        for l in &maps {
            if let Some(mapping) = file_mapping(l) {
                self.pending.push(Event::Map {
                    time: TimeNs(0),
                    pid,
                    mapping,
                });
            }
        }
        self.attach_probes(pid, alloc)
    }

    /// The module to probe in `pid` and its functions.
    fn find_allocator(&self, pid: Pid, maps: &[MapsLine]) -> Result<Allocator, Error> {
        let prefix = self.config.allocator_prefix.as_deref();
        let malloc = format!("{}malloc", prefix.unwrap_or(""));
        let free = format!("{}free", prefix.unwrap_or(""));
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        // Candidates in order: with a prefix, every module; else libc, then
        // the executable (static), then any module defining malloc.
        let mut paths: Vec<&str> = Vec::new();
        for l in maps.iter().filter(|l| l.exec && l.path.starts_with('/')) {
            if !paths.contains(&l.path.as_str()) {
                paths.push(&l.path);
            }
        }
        let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
        if prefix.is_none() {
            paths.sort_by_key(|p| {
                if base(p).starts_with("libc.so") {
                    0
                } else if Some(*p) == exe.as_deref() {
                    1
                } else {
                    2
                }
            });
        }
        for path in &paths {
            let open_path = PathBuf::from(format!("/proc/{pid}/root{path}"));
            let Ok(data) = std::fs::read(&open_path) else {
                continue;
            };
            let syms = elf_functions(&data);
            if !(syms.contains_key(&malloc) && syms.contains_key(&free)) {
                continue;
            }
            let mut functions = Vec::new();
            for (kind, name) in FUNCTIONS.iter().enumerate() {
                let sym = format!("{}{name}", prefix.unwrap_or(""));
                let Some(&off) = syms.get(&sym) else { continue };
                let skip = if kind == FN_FREE {
                    let at = off as usize;
                    free_probe_offset(data.get(at..at + 16).unwrap_or(&[]))
                } else {
                    0
                };
                functions.push((kind, sym, skip));
            }
            return Ok(Allocator {
                path: path.to_string(),
                open_path,
                functions,
            });
        }
        Err(Error::NoAllocator {
            pid,
            symbol: malloc,
            free,
            looked: paths.iter().map(|p| base(p)).collect::<Vec<_>>().join(", "),
        })
    }

    fn attach_probes(&mut self, pid: Pid, alloc: Allocator) -> Result<(), Error> {
        // Mark first: a probe fires as soon as it is attached.
        self.skel
            .maps
            .traced
            .update(&pid.0.to_ne_bytes(), &[1u8], MapFlags::ANY)
            .map_err(leakscope_bpf::step("map update"))?;
        let mut links = Vec::new();
        let result = (|| {
            for (kind, sym, skip) in &alloc.functions {
                let rets: &[bool] = if *kind == FN_FREE {
                    &[false]
                } else {
                    &[false, true]
                };
                for &retprobe in rets {
                    let prog = if retprobe {
                        &self.skel.progs.on_return
                    } else {
                        &self.skel.progs.on_entry
                    };
                    let opts = UprobeOpts {
                        cookie: *kind as u64,
                        retprobe,
                        func_name: Some(sym.clone()),
                        ..Default::default()
                    };
                    let offset = if retprobe { 0 } else { *skip };
                    let link = prog
                        .attach_uprobe_with_opts(pid.0 as i32, &alloc.open_path, offset, opts)
                        .map_err(|source| {
                            let (path, func) = (alloc.path.clone(), sym.clone());
                            if is_einval(&source) {
                                Error::UprobeConflict {
                                    pid,
                                    path,
                                    func,
                                    source,
                                }
                            } else if leakscope_bpf::is_permission(&source) {
                                leakscope_bpf::LoadError::libbpf("uprobe attach", source).into()
                            } else {
                                Error::Attach {
                                    pid,
                                    path,
                                    func,
                                    source,
                                }
                            }
                        })?;
                    links.push(link);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.skel.maps.traced.delete(&pid.0.to_ne_bytes());
            return Err(e);
        }
        self.probes.insert(pid, links);
        self.allocators.insert(pid, alloc);
        Ok(())
    }

    /// The allocator file probed in `pid`, if it is traced.
    pub fn allocator(&self, pid: Pid) -> Option<&str> {
        self.allocators.get(&pid).map(|a| a.path.as_str())
    }

    /// The allocator functions probed in `pid` (symbol names).
    pub fn probed_functions(&self, pid: Pid) -> Vec<&str> {
        self.allocators
            .get(&pid)
            .map(|a| a.functions.iter().map(|f| f.1.as_str()).collect())
            .unwrap_or_default()
    }

    /// What a report should say about this trace: sampling, stacks dropped
    /// because the kernel map was full, children that could not be attached.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let n = self.config.sample_every;
        if n > 1 {
            notes.push(format!(
                "heap sampled: 1 of {n} allocations recorded ({} skipped, counted as lost); \
                 counts and bytes are of the sample",
                self.counter(CNT_SAMPLED_OUT)
            ));
        }
        let full = self.counter(CNT_BLOB_FULL);
        if full > 0 {
            notes.push(format!(
                "{full} heap blocks tracked without a stack (the kernel stack map was full)"
            ));
        }
        let untracked = self.counter(CNT_LIVE_FULL);
        if untracked > 0 {
            notes.push(format!(
                "{untracked} heap blocks not tracked (the kernel block maps were full)"
            ));
        }
        notes.extend(self.notes.iter().cloned());
        notes
    }

    /// Waits up to `timeout` for events and hands each to `sink`, in order.
    /// Losses since the last call arrive as [`Event::Lost`].
    pub fn poll(&mut self, timeout: Duration, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        for e in self.pending.drain(..) {
            sink(e);
        }
        leakscope_bpf::poll_ring(&self.ring, timeout)?;
        self.flush(sink)
    }

    /// Reads everything already in the ring buffer.
    pub fn flush(&mut self, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        for e in self.pending.drain(..) {
            sink(e);
        }
        // Records are submitted without a wakeup until enough wait, so
        // read what is there even after a timed-out poll.
        self.ring
            .consume()
            .map_err(leakscope_bpf::step("ring buffer consume"))?;
        let records = std::mem::take(&mut *self.queue.borrow_mut());
        for r in records {
            self.apply(r, sink);
        }
        let lost = self.counter(CNT_RB_DROP) + self.counter(CNT_LIVE_FULL);
        let sampled = self.counter(CNT_SAMPLED_OUT);
        let new = (lost - self.lost_seen.min(lost)) + (sampled - self.sampled_seen.min(sampled));
        if new > 0 {
            sink(Event::Lost {
                time: TimeNs(leakscope_bpf::monotonic_ns().saturating_sub(self.base)),
                count: new,
            });
            self.lost_seen = lost;
            self.sampled_seen = sampled;
        }
        Ok(())
    }

    fn apply(&mut self, r: Record, sink: &mut dyn FnMut(Event)) {
        match r {
            Record::Alloc { event, seq } => {
                if let Event::Alloc { pid, addr, .. } = &event {
                    self.ids.insert(seq, (*pid, addr.0));
                }
                sink(event);
            }
            Record::Free { event, seq } => {
                self.ids.remove(&seq);
                self.stacks.remove(&seq);
                sink(event);
            }
            Record::Fork {
                time,
                parent,
                child,
            } => {
                sink(Event::Fork {
                    time,
                    parent,
                    child,
                    shares_table: false,
                });
                // The child has the parent's address space: same allocator.
                if let Some(alloc) = self.allocators.get(&parent).cloned() {
                    if let Err(e) = self.attach_probes(child, alloc) {
                        self.notes
                            .push(format!("heap of child {child} not traced: {e}"));
                    }
                }
            }
            Record::Exec { time, pid } => {
                sink(Event::HeapEnd {
                    time,
                    pid,
                    by_exec: true,
                });
                let path = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                sink(Event::Exec {
                    time,
                    pid,
                    path,
                    open_fds: None,
                });
                self.end_process(pid);
            }
            Record::Exit { time, pid } => {
                sink(Event::HeapEnd {
                    time,
                    pid,
                    by_exec: false,
                });
                sink(Event::Exit {
                    time,
                    pid,
                    status: None,
                });
                self.end_process(pid);
            }
            Record::Mmap { time, pid, addr } => {
                // The process is alive and just made the mapping: its
                // /proc entry names the file.
                let lines = read_maps(pid).unwrap_or_default();
                if let Some(mapping) = lines
                    .iter()
                    .find(|l| l.start <= addr && addr < l.end)
                    .and_then(file_mapping)
                {
                    sink(Event::Map { time, pid, mapping });
                }
            }
        }
    }

    /// `pid`'s heap is gone: keep the stacks of its blocks (the ledger
    /// reports them) and free the kernel's copies and probes.
    fn end_process(&mut self, pid: Pid) {
        let seqs: Vec<u64> = self
            .ids
            .iter()
            .filter(|(_, (p, _))| *p == pid)
            .map(|(s, _)| *s)
            .collect();
        for seq in seqs {
            self.retain(seq, true);
            if let Some((p, addr)) = self.ids.remove(&seq) {
                let _ = self.skel.maps.nostack.delete(&blob_key(p.0, addr));
            }
        }
        self.allocators.remove(&pid);
        if let Some(links) = self.probes.remove(&pid) {
            detach(links);
        }
    }

    /// Copies the stack of block `seq` from the kernel into `self.stacks`,
    /// deleting the kernel copy when `take`.
    fn retain(&mut self, seq: u64, take: bool) {
        if self.stacks.contains_key(&seq) {
            return;
        }
        let Some(&(pid, addr)) = self.ids.get(&seq) else {
            return;
        };
        let key = blob_key(pid.0, addr);
        if let Ok(Some(bytes)) = self.skel.maps.blobs.lookup(&key, MapFlags::ANY) {
            if read::<BlobHdr>(&bytes).is_some_and(|h| h.seq == seq) {
                self.stacks.insert(seq, blob_to_stack(&bytes));
                if take {
                    let _ = self.skel.maps.blobs.delete(&key);
                }
            }
        }
    }

    fn counter(&self, which: u32) -> u64 {
        leakscope_bpf::percpu_sum(&self.skel.maps.counters, which)
    }

    /// The stack captured for an allocation.
    pub fn raw_stack(&mut self, id: StackId) -> RawStack {
        self.retain(id.0, false);
        if let Some(s) = self.stacks.get(&id.0) {
            return s.clone();
        }
        if self.ids.contains_key(&id.0) {
            RawStack::Missing("the kernel stack map was full".into())
        } else {
            RawStack::Missing("stack released before it could be read".into())
        }
    }
}

fn detach(mut links: Vec<libbpf_rs::Link>) {
    leakscope_bpf::detach_all(&mut links);
}

impl Drop for HeapTracer {
    fn drop(&mut self) {
        let mut all: Vec<libbpf_rs::Link> = self.links.drain(..).collect();
        for (_, l) in self.probes.drain() {
            all.extend(l);
        }
        detach(all);
    }
}

fn blob_to_stack(bytes: &[u8]) -> RawStack {
    let Some(h) = read::<BlobHdr>(bytes) else {
        return RawStack::Missing("short stack record".into());
    };
    let data = &bytes[std::mem::size_of::<BlobHdr>()..];
    leakscope_bpf::copied_stack(h.ip, h.sp, h.bp, h.len, data)
}

fn decode(bytes: &[u8], base: u64) -> Option<Record> {
    let h = read::<Hdr>(bytes)?;
    let time = TimeNs(h.time.saturating_sub(base));
    let pid = Pid(h.pid);
    Some(match h.ty {
        EV_ALLOC => {
            let a = read::<records::Alloc>(bytes)?;
            Record::Alloc {
                event: Event::Alloc {
                    time,
                    pid,
                    tid: Tid(h.tid),
                    addr: AbsAddr(a.addr),
                    size: a.size,
                    stack: StackId(a.seq),
                },
                seq: a.seq,
            }
        }
        EV_FREE => {
            let f = read::<records::Free>(bytes)?;
            Record::Free {
                event: Event::Free {
                    time,
                    pid,
                    addr: AbsAddr(f.addr),
                },
                seq: f.seq,
            }
        }
        EV_FORK => {
            let f = read::<records::Fork>(bytes)?;
            Record::Fork {
                time,
                parent: pid,
                child: Pid(f.child),
            }
        }
        EV_EXEC => Record::Exec { time, pid },
        EV_EXIT => Record::Exit { time, pid },
        EV_MMAP => {
            let m = read::<records::Mmap>(bytes)?;
            Record::Mmap {
                time,
                pid,
                addr: m.addr,
            }
        }
        _ => return None,
    })
}

impl Backend for HeapTracer {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn time_base(&self) -> u64 {
        self.base
    }

    fn notes(&self) -> Vec<String> {
        HeapTracer::notes(self)
    }

    fn spawn(&mut self, _cmd: &mut Command) -> io::Result<Child> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the eBPF heap backend attaches to running processes; launch with the preload \
             backend to trace a heap from the first allocation",
        ))
    }

    fn attach(&mut self, pid: Pid) -> io::Result<()> {
        self.trace_pid(pid).map_err(|e| {
            let kind = match &e {
                Error::Maps { source, .. } => source.kind(),
                Error::Load(leakscope_bpf::LoadError::Permission { .. }) => {
                    io::ErrorKind::PermissionDenied
                }
                Error::NoAllocator { .. } => io::ErrorKind::NotFound,
                _ => io::ErrorKind::Other,
            };
            io::Error::new(kind, e)
        })
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        HeapTracer::poll(self, timeout, sink).map_err(|e| Box::new(e) as _)
    }

    fn raw_stack(&mut self, id: StackId) -> RawStack {
        HeapTracer::raw_stack(self, id)
    }

    fn retain_stack(&mut self, id: StackId) {
        self.retain(id.0, false)
    }
}

/// Loads the programs as [`HeapTracer::new`] does with `config` and
/// attaches its tracepoints (uprobes are attached per process, at
/// [`Backend::attach`]), then detaches them, tracing nothing, and says
/// what the load cost: each program's processed instructions and
/// verification time, the wall and CPU time of the load, or why it failed
/// (for `leakscope doctor` and the verifier budget test).
pub fn check_load(config: Config) -> leakscope_bpf::LoadReport {
    use leakscope_bpf::{step, LoadClock, LoadError};
    use libbpf_rs::skel::Skel;
    leakscope_bpf::quiet_libbpf();
    let clock = LoadClock::start();
    if let Err(e) = leakscope_bpf::ensure_tracefs() {
        return clock.failed(LoadError::Tracefs(e));
    }
    let mut open_object = MaybeUninit::uninit();
    let loaded = skel::UheapSkelBuilder::default()
        .open(&mut open_object)
        .map_err(step("open"))
        .and_then(|mut open| {
            leakscope_bpf::request_verifier_log(open.open_object_mut());
            if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
                ro.sample_every = config.sample_every.max(1);
                ro.follow_forks = 1;
            }
            open.load().map_err(step("load"))
        });
    let skel = match loaded {
        Ok(skel) => skel,
        Err(e) => return clock.failed(e),
    };
    // Uprobes are attached per process: only the tracepoints here.
    clock.attached(skel.object(), |_| {
        [
            &skel.progs.on_fork,
            &skel.progs.on_exec,
            &skel.progs.on_exit_task,
            &skel.progs.on_mmap_enter,
            &skel.progs.on_mmap_exit,
        ]
        .into_iter()
        .map(|p| p.attach())
        .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 123 /usr/bin/prog
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 123 /usr/bin/prog
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 [vdso]
7f0000002000-7f0000003000 r-xp 00002000 fe:01 77 /tmp/my lib.so (deleted)
";
        let lines = parse_maps(text);
        assert_eq!(lines.len(), 4);
        let maps: Vec<Mapping> = lines.iter().filter_map(file_mapping).collect();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].start, AbsAddr(0x55d0c0a01000));
        assert_eq!(maps[0].offset, FileOffset(0x1000));
        assert_eq!(maps[1].path, "/tmp/my lib.so");
    }

    #[test]
    fn free_probe_skips_test_rdi_before_jcc() {
        // glibc 2.36: test %rdi,%rdi; je rel32
        assert_eq!(
            free_probe_offset(&[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0]),
            3
        );
        // test %rdi,%rdi; je rel8
        assert_eq!(free_probe_offset(&[0x48, 0x85, 0xff, 0x74, 0x10]), 3);
        // endbr64 first: stay at the entry
        assert_eq!(free_probe_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x48]), 0);
        assert_eq!(free_probe_offset(&[]), 0);
    }

    #[test]
    fn libc_defines_the_allocator() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else {
            return;
        };
        let syms = elf_functions(&data);
        for f in ["malloc", "free", "calloc", "realloc", "posix_memalign"] {
            assert!(syms.contains_key(f), "{f}");
        }
    }
}
