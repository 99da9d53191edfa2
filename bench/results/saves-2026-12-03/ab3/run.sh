#!/bin/bash
# new3 (branch s20 at 7f65a42: + syncfs before timed steps) vs old (main 7c7f605): new3, old, new3.
OUT=$1
mkdir -p $OUT
CMD="bench store --model llama2-7b --tokens 2048 --contexts 8 --sweep-runtime 1s --json"
declare -A DESC=([new3]="branch s20 at 7f65a42" [old]="main 7c7f605")
one() { # side round
  local side=$1 r=$2 bin=/tmp/s20/hcache-$1
  local f=$OUT/store-$side-$r
  { echo "command: hcache $CMD --dir /tmp/s20/bd"; echo "binary: $bin (${DESC[$side]})"; echo "start: $(date -u +%FT%TZ) loadavg: $(cat /proc/loadavg)"; } > $f.meta
  $bin $CMD --dir /tmp/s20/bd > $f.json 2> $f.log
  local rc=$?
  echo "end: $(date -u +%FT%TZ) rc=$rc loadavg: $(cat /proc/loadavg)" >> $f.meta
}
one new3 1; one old 1; one new3 2
