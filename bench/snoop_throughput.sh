#!/usr/bin/env bash
# snoop_throughput.sh - how many fd syscall events per second can a live
# syscall snooper sustain, and how many does it lose?
#
# Usage: bench/snoop_throughput.sh            (as root)
#
# A workload (compiled from the C source below) renames itself to a unique
# comm and makes open+close pairs (raw openat/close syscalls on /dev/null):
#   max   as fast as it can, N syscalls         (default N=2000000)
#   paced RATE syscalls/s for SECS seconds      (default RATE=100000 SECS=5)
# Each tool traces only that comm and writes what it prints to a file:
#   leakscope   leakscope snoop -n COMM --syscalls openat,close --format json
#   opensnoop   opensnoop-bpfcc -n COMM            (opens only: expects N/2)
#   bpftrace    sys_exit_openat + sys_exit_close tracepoints, one printf each
#   strace      strace -f -e trace=%desc           (stops the workload for
#               every traced call, so it runs N/20 syscalls in max mode;
#               it also sees the dynamic loader's 2 openat + 2 close, so
#               "missing" is -4)
# "captured" counts the workload's events in the output; "lost" is what the
# tool itself says it dropped (leakscope's summary, bcc's "Possibly lost",
# bpftrace's "Lost"); "missing" = expected - captured, whatever the tool
# said. "events/s" = captured / the workload's own run time, "slowdown" =
# that run time / the untraced run time.
#
# TOOLS="leakscope strace" limits the tools run (default: all four).
# Tools that are missing or cannot run here are skipped with one line
# saying why (opensnoop-bpfcc needs kernel headers, and on kernels that
# refuse fentry it fails at load: PLATFORM.md section 10). Logs go to
# bench/out/snoop.*.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-2000000}
RATE=${RATE:-100000}
SECS=${SECS:-5}
COMM=snoopload$$
COMM=${COMM:0:15}

if [[ $(id -u) != 0 ]]; then
	echo "snoop_throughput.sh: needs root (eBPF)" >&2
	exit 2
fi

