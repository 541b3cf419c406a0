//! Per-process executable mappings, with history.

use std::collections::{BTreeMap, HashMap};

use leakscope_event::{AbsAddr, Event, Mapping, Pid, TimeNs};

/// One address space of one process: from an exec (or fork, or the first
/// mapping we heard of) until the next exec.
#[derive(Debug, Clone, Default)]
struct Space {
    /// First time this address space existed.
    since: TimeNs,
    /// Mappings in stream order, each with the time it appeared.
    entries: Vec<(TimeNs, Mapping)>,
}

/// The executable mappings of every traced process, over time.
///
/// Feed it every [`Event`] in stream order with [`apply`](Self::apply); then
/// [`lookup`](Self::lookup) answers "which file was mapped at this address in
/// this process at this time", even after the process exited or reused the
/// address for another library.
///
/// Rules:
/// - [`Event::Map`] adds a mapping. A later mapping over the same addresses
///   shadows earlier ones, but only for lookups at times `>=` its own time, so
///   dlopen/dlclose/dlopen of different libraries at one address resolves
///   correctly for older stacks.
/// - [`Event::Fork`] with `parent != child` gives the child a copy of the
///   parent's current address space (fork(2): "At the time of fork() both
///   memory spaces have the same content"). This holds whether or not the fd
///   table is shared (`CLONE_FILES` says nothing about memory), so
///   `shares_table` is ignored.
///   A thread (`parent == child`) changes nothing.
/// - [`Event::Exec`] starts an empty address space from its time (execve(2)
///   replaces every mapping); lookups before that time still see the old one.
/// - A [`Event::Map`] for a process we never saw fork or exec opens an address
///   space that existed since time 0 (mappings found when attaching).
#[derive(Debug, Clone, Default)]
pub struct ModuleMaps {
    spaces: HashMap<Pid, Vec<Space>>,
}

impl ModuleMaps {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event; events that do not concern mappings are ignored.
    pub fn apply(&mut self, ev: &Event) {
        match ev {
            Event::Map { pid, time, mapping } => {
                let spaces = self.spaces.entry(*pid).or_default();
                if spaces.is_empty() {
                    spaces.push(Space::default());
                }
                let space = spaces.last_mut().expect("pushed above");
                space.entries.push((*time, mapping.clone()));
            }
            Event::Fork {
                time,
                parent,
                child,
                ..
            } if parent != child => {
                let entries = self
                    .spaces
                    .get(parent)
                    .and_then(|s| s.last())
                    .map(|s| s.entries.clone())
                    .unwrap_or_default();
                self.spaces.entry(*child).or_default().push(Space {
                    since: *time,
                    entries,
                });
            }
            Event::Exec { time, pid, .. } => {
                self.spaces.entry(*pid).or_default().push(Space {
                    since: *time,
                    entries: Vec::new(),
                });
            }
            _ => {}
        }
    }

    /// The address space of `pid` at `time`.
    fn space(&self, pid: Pid, time: TimeNs) -> Option<&Space> {
        let spaces = self.spaces.get(&pid)?;
        let i = spaces.partition_point(|s| s.since <= time);
        // Before the first known space: nothing was known to be mapped.
        spaces.get(i.checked_sub(1)?)
    }

    /// The mapping that held `addr` in `pid` at `time`, if any.
    pub fn lookup(&self, pid: Pid, time: TimeNs, addr: AbsAddr) -> Option<&Mapping> {
        self.space(pid, time)?
            .entries
            .iter()
            .rev()
            .filter(|(t, _)| *t <= time)
            .map(|(_, m)| m)
            .find(|m| m.start <= addr && addr < m.end)
    }

