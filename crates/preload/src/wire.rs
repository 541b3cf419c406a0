//! Decoding the shim's records (format: see the crate docs; the shim's
//! encoder in `crates/shim/src/lib.rs` must match, and the end-to-end tests
//! check that it does).

/// Format version this decoder understands.
pub const VERSION: u16 = 1;

const T_HELLO: u8 = 1;
const T_ALLOC: u8 = 2;
const T_FREE: u8 = 3;
const T_STACK: u8 = 4;
const T_MAP: u8 = 5;
const T_LOST: u8 = 6;

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Hello {
        version: u16,
        fork_child: bool,
        pid: u32,
        ppid: u32,
        time: u64,
        exe: String,
    },
    Alloc {
        time: u64,
        tid: u32,
        addr: u64,
        size: u64,
        stack: u32,
    },
    Free {
        time: u64,
        addr: u64,
    },
    Stack {
        id: u32,
        addrs: Vec<u64>,
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
            Some(Record::Hello {
                version: c.u16()?,
                fork_child: c.u8()? == 1,
                pid: c.u32()?,
                ppid: c.u32()?,
                time: c.u64()?,
                exe: c.str()?,
            })
        })(),
        T_ALLOC => (|| {
            Some(Record::Alloc {
                time: c.u64()?,
                tid: c.u32()?,
                addr: c.u64()?,
                size: c.u64()?,
                stack: c.u32()?,
            })
        })(),
        T_FREE => (|| {
            Some(Record::Free {
                time: c.u64()?,
                addr: c.u64()?,
            })
        })(),
        T_STACK => (|| {
            let id = c.u32()?;
            let n = c.u16()? as usize;
            let raw = c.take(n * 8)?;
            Some(Record::Stack {
                id,
                addrs: raw
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                    .collect(),
            })
        })(),
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
    fn alloc_record_round_trips_and_partial_is_incomplete() {
        let mut b = vec![T_ALLOC];
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&64u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            decode(&b),
            Decoded::Record(
                Record::Alloc {
                    time: 5,
                    tid: 7,
                    addr: 0x1000,
                    size: 64,
                    stack: 3
                },
                33
            )
        );
        assert_eq!(decode(&b[..20]), Decoded::Incomplete);
        assert_eq!(decode(&[]), Decoded::Incomplete);
        assert_eq!(decode(&[99]), Decoded::BadTag(99));
    }

    #[test]
    fn stack_record_decodes_addresses_in_order() {
        let mut b = vec![T_STACK];
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&0xaau64.to_le_bytes());
        b.extend_from_slice(&0xbbu64.to_le_bytes());
        assert_eq!(
            decode(&b),
            Decoded::Record(
                Record::Stack {
                    id: 9,
                    addrs: vec![0xaa, 0xbb]
                },
                23
            )
        );
    }
}
