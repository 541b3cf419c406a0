//! Mirrors of the C records in `bpf/uheap.h`, decoded from ring-buffer and
//! map bytes.

pub const EV_ALLOC: u32 = 1;
pub const EV_FREE: u32 = 2;
pub const EV_FORK: u32 = 3;
pub const EV_EXEC: u32 = 4;
pub const EV_EXIT: u32 = 5;
pub const EV_MMAP: u32 = 6;

pub const CNT_RB_DROP: u32 = 0;
pub const CNT_BLOB_FULL: u32 = 1;
pub const CNT_SAMPLED_OUT: u32 = 2;
pub const CNT_LIVE_FULL: u32 = 3;

/// Allocator entry points, indexed by `enum fn_kind` (the uprobe cookie).
/// Only `malloc` and `free` are required of an allocator.
pub const FUNCTIONS: [&str; 10] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "free",
];
pub const FN_FREE: usize = 9;

pub use leakscope_bpf::{read, Pod};

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Hdr {
    pub ty: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub time: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Alloc {
    pub h: Hdr,
    pub addr: u64,
    pub size: u64,
    pub seq: u64,
    pub func: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Free {
    pub h: Hdr,
    pub addr: u64,
    pub seq: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Fork {
    pub h: Hdr,
    pub child: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Mmap {
    pub h: Hdr,
    pub addr: u64,
}

/// `struct blob` without its data array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlobHdr {
    pub seq: u64,
    pub size: u64,
    pub time: u64,
    pub tid: u32,
    pub len: u32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

// SAFETY: all are #[repr(C)] structs of integers.
unsafe impl Pod for Hdr {}
unsafe impl Pod for Alloc {}
unsafe impl Pod for Free {}
unsafe impl Pod for Fork {}
unsafe impl Pod for Mmap {}
unsafe impl Pod for BlobHdr {}

/// The key of the `blobs` and `nostack` maps: `struct blob_key`.
pub fn blob_key(pid: u32, addr: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&pid.to_ne_bytes());
    k[8..].copy_from_slice(&addr.to_ne_bytes());
    k
}
