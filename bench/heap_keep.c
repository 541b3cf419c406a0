/*
 * heap_keep.c - the other shape of heap traffic: build N long-lived blocks
 * (none freed within the shim's 10 ms flush window, so every allocation
 * and free travels to the collector), then free them all. 13 blocks from
 * keep_leak() are never freed. For bench/heap_keep.sh.
 *
 * Usage: heap_keep N     (default 2000000)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINL __attribute__((noipa, noinline))

static void *volatile sink;

NOINL void *build_node(long i) {
	char *p = malloc(32 + (size_t)(i & 63));
	if (!p)
		abort();
	p[0] = (char)i;
	return p;
}

NOINL void keep_leak(void) {
	char *p = malloc(24);
	memset(p, 7, 24);
	sink = p;
}

int main(int argc, char **argv) {
	long n = argc > 1 ? atol(argv[1]) : 2000000;
	void **v = malloc((size_t)n * sizeof *v);
	for (long i = 0; i < n; i++)
		v[i] = build_node(i);
	for (int k = 0; k < 13; k++)
		keep_leak();
	for (long i = 0; i < n; i++)
		free(v[i]);
	free(v);
	return 0;
}
