//! leakscope-snoop: a live stream of fd-lifecycle syscalls, like opensnoop
//! for every syscall that creates, names or releases an fd.
//!
//! Input: a [`Filter`] (pids, comm, syscall set, failures only, entries
//! too). Output: [`Item`]s — each an [`Event`] (a syscall's entry or
//! return: monotonic time, pid, tid, comm, decoded arguments, return value,
//! errno name, latency) or a count of events the kernel had to drop — and
//! the [`render`] functions that turn them into aligned text columns or
//! JSON lines.
//!
//! How: one `tp_btf/sys_enter` and one `tp_btf/sys_exit` program. A
//! syscall-number → code array selects the syscalls; pid, comm and
//! `--failed` filters run in the kernel, so filtered-out calls cost a map
//! lookup and never reach user space. Records go through a 64 MiB ring
//! buffer whose reader is woken only once 256 KiB wait (or on a short poll
//! timer), so the reader is not woken for every event.
//!
//! ```no_run
//! use leakscope_snoop::{render, Filter, Item, Snooper};
//!
//! let filter = Filter {
//!     syscalls: leakscope_snoop::parse_syscalls("openat,close").unwrap(),
//!     ..Filter::default()
//! };
//! let mut snoop = Snooper::new(&filter).unwrap();
//! let mut clock = render::Clock::new();
//! let mut line = String::new();
//! snoop
//!     .poll(std::time::Duration::from_millis(100), &mut |item| {
//!         if let Item::Event(e) = item {
//!             render::text(&e, &mut clock, &mut line);
//!         }
//!     })
//!     .unwrap();
//! print!("{line}");
//! // 10:35:49.605572 4242    4242    cat             openat        3               4.1 AT_FDCWD, "/etc/hosts", O_RDONLY|O_CLOEXEC
//! ```
//!
//! It does not: follow children of a `-p` pid, keep state across events
//! (no fd → path table), resolve relative paths, or show syscalls outside
//! the fd lifecycle (read, write, mmap...). Syscalls already in progress
//! when tracing starts have no entry time and are not shown.
#![deny(missing_docs)]

mod decode;
mod record;
pub mod render;

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::rc::Rc;
use std::time::Duration;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};

pub use decode::{errno_name, open_flags, Arg, Event, Phase};

#[allow(clippy::all, missing_docs, unsafe_op_in_unsafe_fn)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/snoop.skel.rs"));
}

/// Errors of the snoop tracer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or attaching the BPF programs failed.
    #[error(transparent)]
    Load(#[from] leakscope_bpf::LoadError),
    /// A syscall name that is not traced.
    #[error("unknown syscall `{name}`; valid names: {}", syscall_names().join(","))]
    UnknownSyscall {
        /// The name given.
        name: String,
    },
    /// A pid given to follow does not exist.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: u32,
    },
}

/// What to trace. The default traces every fd syscall of every process,
/// returns only.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these processes (thread group ids); their children are not
    /// followed. Empty: every process.
    pub pids: Vec<u32>,
    /// Only threads with this exact name (`comm`, cut to 15 bytes as the
    /// kernel keeps it).
    pub comm: Option<String>,
    /// Only these syscalls (names from [`syscall_names`]). Empty: all.
    pub syscalls: Vec<&'static str>,
    /// Only calls that failed.
    pub failed_only: bool,
    /// Entries too, not only returns.
    pub entry: bool,
}

/// One item of the stream.
#[derive(Debug)]
pub enum Item<'a> {
    /// A syscall entry or return.
    Event(Event<'a>),
    /// The ring buffer was full: this many events were dropped since the
    /// previous `Lost` item.
    Lost(u64),
}

/// Names of every syscall snoop can trace, in the order they are
/// documented.
pub fn syscall_names() -> Vec<&'static str> {
    let available: Vec<&str> = record::syscall_numbers()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    record::SYSCALLS[1..]
        .iter()
        .copied()
        .filter(|n| available.contains(n))
        .collect()
}

/// Parses a comma-separated list of syscall names (`open,close,unlink`).
pub fn parse_syscalls(list: &str) -> Result<Vec<&'static str>, Error> {
    let valid = syscall_names();
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match valid.iter().find(|v| **v == name) {
            Some(v) if !out.contains(v) => out.push(*v),
            Some(_) => {}
            None => {
                return Err(Error::UnknownSyscall {
                    name: name.to_string(),
                })
            }
        }
    }
    Ok(out)
}

fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Records copied out of the ring buffer, each prefixed by its length.
type Queue = Rc<RefCell<Vec<u8>>>;

/// The loaded and attached tracer.
pub struct Snooper {
    links: Vec<libbpf_rs::Link>,
    skel: skel::SnoopSkel<'static>,
    ring: RingBuffer<'static>,
    queue: Queue,
    lost_seen: u64,
    events: u64,
}

