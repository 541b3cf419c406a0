//! Turns raw records into named, decoded arguments: flags as
//! `O_RDONLY|O_CLOEXEC`, sockaddrs as `ip:port`, errno names.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::record::{Hdr, PH_ENTRY, PH_RETURN, SLOT_MAX, SYSCALLS};

/// Whether an event is a syscall's entry or its return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The thread entered the syscall (only with `Filter::entry`).
    Entry,
    /// The syscall returned.
    Return,
}

impl Phase {
    /// `"entry"` or `"return"`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Entry => "entry",
            Phase::Return => "return",
        }
    }
}

/// One decoded argument value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg<'a> {
    /// A plain integer (fd, backlog, ...).
    Int(i64),
    /// Raw bytes of a string from the traced process (a path, a memfd
    /// name); `truncated` when it did not fit the kernel's 256-byte slot.
    Str {
        /// The bytes, without the NUL.
        bytes: &'a [u8],
        /// The string was longer than what was copied.
        truncated: bool,
    },
    /// A symbolic value: flags (`O_RDONLY|O_CLOEXEC`), `AT_FDCWD`, a mode
    /// (`0644`), a socket address (`127.0.0.1:80`, `/run/x.sock`).
    Sym(String),
    /// Two fds (pipe, socketpair).
    Fds([i32; 2]),
}

/// One traced syscall entry or return.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    hdr: Hdr,
    slots: [&'a [u8]; 2],
}

impl<'a> Event<'a> {
    /// Decodes a ring-buffer record (the header plus its data slots).
    pub fn parse(bytes: &'a [u8]) -> Option<Event<'a>> {
        let hdr = crate::record::read_hdr(bytes)?;
        if hdr.sc == 0
            || hdr.sc as usize >= SYSCALLS.len()
            || (hdr.phase != PH_ENTRY && hdr.phase != PH_RETURN)
        {
            return None;
        }
        let data = &bytes[crate::record::HDR_SIZE..];
        let slot = |i: usize| -> &'a [u8] {
            let start = i * SLOT_MAX;
            let len = (hdr.len[i] as usize).min(SLOT_MAX);
            if i < hdr.nslots as usize && data.len() >= start + len {
                &data[start..start + len]
            } else {
                &[]
            }
        };
        Some(Event {
            slots: [slot(0), slot(1)],
            hdr,
        })
    }

    /// CLOCK_MONOTONIC time of the entry or the return, in nanoseconds.
    pub fn ts_ns(&self) -> u64 {
        self.hdr.ts
    }

    /// Process id (thread group id).
    pub fn pid(&self) -> u32 {
        self.hdr.pid
    }

    /// Thread id.
    pub fn tid(&self) -> u32 {
        self.hdr.tid
    }

