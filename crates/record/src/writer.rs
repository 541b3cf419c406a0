//! Writes records into chunks and commits them to any `io::Write`.

use std::collections::HashMap;
use std::io::{self, Write};

use leakscope_event::{FdKind, TimeNs};
use leakscope_ledger::{Leak, Resource};

use crate::format::*;
use crate::{End, GrowthEntry, Meta, Progress, Stack, Traced};

/// Commit early when a chunk grows past this (far below [`MAX_CHUNK`]).
const COMMIT_AT: usize = 1 << 20;

/// Writes a recording: the header and the meta record at once, then
/// records into the current chunk, which [`Writer::commit`] writes out
/// with its length and checksum in one `write`.
pub struct Writer<W: Write> {
    out: W,
    chunk: Enc,
    strings: HashMap<String, u64>,
    stacks: u32,
    added: u64,
    written: u64,
}

/// The code of an fd kind: its index in [`FdKind::ALL`].
pub(crate) fn kind_code(k: FdKind) -> u8 {
    FdKind::ALL.iter().position(|x| *x == k).unwrap_or(15) as u8
}

impl<W: Write> Writer<W> {
    /// Starts a recording in `out` (created by the caller with mode 0600
    /// when it is a file).
    pub fn new(mut out: W, meta: &Meta) -> io::Result<Self> {
        out.write_all(&header())?;
        let mut w = Writer {
            out,
            chunk: Enc::default(),
            strings: HashMap::new(),
            stacks: 0,
            added: 0,
            written: HEADER_LEN as u64,
        };
        let e = &mut w.chunk;
        e.u8(T_META);
        e.uv(meta.command.len() as u64);
        for a in &meta.command {
            e.str(a);
        }
        match meta.pid {
            Some(p) => {
                e.u8(1);
                e.uv(p.into());
            }
            None => e.u8(0),
        }
        e.u8(u8::from(meta.attach));
        e.u8(u8::from(meta.fd) | u8::from(meta.heap) << 1 | u8::from(meta.tcp) << 2);
        e.uv(meta.started_unix_s);
        w.commit()?;
        Ok(w)
    }

