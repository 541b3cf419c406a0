//! leakscope-ledger: applies [`Event`]s with kernel semantics and says what
//! was never released.
//!
//! Input: the event stream of one trace (live or replayed). Output:
//! [`Leak`]s (resources still held when their holder exited, or at the end
//! of the trace) and [`LeakGroup`]s of them under a caller-chosen key, such
//! as the unwound acquiring stack.
//!
//! ```
//! use leakscope_event::*;
//! use leakscope_ledger::Ledger;
//! let mut l = Ledger::default();
//! let open = |fd| Event::Acquire(Acquire {
//!     time: TimeNs(1), pid: Pid(9), tid: Tid(9), fd: Fd(fd), kind: FdKind::File,
//!     syscall: "openat".into(), cloexec: false, dup_of: None, inode: 0, detail: None,
//!     stack: StackId(1),
//! });
//! l.apply(&open(3));
//! l.apply(&open(4));
//! l.apply(&Event::Release { time: TimeNs(2), pid: Pid(9), fd: Fd(3) });
//! l.apply(&Event::Exit { time: TimeNs(3), pid: Pid(9), status: Some(0) });
//! let leaks = l.finish();
//! assert_eq!(leaks.len(), 1);
//! ```
//!
//! Kernel rules it follows (each has a test below): threads share one fd
//! table (events carry the process id); fork without CLONE_FILES copies the
//! table and the copies keep their acquiring stack; CLONE_FILES shares it;
//! exec unshares the table and closes close-on-exec fds (or, better, keeps
//! exactly the fds the kernel reported open after exec); dup2/dup3 onto an
//! open fd releases it first; close_range releases a range or marks it
//! close-on-exec; fd numbers are reused; realloc moving a block frees the
//! old address. A failed syscall is never an event.
//!
//! It does not: unwind or symbolize stacks, or know about backends.
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use leakscope_event::{AbsAddr, Acquire, Event, Fd, Pid, StackId, TcpState, Tid, TimeNs};

/// A heap block still allocated.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Its address.
    pub addr: AbsAddr,
    /// Requested size.
    pub size: u64,
    /// When it was allocated.
    pub time: TimeNs,
    /// The allocating process.
    pub pid: Pid,
    /// The allocating thread.
    pub tid: Tid,
    /// The allocating stack.
    pub stack: StackId,
}

/// A resource that was never released.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// An fd, as it was acquired (with later detail updates).
    Fd(Acquire),
    /// A heap block.
    Heap(Block),
}

impl Resource {
    /// When it was acquired.
    pub fn time(&self) -> TimeNs {
        match self {
            Resource::Fd(a) => a.time,
            Resource::Heap(b) => b.time,
        }
    }
    /// The acquiring stack.
    pub fn stack(&self) -> StackId {
        match self {
            Resource::Fd(a) => a.stack,
            Resource::Heap(b) => b.stack,
        }
    }
    /// The process that acquired it (for an inherited fd, the ancestor).
    pub fn acquired_by(&self) -> Pid {
        match self {
            Resource::Fd(a) => a.pid,
            Resource::Heap(b) => b.pid,
        }
    }
}

/// A leaked resource and the process that still held it.
#[derive(Debug, Clone, PartialEq)]
pub struct Leak {
    /// The holder when it exited (or when the trace ended).
    pub holder: Pid,
    /// The fd number in the holder's table (None for heap).
    pub fd: Option<Fd>,
    /// What leaked.
    pub resource: Resource,
    /// For a TCP socket: its state then, and since when it was in it.
    pub tcp: Option<(TcpState, TimeNs)>,
    /// When the holder let go of it (exit) or the trace ended.
    pub at: TimeNs,
}

type TableId = u64;