    /// The thread's name, as the kernel keeps it (at most 15 bytes).
    pub fn comm(&self) -> String {
        let end = self.hdr.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.hdr.comm[..end]).into_owned()
    }

    /// The syscall's name (`openat`, `close`, ...).
    pub fn syscall(&self) -> &'static str {
        SYSCALLS[self.hdr.sc as usize]
    }

    /// Entry or return.
    pub fn phase(&self) -> Phase {
        if self.hdr.phase == PH_ENTRY {
            Phase::Entry
        } else {
            Phase::Return
        }
    }

    /// The return value (`-1` on failure, like libc), or `None` at entry.
    pub fn ret(&self) -> Option<i64> {
        match self.phase() {
            Phase::Entry => None,
            Phase::Return if self.hdr.ret < 0 => Some(-1),
            Phase::Return => Some(self.hdr.ret),
        }
    }

    /// The errno of a failed call (`"ENOENT"`, or `"E123"` if unknown).
    pub fn errno(&self) -> Option<String> {
        (self.phase() == Phase::Return && self.hdr.ret < 0).then(|| errno_name(-self.hdr.ret))
    }

    /// Time spent in the syscall, in nanoseconds (returns only).
    pub fn latency_ns(&self) -> Option<u64> {
        (self.phase() == Phase::Return).then_some(self.hdr.lat_ns)
    }

    fn succeeded(&self) -> bool {
        self.phase() == Phase::Return && self.hdr.ret >= 0
    }

    fn int(&self, i: usize) -> Arg<'a> {
        Arg::Int(self.hdr.args[i] as i32 as i64)
    }

    fn str(&self, slot: usize) -> Arg<'a> {
        let b = self.slots[slot];
        let truncated = b.len() >= SLOT_MAX;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Arg::Str {
            bytes: &b[..end],
            truncated,
        }
    }

    fn dirfd(&self, i: usize) -> Arg<'a> {
        match self.hdr.args[i] as i32 {
            libc::AT_FDCWD => Arg::Sym("AT_FDCWD".into()),
            fd => Arg::Int(fd as i64),
        }
    }

    fn sym(&self, s: String) -> Arg<'a> {
        Arg::Sym(s)
    }

    /// The decoded arguments, named as in the man pages. Output-only
    /// arguments (accept's peer, pipe's fds) appear at return, on success.
    pub fn args(&self) -> Vec<(&'static str, Arg<'a>)> {
        let a = &self.hdr.args;
        let ok = self.succeeded();
        let mut v = Vec::with_capacity(4);
        match self.syscall() {
            "open" => {
                v.push(("path", self.str(0)));
                v.push(("flags", self.sym(open_flags(a[1]))));
                if needs_mode(a[1]) {
                    v.push(("mode", self.sym(mode(a[2]))));
                }
            }
            "creat" => {
                v.push(("path", self.str(0)));
                v.push(("mode", self.sym(mode(a[1]))));
            }
            "openat" => {
                v.push(("dirfd", self.dirfd(0)));
                v.push(("path", self.str(0)));
                v.push(("flags", self.sym(open_flags(a[2]))));
                if needs_mode(a[2]) {
                    v.push(("mode", self.sym(mode(a[3]))));
                }
            }
            "openat2" => {
                let aux = &self.hdr.aux;
                v.push(("dirfd", self.dirfd(0)));
                v.push(("path", self.str(0)));
                v.push(("flags", self.sym(open_flags(aux[0]))));
                if needs_mode(aux[0]) {
                    v.push(("mode", self.sym(mode(aux[1]))));
                }
                if aux[2] != 0 {
                    v.push(("resolve", self.sym(format!("{:#x}", aux[2]))));
                }
            }
            "close" | "dup" => v.push(("fd", self.int(0))),
            "close_range" => {
                v.push(("first", Arg::Int(a[0] as u32 as i64)));
                let last = a[1] as u32;
                v.push((
                    "last",
                    if last == u32::MAX {
                        Arg::Sym("~0U".into())
                    } else {
                        Arg::Int(last as i64)
                    },
                ));
                v.push((
                    "flags",
                    self.sym(bits(
                        a[2],
                        &[(2, "CLOSE_RANGE_UNSHARE"), (4, "CLOSE_RANGE_CLOEXEC")],
                    )),
                ));
            }
            "unlink" => v.push(("path", self.str(0))),
            "unlinkat" => {
                v.push(("dirfd", self.dirfd(0)));
                v.push(("path", self.str(0)));
                v.push(("flags", self.sym(bits(a[2], &[(0x200, "AT_REMOVEDIR")]))));
            }
            "rename" => {
                v.push(("oldpath", self.str(0)));
                v.push(("newpath", self.str(1)));
            }
            "renameat" | "renameat2" => {
                v.push(("olddirfd", self.dirfd(0)));
                v.push(("oldpath", self.str(0)));
                v.push(("newdirfd", self.dirfd(2)));
                v.push(("newpath", self.str(1)));
                if self.syscall() == "renameat2" {
                    v.push((
                        "flags",
                        self.sym(bits(
                            a[4],
                            &[
                                (1, "RENAME_NOREPLACE"),
                                (2, "RENAME_EXCHANGE"),
                                (4, "RENAME_WHITEOUT"),
                            ],
                        )),
                    ));
                }
            }
            "socket" => {
                v.push(("domain", self.sym(family(a[0] as u16))));
                v.push(("type", self.sym(sock_type(a[1]))));
                v.push(("protocol", self.int(2)));
            }
            "socketpair" => {
                v.push(("domain", self.sym(family(a[0] as u16))));
                v.push(("type", self.sym(sock_type(a[1]))));
                v.push(("protocol", self.int(2)));
                if ok {
                    v.push(("sv", self.fds()));
                }
            }
            "connect" | "bind" => {
                v.push(("fd", self.int(0)));
                v.push(("addr", self.sym(sockaddr(self.slots[0], a[1]))));
            }
            "accept" | "accept4" => {
                v.push(("fd", self.int(0)));
                if ok && !self.slots[0].is_empty() {
                    v.push(("peer", self.sym(sockaddr(self.slots[0], a[1]))));
                }
                if self.syscall() == "accept4" {
                    v.push(("flags", self.sym(sock_flags(a[3]))));
                }
            }
            "listen" => {
                v.push(("fd", self.int(0)));
                v.push(("backlog", self.int(1)));
            }
            "shutdown" => {
                v.push(("fd", self.int(0)));
                let how = match a[1] {
                    0 => "SHUT_RD".to_string(),
                    1 => "SHUT_WR".to_string(),
                    2 => "SHUT_RDWR".to_string(),
                    n => n.to_string(),
                };
                v.push(("how", Arg::Sym(how)));
            }
            "pipe" | "pipe2" => {
                if ok {
                    v.push(("fds", self.fds()));
                }
                if self.syscall() == "pipe2" {
                    v.push(("flags", self.sym(pipe_flags(a[1]))));
                }
            }
            "dup2" | "dup3" => {
                v.push(("oldfd", self.int(0)));
                v.push(("newfd", self.int(1)));
                if self.syscall() == "dup3" {
                    v.push(("flags", self.sym(pipe_flags(a[2]))));
                }
            }
            "eventfd2" => {
                v.push(("initval", Arg::Int(a[0] as u32 as i64)));
                v.push((
                    "flags",
                    self.sym(bits(
                        a[1],
                        &[
                            (1, "EFD_SEMAPHORE"),
                            (0o4000, "EFD_NONBLOCK"),
                            (0o2000000, "EFD_CLOEXEC"),
                        ],
                    )),
                ));
            }
            "epoll_create1" => {
                v.push((
                    "flags",
                    self.sym(bits(a[0], &[(0o2000000, "EPOLL_CLOEXEC")])),
                ));
            }
            "memfd_create" => {
                v.push(("name", self.str(0)));
                v.push((
                    "flags",
                    self.sym(bits(
                        a[1],
                        &[
                            (1, "MFD_CLOEXEC"),
                            (2, "MFD_ALLOW_SEALING"),
                            (4, "MFD_HUGETLB"),
                            (8, "MFD_NOEXEC_SEAL"),
                            (0x10, "MFD_EXEC"),
                        ],
                    )),
                ));
            }
            "fcntl" => {
                v.push(("fd", self.int(0)));
                let cmd = a[1] as u32;
                v.push(("cmd", self.sym(fcntl_cmd(cmd))));
                match cmd {
                    0 | 1030 => v.push(("arg", self.int(2))), // F_DUPFD*: lowest fd
                    2 => v.push(("arg", self.sym(bits(a[2], &[(1, "FD_CLOEXEC")])))),
                    4 => v.push(("arg", self.sym(open_flags(a[2])))),
                    1 | 3 | 9 | 11 | 1025 | 1032 | 1034 => {} // getters: no argument
                    _ => v.push(("arg", self.sym(format!("{:#x}", a[2])))),
                }
            }
            _ => {}
        }
        v
    }

    fn fds(&self) -> Arg<'a> {
        Arg::Fds([self.hdr.aux[0] as i32, self.hdr.aux[1] as i32])
    }
}

