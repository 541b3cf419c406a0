#!/usr/bin/env bash
# heap_overhead.sh - how much slower does a malloc-heavy program run under
# leakscope's preload backend, heaptrack, valgrind and memleak-bpfcc, and
# which of them find its 38 leaked blocks (stress_leak in heap_stress.c)?
#
# Usage: bench/heap_overhead.sh
#
# Environment:
#   N        malloc/free pairs per thread (default 1000000, 2 threads)
#   ROUNDS   interleaved rounds (default 5); medians are over rounds
#   CC       C compiler (default cc)
#   CARGO_TARGET_DIR  where the release shim and example are built
#            (default target/)
#
# heap_stress.c is built twice, with and without frame pointers. Each round
# runs, for both builds: untraced N | preload N | heaptrack N/10 |
# valgrind --leak-check=full N/100 | memleak-bpfcc N/100; each ratio is
# against an untraced run of the SAME size in the same round. "leaks" says
# whether the tool attributed 38 blocks to stress_leak. After the timed
# rounds, one more run of each tool per build, sampled every 20 ms through
# /proc (outside the timing), gives peak RSS: "target" is the process
# running heap_stress (with an in-process tool: its shim or valgrind's core
# included), "tracer" the sum of the peaks of the tool's other processes
# (leakscope's collector, heaptrack_interpret, memleak's python).
#
# leakscope's driver is $CARGO_TARGET_DIR/release/leakscope if it accepts
# `run --backend preload --track heap` (and DRIVER is not "example"), else
# the heap_trace example of leakscope-preload (which records every
# allocation with a full DWARF stack and keeps a table of live blocks).
# Missing tools are skipped with a line. Logs go to bench/out/ (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-1000000}
ROUNDS=${ROUNDS:-5}
N_HT=$(((N + 9) / 10))
N_SMALL=$(((N + 99) / 100))
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

for fp in fp nofp; do
	flag=-fno-omit-frame-pointer
	[[ $fp == nofp ]] && flag=-fomit-frame-pointer
	${CC:-cc} -std=gnu11 -g -O2 $flag -Wall -pthread -o "$OUT/heap_stress_$fp" "$ROOT/bench/heap_stress.c"
done

(cd "$ROOT" && cargo build -q --release -p leakscope-shim &&
	cargo build -q --release -p leakscope-preload --example heap_trace)
# The CLI must come from the same target directory as the shim: the shim
# and the collector linked into the CLI speak one wire version.
LS=$TARGET/release/leakscope
if [[ ${DRIVER:-auto} != example && -x $LS ]] &&
	"$LS" run --backend preload --track heap -- true >/dev/null 2>&1; then
	driver=("$LS" run --backend preload --track heap --format json --)
	found() { grep -q stress_leak "$1" && grep -q '"count": *38' "$1"; }
else
	echo "leakscope CLI has no preload backend yet: using the heap_trace example"
	driver=("$TARGET/release/examples/heap_trace" --top 5 --)
	# A group of 38 blocks whose frames include stress_leak.
	found() { awk '/^[0-9]+ blocks/{n=$1} /stress_leak/{if(n==38)ok=1} END{exit !ok}' "$1"; }
fi

have() { command -v "$1" >/dev/null || { echo "skipping $1: not installed"; return 1; }; }
tools=(untraced preload)
have heaptrack && have heaptrack_print && tools+=(heaptrack)
have valgrind && tools+=(valgrind)
if have memleak-bpfcc; then
	if [[ $(id -u) == 0 ]]; then tools+=(memleak); else echo "skipping memleak-bpfcc: needs root"; fi
fi

