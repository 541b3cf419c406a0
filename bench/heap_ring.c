/*
 * heap_ring.c - an allocation-bound workload whose blocks live a while, as
 * real programs' request buffers, parse trees and caches do: each thread
 * keeps a ring of LIVE blocks; every iteration frees the oldest and
 * allocates a new one (through a 4-deep call chain) and writes over its
 * size. For bench/heap_ring.sh.
 *
 * Usage: heap_ring PAIRS LIVE SIZES
 *   PAIRS  malloc/free pairs in all, split over 2 threads (default 20000000)
 *   LIVE   ring size per thread (default 4096)
 *   SIZES  small (16..256 bytes) or mixed (16 B .. 8 KiB, skewed small:
 *          3/4 of blocks up to 256 B, 1/4 up to 8 KiB) (default mixed)
 *
 * Leaks: ring_leak() leaks 997 blocks of 48 bytes (on the main thread,
 * before the rings start), whatever the arguments. The rings are freed at
 * the end.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINL __attribute__((noipa, noinline))
#define THREADS 2

static long pairs_per_thread = 10000000;
static long live = 4096;
static int mixed = 1;
static void *volatile leak_sink;

NOINL void ring_leak(void) {
	for (int i = 0; i < 997; i++) {
		char *p = malloc(48);
		memset(p, 1, 48);
		leak_sink = p;
	}
}

/* A cheap per-thread generator (xorshift). */
static size_t next_size(unsigned long *s) {
	unsigned long x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	if (!mixed || (x & 3) != 0)
		return 16 + (x >> 8) % 241;
	return 16 + (x >> 8) % 8177;
}

NOINL void *level4(size_t n) {
	char *p = malloc(n);
	if (!p)
		abort();
	memset(p, (int)n, n);
	return p;
}
NOINL void *level3(size_t n) { return (char *)level4(n) + 0; }
NOINL void *level2(size_t n) { return (char *)level3(n) + 0; }
NOINL void *level1(size_t n) { return (char *)level2(n) + 0; }

static void *worker(void *arg) {
	unsigned long seed = 0x9e3779b97f4a7c15UL ^ (unsigned long)(size_t)arg;
	void **ring = calloc((size_t)live, sizeof(void *));
	if (!ring)
		abort();
	for (long i = 0; i < pairs_per_thread; i++) {
		long k = i % live;
		free(ring[k]);
		ring[k] = level1(next_size(&seed));
	}
	for (long k = 0; k < live; k++)
		free(ring[k]);
	free(ring);
	return NULL;
}

int main(int argc, char **argv) {
	if (argc > 1)
		pairs_per_thread = atol(argv[1]) / THREADS;
	if (argc > 2)
		live = atol(argv[2]);
	if (argc > 3)
		mixed = strcmp(argv[3], "small") != 0;
	if (pairs_per_thread <= 0 || live <= 0) {
		fprintf(stderr, "usage: heap_ring PAIRS LIVE small|mixed\n");
		return 2;
	}
	ring_leak();
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	return 0;
}