fn needs_mode(flags: u64) -> bool {
    flags & libc::O_CREAT as u64 != 0 || flags & 0o20000000 != 0 // O_TMPFILE
}

fn mode(m: u64) -> String {
    format!("0{:o}", m & 0o7777)
}

/// `set|of|names`, the unknown rest in hex; `0` when nothing is set.
fn bits(value: u64, names: &[(u64, &str)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    for &(bit, name) in names {
        if bit != 0 && rest & bit == bit {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !out.is_empty() {
            out.push('|');
        }
        out.push_str(&format!("{rest:#x}"));
    }
    if out.is_empty() {
        out.push('0');
    }
    out
}

/// open(2) flags as the kernel sees them (x86-64 and arm64 generic values;
/// O_LARGEFILE is the kernel's, which glibc leaves at 0 on 64-bit).
pub fn open_flags(flags: u64) -> String {
    let acc = match flags & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    };
    let rest = bits(
        flags & !3,
        &[
            (0o20200000, "O_TMPFILE"), // includes O_DIRECTORY
            (0o4010000, "O_SYNC"),     // includes O_DSYNC
            (0o100, "O_CREAT"),
            (0o200, "O_EXCL"),
            (0o400, "O_NOCTTY"),
            (0o1000, "O_TRUNC"),
            (0o2000, "O_APPEND"),
            (0o4000, "O_NONBLOCK"),
            (0o10000, "O_DSYNC"),
            (0o20000, "O_ASYNC"),
            (0o40000, "O_DIRECT"),
            (0o100000, "O_LARGEFILE"),
            (0o200000, "O_DIRECTORY"),
            (0o400000, "O_NOFOLLOW"),
            (0o1000000, "O_NOATIME"),
            (0o2000000, "O_CLOEXEC"),
            (0o10000000, "O_PATH"),
        ],
    );
    if rest == "0" {
        acc.to_string()
    } else {
        format!("{acc}|{rest}")
    }
}

fn pipe_flags(f: u64) -> String {
    bits(
        f,
        &[
            (0o2000000, "O_CLOEXEC"),
            (0o4000, "O_NONBLOCK"),
            (0o40000, "O_DIRECT"),
        ],
    )
}

fn sock_flags(f: u64) -> String {
    bits(f, &[(0o4000, "SOCK_NONBLOCK"), (0o2000000, "SOCK_CLOEXEC")])
}

fn sock_type(t: u64) -> String {
    let base = match t & 0xf {
        1 => "SOCK_STREAM".to_string(),
        2 => "SOCK_DGRAM".to_string(),
        3 => "SOCK_RAW".to_string(),
        4 => "SOCK_RDM".to_string(),
        5 => "SOCK_SEQPACKET".to_string(),
        6 => "SOCK_DCCP".to_string(),
        10 => "SOCK_PACKET".to_string(),
        n => n.to_string(),
    };
    match sock_flags(t & !0xf).as_str() {
        "0" => base,
        f => format!("{base}|{f}"),
    }
}

fn family(f: u16) -> String {
    match f {
        0 => "AF_UNSPEC".into(),
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        31 => "AF_BLUETOOTH".into(),
        38 => "AF_ALG".into(),
        40 => "AF_VSOCK".into(),
        n => format!("AF_{n}"),
    }
}

/// A sockaddr as `ip:port`, `[ip6]:port`, a unix path (`@name` when
/// abstract), or the family's name.
fn sockaddr(b: &[u8], ptr: u64) -> String {
    if b.len() < 2 {
        return if ptr == 0 { "NULL".into() } else { "?".into() };
    }
    let fam = u16::from_ne_bytes([b[0], b[1]]);
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match fam {
        2 if b.len() >= 8 => format!("{}:{}", Ipv4Addr::new(b[4], b[5], b[6], b[7]), port(b)),
        10 if b.len() >= 24 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            format!("[{}]:{}", Ipv6Addr::from(a), port(b))
        }
        1 => {
            let path = &b[2..];
            if path.is_empty() {
                "(unnamed)".into()
            } else if path[0] == 0 {
                let name = &path[1..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                format!("@{}", String::from_utf8_lossy(&name[..end]))
            } else {
                let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                String::from_utf8_lossy(&path[..end]).into_owned()
            }
        }
        f => family(f),
    }
}

fn fcntl_cmd(cmd: u32) -> String {
    let name = match cmd {
        0 => "F_DUPFD",
        1 => "F_GETFD",
        2 => "F_SETFD",
        3 => "F_GETFL",
        4 => "F_SETFL",
        5 => "F_GETLK",
        6 => "F_SETLK",
        7 => "F_SETLKW",
        8 => "F_SETOWN",
        9 => "F_GETOWN",
        10 => "F_SETSIG",
        11 => "F_GETSIG",
        36 => "F_OFD_GETLK",
        37 => "F_OFD_SETLK",
        38 => "F_OFD_SETLKW",
        1024 => "F_SETLEASE",
        1025 => "F_GETLEASE",
        1026 => "F_NOTIFY",
        1030 => "F_DUPFD_CLOEXEC",
        1031 => "F_SETPIPE_SZ",
        1032 => "F_GETPIPE_SZ",
        1033 => "F_ADD_SEALS",
        1034 => "F_GET_SEALS",
        n => return n.to_string(),
    };
    name.to_string()
}

/// The symbolic name of an errno value (`2` -> `"ENOENT"`), or `E<n>`.
pub fn errno_name(e: i64) -> String {
    macro_rules! names {
        ($($n:ident)*) => {
            match e as i32 {
                $(libc::$n => return stringify!($n).to_string(),)*
                _ => {}
            }
        };
    }
    names!(EPERM ENOENT ESRCH EINTR EIO ENXIO E2BIG ENOEXEC EBADF ECHILD EAGAIN
        ENOMEM EACCES EFAULT ENOTBLK EBUSY EEXIST EXDEV ENODEV ENOTDIR EISDIR
        EINVAL ENFILE EMFILE ENOTTY ETXTBSY EFBIG ENOSPC ESPIPE EROFS EMLINK
        EPIPE EDOM ERANGE EDEADLK ENAMETOOLONG ENOLCK ENOSYS ENOTEMPTY ELOOP
        ENOMSG EIDRM ENOSTR ENODATA ETIME ENOSR EREMOTE ENOLINK EPROTO
        EBADMSG EOVERFLOW EILSEQ EUSERS ENOTSOCK EDESTADDRREQ EMSGSIZE
        EPROTOTYPE ENOPROTOOPT EPROTONOSUPPORT ESOCKTNOSUPPORT EOPNOTSUPP
        EPFNOSUPPORT EAFNOSUPPORT EADDRINUSE EADDRNOTAVAIL ENETDOWN
        ENETUNREACH ENETRESET ECONNABORTED ECONNRESET ENOBUFS EISCONN
        ENOTCONN ESHUTDOWN ETOOMANYREFS ETIMEDOUT ECONNREFUSED EHOSTDOWN
        EHOSTUNREACH EALREADY EINPROGRESS ESTALE EDQUOT ECANCELED EOWNERDEAD
        ENOTRECOVERABLE ENOMEDIUM EMEDIUMTYPE ENOKEY EKEYEXPIRED EKEYREVOKED
        EKEYREJECTED ERFKILL EHWPOISON);
    // Kernel-internal codes that can leak out of an interrupted call.
    match e {
        512 => "ERESTARTSYS".into(),
        513 => "ERESTARTNOINTR".into(),
        514 => "ERESTARTNOHAND".into(),
        516 => "ERESTART_RESTARTBLOCK".into(),
        _ => format!("E{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_named() {
        assert_eq!(open_flags(0), "O_RDONLY");
        assert_eq!(
            open_flags((libc::O_RDONLY | libc::O_CLOEXEC) as u64),
            "O_RDONLY|O_CLOEXEC"
        );
        assert_eq!(
            open_flags((libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64),
            "O_WRONLY|O_CREAT|O_TRUNC"
        );
        assert_eq!(open_flags(libc::O_TMPFILE as u64 | 2), "O_RDWR|O_TMPFILE");
        assert_eq!(open_flags(0x8000_0000 | 2), "O_RDWR|0x80000000");
        assert_eq!(
            sock_type((libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64),
            "SOCK_STREAM|SOCK_CLOEXEC"
        );
    }

    #[test]
    fn errnos_are_named() {
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(libc::EMFILE as i64), "EMFILE");
        assert_eq!(errno_name(4095), "E4095");
    }

    #[test]
    fn sockaddrs_are_readable() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&2u16.to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(sockaddr(&v4, 1), "127.0.0.1:8080");
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&10u16.to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(sockaddr(&v6, 1), "[::1]:443");
        let mut un = 1u16.to_ne_bytes().to_vec();
        un.extend_from_slice(b"/run/x.sock\0");
        assert_eq!(sockaddr(&un, 1), "/run/x.sock");
        let mut abs = 1u16.to_ne_bytes().to_vec();
        abs.extend_from_slice(b"\0bus");
        assert_eq!(sockaddr(&abs, 1), "@bus");
        assert_eq!(sockaddr(&[], 0), "NULL");
    }
}
