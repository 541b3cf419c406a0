/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* fds received over unix sockets (SCM_RIGHTS). Part of leakscope.bpf.c
 * (calls its acquire_fd). */
#ifndef LEAKSCOPE_SCM_BPF_H
#define LEAKSCOPE_SCM_BPF_H

/* fds received with SCM_RIGHTS: read back from the caller's control
 * buffer after recvmsg() returned (the kernel wrote their numbers there). */
#define SOL_SOCKET 1
#define SCM_RIGHTS 1
#define MSG_CMSG_CLOEXEC 0x40000000
#define SCM_MAX_FDS 8   /* per recvmsg(); more are counted as lost */
#define SCM_CTL_MAX 256 /* bytes of control buffer read */

struct scm {
	__u8 ctl[SCM_CTL_MAX];
	__s32 fds[SCM_MAX_FDS];
	__u32 n;
	__u32 cloexec;
};

PERCPU_SCRATCH(scm_scratch, struct scm);

static long scm_acquire(__u64 i, struct scm **mp)
{
	struct scm *m = *mp;
	if (i >= SCM_MAX_FDS || i >= m->n)
		return 1;
	acquire_fd(m->fds[i & (SCM_MAX_FDS - 1)], -1, m->cloexec);
	return 0;
}

struct scm_walk {
	struct scm *m;
	__u32 off; /* of the next control message */
	__u32 len; /* bytes of control data read */
	__u32 n;   /* fds found */
	__u32 _pad;
};

/* One control message; under bpf_loop so the verifier checks it once. */
static long scm_cmsg(__u64 i, struct scm_walk *w)
{
	struct scm *m = w->m;
	__u32 off = w->off;
	if (off > SCM_CTL_MAX - sizeof(struct cmsghdr) || off + sizeof(struct cmsghdr) > w->len)
		return 1;
	struct cmsghdr h;
	__builtin_memcpy(&h, &m->ctl[off & (SCM_CTL_MAX - 1)], sizeof(h));
	if (h.cmsg_len < sizeof(struct cmsghdr) || off + h.cmsg_len > w->len)
		return 1;
	if (h.cmsg_level == SOL_SOCKET && h.cmsg_type == SCM_RIGHTS) {
		__u32 nfd = (h.cmsg_len - sizeof(struct cmsghdr)) / sizeof(int);
		for (__u32 j = 0; j < SCM_MAX_FDS; j++) {
			__u32 at = off + sizeof(struct cmsghdr) + j * sizeof(int);
			__u32 n = w->n;
			if (j >= nfd || n >= SCM_MAX_FDS || at > SCM_CTL_MAX - sizeof(int))
				break;
			__s32 fd;
			__builtin_memcpy(&fd, &m->ctl[at & (SCM_CTL_MAX - 1)], sizeof(fd));
			m->fds[n & (SCM_MAX_FDS - 1)] = fd;
			w->n = n + 1;
		}
		if (nfd > SCM_MAX_FDS) {
			/* Not recorded: counted as lost events. */
			__u32 which = CNT_RB_DROP;
			__u64 *c = bpf_map_lookup_elem(&counters, &which);
			if (c)
				*c += nfd - SCM_MAX_FDS;
		}
	}
	w->off = off + ((h.cmsg_len + 7) & ~7U);
	return 0;
}

/* Appends the fds passed in one received message (its msghdr at `hdr` in
 * the caller's memory) to m->fds; returns the new count. */
static __always_inline __u32 scm_collect(struct scm *m, __u64 hdr, __u32 n)
{
	struct user_msghdr mh;
	if (bpf_probe_read_user(&mh, sizeof(mh), (void *)hdr) != 0)
		return n;
	__u64 len = mh.msg_controllen; /* set by the kernel to what it wrote */
	if (len < sizeof(struct cmsghdr) + sizeof(int) || !mh.msg_control)
		return n;
	if (len > SCM_CTL_MAX)
		len = SCM_CTL_MAX;
	if (bpf_probe_read_user(m->ctl, len, mh.msg_control) != 0)
		return n;
	struct scm_walk w = { .m = m, .off = 0, .len = len, .n = n };
	bpf_loop(4, scm_cmsg, &w, 0);
	return w.n;
}

#define MMSG_MAX 4 /* messages of one recvmmsg() looked at */
struct mmsg_walk {
	struct scm *m;
	__u64 vec;
	__u32 msgs;
	__u32 n;
};

static long mmsg_one(__u64 i, struct mmsg_walk *w)
{
	if (i >= w->msgs)
		return 1;
	/* struct mmsghdr: a msghdr, then the length received, padded. */
	w->n = scm_collect(w->m, w->vec + i * (sizeof(struct user_msghdr) + 8), w->n);
	return 0;
}

/* recvmsg() and recvmmsg() (the call in pending_scratch): acquisitions of
 * the fds received. */
GLOBAL int recvmsg_exit(long ret)
{
	__u32 zero = 0;
	struct pending *p = bpf_map_lookup_elem(&pending_scratch, &zero);
	struct scm *m = bpf_map_lookup_elem(&scm_scratch, &zero);
	if (ret < 0 || !p || !m)
		return 0;
	/* recvmsg() is a vector of one (only the first msghdr is read). */
	int one = p->sc == SC_RECVMSG;
	struct mmsg_walk w = { .m = m, .vec = p->args[1], .msgs = one ? 1 : ret, .n = 0 };
	if (w.msgs > MMSG_MAX)
		w.msgs = MMSG_MAX;
	bpf_loop(MMSG_MAX, mmsg_one, &w, 0);
	__u32 n = w.n;
	__u64 flags = one ? p->args[2] : p->args[3];
	if (!n)
		return 0;
	m->n = n;
	m->cloexec = (flags & MSG_CMSG_CLOEXEC) != 0;
	bpf_loop(SCM_MAX_FDS, scm_acquire, &m, 0);
	return 0;
}

#endif
