// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* leakscope fd tracing: syscall tracepoints for every fd-creating and
 * fd-releasing syscall of the traced process tree, sched tracepoints for
 * fork/exec/exit, and the user stack of every acquisition kept in a map
 * until the fd is released (only leaked fds' stacks are ever unwound).
 * No kprobes and no fentry: this kernel has neither. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define O_DIRECTORY 00200000
#define O_CLOEXEC 02000000
#define F_DUPFD 0
#define F_DUPFD_CLOEXEC 1030
#define PROT_EXEC 4
#define EINTR 4
#define EBADF 9
#define EINPROGRESS 115
#define CLOSE_RANGE_CLOEXEC 4
#define AF_INET 2
#define AF_INET6 10
#define AT_BASE 7

/* Set by the loader: the pid of leakscope itself. Children it forks while
 * `spawning` is set are traced from their first instruction. */
const volatile __u32 spawner_pid = 0;
volatile __u32 spawning = 0;
/* Set by the loader: keep socket inodes for TCP state tracking. */
const volatile __u32 track_tcp = 0;

/* Traced processes (by tgid). */
struct proc {
	__u64 fork_time; /* its last fork: a child may hold copies of older fds */
	__s32 deferred;  /* entries of `deferred` it may have (never fewer) */
	__u8 nodefer;    /* shares its fd table with another process */
	__u8 inherited;  /* forked by a traced process: holds inherited fds */
	__u16 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct proc);
} traced SEC(".maps");

/* Inodes of sockets that traced processes acquired, so TCP state changes
 * (which run in softirq, where the current pid means nothing) can be tied
 * back to their fd and acquiring stack. LRU: closed sockets age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 32 * 1024 * 1024);
} events SEC(".maps");

struct pending {
	__u32 sc;
	__u32 _pad;
	__u64 args[6];
	char path[DETAIL_MAX];
};

struct fdkey {
	__u32 tgid;
	__s32 fd;
};

/* fds the ledger knows: their stack blob and acquisition time. */
struct known {
	__u64 seq; /* key of the stack blob, 0 if none */
	__u64 time;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct fdkey);
	__type(value, struct known);
} fdseq SEC(".maps");

/* Stacks of fds the ledger knows, by size class (the stack from sp up to
 * the top of the thread's stack mostly fits in 1 KiB), allocated on use and
 * freed on close. At most 65536 per class at once; beyond, stacks are
 * counted missing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct blob_s);
} blobs_s SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct blob_m);
} blobs_m SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct blob);
} blobs SEC(".maps");

/* The rest of stacks deeper than STACK_MAX (see struct chunk_key): at most
 * 8192 chunks (64 MiB) at once; beyond, such stacks are cut at the last
 * chunk stored, and the report says where. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct chunk_key);
	__type(value, struct blob);
} chunks SEC(".maps");

/* An acquisition held back, with its stack when that fits in 4 KiB (a
 * glibc thread's stack top is ~1.7 KiB of static TLS below its fs base,
 * so 1 KiB would leave out every thread). */
#define ACQ_INLINE 0x80000000u /* kernel side only: `stack` holds it */
struct held {
	struct ev_acquire rec;
	struct blob_m stack;
};

/* Acquisitions held back: an fd that is closed again before anything else
 * refers to it never becomes an event, nor a map entry other than this one
 * (most fds of a busy program). One is sent when something needs it in the
 * stream: a fork, exec, exit or close_range of its process, a dup or
 * connect of it, or leakscope asking (close(SETTLE_FD)). Whoever sends or
 * settles an entry first claims it (ev_hdr.claim), and a sender reserves its
 * ring record before claiming, so a release that lost the race always
 * follows the acquisition it releases. Full: acquisitions are sent at once. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct fdkey);
	__type(value, struct held);
} deferred SEC(".maps");

#include "common.bpf.h"

/* Stacks are copied into these, some page by page: each has a page to
 * spare after the stack (copy_pages()). */
