#!/usr/bin/env bash
# The GPU smoke check a lent CUDA machine runs in a few minutes (`make gpu-smoke`):
#   1. the gpu test tier (tests/gpu): CUDA losses, dtype, LoRA and DPO through the pipeline;
#   2. the demo task on a sample, end to end on CUDA, then a merged + GGUF export of its fine-tune.
# Prints each step's wall time; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TW=${TW:-.venv/bin/tunewise}
OUT=${OUT:-/tmp/tunewise-gpu-smoke}
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to smoke-test')"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}: {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}')"

step() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@"; echo "== $name: $((SECONDS - t0)) s"; }

step "gpu tier" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider
step "demo run on CUDA" "$TW" run -c examples/debian-sections/tunewise.yaml --runs "$OUT/runs" \
  --set data.max_examples=300 --set train.epochs=1 --set eval.max_test=40 --set eval.forgetting=false
RUN=$(ls -d "$OUT"/runs/*/ | head -1)
step "export merged + gguf (llama.cpp parity)" "$TW" export "$RUN" --merge --gguf --quant q4_k_m
echo "verdict: $("$PY" -c "import json, sys; v = json.load(open(sys.argv[1])); print(v['decision'], v['means'])" "$RUN/verdict.json")"
