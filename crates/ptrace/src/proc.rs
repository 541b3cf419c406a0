//! What `/proc` and the tracee's memory say about a stopped tracee.

use std::collections::HashSet;
use std::io;

use leakscope_event::{AbsAddr, Fd, FileOffset, Mapping};

/// Reads `len` bytes of `pid`'s memory at `addr`; fewer when the range
/// ends in unmapped memory.
pub(crate) fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    if len == 0 || addr == 0 {
        buf.clear();
        return buf;
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `buf`; the kernel checks `remote`.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    buf.truncate(n.max(0) as usize);
    buf
}

/// A NUL-terminated string in `pid`'s memory (at most 4 KiB).
pub(crate) fn read_str(pid: i32, addr: u64) -> Option<String> {
    if addr == 0 {
        return None;
    }
    let mut out = Vec::new();
    let mut at = addr;
    // Page by page: a string may end just before unmapped memory.
    while out.len() < 4096 {
        let chunk = (4096 - (at & 0xfff)) as usize;
        let bytes = read_mem(pid, at, chunk);
        if bytes.is_empty() {
            break;
        }
        if let Some(end) = bytes.iter().position(|&b| b == 0) {
            out.extend_from_slice(&bytes[..end]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&bytes);
        at += bytes.len() as u64;
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

pub(crate) fn read_u64(pid: i32, addr: u64) -> Option<u64> {
    let b = read_mem(pid, addr, 8);
    Some(u64::from_ne_bytes(b.get(..8)?.try_into().ok()?))
}

/// The fds open in `pid` now, from `/proc/PID/fd`.
pub(crate) fn open_fds(pid: i32) -> Option<Vec<Fd>> {
    let mut fds: Vec<Fd> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok().map(Fd))
        .collect();
    fds.sort();
    Some(fds)
}

/// What `/proc/PID/fd/FD` refers to: (st_mode, inode).
pub(crate) fn fd_stat(pid: i32, fd: i32) -> Option<(u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
    Some((m.mode(), m.ino()))
}

/// The path an fd refers to, as the kernel names it.
pub(crate) fn fd_path(pid: i32, fd: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

pub(crate) fn exe(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One line of `/proc/PID/maps`.
pub(crate) struct MapLine {
    pub start: u64,
    pub end: u64,
    pub exec: bool,
    pub offset: u64,
    pub path: String,
}

pub(crate) fn maps(pid: i32) -> io::Result<Vec<MapLine>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut it = line.splitn(6, ' ');
            let (range, perms, offset) = (it.next()?, it.next()?, it.next()?);
            let (_dev, _ino) = (it.next()?, it.next()?);
            let path = it.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            Some(MapLine {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect())
}

/// Executable file mappings of `pid`, as module-map entries.
pub(crate) fn exec_mappings(pid: i32) -> Vec<Mapping> {
    let mut seen = HashSet::new();
    maps(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.exec && m.path.starts_with('/'))
        .filter(|m| seen.insert(m.start))
        .map(|m| Mapping {
            start: AbsAddr(m.start),
            end: AbsAddr(m.end),
            offset: FileOffset(m.offset),
            path: m.path.trim_end_matches(" (deleted)").to_string(),
        })
        .collect()
}

/// `startstack` of `/proc/PID/stat` (field 28): the top of the main
/// thread's stack as exec set it up (proc(5)).
pub(crate) fn start_stack(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(25)?.parse().ok()
}

/// Local and peer address of a socket of `pid`, copied into this process
/// with pidfd_getfd(2) (the tracer may: PTRACE_MODE_ATTACH).
pub(crate) fn sock_addrs(pidfd: i32, fd: i32) -> Option<(String, String)> {
    // SAFETY: plain syscalls on fds we own; the sockaddr buffers are ours.
    unsafe {
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        if copy < 0 {
            return None;
        }
        let name = |peer: bool| -> Option<String> {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let p = (&mut ss as *mut libc::sockaddr_storage).cast();
            let r = if peer {
                libc::getpeername(copy, p, &mut len)
            } else {
                libc::getsockname(copy, p, &mut len)
            };
            (r == 0).then(|| sockaddr_text(&ss))?
        };
        let out = name(false).zip(name(true));
        libc::close(copy);
        out
    }
}

fn sockaddr_text(ss: &libc::sockaddr_storage) -> Option<String> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says which struct the storage holds.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(format!(
                "{}:{}",
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port)
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(format!(
                "[{}]:{}",
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port)
            ))
        }
        _ => None,
    }
}
