//! The collector's side of a shim's journal (layout: `wire::J_MAGIC`): a
//! read-only view of the memfd the shim passed with its HELLO, read when
//! its process is gone for what it had not sent.
//!
//! The process wrote it, so nothing in it is trusted: every length and
//! count is checked against the mapping before use.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use leakscope_event::wire::{
    slot_size, J_BUF_CAP, J_COPYING, J_COPY_END, J_HEADER, J_LOST, J_MAGIC, J_MAGIC_OFF, J_OUT_CAP,
    J_OUT_LEN, J_SLOTS, J_SLOT_CAP, J_STOPPED, J_STREAM_OFF, J_UNJOURNALED, S_HEADER, S_LEN, S_TID,
    TABLE_SLOTS, TABLE_VAL,
};

/// A pending-table entry: an allocation the shim had not encoded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub seq: u64,
    pub time: u64,
    pub size: u64,
    pub stack: u32,
}

/// One recorder's undelivered records.
pub struct Slot<'a> {
    pub tid: u32,
    /// A CHUNK body.
    pub records: &'a [u8],
    pub pending: Vec<Entry>,
}

/// A mapped journal.
pub struct Journal {
    base: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping owned by this value.
unsafe impl Send for Journal {}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

impl Journal {
    /// Maps the memfd `fd` (closed when this returns; the mapping stays).
    pub fn map(fd: OwnedFd) -> io::Result<Journal> {
        let len = std::fs::File::from(fd.try_clone()?).metadata()?.len() as usize;
        if len < J_HEADER {
            return Err(io::Error::other("journal smaller than its header"));
        }
        // SAFETY: a read-only shared mapping of a memfd of `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let j = Journal {
            base: p as *const u8,
            len,
        };
        if j.word(J_MAGIC_OFF) != J_MAGIC {
            return Err(io::Error::other("not a leakscope journal"));
        }
        let (out, buf, slots) = (j.out_cap(), j.buf_cap(), j.slot_cap());
        let need = slots
            .checked_mul(slot_size(buf))
            .and_then(|s| s.checked_add(J_HEADER + out));
        if need.is_none_or(|n| n > len) {
            return Err(io::Error::other("journal layout does not fit its size"));
        }
        Ok(j)
    }

    /// The u64 at byte `off` (0 past the end).
    fn word(&self, off: usize) -> u64 {
        if off + 8 > self.len {
            return 0;
        }
        // SAFETY: in bounds; 8-aligned offsets of a page-aligned mapping;
        // a volatile read of memory another process may still write.
        unsafe { std::ptr::read_volatile(self.base.add(off) as *const u64) }
    }

    fn bytes(&self, off: usize, n: usize) -> &[u8] {
        let end = off.saturating_add(n).min(self.len);
        let off = off.min(end);
        // SAFETY: in bounds of the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.add(off), end - off) }
    }

    fn out_cap(&self) -> usize {
        self.word(J_OUT_CAP) as usize
    }
    fn buf_cap(&self) -> usize {
        self.word(J_BUF_CAP) as usize
    }
    fn slot_cap(&self) -> usize {
        self.word(J_SLOT_CAP) as usize
    }

    /// The committed end of the stream (the outbox's last byte + 1).
    fn stream_end(&self) -> u64 {
        let len = (self.word(J_OUT_LEN) as usize).min(self.out_cap());
        self.word(J_STREAM_OFF).saturating_add(len as u64)
    }

    /// The stream's bytes from offset `from` on that the collector has not
    /// received; Err: the outbox starts after `from` (bytes in between
    /// are missing).
    pub fn unsent(&self, from: u64) -> Result<&[u8], u64> {
        let off = self.word(J_STREAM_OFF);
        let len = (self.word(J_OUT_LEN) as usize).min(self.out_cap());
        if from < off {
            return Err(off - from);
        }
        let skip = (from - off).min(len as u64) as usize;
        Ok(self.bytes(J_HEADER + skip, len - skip))
    }

    /// The recorders' undelivered records: those not in the stream yet.
    pub fn slots(&self) -> Vec<Slot<'_>> {
        let n = (self.word(J_SLOTS) as usize).min(self.slot_cap());
        let (buf_cap, size) = (self.buf_cap(), slot_size(self.buf_cap()));
        let copying = self.word(J_COPYING) as usize;
        let copied = self.stream_end() >= self.word(J_COPY_END);
        let mut out = Vec::new();
        for s in 0..n {
            if copying == s + 1 && copied {
                // Moved into the stream; the slot's copy was not cleared.
                continue;
            }
            let at = J_HEADER + self.out_cap() + s * size;
            let len = (self.word(at + S_LEN) as usize).min(buf_cap);
            let records = self.bytes(at + S_HEADER, len);
            let keys = at + S_HEADER + buf_cap;
            let vals = keys + TABLE_SLOTS * 8;
            let mut pending = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for k in 0..TABLE_SLOTS {
                let addr = self.word(keys + k * 8);
                if addr == 0 {
                    continue;
                }
                let v = vals + k * TABLE_VAL;
                let e = Entry {
                    addr,
                    seq: self.word(v),
                    time: self.word(v + 8),
                    size: self.word(v + 16),
                    stack: self.word(v + 24) as u32,
                };
                // An entry moved by a removal may be there twice.
                if seen.insert((e.addr, e.seq)) {
                    pending.push(e);
                }
            }
            if records.is_empty() && pending.is_empty() {
                continue;
            }
            out.push(Slot {
                tid: self.word(at + S_TID) as u32,
                records,
                pending,
            });
        }
        out
    }

    /// Events lost and not reported in a LOST record.
    pub fn lost(&self) -> u64 {
        self.word(J_LOST)
    }

    /// Recorders whose records were outside the journal.
    pub fn unjournaled(&self) -> u64 {
        self.word(J_UNJOURNALED)
    }

    /// Whether the shim stopped tracking.
    pub fn stopped(&self) -> bool {
        self.word(J_STOPPED) != 0
    }
}

/// Reads from `fd` into `buf` like read(2), also taking an fd passed with
/// SCM_RIGHTS (close-on-exec).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use std::os::fd::FromRawFd;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut space = [0u64; 8];
    // SAFETY: msghdr over live buffers; the cmsg walk stays inside
    // `space`, as cmsg(3) shows.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&space);
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut passed = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for k in 0..count {
                    let f = OwnedFd::from_raw_fd(*data.add(k));
                    // The first is the journal; any other is closed.
                    if passed.is_none() {
                        passed = Some(f);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, passed))
    }
}
