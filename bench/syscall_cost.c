/*
 * syscall_cost.c - what one syscall costs a process while a tracer is
 * attached to it (bench/ptrace_attach.sh).
 *
 * Usage: syscall_cost [ROUNDS]
 * Prints its pid, then waits for a line on stdin (the tracer is attached
 * by then), then runs ROUNDS (default 5) rounds of 100,000 getppid(2)
 * (a syscall leakscope does not decode) and 10,000 open+close pairs of
 * /dev/null (fd syscalls it decodes), printing per round:
 *   getppid US open_close US
 * the mean wall time of one call, and of one pair, in microseconds.
 * Leaks nothing.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t); /* the vDSO: no syscall */
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 5;
  printf("%d\n", getpid());
  fflush(stdout);
  char line[16];
  if (!fgets(line, sizeof line, stdin))
    return 2;
  for (int r = 0; r < rounds; r++) {
    const int n = 100000, m = 10000;
    double t0 = now();
    for (int i = 0; i < n; i++)
      syscall(SYS_getppid);
    double t1 = now();
    for (int i = 0; i < m; i++) {
      int fd = open("/dev/null", O_RDONLY);
      if (fd < 0)
        return 2;
      close(fd);
    }
    double t2 = now();
    printf("getppid %.3f open_close %.3f\n", (t1 - t0) / n * 1e6,
           (t2 - t1) / m * 1e6);
    fflush(stdout);
  }
  return 0;
}
