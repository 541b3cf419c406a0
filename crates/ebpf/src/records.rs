//! Mirrors of the C records in `bpf/events.h`, decoded from ring-buffer bytes.

pub const DETAIL_MAX: usize = 256;
pub const PATH_PARTS: usize = 16;
pub const PART_MAX: usize = 64;
pub const EXEC_FD_WORDS: usize = 16;

pub const EV_ACQUIRE: u32 = 1;
pub const EV_RELEASE: u32 = 2;
pub const EV_CLOSE_RANGE: u32 = 3;
pub const EV_CONNECT: u32 = 4;
pub const EV_FORK: u32 = 5;
pub const EV_EXEC: u32 = 6;
pub const EV_MMAP: u32 = 7;
pub const EV_EXIT: u32 = 8;
pub const EV_TCP: u32 = 9;

pub const ACQ_CLOEXEC: u32 = 1;
pub const ACQ_SECOND: u32 = 8;

pub const SETTLE_FD: i32 = -7919;
pub const SEQ_CLASS_SHIFT: u32 = 60;
/// Bytes of stack in one blob; a deeper stack's rest is in chunks.
pub const STACK_MAX: usize = 8192;
/// The most chunks of one stack (its blob is the first).
pub const CHUNKS_MAX: u32 = 32;

/// Key of a chunk of a deep stack (`struct chunk_key`) as map key bytes.
pub fn chunk_key(seq: u64, idx: u32) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&seq.to_ne_bytes());
    key[8..12].copy_from_slice(&idx.to_ne_bytes());
    key
}

pub const CNT_RB_DROP: u32 = 0;
pub const CNT_BLOB_FULL: u32 = 1;
pub const CNT_SETTLED: u32 = 2;

/// Syscall names, indexed by `enum sc` in events.h.
pub const SYSCALLS: &[&str] = &[
    "none",
    "open",
    "openat",
    "openat2",
    "creat",
    "open_by_handle_at",
    "socket",
    "socketpair",
    "accept",
    "accept4",
    "pipe",
    "pipe2",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "eventfd",
    "eventfd2",
    "epoll_create",
    "epoll_create1",
    "timerfd_create",
    "signalfd",
    "signalfd4",
    "inotify_init",
    "inotify_init1",
    "memfd_create",
    "memfd_secret",
    "pidfd_open",
    "pidfd_getfd",
    "fanotify_init",
    "userfaultfd",
    "perf_event_open",
    "bpf",
    "close",
    "close_range",
    "connect",
    "mmap",
    "recvmsg",
    "recvmmsg",
];

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Hdr {
    pub ty: u32,
    pub pid: u32,
    pub tid: u32,
    pub _claim: u32,
    pub time: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockAddrs {
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Acquire {
    pub h: Hdr,
    pub fd: i32,
    pub fd2: i32,
    pub sc: u32,
    pub flags: u32,
    pub seq: u64,
    pub dup_of: i32,
    pub mode: u32,
    pub args: [u64; 3],
    pub ino: u64,
    pub addrs: SockAddrs,
    pub detail: [u8; DETAIL_MAX],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Release {
    pub h: Hdr,
    pub fd: i32,
    pub sc: u32,
    pub first: u32,
    pub last: u32,
    pub flags: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Connect {
    pub h: Hdr,
    pub fd: i32,
    pub _pad: u32,
    pub addrs: SockAddrs,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tcp {
    pub h: Hdr,
    pub ino: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub addrs: SockAddrs,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Fork {
    pub h: Hdr,
    pub child: u32,
    pub shares_files: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PathParts {
    pub n: u32,
    pub _pad: u32,
    pub part: [[u8; PART_MAX]; PATH_PARTS],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Exec {
    pub h: Hdr,
    pub start_code: u64,
    pub at_base: u64,
    pub max_fds: u32,
    pub words: u32,
    pub open_fds: [u64; EXEC_FD_WORDS],
    pub path: PathParts,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mmap {
    pub h: Hdr,
    pub addr: u64,
    pub len: u64,
    pub off: u64,
    pub path: PathParts,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Exit {
    pub h: Hdr,
    pub code: i32,
    pub _pad: u32,
}

/// Header of `struct blob`; the copied stack follows it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlobHdr {
    pub refs: u32,
    pub len: u32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

pub use leakscope_bpf::{cstr, read, Pod};

unsafe impl Pod for Hdr {}
unsafe impl Pod for Acquire {}
unsafe impl Pod for Release {}
unsafe impl Pod for Connect {}
unsafe impl Pod for Fork {}
unsafe impl Pod for Tcp {}
unsafe impl Pod for Exec {}
unsafe impl Pod for Mmap {}
unsafe impl Pod for Exit {}
unsafe impl Pod for BlobHdr {}

impl PathParts {
    /// Joins the components (stored leaf first) into an absolute path.
    pub fn join(&self) -> String {
        let n = (self.n as usize).min(PATH_PARTS);
        let mut out = String::new();
        for part in self.part[..n].iter().rev() {
            out.push('/');
            out.push_str(&cstr(part));
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// (syscall number, index into [`SYSCALLS`]) for the syscalls traced on
/// this architecture; the loader writes them into the `sc_of` map.
pub fn syscall_numbers() -> Vec<(u32, u32)> {
    SYSCALLS
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(code, name)| Some((leakscope_bpf::syscall_nr(name)?, code as u32)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_traced_syscall_has_a_number_here() {
        for name in &super::SYSCALLS[1..] {
            assert!(leakscope_bpf::syscall_nr(name).is_some(), "{name}");
        }
    }
}
