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

/// (syscall number, name) pairs for the kernel's `sc_of` array, for the
/// syscalls this architecture has (arm64 lacks open, creat, unlink, rename,
/// pipe, dup2).
pub fn syscall_numbers() -> Vec<(u32, &'static str)> {
    SYSCALLS
        .iter()
        .skip(1)
        .filter_map(|name| Some((leakscope_bpf::syscall_nr(name)?, *name)))
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

#[cfg(test)]
mod syscall_table_tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_snooped_syscall_has_a_number_here() {
        for name in &super::SYSCALLS[1..] {
            assert!(leakscope_bpf::syscall_nr(name).is_some(), "{name}");
        }
    }
}
