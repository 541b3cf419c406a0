/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Acquisitions held back in `deferred` until the event stream needs them,
 * and fds the ledger knows (fdseq). Part of leakscope.bpf.c (its maps). */
#ifndef LEAKSCOPE_HELD_BPF_H
#define LEAKSCOPE_HELD_BPF_H

/* The ledger no longer knows (tgid, fd): free its stack, unless a child
 * forked since may hold a copy (userspace copies and frees those). */
static __always_inline void forget_fd(struct proc *pr, __u32 tgid, __s32 fd)
{
	struct fdkey k = { .tgid = tgid, .fd = fd };
	struct known *kn = bpf_map_lookup_elem(&fdseq, &k);
	if (!kn)
		return;
	__u64 seq = kn->seq, time = kn->time;
	bpf_map_delete_elem(&fdseq, &k);
	if (!seq || (pr && pr->fork_time && time <= pr->fork_time))
		return;
	forget_stack(seq);
}

static __always_inline void remember_fd(struct proc *pr, __u32 tgid, __s32 fd, __u64 seq,
					__u64 time)
{
	struct fdkey k = { .tgid = tgid, .fd = fd };
	struct known kn = { .seq = seq, .time = time };
	if (bpf_map_update_elem(&fdseq, &k, &kn, BPF_NOEXIST) == 0)
		return;
	forget_fd(pr, tgid, fd); /* a stale entry: its release went unseen */
	bpf_map_update_elem(&fdseq, &k, &kn, BPF_ANY);
}

/* Claims a held-back record for its key: 0 if this caller now owns it. */
static __always_inline int claim(struct held *v, __u32 tgid, __s32 fd)
{
	if (__sync_val_compare_and_swap(&v->rec.h.claim, 0, 1) != 0)
		return -1;
	if (v->rec.h.pid != tgid || v->rec.fd != fd) {
		/* The slot was reused for another fd meanwhile: not ours. */
		v->rec.h.claim = 0;
		return -1;
	}
	return 0;
}

/* Removes the held-back entry of (tgid, fd), which this caller claimed. */
static __always_inline void unhold(__u32 tgid, __s32 fd)
{
	struct fdkey k = { .tgid = tgid, .fd = fd };
	bpf_map_delete_elem(&deferred, &k);
	struct proc *pr = is_traced(tgid);
	if (pr)
		__sync_fetch_and_add(&pr->deferred, -1);
}

/* A claimed held-back record becomes known to the ledger: its stack goes
 * to a blob map (if it was held inline) and (tgid, fd) to fdseq. */
static __always_inline void keep_held(struct held *v, __u32 tgid, __s32 fd)
{
	__u32 flags = v->rec.flags & ~ACQ_INLINE;
	__u64 seq = v->rec.seq;
	if (v->rec.flags & ACQ_INLINE)
		seq = stored(seq ? update_small(&seq, &v->stack) : -1, seq, &flags);
	v->rec.flags = flags;
	v->rec.seq = seq;
	remember_fd(is_traced(tgid), tgid, fd, seq, v->rec.h.time);
}

/* Sends the held-back acquisition of (tgid, fd), if there is one: the
 * ledger learns of the fd. */
GLOBAL int send_held(__u32 tgid, __s32 fd)
{
	struct fdkey k = { .tgid = tgid, .fd = fd };
	struct held *v = bpf_map_lookup_elem(&deferred, &k);
	if (!v)
		return 0;
	/* Reserved before the claim: a release losing it is queued after.
	 * One NULL check per reservation: 6.1's verifier loses track of a
	 * second one and reports the reservation unreleased. */
	struct ev_acquire *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		if (claim(v, tgid, fd) == 0) {
			keep_held(v, tgid, fd);
			unhold(tgid, fd);
			count(CNT_RB_DROP);
		}
		return 0;
	}
	if (claim(v, tgid, fd) != 0) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return 0;
	}
	keep_held(v, tgid, fd);
	__builtin_memcpy(e, &v->rec, sizeof(*e));
	e->h.claim = 0;
	unhold(tgid, fd);
	submit(e);
	return 0;
}

