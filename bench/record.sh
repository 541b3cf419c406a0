#!/usr/bin/env bash
# record.sh - what a recording costs (issue 12's targets): bytes written
# per hour while recording a busy balanced workload (target: < 1 MB/h),
# and the time `report` takes for a recording with 2^17 = 131072 unique
# stacks (target: < 5 s). Release build; heap through the preload shim,
# and fds through eBPF as well when run as root.
# Usage: bench/record.sh   (SECS=60 balanced run length, BITS=17 stacks,
#        COMMIT=10 seconds between commits, as record --commit-every)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
SECS=${SECS:-60}
BITS=${BITS:-17}
COMMIT=${COMMIT:-10}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -q -p leakscope -p leakscope-shim
L=$TARGET/release/leakscope
${CC:-cc} -std=gnu11 -g -O2 -o "$OUT/record_balanced" "$ROOT/bench/record_balanced.c"
${CC:-cc} -std=gnu11 -g -O2 -o "$OUT/record_stacks" "$ROOT/bench/record_stacks.c"

track=heap
((EUID == 0)) && track=fd,heap
# Two lengths: the difference is the steady rate, without the fixed part
# (header, stacks written once, the end).
size_of_run() {
	local rec=$OUT/balanced-$1.lsr
	"$L" record -o "$rec" --commit-every "$COMMIT" --track "$track" -- \
		"$OUT/record_balanced" "$1" >"$OUT/balanced-$1.out" 2>/dev/null
	stat -c %s "$rec"
}
one=$(size_of_run "$SECS")
two=$(size_of_run $((2 * SECS)))
echo "balanced ($track, $(cat "$OUT/balanced-$((2 * SECS)).out") in $((2 * SECS)) s," \
	"a commit every $COMMIT s): $one bytes after $SECS s, $two after $((2 * SECS)) s:" \
	"$(((two - one) * 3600 / SECS)) bytes per hour"
"$L" report "$OUT/balanced-$((2 * SECS)).lsr" 2>&1 | tail -2

rec=$OUT/stacks.lsr
"$L" record -o "$rec" --backend preload --track heap -- "$OUT/record_stacks" "$BITS" >/dev/null 2>&1
echo "stacks: $(stat -c %s "$rec") bytes for $((1 << BITS)) unique stacks"
for format in text json pprof; do
	start=$(date +%s.%N)
	"$L" report "$rec" --format "$format" -o "$OUT/stacks.$format" 2>/dev/null
	end=$(date +%s.%N)
	echo "report --format $format: $(echo "$end - $start" | bc) s"
done
