//! Mirror of `struct snoop_ev` in `bpf/snoop.h`, and the syscall table.

use std::mem::size_of;

/// `SLOT_MAX` in snoop.h: one path or one sockaddr.
pub const SLOT_MAX: usize = 256;

pub const PH_ENTRY: u8 = 1;
pub const PH_RETURN: u8 = 2;

pub const CNT_RB_DROP: u32 = 0;
pub const CNT_STARTS_FULL: u32 = 1;

/// Syscall names indexed by `enum sc` in snoop.h (index 0 is unused).
pub const SYSCALLS: &[&str] = &[
    "none",
    "open",
    "openat",
    "openat2",
    "creat",
    "close",
    "close_range",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "socket",
    "connect",
    "accept",
    "accept4",
    "bind",
    "listen",
    "shutdown",
    "pipe",
    "pipe2",
    "dup",
    "dup2",
    "dup3",
    "eventfd2",
    "epoll_create1",
    "memfd_create",
    "socketpair",
    "fcntl",
];

/// The header of `struct snoop_ev`; the data slots follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Hdr {
    pub ts: u64,
    pub lat_ns: u64,
    pub ret: i64,
    pub args: [u64; 6],
    pub aux: [u64; 3],
    pub pid: u32,
    pub tid: u32,
    pub sc: u16,
    pub phase: u8,
    pub nslots: u8,
    pub len: [u16; 2],
    pub comm: [u8; 16],
}

/// Size of the header, `HDR_SIZE` in snoop.bpf.c.
pub const HDR_SIZE: usize = size_of::<Hdr>();
const _: () = assert!(HDR_SIZE == 128);

/// Reads the header from the start of a ring-buffer record.
pub fn read_hdr(bytes: &[u8]) -> Option<Hdr> {
    if bytes.len() < HDR_SIZE {
        return None;
    }
    // SAFETY: the length was checked and Hdr is plain old data.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Hdr) })
}

/// (syscall number, code) pairs for the kernel's `sc_of` array, from libc's
/// constants for the target architecture. Legacy syscalls that arm64 lacks
/// (open, creat, unlink, rename, pipe, dup2) are only there on x86-64.
pub fn syscall_numbers() -> Vec<(u32, &'static str)> {
    let mut numbers: Vec<(libc::c_long, &'static str)> = vec![
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_close, "close"),
        (libc::SYS_close_range, "close_range"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_renameat, "renameat"),
        (libc::SYS_renameat2, "renameat2"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_accept, "accept"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_shutdown, "shutdown"),
        (libc::SYS_pipe2, "pipe2"),
        (libc::SYS_dup, "dup"),
        (libc::SYS_dup3, "dup3"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_epoll_create1, "epoll_create1"),
        (libc::SYS_memfd_create, "memfd_create"),
        (libc::SYS_socketpair, "socketpair"),
        (libc::SYS_fcntl, "fcntl"),
    ];
    #[cfg(target_arch = "x86_64")]
    numbers.extend_from_slice(&[
        (libc::SYS_open, "open"),
        (libc::SYS_creat, "creat"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_rename, "rename"),
        (libc::SYS_pipe, "pipe"),
        (libc::SYS_dup2, "dup2"),
    ]);
    numbers
        .into_iter()
        .map(|(nr, name)| (nr as u32, name))
        .collect()
}

/// The code of a syscall name (its index in [`SYSCALLS`]).
pub fn code_of(name: &str) -> Option<u32> {
    SYSCALLS
        .iter()
        .skip(1)
        .position(|s| *s == name)
        .map(|i| i as u32 + 1)
}