struct held_buf {
	struct held h;
	__u8 spare[COPY_PAGE];
};
struct blob_buf {
	struct blob b;
	__u8 spare[COPY_PAGE];
};
PERCPU_SCRATCH(held_scratch, struct held_buf);
PERCPU_SCRATCH(blob_scratch, struct blob_buf);
PERCPU_SCRATCH(chunk_scratch, struct blob_buf);
PERCPU_SCRATCH(pending_scratch, struct pending);
/* Per-CPU halves of the blob keys: no shared counter to bounce between CPUs. */
PERCPU_SCRATCH(seq_percpu, __u64);

static __always_inline struct proc *is_traced(__u32 tgid)
{
	return bpf_map_lookup_elem(&traced, &tgid);
}

static __always_inline void fill_hdr(struct ev_hdr *h, __u32 type)
{
	__u64 id = bpf_get_current_pid_tgid();
	h->type = type;
	h->pid = id >> 32;
	h->tid = (__u32)id;
	h->claim = 0;
	h->time = bpf_ktime_get_ns();
}

static __always_inline struct file *fd_file(struct task_struct *task, int fd)
{
	/* task is a trusted BTF pointer: plain loads, no helper calls. */
	struct fdtable *fdt = task->files->fdt;
	struct file **fds = fdt->fd;
	unsigned int max = fdt->max_fds;
	struct file *f = NULL;
	if (fd < 0 || (unsigned int)fd >= max)
		return NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	/* Untyped: its fields are read with BPF_CORE_READ. (bpf_core_cast
	 * would make them plain loads, but its kfunc is 6.2's.) */
	return f;
}

static __always_inline void read_sock(struct file *f, struct sock_addrs *a)
{
	struct socket *sock = BPF_CORE_READ(f, private_data);
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return;
	a->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	a->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	a->rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (a->family == AF_INET) {
		/* BPF_CORE_READ_INTO copies sizeof(*dst): give it a __u32. */
		BPF_CORE_READ_INTO((__u32 *)a->laddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)a->raddr, sk, __sk_common.skc_daddr);
	} else if (a->family == AF_INET6) {
		BPF_CORE_READ_INTO((struct in6_addr *)a->laddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO((struct in6_addr *)a->raddr, sk, __sk_common.skc_v6_daddr);
	}
}

#include "stack.bpf.h"
#include "held.bpf.h"

/* Decoded at syscall exit: on x86-64 and arm64 the argument registers in
 * pt_regs are preserved across the syscall, so no entry probe (and no
 * per-thread map of pending calls) is needed. Path strings are read from
 * the caller's memory after the call, which the kernel does not change. */
static __always_inline void read_detail(struct pending *p, long ret)
{
	const char *path = NULL;
	p->path[0] = 0;
	if (ret < 0)
		return;
	switch (p->sc) {
	case SC_OPEN:
	case SC_CREAT:
	case SC_MEMFD_CREATE:
		path = (const char *)p->args[0];
		break;
	case SC_OPENAT:
	case SC_OPENAT2:
		path = (const char *)p->args[1];
		break;
	}
	if (path)
		bpf_probe_read_user_str(p->path, sizeof(p->path), path);
}

static __always_inline void emit_release(__u32 sc, __s32 fd, __u32 first, __u32 last, __u32 flags)
{
	struct ev_release *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return;
	}
	fill_hdr(&e->h, EV_RELEASE);
	if (sc == SC_CLOSE_RANGE)
		e->h.type = EV_CLOSE_RANGE;
	e->fd = fd;
	e->sc = sc;
	e->first = first;
	e->last = last;
	e->flags = flags;
	e->_pad = 0;
	submit(e);
}

/* One new fd, the record in held_scratch: held back when `defer` allows
 * and it is possible, else sent with its stack stored. `where` says where
 * read_stack() put the stack. */