# --- workload ----------------------------------------------------------------
LOAD=$OUT/snoop_load
cat >"$OUT/snoop_load.c" <<'EOF'
/* snoop_load COMM N RATE: N syscalls (open+close pairs on /dev/null),
 * RATE syscalls/s (0: as fast as possible); prints "syscalls seconds". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
  if (argc < 4) return 2;
  prctl(PR_SET_NAME, argv[1], 0, 0, 0);
  long n = atol(argv[2]) / 2;
  double rate = atof(argv[3]);
  double t0 = now();
  for (long i = 0; i < n; i++) {
    long fd = syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) { perror("openat"); return 1; }
    syscall(SYS_close, fd);
    if (rate > 0 && (i & 63) == 0) {
      double due = t0 + 2.0 * i / rate;
      while (now() < due) {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
      }
    }
  }
  printf("%ld %.6f\n", 2 * n, now() - t0);
  return 0;
}
EOF
${CC:-cc} -O2 -Wall -o "$LOAD" "$OUT/snoop_load.c"

# --- tools -------------------------------------------------------------------
LS=${LEAKSCOPE:-}
if [[ -z $LS ]]; then
	LS=$ROOT/target/release/leakscope
	if [[ ! -x $LS && -n ${CARGO_TARGET_DIR:-} ]]; then
		LS=$CARGO_TARGET_DIR/release/leakscope
	fi
fi
TOOLS=" ${TOOLS:-leakscope opensnoop bpftrace strace} "
want() { [[ $TOOLS == *" $1 "* ]]; }
tools=()
if ! want leakscope; then :; elif [[ -x $LS ]]; then tools+=(leakscope); else
	echo "skipping leakscope: $LS not found (cargo build --release, or set LEAKSCOPE)"
fi
if ! want opensnoop; then :; elif command -v opensnoop-bpfcc >/dev/null; then tools+=(opensnoop); else
	echo "skipping opensnoop-bpfcc: not installed (apt-get install bpfcc-tools + kernel headers)"
fi
if ! want bpftrace; then :; elif command -v bpftrace >/dev/null; then tools+=(bpftrace); else
	echo "skipping bpftrace: not installed"
fi
if ! want strace; then :; elif command -v strace >/dev/null; then tools+=(strace); else
	echo "skipping strace: not installed"
fi

# --- helpers -----------------------------------------------------------------
# wait_for FILE PATTERN PID: until FILE has PATTERN (tool ready); fails if
# PID died or after 30 s.
wait_for() {
	local i
	for ((i = 0; i < 300; i++)); do
		grep -q "$2" "$1" 2>/dev/null && return 0
		kill -0 "$3" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# stop PID: SIGINT, then wait (a tool that ignores it gets SIGTERM after 10 s).
stop() {
	local i
	kill -INT "$1" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		kill -0 "$1" 2>/dev/null || break
		sleep 0.1
	done
	kill -TERM "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

# run_load N RATE -> "syscalls seconds"
run_load() { "$LOAD" "$COMM" "$1" "$2"; }

ROWS=()
broken=""
row() { ROWS+=("$(printf '%-10s %-6s %9s %9s %9s %8s %9s %8s %9s' "$@")"); }

# measure TOOL MODE N RATE BASE_SECONDS
measure() {
	local tool=$1 mode=$2 n=$3 rate=$4 base=$5
	local log=$OUT/snoop.$tool.$mode pid expected captured lost res secs
	rm -f "$log".*
	case $tool in
	leakscope)
		"$LS" snoop -n "$COMM" --syscalls openat,close --format json \
			>"$log.out" 2>"$log.err" &
		pid=$!
		wait_for "$log.err" '^Tracing' $pid || { echo "leakscope failed to start: $(head -c 300 "$log.err")"; return; }
		;;
	opensnoop)
		opensnoop-bpfcc -n "$COMM" >"$log.out" 2>"$log.err" &
		pid=$!
		if ! wait_for "$log.out" 'PID' $pid; then
			echo "skipping opensnoop-bpfcc: it failed to start: $(grep -m1 -iE 'error|exception|failed' "$log.err" || tail -n1 "$log.err")"
			stop $pid
			broken+=" opensnoop "
			return
		fi
		;;
	bpftrace)
		bpftrace -e "
		tracepoint:syscalls:sys_exit_openat /comm == \"$COMM\"/ { printf(\"%d %d openat %d\n\", pid, tid, args->ret); }
		tracepoint:syscalls:sys_exit_close /comm == \"$COMM\"/ { printf(\"%d %d close %d\n\", pid, tid, args->ret); }" \
			>"$log.out" 2>"$log.err" &
		pid=$!
		wait_for "$log.out" 'Attaching' $pid || { echo "skipping bpftrace: failed to start: $(tail -n1 "$log.err")"; return; }
		;;
	strace)
		res=$(strace -f -qq -e trace=%desc -o "$log.out" "$LOAD" "$COMM" "$n" "$rate")
		;;
	esac
	if [[ $tool != strace ]]; then
		res=$(run_load "$n" "$rate")
		sleep 1 # let the tool drain what is buffered
		stop $pid
	fi
	secs=${res#* }
	case $tool in
	leakscope)
		expected=$n
		captured=$(grep -c '"syscall"' "$log.out" || true)
		lost=$(sed -n 's/.* events, \([0-9]*\) lost.*/\1/p' "$log.err" | tail -n1)
		;;
	opensnoop)
		expected=$((n / 2))
		captured=$(grep -c "$COMM" "$log.out" || true)
		lost=$({ grep -oh 'Possibly lost [0-9]*' "$log.out" "$log.err" || true; } | awk '{ s += $3 } END { print s + 0 }')
		;;
	bpftrace)
		expected=$n
		captured=$(grep -cE ' (openat|close) ' "$log.out" || true)
		lost=$({ grep -ohE 'Lost [0-9]+' "$log.out" "$log.err" || true; } | awk '{ s += $2 } END { print s + 0 }')
		;;
	strace)
		expected=$n
		captured=$(grep -cE '(openat|close)\(' "$log.out" || true)
		lost=0
		;;
	esac
	row "$tool" "$mode" "$expected" "$captured" "${lost:-?}" "$((expected - captured))" \
		"$(awk -v s="$secs" 'BEGIN { printf "%.2f", s }')" \
		"$(awk -v b="$base" -v s="$secs" 'BEGIN { printf "%.1fx", s / b }')" \
		"$(awk -v c="$captured" -v s="$secs" 'BEGIN { printf "%.0f", c / s }')"
}

# --- runs --------------------------------------------------------------------
N_STRACE=$((N / 20))
N_PACED=$((RATE * SECS))
echo "workload: $N syscalls as fast as possible (strace: $N_STRACE), then $N_PACED at $RATE/s; comm $COMM"
base_max=$(run_load "$N" 0)
base_max=${base_max#* }
base_strace=$(run_load "$N_STRACE" 0)
base_strace=${base_strace#* }
base_paced=$(run_load "$N_PACED" "$RATE")
base_paced=${base_paced#* }
row none max "$N" - - - "$(awk -v s="$base_max" 'BEGIN { printf "%.2f", s }')" 1.0x \
	"$(awk -v n="$N" -v s="$base_max" 'BEGIN { printf "%.0f", n / s }')"
for tool in "${tools[@]}"; do
	if [[ $tool == strace ]]; then
		measure strace max "$N_STRACE" 0 "$base_strace"
	else
		measure "$tool" max "$N" 0 "$base_max"
	fi
	[[ $broken == *" $tool "* ]] || measure "$tool" paced "$N_PACED" "$RATE" "$base_paced"
done

echo
printf '%-10s %-6s %9s %9s %9s %8s %9s %8s %9s\n' tool mode expected captured lost missing "time(s)" slowdown "events/s"
printf '%s\n' "${ROWS[@]}"
