// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* leakscope snoop: every fd-lifecycle syscall (open ... fcntl), at entry and
 * at return, with decoded arguments, return value and latency.
 *
 * One tp_btf/sys_enter + tp_btf/sys_exit pair and a syscall-number -> code
 * array (filled by the loader from libc's constants) instead of ~60 syscall
 * tracepoints. Every filter (pid, comm, syscall set, failures only) is
 * applied here, so unwanted events never reach the ring buffer.
 * No kprobes and no fentry: this kernel has neither. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "snoop.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load. */
const volatile __u32 self_pid = 0;   /* leakscope itself: never traced */
const volatile __u8 filter_pids = 0; /* only tgids in `pids` */
const volatile __u8 filter_comm = 0; /* only comm == comm_want */
const volatile char comm_want[16] = {};
const volatile __u8 failed_only = 0; /* only calls that returned an error */
const volatile __u8 want_entry = 0;  /* emit entry events too */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} pids SEC(".maps");

/* Entry time per thread, in task-local storage: cheaper than a hash map
 * on the hot path, and freed with the task, so a thread that never
 * returns from a traced call (killed while blocked in accept, say) leaves
 * nothing behind. 0 = no traced call in progress. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024 * 1024);
} events SEC(".maps");

#include "common.bpf.h"

SYSCALL_CODES();

PERCPU_SCRATCH(scratch, struct snoop_ev);

static __always_inline int comm_matches(void)
{
	char comm[16];
	bpf_get_current_comm(comm, sizeof(comm));
	/* bpf_get_current_comm pads with NULs, and so does the loader. */
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (comm[i] != comm_want[i])
			return 0;
		if (comm[i] == 0)
			return 1;
	}
	return 1;
}

static __always_inline __u32 code_of(long nr)
{
	if (nr < 0 || nr >= NR_MAX)
		return 0;
	__u32 n = nr;
	__u32 *sc = bpf_map_lookup_elem(&sc_of, &n);
	return sc ? *sc : 0;
}

#define HDR_SIZE (sizeof(struct snoop_ev) - 2 * SLOT_MAX)

/* Waking the reader for every record costs a context switch each; at 100k
 * events/s that is most of a core. Wake it only when a good amount waits;
 * it also polls on a short timer. */
#define WAKE_BYTES (256 * 1024)

#define READ_STR(e, slot, ptr)                                                           \
	do {                                                                             \
		long _n = bpf_probe_read_user_str((e)->data + (slot)*SLOT_MAX, SLOT_MAX, \
						  (const void *)(ptr));                  \
		(e)->len[slot] = _n > 0 ? _n : 0;                                        \
	} while (0)

static __always_inline void read_addr(struct snoop_ev *e, __u64 ptr, __u32 len)
{
	if (!ptr)
		return;
	if (len > SOCKADDR_MAX)
		len = SOCKADDR_MAX;
	if (bpf_probe_read_user(e->data, len, (const void *)ptr) == 0)
		e->len[0] = len;
}

