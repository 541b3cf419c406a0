#!/usr/bin/env bash
# fd_overhead.sh - how much slower does an fd-heavy program run under
# leakscope, strace and valgrind, and which of them find its 7 leaks?
#
# Usage: bench/fd_overhead.sh [stress|realistic|sweep|all]  (default: all)
#
# Environment:
#   N          cycles per thread of bench/fd_stress.c (default 200000; each
#              cycle is 9 fd syscalls, 2 threads: 18*N syscalls per run)
#   ROUNDS     interleaved rounds (default 5); medians are over rounds
#   BUDGET     seconds the stress mode may take (default 240); if round 1
#              shows that ROUNDS rounds would not fit, fewer are run (said so)
#   RATE       fd syscalls/s in realistic mode (default 10000)
#   N_REAL     cycles per thread in realistic mode (default 1000, ~1.8 s)
#   SWEEP_ROUNDS  interleaved rounds per point in sweep mode (default 3)
#   SWEEP_SCALE   multiplies the cycles of every sweep point (default 1)
#   LEAKSCOPE  leakscope binary (default target/release/leakscope, then
#              $CARGO_TARGET_DIR/release/leakscope)
#   CC         C compiler (default cc)
#
# stress mode: one run interleaves the tools round by round (A B C D A B C D
# ...) so drift (thermal, other load) hits them all alike:
#   untraced N | leakscope run --track fd --format json N | strace N/40 |
#   strace -k N/400 | valgrind --track-fds=yes N/40
# strace and valgrind are too slow for N cycles, so they run fewer cycles;
# each ratio is against an untraced run of the SAME size, timed in the same
# round. "leaks" says whether the tool reported the 7 fds from stress_leak():
# for leakscope, a JSON object mentioning stress_leak with a count field of 7;
# for valgrind, "Open file descriptor" blocks whose stack has stress_leak;
# strace prints no leak report (n/a).
#
# sweep mode: the workload's shape swept, untraced vs leakscope only: the
# syscall mix (FD_MIX: open, socket, pipe, dup, all) times the fds each
# thread keeps open (FD_LIVE: 0, 256, 4096, 16384; fds that live long
# outgrow what the kernel side holds back, 4096, and each becomes an event
# with its stack stored). Prints a ratio per point, whether the 7 leaks
# were found exactly with no events lost, and the worst point.
#
# realistic mode: the same program paced to RATE fd syscalls/s (a busy but
# ordinary server), untraced vs leakscope only; reports wall time and CPU
# time (user+sys of the program and, for leakscope, of leakscope itself).
#
# Tools that are not installed are skipped with a line saying so. Logs of
# every run go to bench/out/ (git-ignored).
set -euo pipefail

MODE=${1:-all}
case $MODE in stress | realistic | sweep | all) ;; *)
	echo "usage: $0 [stress|realistic|sweep|all]" >&2
	exit 2
	;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
N=${N:-200000}
ROUNDS=${ROUNDS:-5}
BUDGET=${BUDGET:-240}
RATE=${RATE:-10000}
N_REAL=${N_REAL:-1000}
N_SMALL=$(((N + 39) / 40))
N_TINY=$(((N + 399) / 400))

# --- build -----------------------------------------------------------------
STRESS=$OUT/fd_stress
${CC:-cc} -std=c11 -g -O2 -fno-omit-frame-pointer -Wall -Wextra -pthread \
	-o "$STRESS" "$ROOT/bench/fd_stress.c"

# --- tools -----------------------------------------------------------------
LS=${LEAKSCOPE:-}
if [[ -z $LS ]]; then
	LS=$ROOT/target/release/leakscope
	if [[ ! -x $LS && -n ${CARGO_TARGET_DIR:-} ]]; then
		LS=$CARGO_TARGET_DIR/release/leakscope
	fi
fi
have_leakscope=1 have_strace=1 have_valgrind=1
if [[ ! -x $LS ]]; then
	echo "skipping leakscope: $LS not found (cargo build --release, or set LEAKSCOPE)"
	have_leakscope=0
elif [[ $(id -u) != 0 ]]; then
	echo "skipping leakscope: needs root for eBPF"
	have_leakscope=0
fi
command -v strace >/dev/null || {
	echo "skipping strace: not installed"
	have_strace=0
}
command -v valgrind >/dev/null || {
	echo "skipping valgrind: not installed"
	have_valgrind=0
}

# --- helpers ---------------------------------------------------------------
# timed LABEL ROUND CMD...: runs CMD with stdout/stderr in $OUT/LABEL.ROUND.*
# and appends "wall cpu" to $OUT/LABEL.times. A failing command is reported
# and its time still recorded.
timed() {
	local label=$1 round=$2
	shift 2
	local base=$OUT/$label.$round rc=0
	local TIMEFORMAT='%R %U %S'
	{ time "$@" >"$base.out" 2>"$base.err"; } 2>"$base.time" || rc=$?
	if ((rc != 0)); then
		echo "  $label round $round: exit status $rc (see $base.err)" >&2
	fi
	awk '{ printf "%s %.3f\n", $1, $2 + $3 }' "$base.time" >>"$OUT/$label.times"
}

