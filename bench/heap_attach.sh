#!/usr/bin/env bash
# heap_attach.sh - overhead of tracing the heap of an already RUNNING
# malloc-heavy process (bench/heap_stress.c): untraced, attached with
# leakscope's eBPF heap backend (crates/uheap, uheap_attach example), and
# `memleak-bpfcc -p` if installed. Medians of interleaved runs.
#
# Usage: bench/heap_attach.sh
#
# Environment:
#   N        malloc/free pairs per thread (default 100000, 2 threads)
#   ROUNDS   interleaved rounds (default 5)
#   SAMPLE   also run the backend with sample_every=SAMPLE (default 16; 0: no)
#   CC       C compiler (default cc)
#   CARGO_TARGET_DIR  where the release example is built (default target/)
#
# heap_stress.c is compiled (-fomit-frame-pointer) with its main renamed and
# a wrapper that prints its pid, waits for a line on stdin and then times
# the work itself: attach costs are not counted, only the traced run. The
# tracer must say it is attached before "go" is written. "leaks" says
# whether the tool attributed 38 blocks to stress_leak (sampled runs can't).
# Needs root. Logs go to bench/out/ (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-100000}
ROUNDS=${ROUNDS:-5}
SAMPLE=${SAMPLE:-16}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TARGET_DIR=$TARGET

cat >"$OUT/heap_attach_main.c" <<'C'
#define main stress_main
#include "heap_stress.c"
#undef main
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
	char line[16];
	printf("%d\n", getpid());
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	stress_main(argc, argv);
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("elapsed %.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
	fflush(stdout);
	usleep(300000); /* let a tracer read the last records */
	return 0;
}
C
${CC:-cc} -std=gnu11 -g -O2 -fomit-frame-pointer -Wall -pthread -I"$ROOT/bench" \
	-o "$OUT/heap_attach_stress" "$OUT/heap_attach_main.c"
cargo build -q --release -p leakscope-uheap --example uheap_attach
TRACER=$TARGET/release/examples/uheap_attach
HAVE_MEMLEAK=1
if ! command -v memleak-bpfcc >/dev/null; then
	HAVE_MEMLEAK=0
	echo "memleak-bpfcc not installed: skipped (apt-get install bpfcc-tools, see PLATFORM.md §10)"
fi

# wait_for FILE PATTERN SECONDS
wait_for() {
	local i
	for ((i = 0; i < $2 * 20; i++)); do
		grep -q "$3" "$1" 2>/dev/null && return 0
		sleep 0.05
	done
	echo "timed out waiting for '$3' in $1" >&2
	return 1
}

# run_one MODE -> prints elapsed seconds; leaves logs in $OUT/attach_MODE.*
run_one() {
	local mode=$1 fifo=$OUT/attach.fifo pid tpid=
	rm -f "$fifo" && mkfifo "$fifo"
	"$OUT/heap_attach_stress" "$N" <"$fifo" >"$OUT/attach_$mode.out" &
	local wpid=$!
	exec 3>"$fifo"
	wait_for_pid() { [[ -s $OUT/attach_$mode.out ]]; }
	until wait_for_pid; do sleep 0.02; done
	pid=$(head -1 "$OUT/attach_$mode.out")
	case $mode in
	uheap)
		"$TRACER" "$pid" >"$OUT/attach_$mode.log" 2>"$OUT/attach_$mode.err" &
		tpid=$!
		wait_for "$OUT/attach_$mode.err" 10 '^attached' ;;
	sampled)
		"$TRACER" "$pid" --sample "$SAMPLE" >"$OUT/attach_$mode.log" 2>"$OUT/attach_$mode.err" &
		tpid=$!
		wait_for "$OUT/attach_$mode.err" 10 '^attached' ;;
	memleak)
		memleak-bpfcc -p "$pid" 3600 >"$OUT/attach_$mode.log" 2>&1 &
		tpid=$!
		wait_for "$OUT/attach_$mode.log" 30 'Attaching to pid'
		sleep 1 ;;
	esac
	echo go >&3
	exec 3>&-
	wait "$wpid"
	if [[ -n $tpid ]]; then
		# background jobs of a script ignore SIGINT: end memleak with TERM
		if [[ $mode == memleak ]]; then kill -TERM "$tpid" 2>/dev/null || true; fi
		wait "$tpid" || true
	fi
	awk '/^elapsed/{print $2}' "$OUT/attach_$mode.out"
}

MODES="untraced uheap"
[[ $SAMPLE != 0 ]] && MODES="$MODES sampled"
[[ $HAVE_MEMLEAK == 1 ]] && MODES="$MODES memleak"
declare -A T
for ((r = 1; r <= ROUNDS; r++)); do
	for m in $MODES; do
		T[$m]+="$(run_one "$m") "
	done
	if ! grep -q '^38 blocks (1520 bytes) leaked from stress_leak' "$OUT/attach_uheap.log"; then
		echo "round $r: uheap did NOT report 38 blocks from stress_leak:"
		cat "$OUT/attach_uheap.log"
	fi
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
u=$(echo "${T[untraced]}" | median)
echo "heap_stress N=$N x 2 threads (-fomit-frame-pointer), $ROUNDS interleaved rounds, medians"
for m in $MODES; do
	t=$(echo "${T[$m]}" | median)
	printf '%-9s %9.4f s  %8.1fx   (all: %s)\n' "$m" "$t" "$(echo "$t / $u" | bc -l)" "${T[$m]}"
done
echo "uheap report (last round):"
sed 's/^/  /' "$OUT/attach_uheap.log"