# run TOOL BUILD -> prints "seconds found" and logs to $OUT
run() {
	local tool=$1 b=$2 bin=$OUT/heap_stress_$2 log=$OUT/heap_$1_$2.log t0 t1 ok=-
	case $tool in
	untraced) t0=$(now); "$bin" "$N"; t1=$(now) ;;
	untraced_ht) t0=$(now); "$bin" "$N_HT"; t1=$(now) ;;
	untraced_small) t0=$(now); "$bin" "$N_SMALL"; t1=$(now) ;;
	preload)
		t0=$(now); "${driver[@]}" "$bin" "$N" >"$log" 2>&1; t1=$(now)
		found "$log" && ok=yes || ok=no ;;
	heaptrack)
		rm -f "$OUT"/heaptrack.heap_stress.*
		t0=$(now); heaptrack -o "$OUT/heaptrack.heap_stress.$b" "$bin" "$N_HT" >/dev/null 2>&1; t1=$(now)
		heaptrack_print --print-leaks=1 "$OUT"/heaptrack.heap_stress."$b"* >"$log" 2>&1 || true
		grep -A3 "leaked over 38 calls" "$log" | grep -q stress_leak && ok=yes || ok=no ;;
	valgrind)
		t0=$(now); valgrind --leak-check=full --show-leak-kinds=all "$bin" "$N_SMALL" >"$log" 2>&1; t1=$(now)
		# Sum the blocks of loss records (definitely lost, still reachable:
		# the last leak is still in a global) whose stack has stress_leak.
		awk '/blocks are/{for(i=1;i<=NF;i++)if($i=="blocks")m=$(i-1); gsub(",","",m)}
			/stress_leak/{if(m){s+=m;m=0}} END{exit s!=38}' "$log" && ok=yes || ok=no ;;
	memleak)
		"$bin" "$N_SMALL" &
		local pid=$!
		t0=$(now); timeout 60 memleak-bpfcc -p "$pid" >"$log" 2>&1 || true; t1=$(now)
		wait "$pid" || true
		grep -q stress_leak "$log" && ok=yes || ok=no ;;
	esac
	echo "$(echo "$t1 - $t0" | bc -l) $ok"
}

declare -A T F
for ((r = 1; r <= ROUNDS; r++)); do
	for b in fp nofp; do
		for tool in "${tools[@]}" untraced_ht untraced_small; do
			[[ $tool == untraced_ht && ! " ${tools[*]} " =~ " heaptrack " ]] && continue
			read -r s ok < <(run "$tool" "$b")
			T[$tool.$b]+="$s "
			F[$tool.$b]=$ok
		done
	done
	echo "round $r/$ROUNDS done"
done

# rss TOOL BUILD -> "tracer_kib target_kib"
rss() {
	local tool=$1 bin=$OUT/heap_stress_$2 pid tpid
	case $tool in
	untraced) "$bin" "$N" & pid=$! ;;
	preload) "${driver[@]}" "$bin" "$N" >/dev/null 2>&1 & pid=$! ;;
	heaptrack) heaptrack -o "$OUT/heaptrack.rss" "$bin" "$N_HT" >/dev/null 2>&1 & pid=$! ;;
	valgrind) valgrind --leak-check=full "$bin" "$N_SMALL" >/dev/null 2>&1 & pid=$! ;;
	memleak)
		"$bin" "$N_SMALL" & tpid=$!
		timeout 60 memleak-bpfcc -p "$tpid" >/dev/null 2>&1 & pid=$!
		peak_rss "$pid" '^(heap_stress|memcheck)' "$tpid"; wait "$pid" "$tpid" 2>/dev/null || true; return ;;
	esac
	peak_rss "$pid" '^(heap_stress|memcheck)'
	wait "$pid" 2>/dev/null || true
	rm -f "$OUT"/heaptrack.rss*
}
declare -A R
for b in fp nofp; do
	for tool in "${tools[@]}"; do
		R[$tool.$b]=$(rss "$tool" "$b")
	done
done

printf '\n%-10s %-5s %8s %10s %8s %11s %11s  %s\n' tool build n median_s ratio tracer_MiB target_MiB leaks
for b in fp nofp; do
	for tool in "${tools[@]}"; do
		base=untraced n=$N
		case $tool in heaptrack) base=untraced_ht n=$N_HT ;; valgrind | memleak) base=untraced_small n=$N_SMALL ;; esac
		m=$(echo "${T[$tool.$b]}" | median)
		mb=$(echo "${T[$base.$b]}" | median)
		read -r tr tg <<<"${R[$tool.$b]}"
		printf '%-10s %-5s %8s %10.3f %8.1f %11s %11s  %s\n' "$tool" "$b" "$n" "$m" "$(echo "$m / $mb" | bc -l)" \
			"$(mib "$tr")" "$(mib "$tg")" "${F[$tool.$b]}"
	done
done
echo "(memleak-bpfcc attaches after start; its wall time is its own run, not the program's;"
echo " a target gone before the first 20 ms sample shows as -)"