/// A multiply-rotate hasher for the integer keys of the hot tables (heap
/// addresses, pids). SipHash, std's default, guards against adversarial
/// keys we do not have and cost a third of the collector's time per heap
/// event on a malloc-heavy program.
#[derive(Default)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// A hasher for keys made of strings and numbers (grouping keys: stacks
/// of module paths and offsets), taking 8 bytes at a time. SipHash over
/// every frame's module path was a quarter of the time of a report of
/// 100k groups; these keys are ours, not an adversary's.
#[derive(Default, Clone, Copy)]
pub struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(last) ^ (rest.len() as u64) << 59);
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

/// A `HashMap` with [`WordHasher`].
pub type WordMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// Hashes heap block addresses keeping their neighbourhoods together: the
/// low 12 bits of the hash (the table takes the bucket from the low bits)
/// are the block's offset in its 64 KiB region, in 16-byte units, and the
/// bits above a mix of the region. Blocks allocated together then sit in
/// neighbouring buckets, and a program building or tearing down millions
/// of blocks walks the table nearly in order instead of missing the cache
/// and the TLB on every insert and remove (those were 60% of the
/// collector's time then), while regions still spread over the table as
/// with any hash (page-aligned blocks do not pile up on a few buckets).
/// The top 7 bits, the table's tag for telling keys apart, mix the whole
/// address.
#[derive(Default)]
struct AddrHasher(u64);

const TAG: u64 = 0x7f << 57;

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut x = 0u64;
        for b in bytes {
            x = (x << 8) | u64::from(*b);
        }
        self.write_u64(x);
    }
    fn write_u64(&mut self, x: u64) {
        let region = ((x >> 16).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20) << 12;
        let tag = x.wrapping_mul(0x517c_c1b7_2722_0a95) & TAG;
        self.0 = ((region | ((x >> 4) & 0xfff)) & !TAG) | tag;
    }
}

/// A live block as the ledger keeps it: its address and process are the
/// keys it is filed under, so an entry is 40 bytes instead of 56 (a
/// program can keep millions).
#[derive(Debug, Clone, Copy)]
struct Live {
    size: u64,
    time: TimeNs,
    stack: StackId,
    tid: Tid,
}

impl Live {
    fn block(&self, pid: Pid, addr: AbsAddr) -> Block {
        Block {
            addr,
            size: self.size,
            time: self.time,
            pid,
            tid: self.tid,
            stack: self.stack,
        }
    }
}

type AddrMap<V> = HashMap<AbsAddr, V, BuildHasherDefault<AddrHasher>>;

/// Applies events and keeps what is outstanding.
#[derive(Debug, Default)]
pub struct Ledger {
    tables: HashMap<TableId, BTreeMap<Fd, Acquire>>,
    table_of: HashMap<Pid, TableId>,
    next_table: TableId,
    heaps: IntMap<Pid, AddrMap<Live>>,
    leaks: Vec<Leak>,
    tcp: HashMap<u64, (TcpState, TimeNs)>,
    now: TimeNs,
    events: u64,
    lost: u64,
    exec_freed: (u64, u64),
}

impl Ledger {
    /// Events applied so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The latest event time seen.
    pub fn now(&self) -> TimeNs {
        self.now
    }

    /// Events the backends reported lost.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Heap blocks (and their bytes) that images replaced by execve(2)
    /// still held: freed by the exec, not leaks.
    pub fn freed_by_exec(&self) -> (u64, u64) {
        self.exec_freed
    }

    fn table_mut(&mut self, pid: Pid) -> &mut BTreeMap<Fd, Acquire> {
        let id = match self.table_of.get(&pid) {
            Some(id) => *id,
            None => {
                let id = self.new_table(BTreeMap::new());
                self.table_of.insert(pid, id);
                id
            }
        };
        self.tables.entry(id).or_default()
    }

    fn new_table(&mut self, t: BTreeMap<Fd, Acquire>) -> TableId {
        self.next_table += 1;
        self.tables.insert(self.next_table, t);
        self.next_table
    }

    fn sharers(&self, id: TableId) -> usize {
        self.table_of.values().filter(|t| **t == id).count()
    }

