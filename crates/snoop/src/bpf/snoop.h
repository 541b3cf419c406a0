/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Records shared between snoop.bpf.c and the Rust side (src/record.rs).
 * Keep the two in sync: the Rust mirror is #[repr(C)]. */
#ifndef LEAKSCOPE_SNOOP_H
#define LEAKSCOPE_SNOOP_H

#define SLOT_MAX 256 /* one path string or one sockaddr */
#define SOCKADDR_MAX 128

/* Syscall codes, in the order of SYSCALLS in src/record.rs. */
enum sc {
	SC_NONE = 0,
	SC_OPEN, SC_OPENAT, SC_OPENAT2, SC_CREAT,
	SC_CLOSE, SC_CLOSE_RANGE,
	SC_UNLINK, SC_UNLINKAT, SC_RENAME, SC_RENAMEAT, SC_RENAMEAT2,
	SC_SOCKET, SC_CONNECT, SC_ACCEPT, SC_ACCEPT4, SC_BIND, SC_LISTEN,
	SC_SHUTDOWN, SC_PIPE, SC_PIPE2, SC_DUP, SC_DUP2, SC_DUP3,
	SC_EVENTFD2, SC_EPOLL_CREATE1, SC_MEMFD_CREATE, SC_SOCKETPAIR,
	SC_FCNTL,
	SC_MAX,
};

enum phase {
	PH_ENTRY = 1,
	PH_RETURN = 2,
};

struct snoop_ev {
	__u64 ts;     /* bpf_ktime_get_ns (CLOCK_MONOTONIC): entry or return */
	__u64 lat_ns; /* return: since the entry; 0 if the entry was not seen */
	__s64 ret;    /* return: the raw return value (-errno on failure) */
	__u64 args[6];
	__u64 aux[3]; /* openat2: struct open_how; pipe*, socketpair: the fds */
	__u32 pid;    /* tgid */
	__u32 tid;
	__u16 sc;
	__u8 phase;
	__u8 nslots; /* how many data slots follow (0, 1 or 2) */
	__u16 len[2]; /* bytes used in each slot; strings include the NUL */
	char comm[16];
	char data[2 * SLOT_MAX]; /* two slots, flat: the skeleton cannot derive Default for [[T; N]; 2] */
};

/* counters map indexes */
enum counter {
	CNT_RB_DROP = 0, /* ring buffer full: events dropped */
	CNT_STARTS_FULL = 1,
	CNT_MAX = 2,
};

#endif
