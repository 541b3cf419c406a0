// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* leakscope heap tracing of a running process: uprobes on the allocator's
 * entry points (attached per pid by the loader, the function kind in the
 * attach cookie), uretprobes for the returned address. Each tracked block's
 * registers and user stack (copied at the return, so unwinding starts in
 * the caller) wait in a hash map keyed by (tgid, address) and are deleted
 * when the block is freed: only leaked blocks' stacks reach user space.
 * The ring buffer carries small Alloc/Free records for the ledger.
 * No kprobes and no fentry: this kernel has neither. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "uheap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define PROT_EXEC 4

/* Set by the loader: record 1 of every `sample_every` allocations (their
 * frees are always seen, because a free looks the block up). */
const volatile __u32 sample_every = 1;
/* Set by the loader: mark children of traced processes as traced. */
const volatile __u32 follow_forks = 1;
__u64 alloc_seq = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} traced SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024);
} events SEC(".maps");

/* One allocator call in progress per thread. `sp` is the stack pointer at
 * the function's entry (pointing at the return address): a call made from
 * inside it (glibc's realloc(NULL, n) calls malloc, reallocarray calls
 * realloc) runs deeper, and its return arrives at sp + 8. */
struct inflight {
	__u64 sp;
	__u64 size;
	__u64 out; /* posix_memalign: where the pointer is stored */
	__u32 fn;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct inflight);
} calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	/* 8 KiB each, allocated on use: at most 512 MiB of stacks of blocks
	 * live at once; beyond, blocks are kept in `nostack`. */
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct blob_key);
	__type(value, struct blob);
} blobs SEC(".maps");

/* Blocks tracked without a stack (the stack map was full): value = seq. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct blob_key);
	__type(value, __u64);
} nostack SEC(".maps");

/* Threads inside an mmap(PROT_EXEC) of a file. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} mmaps SEC(".maps");

#include "common.bpf.h"

/* A page to spare after the stack (copy_pages()). */
struct blob_buf {
	struct blob b;
	__u8 spare[COPY_PAGE];
};
PERCPU_SCRATCH(blob_scratch, struct blob_buf);

static __always_inline int is_traced(__u32 tgid)
{
	return bpf_map_lookup_elem(&traced, &tgid) != NULL;
}

static __always_inline void fill_hdr(struct ev_hdr *h, __u32 type, __u64 id)
{
	h->type = type;
	h->pid = id >> 32;
	h->tid = (__u32)id;
	h->_pad = 0;
	h->time = bpf_ktime_get_ns();
}

/* Forget a tracked block; emit Free if it was one. Untracked addresses
 * (allocated before attach, or sampled out) are ignored. */
static __always_inline void release(__u64 id, __u64 addr)
{
	struct blob_key key = { .tgid = id >> 32, .addr = addr };
	__u64 seq = 0;
	struct blob *b = bpf_map_lookup_elem(&blobs, &key);
	if (b) {
		seq = b->seq;
		if (bpf_map_delete_elem(&blobs, &key) != 0)
			return; /* another thread freed it first */
	} else {
		__u64 *s = bpf_map_lookup_elem(&nostack, &key);
		if (!s)
			return;
		seq = *s;
		if (bpf_map_delete_elem(&nostack, &key) != 0)
			return;
	}
	struct ev_free *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return;
	}
	fill_hdr(&e->h, EV_FREE, id);
	e->addr = addr;
	e->seq = seq;
	submit(e);
}

/* Whether this thread is already inside a traced allocator call further up
 * its stack (then this call is the allocator's own business). */
static __always_inline int nested(__u64 id, __u64 sp)
{
	struct inflight *c = bpf_map_lookup_elem(&calls, &id);
	return c && c->sp > sp;
}