GLOBAL int put_held(int where, int defer)
{
	__u32 zero = 0;
	struct held *h = bpf_map_lookup_elem(&held_scratch, &zero);
	if (!h)
		return 0;
	__u32 tgid = h->rec.h.pid;
	__s32 fd = h->rec.fd;
	struct proc *pr = is_traced(tgid);
	if (!pr)
		return 0;
	__u64 seq;
	long err = -1;
	/* An older fd at this number is gone: its close raced with this
	 * acquisition (see release_fd()), or dup2/dup3 closed it to put the
	 * copy there. Held back, it is settled; known to the ledger, it is
	 * released before the new one is acquired. */
	settle(tgid, fd);
	struct fdkey k = { .tgid = tgid, .fd = fd };
	if (bpf_map_lookup_elem(&fdseq, &k)) {
		forget_fd(pr, tgid, fd);
		emit_release(h->rec.sc, fd, 0, 0, 0);
	}
	if (where == STACK_IN_SMALL) {
		if (!h->stack.len)
			h->rec.flags |= ACQ_NO_STACK;
		seq = next_seq(h->stack.len);
		h->rec.seq = seq;
		if (defer && hold(h, pr, 1))
			return 0;
		if (seq)
			err = update_small(&seq, &h->stack);
	} else {
		struct blob *big = bpf_map_lookup_elem(&blob_scratch, &zero);
		if (!big || where == STACK_NONE) {
			h->rec.flags |= ACQ_NO_STACK;
			seq = 0;
		} else {
			if (!big->len)
				h->rec.flags |= ACQ_NO_STACK;
			seq = next_seq(big->len);
			if (seq && big->len > STACK_MAX)
				big->len = store_chunks(seq, big->sp, big->len);
			if (seq)
				err = update_big(&seq, big);
			if (err && seq)
				forget_stack(seq); /* its chunks */
		}
	}
	h->rec.seq = stored(err, seq, &h->rec.flags);
	/* A deeper stack waits in its blob map; the record is held all the same. */
	if (where != STACK_IN_SMALL && defer && hold(h, pr, 0))
		return 0;
	remember_fd(pr, tgid, fd, h->rec.seq, h->rec.h.time);
	output(&h->rec, sizeof(h->rec));
	return 0;
}

static __always_inline int is_dup(__u32 sc)
{
	return sc == SC_DUP || sc == SC_DUP2 || sc == SC_DUP3 || sc == SC_FCNTL;
}

/* fd (and fd2, the second end of a pipe or socketpair, or -1) acquired by
 * the syscall in pending_scratch. */
GLOBAL int acquire_fd(__s32 fd, __s32 fd2, __u32 cloexec)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	__u32 zero = 0;
	struct proc *pr = is_traced(tgid);
	struct pending *p = bpf_map_lookup_elem(&pending_scratch, &zero);
	struct held *h = bpf_map_lookup_elem(&held_scratch, &zero);
	if (!pr || !p || !h)
		return 0;
	int defer = !pr->nodefer;
	__u32 sc = p->sc;
	__s32 src = (__s32)p->args[0];

	if (is_dup(sc)) {
		/* The ledger describes a copy by its source: if it knows (or
		 * may know) the source, the copy must reach it while the
		 * source is still the one it knows. */
		struct fdkey k = { .tgid = tgid, .fd = src };
		send_held(tgid, src);
		if (pr->inherited || bpf_map_lookup_elem(&fdseq, &k))
			defer = 0;
	}

	struct ev_acquire *e = &h->rec;
	fill_hdr(&e->h, EV_ACQUIRE);
	e->fd = fd;
	e->fd2 = -1;
	e->sc = sc;
	e->flags = cloexec ? ACQ_CLOEXEC : 0;
	e->dup_of = is_dup(sc) ? src : -1;
	e->args[0] = p->args[0];
	e->args[1] = p->args[1];
	e->args[2] = p->args[2];
	__builtin_memset(&e->addrs, 0, sizeof(e->addrs));
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *f = fd_file(task, fd);
	struct inode *inode = f ? BPF_CORE_READ(f, f_inode) : NULL;
	e->mode = inode ? BPF_CORE_READ(inode, i_mode) : 0;
	e->ino = inode ? BPF_CORE_READ(inode, i_ino) : 0;
	int sock = (e->mode & 0170000) == 0140000;
	if (track_tcp && sock && e->ino)
		bpf_map_update_elem(&socks, &e->ino, &tgid, BPF_ANY);
	if (f && (sc == SC_ACCEPT || sc == SC_ACCEPT4))
		read_sock(f, &e->addrs);
	__builtin_memcpy(e->detail, p->path, DETAIL_MAX);
	int where = read_stack(&h->stack);
	put_held(where, defer);
	if (fd2 < 0)
		return 0;
	/* pipe, socketpair: the second end is a record of its own (a socket
	 * with its own inode), with its own copy of the stack. */
	e->fd = fd2;
	e->flags = (cloexec ? ACQ_CLOEXEC : 0) | ACQ_SECOND;
	if (sock) {
		struct file *f2 = fd_file(task, fd2);
		struct inode *inode2 = f2 ? BPF_CORE_READ(f2, f_inode) : NULL;
		e->ino = inode2 ? BPF_CORE_READ(inode2, i_ino) : 0;
		if (track_tcp && e->ino)
			bpf_map_update_elem(&socks, &e->ino, &tgid, BPF_ANY);
	}
	put_held(where, defer);
	return 0;
}

