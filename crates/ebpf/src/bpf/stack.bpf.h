/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* User stacks of acquisitions: copied at the syscall, kept in blob maps by
 * size class until the fd is released. Part of leakscope.bpf.c (its maps). */
#ifndef LEAKSCOPE_STACK_BPF_H
#define LEAKSCOPE_STACK_BPF_H

struct vma_span {
	__u64 start;
	__u64 end;
};

static long vma_span_of(struct task_struct *task, struct vm_area_struct *vma, struct vma_span *s)
{
	s->start = vma->vm_start;
	s->end = vma->vm_end;
	return 0;
}

/* The bytes from sp to the end of the mapping that holds it, for a stack
 * whose top the kernel does not know: one the program allocated (a
 * makecontext(3) coroutine, a green thread, a sigaltstack(2) signal
 * stack). At most STACK_DEEP_MAX; at most STACK_MAX inside the heap (the
 * mapping of the program break), where a malloc'd stack's top can be
 * anywhere below the mapping's end. bpf_find_vma (5.17) is a helper of
 * tracing programs; it fails (-EBUSY) when the mm's lock is contended,
 * and then 0 is returned: the mapping is not known. Global: checked once. */
GLOBAL __u64 vma_len(__u64 sp)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct vma_span s = { 0, 0 };
	if (bpf_find_vma(task, sp, vma_span_of, &s, 0) || s.end <= sp)
		return 0;
	struct mm_struct *mm = task->mm;
	__u64 cap = s.start <= mm->brk && s.end > mm->start_brk ? STACK_MAX : STACK_DEEP_MAX;
	__u64 n = s.end - sp;
	return n < cap ? n : cap;
}

/* How much of the user stack above sp is worth copying: up to the top of
 * the stack the thread runs on, when that is known and near (at most
 * STACK_DEEP_MAX; a deeper stack is cut there, and the report says so).
 * The main thread's stack ends at mm->start_stack; another glibc or musl
 * thread's stack ends just below its thread control block, where the fs
 * base points (not the main thread's: ld.so maps its TLS block anywhere,
 * and a coroutine stack mapped below it is not below its top). Else the
 * stack is one the program allocated: up to the end of its mapping, or
 * STACK_MAX when that is not known. */
static __always_inline __u64 stack_len(struct task_struct *task, __u64 sp)
{
	__u64 top = task->mm->start_stack;
	if (top > sp && top - sp <= STACK_DEEP_MAX)
		return top - sp;
	top = task->thread.fsbase;
	if (task->pid != task->tgid && top > sp && top - sp <= STACK_DEEP_MAX)
		return top - sp;
	__u64 n = vma_len(sp);
	return n ? n : STACK_MAX;
}

/* copy_pages() into the stack of held_scratch (COPY_SMALL, at most
 * STACK_M bytes), blob_scratch (COPY_BIG) or chunk_scratch (COPY_CHUNK).
 * `mapped`: the n bytes are inside sp's mapping, so a page not read is a
 * page not in memory, and all n count (a stack none of whose pages could
 * be read is not read at all, though). */
#define COPY_SMALL 0
#define COPY_BIG 1
#define COPY_CHUNK 2
GLOBAL __u64 copy_paged(__u32 which, __u64 src, __u64 n, __u32 mapped)
{
	__u32 zero = 0;
	__u64 got = 0;
	if (which == COPY_SMALL) {
		struct held *h = bpf_map_lookup_elem(&held_scratch, &zero);
		if (h)
			got = copy_pages(h->stack.data, src, n, STACK_M);
	} else {
		struct blob *b = which == COPY_BIG ? bpf_map_lookup_elem(&blob_scratch, &zero)
						   : bpf_map_lookup_elem(&chunk_scratch, &zero);
		if (b)
			got = copy_pages(b->data, src, n, STACK_MAX);
	}
	return mapped && (got || which == COPY_CHUNK) ? n : got;
}

