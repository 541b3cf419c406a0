/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Records shared between uheap.bpf.c and the Rust loader (src/records.rs).
 * Keep the two in sync: every struct is #[repr(C)] on the Rust side. */
#ifndef LEAKSCOPE_UHEAP_H
#define LEAKSCOPE_UHEAP_H

#define STACK_MAX 8192

enum ev_type {
	EV_ALLOC = 1,
	EV_FREE = 2,
	EV_FORK = 3,
	EV_EXEC = 4,
	EV_EXIT = 5,
	EV_MMAP = 6,
};

/* Allocator entry points; the cookie of each uprobe. */
enum fn_kind {
	FN_MALLOC = 0,
	FN_CALLOC = 1,
	FN_REALLOC = 2,
	FN_REALLOCARRAY = 3,
	FN_POSIX_MEMALIGN = 4,
	FN_ALIGNED_ALLOC = 5,
	FN_MEMALIGN = 6,
	FN_VALLOC = 7,
	FN_PVALLOC = 8,
	FN_FREE = 9,
	FN_MAX = 10,
};

/* ev_alloc.flags */
#define ALLOC_NO_STACK 1 /* the user stack could not be read */
#define ALLOC_NO_BLOB 2  /* the stack map was full */

struct ev_hdr {
	__u32 type;
	__u32 pid; /* tgid */
	__u32 tid;
	__u32 _pad;
	__u64 time; /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
};

struct ev_alloc {
	struct ev_hdr h;
	__u64 addr;
	__u64 size;
	__u64 seq; /* the stack id: blob of (tgid, addr) carries the same seq */
	__u32 fn;
	__u32 flags;
};

struct ev_free {
	struct ev_hdr h;
	__u64 addr;
	__u64 seq;
};

struct ev_fork {
	struct ev_hdr h; /* pid = parent */
	__u32 child;
	__u32 _pad;
};

struct ev_mmap {
	struct ev_hdr h;
	__u64 addr; /* userspace finds the mapping in /proc/PID/maps */
};

/* EV_EXEC and EV_EXIT are a bare header. */

struct blob_key {
	__u32 tgid;
	__u32 _pad;
	__u64 addr;
};

struct blob {
	__u64 seq;
	__u64 size;
	__u64 time;
	__u32 tid;
	__u32 len; /* bytes of data[] that hold the stack */
	__u64 ip;
	__u64 sp;
	__u64 bp;
	__u8 data[STACK_MAX];
};

/* counters map indexes */
enum counter {
	CNT_RB_DROP = 0,     /* ring buffer full: events lost */
	CNT_BLOB_FULL = 1,   /* stack map full: block kept without a stack */
	CNT_SAMPLED_OUT = 2, /* allocations skipped by sampling */
	CNT_LIVE_FULL = 3,   /* both maps full: allocation not tracked */
	CNT_MAX = 4,
};

#endif
