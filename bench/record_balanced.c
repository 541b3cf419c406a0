/* record_balanced.c - a busy program that releases everything it
 * acquires, for bench/record.sh: for argv[1] seconds, allocations of
 * varied sizes freed at once, a pool of 256 blocks each held for a few
 * thousand iterations, and /dev/null opened and closed (fds, with eBPF).
 * Leaks nothing but what the C runtime keeps. Prints how many pairs. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void *volatile sink;

__attribute__((noinline)) static void churn(long i) {
	void *p = malloc(16 + (size_t)(i % 512));
	sink = p;
	free(p);
}

__attribute__((noinline)) static void pool(void **slot, long i) {
	free(*slot);
	*slot = malloc(64 + (size_t)(i % 64));
}

__attribute__((noinline)) static void files(void) {
	int fd = open("/dev/null", O_RDONLY);
	if (fd >= 0)
		close(fd);
}

int main(int argc, char **argv) {
	double secs = argc > 1 ? atof(argv[1]) : 10;
	static void *slots[256];
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	long i = 0;
	for (;; i++) {
		churn(i);
		if (i % 16 == 0)
			pool(&slots[(i / 16) % 256], i);
		if (i % 1024 == 0) {
			files();
			clock_gettime(CLOCK_MONOTONIC, &t);
			if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 >= secs)
				break;
		}
	}
	for (int k = 0; k < 256; k++)
		free(slots[k]);
	printf("%ld pairs\n", i);
	return 0;
}
