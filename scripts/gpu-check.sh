#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a GPU and no Go toolchain:
# `make gpu-bundle` builds bin/hcache here; this script runs there (from the
# repository root) and builds nothing. It writes its results under $OUT when
# set (else ./gpu-results), and prints a short table.
#   1. device and library discovery
#   2. `hcache gpu check`: every preset shape against the CPU reference
#   3. `hcache bench gpu` for llama2-7b (MHA) and llama3-8b (GQA)
#   4. one --from-store run (a store on this machine's disk, read through the
#      store's pinned restore buffers)
#   5. `hcache gpu mixed`: the device recompute against the CPU forward pass,
#      and mixed plans (recomputed prefix, hidden, KV) restored from a store
#      through serve's pipeline against the all-KV restore (never run on a
#      GPU before this script's first run: see its log)
#   6. `hcache bench gpu --codec fp8`: one hidden layer's fp8 copy plus the
#      device dequantize (hc_fp8_dequant) against the fp16 copy, checked
#      against state/codec (issue 23; never run on a GPU before this script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
BIN=${HCACHE_BIN:-bin/hcache}
TOKENS=${TOKENS:-1024,4096,16384}
[ -x "$BIN" ] || { echo "no $BIN: run 'make gpu-bundle' on a machine with Go, and carry bin/"; exit 2; }
{
	date -u
	nvidia-smi -L 2>&1 || true
	nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 || true
	ldconfig -p 2>/dev/null | grep -E 'libcuda.so.1|libcublas.so' || true
} | tee "$OUT/discovery.txt"
# Where PyTorch keeps cuBLAS, as a fallback if hcache's own search misses it.
if [ -z "${HCACHE_CUBLAS:-}" ]; then
	lib=$(python3 -c 'import os, nvidia.cublas as m; d=os.path.join(list(m.__path__)[0], "lib"); print(next((os.path.join(d, f) for f in sorted(os.listdir(d), reverse=True) if f.startswith("libcublas.so.1")), ""))' 2>/dev/null || true)
	echo "python's cuBLAS: ${lib:-none}" | tee -a "$OUT/discovery.txt"
	if ! "$BIN" gpu check --tokens 8 >/dev/null 2>&1 && [ -n "$lib" ]; then export HCACHE_CUBLAS=$lib; fi
fi
rc=0
step() { # name, command...
	local name=$1; shift
	echo "== $name: $*" >&2
	local t0=$SECONDS
	"$@" >"$OUT/$name.json" 2>"$OUT/$name.log"; local r=$?
	echo "== $name: exit $r in $((SECONDS - t0)) s" >&2
	tail -n 20 "$OUT/$name.log" >&2
	[ $r -eq 0 ] || rc=1
}
step check timeout 90 "$BIN" gpu check --tokens 200 --json
step llama2-7b timeout 150 "$BIN" bench gpu --model llama2-7b --tokens "$TOKENS" --reps 9 --json
step llama3-8b timeout 150 "$BIN" bench gpu --model llama3-8b --tokens "$TOKENS" --reps 9 --json
# The disk's read bandwidth with hcache's io_uring engine (fio is not
# installed on the GPU machines; it is used where it is).
step disk timeout 60 "$BIN" bench io --dir "${STORE_DIR:-/tmp}" --size 2G --bs 1M --qd 32 --rounds 1 $(command -v fio >/dev/null || echo --no-fio) --json
step from-store timeout 120 "$BIN" bench gpu --model llama2-7b --tokens 4096 --reps 2 --from-store "${STORE_DIR:-/tmp}" --json
step mixed timeout 120 "$BIN" gpu mixed --tokens 200 --dir "${STORE_DIR:-/tmp}" --json
step codec-fp8 timeout 90 "$BIN" bench gpu --codec fp8 --model llama2-7b --tokens "$TOKENS" --reps 5 --json
python3 - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, sys, os
out = sys.argv[1]
print("| model | tokens | rounds | h2d GB/s | copy-only ms | hidden ms | kv ms | hidden/copy median [min-max] | hidden/kv median [min-max] | max_rel_err | unwritten | kv exact | store hidden ms | store kv ms | store read GB/s | fio read GB/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("llama2-7b", "llama3-8b", "from-store"):
    p = os.path.join(out, name + ".json")
    try:
        rows = json.load(open(p))
    except Exception as e:
        print(f"| {name} | failed: {e} |"); continue
    for r in rows:
        g = lambda k: r.get(k, "")
        f = lambda k: ("%.2f" % r[k]) if k in r else ""
        sp = lambda k: "%.3f [%.3f-%.3f]" % (r[k]["median"], r[k]["min"], r[k]["max"]) if k in r else ""
        print(f"| {g('model')} | {g('tokens')} | {g('rounds')} | {g('h2d_gbps'):.1f} | {g('copy_only_ms'):.2f} | {g('hidden_ms'):.2f} | {g('kv_ms'):.2f} | {sp('hidden_over_copy_spread')} | {sp('hidden_over_kv_spread')} | {g('max_rel_err'):.1e} | {g('unwritten')} | {g('kv_exact')} | {f('store_hidden_ms')} | {f('store_kv_ms')} | {f('store_read_gbps')} | {f('fio_read_gbps')} |")
try:
    d = json.load(open(os.path.join(out, "disk.json")))
    print(f"\ndisk (bench io, {d.get('engine')}, bs {d.get('bs')}, qd {d.get('qd')}): read {d.get('read_gbps', 0):.2f} GB/s, write {d.get('write_gbps', 0):.2f} GB/s")
except Exception as e:
    print(f"disk: failed: {e}")
try:
    c = json.load(open(os.path.join(out, "check.json")))
    print(f"\ngpu check: {len(c['checks'])} preset shapes, {c['failed']} failed")
    for r in c["checks"]:
        print(f"  {r['preset']:18s} {r['dtype']:9s} max_rel_err {r['max_rel_err']:.2e} max_abs_err {r['max_abs_err']:.2e} unwritten {r['unwritten']} kv_exact {r['kv_exact']} ok {r['ok']}")
except Exception as e:
    print(f"gpu check: failed: {e}")
try:
    c = json.load(open(os.path.join(out, "mixed.json")))
    print(f"\ngpu mixed: {len(c['checks'])} presets, {c['failed']} failed")
    for r in c["checks"]:
        errs = " ".join("%.1e/%.0e" % (e, t) for e, t in zip(r.get("layer_rel_err") or [], r.get("tolerance") or []))
        print(f"  {r['preset']:18s} {r['dtype']:9s} plan {r['plan']} recompute {r['recompute_max_rel_err']:.2e} layers(err/tol) {errs} kv_exact {r['kv_exact']} same_next {r['same_next']} ok {r['ok']} {r.get('error', '')}")
except Exception as e:
    print(f"gpu mixed: failed: {e}")
PY
exit $rc
