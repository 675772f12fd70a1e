#!/usr/bin/env bash
# Issue 13's GPU check, one script, ~6 minutes on an H100/H200 (run from anywhere; it cd's to the repo):
#   bash benchmarks/gpu_check.sh            # BATCH=128 REPEATS=10 by default; PY=python3
# Prints, in bfloat16 on CUDA, each side timed interleaved (medians):
#   1. DC-DiT-S (N=4, ~25% of tokens kept; flash-attn's varlen kernel when installed) vs DiT-S/2 training
#      step: MACs/s of DC-DiT over DiT's (target >= 0.95), plus the same for the forward;
#   2. eager vs compiled (DiffusionTransformer.compile = True) speed-up: DiT-S/2 (one full graph) and
#      DC-DiT-S (dynamic shapes), training step and forward.
# Installs nothing heavy: the project itself (editable) and whatever pip resolves for its light deps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BATCH=${BATCH:-128}
REPEATS=${REPEATS:-10}
OUT=${OUT:-/tmp/dyncompute_gpu_check}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BATCH=2 REPEATS=1 checks the plumbing without a GPU
mkdir -p "$OUT"

$PY -m pip install -q -e . >"$OUT/pip.log" 2>&1 \
  || $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 \
  || { echo "pip install -e . failed (see $OUT/pip.log)"; exit 1; }
$PY - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)'}")
try:
    import flash_attn
    print(f"flash-attn {flash_attn.__version__}: DC-DiT attention = flash_attn_varlen_func")
except ImportError:
    print("flash-attn NOT installed: DC-DiT attention = grouped SDPA (one call per distinct length) -- "
          "the DC-DiT figures below are then NOT the varlen-kernel figures")
PY

bench() {  # name, time limit (s), cases and args...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" $PY -m dyncompute.cli bench "$@" --device "$DEVICE" --repeats "$REPEATS" --warmup 3 \
      --out "$OUT/$name.csv" 2>"$OUT/$name.err" | grep -v "^wrote" \
    || echo "   ($name stopped: exit $?, see $OUT/$name.err)"
}
bench throughput 90 dcdit_vs_dit_train dcdit_vs_dit --arg batch="$BATCH"
bench compile_dit 110 dit_compile --arg batch="$BATCH"
bench compile_dcdit 140 dcdit_compile --arg batch="$BATCH"

$PY - "$OUT" <<'PY'
import sys
from pathlib import Path
import pandas as pd
rows = [pd.read_csv(p) for p in sorted(Path(sys.argv[1]).glob("*.csv"))]
if not rows:
    sys.exit("no results")
df = pd.concat(rows)
print("\n== summary (bf16 on CUDA, fp32 on CPU; ms are medians per call)")
for _, r in df.iterrows():
    line = f"{r['case']:20s} {r['subject']} {r['subject_ms']:.2f} ms vs {r['reference']} {r['reference_ms']:.2f} ms"
    if r["case"].startswith("dcdit_vs_dit"):
        line += f" | MACs/s ratio {r['mac_ratio'] / r['time_ratio']:.3f} (target >= 0.95 for training)"
    else:
        line += f" | speed-up {1 / r['time_ratio']:.2f}x"
    print(line + f" | kernels {r['subject_kernels']} vs {r['reference_kernels']}")
PY
