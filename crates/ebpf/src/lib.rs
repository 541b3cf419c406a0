//! leakscope-ebpf: the eBPF backend for fds.
//!
//! Input: a command to launch (or, later, pids to attach to). Output: a
//! stream of [`leakscope_event::Event`]s for the whole process tree, from
//! its first instruction, plus [`RawStack`]s on demand.
//!
//! How: one `tp_btf/sys_exit` program decodes every fd-creating and
//! fd-releasing syscall from the saved registers, plus
//! `tp_btf/sched_process_fork`, `sched_process_exec` and
//! `sched_process_exit`. At each acquisition the registers and the user
//! stack (from sp up to the top of the thread's stack, at most 8 KiB) are
//! copied. The acquisition is then held back in a kernel map: an fd closed
//! again before anything else refers to it is settled there and never
//! becomes an event (only counted, [`Tracer::settled`]). Held-back
//! acquisitions are sent when the stream needs them (fork, exec, exit,
//! close_range, dup or connect of the fd, or [`Tracer::settle`]); from then
//! on their stacks wait in a map keyed by a sequence number until the fd is
//! closed, so only stacks of fds that stay open are ever read and unwound.
//! Executable mappings (exec, ld.so, dlopen) are sent as [`Event::Map`] so
//! stacks can be unwound after the process is gone. No kprobes, no fentry.
//!
//! ```no_run
//! let mut tracer = leakscope_ebpf::Tracer::new(Default::default()).unwrap();
//! let child = tracer.spawn(&mut std::process::Command::new("/bin/true")).unwrap();
//! let mut events = Vec::new();
//! tracer.poll(std::time::Duration::from_millis(100), &mut |e| events.push(e)).unwrap();
//! ```
//!
//! It does not: unwind, symbolize, or decide what leaked.
#![deny(missing_docs)]

mod records;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command};
use std::rc::Rc;
use std::time::Duration;

use leakscope_event::{
    AbsAddr, Acquire, Event, Fd, FdKind, FileOffset, Mapping, Pid, RawStack, StackId, TcpState,
    Tid, TimeNs,
};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

use records::*;

#[allow(clippy::all, missing_docs, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/leakscope.skel.rs"));
}

/// Errors of the eBPF backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or attaching the BPF programs failed.
    #[error(transparent)]
    Load(#[from] leakscope_bpf::LoadError),
}

/// Tracer settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Follow the TCP states of the sockets traced processes acquire.
    pub tcp: bool,
}

/// Stacks read back from the kernel, kept for fds whose holders outlive
/// the kernel copy (fork, exit).
type StackCache = HashMap<u64, RawStack>;

/// A loaded and attached eBPF tracer.
pub struct Tracer {
    base: u64,
    links: Vec<libbpf_rs::Link>,
    skel: skel::LeakscopeSkel<'static>,
    ring: RingBuffer<'static>,
    queue: Rc<RefCell<Vec<Event>>>,
    stacks: StackCache,
    lost_seen: [u64; 3],
    detaching: leakscope_bpf::Detaching,
}

impl Tracer {
    /// Loads and attaches the programs. Nothing is traced until
    /// [`Tracer::spawn`] or [`Tracer::trace_pid`].
    pub fn new(config: Config) -> Result<Tracer, Error> {
        leakscope_bpf::quiet_libbpf();
        leakscope_bpf::ensure_tracefs()
            .map_err(|e| Error::from(leakscope_bpf::LoadError::Tracefs(e)))?;
        let skel = load(Box::leak(Box::new(MaybeUninit::uninit())), config)?;
        for (nr, code) in syscall_numbers() {
            skel.maps
                .sc_of
                .update(&nr.to_ne_bytes(), &code.to_ne_bytes(), MapFlags::ANY)
                .map_err(leakscope_bpf::step("syscall table setup"))?;
        }
        let links =
            leakscope_bpf::attach_all(skel.object()).map_err(leakscope_bpf::step("attach"))?;
        let handle =
            MapHandle::try_from(&skel.maps.events).map_err(leakscope_bpf::step("ring buffer"))?;
        let handle: &'static MapHandle = Box::leak(Box::new(handle));
        let queue: Rc<RefCell<Vec<Event>>> = Rc::default();
        let q = queue.clone();
        let base = leakscope_bpf::monotonic_ns();
        let mut builder = RingBufferBuilder::new();
        builder
            .add(handle, move |bytes: &[u8]| {
                let mut q = q.borrow_mut();
                if let Some(ev) = decode(bytes, base, &mut q) {
                    q.push(ev);
                }
                0
            })
            .map_err(leakscope_bpf::step("ring buffer"))?;
        let ring = builder
            .build()
            .map_err(leakscope_bpf::step("ring buffer"))?;
        Ok(Tracer {
            base,
            links,
            skel,
            ring,
            queue,
            stacks: HashMap::new(),
            lost_seen: [0; 3],
            detaching: Default::default(),
        })
    }