    /// Bytes written so far (committed chunks).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The output, after the last commit.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn sref(&mut self, s: &str) -> u64 {
        if let Some(id) = self.strings.get(s) {
            return *id;
        }
        let id = self.strings.len() as u64;
        self.strings.insert(s.to_string(), id);
        self.chunk.u8(T_STRING);
        self.chunk.str(s);
        id
    }

    /// Writes a stack; returns its number (stacks are numbered in order).
    pub fn stack(&mut self, s: &Stack) -> u32 {
        let refs: Vec<Option<(u64, Option<u64>)>> = s
            .frames
            .iter()
            .map(|f| {
                f.module.as_ref().map(|m| {
                    (
                        self.sref(&m.path),
                        m.build_id.as_deref().map(|b| self.sref(b)),
                    )
                })
            })
            .collect();
        let e = &mut self.chunk;
        e.u8(T_STACK);
        e.uv(s.frames.len() as u64);
        for (f, r) in s.frames.iter().zip(refs) {
            e.uv(f.addr.0);
            let mut flags = u8::from(f.is_return_address);
            if let Some((_, b)) = r {
                flags |= 2 | u8::from(b.is_some()) << 2;
            }
            e.u8(flags);
            if let (Some((path, build)), Some(m)) = (r, &f.module) {
                e.uv(path);
                if let Some(b) = build {
                    e.uv(b);
                }
                e.uv(m.offset.0);
            }
        }
        e.opt_str(s.note.as_deref());
        self.stacks += 1;
        self.stacks - 1
    }

    /// Writes an outstanding resource with its stack's number; `live`:
    /// still held (its `at` is the end of the trace, not written).
    /// Returns its number (resources are numbered in order).
    pub fn add(&mut self, leak: &Leak, stack: u32, live: bool, kept: Option<&str>) -> u64 {
        match &leak.resource {
            Resource::Fd(a) => {
                let syscall = self.sref(&a.syscall);
                let e = &mut self.chunk;
                e.u8(T_ADD_FD);
                e.uv(leak.holder.0.into());
                let flags = u8::from(!live)
                    | u8::from(leak.tcp.is_some()) << 1
                    | u8::from(a.dup_of.is_some()) << 2
                    | u8::from(a.detail.is_some()) << 3
                    | u8::from(a.cloexec) << 4;
                e.u8(flags);
                if !live {
                    e.uv(leak.at.0);
                }
                if let Some((state, since)) = leak.tcp {
                    e.u8(state.0);
                    e.uv(since.0);
                }
                e.uv(a.time.0);
                e.uv(a.pid.0.into());
                e.uv(a.tid.0.into());
                e.iv(a.fd.0.into());
                e.u8(kind_code(a.kind));
                e.uv(syscall);
                if let Some(d) = a.dup_of {
                    e.iv(d.0.into());
                }
                e.uv(a.inode);
                if let Some(d) = &a.detail {
                    e.str(d);
                }
                e.uv(stack.into());
            }
            Resource::Heap(b) => {
                let kept = kept.map(|k| self.sref(k));
                let e = &mut self.chunk;
                e.u8(T_ADD_HEAP);
                e.uv(leak.holder.0.into());
                e.u8(u8::from(!live) | u8::from(kept.is_some()) << 1);
                if !live {
                    e.uv(leak.at.0);
                }
                e.uv(b.addr.0);
                e.uv(b.size);
                e.uv(b.time.0);
                e.uv(b.pid.0.into());
                e.uv(b.tid.0.into());
                e.uv(stack.into());
                if let Some(k) = kept {
                    e.uv(k);
                }
            }
        }
        self.added += 1;
        self.added - 1
    }

    /// Resource `id` is no longer outstanding.
    pub fn remove(&mut self, id: u64) {
        self.chunk.u8(T_REMOVE);
        self.chunk.uv(id);
    }

    /// Groups whose outstanding count changed.
    pub fn growth(&mut self, time: TimeNs, changed: &[GrowthEntry]) {
        let e = &mut self.chunk;
        e.u8(T_GROWTH);
        e.uv(time.0);
        e.uv(changed.len() as u64);
        for g in changed {
            e.uv(g.stack.into());
            e.u8(g.kind);
            e.uv(g.count);
            e.uv(g.bytes);
        }
    }

    /// Counts and the clock.
    pub fn progress(&mut self, p: &Progress) {
        let e = &mut self.chunk;
        e.u8(T_PROGRESS);
        e.uv(p.now.0);
        e.f64(p.duration_s);
        e.uv(p.events);
        e.uv(p.lost);
        e.uv(p.settled);
    }

    /// The end of the trace.
    pub fn end(&mut self, end: &End) {
        let e = &mut self.chunk;
        e.u8(T_END);
        match end.exit_code {
            Some(c) => {
                e.u8(1);
                e.iv(c.into());
            }
            None => e.u8(0),
        }
        e.opt_str(end.signal.as_deref());
        e.str(&end.backend);
        e.uv(end.notes.len() as u64);
        for n in &end.notes {
            e.str(n);
        }
        e.uv(end.coverage.len() as u64);
        for c in &end.coverage {
            e.str(&c.kind);
            e.u8(u8::from(c.requested));
            e.u8(match c.traced {
                Traced::All => 0,
                Traced::Part => 1,
                Traced::None => 2,
            });
            e.opt_str(c.reason.as_deref());
        }
        e.uv(end.preexisting.len() as u64);
        for p in &end.preexisting {
            e.uv(p.pid.into());
            e.iv(p.fd.into());
            e.str(&p.detail);
        }
        e.uv(end.freed_by_exec.0);
        e.uv(end.freed_by_exec.1);
    }

    /// Whether the current chunk is large enough to commit now.
    pub fn full(&self) -> bool {
        self.chunk.buf.len() >= COMMIT_AT
    }

    /// Writes the current chunk, if it holds anything, with one `write`,
    /// and flushes `out`.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.chunk.buf.is_empty() {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.chunk.buf);
        let mut framed = Vec::with_capacity(CHUNK_HEAD + payload.len());
        framed.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        framed.extend_from_slice(&payload);
        self.out.write_all(&framed)?;
        self.out.flush()?;
        self.written += framed.len() as u64;
        // Keep the allocation for the next chunk.
        self.chunk.buf = payload;
        self.chunk.buf.clear();
        Ok(())
    }
}
