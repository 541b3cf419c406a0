#!/usr/bin/env bash
# heap_keep.sh - long-lived blocks: heap_keep.c builds N blocks, then frees
# them all (nothing is freed within the preload shim's flush window, so
# every event reaches leakscope's collector). Interleaved rounds of
# untraced, leakscope (preload), heaptrack and valgrind; median wall
# seconds, the ratio over the untraced run of the same size, and whether
# the 13 blocks of keep_leak were found.
# Usage: bench/heap_keep.sh   (N=2000000 ROUNDS=5; valgrind runs N/10)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-2000000}
ROUNDS=${ROUNDS:-5}
N_VG=$(((N + 9) / 10))
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
${CC:-cc} -std=gnu11 -g -O2 -Wall -o "$OUT/heap_keep" "$ROOT/bench/heap_keep.c"
(cd "$ROOT" && cargo build -q --release -p leakscope-shim -p leakscope)
LS=$TARGET/release/leakscope
have() { command -v "$1" >/dev/null || { echo "skipping $1: not installed"; return 1; }; }
tools=(untraced leakscope)
have heaptrack && have heaptrack_print && tools+=(heaptrack)
have valgrind && tools+=(valgrind)
now() { date +%s.%N; }
run() {
	local tool=$1 log=$OUT/keep_$1.log t0 t1 ok=-
	case $tool in
	untraced) t0=$(now); "$OUT/heap_keep" "$N"; t1=$(now) ;;
	untraced_vg) t0=$(now); "$OUT/heap_keep" "$N_VG"; t1=$(now) ;;
	leakscope)
		t0=$(now); "$LS" run --track heap --format json -o "$log" -- "$OUT/heap_keep" "$N"; t1=$(now)
		grep -q keep_leak "$log" && grep -q '"count": *13' "$log" && ok=yes || ok=no ;;
	heaptrack)
		rm -f "$OUT"/heaptrack.keep.*
		t0=$(now); heaptrack -o "$OUT/heaptrack.keep" "$OUT/heap_keep" "$N" >/dev/null 2>&1; t1=$(now)
		heaptrack_print --print-leaks=1 "$OUT"/heaptrack.keep* >"$log" 2>&1 || true
		grep -A3 "leaked over 13 calls" "$log" | grep -q keep_leak && ok=yes || ok=no ;;
	valgrind)
		t0=$(now); valgrind --leak-check=full "$OUT/heap_keep" "$N_VG" >"$log" 2>&1; t1=$(now)
		grep -B1 -A6 "in 13 blocks" "$log" | grep -q keep_leak && ok=yes || ok=no ;;
	esac
	echo "$(echo "$t1 - $t0" | bc -l) $ok"
}
declare -A T F
for ((r = 1; r <= ROUNDS; r++)); do
	for tool in "${tools[@]}" untraced_vg; do
		read -r s ok < <(run "$tool")
		T[$tool]+="$s "
		F[$tool]=$ok
	done
	echo "round $r/$ROUNDS done"
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '\n%-10s %8s %10s %8s  %s\n' tool n median_s ratio leaks
for tool in "${tools[@]}"; do
	base=untraced n=$N
	[[ $tool == valgrind ]] && base=untraced_vg n=$N_VG
	m=$(echo "${T[$tool]}" | median)
	mb=$(echo "${T[$base]}" | median)
	printf '%-10s %8s %10.3f %8.1f  %s\n' "$tool" "$n" "$m" "$(echo "$m / $mb" | bc -l)" "${F[$tool]}"
done