    /// Stacks of the fds `pid` holds now: a backend that frees stacks when
    /// their acquirer closes must keep these before a fork or exit is applied.
    pub fn fd_stacks(&self, pid: Pid) -> Vec<StackId> {
        self.table_of
            .get(&pid)
            .and_then(|id| self.tables.get(id))
            .map(|t| t.values().map(|a| a.stack).collect())
            .unwrap_or_default()
    }

    /// The fds `pid` holds now.
    pub fn open_fds(&self, pid: Pid) -> Vec<Fd> {
        self.table_of
            .get(&pid)
            .and_then(|id| self.tables.get(id))
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default()
    }

    fn fd_leak(&self, holder: Pid, a: Acquire, at: TimeNs) -> Leak {
        let tcp = (a.inode != 0)
            .then(|| self.tcp.get(&a.inode).copied())
            .flatten();
        Leak {
            holder,
            fd: Some(a.fd),
            resource: Resource::Fd(a),
            tcp,
            at,
        }
    }

    /// Applies one event.
    pub fn apply(&mut self, ev: &Event) {
        self.events += 1;
        self.now = self.now.max(ev.time());
        match ev {
            Event::Acquire(a) => {
                let mut a = a.clone();
                let table = self.table_mut(a.pid);
                if let Some(src) = a.dup_of.and_then(|fd| table.get(&fd)) {
                    // A copy refers to the same open file as its source.
                    a.kind = src.kind;
                    if src.detail.is_some() {
                        a.detail = src.detail.clone();
                    }
                }
                // Reuse of a number we still hold means we missed its release.
                table.insert(a.fd, a);
            }
            Event::Release { pid, fd, .. } => {
                self.table_mut(*pid).remove(fd);
            }
            Event::CloseRange {
                pid,
                first,
                last,
                cloexec_only,
                ..
            } => {
                let table = self.table_mut(*pid);
                if *cloexec_only {
                    for (_, a) in table.range_mut(*first..=*last) {
                        a.cloexec = true;
                    }
                } else {
                    let doomed: Vec<Fd> = table.range(*first..=*last).map(|(fd, _)| *fd).collect();
                    for fd in doomed {
                        table.remove(&fd);
                    }
                }
            }
            Event::SetCloexec {
                pid, fd, cloexec, ..
            } => {
                if let Some(a) = self.table_mut(*pid).get_mut(fd) {
                    a.cloexec = *cloexec;
                }
            }
            Event::Describe {
                pid, fd, detail, ..
            } => {
                if let Some(a) = self.table_mut(*pid).get_mut(fd) {
                    a.detail = Some(detail.clone());
                }
            }
            Event::Fork {
                parent,
                child,
                shares_table,
                ..
            } => {
                if parent == child {
                    return; // a thread: same table
                }
                let parent_table = self.table_of.get(parent).copied();
                let id = match (shares_table, parent_table) {
                    (true, Some(id)) => id,
                    (_, Some(id)) => {
                        let copy = self.tables.get(&id).cloned().unwrap_or_default();
                        self.new_table(copy)
                    }
                    (_, None) => self.new_table(BTreeMap::new()),
                };
                self.table_of.insert(*child, id);
            }
            Event::Exec { pid, open_fds, .. } => {
                // execve(2) unshares a table shared through CLONE_FILES.
                if let Some(id) = self.table_of.get(pid).copied() {
                    if self.sharers(id) > 1 {
                        let copy = self.tables.get(&id).cloned().unwrap_or_default();
                        let new = self.new_table(copy);
                        self.table_of.insert(*pid, new);
                    }
                }
                let table = self.table_mut(*pid);
                match open_fds {
                    Some(open) => table.retain(|fd, _| open.binary_search(fd).is_ok()),
                    None => table.retain(|_, a| !a.cloexec),
                }
            }
            Event::Exit { pid, time, .. } => {
                if let Some(id) = self.table_of.remove(pid) {
                    if self.sharers(id) == 0 {
                        if let Some(table) = self.tables.remove(&id) {
                            let leaks: Vec<Leak> = table
                                .into_values()
                                .map(|a| self.fd_leak(*pid, a, *time))
                                .collect();
                            self.leaks.extend(leaks);
                        }
                    }
                }
            }
            Event::TcpState {
                time, inode, new, ..
            } => {
                self.tcp.insert(*inode, (*new, *time));
            }
            Event::Alloc {
                time,
                pid,
                tid,
                addr,
                size,
                stack,
            } => {
                self.heaps.entry(*pid).or_default().insert(
                    *addr,
                    Live {
                        size: *size,
                        time: *time,
                        stack: *stack,
                        tid: *tid,
                    },
                );
            }
            Event::Free { pid, addr, .. } => {
                // Unknown addresses (allocated before tracing) are ignored.
                if let Some(h) = self.heaps.get_mut(pid) {
                    h.remove(addr);
                }
            }
            Event::HeapEnd {
                pid, by_exec: true, ..
            } => {
                if let Some(h) = self.heaps.remove(pid) {
                    for (_, b) in h.into_iter() {
                        self.exec_freed.0 += 1;
                        self.exec_freed.1 += b.size;
                    }
                }
            }
            Event::HeapEnd { pid, time, .. } => {
                if let Some(h) = self.heaps.remove(pid) {
                    self.leaks.extend(h.into_iter().map(|(addr, b)| Leak {
                        holder: *pid,
                        fd: None,
                        resource: Resource::Heap(b.block(*pid, addr)),
                        tcp: None,
                        at: *time,
                    }));
                }
            }
            Event::Lost { count, .. } => self.lost += count,
            Event::Map { .. } => {}
        }
    }

