#!/usr/bin/env bash
# heap_ring.sh - heap tracing overhead on workloads whose blocks live a
# while (heap_ring.c: each of 2 threads keeps a ring of LIVE blocks, frees
# the oldest and allocates a new one through a 4-deep call chain), swept
# over the live set per thread, the size mix and frame pointers: untraced
# vs leakscope (preload) vs heaptrack, as ratios of medians of interleaved
# rounds, with peak RSS, and whether each tool found the 997 leaked blocks
# of ring_leak exactly. The worst leakscope point is printed last.
#
# Usage: bench/heap_ring.sh
#
# Environment:
#   PAIRS    malloc/free pairs per run, over both threads (default 20000000)
#   ROUNDS   interleaved rounds (default 3); medians are over rounds
#   LIVES    live sets per thread (default "16 256 4096 65536")
#   SIZES    size mixes (default "small mixed": 16..256 B, or 16 B..8 KiB
#            with 3/4 of the blocks up to 256 B)
#   BUILDS   "fp nofp" (default): with and without frame pointers
#   HEAPTRACK  0 to leave heaptrack out (default: in, if installed)
#   RSS      0 to skip the peak-RSS runs (default 1: one more run per tool
#            and point, sampled every 20 ms through /proc, outside timing)
#   CARGO_TARGET_DIR  where the release leakscope and shim are built
#
# Each round runs every point, and within a point untraced, leakscope and
# heaptrack back to back, so a slow spell of the machine hits all three.
# Logs go to bench/out/ (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
OUT=$ROOT/bench/out
mkdir -p "$OUT"
PAIRS=${PAIRS:-20000000}
ROUNDS=${ROUNDS:-3}
LIVES=${LIVES:-16 256 4096 65536}
SIZES=${SIZES:-small mixed}
BUILDS=${BUILDS:-fp nofp}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

for b in $BUILDS; do
	flag=-fno-omit-frame-pointer
	[[ $b == nofp ]] && flag=-fomit-frame-pointer
	${CC:-cc} -std=gnu11 -g -O2 $flag -Wall -pthread -o "$OUT/heap_ring_$b" "$ROOT/bench/heap_ring.c"
done
(cd "$ROOT" && cargo build -q --release -p leakscope-shim -p leakscope)
LS=$TARGET/release/leakscope

tools=(untraced leakscope)
if [[ ${HEAPTRACK:-1} != 0 ]]; then
	if command -v heaptrack >/dev/null && command -v heaptrack_print >/dev/null; then
		tools+=(heaptrack)
	else
		echo "skipping heaptrack: not installed"
	fi
fi

# run TOOL BUILD LIVE SIZES -> "seconds found" (found: yes/no/-)
run() {
	local tool=$1 bin=$OUT/heap_ring_$2 live=$3 sizes=$4 log=$OUT/ring_$1_$2_$3_$4.log t0 t1 ok=-
	case $tool in
	untraced) t0=$(now); "$bin" "$PAIRS" "$live" "$sizes"; t1=$(now) ;;
	leakscope)
		t0=$(now)
		"$LS" run --backend preload --track heap --format json -o "$log" -- "$bin" "$PAIRS" "$live" "$sizes" 2>/dev/null
		t1=$(now)
		python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
n = sum(g["count"] for g in r["leaks"] if any(f["function"] == "ring_leak" for f in g["stack"]))
sys.exit(0 if n == 997 and r["events"]["lost"] == 0 else 1)' "$log" && ok=yes || ok=no ;;
	heaptrack)
		rm -f "$OUT"/heaptrack.ring.*
		t0=$(now); heaptrack -o "$OUT/heaptrack.ring" "$bin" "$PAIRS" "$live" "$sizes" >/dev/null 2>&1; t1=$(now)
		heaptrack_print --print-leaks=1 "$OUT"/heaptrack.ring* >"$log" 2>&1 || true
		grep -A3 "leaked over 997 calls" "$log" | grep -q ring_leak && ok=yes || ok=no ;;
	esac
	echo "$(echo "$t1 - $t0" | bc -l) $ok"
}

# rss TOOL BUILD LIVE SIZES -> "tracer_kib target_kib"
rss() {
	local tool=$1 bin=$OUT/heap_ring_$2 pid
	case $tool in
	untraced) "$bin" "$PAIRS" "$3" "$4" & pid=$! ;;
	leakscope) "$LS" run --backend preload --track heap -- "$bin" "$PAIRS" "$3" "$4" >/dev/null 2>&1 & pid=$! ;;
	heaptrack) heaptrack -o "$OUT/heaptrack.rss" "$bin" "$PAIRS" "$3" "$4" >/dev/null 2>&1 & pid=$! ;;
	esac
	peak_rss "$pid" '^heap_ring'
	wait "$pid" 2>/dev/null || true
	rm -f "$OUT"/heaptrack.rss*
}

declare -A T F R
for ((r = 1; r <= ROUNDS; r++)); do
	for b in $BUILDS; do
		for s in $SIZES; do
			for l in $LIVES; do
				for tool in "${tools[@]}"; do
					read -r secs ok < <(run "$tool" "$b" "$l" "$s")
					T[$tool.$b.$s.$l]+="$secs "
					F[$tool.$b.$s.$l]=$ok
				done
			done
		done
	done
	echo "round $r/$ROUNDS done"
done
if [[ ${RSS:-1} != 0 ]]; then
	for b in $BUILDS; do for s in $SIZES; do for l in $LIVES; do for tool in "${tools[@]}"; do
		R[$tool.$b.$s.$l]=$(rss "$tool" "$b" "$l" "$s")
	done; done; done; done
fi

echo
echo "$PAIRS pairs on 2 threads; medians of $ROUNDS rounds; ratio = tool / untraced; MiB = peak RSS"
printf '%-5s %-6s %6s %9s %9s %9s %11s %11s %11s %11s  %s\n' build sizes live untraced_s leakscope heaptrack \
	target_MiB ls_target ls_tracer ht_tracer "found (ls ht)"
worst=0 worst_at=
for b in $BUILDS; do for s in $SIZES; do for l in $LIVES; do
	k=$b.$s.$l
	base=$(echo "${T[untraced.$k]}" | median)
	ratio() { [[ -n ${T[$1.$k]:-} ]] && printf '%.2f' "$(echo "$(echo "${T[$1.$k]}" | median) / $base" | bc -l)" || echo -; }
	rl=$(ratio leakscope) rh=$(ratio heaptrack)
	read -r _ ut <<<"${R[untraced.$k]:-0 0}"
	read -r lt lg <<<"${R[leakscope.$k]:-0 0}"
	read -r ht _ <<<"${R[heaptrack.$k]:-0 0}"
	printf '%-5s %-6s %6s %9.3f %9s %9s %11s %11s %11s %11s  %s %s\n' "$b" "$s" "$l" "$base" "$rl" "$rh" \
		"$(mib "$ut")" "$(mib "$lg")" "$(mib "$lt")" "$(mib "$ht")" "${F[leakscope.$k]}" "${F[heaptrack.$k]:--}"
	if (($(echo "$rl > $worst" | bc -l))); then worst=$rl worst_at="$b $s live=$l"; fi
done; done; done
echo "worst leakscope point: ${worst}x at $worst_at"
