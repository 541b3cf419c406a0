#!/usr/bin/env bash
# ptrace_attach.sh - what `leakscope attach --backend ptrace` costs the
# process it is attached to, per syscall, beside `strace -f -p` (which, as
# leakscope, cannot add a seccomp filter to a running process, so every
# syscall stops the process twice).
#
# bench/syscall_cost.c times getppid(2) (not decoded by leakscope) and
# open+close pairs (decoded, with a stack copied per open) in rounds,
# untraced, under leakscope attach --backend ptrace and under strace -f -p
# -o /dev/null, interleaved; the workload starts once the tracer says it
# is attached. Prints the median of all rounds for each.
#
# Usage: bench/ptrace_attach.sh      (no root needed)
# Environment: RUNS (default 3), ROUNDS per run (default 5),
#              LEAKSCOPE (default target/release/leakscope), CC (default cc).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
ROUNDS=${ROUNDS:-5}
LS=${LEAKSCOPE:-target/release/leakscope}
[[ -x $LS ]] || { echo "build first: cargo build --release ($LS missing)" >&2; exit 1; }
OUT=bench/out
mkdir -p "$OUT"
"${CC:-cc}" -O2 -o "$OUT/syscall_cost" bench/syscall_cost.c
have_strace=1
command -v strace >/dev/null || { echo "skipping strace: not installed"; have_strace=0; }

# run TOOL: one run of syscall_cost under TOOL (none, leakscope, strace);
# its rounds are appended to $OUT/ptrace_attach.TOOL.
run() {
	local tool=$1 fifo="$OUT/ptrace_attach.fifo" pid work tracer=
	rm -f "$fifo"
	mkfifo "$fifo"
	: >"$OUT/ptrace_attach.err"
	rm -f "$OUT/ptrace_attach.run"
	"$OUT/syscall_cost" "$ROUNDS" <"$fifo" >"$OUT/ptrace_attach.run" &
	work=$!
	exec 7>"$fifo"
	# Its pid, once the whole line is there.
	until [[ -f $OUT/ptrace_attach.run && $(wc -l <"$OUT/ptrace_attach.run") -ge 1 ]]; do
		sleep 0.01
	done
	pid=$(head -1 "$OUT/ptrace_attach.run")
	case $tool in
	leakscope)
		"$LS" attach --backend ptrace -p "$pid" -o "$OUT/ptrace_attach.report" 2>"$OUT/ptrace_attach.err" &
		tracer=$!
		until grep -q '^Tracing' "$OUT/ptrace_attach.err" 2>/dev/null; do sleep 0.01; done
		;;
	strace)
		strace -f -p "$pid" -o /dev/null 2>"$OUT/ptrace_attach.err" &
		tracer=$!
		until grep -q 'attached' "$OUT/ptrace_attach.err" 2>/dev/null; do sleep 0.01; done
		;;
	esac
	echo go >&7
	exec 7>&-
	wait "$work"
	[[ -n $tracer ]] && { wait "$tracer" || true; }
	tail -n +2 "$OUT/ptrace_attach.run" >>"$OUT/ptrace_attach.$tool"
	rm -f "$fifo"
}

tools=(none leakscope)
((have_strace)) && tools+=(strace)
for t in "${tools[@]}"; do : >"$OUT/ptrace_attach.$t"; done
for ((r = 1; r <= RUNS; r++)); do
	for t in "${tools[@]}"; do run "$t"; done
	echo "run $r/$RUNS done"
done
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '\n%-34s %12s %16s\n' "per call (median of rounds)" "getppid us" "open+close us"
for t in "${tools[@]}"; do
	g=$(awk '{ print $2 }' "$OUT/ptrace_attach.$t" | median)
	o=$(awk '{ print $4 }' "$OUT/ptrace_attach.$t" | median)
	case $t in
	none) name="untraced" ;;
	leakscope) name="leakscope attach --backend ptrace" ;;
	strace) name="strace -f -p" ;;
	esac
	printf '%-34s %12.3f %16.3f\n' "$name" "$g" "$o"
done
