#!/usr/bin/env bash
# heap_quick.sh - quick interleaved timing of untraced vs the preload backend
# (heap_trace example, built beforehand) on heap_stress, fp and nofp builds:
# median wall seconds and median CPU seconds (user+sys of the whole process
# tree: the program, the shim and the collector), and whether the 38 leaked
# blocks were found.
# Usage: bench/heap_quick.sh   (N, ROUNDS, CARGO_TARGET_DIR as in heap_overhead.sh;
#        DRIVER=cli times `leakscope run --backend preload --track heap`
#        from the same target directory instead of the example)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-1000000}
ROUNDS=${ROUNDS:-5}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
for fp in fp nofp; do
	flag=-fno-omit-frame-pointer
	[[ $fp == nofp ]] && flag=-fomit-frame-pointer
	${CC:-cc} -std=gnu11 -g -O2 $flag -Wall -pthread -o "$OUT/heap_stress_$fp" "$ROOT/bench/heap_stress.c"
done
if [[ ${DRIVER:-example} == cli ]]; then
	driver=("$TARGET/release/leakscope" run --backend preload --track heap --)
	# The text report: a group of 38 blocks whose stack has stress_leak.
	found() { awk '/^38 heap blocks/{n=1} n && /stress_leak/{ok=1} /^$/{n=0} END{exit !ok}' "$1"; }
else
	driver=("$TARGET/release/examples/heap_trace" --top 5 --)
	found() { awk '/^[0-9]+ blocks/{n=$1} /stress_leak/{if(n==38)ok=1} END{exit !ok}' "$1"; }
fi
now() { date +%s.%N; }
declare -A T C
for ((r = 1; r <= ROUNDS; r++)); do
	for b in fp nofp; do
		t0=$(now); /usr/bin/time -f "%U %S" -o "$OUT/quick.cpu" "$OUT/heap_stress_$b" "$N"; t1=$(now)
		T[untraced.$b]+="$(echo "$t1 - $t0" | bc -l) "
		C[untraced.$b]+="$(awk '{print $1 + $2}' "$OUT/quick.cpu") "
		t0=$(now); /usr/bin/time -f "%U %S" -o "$OUT/quick.cpu" "${driver[@]}" "$OUT/heap_stress_$b" "$N" >"$OUT/quick_$b.log" 2>&1; t1=$(now)
		T[preload.$b]+="$(echo "$t1 - $t0" | bc -l) "
		C[preload.$b]+="$(awk '{print $1 + $2}' "$OUT/quick.cpu") "
		found "$OUT/quick_$b.log" || echo "round $r $b: 38 leaks NOT found"
	done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for b in fp nofp; do
	u=$(echo "${T[untraced.$b]}" | median); p=$(echo "${T[preload.$b]}" | median)
	cu=$(echo "${C[untraced.$b]}" | median); cp=$(echo "${C[preload.$b]}" | median)
	printf '%-5s wall: untraced %.3f preload %.3f ratio %.2f | cpu: untraced %.2f preload %.2f ratio %.1f\n' \
		"$b" "$u" "$p" "$(echo "$p / $u" | bc -l)" "$cu" "$cp" "$(echo "$cp / ($cu + 0.005)" | bc -l)"
done