static __always_inline void emit(__u8 phase, __u32 sc, struct pt_regs *regs, long ret, __u64 ts,
				 __u64 lat)
{
	__u32 zero = 0;
	struct snoop_ev *e = bpf_map_lookup_elem(&scratch, &zero);
	if (!e)
		return;
	__u64 id = bpf_get_current_pid_tgid();
	e->ts = ts;
	e->lat_ns = lat;
	e->ret = ret;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->sc = sc;
	e->phase = phase;
	e->nslots = 0;
	e->len[0] = 0;
	e->len[1] = 0;
	e->aux[0] = 0;
	e->aux[1] = 0;
	e->aux[2] = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* On x86-64 and arm64 the argument registers in pt_regs survive the
	 * syscall, so they are still right at exit. */
	e->args[0] = PT_REGS_PARM1_SYSCALL(regs);
	e->args[1] = PT_REGS_PARM2_SYSCALL(regs);
	e->args[2] = PT_REGS_PARM3_SYSCALL(regs);
	e->args[3] = PT_REGS_PARM4_SYSCALL(regs);
	e->args[4] = PT_REGS_PARM5_SYSCALL(regs);
	e->args[5] = PT_REGS_PARM6_SYSCALL(regs);
	int returned_ok = phase == PH_RETURN && ret >= 0;

	switch (sc) {
	case SC_OPEN:
	case SC_CREAT:
	case SC_UNLINK:
	case SC_MEMFD_CREATE:
		READ_STR(e, 0, e->args[0]);
		e->nslots = 1;
		break;
	case SC_OPENAT2:
		/* struct open_how { u64 flags, mode, resolve; } */
		if (bpf_probe_read_user(e->aux, sizeof(e->aux), (const void *)e->args[2]))
			e->aux[0] = e->aux[1] = e->aux[2] = 0;
		/* fall through */
	case SC_OPENAT:
	case SC_UNLINKAT:
		READ_STR(e, 0, e->args[1]);
		e->nslots = 1;
		break;
	case SC_RENAME:
		READ_STR(e, 0, e->args[0]);
		READ_STR(e, 1, e->args[1]);
		e->nslots = 2;
		break;
	case SC_RENAMEAT:
	case SC_RENAMEAT2:
		READ_STR(e, 0, e->args[1]);
		READ_STR(e, 1, e->args[3]);
		e->nslots = 2;
		break;
	case SC_CONNECT:
	case SC_BIND:
		read_addr(e, e->args[1], (__u32)e->args[2]);
		e->nslots = 1;
		break;
	case SC_ACCEPT:
	case SC_ACCEPT4:
		/* The peer address is an output: only there after success. */
		if (returned_ok && e->args[1] && e->args[2]) {
			__u32 len = 0;
			bpf_probe_read_user(&len, sizeof(len), (const void *)e->args[2]);
			read_addr(e, e->args[1], len);
			e->nslots = 1;
		}
		break;
	case SC_PIPE:
	case SC_PIPE2:
	case SC_SOCKETPAIR:
		if (returned_ok) {
			__s32 fds[2] = { -1, -1 };
			__u64 p = sc == SC_SOCKETPAIR ? e->args[3] : e->args[0];
			bpf_probe_read_user(fds, sizeof(fds), (const void *)p);
			e->aux[0] = (__u64)(__s64)fds[0];
			e->aux[1] = (__u64)(__s64)fds[1];
		}
		break;
	}

	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 flags = avail >= WAKE_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	long err;
	/* Three fixed sizes: most records (close, dup, socket...) carry no
	 * string and take 128 bytes, not 640. */
	if (e->nslots == 0)
		err = bpf_ringbuf_output(&events, e, HDR_SIZE, flags);
	else if (e->nslots == 1)
		err = bpf_ringbuf_output(&events, e, HDR_SIZE + SLOT_MAX, flags);
	else
		err = bpf_ringbuf_output(&events, e, sizeof(*e), flags);
	if (err)
		count(CNT_RB_DROP);
}

/* tp_btf rather than raw_tp: pt_regs is typed, so its fields are plain
 * loads instead of a probe-read helper call each. */
SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter, struct pt_regs *regs, long nr)
{
	__u32 sc = code_of(nr);
	if (!sc)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (tgid == self_pid)
		return 0;
	if (filter_pids && !bpf_map_lookup_elem(&pids, &tgid))
		return 0;
	if (filter_comm && !comm_matches())
		return 0;
	__u64 *start = bpf_task_storage_get(&starts, bpf_get_current_task_btf(), 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);
	__u64 now = bpf_ktime_get_ns();
	if (start)
		*start = now;
	else
		count(CNT_STARTS_FULL);
	/* With --failed the entry is only known to be wanted at exit. */
	if (want_entry && !failed_only)
		emit(PH_ENTRY, sc, regs, 0, now, 0);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	/* The array lookup first: this runs for every syscall on the
	 * machine, and most are not traced. */
	__u32 sc = code_of(regs->orig_ax);
	if (!sc)
		return 0;
	/* The entry passed every filter iff it left a start time. */
	__u64 *start = bpf_task_storage_get(&starts, bpf_get_current_task_btf(), 0, 0);
	if (!start || !*start)
		return 0;
	__u64 t0 = *start;
	*start = 0;
	if (failed_only && ret >= 0)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (want_entry && failed_only)
		emit(PH_ENTRY, sc, regs, 0, t0, 0);
	emit(PH_RETURN, sc, regs, ret, now, now - t0);
	return 0;
}
