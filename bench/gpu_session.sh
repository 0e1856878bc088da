#!/usr/bin/env bash
# One step of the GPU-machine runbook, run there by the device tool from the repository root:
#   bash bench/gpu_session.sh STEP            (STEP: tests | profile | graphs | graphs-budgets | managed-decode | engine-graphs
#                                              | compile | serve-managed | truth-128k | tests-serve | speculative)
# Each step fits one device call (< 10 min) and writes its logs and JSON under $OUT. Prepare on the CPU
# machine first: bench/fetch_gpu_wheels.sh (carry .whl), the SmolLM2 tokenizer files in .smol (carry
# .smol), and pass OVERSPILL_GIT_COMMIT=$(git rev-parse HEAD): the tree travels without .git.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: "${OUT:?run this on the device machine, where OUT is set}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -d .smol ] && export OVERSPILL_TEST_SMOLLM2_DIR=$PWD/.smol
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/log"

case "${1:-}" in
  tests)  # every GPU test (~3 min), then a small managed-memory smoke (64 MiB layers)
    timeout 300 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests 2>&1 | tee -a "$OUT/log"
    timeout 120 python3 bench/managed.py --layers 4 --layer-mib 64 --passes 2 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  profile)  # every GPU test, then where a graphed decode step's time goes (resident and 6 GiB)
    timeout 300 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests 2>&1 | tee -a "$OUT/log"
    for budget in none 6GiB; do
      timeout 120 python3 bench/graph_profile.py --budget $budget --out "$OUT" 2>&1 | tee -a "$OUT/log"
    done
    ;;
  graphs)  # eager vs CUDA graphs: resident and a 6 GiB budget, two points of the free-streaming sweep
    timeout 470 python3 bench/graph_decode.py --budgets 6GiB --free-sweep 1 2 --new-tokens 32 --repeats 2 \
      --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout 90 python3 bench/graph_profile.py --budget none --out "$OUT" 2>&1 | tail -20 | tee -a "$OUT/log"
    ;;
  graphs-budgets)  # the 12 GiB budget and the rest of the sweep, graphs only
    timeout 560 python3 bench/graph_decode.py --modes graphs --budgets 12GiB --free-sweep 4 8 16 \
      --new-tokens 32 --repeats 2 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  managed-decode)  # managed-memory GPU tests, the managed bench, then 8B decode at 12 GiB: copy vs mapped vs managed
    timeout 200 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_gpu_managed.py tests/test_gpu_graphs.py \
      2>&1 | tee -a "$OUT/log"
    timeout 100 python3 bench/managed.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
    for mode in copy mapped managed; do
      timeout 120 python3 bench/decode.py --budgets 12GiB --skip-accelerate --streaming $mode --new-tokens 16 \
        --repeats 2 --context 1024 --out "$OUT/$mode" 2>&1 | grep -E "decode |FAILED|Error|wrote" | tee -a "$OUT/log"
    done
    ;;
  engine-graphs)  # GPU tests of graphs and the engine, then serving resident with and without graphs
    timeout 200 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_graphs.py \
      2>&1 | tee -a "$OUT/log"
    for graphs in "" --cuda-graphs; do
      timeout 170 python3 bench/serve.py --budget none --clients 1 8 32 --requests-per-client 1 --phase-timeout 40 \
        $graphs --out "$OUT" 2>&1 | grep -E "clients:|loaded|wrote|Error|FAIL" | tee -a "$OUT/log"
    done
    ;;
  compile)  # transformers' own torch.compile (static cache) beside eager, then overspill's graphed step profile
    timeout 420 python3 bench/compile_decode.py --out "$OUT" 2>&1 | tail -15 | tee -a "$OUT/log"
    timeout 100 python3 bench/graph_profile.py --budget none --out "$OUT" 2>&1 | tail -16 | tee -a "$OUT/log"
    ;;
  serve-managed)  # managed vs pinned bandwidth (2 GiB of managed memory), then serving with this plan
    timeout 150 python3 bench/managed.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout 400 python3 bench/serve.py --requests-per-client 1 --phase-timeout 45 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  truth-128k)  # the use case's own case: 70B shape, a 131072-token prompt through plain generate, default budget
    timeout 560 python3 bench/plan_truth.py --model llama-3-70b --context 131136 --prompt-tokens 131072 \
      --entries generate --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  tests-serve)  # every GPU test, then serving 8B at 6 GiB here and in the tree named by BEFORE (a checkout of an
                # earlier commit, with its COMMIT file), for the before/after ratio
    timeout 240 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests 2>&1 | tail -40 | tee -a "$OUT/log"
    if [ -d .whl-nvcomp ]; then  # the stream formats' GPU tests again with nvCOMP (overspill[compress]) installed
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/nvc .whl-nvcomp/*.whl
      PYTHONPATH=/tmp/nvc:$PYTHONPATH timeout 100 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider \
        tests/test_gpu_formats.py 2>&1 | tail -25 | tee -a "$OUT/log"
    fi
    for tree in ${BEFORE:-} $PWD; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$PWD OVERSPILL_GIT_COMMIT=$(cat COMMIT 2>/dev/null || echo "$OVERSPILL_GIT_COMMIT") \
        timeout 100 python3 bench/serve.py --budget 6GiB --clients 1 8 32 --max-tokens 32 --requests-per-client 1 \
        --phase-timeout 40 --out "$OUT/serve-$(basename "$tree")" 2>&1 | grep -E "clients|loaded|wrote|Error|FAIL|Traceback" \
        | tee -a "$OUT/log")
    done
    ;;
  speculative)  # 70B at 80 GiB: pass cost, oracle points against plain (serial verify); then 8B at 6 GiB with self
    timeout 400 python3 bench/speculative.py --model llama-3-70b --budget 80GiB --new-tokens 40 --repeats 1 \
      --pass-k 1 8 64 --points 0.8:8 0.9:16 0.6:8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout 170 python3 bench/speculative.py --model llama-3-8b --budget 6GiB --new-tokens 32 --repeats 1 \
      --pass-k 1 8 --points 0.8:8 0.9:16 --self-draft --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh tests|profile|graphs|graphs-budgets|managed-decode|engine-graphs|compile|serve-managed|truth-128k|tests-serve|speculative" >&2
    exit 2
    ;;
esac
