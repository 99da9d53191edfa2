#!/usr/bin/env bash
# The GPU checks, in one call on a machine with a GPU and no Go toolchain:
# `make gpu-bundle` builds bin/hcache here; this script runs there (from the
# repository root) and builds nothing. It writes its results under $OUT when
# set (else ./gpu-results), and prints a short table (table.md).
#
# The whole script keeps within BUDGET seconds (default 540, ~9 minutes on
# an H200): each step has its own timeout, cut to what is left of the budget,
# and a step that would start with under 30 s left is skipped (logged). Steps
# run in order of importance; SKIP="name ..." leaves steps out. Estimates on
# an H200 (16 cores, 1.9 GB/s disk), in order:
#   check      ~30 s  (90)   `hcache gpu check`: every preset shape against the CPU reference
#   lanes      ~30 s  (90)   `hcache gpu lanes` (what the lanes and fp8 on the device need a GPU
#                            to show; not yet run on one): llama2-7b's first $LANES_LAYERS layers
#                            (hidden, then KV), through serve from a store. (a) fp8 and fp8-block
#                            contexts of $LANES_CODEC_TOKENS tokens decoded on the device (the copy
#                            moves the fp8 bytes) against decoded on the host (bit-exact) and the
#                            CPU backend (hidden within the projection's tolerance, KV exact);
#                            (b) N = lanes and 2x lanes restores of $LANES_TOKENS tokens at once,
#                            each against its restore alone, timed against N in turn
#   mixed      ~20 s  (120)  `hcache gpu mixed`: the device recompute against the CPU forward pass,
#                            and mixed plans (recomputed prefix, hidden, KV) restored from a store
#                            through serve's pipeline against the all-KV restore
#   profile    ~70 s  (180)  `hcache profile --backend cuda` (issue 18): hcache's own device recompute,
#                            hidden and KV restores and PCIe copy of llama2-7b at $PLAN_TOKENS and the
#                            disk's read speed; written to $OUT/$PROFILE_NAME.json (commit it as
#                            profiles/$PROFILE_NAME.json: `bench gpu --plan` then plans with it)
#   plans      ~150 s (300)  `hcache bench gpu --plan all` (issue 18): llama2-7b contexts of $PLAN_TOKENS
#                            tokens stored under the scheduled plan (the measured profile when the
#                            profile step made one, else h200-nvme), all-hidden, all-KV and
#                            all-recompute on this disk, restored through serve's pipeline, interleaved;
#                            beside the recompute rows, PyTorch's prefill of the same 32 layers
#                            (scripts/torch_prefill.py: eager, SDPA, fp16, CUDA events).
#                            Targets: scheduled <= 0.9x the best other at 4K and 16K; hcache's
#                            recompute <= 1.3x PyTorch's.
#   save-lib   ~10 s  (60)   `hcache gpu save-check` (issue 24): the library's device save path
#   save-check ~240 s (240)  scripts/gpu-save-check.sh (issue 24, the Python Saver through hcached), OUT=$OUT/save
#   llama2-7b  ~40 s  (120)  `hcache bench gpu` from pinned memory: copy-only, hidden, KV (3 rounds)
#   disk       ~10 s  (60)   `hcache bench io`: the disk with hcache's io_uring engine
#   codec-fp8  ~20 s  (90)   `hcache bench gpu --codec fp8` (issue 23)
#   llama3-8b  ~30 s  (120)  `hcache bench gpu` for GQA at $GQA_TOKENS (3 rounds)
# (To make room for lanes: llama2-7b and llama3-8b time 3 rounds instead of
# 5, and llama3-8b leaves out 1024 tokens: GQA_TOKENS=4096,16384.)
# (The earlier from-store step is superseded by `plans`, which restores
# from a store at every token count.) None of the issue-18 steps has run on
# a GPU before this script's first run: see their logs.
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
BUDGET=${BUDGET:-540}
PLAN_TOKENS=${PLAN_TOKENS:-1024,4096,16384}
PROFILE_NAME=${PROFILE_NAME:-h200-measured}
STORE=${STORE_DIR:-/tmp}
SKIP=${SKIP:-}
# A smoke run without a GPU: BACKEND=cpu PLAN_MODEL=demo-llama PLAN_TOKENS=64,128 READ_BYTES=8M
# LANES_TOKENS=64 SKIP="check mixed save-lib save-check llama2-7b disk codec-fp8 llama3-8b" (the lanes, profile and
# plans steps on the CPU).
BACKEND=${BACKEND:-cuda}
PLAN_MODEL=${PLAN_MODEL:-llama2-7b}
READ_BYTES=${READ_BYTES:-2G}
LANES_MODEL=${LANES_MODEL:-$PLAN_MODEL}
LANES_LAYERS=${LANES_LAYERS:-4}
LANES_TOKENS=${LANES_TOKENS:-1024}
LANES_CODEC_TOKENS=${LANES_CODEC_TOKENS:-128}
GQA_TOKENS=${GQA_TOKENS:-4096,16384}
TORCH_DEVICE=${TORCH_DEVICE:-$([ "$BACKEND" = cuda ] && echo cuda || echo cpu)}
TORCH_PYTHON=${TORCH_PYTHON:-}
if [ -z "$TORCH_PYTHON" ]; then
	for p in /usr/bin/python3 python3; do
		if "$p" -c 'import torch' 2>/dev/null; then TORCH_PYTHON=$p; break; fi
	done