#include "path.bpf.h"

/* mmap() of a file with PROT_EXEC (the call in pending_scratch): the
 * mapping, for unwinding and symbolizing later. */
GLOBAL int mmap_exit(long ret)
{
	__u32 zero = 0;
	struct pending *p = bpf_map_lookup_elem(&pending_scratch, &zero);
	if (!p || (ret < 0 && ret >= -4095))
		return 0;
	struct file *f = fd_file(bpf_get_current_task_btf(), (int)p->args[4]);
	if (!f)
		return 0;
	struct ev_mmap *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_MMAP);
	e->addr = (__u64)ret;
	e->len = p->args[1];
	e->off = p->args[5];
	read_path(&f->f_path, &e->path);
	submit(e);
	return 0;
}

/* A successful connect(): the socket's addresses, after the ledger has
 * learnt of the socket. */
GLOBAL int connect_exit(__s32 fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	send_held(tgid, fd);
	struct ev_connect *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_CONNECT);
	e->fd = fd;
	e->_pad = 0;
	__builtin_memset(&e->addrs, 0, sizeof(e->addrs));
	struct file *f = fd_file(bpf_get_current_task_btf(), fd);
	if (f)
		read_sock(f, &e->addrs);
	submit(e);
	return 0;
}

#include "scm.bpf.h"

/* An fd was closed: settled if it was held back, else a release event. */
GLOBAL int release_fd(__u32 sc, __s32 fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	/* Open again already: another thread got the number between the
	 * close and this program (or dup2 put a copy there). Its acquisition
	 * replaces the old record; settling or releasing now would hit the
	 * new one instead. */
	if (fd_file(bpf_get_current_task_btf(), fd))
		return 0;
	if (settle(tgid, fd) == 0)
		return 0;
	forget_fd(is_traced(tgid), tgid, fd);
	emit_release(sc, fd, 0, 0, 0);
	return 0;
}

