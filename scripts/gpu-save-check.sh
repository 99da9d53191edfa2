#!/usr/bin/env bash
# Issue 24 on a machine with a GPU and no Go toolchain: an engine saves
# device rows through hcached (hcache_client.Saver). `make gpu-bundle` builds
# bin/hcached here; this script runs there from the repository root, builds
# nothing, writes raw results under $OUT (else ./gpu-save-results): four
# files (the device tool brings back at most 8), save-bench.json,
# save-kill.json, save-table.md (discovery and the table it prints) and
# save.log (every log). About 3 minutes. Steps:
#   1. discovery: the GPU, python3's torch / grpc / protobuf / numpy
#   2. test_saver.py against hcached: the Saver's checks, CUDA tensors
#      included (round trips bit for bit through the registered region)
#   3. kill: test_saver.py --engine --device cuda is SIGKILLed with copies
#      and appends in flight, hcached too; after a restart every context
#      restores its acknowledged tokens, bit for bit, and no more than handed
#   4. torch_engine.py --mode bench: a Llama2-7B-shaped model (fp16, random
#      weights) generating at batch 1 and 8 without and with saving;
#      targets: mean time between tokens with saving <= 1.04x without, p99
#      <= 1.10x
# Environment: HCACHED_BIN (default bin/hcached), HCACHE_TORCH_PYTHON (else
# the first of python3, /usr/bin/python3 with torch and grpc), STORE_DIR
# (default /tmp), STEPS (128), REPS (3); DEVICE (cuda), SHAPE (llama2-7b) and
# DTYPE (float16) only to try the script without a GPU (cpu, tiny, float32).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-save-results}
mkdir -p "$OUT"
DAEMON=${HCACHED_BIN:-bin/hcached}
STEPS=${STEPS:-128}
REPS=${REPS:-3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-llama2-7b}
DTYPE=${DTYPE:-float16}
[ -x "$DAEMON" ] || { echo "no $DAEMON: run 'make gpu-bundle' on a machine with Go, and carry bin/"; exit 2; }
PY=
for p in ${HCACHE_TORCH_PYTHON:-} python3 /usr/bin/python3; do
	if "$p" -c 'import torch, grpc, numpy, google.protobuf' 2>/dev/null; then PY=$p; break; fi
done
[ -n "$PY" ] || { echo "no python3 with torch, grpc, numpy and protobuf"; exit 2; }
export PYTHONUNBUFFERED=1
{
	date -u
	nvidia-smi -L 2>&1 || true
	echo "python: $(command -v "$PY")"
	"$PY" -c 'import sys, torch, grpc, numpy, google.protobuf as pb; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "grpc", grpc.__version__, "protobuf", pb.__version__, "numpy", numpy.__version__)' 2>&1
	nproc; uptime
} | tee "$OUT/save-table.md"
LOG=$OUT/save.log
: >"$LOG"
log() { echo "== $*" | tee -a "$LOG" >&2; }

SD=$(mktemp -d /tmp/hcs.XXXXXX)
STORE=$(mktemp -d "${STORE_DIR:-/tmp}/hcache-save-store.XXXXXX")
SOCK=$SD/s.sock
DPID=
start_daemon() { # store dir
	"$DAEMON" --dir "$1" --listen "unix://$SOCK" --metrics "" >>"$LOG" 2>&1 &
	DPID=$!
	for _ in $(seq 300); do
		"$PY" -c "import sys; sys.path.insert(0, 'clients/python'); import hcache_client as hc; hc.Client('unix://$SOCK').info()" 2>/dev/null && return 0
		kill -0 "$DPID" 2>/dev/null || { echo "hcached exited:"; tail -n 20 "$LOG"; return 1; }
		sleep 0.1
	done
	echo "hcached did not come up"; return 1
}
stop_daemon() { # signal
	[ -n "$DPID" ] || return 0
	kill -"$1" "$DPID" 2>/dev/null
	wait "$DPID" 2>/dev/null
	DPID=
}
cleanup() { stop_daemon KILL; rm -rf "$SD" "$STORE"; }
trap cleanup EXIT
rc=0
start_daemon "$STORE" || exit 1

# 2. The Saver's checks, with CUDA tensors where torch sees the GPU.
log test_saver
timeout 150 "$PY" clients/python/test_saver.py --addr "unix://$SOCK" >"$SD/test_saver.log" 2>&1 || rc=1
cat "$SD/test_saver.log" >>"$LOG"
tail -n 4 "$SD/test_saver.log" >&2

