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
 *
 * The shape can be changed (bench/fd_overhead.sh sweep):
 *   FD_MIX   which syscalls make up a cycle: all (default: the four
 *            above), or one of open, socket, pipe, dup
 *   FD_LIVE  fds each thread keeps open (default 0): each new fd takes a
 *            slot in a ring of FD_LIVE and closes the fd it evicts, so fds
 *            live for FD_LIVE acquisitions instead of one syscall; the ring
 *            is closed before exit (not leaked)
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

static const char *mix = "all";
static long live;

/* A new fd: closed at once, or kept in the thread's ring of `live`. */
static void release_later(int *ring, long *next, int fd) {
  if (live == 0) {
    close(fd);
    return;
  }
  long k = (*next)++ % live;
  if (ring[k] >= 0)
    close(ring[k]);
  ring[k] = fd;
}

static int in_mix(const char *what) {
  return strcmp(mix, "all") == 0 || strcmp(mix, what) == 0;
}

__attribute__((noinline)) void stress_cycles(void) {
  int p[2];
  long period_ns = 0;
  struct timespec next;
  int *ring = NULL;
  long at = 0;
  if (live > 0) {
    if ((ring = malloc(live * sizeof *ring)) == NULL)
      die("malloc ring");
    for (long k = 0; k < live; k++)
      ring[k] = -1;
  }
  int do_open = in_mix("open"), do_socket = in_mix("socket");
  int do_pipe = in_mix("pipe"), do_dup = in_mix("dup");
  if (rate > 0)
    period_ns = (long)(1e9 * SYSCALLS_PER_CYCLE * N_THREADS / rate);
  clock_gettime(CLOCK_MONOTONIC, &next);
  for (long i = 0; i < cycles; i++) {
    if (do_open) {
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      if (fd < 0)
        die("open");
      release_later(ring, &at, fd);
    }
    if (do_socket) {
      int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (s < 0)
        die("socket");
      release_later(ring, &at, s);
    }
    if (do_pipe) {
      if (pipe2(p, O_CLOEXEC) != 0)
        die("pipe2");
      release_later(ring, &at, p[0]);
      release_later(ring, &at, p[1]);
    }
    if (do_dup) {
      int d = dup(STDERR_FILENO);
      if (d < 0)
        die("dup");
      release_later(ring, &at, d);
    }
    if (period_ns > 0)
      pace(&next, period_ns);
  }
  for (long k = 0; k < live; k++)
    if (ring[k] >= 0)
      close(ring[k]);
  free(ring);
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
  if (getenv("FD_MIX") != NULL && getenv("FD_MIX")[0] != '\0')
    mix = getenv("FD_MIX");
  if (!in_mix("open") && !in_mix("socket") && !in_mix("pipe") && !in_mix("dup")) {
    fprintf(stderr, "fd_stress: FD_MIX=%s: use all, open, socket, pipe or dup\n", mix);
    return 2;
  }
  if (getenv("FD_LIVE") != NULL)
    live = atol(getenv("FD_LIVE"));
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