/* Drops a held-back record; 0 if it was there and this caller got it. */
GLOBAL int drop_held(__u32 tgid, __s32 fd)
{
	struct fdkey k = { .tgid = tgid, .fd = fd };
	struct held *v = bpf_map_lookup_elem(&deferred, &k);
	if (!v || claim(v, tgid, fd) != 0)
		return -1;
	__u64 ino = v->rec.ino;
	__u32 mode = v->rec.mode;
	__u64 seq = v->rec.seq;
	int inl = v->rec.flags & ACQ_INLINE;
	unhold(tgid, fd);
	if (!inl && seq)
		forget_stack(seq); /* a stack too big to hold inline */
	if (track_tcp && ino && (mode & 0170000) == 0140000)
		bpf_map_delete_elem(&socks, &ino);
	return 0;
}

/* close() of a held-back fd: forget it without an event. Returns 0 if it
 * was settled so, -1 if a release must be sent. */
static __always_inline int settle(__u32 tgid, __s32 fd)
{
	if (drop_held(tgid, fd) != 0)
		return -1;
	count(CNT_SETTLED);
	return 0;
}

struct sweep {
	__u32 tgid;    /* 0: every process */
	__u32 max_fds; /* exec: fds below this are in `open` */
	__u64 open;    /* exec: address of the kernel's open-fd bitmap */
};

static long sweep_one(struct bpf_map *map, struct fdkey *key, struct held *v, struct sweep *sw)
{
	__u32 tgid = key->tgid;
	__s32 fd = key->fd;
	if (sw->tgid && tgid != sw->tgid)
		return 0;
	if (sw->open) {
		/* After exec: an fd the kernel closed (close-on-exec) is settled. */
		unsigned long word = 0;
		if (fd >= 0 && (__u32)fd < sw->max_fds)
			bpf_probe_read_kernel(&word, sizeof(word),
					      (void *)(sw->open + ((__u32)fd / 64) * 8));
		if (!(word & (1UL << (fd & 63)))) {
			settle(tgid, fd);
			return 0;
		}
	}
	send_held(tgid, fd);
	return 0;
}

/* Sends (or, after exec, settles) every held-back record of `tgid` (0:
 * of every process). After exec, `open` is the address of the kernel's
 * bitmap of the `max_fds` fds still open. */
GLOBAL int sweep_held(__u32 tgid, __u32 max_fds, __u64 open)
{
	struct proc *pr = is_traced(tgid);
	if (tgid && pr && pr->deferred <= 0)
		return 0;
	struct sweep sw = { .tgid = tgid, .max_fds = max_fds, .open = open };
	bpf_for_each_map_elem(&deferred, sweep_one, &sw, 0);
	return 0;
}

static __always_inline void sweep(__u32 tgid, struct fdtable *after_exec)
{
	__u32 max_fds = 0;
	__u64 open = 0;
	if (after_exec) {
		max_fds = BPF_CORE_READ(after_exec, max_fds);
		open = (__u64)BPF_CORE_READ(after_exec, open_fds);
	}
	sweep_held(tgid, max_fds, open);
}

/* Holds an acquisition back (see `deferred`); 0 if it was not possible. */
static __always_inline int hold(struct held *h, struct proc *pr, int inl)
{
	struct fdkey k = { .tgid = h->rec.h.pid, .fd = h->rec.fd };
	if (inl)
		h->rec.flags |= ACQ_INLINE;
	if (bpf_map_update_elem(&deferred, &k, h, BPF_NOEXIST) != 0) {
		/* A stale entry (its release went unseen): replace it. */
		drop_held(k.tgid, k.fd);
		if (bpf_map_update_elem(&deferred, &k, h, BPF_NOEXIST) != 0) {
			h->rec.flags &= ~ACQ_INLINE;
			return 0;
		}
	}
	h->rec.flags &= ~ACQ_INLINE;
	__sync_fetch_and_add(&pr->deferred, 1);
	return 1;
}

#endif