    /// Spawns `cmd` so that it is traced from its first instruction: the
    /// kernel marks every child this process forks while spawning.
    pub fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        self.set_spawning(1);
        let child = cmd.spawn();
        self.set_spawning(0);
        child
    }

    fn set_spawning(&mut self, v: u32) {
        if let Some(bss) = self.skel.maps.bss_data.as_deref_mut() {
            // The BPF side reads this through the same mmap'ed page.
            // SAFETY: plain aligned u32 store into mapped .bss.
            unsafe { std::ptr::write_volatile(&mut bss.spawning, v) };
        }
    }

    /// Starts tracing an already running process (its future children too).
    pub fn trace_pid(&mut self, pid: Pid) -> Result<(), Error> {
        self.skel
            .maps
            .traced
            .update(&pid.0.to_ne_bytes(), &[0u8; 16], MapFlags::ANY)
            .map_err(|e| Error::from(leakscope_bpf::step("map update")(e)))
    }

    /// Waits up to `timeout` for events and hands each to `sink`, in order.
    /// Losses since the last call arrive as [`Event::Lost`].
    pub fn poll(&mut self, timeout: Duration, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        leakscope_bpf::poll_ring(&self.ring, timeout)?;
        // Records are submitted without a wakeup until enough wait, so a
        // timed-out poll must still read what is there.
        self.ring
            .consume()
            .map_err(leakscope_bpf::step("ring buffer consume"))?;
        self.drain(sink);
        Ok(())
    }

    /// Reads everything still in the ring buffer.
    pub fn flush(&mut self, sink: &mut dyn FnMut(Event)) -> Result<(), Error> {
        self.ring
            .consume()
            .map_err(leakscope_bpf::step("ring buffer consume"))?;
        self.drain(sink);
        Ok(())
    }

    fn drain(&mut self, sink: &mut dyn FnMut(Event)) {
        let events = std::mem::take(&mut *self.queue.borrow_mut());
        for e in events {
            sink(e);
        }
        let lost = self.counter(CNT_RB_DROP);
        if lost > self.lost_seen[0] {
            sink(Event::Lost {
                time: TimeNs(0),
                count: lost - self.lost_seen[0],
            });
            self.lost_seen[0] = lost;
        }
    }

    fn counter(&self, which: u32) -> u64 {
        leakscope_bpf::percpu_sum(&self.skel.maps.counters, which)
    }

    /// Stacks that could not be stored because the kernel stack map was full.
    pub fn stacks_dropped(&self) -> u64 {
        self.counter(CNT_BLOB_FULL)
    }

    /// fds opened and closed again that the kernel side settled without
    /// sending anything (each stands for an acquisition and a release).
    pub fn settled(&self) -> u64 {
        self.counter(CNT_SETTLED)
    }

    /// Stops tracing without waiting for it (detaching takes ~100 ms: a
    /// child process does it); the stacks already captured stay readable.
    pub fn stop(&mut self) {
        self.detaching = leakscope_bpf::Detaching::hand_off(&mut self.links);
    }

    /// Asks the kernel side to send every acquisition it holds back, so
    /// that the events read next bring a ledger up to date with the fds
    /// open now. Needed before reading a ledger of processes still running.
    pub fn settle(&mut self) {
        // The sys_exit program recognises this close() by leakscope itself;
        // the fd is invalid, so the call does nothing else.
        // SAFETY: closing an fd number that cannot be open.
        unsafe { libc::close(SETTLE_FD) };
    }

    fn blob_map(&self, id: u64) -> &dyn MapCore {
        match id >> SEQ_CLASS_SHIFT {
            0 => &self.skel.maps.blobs_s,
            1 => &self.skel.maps.blobs_m,
            _ => &self.skel.maps.blobs,
        }
    }

    /// Copies the stack of an acquisition out of the kernel into this
    /// process and frees the kernel copy. Call it for fds whose stack must
    /// outlive the acquiring process's own bookkeeping: copies inherited by
    /// a fork, fds still open at exit.
    pub fn retain_stack(&mut self, id: StackId) {
        if id.0 == 0 || self.stacks.contains_key(&id.0) {
            return;
        }
        let key = id.0.to_ne_bytes();
        let map = self.blob_map(id.0);
        if let Ok(Some(bytes)) = map.lookup(&key, MapFlags::ANY) {
            let _ = map.delete(&key);
            let mut stack = blob_to_stack(&bytes);
            if let (RawStack::Copied { bytes: copied, .. }, Some(h)) =
                (&mut stack, read::<BlobHdr>(&bytes))
            {
                self.take_chunks(id.0, h.len as usize, copied);
            }
            self.stacks.insert(id.0, stack);
        }
    }

    /// Appends the chunks of a stack deeper than one blob (its `len` says
    /// how deep) to `out`, freeing them in the kernel. A missing chunk ends
    /// the stack there: the unwinder then says where it was cut.
    fn take_chunks(&self, seq: u64, len: usize, out: &mut Vec<u8>) {
        let chunks = &self.skel.maps.chunks;
        for idx in 1..CHUNKS_MAX {
            if out.len() >= len {
                break;
            }
            let key = chunk_key(seq, idx);
            let Ok(Some(bytes)) = chunks.lookup(&key, MapFlags::ANY) else {
                break;
            };
            let _ = chunks.delete(&key);
            let Some(h) = read::<BlobHdr>(&bytes) else {
                break;
            };
            let data = &bytes[std::mem::size_of::<BlobHdr>()..];
            out.extend_from_slice(&data[..(h.len as usize).min(data.len())]);
            if (h.len as usize) < STACK_MAX {
                break;
            }
        }
    }

    /// Forgets the kernel's record of `pid`'s fd numbers (after it exited).
    pub fn forget_fds(&mut self, pid: Pid, fds: &[Fd]) {
        for fd in fds {
            let mut key = [0u8; 8];
            key[..4].copy_from_slice(&pid.0.to_ne_bytes());
            key[4..].copy_from_slice(&fd.0.to_ne_bytes());
            let _ = self.skel.maps.fdseq.delete(&key);
        }
    }

    /// The stack captured for an acquisition.
    pub fn raw_stack(&mut self, id: StackId) -> RawStack {
        if id.0 == 0 {
            return RawStack::Missing("the stack map was full or the stack unreadable".into());
        }
        self.retain_stack(id);
        self.stacks
            .get(&id.0)
            .cloned()
            .unwrap_or_else(|| RawStack::Missing("stack released before it could be read".into()))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        leakscope_bpf::detach_all(&mut self.links);
    }
}