impl Snooper {
    /// Checks the filter, loads the programs and starts tracing.
    pub fn new(filter: &Filter) -> Result<Snooper, Error> {
        for &pid in &filter.pids {
            if !process_exists(pid) {
                return Err(Error::NoSuchProcess { pid });
            }
        }
        leakscope_bpf::quiet_libbpf();
        let open_object = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = skel::SnoopSkelBuilder::default()
            .open(open_object)
            .map_err(leakscope_bpf::step("open"))?;
        leakscope_bpf::request_verifier_log(open.open_object_mut());
        if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
            ro.self_pid = std::process::id();
            ro.filter_pids = u8::from(!filter.pids.is_empty());
            ro.failed_only = u8::from(filter.failed_only);
            ro.want_entry = u8::from(filter.entry);
            if let Some(comm) = &filter.comm {
                ro.filter_comm = 1;
                let mut want = [0 as std::ffi::c_char; 16];
                for (d, s) in want.iter_mut().zip(comm.bytes().take(15)) {
                    *d = s as std::ffi::c_char;
                }
                ro.comm_want = want;
            }
        }
        let skel = open.load().map_err(leakscope_bpf::step("load"))?;
        for (nr, name) in record::syscall_numbers() {
            if !filter.syscalls.is_empty() && !filter.syscalls.contains(&name) {
                continue;
            }
            let code = record::code_of(name).expect("every traced syscall has a code");
            skel.maps
                .sc_of
                .update(&nr.to_ne_bytes(), &code.to_ne_bytes(), MapFlags::ANY)
                .map_err(leakscope_bpf::step("syscall table setup"))?;
        }
        for pid in &filter.pids {
            skel.maps
                .pids
                .update(&pid.to_ne_bytes(), &[1u8], MapFlags::ANY)
                .map_err(leakscope_bpf::step("pid filter setup"))?;
        }
        let links =
            leakscope_bpf::attach_all(skel.object()).map_err(leakscope_bpf::step("attach"))?;
        let handle =
            MapHandle::try_from(&skel.maps.events).map_err(leakscope_bpf::step("ring buffer"))?;
        let handle: &'static MapHandle = Box::leak(Box::new(handle));
        let queue: Queue = Rc::default();
        let q = queue.clone();
        let mut builder = RingBufferBuilder::new();
        builder
            .add(handle, move |bytes: &[u8]| {
                let mut q = q.borrow_mut();
                q.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
                q.extend_from_slice(bytes);
                0
            })
            .map_err(leakscope_bpf::step("ring buffer"))?;
        let ring = builder
            .build()
            .map_err(leakscope_bpf::step("ring buffer"))?;
        Ok(Snooper {
            links,
            skel,
            ring,
            queue,
            lost_seen: 0,
            events: 0,
        })
    }

    /// Waits up to `timeout` for events (less if a signal arrives) and
    /// hands each to `sink`, in ring-buffer order; then a [`Item::Lost`] if
    /// the kernel dropped any since the last call.
    pub fn poll(&mut self, timeout: Duration, sink: &mut dyn FnMut(Item)) -> Result<(), Error> {
        leakscope_bpf::poll_ring(&self.ring, timeout)?;
        self.flush(sink)
    }

    /// Reads everything in the ring buffer now, without waiting.
    pub fn flush(&mut self, sink: &mut dyn FnMut(Item)) -> Result<(), Error> {
        // Records are submitted without a wakeup until enough wait, so a
        // timed-out poll must still read what is there.
        self.ring
            .consume()
            .map_err(leakscope_bpf::step("ring buffer consume"))?;
        let buf = std::mem::take(&mut *self.queue.borrow_mut());
        let mut rest = &buf[..];
        while rest.len() >= 4 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(rec) = rest.get(4..4 + len) else {
                break;
            };
            if let Some(e) = Event::parse(rec) {
                self.events += 1;
                sink(Item::Event(e));
            }
            rest = &rest[4 + len..];
        }
        // Hand the allocation back so the next batch reuses it.
        let mut buf = buf;
        buf.clear();
        let mut q = self.queue.borrow_mut();
        if q.is_empty() {
            *q = buf;
        }
        drop(q);
        let lost = self.lost();
        if lost > self.lost_seen {
            sink(Item::Lost(lost - self.lost_seen));
            self.lost_seen = lost;
        }
        Ok(())
    }

    /// Events delivered so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Events the kernel dropped so far because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.counter(record::CNT_RB_DROP)
    }

    fn counter(&self, which: u32) -> u64 {
        leakscope_bpf::percpu_sum(&self.skel.maps.counters, which)
    }

    /// Entry times that could not be stored (their returns are not shown).
    pub fn starts_dropped(&self) -> u64 {
        self.counter(record::CNT_STARTS_FULL)
    }
}

impl Drop for Snooper {
    fn drop(&mut self) {
        leakscope_bpf::detach_all(&mut self.links);
    }
}

/// Loads and attaches the programs (with the default [`Filter`]), then
/// detaches them, tracing nothing, and says what the load cost: each
/// program's processed instructions and verification time, the wall and
/// CPU time of the load, or why it failed (for `leakscope doctor` and the
/// verifier budget test).
pub fn check_load() -> leakscope_bpf::LoadReport {
    use leakscope_bpf::{step, LoadClock};
    leakscope_bpf::quiet_libbpf();
    let clock = LoadClock::start();
    let mut open_object = MaybeUninit::uninit();
    let loaded = skel::SnoopSkelBuilder::default()
        .open(&mut open_object)
        .map_err(step("open"))
        .and_then(|mut open| {
            leakscope_bpf::request_verifier_log(open.open_object_mut());
            if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
                ro.self_pid = std::process::id();
            }
            open.load().map_err(step("load"))
        });
    let skel = match loaded {
        Ok(skel) => skel,
        Err(e) => return clock.failed(e),
    };
    clock.attached(skel.object(), leakscope_bpf::attach_all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_list_parses() {
        assert_eq!(
            parse_syscalls("open, close,unlink,close").unwrap(),
            ["open", "close", "unlink"]
        );
        let err = parse_syscalls("open,bogus").unwrap_err().to_string();
        assert!(err.starts_with("unknown syscall `bogus`; valid names: open,openat,"));
        assert!(!err.contains('\n'));
        assert_eq!(syscall_names().len(), 28);
    }

    #[test]
    fn missing_pid_is_an_error() {
        let f = Filter {
            pids: vec![i32::MAX as u32],
            ..Filter::default()
        };
        assert!(matches!(
            Snooper::new(&f),
            Err(Error::NoSuchProcess { pid }) if pid == i32::MAX as u32
        ));
    }
}
