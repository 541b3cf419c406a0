/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Paths of executable mappings, walked in the kernel's dentries. Part of
 * leakscope.bpf.c. */
#ifndef LEAKSCOPE_PATH_BPF_H
#define LEAKSCOPE_PATH_BPF_H

/* Walk a path from a dentry up to the root, crossing mounts; components
 * come out leaf first (bpf_d_path is not allowed in tracepoints). The walk
 * runs under bpf_loop so the verifier checks one step, not every path. */
struct walk {
	struct dentry *d;
	struct mount *mnt;
	struct path_parts *out;
};

static long walk_step(__u64 i, void *arg)
{
	struct walk *w = arg;
	struct dentry *d = w->d;
	struct mount *mnt = w->mnt;
	struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
	if (d == mnt_root) {
		struct mount *mp = BPF_CORE_READ(mnt, mnt_parent);
		if (mp == mnt)
			return 1; /* the real root */
		w->d = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = mp;
		return 0;
	}
	struct dentry *parent = BPF_CORE_READ(d, d_parent);
	if (d == parent)
		return 1;
	__u32 n = w->out->n;
	if (n >= PATH_PARTS)
		return 1;
	const unsigned char *name = BPF_CORE_READ(d, d_name.name);
	bpf_probe_read_kernel_str(w->out->part[n & (PATH_PARTS - 1)], PART_MAX, name);
	w->out->n = n + 1;
	w->d = parent;
	return 0;
}

static __always_inline void read_path(const struct path *path, struct path_parts *out)
{
	struct vfsmount *vfsmnt = BPF_CORE_READ(path, mnt);
	struct walk w = {
		.d = BPF_CORE_READ(path, dentry),
		.mnt = container_of(vfsmnt, struct mount, mnt),
		.out = out,
	};
	out->n = 0;
	bpf_loop(3 * PATH_PARTS, walk_step, &w, 0);
}

#endif
