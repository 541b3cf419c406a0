/*
 * heap_stress.c - malloc/free pairs on 2 threads through nested functions,
 * with known leaks, for bench/heap_overhead.sh.
 *
 * Usage: heap_stress N      (N pairs per thread, default 1000000)
 *
 * Each thread runs N iterations of level1 -> level2 -> level3 -> level4,
 * which mallocs 16..271 bytes, writes it and frees it (every 8th block is
 * kept for 8 iterations, so frees are not always of the last block). At 19
 * points spread over the run each thread calls stress_leak(), which leaks
 * 40 bytes: 38 blocks, 1520 bytes in total, whatever N is.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINL __attribute__((noipa, noinline))

static long n_pairs = 1000000;
static void *volatile leak_sink;

NOINL void stress_leak(void) {
	char *p = malloc(40);
	memset(p, 1, 40);
	leak_sink = p;
}

NOINL void *level4(size_t n) {
	char *p = malloc(n);
	if (!p)
		abort();
	p[0] = (char)n;
	return p;
}

NOINL void *level3(size_t n) { return (char *)level4(n + 1) + 0; }
NOINL void *level2(size_t n) { return (char *)level3(n + 1) + 0; }

NOINL void level1(long i, void **ring) {
	void *p = level2((size_t)(16 + (i * 7) % 256));
	if (i % 8 == 0) {
		free(ring[(i / 8) % 8]);
		ring[(i / 8) % 8] = p;
	} else {
		free(p);
	}
}

static void *run(void *arg) {
	(void)arg;
	void *ring[8] = {0};
	long step = n_pairs / 19;
	for (long i = 0; i < n_pairs; i++) {
		level1(i, ring);
		if (step > 0 && i % step == 0 && i / step < 19)
			stress_leak();
	}
	for (int k = 0; k < 8; k++)
		free(ring[k]);
	return NULL;
}

int main(int argc, char **argv) {
	if (argc > 1)
		n_pairs = atol(argv[1]);
	if (n_pairs < 19)
		n_pairs = 19;
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], NULL, run, NULL);
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	return 0;
}
