//! The recorder: the ledger of a trace, and at each commit what changed
//! in what it holds.

use std::collections::HashMap;
use std::io::{self, Write};

use leakscope_event::{Backend, Fd, Pid, RawStack, StackId, TimeNs};
use leakscope_ledger::{Leak, Ledger, Resource};
use leakscope_stacks::{ModuleMaps, Unwinder};

use crate::writer::kind_code;
use crate::{End, GrowthEntry, KindCode, Progress, Stack, Writer, HEAP};

/// What tells one outstanding resource from another across commits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    holder: Pid,
    fd: Option<Fd>,
    time: TimeNs,
    stack: StackId,
    addr: u64,
}

fn key(l: &Leak) -> Key {
    Key {
        holder: l.holder,
        fd: l.fd,
        time: l.resource.time(),
        stack: l.resource.stack(),
        addr: match &l.resource {
            Resource::Heap(b) => b.addr.0,
            Resource::Fd(_) => 0,
        },
    }
}

/// A live resource as last written.
struct Written {
    id: u64,
    /// The leak with `at` zeroed (it moves with the clock).
    leak: Leak,
    kept: Option<&'static str>,
    group: (u32, KindCode),
    bytes: u64,
    /// The commit that last saw it held.
    seen: u64,
}

fn kind_of(l: &Leak) -> (KindCode, u64) {
    match &l.resource {
        Resource::Fd(a) => (kind_code(a.kind), 0),
        Resource::Heap(b) => (HEAP, b.size),
    }
}

/// Applies a trace's events (through [`Recorder::ledger`] and
/// [`Recorder::maps`], which the caller feeds) and writes, at each
/// [`Recorder::commit`], what the ledger holds that it did not write yet,
/// what it wrote that is gone, and the groups whose count changed.
/// Memory: the ledger's, plus one entry per outstanding resource and per
/// distinct stack.
pub struct Recorder<W: Write> {
    /// The ledger of the trace.
    pub ledger: Ledger,
    /// The module maps of the traced processes.
    pub maps: ModuleMaps,
    writer: Writer<W>,
    unwinder: Unwinder,
    /// The recording's stack of each backend stack handle that a written
    /// resource refers to, and how many do: a handle is dropped with the
    /// last one (eBPF gives every acquisition its own handle).
    stack_of: HashMap<StackId, (u32, u64)>,
    interned: HashMap<Stack, u32>,
    written: HashMap<Key, Written>,
    exited_seen: usize,
    commits: u64,
    totals: HashMap<(u32, KindCode), (u64, u64)>,
    reported: HashMap<(u32, KindCode), (u64, u64)>,
    min_age: TimeNs,
}

impl<W: Write> Recorder<W> {
    /// A recorder writing into `writer`.
    pub fn new(writer: Writer<W>) -> Self {
        Recorder {
            ledger: Ledger::default(),
            maps: ModuleMaps::new(),
            writer,
            unwinder: Unwinder::new(),
            stack_of: HashMap::new(),
            interned: HashMap::new(),
            written: HashMap::new(),
            exited_seen: 0,
            commits: 0,
            totals: HashMap::new(),
            reported: HashMap::new(),
            min_age: TimeNs(0),
        }
    }

    /// Commits leave out live resources younger than `age` (the last
    /// commit writes everything): a program that holds each resource
    /// briefly (a pool, a request's buffers) would otherwise have every
    /// one caught by a commit written and removed again. Resources found
    /// at exits are written at once.
    pub fn with_min_age(mut self, age: TimeNs) -> Self {
        self.min_age = age;
        self
    }

    /// Bytes committed so far.
    pub fn written(&self) -> u64 {
        self.writer.written()
    }

    /// The recording's number for the stack of `l`, unwinding and
    /// writing it the first time.
    fn stack(&mut self, backend: &mut dyn Backend, l: &Leak) -> u32 {
        let id = l.resource.stack();
        if let Some((s, refs)) = self.stack_of.get_mut(&id) {
            *refs += 1;
            return *s;
        }
        let stack = match backend.raw_stack(id) {
            RawStack::Missing(why) => Stack {
                frames: Vec::new(),
                note: Some(why),
            },
            raw => {
                let u = self.unwinder.unwind(
                    &self.maps,
                    l.resource.acquired_by(),
                    l.resource.time(),
                    &raw,
                );
                Stack {
                    frames: u.frames,
                    note: u.truncated,
                }
            }
        };
        let n = match self.interned.get(&stack) {
            Some(n) => *n,
            None => {
                let n = self.writer.stack(&stack);
                self.interned.insert(stack, n);
                n
            }
        };
        self.stack_of.insert(id, (n, 1));
        n
    }

