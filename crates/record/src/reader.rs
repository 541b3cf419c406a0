//! Reads a recording back; never panics, never allocates more than the
//! input's size on the file's word.

use std::collections::BTreeMap;
use std::path::Path;

use leakscope_event::{
    AbsAddr, Acquire, Fd, FdKind, FileOffset, Pid, StackId, TcpState, Tid, TimeNs,
};
use leakscope_ledger::{Block, Leak, Resource};
use leakscope_stacks::{ModuleRef, RawFrame};

use crate::format::*;
use crate::{
    Coverage, End, Error, GrowthEntry, GrowthPoint, Meta, Preexisting, Progress, Recorded,
    Recording, Stack, Traced,
};

/// Reads the recording in the file at `path`.
pub fn read_file(path: &Path) -> Result<Recording, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    read(&bytes)
}

/// A resource read from the file: its `at` is the trace's end when live.
struct Added {
    leak: Leak,
    live: bool,
    kept: Option<String>,
}

#[derive(Default)]
struct State {
    meta: Option<Meta>,
    strings: Vec<String>,
    stacks: Vec<Stack>,
    added: BTreeMap<u64, Added>,
    next: u64,
    growth: Vec<GrowthPoint>,
    progress: Progress,
    end: Option<End>,
}

/// Reads a recording from its bytes: up to its last complete chunk when
/// it was cut short ([`Recording::torn_tail`], no [`Recording::end`]).
pub fn read(bytes: &[u8]) -> Result<Recording, Error> {
    if bytes.len() < HEADER_LEN {
        let n = bytes.len().min(MAGIC.len());
        return Err(if n > 0 && bytes[..n] == MAGIC[..n] {
            Error::Truncated
        } else {
            Error::NotARecording
        });
    }
    if bytes[..8] != MAGIC {
        return Err(Error::NotARecording);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version > VERSION {
        return Err(Error::Newer { found: version });
    }
    if version == 0 {
        return Err(Error::Corrupt {
            offset: 8,
            what: "format version 0",
        });
    }
    let mut st = State::default();
    let mut pos = HEADER_LEN;
    let mut torn_tail = false;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < CHUNK_HEAD {
            torn_tail = true;
            break;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let corrupt = |what| Error::Corrupt {
            offset: pos as u64,
            what,
        };
        if len == 0 || len > MAX_CHUNK {
            return Err(corrupt("a chunk length is out of range"));
        }
        if rest.len() - CHUNK_HEAD < len {
            torn_tail = true;
            break;
        }
        let payload = &rest[CHUNK_HEAD..CHUNK_HEAD + len];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt("a chunk's checksum does not match"));
        }
        if st.end.is_some() {
            return Err(corrupt("a chunk follows the end record"));
        }
        st.chunk(payload).map_err(corrupt)?;
        if st.meta.is_none() {
            return Err(corrupt(
                "the first chunk does not start with the meta record",
            ));
        }
        pos += CHUNK_HEAD + len;
    }
    let Some(meta) = st.meta else {
        return Err(Error::Truncated);
    };
    let now = st.progress.now;
    let leaks = st
        .added
        .into_values()
        .map(|mut a| {
            if a.live {
                a.leak.at = now;
            }
            Recorded {
                leak: a.leak,
                kept: a.kept,
            }
        })
        .collect();
    Ok(Recording {
        meta,
        stacks: st.stacks,
        leaks,
        growth: st.growth,
        progress: st.progress,
        end: st.end,
        torn_tail,
    })
}

impl State {
    fn string(&self, d: &mut Dec) -> Result<String, Bad> {
        let i = d.uv()?;
        self.strings
            .get(usize::try_from(i).map_err(|_| "a string number is out of range")?)
            .cloned()
            .ok_or("a string number is out of range")
    }

    fn stack_ref(&self, d: &mut Dec) -> Result<StackId, Bad> {
        let s = d.uv()?;
        if s >= self.stacks.len() as u64 {
            return Err("a stack number is out of range");
        }
        Ok(StackId(s))
    }

