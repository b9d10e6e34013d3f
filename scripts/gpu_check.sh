#!/usr/bin/env bash
# The checks that need a GPU, in one run, each part under its own time limit so that one slow part cannot
# take the others' time: the CUDA tests, the GPU benchmarks (forward in float32 and bfloat16; patching, SAE
# store and training, corruptions), then the default study on the GPU. Logs and JSON land in OUT (default
# gpu_check/); the README's performance section quotes them.
#
#   scripts/gpu_check.sh [OUT]        (PYTHON=python3 by default; set it to .venv/bin/python where that exists)
#
# Set SKIP_STUDY=1 to leave the default study out (it needs the Fashion-MNIST files, MECHVIT_DATA).
set -u
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run, keep the log, say how it ended and how long it took
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, timm, sae_lens, transformer_lens as tl; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| timm', timm.__version__, '| sae_lens', sae_lens.__version__)"

part cuda_tests 240 $PY -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py tests/test_corruptions.py::test_cuda_matches_cpu \
  tests/test_model_modes.py::test_to_device_and_dtype_moves_weights_and_cfg
part bench_forward 150 $PY benchmarks/bench_forward.py --device cuda --models vit_tiny_patch16_224 vit_base_patch16_224 --batches 8 32 128
part bench_forward_bf16 120 $PY benchmarks/bench_forward.py --device cuda --dtype bfloat16 --models vit_tiny_patch16_224 vit_base_patch16_224 --batches 8 32 128
part bench_patching 120 $PY benchmarks/bench_patching.py --device cuda --images 1 8 32
part bench_sae 150 $PY benchmarks/bench_sae.py --device cuda --no-processes --rounds 2
part bench_corruptions 200 $PY benchmarks/bench_corruptions.py --device cuda --repeats 2 --out "$OUT/bench_corruptions.json"
if [ "${SKIP_STUDY:-0}" != 1 ]; then
  part study 420 $PY -m mechvit study --out /tmp/gpu_study --set device=cuda
  cp /tmp/gpu_study/metrics.json "$OUT/study_metrics.json" 2>/dev/null
  cp /tmp/gpu_study/report.md "$OUT/study_report.md" 2>/dev/null
fi
