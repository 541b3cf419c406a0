//! A thread's allocations not sent yet, by address: a `free` of one of them
//! cancels the pair in the thread, and neither record is ever sent. Most
//! blocks of a real program die young on the thread that made them, so
//! most pairs end here instead of in the collector.
//!
//! An open-addressing table (linear probing, backward-shift deletion, so
//! that a long run of inserts and removes leaves no tombstones), emptied by
//! every flush. Owned by its recorder and only touched under its
//! begin()/end() or with every recorder held, like the encoded buffer.
//!
//! Whether a found entry may be cancelled is decided by the caller (see
//! `FREED` in lib.rs): another thread may have freed the block meanwhile,
//! and the address may have been handed out again.

/// A not-yet-sent allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Alloc {
    /// The block; 0 marks an empty slot (malloc never returns 0 for a
    /// recorded block).
    pub addr: u64,
    /// The `SEQ` number read after libc returned the block.
    pub seq: u64,
    /// Coarse clock at the allocation.
    pub time: u64,
    /// Requested size.
    pub size: u64,
    /// Stack id.
    pub stack: u32,
}

/// Slots of a table (a power of two).
pub const CAP: usize = 4096;
/// Entries at which the owner asks for a flush.
pub const FULL: usize = CAP / 2;
/// Entries beyond which new allocations bypass the table (sent as they
/// are, not cancellable), so that probes stay short even when every
/// flush attempt finds the flush lock taken.
pub const HARD: usize = CAP * 3 / 4;

const MASK: usize = CAP - 1;

/// See the module docs.
pub struct Pending {
    /// Allocated on first insert (most recorders of short-lived threads
    /// never need it; a fork child's inherited ones may never be used).
    slots: Vec<Alloc>,
    len: usize,
}

#[inline]
fn home(addr: u64) -> usize {
    // Blocks are 16-byte aligned; Fibonacci hashing spreads the rest.
    ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - CAP.trailing_zeros())) as usize
}

/// CAP empty slots, from calloc (pages of a large block are mapped
/// zeroed on first touch, not written now).
fn zeroed() -> Vec<Alloc> {
    let layout = std::alloc::Layout::array::<Alloc>(CAP).expect("fits");
    // SAFETY: an all-zero `Alloc` is a valid (empty) one; the pointer comes
    // from the global allocator with exactly this layout and length.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut Alloc;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, CAP, CAP)
    }
}

impl Pending {
    /// An empty table that has not allocated yet.
    pub const fn new() -> Pending {
        Pending {
            slots: Vec::new(),
            len: 0,
        }
    }

    /// Entries held.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds `a`. An entry already held for the same address is replaced
    /// and returned: its block was freed by some other route (another
    /// thread) and handed out again, so its record must still be sent.
    /// Uses the shim's heap (libc) on first use.
    #[inline]
    pub fn insert(&mut self, a: Alloc) -> Option<Alloc> {
        debug_assert!(a.addr != 0 && self.len < CAP - 1);
        if self.slots.is_empty() {
            self.slots = zeroed();
        }
        let mut i = home(a.addr);
        loop {
            let s = &mut self.slots[i];
            if s.addr == 0 {
                *s = a;
                self.len += 1;
                return None;
            }
            if s.addr == a.addr {
                return Some(std::mem::replace(s, a));
            }
            i = (i + 1) & MASK;
        }
    }

    /// Takes the entry for `addr` out, if held.
    #[inline]
    pub fn remove(&mut self, addr: u64) -> Option<Alloc> {
        if self.len == 0 || addr == 0 {
            return None;
        }
        let mut i = home(addr);
        loop {
            let s = self.slots[i];
            if s.addr == 0 {
                return None;
            }
            if s.addr == addr {
                break;
            }
            i = (i + 1) & MASK;
        }
        let found = self.slots[i];
        // Backward shift: move later members of the probe run into the
        // hole unless that would put them before their home slot.
        let mut j = i;
        loop {
            j = (j + 1) & MASK;
            let s = self.slots[j];
            if s.addr == 0 {
                break;
            }
            let k = home(s.addr);
            // Is k cyclically in (i, j]? Then s must stay where it is.
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.slots[i] = s;
                i = j;
            }
        }
        self.slots[i] = Alloc::default();
        self.len -= 1;
        Some(found)
    }

    /// Hands every entry to `f` and empties the table.
    pub fn drain(&mut self, mut f: impl FnMut(&Alloc)) {
        if self.len == 0 {
            return;
        }
        for s in self.slots.iter_mut().filter(|s| s.addr != 0) {
            f(s);
            *s = Alloc::default();
            self.len -= 1;
            if self.len == 0 {
                break;
            }
        }
    }

    /// Forgets every entry (a fork child: they are the parent's to send).
    pub fn clear(&mut self) {
        if self.len != 0 {
            self.slots.fill(Alloc::default());
            self.len = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(addr: u64, seq: u64) -> Alloc {
        Alloc {
            addr,
            seq,
            time: seq * 10,
            size: 16,
            stack: 1,
        }
    }

    #[test]
    fn insert_remove_and_replace() {
        let mut p = Pending::new();
        assert_eq!(p.remove(0x1000), None);
        assert_eq!(p.insert(a(0x1000, 1)), None);
        assert_eq!(p.insert(a(0x2000, 2)), None);
        assert_eq!(p.len(), 2);
        // The same address again: the older entry comes back out.
        assert_eq!(p.insert(a(0x1000, 3)), Some(a(0x1000, 1)));
        assert_eq!(p.len(), 2);
        assert_eq!(p.remove(0x1000), Some(a(0x1000, 3)));
        assert_eq!(p.remove(0x1000), None);
        let mut out = Vec::new();
        p.drain(|e| out.push(*e));
        assert_eq!(out, [a(0x2000, 2)]);
        assert_eq!(p.len(), 0);
        assert_eq!(p.remove(0x2000), None);
    }

    /// Colliding addresses, removed in every order, against a model: the
    /// backward shift never loses or resurrects an entry.
    #[test]
    fn probe_runs_survive_removals() {
        // Addresses sharing a home slot, and their neighbours.
        let base = 0x5555_0000_0000u64;
        let mut same: Vec<u64> = (0..200_000u64)
            .map(|i| base + i * 16)
            .filter(|&x| home(x) == home(base) || home(x) == (home(base) + 1) & MASK)
            .take(12)
            .collect();
        same.extend((1..40u64).map(|i| base + i * 16));
        let mut state = 0x1234_5678u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut p = Pending::new();
        let mut model = std::collections::HashMap::new();
        for step in 0..20_000u64 {
            let addr = same[(rand() % same.len() as u64) as usize];
            if rand() % 2 == 0 {
                let old = p.insert(a(addr, step));
                assert_eq!(old, model.insert(addr, a(addr, step)));
            } else {
                assert_eq!(p.remove(addr), model.remove(&addr));
            }
            assert_eq!(p.len(), model.len());
        }
        for (addr, e) in &model {
            assert_eq!(p.remove(*addr), Some(*e));
        }
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn drain_and_clear_empty_the_table() {
        let mut p = Pending::new();
        for i in 1..=100u64 {
            p.insert(a(i * 48, i));
        }
        let mut seen = 0;
        p.drain(|_| seen += 1);
        assert_eq!((seen, p.len()), (100, 0));
        for i in 1..=100u64 {
            assert_eq!(p.remove(i * 48), None);
        }
        p.insert(a(0x40, 1));
        p.clear();
        assert_eq!((p.len(), p.remove(0x40)), (0, None));
    }
}
