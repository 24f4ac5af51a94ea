#!/usr/bin/env bash
# Runs every fuzz target of the plugin for FUZZTIME each and prints, per
# target, the outcome and the number of executions.
#
#   scripts/fuzz.sh                  # 10s per target
#   FUZZTIME=5s scripts/fuzz.sh      # the CI variant
#   FUZZTIME=60s scripts/fuzz.sh backend/alor backend/chatapp
#
# Environment:
#   FUZZTIME       time per target (a Go duration, or Nx for N executions); default 10s
#   FUZZ_PARALLEL  fuzzing workers per target; default: Go's (GOMAXPROCS)
#   FUZZ_MATCH     only targets whose name matches this regexp
#   FUZZMINIMIZETIME  time to minimise each new input (default 2s; Go's own
#                  default of 60s can eat a whole short run on one large input)
#
# A target that fails prints the property that broke; Go writes the input
# that broke it to testdata/fuzz/<Target>/ in its package (commit it as a
# regression once the bug is fixed). Every target runs even if one fails;
# the exit status is non-zero if any failed. A FLAKE is Go's coordinator
# failing a target at the end of -fuzztime with no failing input
# (go.dev/issue/75804, Go < 1.27): shown, and not counted as a failure.
set -u -o pipefail

cd "$(dirname "$0")/.."
FUZZTIME="${FUZZTIME:-10s}"
FUZZ_PARALLEL="${FUZZ_PARALLEL:-}"
FUZZ_MATCH="${FUZZ_MATCH:-.}"
FUZZMINIMIZETIME="${FUZZMINIMIZETIME:-2s}"
GO="${GO:-go}"

if [ $# -gt 0 ]; then
	pkgs=()
	for p in "$@"; do pkgs+=("./${p#./}"); done
else
	# Every package under backend/ (the generic backend, the provider seam,
	# the HTTP layer and one package per broker): a broker added to the
	# registry is fuzzed without touching this list. Packages with no fuzz
	# target are skipped below.
	pkgs=()
	while IFS= read -r dir; do
		pkgs+=("./${dir#"$PWD"/}")
	done < <("$GO" list -f '{{.Dir}}' ./backend/...)
fi

parallel=()
[ -n "$FUZZ_PARALLEL" ] && parallel=(-parallel "$FUZZ_PARALLEL")

logdir="$(mktemp -d "${TMPDIR:-/tmp}/broker-fuzz.XXXXXX")"
start=$(date +%s)
failed=0
total_execs=0
rows=()

for pkg in "${pkgs[@]}"; do
	if ! targets=$("$GO" test -list '^Fuzz' "$pkg" 2>"$logdir/list.err" | grep '^Fuzz' | grep -E -- "$FUZZ_MATCH"); then
		if [ -s "$logdir/list.err" ]; then
			echo "!! $pkg: cannot list fuzz targets:" >&2
			cat "$logdir/list.err" >&2
			failed=1
		fi
		continue
	fi
	for t in $targets; do
		log="$logdir/${pkg//\//_}.$t.log"
		t0=$(date +%s)
		printf '== %-22s %-22s ' "${pkg#./}" "$t"
		"$GO" test -run '^$' -fuzz "^${t}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime "$FUZZMINIMIZETIME" "${parallel[@]}" "$pkg" >"$log" 2>&1
		rc=$?
		secs=$(( $(date +%s) - t0 ))
		# The last progress line holds the totals:
		#   fuzz: elapsed: 10s, execs: 123456 (12345/sec), new interesting: 12 (total: 40)
		line=$(grep -E '^fuzz: elapsed: .*execs: ' "$log" | tail -1)
		execs=$(sed -nE 's/.*execs: ([0-9]+).*/\1/p' <<<"$line")
		# elapsed is 59s, 1m0s, 2m30s, ...
		fuzzed=$(sed -nE 's/^fuzz: elapsed: (([0-9]+)m)?([0-9]+)s.*/\2 \3/p' <<<"$line" | awk '{ if (NF == 2) print $1 * 60 + $2; else print $1 }')
		interesting=$(sed -nE 's/.*new interesting: ([0-9]+).*/\1/p' <<<"$line")
		execs=${execs:-0}
		rate=-
		[ "${fuzzed:-0}" -gt 0 ] && rate=$(( execs / fuzzed ))
		total_execs=$(( total_execs + execs ))
		if [ $rc -eq 0 ]; then
			result=PASS
		elif grep -q '^    context deadline exceeded$' "$log" && ! grep -qE 'Failing input written|fuzz_test.go:[0-9]+:|panic:' "$log"; then
			# Go's fuzz coordinator can fail a target when -fuzztime ends
			# while a worker is busy (go.dev/issue/75804, fixed in Go 1.27):
			# no input failed and none was written. Shown, not counted.
			result=FLAKE
		else
			result=FAIL
			failed=1
		fi
		printf '%-5s %10s execs %8s/s  new interesting %-5s %4ss\n' "$result" "$execs" "$rate" "${interesting:--}" "$secs"
		rows+=("$(printf '%-22s %-22s %-5s %10s' "${pkg#./}" "$t" "$result" "$execs")")
		if [ "$result" = FAIL ]; then
			# What broke, and where Go kept the input.
			grep -E -- '--- FAIL|fuzz_test.go:[0-9]+:|Failing input written|panic:|error:|cannot|undefined' "$log" | head -12 | sed 's/^/     /'
		fi
	done
done

elapsed=$(( $(date +%s) - start ))
echo
echo "Summary (FUZZTIME=$FUZZTIME${FUZZ_PARALLEL:+, $FUZZ_PARALLEL worker(s)}):"
printf '%-22s %-22s %-5s %10s\n' package target res execs
printf '%s\n' "${rows[@]}"
echo "total: ${#rows[@]} targets, $total_execs execs, ${elapsed}s; logs in $logdir"
exit $failed
