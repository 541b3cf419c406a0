#!/usr/bin/env bash
# attach_overhead.sh - how much does `leakscope attach` slow a running,
# fd-heavy process? Runs bench/fd_stress.c (2 threads of open/socket/pipe2/
# dup + close) untraced, and with `leakscope attach -p` started 0.2 s after
# it, interleaved; prints median wall times of the workload itself.
#
# Usage: bench/attach_overhead.sh      (root: eBPF)
# Environment: N cycles per thread (default 150000), ROUNDS (default 5),
#              LEAKSCOPE (default target/release/leakscope), CC (default cc).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-150000}
ROUNDS=${ROUNDS:-5}
LS=${LEAKSCOPE:-target/release/leakscope}
[[ -x $LS ]] || { echo "build first: cargo build --release ($LS missing)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "needs root for eBPF" >&2; exit 1; }
OUT=bench/out
mkdir -p "$OUT"
"${CC:-cc}" -O2 -g -pthread -o "$OUT/fd_stress" bench/fd_stress.c
now() { date +%s.%N; }
: >"$OUT/attach.plain"
: >"$OUT/attach.traced"
for ((r = 1; r <= ROUNDS; r++)); do
	s=$(now)
	"$OUT/fd_stress" "$N" >/dev/null
	echo "$(now) - $s" | bc >>"$OUT/attach.plain"
	s=$(now)
	"$OUT/fd_stress" "$N" >/dev/null &
	pid=$!
	sleep 0.2
	"$LS" attach -p "$pid" -o "$OUT/attach.report" 2>/dev/null &
	ls_pid=$!
	wait "$pid"
	echo "$(now) - $s" | bc >>"$OUT/attach.traced"
	wait "$ls_pid" || true
	echo "round $r/$ROUNDS done"
done
median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
p=$(median "$OUT/attach.plain")
t=$(median "$OUT/attach.traced")
printf '\n%-22s %8s\n' "fd_stress $N x 2" "wall(s)"
printf '%-22s %8.3f\n' "untraced" "$p"
printf '%-22s %8.3f  (%.1fx; attached 0.2 s after start)\n' "leakscope attach" "$t" "$(echo "$t / $p" | bc -l)"
