/* record_stacks.c - 2^N (argv[1], default 17: 131072) heap blocks leaked
 * from as many distinct call stacks, for bench/record.sh's report time:
 * each block is allocated at the bottom of a chain of N calls, each call
 * through left() or right() by one bit of the block's number. */
#include <stdio.h>
#include <stdlib.h>

static void *volatile sink;
static void step(unsigned n, unsigned depth, unsigned bits);

__attribute__((noinline, noipa)) static void left(unsigned n, unsigned d, unsigned b) {
	step(n, d, b);
	sink = 0;
}

__attribute__((noinline, noipa)) static void right(unsigned n, unsigned d, unsigned b) {
	step(n, d, b);
	sink = 0;
}

__attribute__((noinline, noipa)) static void step(unsigned n, unsigned depth, unsigned bits) {
	if (depth == 0) {
		sink = malloc(16); /* leaked */
		return;
	}
	if (n >> (depth - 1) & 1)
		right(n, depth - 1, bits);
	else
		left(n, depth - 1, bits);
}

int main(int argc, char **argv) {
	unsigned bits = argc > 1 ? (unsigned)atoi(argv[1]) : 17;
	for (unsigned n = 0; n < 1u << bits; n++)
		step(n, bits, bits);
	printf("%u stacks\n", 1u << bits);
	return 0;
}
