#!/bin/bash
# usage: run.sh COMMIT
cd /tmp/q2; mkdir -p res
B=/tmp/q2/hcache; C=$1
run() { local n=$1; shift
  { echo "command: hcache $*"; echo "binary: $B (main $C)"; echo "start: $(date -u +%FT%TZ) loadavg: $(cat /proc/loadavg)"; } > res/$n.meta
  $B "$@" > res/$n.json 2> res/$n.log; rc=$?
  echo "end: $(date -u +%FT%TZ) rc=$rc loadavg: $(cat /proc/loadavg)" >> res/$n.meta; }
run store-final-1 bench store --model llama2-7b --tokens 2048 --contexts 8 --sweep-runtime 1s --json
run codecs-final-1 bench store --codecs default --model llama2-7b --tokens 1024 --contexts 4 --rounds 3 --seed 1 --dir /tmp --json
run store-final-2 bench store --model llama2-7b --tokens 2048 --contexts 8 --sweep-runtime 1s --json
run compare-final-1 bench compare --model llama2-7b --workload long --concurrency 1,4,16,64 --warm 1G --sweep-runtime 1s --systems hcache,file-per-chunk,limit --out /tmp/q2/res/compare-final-1 --json
echo done > /tmp/q2/DONE