/* Registers and the user stack of the current thread: into `small` when
 * the stack fits in 4 KiB (returns STACK_IN_SMALL), else into the per-CPU
 * 8 KiB scratch (STACK_IN_BIG), or nowhere (STACK_NONE). Both have
 * COPY_PAGE bytes to spare (copy_paged()). */
#define STACK_IN_SMALL 1
#define STACK_IN_BIG 2
#define STACK_NONE 0
static __always_inline int read_stack(struct blob_m *small)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	__u64 sp = regs->sp;
	__u64 len = stack_len(task, sp);
	/* When one read fails, a page in it is not in memory, or the top is
	 * past the end of sp's mapping: a top that is not the top of the stack
	 * sp is on (a coroutine's stack mapped just below a thread's) or a
	 * guess. Then the stack is copied page by page, up to the end of sp's
	 * mapping, its pages not in memory left zero (see copy_paged()); when
	 * the mapping is not known, up to the last page that could be read. The
	 * bounds are said again on the registers the helper gets, for 6.1's
	 * verifier, which learns nothing from comparing two registers. */
	if (len <= STACK_M) {
		small->ip = regs->ip;
		small->sp = sp;
		small->bp = regs->bp;
		small->refs = 1;
		if (len && bpf_probe_read_user(small->data, len, (void *)sp) == 0) {
			small->len = len;
			return STACK_IN_SMALL;
		}
		__u64 n = vma_len(sp), known = n;
		if (!n || n > len)
			n = len;
		barrier_var(n);
		if (n > STACK_M)
			n = STACK_M;
		small->len = copy_paged(COPY_SMALL, sp, n, known != 0);
		return STACK_IN_SMALL;
	}
	__u32 zero = 0;
	struct blob *big = bpf_map_lookup_elem(&blob_scratch, &zero);
	if (!big)
		return STACK_NONE;
	big->ip = regs->ip;
	big->sp = sp;
	big->bp = regs->bp;
	big->refs = 1;
	/* The first STACK_MAX bytes; `len` counts the chunks to come too
	 * (store_chunks() copies them once the blob has a key). */
	__u64 first = len;
	/* Bounded on the register the helper gets: 6.1's verifier does not
	 * carry a bound across the 32-bit copy clang otherwise makes. */
	barrier_var(first);
	if (first > STACK_MAX)
		first = STACK_MAX;
	if (bpf_probe_read_user(big->data, first, (void *)sp) == 0) {
		big->len = len;
		return STACK_IN_BIG;
	}
	__u64 n = vma_len(sp), known = n;
	if (!n || n > len)
		n = len;
	first = n;
	barrier_var(first);
	if (first > STACK_MAX)
		first = STACK_MAX;
	__u64 got = copy_paged(COPY_BIG, sp, first, known != 0);
	/* Cut short (past the end of a mapping not known): no chunks. */
	big->len = got < first ? got : n;
	return STACK_IN_BIG;
}

/* A new blob key: this CPU's counter, the CPU, and the size class. */
static __always_inline __u64 next_seq(__u32 len)
{
	__u32 zero = 0;
	__u64 *ctr = bpf_map_lookup_elem(&seq_percpu, &zero);
	if (!ctr)
		return 0;
	*ctr += 1;
	__u64 class = len <= STACK_S ? 0 : len <= STACK_M ? 1 : 2;
	return (*ctr & ((1ULL << 40) - 1)) | ((__u64)bpf_get_smp_processor_id() << 40) |
	       (class << SEQ_CLASS_SHIFT);
}

static __always_inline void *blob_map(__u64 seq)
{
	switch (seq >> SEQ_CLASS_SHIFT) {
	case 0:
		return &blobs_s;
	case 1:
		return &blobs_m;
	default:
		return &blobs;
	}
}