    fn kept(backend: &dyn Backend, l: &Leak) -> Option<&'static str> {
        match &l.resource {
            Resource::Heap(b) => backend.kept_by_runtime(l.holder, b.addr),
            Resource::Fd(_) => None,
        }
    }

    fn add(&mut self, backend: &mut dyn Backend, l: &Leak, live: bool) -> io::Result<()> {
        let stack = self.stack(backend, l);
        let kept = Self::kept(backend, l);
        let id = self.writer.add(l, stack, live, kept);
        let (kind, bytes) = kind_of(l);
        let t = self.totals.entry((stack, kind)).or_default();
        t.0 += 1;
        t.1 += bytes;
        if live {
            let mut norm = l.clone();
            norm.at = TimeNs(0);
            self.written.insert(
                key(l),
                Written {
                    id,
                    leak: norm,
                    kept,
                    group: (stack, kind),
                    bytes,
                    seen: self.commits,
                },
            );
        }
        if self.writer.full() {
            self.writer.commit()?;
        }
        Ok(())
    }

    fn remove(&mut self, w: &Written) {
        self.writer.remove(w.id);
        let id = w.leak.resource.stack();
        if let Some((_, refs)) = self.stack_of.get_mut(&id) {
            *refs -= 1;
            if *refs == 0 {
                self.stack_of.remove(&id);
            }
        }
        if let Some(t) = self.totals.get_mut(&w.group) {
            t.0 -= 1;
            t.1 -= w.bytes;
        }
    }

    /// Writes what changed since the last commit, the groups whose count
    /// changed, and the counts; then commits the chunk. `duration_s`: wall
    /// time traced so far; `settled`: the backends' settled pairs.
    pub fn commit(
        &mut self,
        backend: &mut dyn Backend,
        duration_s: f64,
        settled: u64,
    ) -> io::Result<()> {
        self.commit_all(backend, duration_s, settled, false)
    }

    fn commit_all(
        &mut self,
        backend: &mut dyn Backend,
        duration_s: f64,
        settled: u64,
        last: bool,
    ) -> io::Result<()> {
        self.commits += 1;
        // The clock, not the last event: a program whose events stopped
        // (or whose backend sends blocks after they lived a while, as the
        // heap shim does) still ages what it holds.
        let now = self.ledger.now().0.max((duration_s * 1e9) as u64);
        let young = TimeNs(now.saturating_sub(self.min_age.0));
        // Found at exits since the last commit: final, written once.
        let exited: Vec<Leak> = self.ledger.exited()[self.exited_seen..].to_vec();
        self.exited_seen += exited.len();
        for l in &exited {
            if let Some(w) = self.written.remove(&key(l)) {
                self.remove(&w);
            }
            self.add(backend, l, false)?;
        }
        for l in self.ledger.outstanding() {
            if !last && l.resource.time() > young {
                continue;
            }
            let k = key(&l);
            let kept = Self::kept(backend, &l);
            let mut norm = l.clone();
            norm.at = TimeNs(0);
            match self.written.get_mut(&k) {
                Some(w) if w.leak == norm && w.kept == kept => w.seen = self.commits,
                Some(_) => {
                    let w = self.written.remove(&k).expect("just found");
                    self.remove(&w);
                    self.add(backend, &l, true)?;
                }
                None => self.add(backend, &l, true)?,
            }
        }
        let gone: Vec<Key> = self
            .written
            .iter()
            .filter(|(_, w)| w.seen != self.commits)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            let w = self.written.remove(&k).expect("listed");
            self.remove(&w);
        }
        let mut changed: Vec<GrowthEntry> = self
            .totals
            .iter()
            .filter(|(g, t)| self.reported.get(g) != Some(t))
            .map(|(g, t)| GrowthEntry {
                stack: g.0,
                kind: g.1,
                count: t.0,
                bytes: t.1,
            })
            .collect();
        let now = self.ledger.now();
        if !changed.is_empty() {
            changed.sort_by_key(|g| (g.stack, g.kind));
            for g in &changed {
                self.reported.insert((g.stack, g.kind), (g.count, g.bytes));
            }
            self.writer.growth(now, &changed);
        }
        self.writer.progress(&Progress {
            now,
            duration_s,
            events: self.ledger.events() + 2 * settled,
            lost: self.ledger.lost(),
            settled: 2 * settled,
        });
        self.writer.commit()
    }

    /// The last commit and the end record; returns the output.
    pub fn finish(
        mut self,
        backend: &mut dyn Backend,
        duration_s: f64,
        mut end: End,
    ) -> io::Result<W> {
        let settled = backend.settled();
        end.freed_by_exec = self.ledger.freed_by_exec();
        self.commit_all(backend, duration_s, settled, true)?;
        self.writer.end(&end);
        self.writer.commit()?;
        Ok(self.writer.into_inner())
    }
}