static __always_inline int on_exit(__u64 id, struct pending *p, long ret)
{
	__u32 tgid = id >> 32;
	__u32 sc = p->sc;
	__u32 cloexec = 0;
	int fds[2] = { -1, -1 };

	switch (sc) {
	case SC_CLOSE:
		/* close(2): the fd is released even when an error such as EINTR
		 * is returned; only EBADF means nothing was open. */
		if (ret != -EBADF)
			release_fd(sc, (__s32)p->args[0]);
		return 0;
	case SC_CLOSE_RANGE:
		if (ret == 0) {
			sweep(tgid, NULL);
			emit_release(sc, -1, (__u32)p->args[0], (__u32)p->args[1],
				     (__u32)p->args[2]);
		}
		return 0;
	case SC_CONNECT:
		if (ret == 0 || ret == -EINPROGRESS)
			connect_exit((__s32)p->args[0]);
		return 0;
	case SC_MMAP:
		return mmap_exit(ret);
	case SC_RECVMSG:
	case SC_RECVMMSG:
		return recvmsg_exit(ret);
	}

	if (ret < 0)
		return 0; /* a failed syscall acquires nothing */

	switch (sc) {
	case SC_OPEN:
	case SC_OPENAT:
	case SC_CREAT:
		cloexec = (sc == SC_CREAT)
				  ? 0
				  : ((sc == SC_OPEN ? p->args[1] : p->args[2]) & O_CLOEXEC);
		break;
	case SC_OPENAT2: {
		__u64 how_flags = 0;
		bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)p->args[2]);
		cloexec = how_flags & O_CLOEXEC;
		break;
	}
	case SC_OPEN_BY_HANDLE_AT:
		cloexec = p->args[2] & O_CLOEXEC;
		break;
	case SC_SOCKET:
		cloexec = p->args[1] & O_CLOEXEC;
		break;
	case SC_ACCEPT4:
		cloexec = p->args[3] & O_CLOEXEC;
		break;
	case SC_SOCKETPAIR:
		bpf_probe_read_user(fds, sizeof(fds), (void *)p->args[3]);
		cloexec = p->args[1] & O_CLOEXEC;
		break;
	case SC_PIPE:
	case SC_PIPE2:
		bpf_probe_read_user(fds, sizeof(fds), (void *)p->args[0]);
		cloexec = sc == SC_PIPE2 && (p->args[1] & O_CLOEXEC);
		break;
	case SC_DUP2:
	case SC_DUP3:
		/* dup2(2): "If the file descriptor newfd was previously open, it
		 * is closed before being reused". dup2(fd, fd) changes nothing. */
		if ((__s32)p->args[0] == (__s32)ret)
			return 0;
		release_fd(sc, (__s32)ret);
		cloexec = sc == SC_DUP3 && (p->args[2] & O_CLOEXEC);
		break;
	case SC_FCNTL:
		if (p->args[1] != F_DUPFD && p->args[1] != F_DUPFD_CLOEXEC)
			return 0;
		cloexec = p->args[1] == F_DUPFD_CLOEXEC;
		break;
	case SC_SIGNALFD:
	case SC_SIGNALFD4:
		/* signalfd(fd != -1, ...) updates an existing fd. */
		if ((__s32)p->args[0] != -1)
			return 0;
		cloexec = sc == SC_SIGNALFD4 && (p->args[3] & O_CLOEXEC);
		break;
	case SC_EVENTFD2:
		cloexec = p->args[1] & O_CLOEXEC;
		break;
	case SC_EPOLL_CREATE1:
	case SC_INOTIFY_INIT1:
	case SC_USERFAULTFD:
		cloexec = p->args[0] & O_CLOEXEC;
		break;
	case SC_TIMERFD_CREATE:
		cloexec = p->args[1] & O_CLOEXEC;
		break;
	case SC_MEMFD_CREATE:
		cloexec = p->args[1] & 1; /* MFD_CLOEXEC */
		break;
	case SC_FANOTIFY_INIT:
		cloexec = p->args[0] & 1; /* FAN_CLOEXEC */
		break;
	case SC_PERF_EVENT_OPEN:
		cloexec = p->args[4] & 8; /* PERF_FLAG_FD_CLOEXEC */
		break;
	case SC_PIDFD_OPEN:
	case SC_PIDFD_GETFD:
	case SC_BPF:
	case SC_MEMFD_SECRET:
		cloexec = 1; /* the kernel always sets O_CLOEXEC on these */
		break;
	}

	if (sc == SC_PIPE || sc == SC_PIPE2 || sc == SC_SOCKETPAIR)
		acquire_fd(fds[0], fds[1], cloexec);
	else
		acquire_fd((__s32)ret, -1, cloexec);
	return 0;
}

/* Syscall number -> enum sc, filled by the loader from the libc
 * constants of the target architecture; 0 = not traced. One raw
 * tracepoint instead of ~70 syscall tracepoints: each attachment costs
 * ~40 ms to detach (serialized in the kernel). */
SYSCALL_CODES();

/* tp_btf gives a typed pt_regs: its fields are read with plain loads,
 * several times cheaper than a probe-read helper call each. */
SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!is_traced(id >> 32)) {
		if ((id >> 32) == spawner_pid && (int)PT_REGS_PARM1_SYSCALL(regs) == SETTLE_FD)
			sweep(0, NULL);
		return 0;
	}
	__u32 nr = regs->orig_ax;
	if (nr >= NR_MAX)
		return 0;
	__u32 *sc = bpf_map_lookup_elem(&sc_of, &nr);
	if (!sc || !*sc)
		return 0;
	__u32 zero = 0;
	struct pending *p = bpf_map_lookup_elem(&pending_scratch, &zero);
	if (!p)
		return 0;
	p->sc = *sc;
	p->args[0] = PT_REGS_PARM1_SYSCALL(regs);
	p->args[1] = PT_REGS_PARM2_SYSCALL(regs);
	p->args[2] = PT_REGS_PARM3_SYSCALL(regs);
	p->args[3] = PT_REGS_PARM4_SYSCALL(regs);
	p->args[4] = PT_REGS_PARM5_SYSCALL(regs);
	p->args[5] = PT_REGS_PARM6_SYSCALL(regs);
	/* Only file-backed executable mappings matter for unwinding. */
	if (p->sc == SC_MMAP && (!(p->args[2] & PROT_EXEC) || (long)p->args[4] < 0))
		return 0;
	read_detail(p, ret);
	return on_exit(id, p, ret);
}

