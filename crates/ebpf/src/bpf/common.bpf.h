/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Shared by leakscope's BPF programs (built with -I to this directory by
 * leakscope-bpf). Include after the program's `events` ring buffer and its
 * CNT_MAX. */
#ifndef LEAKSCOPE_COMMON_BPF_H
#define LEAKSCOPE_COMMON_BPF_H

/* A per-CPU buffer for a record too big for the BPF stack. */
#define PERCPU_SCRATCH(name, T)                          \
	struct {                                         \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); \
		__uint(max_entries, 1);                  \
		__type(key, __u32);                      \
		__type(value, T);                        \
	} name SEC(".maps")

/* Syscall number -> the program's syscall code, filled by the loader from
 * the libc constants of the target architecture; 0 = not traced. */
#define NR_MAX 512
#define SYSCALL_CODES()                           \
	struct {                                  \
		__uint(type, BPF_MAP_TYPE_ARRAY); \
		__uint(max_entries, NR_MAX);      \
		__type(key, __u32);               \
		__type(value, __u32);             \
	} sc_of SEC(".maps")

/* Per-CPU counters of what could not be recorded (read by the loader). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);
	if (c)
		*c += 1;
}

/* Waking the reader for every record costs a context switch each: at
 * millions of fd syscalls per second that doubled the traced program's run
 * time. Wake it only when a good amount is waiting; it also polls on a
 * short timer, and process lifetime events always wake it. */
#define WAKE_BYTES (256 * 1024)
static __always_inline void submit(void *e)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, avail >= WAKE_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* sched_process_exit: did the whole thread group die? Since 6.16 the
 * tracepoint says so; before, it fired after signal->live was decremented. */
static __always_inline int group_dead(struct trace_event_raw_sched_process_exit *ctx,
				      struct task_struct *task)
{
	if (bpf_core_field_exists(ctx->group_dead))
		return BPF_CORE_READ(ctx, group_dead);
	return BPF_CORE_READ(task, signal, live.counter) == 0;
}

/* Copies a record built elsewhere into the ring buffer (same wakeup rule). */
static __always_inline long output(void *data, __u64 size)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	long r = bpf_ringbuf_output(&events, data, size,
				    avail >= WAKE_BYTES ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	if (r)
		count(CNT_RB_DROP);
	return r;
}

/* Copies n bytes (at most cap) of the user stack at src into dst one page
 * at a time, for when one read of them all failed. A read fails as a whole
 * when any page in it is not in memory, and a tracing program cannot fault
 * one in: a page the program never touched, in a big frame whose array was
 * never written (fixtures/stack_hole.c; fixtures/fork_exec.c's main, in
 * some runs), is such a page, and lies between frames that are. It reads
 * as zeros once touched, and the helper leaves zeros in its place. dst has
 * COPY_PAGE bytes to spare after cap: the verifier bounds a read at a
 * variable offset by the buffer, not by the part of it the stack takes.
 * Returns the bytes up to the end of the last page read (0: none): where a
 * copy past the end of the mapping has to end. 4 KiB: the smallest page
 * size, a divisor of every larger one. */
#define COPY_PAGE 4096
static __always_inline __u64 copy_pages(__u8 *dst, __u64 src, __u64 n, __u64 cap)
{
	__u64 off = 0, got = 0;
	for (int i = 0; i <= cap / COPY_PAGE; i++) {
		if (off >= n)
			break;
		__u64 piece = COPY_PAGE - ((src + off) & (COPY_PAGE - 1));
		if (piece > n - off)
			piece = n - off;
		barrier_var(off);
		barrier_var(piece);
		if (off > cap || piece > COPY_PAGE)
			break;
		if (bpf_probe_read_user(dst + off, piece, (void *)(src + off)) == 0)
			got = off + piece;
		off += piece;
	}
	return got;
}

/* Global functions: the verifier checks each once, on its own, knowing
 * nothing of its arguments. A static function is checked again at every
 * call, and a bpf_loop or bpf_for_each_map_elem callback again until its
 * states converge; with the acquisition path inlined into the SCM_RIGHTS
 * and sweep callbacks, 6.18.44's verifier went past its limit of a
 * million instructions where older ones needed 40,000. Whatever is
 * reached from several places or from a callback is therefore global:
 * scalar arguments only (what every supported verifier accepts), maps
 * and per-CPU scratch looked up again inside. */
#define GLOBAL __attribute__((noinline))

#endif
