//! Decoding the shim's records (format: see the crate docs; the shim's
//! encoder in `crates/shim/src/lib.rs` must match, and the end-to-end tests
//! check that it does).

pub use leakscope_event::wire::VERSION;
use leakscope_event::wire::{
    T_ALLOC, T_CHUNK, T_END, T_FREE, T_HELLO, T_KEPT, T_LOST, T_MAP, T_NOTE, T_PAIRS, T_STACK,
};

/// One decoded top-level record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Hello {
        version: u16,
        /// `wire::HELLO_IMAGE`, `HELLO_FORK` or `HELLO_RESUME`.
        kind: u8,
        pid: u32,
        ppid: u32,
        time: u64,
        exe: String,
        /// For `HELLO_RESUME`: the stream offset this connection goes on at.
        resume: u64,
    },
    Map {
        time: u64,
        start: u64,
        end: u64,
        offset: u64,
        path: String,
    },
    Lost {
        count: u64,
    },
    /// Allocation/free pairs the shim cancelled without sending them.
    Pairs {
        count: u64,
    },
    /// A sentence for the report.
    Note {
        text: String,
    },
    /// A block the C runtime keeps until exit (see `wire::T_KEPT`).
    Kept {
        what: u8,
        addr: u64,
    },
    /// One thread's records: `body` is their byte range in the decoded
    /// buffer (decode them with [`decode_chunk`]).
    Chunk {
        tid: u32,
        body: std::ops::Range<usize>,
    },
    /// The end of a batch.
    End,
}

/// One record inside a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Alloc {
        seq: u64,
        time: u64,
        addr: u64,
        size: u64,
        stack: u32,
    },
    Free {
        seq: u64,
        time: u64,
        addr: u64,
    },
    Stack {
        id: u32,
        addrs: Vec<u64>,
    },
}

/// Decodes a chunk's body, handing each record to `f`. `Err`: a byte
/// offset and what was wrong there.
pub fn decode_chunk(b: &[u8], mut f: impl FnMut(Item)) -> Result<(), (usize, &'static str)> {
    let mut c = Cur { b, i: 0 };
    let (mut seq, mut time, mut addr) = (0u64, 0u64, 0u64);
    while c.i < b.len() {
        let at = c.i;
        let tag = c.u8().ok_or((at, "truncated"))?;
        let item = match tag {
            T_ALLOC | T_FREE => (|| {
                seq = seq.wrapping_add(unzigzag(c.var()?));
                time = time.wrapping_add(unzigzag(c.var()?));
                addr = addr.wrapping_add(unzigzag(c.var()?));
                Some(if tag == T_ALLOC {
                    Item::Alloc {
                        seq,
                        time,
                        addr,
                        size: c.var()?,
                        stack: u32::try_from(c.var()?).ok()?,
                    }
                } else {
                    Item::Free { seq, time, addr }
                })
            })(),
            T_STACK => (|| {
                let id = u32::try_from(c.var()?).ok()?;
                let n = usize::try_from(c.var()?).ok()?;
                let raw = c.take(n.checked_mul(8)?)?;
                Some(Item::Stack {
                    id,
                    addrs: raw
                        .chunks_exact(8)
                        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                        .collect(),
                })
            })(),
            _ => return Err((at, "unknown tag in a chunk")),
        };
        f(item.ok_or((at, "truncated or malformed record in a chunk"))?);
    }
    Ok(())
}

/// Undoes the shim's zigzag encoding of a signed delta.
#[inline]
fn unzigzag(z: u64) -> u64 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

struct Cur<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.i..self.i.checked_add(n)?)?;
        self.i += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn var(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

/// Outcome of decoding at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record and the bytes it used.
    Record(Record, usize),
    /// The buffer ends inside a record.
    Incomplete,
    /// An unknown tag: the stream is corrupt.
    BadTag(u8),
}

/// Decodes the record at the start of `b`.
pub fn decode(b: &[u8]) -> Decoded {
    let mut c = Cur { b, i: 0 };
    let Some(tag) = c.u8() else {
        return Decoded::Incomplete;
    };
    let rec = match tag {
        T_HELLO => (|| {
            let version = c.u16()?;
            let kind = c.u8()?;
            let (pid, ppid, time, exe) = (c.u32()?, c.u32()?, c.u64()?, c.str()?);
            // Older shims end here; the version check refuses them.
            let resume = if version >= 5 { c.u64()? } else { 0 };
            Some(Record::Hello {
                version,
                kind,
                pid,
                ppid,
                time,
                exe,
                resume,
            })
        })(),
        T_CHUNK => (|| {
            let tid = c.u32()?;
            let len = c.u32()? as usize;
            let start = c.i;
            c.take(len)?;
            Some(Record::Chunk {
                tid,
                body: start..start + len,
            })
        })(),
        T_END => Some(Record::End),
        T_MAP => (|| {
            Some(Record::Map {
                time: c.u64()?,
                start: c.u64()?,
                end: c.u64()?,
                offset: c.u64()?,
                path: c.str()?,
            })
        })(),
        T_LOST => (|| Some(Record::Lost { count: c.u64()? }))(),
        T_PAIRS => (|| Some(Record::Pairs { count: c.u64()? }))(),
        T_NOTE => (|| Some(Record::Note { text: c.str()? }))(),
        T_KEPT => (|| {
            Some(Record::Kept {
                what: c.u8()?,
                addr: c.u64()?,
            })
        })(),
        t => return Decoded::BadTag(t),
    };
    match rec {
        Some(r) => Decoded::Record(r, c.i),
        None => Decoded::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_records_round_trip_and_partial_is_incomplete() {
        // ALLOC seq 5 time 7 addr 0x1000 size 64 stack 3, then FREE seq 9
        // time 7 addr 0xff0, then FREE seq 2 time 6 addr 0xff0 (zigzag
        // deltas: pending allocations are encoded out of order).
        let body = [
            T_ALLOC, 10, 14, 0x80, 0x40, 64, 3, //
            T_FREE, 8, 0, 31, //
            T_FREE, 13, 1, 0, //
            T_STACK, 9, 1, 0xaa, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut b = vec![T_CHUNK];
        b.extend_from_slice(&11u32.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(&body);
        b.push(T_END);
        let Decoded::Record(Record::Chunk { tid, body: r }, used) = decode(&b) else {
            panic!("{:?}", decode(&b));
        };
        assert_eq!((tid, used), (11, 9 + body.len()));
        let mut items = Vec::new();
        decode_chunk(&b[r], |i| items.push(i)).unwrap();
        assert_eq!(
            items,
            [
                Item::Alloc {
                    seq: 5,
                    time: 7,
                    addr: 0x1000,
                    size: 64,
                    stack: 3
                },
                Item::Free {
                    seq: 9,
                    time: 7,
                    addr: 0xff0
                },
                Item::Free {
                    seq: 2,
                    time: 6,
                    addr: 0xff0
                },
                Item::Stack {
                    id: 9,
                    addrs: vec![0xaa]
                }
            ]
        );
        assert_eq!(decode(&b[used..]), Decoded::Record(Record::End, 1));
        let mut pairs = vec![T_PAIRS];
        pairs.extend_from_slice(&1234u64.to_le_bytes());
        assert_eq!(
            decode(&pairs),
            Decoded::Record(Record::Pairs { count: 1234 }, 9)
        );
        assert_eq!(decode(&b[..20]), Decoded::Incomplete);
        assert_eq!(decode(&[]), Decoded::Incomplete);
        assert_eq!(decode(&[99]), Decoded::BadTag(99));
        assert!(decode_chunk(&body[..3], |_| {}).is_err());
    }
}
