/*
 * fd_stress.c - the fd-heavy workload timed by bench/fd_overhead.sh.
 *
 * Usage: fd_stress [N [RATE]]
 *   N     cycles per thread (default 200000)
 *   RATE  if > 0, pace the threads so the whole process makes at most RATE
 *         fd syscalls per second (the "realistic rate" mode)
 *
 * Two threads each run N cycles of
 *   open+close a file, socket+close, pipe2+close+close, dup+close
 * = 9 fd syscalls per cycle, 18*N in total (3.6 million for N = 200000).
 * Before the threads start, stress_leak() opens 7 files and never closes
 * them; these are the only leaks:
 *
 *   function     kind           acquired by   count
 *   stress_leak  regular file   open              7
 *
 * The file lives in a fresh directory under $TMPDIR (or /tmp) and is
 * unlinked before exit. Prints nothing on success.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define N_THREADS 2
#define SYSCALLS_PER_CYCLE 9

static char path[PATH_MAX];
static long cycles = 200000;
static double rate;
static int leaked[7];

static void die(const char *what) {
  fprintf(stderr, "fd_stress: %s: %s\n", what, strerror(errno));
  exit(1);
}

__attribute__((noinline)) void stress_leak(void) {
  for (int i = 0; i < 7; i++)
    if ((leaked[i] = open(path, O_RDONLY)) < 0)
      die("open (stress_leak)");
}

static void pace(struct timespec *next, long period_ns) {
  next->tv_nsec += period_ns;
  while (next->tv_nsec >= 1000000000L) {
    next->tv_nsec -= 1000000000L;
    next->tv_sec++;
  }
  clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL);
}

__attribute__((noinline)) void stress_cycles(void) {
  int p[2];
  long period_ns = 0;
  struct timespec next;
  if (rate > 0)
    period_ns = (long)(1e9 * SYSCALLS_PER_CYCLE * N_THREADS / rate);
  clock_gettime(CLOCK_MONOTONIC, &next);
  for (long i = 0; i < cycles; i++) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      die("open");
    close(fd);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
      die("socket");
    close(s);
    if (pipe2(p, O_CLOEXEC) != 0)
      die("pipe2");
    close(p[0]);
    close(p[1]);
    int d = dup(STDERR_FILENO);
    if (d < 0)
      die("dup");
    close(d);
    if (period_ns > 0)
      pace(&next, period_ns);
  }
}

static void *thread_main(void *arg) {
  (void)arg;
  stress_cycles();
  return NULL;
}

int main(int argc, char **argv) {
  if (argc > 1)
    cycles = atol(argv[1]);
  if (argc > 2)
    rate = atof(argv[2]);
  const char *base = getenv("TMPDIR");
  if (base == NULL || base[0] == '\0')
    base = "/tmp";
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s/fd_stress-XXXXXX", base);
  if (mkdtemp(dir) == NULL)
    die("mkdtemp");
  if (snprintf(path, sizeof path, "%s/data", dir) >= (int)sizeof path)
    die("path too long");
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    die("create data file");
  close(fd);

  stress_leak();

  pthread_t tids[N_THREADS];
  for (int i = 0; i < N_THREADS; i++)
    if (pthread_create(&tids[i], NULL, thread_main, NULL) != 0)
      die("pthread_create");
  for (int i = 0; i < N_THREADS; i++)
    pthread_join(tids[i], NULL);

  unlink(path);
  rmdir(dir);
  return 0;
}