/* Stores a stack under `seq` for the ledger; returns seq or 0. `small`
 * says that `b` holds at most 1 KiB (class 0), else it is the 8 KiB
 * scratch. Two calls the compiler cannot merge, so the verifier sees each
 * buffer with the maps it fits. */
static __noinline long update_small(__u64 *seq, struct blob_m *b)
{
	void *map = (*seq >> SEQ_CLASS_SHIFT) == 0 ? (void *)&blobs_s : (void *)&blobs_m;
	return bpf_map_update_elem(map, seq, b, BPF_NOEXIST);
}

static __noinline long update_big(__u64 *seq, struct blob *b)
{
	return bpf_map_update_elem(blob_map(*seq), seq, b, BPF_NOEXIST);
}

static __always_inline __u64 stored(long err, __u64 seq, __u32 *flags)
{
	if (err) {
		count(CNT_BLOB_FULL);
		*flags |= ACQ_NO_BLOB;
		return 0;
	}
	return seq;
}

struct chunk_copy {
	__u64 seq;
	__u64 sp;
	__u32 len;    /* bytes of stack wanted in all */
	__u32 done;   /* bytes stored so far */
	__u32 mapped; /* len is inside sp's mapping */
	__u32 _pad;
};

static long copy_chunk(__u64 i, struct chunk_copy *c)
{
	__u32 off = (i + 1) * STACK_MAX;
	if (i >= CHUNKS_MAX - 1 || off >= c->len)
		return 1;
	__u32 n = c->len - off;
	barrier_var(n);
	if (n > STACK_MAX)
		n = STACK_MAX;
	__u32 zero = 0;
	struct blob *b = bpf_map_lookup_elem(&chunk_scratch, &zero);
	if (!b)
		return 1;
	/* A page not in memory: page by page, the missing ones left zero
	 * (copy_pages()). Only inside sp's mapping; else what can be read. */
	__u32 got = n;
	if (bpf_probe_read_user(b->data, n, (void *)(c->sp + off)) != 0)
		got = copy_paged(COPY_CHUNK, c->sp + off, n, c->mapped);
	if (!got)
		return 1;
	b->refs = 0;
	b->len = got;
	b->ip = b->sp = b->bp = 0;
	struct chunk_key k = { .seq = c->seq, .idx = i + 1, ._pad = 0 };
	if (bpf_map_update_elem(&chunks, &k, b, BPF_NOEXIST) != 0) {
		count(CNT_BLOB_FULL);
		return 1;
	}
	c->done = off + got;
	if (got < n)
		return 1; /* cut short: nothing beyond */
	return 0;
}

/* Stores the stack from sp + STACK_MAX up to sp + len in chunks of blob
 * `seq`; returns how many bytes of stack the blob and its chunks hold. */
GLOBAL int store_chunks(__u64 seq, __u64 sp, __u32 len)
{
	/* Not past the end of sp's mapping (a top that is not the top of sp's
	 * stack), when that is known. */
	__u64 end = vma_len(sp);
	if (end && end < len)
		len = end;
	struct chunk_copy c = {
		.seq = seq, .sp = sp, .len = len, .done = STACK_MAX, .mapped = end != 0
	};
	bpf_loop(CHUNKS_MAX - 1, copy_chunk, &c, 0);
	return c.done;
}

static long drop_chunk(__u64 i, __u64 *seq)
{
	struct chunk_key k = { .seq = *seq, .idx = i + 1, ._pad = 0 };
	return bpf_map_delete_elem(&chunks, &k) != 0;
}

/* Frees stack blob `seq` and, for a deep stack, its chunks. */
GLOBAL int forget_stack(__u64 seq)
{
	if (!seq)
		return 0;
	bpf_map_delete_elem(blob_map(seq), &seq);
	if ((seq >> SEQ_CLASS_SHIFT) == 2)
		bpf_loop(CHUNKS_MAX - 1, drop_chunk, &seq, 0);
	return 0;
}

#endif
