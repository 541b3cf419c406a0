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
//! The table may live in the journal (see `journal.rs`), which the
//! collector reads if the process dies: an entry's value is written before
//! its key, and a key is cleared before its value is overwritten, so a
//! process killed at any instruction leaves every entry whole, at worst
//! twice (the reader drops duplicates by address and number).
//!
//! Whether a found entry may be cancelled is decided by the caller (see
//! `FREED` in lib.rs): another thread may have freed the block meanwhile,
//! and the address may have been handed out again.

/// A not-yet-sent allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Alloc {
    /// The block (never 0: malloc's NULL is not recorded).
    pub addr: u64,
    /// The `SEQ` number read after libc returned the block.
    pub seq: u64,
    /// Coarse clock at the allocation.
    pub time: u64,
    /// Requested size.
    pub size: u64,
    /// Stack id.
    pub stack: u32,
    /// The flush epoch it was made in (see `EPOCH` in lib.rs).
    pub epoch: u32,
}

/// Slots a table may grow to (a power of two): 5 MiB per thread at most,
/// touched only as far as it grew. Room for blocks that live a few
/// milliseconds on a busy thread (a ring of tens of thousands of request
/// buffers) to die here.
pub const CAP: usize = 131072;
/// Slots a table starts with (40 KiB touched at most).
pub const FIRST: usize = 1024;
/// Entries at which the owner encodes the whole table into its buffer
/// (they are sent with the next flush, no longer cancellable), so that
/// probes stay short: half the table's slots, after which the table
/// doubles, and three quarters of the largest one.
pub const FULL: usize = CAP / 4 * 3;

/// The rest of an entry, apart from its key (layout: `wire::TABLE_VAL`).
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Val {
    seq: u64,
    time: u64,
    size: u64,
    stack: u32,
    epoch: u32,
}

/// The slots: keys and values apart, so that a probe reads only keys,
/// eight to a cache line. Fixed-size arrays: indices masked by the used
/// size (a power of two, at most `CAP`) need no bounds checks.
#[repr(C)]
pub struct Table {
    /// Block addresses, 0: empty.
    keys: [u64; CAP],
    vals: [Val; CAP],
}

const _: () = assert!(std::mem::size_of::<Val>() == leakscope_event::wire::TABLE_VAL);
const _: () = assert!(CAP == leakscope_event::wire::TABLE_SLOTS);
const _: () = assert!(
    std::mem::size_of::<Table>()
        == leakscope_event::wire::TABLE_SLOTS * (8 + leakscope_event::wire::TABLE_VAL)
);

/// See the module docs.
pub struct Pending {
    /// In the journal, or on the heap from the first insert (most
    /// recorders of short-lived threads never need it); null: not yet.
    table: *mut Table,
    len: usize,
    /// The slots in use: `1 << bits`.
    bits: u32,
}

/// What [`Pending::cancel`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancel {
    /// The entry was found and the pair cancelled.
    Done,
    /// The entry was found but may not be cancelled: it is taken out and
    /// returned, to be sent.
    Kept(Alloc),
    /// No entry for the address.
    Absent,
}

/// The home slot of `addr` in a table of `1 << bits` slots.
#[inline]
fn home(addr: u64, bits: u32) -> usize {
    // Blocks are 16-byte aligned; Fibonacci hashing spreads the rest.
    ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
}

/// A zeroed table from the global allocator (calloc: pages of a large
/// block are mapped zeroed on first touch, not written now), never freed
/// (recorders are not).
#[cold]
fn zeroed_table() -> *mut Table {
    let layout = std::alloc::Layout::new::<Table>();
    // SAFETY: all-zero bytes are a valid `Table` (empty keys, zero
    // values).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut Table;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        p
    }
}

/// Orders the stores before it before the ones after it (see the module
/// docs; the CPU keeps stores in order on x86_64).
#[inline(always)]
fn ordered() {
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
}

