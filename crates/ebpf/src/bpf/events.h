/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Records shared between leakscope.bpf.c and the Rust loader (src/records.rs).
 * Keep the two in sync: every struct is #[repr(C)] on the Rust side. */
#ifndef LEAKSCOPE_EVENTS_H
#define LEAKSCOPE_EVENTS_H

#define STACK_MAX 8192 /* bytes of stack in one blob */
/* Deeper stacks keep their first STACK_MAX bytes in a blob and the rest,
 * up to STACK_DEEP_MAX in all, in STACK_MAX-byte chunks (`chunks`). */
#define STACK_DEEP_MAX (256 * 1024)
#define CHUNKS_MAX (STACK_DEEP_MAX / STACK_MAX)
#define DETAIL_MAX 256
#define PATH_PARTS 16
#define PART_MAX 64
#define EXEC_FD_WORDS 16 /* 1024 fds reported exactly after exec */

enum ev_type {
	EV_ACQUIRE = 1,
	EV_RELEASE = 2,
	EV_CLOSE_RANGE = 3,
	EV_CONNECT = 4,
	EV_FORK = 5,
	EV_EXEC = 6,
	EV_MMAP = 7,
	EV_EXIT = 8,
	EV_TCP = 9,
};

/* Syscall codes; the loader maps them to names. */
enum sc {
	SC_NONE = 0,
	SC_OPEN, SC_OPENAT, SC_OPENAT2, SC_CREAT, SC_OPEN_BY_HANDLE_AT,
	SC_SOCKET, SC_SOCKETPAIR, SC_ACCEPT, SC_ACCEPT4,
	SC_PIPE, SC_PIPE2, SC_DUP, SC_DUP2, SC_DUP3, SC_FCNTL,
	SC_EVENTFD, SC_EVENTFD2, SC_EPOLL_CREATE, SC_EPOLL_CREATE1,
	SC_TIMERFD_CREATE, SC_SIGNALFD, SC_SIGNALFD4,
	SC_INOTIFY_INIT, SC_INOTIFY_INIT1, SC_MEMFD_CREATE, SC_MEMFD_SECRET,
	SC_PIDFD_OPEN, SC_PIDFD_GETFD, SC_FANOTIFY_INIT, SC_USERFAULTFD,
	SC_PERF_EVENT_OPEN, SC_BPF,
	SC_CLOSE, SC_CLOSE_RANGE, SC_CONNECT, SC_MMAP, SC_RECVMSG, SC_RECVMMSG,
	SC_MAX,
};

/* ev_acquire.flags */
#define ACQ_CLOEXEC 1
#define ACQ_NO_STACK 2 /* the user stack could not be read */
#define ACQ_NO_BLOB 4  /* the stack map was full */
#define ACQ_SECOND 8   /* the second fd of pipe/socketpair (pipe: write end) */

/* close(SETTLE_FD) by leakscope itself asks the kernel side to send every
 * acquisition it still holds back (see `deferred` in leakscope.bpf.c). */
#define SETTLE_FD (-7919)

/* A stack blob's key is a sequence number with its size class in the top
 * bits: blobs of 1 KiB, 4 KiB and 8 KiB live in three maps. */
#define SEQ_CLASS_SHIFT 60 /* below the bit leakscope uses to tell heap stacks apart */
#define STACK_S 1024
#define STACK_M 4096

struct ev_hdr {
	__u32 type;
	__u32 pid; /* tgid */
	__u32 tid;
	__u32 claim; /* kernel side only: who sends or settles a held-back record */
	__u64 time; /* bpf_ktime_get_ns */
};

struct sock_addrs {
	__u16 family;
	__u16 lport; /* host order */
	__u16 rport; /* host order */
	__u16 _pad;
	__u8 laddr[16];
	__u8 raddr[16];
};

struct ev_acquire {
	struct ev_hdr h;
	__s32 fd;
	__s32 fd2; /* second fd of pipe/socketpair, or -1 */
	__u32 sc;
	__u32 flags;
	__u64 seq; /* key of the stack blob, 0 if none */
	__s32 dup_of; /* source fd of dup*, fcntl(F_DUPFD*), else -1 */
	__u32 mode;   /* i_mode of the new fd's inode, 0 if unknown */
	__u64 args[3]; /* socket: family,type,protocol */
	__u64 ino;     /* inode of the new fd's file (sockets: ties TCP states) */
	struct sock_addrs addrs; /* accept: the connection */
	char detail[DETAIL_MAX]; /* open path, memfd name */
};

struct ev_release {
	struct ev_hdr h;
	__s32 fd;
	__u32 sc;
	__u32 first; /* close_range */
	__u32 last;
	__u32 flags;
	__u32 _pad;
};

struct ev_connect {
	struct ev_hdr h;
	__s32 fd;
	__u32 _pad;
	struct sock_addrs addrs;
};

struct ev_tcp {
	struct ev_hdr h; /* pid is whoever ran: often 0 (softirq) */
	__u64 ino;
	__s32 oldstate;
	__s32 newstate;
	struct sock_addrs addrs;
};

struct ev_fork {
	struct ev_hdr h; /* pid = parent */
	__u32 child;
	__u32 shares_files;
};

struct path_parts {
	__u32 n; /* components, leaf first */
	__u32 _pad;
	char part[PATH_PARTS][PART_MAX];
};

struct ev_exec {
	struct ev_hdr h;
	__u64 start_code;
	__u64 at_base;
	__u32 max_fds;
	__u32 words;
	__u64 open_fds[EXEC_FD_WORDS];
	struct path_parts path;
};

struct ev_mmap {
	struct ev_hdr h;
	__u64 addr;
	__u64 len;
	__u64 off;
	struct path_parts path;
};

struct ev_exit {
	struct ev_hdr h;
	__s32 code;
	__u32 _pad;
};

#define BLOB_HDR \
	__u32 refs; \
	__u32 len; \
	__u64 ip; \
	__u64 sp; \
	__u64 bp;

/* Key of the chunks of a deep stack: its blob's key and the chunk's index
 * (1 is the STACK_MAX bytes after the blob's own). The value is a struct
 * blob whose len says how many bytes of data it holds. */
struct chunk_key {
	__u64 seq;
	__u32 idx;
	__u32 _pad;
};

struct blob {
	BLOB_HDR
	__u8 data[STACK_MAX];
};
struct blob_s {
	BLOB_HDR
	__u8 data[STACK_S];
};
struct blob_m {
	BLOB_HDR
	__u8 data[STACK_M];
};

/* counters map indexes */
enum counter {
	CNT_RB_DROP = 0,   /* ring buffer full: events lost */
	CNT_BLOB_FULL = 1, /* stack map full: stacks lost */
	CNT_SETTLED = 2,   /* fds opened and closed again without an event */
	CNT_MAX = 4,
};

#endif
