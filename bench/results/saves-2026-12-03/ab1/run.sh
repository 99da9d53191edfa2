#!/bin/bash
# A/B/C: new (branch s20 at 12683ba), nowhole (12683ba with whole-segment preallocation disabled),
# old (main 7c7f605); interleaved, order reversed every other round.
OUT=$1; N=${2:-3}
mkdir -p $OUT
CMD="bench store --model llama2-7b --tokens 2048 --contexts 8 --sweep-runtime 1s --json"
declare -A DESC=([new]="branch s20 at 12683ba" [nowhole]="12683ba with chunk/alloc.go's whole-segment preallocation disabled (if false &&): the bench of the branch, segments grown from 1 MiB as on main" [old]="main 7c7f605")
one() { # side round
  local side=$1 r=$2 bin=/tmp/s20/hcache-$1
  local f=$OUT/store-$side-$r
  { echo "command: hcache $CMD --dir /tmp/s20/bd"; echo "binary: $bin (${DESC[$side]})"; echo "start: $(date -u +%FT%TZ) loadavg: $(cat /proc/loadavg)"; } > $f.meta
  $bin $CMD --dir /tmp/s20/bd > $f.json 2> $f.log
  local rc=$?
  echo "end: $(date -u +%FT%TZ) rc=$rc loadavg: $(cat /proc/loadavg)" >> $f.meta
}
for r in $(seq 1 $N); do
  if [ $((r % 2)) = 1 ]; then one new $r; one nowhole $r; one old $r; else one old $r; one nowhole $r; one new $r; fi
done