fn blob_to_stack(bytes: &[u8]) -> RawStack {
    let Some(h) = read::<BlobHdr>(bytes) else {
        return RawStack::Missing("short stack record".into());
    };
    let data = &bytes[std::mem::size_of::<BlobHdr>()..];
    leakscope_bpf::copied_stack(h.ip, h.sp, h.bp, h.len, data)
}

fn syscall_name(sc: u32) -> &'static str {
    SYSCALLS.get(sc as usize).copied().unwrap_or("unknown")
}

fn endpoint(family: u16, addr: &[u8; 16], port: u16) -> String {
    match family {
        2 => format!(
            "{}:{port}",
            Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
        ),
        10 => format!("[{}]:{port}", Ipv6Addr::from(*addr)),
        _ => "?".into(),
    }
}

fn decode(bytes: &[u8], base: u64, queue: &mut Vec<Event>) -> Option<Event> {
    let h = read::<Hdr>(bytes)?;
    let time = TimeNs(h.time.saturating_sub(base));
    let pid = Pid(h.pid);
    match h.ty {
        EV_ACQUIRE => {
            let a = read::<records::Acquire>(bytes)?;
            let syscall = syscall_name(a.sc);
            let kind = FdKind::of(syscall, a.mode);
            let text = cstr(&a.detail);
            let detail = match syscall {
                "socket" => Some(format!(
                    "{} {}",
                    leakscope_event::socket_family(a.args[0]),
                    leakscope_event::socket_type(a.args[1])
                )),
                "socketpair" => Some(format!(
                    "{} {} pair",
                    leakscope_event::socket_family(a.args[0]),
                    leakscope_event::socket_type(a.args[1])
                )),
                "accept" | "accept4" if a.addrs.family == 2 || a.addrs.family == 10 => {
                    Some(format!(
                        "{} <- {}",
                        endpoint(a.addrs.family, &a.addrs.laddr, a.addrs.lport),
                        endpoint(a.addrs.family, &a.addrs.raddr, a.addrs.rport)
                    ))
                }
                "memfd_create" => Some(format!("memfd:{text}")),
                "pipe" | "pipe2" => Some("read end".into()),
                "recvmsg" | "recvmmsg" => Some("received with SCM_RIGHTS".into()),
                _ if !text.is_empty() => Some(text),
                _ => None,
            };
            let acquire = Acquire {
                time,
                pid,
                tid: Tid(h.tid),
                fd: Fd(a.fd),
                kind,
                syscall: syscall.to_string(),
                cloexec: a.flags & ACQ_CLOEXEC != 0,
                dup_of: (a.dup_of >= 0).then_some(Fd(a.dup_of)),
                inode: a.ino,
                detail,
                stack: StackId(a.seq),
            };
            if a.flags & ACQ_SECOND != 0 && kind == FdKind::Pipe {
                return Some(Event::Acquire(Acquire {
                    detail: Some("write end".into()),
                    ..acquire
                }));
            }
            Some(Event::Acquire(acquire))
        }
        EV_RELEASE => {
            let r = read::<Release>(bytes)?;
            Some(Event::Release {
                time,
                pid,
                fd: Fd(r.fd),
            })
        }
        EV_CLOSE_RANGE => {
            let r = read::<Release>(bytes)?;
            const CLOSE_RANGE_CLOEXEC: u32 = 4;
            Some(Event::CloseRange {
                time,
                pid,
                first: Fd(r.first.min(i32::MAX as u32) as i32),
                last: Fd(r.last.min(i32::MAX as u32) as i32),
                cloexec_only: r.flags & CLOSE_RANGE_CLOEXEC != 0,
            })
        }
        EV_CONNECT => {
            let c = read::<Connect>(bytes)?;
            (c.addrs.family == 2 || c.addrs.family == 10).then(|| Event::Describe {
                time,
                pid,
                fd: Fd(c.fd),
                detail: format!(
                    "{} -> {}",
                    endpoint(c.addrs.family, &c.addrs.laddr, c.addrs.lport),
                    endpoint(c.addrs.family, &c.addrs.raddr, c.addrs.rport)
                ),
            })
        }
        EV_TCP => {
            let t = read::<records::Tcp>(bytes)?;
            Some(Event::TcpState {
                time,
                inode: t.ino,
                old: TcpState(t.oldstate as u8),
                new: TcpState(t.newstate as u8),
                detail: format!(
                    "{} -> {}",
                    endpoint(t.addrs.family, &t.addrs.laddr, t.addrs.lport),
                    endpoint(t.addrs.family, &t.addrs.raddr, t.addrs.rport)
                ),
            })
        }
        EV_FORK => {
            let f = read::<records::Fork>(bytes)?;
            Some(Event::Fork {
                time,
                parent: pid,
                child: Pid(f.child),
                shares_table: f.shares_files != 0,
            })
        }
        EV_EXEC => {
            let e = read::<records::Exec>(bytes)?;
            let path = e.path.join();
            let words = e.words as usize;
            let open_fds = (words * 64 >= e.max_fds as usize).then(|| {
                let mut fds = Vec::new();
                for (w, bits) in e.open_fds[..words.min(EXEC_FD_WORDS)].iter().enumerate() {
                    for b in 0..64 {
                        if bits & (1u64 << b) != 0 {
                            fds.push(Fd((w * 64 + b) as i32));
                        }
                    }
                }
                fds
            });
            queue.push(Event::Exec {
                time,
                pid,
                path: path.clone(),
                open_fds,
            });
            // The kernel mapped the program and its interpreter itself: no
            // mmap(2) to see, so derive their mappings from the ELF headers.
            for mapping in exec_mappings(&path, e.start_code, e.at_base) {
                queue.push(Event::Map { time, pid, mapping });
            }
            None
        }
        EV_MMAP => {
            let m = read::<records::Mmap>(bytes)?;
            Some(Event::Map {
                time,
                pid,
                mapping: Mapping {
                    start: AbsAddr(m.addr),
                    end: AbsAddr(m.addr + m.len),
                    offset: FileOffset(m.off),
                    path: m.path.join(),
                },
            })
        }
        EV_EXIT => {
            let x = read::<records::Exit>(bytes)?;
            Some(Event::Exit {
                time,
                pid,
                status: Some(x.code),
            })
        }
        _ => None,
    }
}