    fn chunk(&mut self, payload: &[u8]) -> Result<(), Bad> {
        let mut d = Dec::new(payload);
        while !d.is_empty() {
            let tag = d.u8()?;
            if self.meta.is_none() && tag != T_META {
                return Err("the first chunk does not start with the meta record");
            }
            match tag {
                T_META if self.meta.is_none() => {
                    let n = d.len()?;
                    let mut command = Vec::with_capacity(n);
                    for _ in 0..n {
                        command.push(d.str()?);
                    }
                    let pid = if d.bool()? { Some(d.u32()?) } else { None };
                    let attach = d.bool()?;
                    let t = d.u8()?;
                    if t > 7 {
                        return Err("unknown tracking flags");
                    }
                    self.meta = Some(Meta {
                        command,
                        pid,
                        attach,
                        fd: t & 1 != 0,
                        heap: t & 2 != 0,
                        tcp: t & 4 != 0,
                        started_unix_s: d.uv()?,
                    });
                }
                T_STRING => {
                    let s = d.str()?;
                    self.strings.push(s);
                }
                T_STACK => {
                    let n = d.len()?;
                    let mut frames = Vec::with_capacity(n);
                    for _ in 0..n {
                        let addr = AbsAddr(d.uv()?);
                        let flags = d.u8()?;
                        if flags > 7 || flags & 4 != 0 && flags & 2 == 0 {
                            return Err("unknown frame flags");
                        }
                        let module = if flags & 2 != 0 {
                            let path = self.string(&mut d)?;
                            let build_id = if flags & 4 != 0 {
                                Some(self.string(&mut d)?)
                            } else {
                                None
                            };
                            Some(ModuleRef {
                                path,
                                build_id,
                                offset: FileOffset(d.uv()?),
                            })
                        } else {
                            None
                        };
                        frames.push(RawFrame {
                            addr,
                            is_return_address: flags & 1 != 0,
                            module,
                        });
                    }
                    let note = d.opt_str()?;
                    self.stacks.push(Stack { frames, note });
                }
                T_ADD_FD => {
                    let holder = Pid(d.u32()?);
                    let flags = d.u8()?;
                    if flags > 31 {
                        return Err("unknown fd flags");
                    }
                    let at = if flags & 1 != 0 {
                        TimeNs(d.uv()?)
                    } else {
                        TimeNs(0)
                    };
                    let tcp = if flags & 2 != 0 {
                        Some((TcpState(d.u8()?), TimeNs(d.uv()?)))
                    } else {
                        None
                    };
                    let time = TimeNs(d.uv()?);
                    let pid = Pid(d.u32()?);
                    let tid = Tid(d.u32()?);
                    let fd = Fd(d.i32()?);
                    let kind = *FdKind::ALL
                        .get(usize::from(d.u8()?))
                        .ok_or("unknown fd kind")?;
                    let syscall = self.string(&mut d)?;
                    let dup_of = if flags & 4 != 0 {
                        Some(Fd(d.i32()?))
                    } else {
                        None
                    };
                    let inode = d.uv()?;
                    let detail = if flags & 8 != 0 { Some(d.str()?) } else { None };
                    let stack = self.stack_ref(&mut d)?;
                    let leak = Leak {
                        holder,
                        fd: Some(fd),
                        resource: Resource::Fd(Acquire {
                            time,
                            pid,
                            tid,
                            fd,
                            kind,
                            syscall,
                            cloexec: flags & 16 != 0,
                            dup_of,
                            inode,
                            detail,
                            stack,
                        }),
                        tcp,
                        at,
                    };
                    self.add(leak, flags & 1 == 0, None);
                }
                T_ADD_HEAP => {
                    let holder = Pid(d.u32()?);
                    let flags = d.u8()?;
                    if flags > 3 {
                        return Err("unknown heap flags");
                    }
                    let at = if flags & 1 != 0 {
                        TimeNs(d.uv()?)
                    } else {
                        TimeNs(0)
                    };
                    let addr = AbsAddr(d.uv()?);
                    let size = d.uv()?;
                    let time = TimeNs(d.uv()?);
                    let pid = Pid(d.u32()?);
                    let tid = Tid(d.u32()?);
                    let stack = self.stack_ref(&mut d)?;
                    let kept = if flags & 2 != 0 {
                        Some(self.string(&mut d)?)
                    } else {
                        None
                    };
                    let leak = Leak {
                        holder,
                        fd: None,
                        resource: Resource::Heap(Block {
                            addr,
                            size,
                            time,
                            pid,
                            tid,
                            stack,
                        }),
                        tcp: None,
                        at,
                    };
                    self.add(leak, flags & 1 == 0, kept);
                }
                T_REMOVE => {
                    let id = d.uv()?;
                    if self.added.remove(&id).is_none() {
                        return Err("a removal names no outstanding resource");
                    }
                }
                T_GROWTH => {
                    let time = TimeNs(d.uv()?);
                    let n = d.len()?;
                    let mut changed = Vec::with_capacity(n);
                    for _ in 0..n {
                        let stack = d.u32()?;
                        if stack as usize >= self.stacks.len() {
                            return Err("a stack number is out of range");
                        }
                        changed.push(GrowthEntry {
                            stack,
                            kind: d.u8()?,
                            count: d.uv()?,
                            bytes: d.uv()?,
                        });
                    }
                    self.growth.push(GrowthPoint { time, changed });
                }
                T_PROGRESS => {
                    self.progress = Progress {
                        now: TimeNs(d.uv()?),
                        duration_s: d.f64()?,
                        events: d.uv()?,
                        lost: d.uv()?,
                        settled: d.uv()?,
                    };
                }
                T_END if self.end.is_none() => {
                    let exit_code = if d.bool()? { Some(d.i32()?) } else { None };
                    let signal = d.opt_str()?;
                    let backend = d.str()?;
                    let n = d.len()?;
                    let mut notes = Vec::with_capacity(n);
                    for _ in 0..n {
                        notes.push(d.str()?);
                    }
                    let n = d.len()?;
                    let mut coverage = Vec::with_capacity(n);
                    for _ in 0..n {
                        coverage.push(Coverage {
                            kind: d.str()?,
                            requested: d.bool()?,
                            traced: match d.u8()? {
                                0 => Traced::All,
                                1 => Traced::Part,
                                2 => Traced::None,
                                _ => return Err("unknown coverage"),
                            },
                            reason: d.opt_str()?,
                        });
                    }
                    let n = d.len()?;
                    let mut preexisting = Vec::with_capacity(n);
                    for _ in 0..n {
                        preexisting.push(Preexisting {
                            pid: d.u32()?,
                            fd: d.i32()?,
                            detail: d.str()?,
                        });
                    }
                    let freed_by_exec = (d.uv()?, d.uv()?);
                    self.end = Some(End {
                        exit_code,
                        signal,
                        backend,
                        notes,
                        coverage,
                        preexisting,
                        freed_by_exec,
                    });
                }
                T_META | T_END => return Err("a record that must occur once occurs twice"),
                _ => return Err("unknown record type"),
            }
            if self.end.is_some() && !d.is_empty() {
                return Err("a record follows the end record");
            }
        }
        Ok(())
    }

    fn add(&mut self, leak: Leak, live: bool, kept: Option<String>) {
        self.added.insert(self.next, Added { leak, live, kept });
        self.next += 1;
    }
}
