#!/bin/bash
# Interleaved A/B: old = main 299e3a2 (before this session), new = main NEWC.
cd /tmp/s7; mkdir -p res
NEWC=$(cat /tmp/s7/newc)
run() { local n=$1 which=$2; shift 2
  local B=/tmp/s7/$which/hcache C=299e3a2
  [ $which = new ] && C=$NEWC
  { echo "command: hcache $*"; echo "binary: $B (main $C)"; echo "start: $(date -u +%FT%TZ) loadavg: $(cat /proc/loadavg)"; } > res/$n.meta
  $B "$@" > res/$n.json 2> res/$n.log; rc=$?
  echo "end: $(date -u +%FT%TZ) rc=$rc loadavg: $(cat /proc/loadavg)" >> res/$n.meta; }
for i in 1 2 3; do
  for w in new old; do
    run c1-$w-$i $w bench compare --model llama2-7b --workload long --concurrency 1 --warm 1G --sweep-runtime 1s --systems hcache,limit --out /tmp/s7/res/c1-$w-$i --json
  done
done
for i in 1 2; do
  for w in new old; do
    run store-$w-$i $w bench store --model llama2-7b --tokens 2048 --contexts 8 --sweep-runtime 1s --json
  done
done
run c16-new-1 new bench compare --model llama2-7b --workload long --concurrency 1,16 --warm 1G --sweep-runtime 1s --systems hcache,file-per-chunk,limit --out /tmp/s7/res/c16-new-1 --json
echo done > /tmp/s7/res/DONE