    /// Every mapping visible in `pid` at `time`, sorted by start address and
    /// non-overlapping: where mappings overlap, the latest one wins and the
    /// older ones are left out entirely.
    pub fn mappings_at(&self, pid: Pid, time: TimeNs) -> Vec<&Mapping> {
        let Some(space) = self.space(pid, time) else {
            return Vec::new();
        };
        // start -> mapping, for the ones kept so far (newest first).
        let mut kept: BTreeMap<AbsAddr, &Mapping> = BTreeMap::new();
        for (_, m) in space.entries.iter().rev().filter(|(t, _)| *t <= time) {
            if m.start >= m.end {
                continue;
            }
            // Overlap with a kept mapping starting before m.end that ends after m.start.
            let overlaps = kept
                .range(..m.end)
                .next_back()
                .is_some_and(|(_, k)| k.end > m.start);
            if !overlaps {
                kept.insert(m.start, m);
            }
        }
        kept.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leakscope_event::FileOffset;

    fn map(pid: u32, time: u64, start: u64, end: u64, path: &str) -> Event {
        Event::Map {
            time: TimeNs(time),
            pid: Pid(pid),
            mapping: Mapping {
                start: AbsAddr(start),
                end: AbsAddr(end),
                offset: FileOffset(0x1000),
                path: path.into(),
            },
        }
    }

    fn path_at(m: &ModuleMaps, pid: u32, time: u64, addr: u64) -> Option<&str> {
        m.lookup(Pid(pid), TimeNs(time), AbsAddr(addr))
            .map(|m| m.path.as_str())
    }

    #[test]
    fn dlopen_dlclose_dlopen_at_same_address_keeps_history() {
        let mut m = ModuleMaps::new();
        m.apply(&map(1, 0, 0x1000, 0x2000, "/bin/a"));
        m.apply(&map(1, 10, 0x5000, 0x6000, "/lib/one.so"));
        m.apply(&map(1, 20, 0x5000, 0x6000, "/lib/two.so"));
        assert_eq!(path_at(&m, 1, 15, 0x5800), Some("/lib/one.so"));
        assert_eq!(path_at(&m, 1, 20, 0x5800), Some("/lib/two.so"));
        assert_eq!(path_at(&m, 1, 5, 0x5800), None);
        assert_eq!(path_at(&m, 1, 5, 0x1000), Some("/bin/a"));
        assert_eq!(path_at(&m, 1, 5, 0x2000), None);
        let at15: Vec<_> = m
            .mappings_at(Pid(1), TimeNs(15))
            .iter()
            .map(|m| m.path.as_str())
            .collect();
        assert_eq!(at15, ["/bin/a", "/lib/one.so"]);
        let at25: Vec<_> = m
            .mappings_at(Pid(1), TimeNs(25))
            .iter()
            .map(|m| m.path.as_str())
            .collect();
        assert_eq!(at25, ["/bin/a", "/lib/two.so"]);
    }

    #[test]
    fn fork_copies_current_mappings_and_thread_does_not() {
        let mut m = ModuleMaps::new();
        m.apply(&map(1, 0, 0x1000, 0x2000, "/bin/a"));
        m.apply(&Event::Fork {
            time: TimeNs(5),
            parent: Pid(1),
            child: Pid(2),
            shares_table: false,
        });
        m.apply(&map(1, 6, 0x5000, 0x6000, "/lib/late.so"));
        assert_eq!(path_at(&m, 2, 7, 0x1800), Some("/bin/a"));
        assert_eq!(path_at(&m, 2, 7, 0x5800), None);
        assert_eq!(path_at(&m, 2, 4, 0x1800), None, "child did not exist yet");
        m.apply(&Event::Fork {
            time: TimeNs(8),
            parent: Pid(1),
            child: Pid(1),
            shares_table: true,
        });
        assert_eq!(path_at(&m, 1, 9, 0x5800), Some("/lib/late.so"));
    }

    #[test]
    fn exec_starts_fresh_address_space() {
        let mut m = ModuleMaps::new();
        m.apply(&map(1, 0, 0x1000, 0x2000, "/bin/old"));
        m.apply(&Event::Exec {
            time: TimeNs(10),
            pid: Pid(1),
            path: "/bin/new".into(),
            open_fds: None,
        });
        m.apply(&map(1, 11, 0x3000, 0x4000, "/bin/new"));
        assert_eq!(path_at(&m, 1, 9, 0x1800), Some("/bin/old"));
        assert_eq!(path_at(&m, 1, 10, 0x1800), None);
        assert_eq!(path_at(&m, 1, 12, 0x3800), Some("/bin/new"));
        assert_eq!(path_at(&m, 1, 9, 0x3800), None);
    }
}