# 3. SIGKILL an engine saving CUDA rows (3 contexts, flush every 7 steps,
# appends slowed 3 ms in its background thread), after its 4th
# acknowledgement and 3 more steps handed, then the daemon; restart; verify.
log kill
KSEED=$((RANDOM * 32768 + RANDOM))
"$PY" clients/python/test_saver.py --engine --device "$DEVICE" --addr "unix://$SOCK" --seed "$KSEED" --contexts 3 --prefill 40 \
	--steps 60 --flush-every 7 --slow 0.003 --region 65536 >"$SD/engine.out" 2>>"$LOG" &
EPID=$!
for _ in $(seq 600); do
	acks=$(grep -c '^ACK' "$SD/engine.out" 2>/dev/null)
	if [ "${acks:-0}" -ge 4 ] && [ "$(awk '/^ACK/{n=0; next} /^HANDING/{n++} END{print n+0}' "$SD/engine.out")" -ge 3 ]; then break; fi
	kill -0 "$EPID" 2>/dev/null || break
	sleep 0.005
done
kill -KILL "$EPID" 2>/dev/null
wait "$EPID" 2>/dev/null
{ echo "-- the killed engine's output"; cat "$SD/engine.out"; } >>"$LOG"
stop_daemon KILL
start_daemon "$STORE" || exit 1
ACKED=$(grep '^ACK' "$SD/engine.out" | tail -n 1 | cut -d' ' -f2- | tr ' ' ',')
HANDED=$(grep '^HANDING' "$SD/engine.out" | tail -n 1 | cut -d' ' -f3)
if grep -q '^DONE' "$SD/engine.out" || [ -z "$ACKED" ]; then
	echo "kill: the engine was not killed in flight (see save.log)" | tee "$OUT/save-kill.json" >&2
	rc=1
else
	timeout 60 "$PY" clients/python/test_saver.py --verify --addr "unix://$SOCK" --seed "$KSEED" --contexts 3 \
		--acked "$ACKED" --handed "$HANDED" >"$OUT/save-kill.json" 2>>"$LOG" || rc=1
	cat "$OUT/save-kill.json" >&2
fi

# 4. Time between tokens, without and with saving.
log bench
timeout 300 "$PY" clients/python/torch_engine.py --mode bench --addr "unix://$SOCK" --device "$DEVICE" --shape "$SHAPE" \
	--dtype "$DTYPE" --batch 1,8 --prompt 128 --steps "$STEPS" --reps "$REPS" --region-mb 512 \
	>"$OUT/save-bench.json" 2>"$SD/bench.log" || rc=1
cat "$SD/bench.log" >>"$LOG"
tail -n 5 "$SD/bench.log" >&2
stop_daemon TERM
"$PY" - "$OUT" <<'PY' | tee -a "$OUT/save-table.md"
import json, os, sys
out = sys.argv[1]
try:
    r = json.load(open(os.path.join(out, "save-bench.json")))
    print(f"{r['shape']} {r['dtype']} on {r['gpu']}, saver {r['saver_mode']}, prompt {r['prompt']}, {r['steps']} steps x {r['reps']} reps")
    print("| batch | no save mean ms | save mean ms | mean ratio (<= 1.04) | no save p99 ms | save p99 ms | p99 ratio (<= 1.10) | steady mean / p99 ratio | per-rep mean ratios | flush s | durable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in r["batches"]:
        n, s = b["nosave"], b["save"]
        st = "%.3f / %.3f" % (b["steady_mean_ratio"], b["steady_p99_ratio"]) if b.get("steady_mean_ratio") else ""
        print(f"| {b['batch']} | {n['mean_ms']:.2f} | {s['mean_ms']:.2f} | {b['mean_ratio']:.3f} | {n['p99_ms']:.2f} | {s['p99_ms']:.2f} | {b['p99_ratio']:.3f} | {st} | "
              + " ".join("%.3f" % x for x in b["mean_ratio_per_rep"]) + f" | {' '.join('%.2f' % x for x in b['flush_s'])} | {b['durable_tokens_ok']} |")
    print("steady: without each run's first 8 decode steps, while the prefill's rows are still being sent")
    print(f"targets met: {r['pass']}; saver: {r['saver']}")
except Exception as e:
    print(f"bench: failed: {e}")
try:
    k = json.load(open(os.path.join(out, "save-kill.json")))
    print(f"kill: acknowledged {k['acked']}, handed {k['handed']}, restored {k['restored']}, ok {k['ok']} {k['errors']}")
except Exception as e:
    print(f"kill: failed: {e}")
PY
exit $rc
