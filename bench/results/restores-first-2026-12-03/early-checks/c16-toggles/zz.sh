#!/bin/bash
cd /tmp/s7; mkdir -p zzres
for i in 1; do
for cfg in both noearly nobg none; do
  env=""
  case $cfg in noearly) env="ZZNOEARLY=1";; nobg) env="ZZNOBG=1";; none) env="ZZNOEARLY=1 ZZNOBG=1";; esac
  echo "$cfg start $(date -u +%T) $(cat /proc/loadavg)" >> zzres/log
  env $env /tmp/s7/zz/hcache bench compare --model llama2-7b --workload long --concurrency 16 --warm 1G --sweep=false --systems hcache --out none --json > zzres/$cfg-$i.json 2> zzres/$cfg-$i.log
  echo "$cfg end $(date -u +%T) rc=$?" >> zzres/log
done
done
echo done >> zzres/log