fi
echo "torch python: ${TORCH_PYTHON:-none}" | tee -a "$OUT/discovery.txt"
rc=0
: >"$OUT/steps.txt"
step() { # name, timeout seconds, command...
	local name=$1 to=$2; shift 2
	local left=$((BUDGET - SECONDS))
	if [[ " $SKIP " == *" $name "* ]]; then
		echo "== $name: skipped (SKIP)" >&2; echo "$name skipped SKIP" >>"$OUT/steps.txt"; return
	fi
	if [ "$left" -lt 30 ]; then
		echo "== $name: skipped, $left s of the $BUDGET s budget left" >&2
		echo "$name skipped budget" >>"$OUT/steps.txt"; rc=1; return
	fi
	[ "$to" -gt "$left" ] && to=$left
	echo "== $name (timeout $to s, $left s of the budget left): $*" >&2
	local t0=$SECONDS
	timeout -k 10 "$to" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"; local r=$?
	echo "== $name: exit $r in $((SECONDS - t0)) s" >&2
	echo "$name exit $r $((SECONDS - t0))s" >>"$OUT/steps.txt"
	tail -n 20 "$OUT/$name.log" >&2
	[ $r -eq 0 ] || rc=1
}
step check 90 "$BIN" gpu check --tokens 200 --json
step lanes 90 "$BIN" gpu lanes --backend "$BACKEND" --model "$LANES_MODEL" --layers "$LANES_LAYERS" --tokens "$LANES_TOKENS" \
	--codec-tokens "$LANES_CODEC_TOKENS" --reps 3 \
	--dir "$STORE" --json
step mixed 120 "$BIN" gpu mixed --tokens 200 --dir "$STORE" --json
# Issue 18: the measured device profile, then the plans benchmark with it.
step profile 180 "$BIN" profile --backend "$BACKEND" --model "$PLAN_MODEL" --tokens "$PLAN_TOKENS" --rounds 3 --read-bytes "$READ_BYTES" \
	--dir "$STORE" --name "$PROFILE_NAME" --out "$OUT/$PROFILE_NAME.json" --json
PROF=h200-nvme
if [ -s "$OUT/$PROFILE_NAME.json" ] && "$BIN" plan --profile "$OUT/$PROFILE_NAME.json" --model "$PLAN_MODEL" --tokens 4096 >/dev/null 2>&1; then
	PROF=$OUT/$PROFILE_NAME.json
