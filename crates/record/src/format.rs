//! The file layout: a fixed header, then chunks, each
//! `[payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]`,
//! whose payload is a run of records (a tag byte, then LEB128 varints,
//! strings as a length and UTF-8 bytes). Strings that repeat (syscall
//! names, module paths, build ids) are defined once by a [`T_STRING`]
//! record and referred to by number; stacks and added resources are
//! numbered by the order of their records.

/// The first 8 bytes of every recording. The `\r\n` makes a copy that
/// went through a text-mode transfer fail at once.
pub const MAGIC: [u8; 8] = *b"LSREC\0\r\n";
/// The format version this build writes and the newest it reads.
pub const VERSION: u16 = 1;
/// Header: magic, version (u16 LE), 6 reserved bytes (zero).
pub const HEADER_LEN: usize = 16;
/// Chunk framing: length and checksum.
pub const CHUNK_HEAD: usize = 8;
/// The largest chunk payload a reader accepts; the writer commits well
/// before it.
pub const MAX_CHUNK: usize = 16 << 20;

/// What was traced, how: first record of the first chunk.
pub const T_META: u8 = 1;
/// A string for later references.
pub const T_STRING: u8 = 2;
/// An unwound stack.
pub const T_STACK: u8 = 3;
/// An outstanding fd, in full.
pub const T_ADD_FD: u8 = 4;
/// An outstanding heap block, in full.
pub const T_ADD_HEAP: u8 = 5;
/// A resource added before was released (or is rewritten).
pub const T_REMOVE: u8 = 6;
/// Outstanding counts of the groups that changed since the last one.
pub const T_GROWTH: u8 = 7;
/// Event counts and the clock at a commit.
pub const T_PROGRESS: u8 = 8;
/// The trace ended: exit status, backend notes, coverage.
pub const T_END: u8 = 9;

/// The header of a recording of this version.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Appends records' fields to a chunk payload.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn uv(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }
    /// A signed value, zigzag-encoded.
    pub fn iv(&mut self, v: i64) {
        self.uv(((v << 1) ^ (v >> 63)) as u64);
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.uv(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
}

/// Reads records' fields from a chunk payload; every read is checked
/// against what is left, so no length in the file can make it allocate
/// more than the file holds.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Why a field could not be read (the caller adds where).
pub type Bad = &'static str;

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn u8(&mut self) -> Result<u8, Bad> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or("a record runs past its chunk")?;
        self.pos += 1;
        Ok(b)
    }
    pub fn bool(&mut self) -> Result<bool, Bad> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("a flag is neither 0 nor 1"),
        }
    }
    pub fn uv(&mut self) -> Result<u64, Bad> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("a number overflows 64 bits");
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a number overflows 64 bits")
    }
    pub fn iv(&mut self) -> Result<i64, Bad> {
        let u = self.uv()?;
        Ok((u >> 1) as i64 ^ -((u & 1) as i64))
    }
    pub fn u32(&mut self) -> Result<u32, Bad> {
        u32::try_from(self.uv()?).map_err(|_| "a 32-bit number is out of range")
    }
    pub fn i32(&mut self) -> Result<i32, Bad> {
        i32::try_from(self.iv()?).map_err(|_| "a 32-bit number is out of range")
    }
    pub fn f64(&mut self) -> Result<f64, Bad> {
        let end = self
            .pos
            .checked_add(8)
            .ok_or("a record runs past its chunk")?;
        let b = self
            .buf
            .get(self.pos..end)
            .ok_or("a record runs past its chunk")?;
        self.pos = end;
        let v = f64::from_bits(u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if !v.is_finite() || v < 0.0 {
            return Err("a duration is not a finite positive number");
        }
        Ok(v)
    }
    /// A count of items that each take at least one byte: never more
    /// than the bytes left.
    pub fn len(&mut self) -> Result<usize, Bad> {
        let n = self.uv()?;
        if n > self.left() as u64 {
            return Err("a count is larger than the chunk");
        }
        Ok(n as usize)
    }
    pub fn str(&mut self) -> Result<String, Bad> {
        let n = self.len()?;
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        String::from_utf8(b.to_vec()).map_err(|_| "a string is not UTF-8")
    }
    pub fn opt_str(&mut self) -> Result<Option<String>, Bad> {
        Ok(if self.bool()? {
            Some(self.str()?)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        let mut e = Enc::default();
        let us = [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX];
        let is = [0, -1, 1, i64::MIN, i64::MAX, -300];
        for u in us {
            e.uv(u);
        }
        for i in is {
            e.iv(i);
        }
        e.str("héllo");
        let mut d = Dec::new(&e.buf);
        for u in us {
            assert_eq!(d.uv(), Ok(u));
        }
        for i in is {
            assert_eq!(d.iv(), Ok(i));
        }
        assert_eq!(d.str().as_deref(), Ok("héllo"));
        assert!(d.is_empty());
        assert!(d.u8().is_err());
    }

    #[test]
    fn lengths_beyond_the_buffer_are_refused() {
        let mut e = Enc::default();
        e.uv(1 << 40);
        assert!(Dec::new(&e.buf).str().is_err());
        assert!(Dec::new(&[0xff; 11]).uv().is_err());
    }
}