# median COLUMN FILE
median() {
	sort -g -k"$1","$1" "$2" | awk -v c="$1" '{ v[NR] = $c }
		END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2];
		      else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }

# leakscope_found FILE: did the JSON report have stress_leak with count 7?
leakscope_found() {
	local f=$1
	if [[ ! -s $f ]]; then
		echo "no output"
	elif command -v python3 >/dev/null; then
		python3 - "$f" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except ValueError:
    print("bad json"); sys.exit()
def named(g):
    return [f.get("function") for f in g["stack"]]
hits = [g for g in r["leaks"] if "stress_leak" in named(g)]
others = sum(g["count"] for g in r["leaks"] if g not in hits)
n = sum(g["count"] for g in hits)
full = all("main" in named(g) for g in hits)
lost = r["events"]["lost"]
verdict = "yes (7)" if n == 7 else f"stress_leak count {n}"
if not full: verdict += ", stack misses main"
if others: verdict += f", {others} other leaks"
if lost: verdict += f", {lost} events lost"
print(verdict)
EOF
	else
		echo "unknown (no jq or python3)"
	fi
}

# valgrind_found FILE: "Open file descriptor" blocks with stress_leak.
valgrind_found() {
	local n
	n=$(awk '/Open file descriptor/ { inblk = 1; next }
		inblk && /stress_leak/ { n++; inblk = 0 }
		inblk && /== *$/ { inblk = 0 }
		END { print n + 0 }' "$1")
	if ((n == 7)); then echo "yes (7)"; else echo "no ($n)"; fi
}

row() { printf '%-26s %8s %9s %9s %8s  %s\n' "$@"; }

# --- stress mode -------------------------------------------------------------
run_stress() {
	echo
	echo "== stress: 2 threads x N cycles x 9 fd syscalls (open/close, socket/close,"
	echo "   pipe2/close/close, dup/close); N=$N, strace/valgrind N=$N_SMALL, strace -k N=$N_TINY"
	rm -f "$OUT"/*.times
	local round=1 rounds=$ROUNDS start first
	start=$(date +%s.%N)
	while ((round <= rounds)); do
		echo "round $round/$rounds ..."
		timed untraced $round "$STRESS" "$N"
		if ((have_leakscope)); then
			timed leakscope $round "$LS" run --track fd --format json -o - -- "$STRESS" "$N"
		fi
		if ((have_strace || have_valgrind)); then
			timed untraced_small $round "$STRESS" "$N_SMALL"
		fi
		if ((have_strace)); then
			timed strace $round strace -f -e trace=%desc,%net -o /dev/null "$STRESS" "$N_SMALL"
			timed untraced_tiny $round "$STRESS" "$N_TINY"
			timed strace_k $round strace -f -k -e trace=%desc,%net -o /dev/null "$STRESS" "$N_TINY"
		fi
		if ((have_valgrind)); then
			timed valgrind $round valgrind --track-fds=yes --log-file="$OUT/valgrind.$round.log" \
				"$STRESS" "$N_SMALL"
		fi
		if ((round == 1)); then
			first=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')
			local fit
			fit=$(awk -v f="$first" -v b="$BUDGET" 'BEGIN { n = int(b / f); print n < 1 ? 1 : n }')
			if ((fit < rounds)); then
				echo "round 1 took ${first%.*} s; running $fit round(s) instead of $rounds to stay within BUDGET=${BUDGET}s"
				rounds=$fit
			fi
		fi
		round=$((round + 1))
	done

	local base_n base_s base_t
	base_n=$(median 1 "$OUT/untraced.times")
	echo
	row tool cycles "wall(s)" "untraced" ratio "found the 7 stress_leak fds"
	row untraced "$N" "$base_n" "$base_n" 1.0x "-"
	if ((have_leakscope)); then
		local t
		t=$(median 1 "$OUT/leakscope.times")
		row "leakscope run" "$N" "$t" "$base_n" "$(ratio "$t" "$base_n")" \
			"$(leakscope_found "$OUT/leakscope.1.out")"
	fi
	if ((have_strace)); then
		base_s=$(median 1 "$OUT/untraced_small.times")
		base_t=$(median 1 "$OUT/untraced_tiny.times")
		t=$(median 1 "$OUT/strace.times")
		row "strace -f" "$N_SMALL" "$t" "$base_s" "$(ratio "$t" "$base_s")" "n/a (no leak report)"
		t=$(median 1 "$OUT/strace_k.times")
		row "strace -f -k" "$N_TINY" "$t" "$base_t" "$(ratio "$t" "$base_t")" \
			"n/a (stack per syscall, no leak report)"
	fi
	if ((have_valgrind)); then
		base_s=$(median 1 "$OUT/untraced_small.times")
		t=$(median 1 "$OUT/valgrind.times")
		row "valgrind --track-fds=yes" "$N_SMALL" "$t" "$base_s" "$(ratio "$t" "$base_s")" \
			"$(valgrind_found "$OUT/valgrind.1.log")"
	fi
	echo "(medians over $rounds round(s); ratio = tool / untraced run of the same size)"
}

# --- realistic mode ----------------------------------------------------------
run_realistic() {
	echo
	echo "== realistic: the same cycles paced to $RATE fd syscalls/s, N=$N_REAL"
	if ((!have_leakscope)); then
		echo "skipping realistic mode: needs leakscope"
		return
	fi
	rm -f "$OUT"/real_*.times
	local round
	for ((round = 1; round <= ROUNDS; round++)); do
		timed real_untraced $round "$STRESS" "$N_REAL" "$RATE"
		timed real_leakscope $round "$LS" run --track fd --format json -o - -- "$STRESS" "$N_REAL" "$RATE"
	done
	local bw bc lw lc
	bw=$(median 1 "$OUT/real_untraced.times")
	bc=$(median 2 "$OUT/real_untraced.times")
	lw=$(median 1 "$OUT/real_leakscope.times")
	lc=$(median 2 "$OUT/real_leakscope.times")
	echo
	printf '%-16s %8s %8s %8s %8s  %s\n' tool "wall(s)" ratio "cpu(s)" ratio "found the 7 fds"
	printf '%-16s %8s %8s %8s %8s  %s\n' untraced "$bw" 1.0x "$bc" 1.0x "-"
	printf '%-16s %8s %8s %8s %8s  %s\n' "leakscope run" "$lw" "$(ratio "$lw" "$bw")" \
		"$lc" "$(ratio "$lc" "$bc")" "$(leakscope_found "$OUT/real_leakscope.1.out")"
	echo "(medians over $ROUNDS rounds; cpu = user+sys of the program and of leakscope)"
}

# --- sweep mode --------------------------------------------------------------
run_sweep() {
	echo
	echo "== sweep: syscall mix x fds kept open per thread, untraced vs leakscope run --track fd"
	if ((!have_leakscope)); then
		echo "skipping sweep mode: needs leakscope"
		return
	fi
	# 2 threads x 16384 live fds (a pipe cycle adds two at a time).
	ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
	local rounds=${SWEEP_ROUNDS:-3} scale=${SWEEP_SCALE:-1}
	local lives=(0 256 4096 16384)
	if (($(ulimit -n) < 2 * 16384 + 64)); then
		lives=(0 256 4096 8192)
		echo "(fd limit $(ulimit -n): the largest live set is 8192 per thread)"
	fi
	# Cycles per point: about half a second untraced on the machine we used.
	declare -A cycles=([open]=100000 [socket]=25000 [pipe]=50000 [dup]=150000 [all]=15000)
	printf '%-7s %6s %8s %9s %9s %7s  %s\n' mix live cycles "untraced" leakscope ratio "found the 7 fds"
	local worst="" worst_ratio=0 mix live n round t b r found
	for mix in open socket pipe dup all; do
		for live in "${lives[@]}"; do
			n=$(awk -v c="${cycles[$mix]}" -v s="$scale" 'BEGIN { printf "%d", c * s }')
			rm -f "$OUT"/sweep_*.times
			for ((round = 1; round <= rounds; round++)); do
				FD_MIX=$mix FD_LIVE=$live timed sweep_untraced $round "$STRESS" "$n"
				FD_MIX=$mix FD_LIVE=$live timed sweep_leakscope $round \
					"$LS" run --track fd --format json -o - -- "$STRESS" "$n"
			done
			b=$(median 1 "$OUT/sweep_untraced.times")
			t=$(median 1 "$OUT/sweep_leakscope.times")
			r=$(ratio "$t" "$b")
			found=$(leakscope_found "$OUT/sweep_leakscope.1.out")
			printf '%-7s %6s %8s %9s %9s %7s  %s\n' "$mix" "$live" "$n" "$b" "$t" "$r" "$found"
			if awk -v a="${r%x}" -v w="$worst_ratio" 'BEGIN { exit !(a > w) }'; then
				worst_ratio=${r%x}
				worst="$mix, $live live fds per thread: ${r}"
			fi
		done
	done
	echo "worst point: $worst"
	echo "(medians over $rounds interleaved round(s) per point; ratio = leakscope / untraced)"
}

case $MODE in
stress) run_stress ;;
realistic) run_realistic ;;
sweep) run_sweep ;;
all)
	run_stress
	run_realistic
	run_sweep
	;;
esac