SEC("uprobe")
int on_entry(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!is_traced(id >> 32))
		return 0;
	__u64 sp = PT_REGS_SP(ctx);
	__u32 fn = (__u32)bpf_get_attach_cookie(ctx);
	if (nested(id, sp))
		return 0;
	__u64 a0 = PT_REGS_PARM1(ctx), a1 = PT_REGS_PARM2(ctx), a2 = PT_REGS_PARM3(ctx);
	if (fn == FN_FREE) {
		/* The loader may place this probe a few instructions into free()
		 * (past an instruction that would be single-stepped); the
		 * argument register is still untouched there. */
		if (a0)
			release(id, a0);
		return 0;
	}
	struct inflight c = { .sp = sp, .fn = fn };
	switch (fn) {
	case FN_CALLOC:
		c.size = a0 * a1;
		break;
	case FN_REALLOC:
	case FN_REALLOCARRAY:
		c.size = fn == FN_REALLOC ? a1 : a1 * a2;
		/* realloc(3) frees the old block before it returns, and another
		 * thread may get the same address from malloc before our return
		 * probe runs: release it now. A failed realloc leaves it
		 * allocated; we then no longer track it (never a false leak). */
		if (a0)
			release(id, a0);
		break;
	case FN_POSIX_MEMALIGN:
		c.out = a0;
		c.size = a2;
		break;
	case FN_ALIGNED_ALLOC:
	case FN_MEMALIGN:
		c.size = a1;
		break;
	default: /* malloc, valloc, pvalloc */
		c.size = a0;
		break;
	}
	bpf_map_update_elem(&calls, &id, &c, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int on_return(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct inflight *cp = bpf_map_lookup_elem(&calls, &id);
	if (!cp)
		return 0;
	__u64 sp = PT_REGS_SP(ctx);
	/* The return pops the return address: sp = entry sp + 8. Lower: a
	 * nested call returned; higher: the record is stale (a return we
	 * never saw, e.g. longjmp out of a hook). */
	if (sp < cp->sp + 8)
		return 0;
	struct inflight c = *cp;
	bpf_map_delete_elem(&calls, &id);
	if (sp > c.sp + 8 || !is_traced(tgid))
		return 0;
	__u64 addr = PT_REGS_RC(ctx);
	if (c.fn == FN_POSIX_MEMALIGN) {
		if ((int)addr != 0)
			return 0;
		addr = 0;
		bpf_probe_read_user(&addr, sizeof(addr), (void *)c.out);
	}
	if (!addr)
		return 0;
	__u64 seq = __sync_fetch_and_add(&alloc_seq, 1) + 1;
	if (sample_every > 1 && seq % sample_every != 0) {
		count(CNT_SAMPLED_OUT);
		return 0;
	}
	__u32 flags = 0;
	__u32 zero = 0;
	struct blob *b = bpf_map_lookup_elem(&blob_scratch, &zero);
	if (!b)
		return 0;
	/* At a uretprobe the registers are the caller's, right after the call
	 * returned: ip is the return address, sp is above it. */
	b->seq = seq;
	b->size = c.size;
	b->time = bpf_ktime_get_ns();
	b->tid = (__u32)id;
	b->ip = PT_REGS_IP(ctx);
	b->sp = sp;
	b->bp = ctx->bp;
	/* Near the top of the main thread's stack the read runs past the end
	 * of the mapping, and a page the program never touched is not in
	 * memory: either fails it as a whole. Then page by page, up to the
	 * last page that could be read. */
	if (bpf_probe_read_user(b->data, STACK_MAX, (void *)sp) == 0)
		b->len = STACK_MAX;
	else
		b->len = copy_pages(b->data, sp, STACK_MAX, STACK_MAX);
	if (!b->len)
		flags |= ALLOC_NO_STACK;
	struct blob_key key = { .tgid = tgid, .addr = addr };
	if (bpf_map_update_elem(&blobs, &key, b, BPF_ANY) != 0) {
		count(CNT_BLOB_FULL);
		flags |= ALLOC_NO_BLOB;
		if (bpf_map_update_elem(&nostack, &key, &seq, BPF_ANY) != 0) {
			count(CNT_LIVE_FULL);
			return 0;
		}
	}
	struct ev_alloc *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_ALLOC, id);
	e->h.time = b->time;
	e->addr = addr;
	e->size = c.size;
	e->seq = seq;
	e->fn = c.fn;
	e->flags = flags;
	submit(e);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	if (ptgid == ctgid || !follow_forks || !is_traced(ptgid))
		return 0; /* a thread shares the heap; or not ours */
	__u8 one = 1;
	bpf_map_update_elem(&traced, &ctgid, &one, BPF_ANY);
	struct ev_fork *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_FORK, bpf_get_current_pid_tgid());
	e->h.pid = ptgid;
	e->child = ctgid;
	e->_pad = 0;
	/* The loader attaches the child's probes: wake it now. */
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	return 0;
}

static __always_inline void lifetime_event(__u64 id, __u32 type)
{
	struct ev_hdr *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return;
	}
	fill_hdr(e, type, id);
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (!is_traced(tgid))
		return 0;
	/* The heap is gone with the old image. The pid's uprobes would still
	 * fire in the new one if it maps the same allocator file, but its
	 * modules are unknown until ld.so maps them: stop here. */
	bpf_map_delete_elem(&traced, &tgid);
	lifetime_event(id, EV_EXEC);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int on_exit_task(struct trace_event_raw_sched_process_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	bpf_map_delete_elem(&calls, &id);
	if (!is_traced(tgid))
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	if (!group_dead(ctx, task))
		return 0;
	bpf_map_delete_elem(&traced, &tgid);
	lifetime_event(id, EV_EXIT);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int on_mmap_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!is_traced(id >> 32))
		return 0;
	/* mmap(addr, len, prot, flags, fd, off): executable file mappings are
	 * what ld.so makes for dlopen. */
	if (!(ctx->args[2] & PROT_EXEC) || (long)ctx->args[4] < 0)
		return 0;
	__u8 one = 1;
	bpf_map_update_elem(&mmaps, &id, &one, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_mmap")
int on_mmap_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!bpf_map_lookup_elem(&mmaps, &id))
		return 0;
	bpf_map_delete_elem(&mmaps, &id);
	long ret = ctx->ret;
	if (ret < 0 && ret >= -4095)
		return 0;
	struct ev_mmap *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(CNT_RB_DROP);
		return 0;
	}
	fill_hdr(&e->h, EV_MMAP, id);
	e->addr = (__u64)ret;
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	return 0;
}