impl Table {
    #[inline]
    fn entry(&self, i: usize) -> Alloc {
        let v = self.vals[i];
        Alloc {
            addr: self.keys[i],
            seq: v.seq,
            time: v.time,
            size: v.size,
            stack: v.stack,
            epoch: v.epoch,
        }
    }

    /// The slot holding `addr` (not 0), if any, among `1 << bits`.
    #[inline]
    fn find(&self, addr: u64, bits: u32) -> Option<usize> {
        let mask = (1usize << bits) - 1;
        let mut i = home(addr, bits);
        loop {
            let k = self.keys[i];
            if k == addr {
                return Some(i);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Empties slot `i`. Backward shift: later members of the probe run
    /// move into the hole unless that would put them before their home.
    /// The hole's key is cleared before its value is overwritten; a moved
    /// entry is in two slots until its old one becomes the next hole.
    #[inline]
    fn remove_at(&mut self, mut i: usize, bits: u32) {
        let mask = (1usize << bits) - 1;
        self.keys[i] = 0;
        ordered();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let k = self.keys[j];
            if k == 0 {
                break;
            }
            let h = home(k, bits);
            // Is h cyclically in (i, j]? Then the entry must stay.
            let stays = if i <= j {
                i < h && h <= j
            } else {
                i < h || h <= j
            };
            if !stays {
                self.vals[i] = self.vals[j];
                ordered();
                self.keys[i] = k;
                ordered();
                self.keys[j] = 0;
                ordered();
                i = j;
            }
        }
        self.keys[i] = 0;
    }
}

impl Pending {
    /// An empty table that has not allocated yet.
    pub const fn new() -> Pending {
        Pending {
            table: std::ptr::null_mut(),
            len: 0,
            bits: FIRST.trailing_zeros(),
        }
    }

    /// An empty table over zeroed memory at `table` (`TABLE_BYTES` bytes,
    /// 8-aligned, for the life of the process).
    pub fn at(table: *mut u8) -> Pending {
        Pending {
            table: table as *mut Table,
            len: 0,
            bits: FIRST.trailing_zeros(),
        }
    }

    /// The table, made on first use. (A raw pointer: its borrow is not
    /// tied to `self`, whose `len` changes meanwhile.)
    #[inline]
    fn table(&mut self) -> *mut Table {
        if self.table.is_null() {
            self.table = zeroed_table();
        }
        self.table
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is full enough to encode it (and grow it).
    #[inline]
    pub fn full(&self) -> bool {
        let cap = 1usize << self.bits;
        self.len >= if cap == CAP { FULL } else { cap / 2 }
    }

    /// Doubles the slots in use, up to [`CAP`]; only when empty (after a
    /// spill), so that no entry has to move.
    pub fn grow(&mut self) {
        if self.len == 0 && (1usize << self.bits) < CAP {
            self.bits += 1;
        }
    }

    /// Adds `a`. An entry already held for the same address is replaced
    /// and returned: its block was freed by some other route (another
    /// thread) and handed out again, so its record must still be sent.
    /// Uses the shim's heap (libc) on first use.
    #[inline]
    pub fn insert(&mut self, a: Alloc) -> Option<Alloc> {
        debug_assert!(a.addr != 0 && self.len < (1usize << self.bits) - 1);
        let (bits, mask) = (self.bits, (1usize << self.bits) - 1);
        // SAFETY: a live table only this recorder's owner (or a holder of
        // every recorder) touches.
        let t = unsafe { &mut *self.table() };
        let val = Val {
            seq: a.seq,
            time: a.time,
            size: a.size,
            stack: a.stack,
            epoch: a.epoch,
        };
        let mut i = home(a.addr, bits);
        loop {
            let k = t.keys[i];
            if k == 0 {
                t.vals[i] = val;
                ordered();
                t.keys[i] = a.addr;
                self.len += 1;
                return None;
            }
            if k == a.addr {
                let old = t.entry(i);
                t.keys[i] = 0;
                ordered();
                t.vals[i] = val;
                ordered();
                t.keys[i] = a.addr;
                return Some(old);
            }
            i = (i + 1) & mask;
        }
    }

    /// A free of `addr`: if it is held, cancels the pair when `may(seq)`
    /// says so for the entry's number, else takes the entry out for
    /// sending.
    #[inline]
    pub fn cancel(&mut self, addr: u64, may: impl FnOnce(u64) -> bool) -> Cancel {
        if self.len == 0 || addr == 0 {
            return Cancel::Absent;
        }
        // SAFETY: as in `insert`.
        let Some(t) = (unsafe { self.table.as_mut() }) else {
            return Cancel::Absent;
        };
        let Some(i) = t.find(addr, self.bits) else {
            return Cancel::Absent;
        };
        let r = if may(t.vals[i].seq) {
            Cancel::Done
        } else {
            Cancel::Kept(t.entry(i))
        };
        t.remove_at(i, self.bits);
        self.len -= 1;
        r
    }

    /// Takes the entry for `addr` out, if held.
    pub fn remove(&mut self, addr: u64) -> Option<Alloc> {
        match self.cancel(addr, |_| false) {
            Cancel::Kept(a) => Some(a),
            _ => None,
        }
    }

    /// Hands every entry made before epoch `before` to `f` and takes it
    /// out; younger ones stay, cancellable. `keys` is scratch space.
    pub fn spill_old(&mut self, before: u32, keys: &mut Vec<u64>, mut f: impl FnMut(&Alloc)) {
        if self.len == 0 {
            return;
        }
        // SAFETY: as in `insert`.
        let Some(t) = (unsafe { self.table.as_mut() }) else {
            return;
        };
        keys.clear();
        keys.extend(
            (0..1usize << self.bits)
                .filter(|&i| t.keys[i] != 0 && (before.wrapping_sub(t.vals[i].epoch) as i32) > 0)
                .map(|i| t.keys[i]),
        );
        for &k in keys.iter() {
            if let Some(i) = t.find(k, self.bits) {
                f(&t.entry(i));
                ordered();
                t.remove_at(i, self.bits);
                self.len -= 1;
            }
        }
    }

    /// Hands every entry to `f` and empties the table.
    pub fn drain(&mut self, mut f: impl FnMut(&Alloc)) {
        let mut len = self.len;
        // SAFETY: as in `insert`.
        let Some(t) = (unsafe { self.table.as_mut() }) else {
            return;
        };
        let mut i = 0;
        while len > 0 {
            if t.keys[i] != 0 {
                f(&t.entry(i));
                ordered();
                t.keys[i] = 0;
                len -= 1;
            }
            i += 1;
        }
        self.len = 0;
    }

    /// Forgets every entry (a fork child: they are the parent's to send).
    pub fn clear(&mut self) {
        if self.len != 0 {
            // SAFETY: as in `insert`.
            if let Some(t) = unsafe { self.table.as_mut() } {
                t.keys[..1usize << self.bits].fill(0);
            }
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
            epoch: 0,
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
            .filter(|&x| {
                let (b, mask) = (FIRST.trailing_zeros(), FIRST - 1);
                home(x, b) == home(base, b) || home(x, b) == (home(base, b) + 1) & mask
            })
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
    fn cancel_settles_or_hands_the_entry_back() {
        let mut p = Pending::new();
        assert_eq!(p.cancel(0x1000, |_| true), Cancel::Absent);
        p.insert(a(0x1000, 5));
        p.insert(a(0x2000, 6));
        // The caller's check sees the entry's number.
        assert_eq!(
            p.cancel(0x1000, |seq| {
                assert_eq!(seq, 5);
                true
            }),
            Cancel::Done
        );
        assert_eq!(p.cancel(0x1000, |_| true), Cancel::Absent);
        // Refused: the entry comes out, to be sent.
        assert_eq!(p.cancel(0x2000, |_| false), Cancel::Kept(a(0x2000, 6)));
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