fi
# The splits each profile plans (no GPU needed), for the table.
for pf in h200-nvme "$OUT/$PROFILE_NAME.json"; do
	[ "$pf" = h200-nvme ] || [ -s "$pf" ] || continue
	for t in ${PLAN_TOKENS//,/ }; do
		"$BIN" plan --profile "$pf" --model "$PLAN_MODEL" --tokens "$t" --json 2>&1 | tr -d '\n'; echo
	done
done >"$OUT/plan-splits.jsonl"
torch_args=()
[ -n "$TORCH_PYTHON" ] && torch_args=(--torch scripts/torch_prefill.py --torch-python "$TORCH_PYTHON" --torch-device "$TORCH_DEVICE" --torch-reps 5)
step plans 300 "$BIN" bench gpu --model "$PLAN_MODEL" --backend "$BACKEND" --plan all --from-store "$STORE" --tokens "$PLAN_TOKENS" --reps 3 \
	--profile "$PROF" "${torch_args[@]}" --json
# Issue 24, the library's device save path: rows written on the caller's
# stream behind queued work, saved by hcache's copy stream, checked bit for
# bit and flushed; SaveToken against a synchronous copy (< 10 s expected).
step save-lib 60 "$BIN" gpu save-check --dir "$STORE" --json
if [ -f scripts/gpu-save-check.sh ]; then
	mkdir -p "$OUT/save"
	step save-check 240 env OUT="$OUT/save" bash scripts/gpu-save-check.sh
fi
step llama2-7b 120 "$BIN" bench gpu --model llama2-7b --tokens "$TOKENS" --reps 3 --json
# The disk's read bandwidth with hcache's io_uring engine (fio is not
# installed on the GPU machines; it is used where it is).
step disk 60 "$BIN" bench io --dir "$STORE" --size 2G --bs 1M --qd 32 --rounds 1 $(command -v fio >/dev/null || echo --no-fio) --json
step codec-fp8 90 "$BIN" bench gpu --codec fp8 --model llama2-7b --tokens "$TOKENS" --reps 5 --json
step llama3-8b 120 "$BIN" bench gpu --model llama3-8b --tokens "$GQA_TOKENS" --reps 3 --json
python3 - "$OUT" "$PROFILE_NAME" <<'PY' | tee "$OUT/table.md"
import json, sys, os
out, prof_name = sys.argv[1], sys.argv[2]
def load(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)
try:
    steps = open(os.path.join(out, "steps.txt")).read().split("\n")
    print("steps: " + "; ".join(x for x in steps if x))
except Exception as e:
    print(f"steps: {e}")
# Issue 18: the plans, their targets, the PyTorch baseline.
print("\n## issue 18: restores from this disk, plans interleaved\n")
try:
    rows = load("plans.json")
    print("| tokens | plan | r/h/kv | restore ms median [min-max] | predicted ms | device ms | disk GB/s | unwritten | vs | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r["restore_ms_spread"]
        vs, target = "", ""
        if r.get("over_best"):
            ob = r["over_best"]
            vs = "%.3fx best other [%.3f-%.3f]" % (ob["median"], ob["min"], ob["max"])
            if r["tokens"] >= 4096:
                target = ("PASS" if ob["median"] <= r["over_best_target"] else "FAIL") + " <= %.2f" % r["over_best_target"]
        if r.get("torch_ms"):
            ts = r["torch_ms_spread"]
            vs = "torch %.2f ms [%.2f-%.2f], %.3fx" % (r["torch_ms"], ts["min"], ts["max"], r["over_torch"])
            target = ("PASS" if r["over_torch"] <= r["over_torch_target"] else "FAIL") + " <= %.2f" % r["over_torch_target"]
        elif r.get("torch_error"):
            vs = "torch failed: " + r["torch_error"][:120]
        print(f"| {r['tokens']} | {r['plan']} | {r['recomputed']}/{r['hidden']}/{r['kv']} | {r['restore_ms']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}] | {r['predicted_ms']:.2f} | {r['device_ms']:.2f} | {r['disk_gbps']:.2f} | {r['unwritten']} | {vs} | {target} |")
    if rows:
        print(f"\nprofile of the scheduled plan: {rows[0]['profile']}; device {rows[0]['device']}")
except Exception as e:
    print(f"plans: failed: {e}")
try:
    print("\nplans each profile makes (hcache plan):")
    for line in open(os.path.join(out, "plan-splits.jsonl")):
        try:
            d = json.loads(line)
            sp = d["split"]
            print(f"  {d['profile']:14s} {d['tokens']:6d} tokens: recompute {sp['recompute']}, hidden {sp['hidden']}, kv {sp['kv']}, predicted {d['predicted_ms']:.1f} ms (all KV {d['all_kv_ms']:.1f}, all hidden {d['all_hidden_ms']:.1f})")
        except Exception as e:
            print(f"  ? {line.strip()[:160]}")
except Exception as e:
    print(f"  failed: {e}")
try:
    p = load(prof_name + ".json")
    print(f"\nmeasured profile {p['name']} ({p['backend']}): disk {p['storage_tiers'][0]['read_gbps']['value']:.2f} GB/s, h2d {p['h2d_gbps']['value']:.1f} GB/s, effective {p['gemm_tflops']['value']:.0f} TFLOP/s")
    for i, pt in enumerate(p["recompute"]["points"]):
        print(f"  {pt['tokens']:6d} tokens, all layers: recompute {pt['ms']:.2f} ms, hidden restore {p['project']['points'][i]['ms']:.2f} ms, kv restore {p['kv_load']['points'][i]['ms']:.2f} ms")
    print(f"  (commit {out}/{prof_name}.json as profiles/{prof_name}.json)")
except Exception as e:
    print(f"\nmeasured profile: failed: {e}")
print("\n## restores from pinned host memory\n")
print("| model | tokens | rounds | h2d GB/s | copy-only ms | hidden ms | kv ms | hidden/copy median [min-max] | hidden/kv median [min-max] | max_rel_err | unwritten | kv exact |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("llama2-7b", "llama3-8b"):
    try:
        rows = load(name + ".json")
    except Exception as e:
        print(f"| {name} | failed: {e} |"); continue
    for r in rows:
        g = lambda k: r.get(k, "")
        sp = lambda k: "%.3f [%.3f-%.3f]" % (r[k]["median"], r[k]["min"], r[k]["max"]) if k in r else ""
        print(f"| {g('model')} | {g('tokens')} | {g('rounds')} | {g('h2d_gbps'):.1f} | {g('copy_only_ms'):.2f} | {g('hidden_ms'):.2f} | {g('kv_ms'):.2f} | {sp('hidden_over_copy_spread')} | {sp('hidden_over_kv_spread')} | {g('max_rel_err'):.1e} | {g('unwritten')} | {g('kv_exact')} |")
try:
    d = load("disk.json")
    print(f"\ndisk (bench io, {d.get('engine')}, bs {d.get('bs')}, qd {d.get('qd')}): read {d.get('read_gbps', 0):.2f} GB/s, write {d.get('write_gbps', 0):.2f} GB/s")
except Exception as e:
    print(f"disk: failed: {e}")
try:
    c = load("check.json")
    print(f"\ngpu check: {len(c['checks'])} preset shapes, {c['failed']} failed")
    for r in c["checks"]:
        print(f"  {r['preset']:18s} {r['dtype']:9s} max_rel_err {r['max_rel_err']:.2e} max_abs_err {r['max_abs_err']:.2e} unwritten {r['unwritten']} kv_exact {r['kv_exact']} ok {r['ok']}")
except Exception as e:
    print(f"gpu check: failed: {e}")
try:
    c = load("lanes.json")
    print(f"\ngpu lanes: {c['model']} {c['layers']} layers (hidden/kv {c['plan']}), {c['tokens']} tokens (codec check {c['codec_tokens']}) on {c['device']}, {c['lanes']} lanes, {c['failed']} failed")
    for r in c["codecs"]:
        print(f"  {r['codec']:9s} on device {r['decoded_on_device']} copied {r['copied_bytes']} B (host-decoded {r['host_decoded_bytes']} B) exact vs host decode {r['exact_vs_host_decode']} (max err {r['max_rel_err_vs_host_decode']:.1e}) vs cpu: hidden {r['hidden_rel_err_vs_cpu']:.1e} (tol {r['hidden_tolerance']:.0e}) kv exact {r['kv_exact_vs_cpu']} ok {r['ok']} {r.get('error', '')}")
    for r in c["concurrency"]:
        q = r["concurrent_over_sequential"]
        print(f"  {r['n']:2d} at once: equal to alone {r['equal']} {r.get('mismatched') or ''}; at once {r['concurrent_ms']:.2f} ms, in turn {r['sequential_ms']:.2f} ms, {q['median']:.3f}x [{q['min']:.3f}-{q['max']:.3f}] ({r['bytes_read']} B) ok {r['ok']} {r.get('error', '')}")
except Exception as e:
    print(f"gpu lanes: failed: {e}")
try:
    c = load("mixed.json")
    print(f"\ngpu mixed: {len(c['checks'])} presets, {c['failed']} failed")
    for r in c["checks"]:
        errs = " ".join("%.1e/%.0e" % (e, t) for e, t in zip(r.get("layer_rel_err") or [], r.get("tolerance") or []))
        print(f"  {r['preset']:18s} {r['dtype']:9s} plan {r['plan']} recompute {r['recompute_max_rel_err']:.2e} layers(err/tol) {errs} kv_exact {r['kv_exact']} same_next {r['same_next']} ok {r['ok']} {r.get('error', '')}")
except Exception as e:
    print(f"gpu mixed: failed: {e}")
PY
exit $rc