#define IPPROTO_TCP 6
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_tcp_state, const struct sock *sk, int oldstate, int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	struct socket *so = sk->sk_socket;
	if (!so)
		return 0; /* not yet accepted, or already released */
	struct file *f = so->file;
	if (!f)
		return 0;
	__u64 ino = f->f_inode->i_ino;
	if (!bpf_map_lookup_elem(&socks, &ino))
		return 0; /* also: TCP states are not tracked (track_tcp) */
	struct ev_tcp *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_TCP);
	e->ino = ino;
	e->oldstate = oldstate;
	e->newstate = newstate;
	__builtin_memset(&e->addrs, 0, sizeof(e->addrs));
	read_sock(f, &e->addrs);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	if (ptgid == ctgid)
		return 0; /* a thread: same fd table, same process */
	int spawn = spawning && ptgid == spawner_pid;
	struct proc *pp = is_traced(ptgid);
	if (!spawn && !pp)
		return 0;
	int shares = parent->files == child->files;
	struct proc child_proc = {
		.fork_time = 0, .deferred = 0, .nodefer = shares, .inherited = !spawn
	};
	bpf_map_update_elem(&traced, &ctgid, &child_proc, BPF_ANY);
	if (!spawn) {
		/* The child copies the table: the ledger must know every fd in
		 * it first. With CLONE_FILES both close each other's fds, so
		 * neither holds records back any more. */
		sweep(ptgid, NULL);
		if (pp && shares)
			pp->nodefer = 1;
		if (pp)
			pp->fork_time = bpf_ktime_get_ns();
	}
	struct ev_fork *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_FORK);
	e->h.pid = ptgid;
	e->child = ctgid;
	e->shares_files = shares;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (!is_traced(tgid))
		return 0;
	struct task_struct *cur = bpf_get_current_task_btf();
	sweep(tgid, cur->files->fdt);
	struct ev_exec *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_EXEC);
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	e->start_code = BPF_CORE_READ(mm, start_code);
	e->at_base = 0;
#pragma unroll
	for (int i = 0; i < 20; i++) {
		__u64 kv[2];
		BPF_CORE_READ_INTO(&kv, mm, saved_auxv[i * 2]);
		if (kv[0] == 0)
			break;
		if (kv[0] == AT_BASE) {
			e->at_base = kv[1];
			break;
		}
	}
	/* begin_new_exec() already closed the close-on-exec fds: report the
	 * fds that survived, straight from the kernel's bitmap. */
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	e->max_fds = BPF_CORE_READ(fdt, max_fds);
	unsigned long *open = BPF_CORE_READ(fdt, open_fds);
	__u32 words = e->max_fds / 64;
	if (words > EXEC_FD_WORDS)
		words = EXEC_FD_WORDS;
	e->words = words;
	__builtin_memset(e->open_fds, 0, sizeof(e->open_fds));
	__u32 sz = words * 8;
	if (sz > EXEC_FD_WORDS * 8)
		sz = EXEC_FD_WORDS * 8;
	if (sz)
		bpf_probe_read_kernel(e->open_fds, sz, open);
	struct file *exe = BPF_CORE_READ(mm, exe_file);
	read_path(&exe->f_path, &e->path);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int on_exit_task(struct trace_event_raw_sched_process_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (!is_traced(tgid))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	if (!group_dead(ctx, task))
		return 0;  /* other threads remain: the process lives on */
	sweep(tgid, NULL); /* what it still held */
	bpf_map_delete_elem(&traced, &tgid);
	struct ev_exit *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_EXIT);
	int code = BPF_CORE_READ(task, signal, group_exit_code);
	e->code = code ? code : BPF_CORE_READ(task, exit_code);
	e->_pad = 0;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
