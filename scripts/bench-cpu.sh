#!/usr/bin/env bash
# The CPU benchmarks whose figures README.md and DESIGN.md quote, run one after
# the other (never two at once), each command's JSON (stdout) and log (stderr)
# kept under OUT with the date, commit, machine and load average of the run.
#   BIN_COMMIT=$(git rev-parse --short HEAD) bash scripts/bench-cpu.sh [OUT] [BIN] [DIR]
# (build BIN first: go build -o bin/hcache ./cmd/hcache; commit nothing while it runs)
set -euo pipefail
OUT=${1:-bench/results/cpu-$(date -u +%F)}
BIN=${2:-bin/hcache}
DIR=${3:-/tmp}
mkdir -p "$OUT"
run() { # name, args...
	local name=$1; shift
	{
		echo "date: $(date -u +%FT%TZ)"
		echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results' || echo ' (+ uncommitted changes)') (the checkout's HEAD now)"
		echo "binary: $BIN, sha256 $(sha256sum "$BIN" | cut -c1-16), built from ${BIN_COMMIT:-an unrecorded commit (set BIN_COMMIT)}"
		echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
		echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
		echo "command: hcache $*"
	} >"$OUT/$name.meta"
	local t0=$SECONDS
	"$BIN" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
	echo "seconds: $((SECONDS - t0))" >>"$OUT/$name.meta"
	echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/$name.meta"
	echo "$name done in $((SECONDS - t0)) s" >&2
}
for i in $(seq 1 "${PIPELINE_RUNS:-10}"); do
	run pipeline-$i bench pipeline --dir "$DIR" --json
done
run pipeline-plan-1-3-2 bench pipeline --dir "$DIR" --plan 1,3,2 --json
for i in 1 2 3; do
	run daemon-$i bench daemon --dir "$DIR" --model llama2-7b --tokens 512 --contexts 8 --rounds 4 --json
done
# bench io and bench store at sizes this machine measures in seconds (make
# bench runs 4 GiB and 16 x 4096 tokens); fio interleaved in the same runs.
for e in io_uring fallback; do
	for qd in 8 32; do
		run io-$e-qd$qd bench io --dir "$DIR" --size 1G --bs 1M --qd $qd --engine $e --sweep=false --json
	done
done
run store-llama2-7b-4x1024 bench store --dir "$DIR" --model llama2-7b --tokens 1024 --contexts 4 --sweep=false --json