/// Executable segments of an ELF file loaded with bias `bias`.
fn exec_segments(path: &str, bias: impl FnOnce(u64) -> u64) -> (Vec<Mapping>, Option<String>) {
    use object::read::elf::{ElfFile64, ProgramHeader};
    use object::Endianness;
    let Ok(data) = std::fs::read(path) else {
        return (Vec::new(), None);
    };
    let Ok(elf) = ElfFile64::<Endianness>::parse(&*data) else {
        return (Vec::new(), None);
    };
    let endian = elf.endian();
    let mut interp = None;
    let mut loads = Vec::new();
    for ph in elf.elf_program_headers() {
        match ph.p_type(endian) {
            object::elf::PT_LOAD => loads.push((
                ph.p_vaddr(endian),
                ph.p_memsz(endian),
                ph.p_offset(endian),
                ph.p_flags(endian).0,
            )),
            object::elf::PT_INTERP => {
                if let Ok(Some(bytes)) = ph.interpreter(endian, &*data) {
                    interp = Some(String::from_utf8_lossy(bytes).into_owned());
                }
            }
            _ => {}
        }
    }
    let min_exec = loads
        .iter()
        .filter(|l| l.3 & object::elf::PF_X.0 != 0)
        .map(|l| l.0)
        .min()
        .unwrap_or(0);
    let bias = bias(min_exec);
    let page = !0xfffu64;
    let maps = loads
        .iter()
        .filter(|l| l.3 & object::elf::PF_X.0 != 0)
        .map(|&(vaddr, memsz, off, _)| Mapping {
            start: AbsAddr(bias.wrapping_add(vaddr) & page),
            end: AbsAddr(bias.wrapping_add(vaddr + memsz)),
            offset: FileOffset(off & page),
            path: path.to_string(),
        })
        .collect();
    (maps, interp)
}