    /// Processes still holding a table (not yet seen exiting).
    pub fn live(&self) -> Vec<Pid> {
        let mut v: Vec<Pid> = self.table_of.keys().copied().collect();
        v.sort();
        v
    }

    /// Leaks found at exits so far (and at execs' ends of a heap), in the
    /// order they were found: the list only grows, so a reader that keeps
    /// how many it has seen can take the new ones.
    pub fn exited(&self) -> &[Leak] {
        &self.leaks
    }

    /// What live processes hold now (`at` is [`Ledger::now`]), unsorted.
    pub fn outstanding(&self) -> Vec<Leak> {
        let mut out = Vec::new();
        // A table shared by several live processes is listed once, under
        // its lowest pid.
        let mut holders: BTreeMap<TableId, Pid> = BTreeMap::new();
        for (pid, id) in &self.table_of {
            let h = holders.entry(*id).or_insert(*pid);
            *h = (*h).min(*pid);
        }
        for (id, pid) in &holders {
            if let Some(t) = self.tables.get(id) {
                out.extend(t.values().map(|a| self.fd_leak(*pid, a.clone(), self.now)));
            }
        }
        for (pid, h) in &self.heaps {
            out.extend(h.iter().map(|(addr, b)| Leak {
                holder: *pid,
                fd: None,
                resource: Resource::Heap(b.block(*pid, *addr)),
                tcp: None,
                at: self.now,
            }));
        }
        out
    }

    /// Leaks so far plus everything still outstanding, without consuming
    /// the ledger (for reports while tracing goes on).
    pub fn snapshot(&self) -> Vec<Leak> {
        let mut out = self.leaks.clone();
        out.extend(self.outstanding());
        out.sort_by_key(|l| (l.resource.time(), l.holder, l.fd));
        out
    }

    /// Ends the trace: leaks found at exits plus everything still held.
    pub fn finish(self) -> Vec<Leak> {
        self.snapshot()
    }
}

/// Leaks sharing a key (normally: kind and acquiring stack).
#[derive(Debug, Clone)]
pub struct LeakGroup<K> {
    /// The grouping key.
    pub key: K,
    /// How many resources.
    pub count: u64,
    /// Total bytes (heap).
    pub bytes: u64,
    /// Smallest and largest block (heap).
    pub size_range: Option<(u64, u64)>,
    /// Earliest acquisition.
    pub first: TimeNs,
    /// Latest acquisition.
    pub last: TimeNs,
    /// The leaks themselves, oldest first.
    pub leaks: Vec<Leak>,
}

