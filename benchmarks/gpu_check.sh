#!/usr/bin/env bash
# Issue 13's GPU check, one script, ~7 minutes on an H100/H200 (run from anywhere; it cd's to the repo):
#   bash benchmarks/gpu_check.sh [PEERS]     # BATCH=128 REPEATS=10 by default; PY=python3
# Prints, in bfloat16 on CUDA, each side timed interleaved (medians; kernels per call beside):
#   0. a check: the varlen kernel's output and dq against float64 grouped SDPA (nested SDPA if it fails), and
#      which kernel the compiled path calls (one graph for three sets of lengths, as eager to rounding);
#      the compile stages print compiled-vs-eager output differences, the peer stage ours-vs-peer ones;
#   1. DC-DiT-S (N=4, ~25% of tokens kept; the CUDA varlen kernel) vs DiT-S/2 training step: MACs/s of
#      DC-DiT over DiT's (target >= 0.95), the same for the forward; the varlen kernel vs nested SDPA;
#   2. with PEERS (a folder laid out by ../shared/peer-bench/setup_peers.sh): ours vs the original DiT and
#      the official DC-DiT code, batch 8 and 64 (benchmarks/gpu_peers.py);
#   3. eager vs compiled (DiffusionTransformer.compile = True): DiT-S/2 (one full graph) and DC-DiT-S
#      (dynamic shapes), training step and forward; the DiT-S/2 training step against the bf16 matmul;
#   4. stage 1's DC-DiT-S vs DiT-S/2 pairs with both models compiled (compiled_vs).
# Offline machines: put the project's wheel and its missing dependencies' wheels in .whl/ (pip wheel /
# pip download); they are installed into /tmp/site. Otherwise pip installs the project (editable).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BATCH=${BATCH:-128}
REPEATS=${REPEATS:-10}
OUT=${OUT:-/tmp/dyncompute_gpu_check}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BATCH=2 REPEATS=1 checks the plumbing without a GPU
PEERS=${1:-}
STAGES=${STAGES:-throughput peers compile_dit roofline compile_dcdit compiled_vs}  # a subset reruns only those
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then  # dependencies from .whl/; the project editable (else its wheel)
  deps=$(ls .whl/*.whl | grep -v "/dyncompute-")
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $deps \
    >"$OUT/pip.log" 2>&1 || { echo "installing .whl/ failed (see $OUT/pip.log)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 \
    || $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/dyncompute-*.whl >>"$OUT/pip.log" 2>&1 \
    || { echo "installing the project failed (see $OUT/pip.log)"; exit 1; }
else
  $PY -m pip install -q -e . >"$OUT/pip.log" 2>&1 || { echo "pip install -e . failed (see $OUT/pip.log)"; exit 1; }
fi
$PY -c "import dyncompute_plugins, dyncompute; print('project from', dyncompute_plugins.__file__)"

timeout 150 $PY - "$DEVICE" <<'PY' 2>&1 | tee "$OUT/checks.log"
import sys
import torch
from dyncompute import attention
from dyncompute.attention import grouped_sdpa, varlen_attention
from dyncompute.tokens import Tokens
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}")
kernel = attention.VARLEN["kernel"]
print(f"varlen kernel: {kernel.__module__ + '.' + kernel.__name__ if callable(kernel) else kernel}")
lengths = [64, 17, 100, 64, 3, 250]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(sum(lengths), 6, 64, generator=g, dtype=torch.float64) for _ in range(3))
ref = grouped_sdpa(q, k, v, lengths)
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tok = Tokens.from_lengths(torch.zeros(sum(lengths), 1, device=device), lengths, torch.zeros(sum(lengths), 2, device=device))
qd, kd, vd = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
out = varlen_attention(qd, kd, vd, tok)
err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
out.float().square().sum().backward()
qr = q.clone().requires_grad_()
grouped_sdpa(qr, k, v, lengths).square().sum().backward()
gerr = ((qd.grad.double().cpu() - qr.grad).norm() / qr.grad.norm()).item()
print(f"varlen attention vs float64: output rel err {err:.1e}, dq rel err {gerr:.1e} ({dtype})")
if not (err < 2e-2 and gerr < 5e-2):
    print("VARLEN CHECK FAILED: falling back to nested SDPA")
    sys.exit(3)
# the compiled path: which attention kernel its graph calls, and no recompilation for new lengths
graphs = []
def backend(gm, example_inputs):
    graphs.append(str(gm.graph))
    return gm.forward
run = torch.compile(varlen_attention, dynamic=True, backend=backend)
for i, lens in enumerate(([64, 17, 100, 3, 250], [31, 200, 90], [120, 5, 77, 260])):  # B != 6 heads (duck sizing)
    T = sum(lens)
    t = Tokens.from_lengths(torch.zeros(T, 1, device=device), lens, torch.zeros(T, 2, device=device))
    a, b, c = (torch.randn(T, 6, 64, generator=g).to(device, dtype) for _ in range(3))
    with torch._dynamo.config.patch(error_on_recompile=i > 0):
        got = run(a, b, c, t)
    d = ((got.float() - varlen_attention(a, b, c, t).float()).norm() / got.float().norm()).item()
    print(f"compiled varlen attention, lengths {lens}: rel diff to eager {d:.1e}")
op = "torch_attn._varlen_attn" if "torch_attn._varlen_attn" in graphs[0] else "dyncompute.grouped_sdpa"
print(f"compiled graphs: {len(graphs)} for 3 sets of lengths, attention by {op}")
PY
[ "${PIPESTATUS[0]}" = 3 ] && export DYNCOMPUTE_VARLEN=nested

bench() {  # name, time limit (s), cases and args...
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name"
  timeout "$limit" $PY -m dyncompute.cli bench "$@" --device "$DEVICE" --repeats "$REPEATS" --warmup 3 \
      --out "$OUT/$name.csv" 2>"$OUT/$name.err" | grep -v -e "^wrote" -e "^ *case " -e "^ *[a-z_]* *[A-Z]" \
    || echo "   ($name stopped: exit $?, see $OUT/$name.err)"
}
bench throughput 110 dcdit_vs_dit_train dcdit_vs_dit dcdit_backbone_vs_dit dcdit_varlen_kernel --arg batch="$BATCH"
if [ -n "$PEERS" ] && [[ " $STAGES " == *" peers "* ]]; then
  echo "== peers"
  cp benchmarks/peer_stub/flash_attn.py "$PEERS/stub/flash_attn/__init__.py"
  timeout 200 $PY benchmarks/gpu_peers.py "$PEERS" --device "$DEVICE" --out "$OUT/peers.csv" \
    2>"$OUT/peers.err" | grep -v -e USDT -e "^wrote" || echo "   (peers stopped: exit $?, see $OUT/peers.err)"
fi
bench compile_dit 80 dit_compile --arg batch="$BATCH"
bench roofline 40 dit_train_step --arg batch="$BATCH"
bench compile_dcdit "${COMPILE_DCDIT_S:-100}" dcdit_compile --arg batch="$BATCH"
bench compiled_vs "${COMPILED_VS_S:-150}" dcdit_vs_dit_train dcdit_vs_dit --arg batch="$BATCH" --arg compile=True

$PY - "$OUT" <<'PY'
import sys
from pathlib import Path
import pandas as pd
rows = [pd.read_csv(p) for p in sorted(Path(sys.argv[1]).glob("*.csv")) if p.stat().st_size > 1]
if not rows:
    sys.exit("no results")
df = pd.concat(rows)
print("\n== summary (bf16 on CUDA, fp32 on CPU; ms are medians per call)")
for _, r in df.iterrows():
    line = f"{r['case']:24s} {r['subject']} {r['subject_ms']:.2f} ms vs {r['reference']} {r['reference_ms']:.2f} ms"
    if r["case"].startswith("dcdit_vs_dit"):
        line += f" | MACs/s ratio {r['mac_ratio'] / r['time_ratio']:.3f} (target >= 0.95 for training)"
    elif r["case"] == "dit_train_step":
        line += f" | {r['subject_GFLOP/s'] / r['reference_GFLOP/s']:.0%} of the matmul rate"
    else:
        line += f" | time ratio {r['time_ratio']:.3f}"
    print(line + f" | kernels {r['subject_kernels']} vs {r['reference_kernels']}")
PY
