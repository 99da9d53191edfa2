#!/bin/bash
cd /tmp/q3
run() { local n=$1 B=$2 C=$3; shift 3
  { echo "command: hcache $*"; echo "binary: $B (main $C)"; echo "start: $(date -u +%FT%TZ) loadavg: $(cat /proc/loadavg)"; } > res/$n.meta
  $B "$@" > res/$n.json 2> res/$n.log; rc=$?
  echo "end: $(date -u +%FT%TZ) rc=$rc loadavg: $(cat /proc/loadavg)" >> res/$n.meta; }
for i in 1 2; do
run c1-new-$i /tmp/q2/hcache 386a6cd bench compare --model llama2-7b --workload long --concurrency 1 --warm 1G --sweep-runtime 1s --systems hcache,limit --out /tmp/q3/res/c1-new-$i --json
run c1-old-$i /tmp/q/hcache 7c7f605 bench compare --model llama2-7b --workload long --concurrency 1 --warm 1G --sweep-runtime 1s --systems hcache,limit --out /tmp/q3/res/c1-old-$i --json
done
echo done > /tmp/q3/DONE