/// Groups leaks by `key`, largest groups first (by count, then bytes).
pub fn group<K: Hash + Eq + Clone>(
    leaks: Vec<Leak>,
    mut key: impl FnMut(&Leak) -> K,
) -> Vec<LeakGroup<K>> {
    let mut index: WordMap<K, usize> = WordMap::default();
    let mut groups: Vec<LeakGroup<K>> = Vec::new();
    for leak in leaks {
        let k = key(&leak);
        let i = *index.entry(k.clone()).or_insert_with(|| {
            groups.push(LeakGroup {
                key: k,
                count: 0,
                bytes: 0,
                size_range: None,
                first: TimeNs(u64::MAX),
                last: TimeNs(0),
                leaks: Vec::new(),
            });
            groups.len() - 1
        });
        let g = &mut groups[i];
        g.count += 1;
        let t = leak.resource.time();
        g.first = g.first.min(t);
        g.last = g.last.max(t);
        if let Resource::Heap(b) = &leak.resource {
            g.bytes += b.size;
            g.size_range = Some(match g.size_range {
                None => (b.size, b.size),
                Some((lo, hi)) => (lo.min(b.size), hi.max(b.size)),
            });
        }
        g.leaks.push(leak);
    }
    for g in &mut groups {
        g.leaks.sort_by_key(|l| (l.resource.time(), l.holder, l.fd));
    }
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.bytes.cmp(&a.bytes)));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakscope_event::FdKind;

    const P: Pid = Pid(100);

    fn acq(pid: Pid, fd: i32, stack: u64) -> Event {
        Event::Acquire(Acquire {
            time: TimeNs(stack),
            pid,
            tid: Tid(pid.0),
            fd: Fd(fd),
            kind: FdKind::File,
            syscall: "openat".into(),
            cloexec: false,
            dup_of: None,
            inode: 0,
            detail: Some(format!("/f{fd}")),
            stack: StackId(stack),
        })
    }

    fn rel(pid: Pid, fd: i32) -> Event {
        Event::Release {
            time: TimeNs(0),
            pid,
            fd: Fd(fd),
        }
    }

    fn exit(pid: Pid) -> Event {
        Event::Exit {
            time: TimeNs(0),
            pid,
            status: Some(0),
        }
    }

    fn fds(leaks: &[Leak], holder: Pid) -> Vec<(i32, u64)> {
        let mut v: Vec<(i32, u64)> = leaks
            .iter()
            .filter(|l| l.holder == holder && l.fd.is_some())
            .map(|l| (l.fd.unwrap().0, l.resource.stack().0))
            .collect();
        v.sort();
        v
    }

    fn run(events: &[Event]) -> Vec<Leak> {
        let mut l = Ledger::default();
        for e in events {
            l.apply(e);
        }
        l.finish()
    }

    #[test]
    fn released_fds_are_not_leaks() {
        let leaks = run(&[acq(P, 3, 1), acq(P, 4, 2), rel(P, 3), exit(P)]);
        assert_eq!(fds(&leaks, P), vec![(4, 2)]);
    }

    #[test]
    fn fd_numbers_are_reused_with_the_new_stack() {
        let leaks = run(&[acq(P, 3, 1), rel(P, 3), acq(P, 3, 7), exit(P)]);
        assert_eq!(fds(&leaks, P), vec![(3, 7)]);
    }

    #[test]
    fn threads_share_one_table() {
        // Events carry the process id; a thread's fork event has parent == child.
        let leaks = run(&[
            Event::Fork {
                time: TimeNs(0),
                parent: P,
                child: P,
                shares_table: true,
            },
            acq(P, 3, 1),
            rel(P, 3), // closed by another thread of the same process
            exit(P),
        ]);
        assert!(leaks.is_empty());
    }

    #[test]
    fn fork_copies_the_table_and_keeps_the_acquiring_stack() {
        let c = Pid(101);
        let leaks = run(&[
            acq(P, 3, 1),
            acq(P, 4, 2),
            Event::Fork {
                time: TimeNs(0),
                parent: P,
                child: c,
                shares_table: false,
            },
            rel(c, 3), // the child's close does not close the parent's copy
            rel(P, 4),
            exit(c),
            exit(P),
        ]);
        assert_eq!(fds(&leaks, c), vec![(4, 2)]);
        assert_eq!(fds(&leaks, P), vec![(3, 1)]);
        let inherited = leaks.iter().find(|l| l.holder == c).unwrap();
        assert_eq!(inherited.resource.acquired_by(), P);
    }

    #[test]
    fn clone_files_shares_the_table() {
        let c = Pid(101);
        let leaks = run(&[
            acq(P, 3, 1),
            Event::Fork {
                time: TimeNs(0),
                parent: P,
                child: c,
                shares_table: true,
            },
            rel(c, 3),
            acq(c, 5, 9),
            exit(c),
            exit(P),
        ]);
        // fd 5 lives in the shared table and is reported once.
        assert_eq!(leaks.len(), 1);
        assert_eq!(leaks[0].fd, Some(Fd(5)));
    }

    #[test]
    fn exec_closes_cloexec_fds() {
        let mut a = acq(P, 4, 2);
        if let Event::Acquire(x) = &mut a {
            x.cloexec = true;
        }
        let exec = Event::Exec {
            time: TimeNs(0),
            pid: P,
            path: "/bin/true".into(),
            open_fds: None,
        };
        let leaks = run(&[acq(P, 3, 1), a, exec, exit(P)]);
        assert_eq!(fds(&leaks, P), vec![(3, 1)]);
    }

    #[test]
    fn exec_keeps_exactly_what_the_kernel_reports_open() {
        // fd 4 was made close-on-exec by a call we do not trace (ioctl FIOCLEX):
        // the kernel's list after exec is the truth.
        let exec = Event::Exec {
            time: TimeNs(0),
            pid: P,
            path: "/bin/true".into(),
            open_fds: Some(vec![Fd(0), Fd(1), Fd(2), Fd(3)]),
        };
        let leaks = run(&[acq(P, 3, 1), acq(P, 4, 2), exec, exit(P)]);
        assert_eq!(fds(&leaks, P), vec![(3, 1)]);
    }

    #[test]
    fn exec_unshares_a_shared_table() {
        let c = Pid(101);
        let leaks = run(&[
            Event::Fork {
                time: TimeNs(0),
                parent: P,
                child: c,
                shares_table: true,
            },
            acq(P, 3, 1),
            Event::Exec {
                time: TimeNs(0),
                pid: c,
                path: "/bin/true".into(),
                open_fds: Some(vec![]),
            },
            exit(c),
            exit(P),
        ]);
        // The child's exec closed its copy only; the parent still leaks fd 3.
        assert_eq!(fds(&leaks, P), vec![(3, 1)]);
        assert_eq!(fds(&leaks, c), vec![]);
    }

    #[test]
    fn dup2_onto_an_open_fd_releases_it_and_inherits_the_kind() {
        // The backend reports dup2(3, 4) as Release(4) then Acquire(4, dup_of 3).
        let mut sock = acq(P, 3, 1);
        if let Event::Acquire(x) = &mut sock {
            x.kind = FdKind::Socket;
            x.detail = Some("127.0.0.1:1 -> 127.0.0.1:2".into());
        }
        let mut dup = acq(P, 4, 5);
        if let Event::Acquire(x) = &mut dup {
            x.syscall = "dup2".into();
            x.kind = FdKind::Other;
            x.dup_of = Some(Fd(3));
            x.detail = None;
        }
        let leaks = run(&[sock, acq(P, 4, 2), rel(P, 4), dup, rel(P, 3), exit(P)]);
        assert_eq!(fds(&leaks, P), vec![(4, 5)]);
        let Resource::Fd(a) = &leaks[0].resource else {
            panic!("not an fd")
        };
        assert_eq!(a.kind, FdKind::Socket);
        assert_eq!(a.detail.as_deref(), Some("127.0.0.1:1 -> 127.0.0.1:2"));
    }

    #[test]
    fn close_range_releases_or_marks_cloexec() {
        let leaks = run(&[
            acq(P, 3, 1),
            acq(P, 4, 2),
            acq(P, 5, 3),
            acq(P, 9, 4),
            Event::CloseRange {
                time: TimeNs(0),
                pid: P,
                first: Fd(4),
                last: Fd(5),
                cloexec_only: false,
            },
            Event::CloseRange {
                time: TimeNs(0),
                pid: P,
                first: Fd(9),
                last: Fd(i32::MAX),
                cloexec_only: true,
            },
            Event::Exec {
                time: TimeNs(0),
                pid: P,
                path: "/bin/true".into(),
                open_fds: None,
            },
            exit(P),
        ]);
        assert_eq!(fds(&leaks, P), vec![(3, 1)]);
    }

    #[test]
    fn realloc_moving_a_block_frees_the_old_address() {
        let alloc = |addr, size, stack| Event::Alloc {
            time: TimeNs(1),
            pid: P,
            tid: Tid(1),
            addr: AbsAddr(addr),
            size,
            stack: StackId(stack),
        };
        let free = |addr| Event::Free {
            time: TimeNs(2),
            pid: P,
            addr: AbsAddr(addr),
        };
        let leaks = run(&[
            alloc(0x1000, 16, 1),
            // realloc(0x1000, 64) moved the block to 0x2000
            free(0x1000),
            alloc(0x2000, 64, 2),
            free(0x9999), // allocated before tracing: ignored
            Event::HeapEnd {
                time: TimeNs(3),
                pid: P,
                by_exec: false,
            },
        ]);
        assert_eq!(leaks.len(), 1);
        let Resource::Heap(b) = &leaks[0].resource else {
            panic!("not heap")
        };
        assert_eq!((b.addr, b.size, b.stack), (AbsAddr(0x2000), 64, StackId(2)));
    }

    #[test]
    fn a_leaked_socket_carries_its_tcp_state_and_since_when() {
        let mut sock = acq(P, 3, 1);
        if let Event::Acquire(a) = &mut sock {
            a.kind = FdKind::Socket;
            a.inode = 4242;
        }
        let state = |new: u8, t: u64| Event::TcpState {
            time: TimeNs(t),
            inode: 4242,
            old: TcpState(1),
            new: TcpState(new),
            detail: String::new(),
        };
        let leaks = run(&[
            sock,
            state(1, 5),
            state(8, 10), // the peer closed: CLOSE_WAIT
            Event::Exit {
                time: TimeNs(30),
                pid: P,
                status: Some(0),
            },
        ]);
        assert_eq!(leaks[0].tcp, Some((TcpState::CLOSE_WAIT, TimeNs(10))));
        assert_eq!(leaks[0].at, TimeNs(30));
    }

    #[test]
    fn groups_count_and_sort() {
        let leaks = run(&[
            acq(P, 3, 1),
            acq(P, 4, 1),
            acq(P, 5, 2),
            acq(P, 6, 1),
            exit(P),
        ]);
        let groups = group(leaks, |l| l.resource.stack());
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].key, groups[0].count), (StackId(1), 3));
        assert_eq!((groups[1].key, groups[1].count), (StackId(2), 1));
    }

    #[test]
    fn execve_frees_the_old_images_heap() {
        let mut l = Ledger::default();
        for ev in [
            Event::Alloc {
                time: TimeNs(1),
                pid: P,
                tid: Tid(P.0),
                addr: AbsAddr(0x1000),
                size: 64,
                stack: StackId(1),
            },
            Event::HeapEnd {
                time: TimeNs(2),
                pid: P,
                by_exec: true,
            },
        ] {
            l.apply(&ev);
        }
        assert_eq!(l.freed_by_exec(), (1, 64));
        assert!(l.finish().is_empty());
    }
}
