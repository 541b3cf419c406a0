# lib.sh - helpers the benchmark scripts source.

# Seconds since the epoch, with ns.
now() { date +%s.%N; }

# The median of the numbers on stdin (blank-separated or one per line).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

# $1 and every process below it.
tree() {
	echo "$1"
	local c
	for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done
}

# Peak RSS (KiB) while the tree under $1 runs, sampled every 20 ms:
# "tracer target". Processes whose command name matches the extended
# regex $2 (or whose pid is $3) are the target (the largest one counts);
# the others' peaks are summed as the tracer (timeout(1) excluded).
peak_rss() {
	local root=$1 target_re=$2 target_pid=${3:-} tmax=0 gmax=0 sum p comm hwm
	while kill -0 "$root" 2>/dev/null; do
		sum=0
		for p in $(tree "$root") $target_pid; do
			comm=$(cat /proc/"$p"/comm 2>/dev/null) || continue
			hwm=$(awk '/^VmHWM/{print $2}' /proc/"$p"/status 2>/dev/null)
			[[ -n $hwm ]] || continue
			if [[ $comm =~ $target_re || $p == "$target_pid" ]]; then
				((hwm > gmax)) && gmax=$hwm
			elif [[ $comm != timeout ]]; then
				sum=$((sum + hwm))
			fi
		done
		((sum > tmax)) && tmax=$sum
		sleep 0.02
	done
	echo "$tmax $gmax"
}

# KiB as MiB with one decimal, "-" for 0 (never sampled).
mib() { if (($1 > 0)); then printf '%.1f' "$(echo "$1 / 1024" | bc -l)"; else echo -; fi; }