fn exec_mappings(path: &str, start_code: u64, at_base: u64) -> Vec<Mapping> {
    // load_elf_binary: start_code = load_bias + lowest p_vaddr of an
    // executable PT_LOAD.
    let (mut maps, interp) = exec_segments(path, |min_exec| start_code.wrapping_sub(min_exec));
    if let (Some(interp), true) = (interp, at_base != 0) {
        // AT_BASE is the interpreter's load bias (its first p_vaddr is 0).
        maps.extend(exec_segments(&interp, |_| at_base).0);
    }
    maps
}

impl leakscope_event::Backend for Tracer {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn time_base(&self) -> u64 {
        self.base
    }

    fn attach(&mut self, pid: Pid) -> io::Result<()> {
        self.trace_pid(pid).map_err(io::Error::other)
    }

    fn spawn(&mut self, cmd: &mut Command) -> io::Result<Child> {
        Tracer::spawn(self, cmd)
    }

    fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Event),
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(Tracer::poll(self, timeout, sink)?)
    }

    fn raw_stack(&mut self, id: StackId) -> RawStack {
        Tracer::raw_stack(self, id)
    }

    fn retain_stack(&mut self, id: StackId) {
        Tracer::retain_stack(self, id)
    }

    fn forget_process(&mut self, pid: Pid, fds: &[Fd]) {
        self.forget_fds(pid, fds)
    }

    fn settle(&mut self) {
        Tracer::settle(self)
    }

    fn stop(&mut self) {
        Tracer::stop(self)
    }

    fn settled(&self) -> u64 {
        Tracer::settled(self)
    }
}

/// Loads and attaches the programs as [`Tracer::new`] does with `config`,
/// then detaches them, tracing nothing, and says what the load cost: each
/// program's processed instructions and verification time, the wall and
/// CPU time of the load, or why it failed (for `leakscope doctor` and the
/// verifier budget test).
pub fn check_load(config: Config) -> leakscope_bpf::LoadReport {
    use leakscope_bpf::{LoadClock, LoadError};
    leakscope_bpf::quiet_libbpf();
    let clock = LoadClock::start();
    if let Err(e) = leakscope_bpf::ensure_tracefs() {
        return clock.failed(LoadError::Tracefs(e));
    }
    let mut open_object = MaybeUninit::uninit();
    let skel = match load(&mut open_object, config) {
        Ok(skel) => skel,
        Err(e) => return clock.failed(e),
    };
    clock.attached(skel.object(), leakscope_bpf::attach_all)
}

/// Opens the skeleton, configures it for `config` and loads it (the
/// verifier runs here), asking the kernel for its statistics.
fn load(
    open_object: &mut MaybeUninit<libbpf_rs::OpenObject>,
    config: Config,
) -> Result<skel::LeakscopeSkel<'_>, leakscope_bpf::LoadError> {
    let mut open = skel::LeakscopeSkelBuilder::default()
        .open(open_object)
        .map_err(leakscope_bpf::step("open"))?;
    leakscope_bpf::request_verifier_log(open.open_object_mut());
    if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
        ro.spawner_pid = std::process::id();
        ro.track_tcp = u32::from(config.tcp);
    }
    open.load().map_err(leakscope_bpf::step("load"))
}
