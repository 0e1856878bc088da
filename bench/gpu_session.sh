#!/usr/bin/env bash
# One step of the GPU-machine runbook, run there by the device tool from the repository root:
#   bash bench/gpu_session.sh STEP            (STEP: tests | profile | graphs | graphs-budgets | managed-decode | engine-graphs
#                                              | compile | serve-managed | truth-128k | tests-a | tests-b | tests-c
#                                              | serve-ab | formats | formats-70b | cpu-rank | cpu-rank-gil | cpu-rank-joins | cpu-rank-70b | moe | moe-cpu
#                                              | moe-scout-dense | moe-scout | moe-scout-depth | moe-scout-spread | llama4-identity | int4-expand | expert-fetch | speculative | speculative-spread | speculative-8b | speculative-8b-graphs | speculative-graphs | speculative-long
#                                              | speculative-long-spread | speculative-self-70b | quick | quick-graphs | recheck)
# Each step fits one device call (< 10 min) and writes its logs and JSON under $OUT. Prepare on the CPU
# machine first: bench/fetch_gpu_wheels.sh (makes .whl, .whl-nvcomp and .smol, the SmolLM2 tokenizer files;
# carry what a step needs), and pass OVERSPILL_GIT_COMMIT=$(git rev-parse --short HEAD): the tree travels
# without .git. Device time left after a cold start (~1.5-3.5 min) decides how many steps fit a session.
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
# a GPU test still running after `stuck SECONDS` ends the pytest run with every thread's stack (pytest-timeout, in
# the machine's image), so a hung test costs its step minutes, not the whole call; without the plugin, no limit
stuck() { python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout $1 -o timeout_method=thread"; }
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
  tests-a)  # the GPU tests of the core, the budget, the CPU rank (its joins included) and the engine (48 tests took
            # 139-227 s at eb8a8ea and before); -v names each test as it starts and faulthandler_timeout dumps every
            # thread's stack when one runs past 120 s (at 7cdbfbb a tests-a that began with the tests-c files printed
            # 25 dots and nothing more for ~8 min); SIGINT at the limit makes pytest print what failed so far
    timeout -s INT 330 python3 -m pytest -m gpu -v -rfEs --tb=short --durations=15 -o faulthandler_timeout=120 $(stuck 240) \
      -p no:cacheprovider tests/test_gpu.py tests/test_gpu_budget.py tests/test_gpu_cpu_rank.py \
      tests/test_gpu_cpu_rank_joins.py tests/test_gpu_engine.py > "$OUT/pytest-a.log" 2>&1
    tail -40 "$OUT/pytest-a.log" | tee -a "$OUT/log"
    ;;
  tests-c)  # the GPU tests of quantized checkpoints (compressed-tensors, GGUF, prequantized), in no runbook step before
            # 7cdbfbb; their time is unknown, so each test is named as it starts and a stuck one dumps its stacks
    timeout -s INT 400 python3 -m pytest -m gpu -v -rfEs --tb=short --durations=15 -o faulthandler_timeout=120 $(stuck 240) \
      -p no:cacheprovider tests/test_compressed_tensors_int4.py tests/test_gguf_legacy_quants.py \
      tests/test_gguf_low_kquants.py tests/test_gguf_moe_experts.py tests/test_prequantized.py > "$OUT/pytest-c.log" 2>&1
    tail -40 "$OUT/pytest-c.log" | tee -a "$OUT/log"
    ;;
  tests-b)  # the rest: stream formats (with nvCOMP from .whl-nvcomp when carried), graphs, managed, MoE, unified, self draft
    [ -d .whl-nvcomp ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl-nvcomp/*.whl
    timeout -s INT 540 python3 -m pytest -m gpu -v -rfEs --tb=short --durations=15 -o faulthandler_timeout=150 $(stuck 420) \
      -p no:cacheprovider tests/test_gpu_formats.py \
      tests/test_gpu_moe.py tests/test_gpu_graphs.py tests/test_gpu_managed.py tests/test_gpu_unified.py \
      tests/test_self_draft.py > "$OUT/pytest-b.log" 2>&1
    tail -30 "$OUT/pytest-b.log" | tee -a "$OUT/log"
    ;;
  recheck)  # what failed or went unrun on an H100 at 45b9e98: where Mixtral's expert-streamed peak at 24 GiB goes (it
            # exceeded the budget by 352 MB; bench/memory_peak.py lists the live blocks at the peak), then its test
            # (~5.5 min alone) and the CPU-rank 8B test with its per-step cosine / relative L2 printed
    timeout 200 python3 bench/memory_peak.py --model mixtral-8x7b --gpu-memory 24GiB --moe-streaming experts \
      --prompt-tokens 32 --new-tokens 8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout -s INT 380 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider -s \
      tests/test_gpu_cpu_rank.py::test_llama3_8b_at_6gib_with_the_cpu_rank_matches_gpu_only_streaming \
      tests/test_gpu_moe.py::test_mixtral_shape_at_24gib > "$OUT/pytest-recheck.log" 2>&1
    grep -E "cpu rank vs|passed|failed|FAILED|Error" "$OUT/pytest-recheck.log" | tail -30 | tee -a "$OUT/log"
    ;;
  serve-ab)  # serving 8B at 6 GiB in the tree named by BEFORE (a folder under the repository root holding an earlier
             # commit's tree and its COMMIT file), then here: the before/after ratio. Make it on the CPU machine with
             # mkdir .gpuold && git archive REV | tar -x -C .gpuold && git rev-parse REV > .gpuold/COMMIT; then carry
             # .gpuold and pass BEFORE=.gpuold
    for tree in ${BEFORE:-} $PWD; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$PWD OVERSPILL_GIT_COMMIT=$(cat COMMIT 2>/dev/null || echo "$OVERSPILL_GIT_COMMIT") \
        timeout 120 python3 bench/serve.py --budget 6GiB --clients 1 8 32 --max-tokens 32 --requests-per-client 1 \
        --phase-timeout 40 --out "$OUT/serve-$(basename "$tree")" 2>&1 | grep -E "clients|loaded|wrote|Error|FAIL|Traceback" \
        | tee -a "$OUT/log")
    done
    ;;
  formats)  # issue 15: decode per stream format, 8B at 6 GiB (carry .whl-nvcomp for lossless)
    [ -d .whl-nvcomp ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl-nvcomp/*.whl
    timeout 540 python3 bench/compressed.py --model llama-3-8b --budget 6GiB --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  cpu-rank)  # issue 16: the host CPU as a second rank, 8B at 6 GiB, bf16 then int8 host weights (int8 died of a
            # segfault on the H100 at 5b57da5 after plain streaming: faulthandler prints where)
    for fmt in bf16 int8; do
      timeout 260 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB --host-format $fmt --out "$OUT" 2>&1 \
        | tee -a "$OUT/log"
    done
    ;;
  cpu-rank-gil)  # issue 16: why bf16 gave 1.009x at 5b57da5 (worker busy 137 ms a step where the plan said 86, joins
                # ~1 ms each): the same split at other worker thread counts, then with shorter GIL switch intervals
                # (the worker needs the GIL for every op while the Python thread launches the GPU's share)
    timeout 60 python3 bench/gil_contention.py --out "$OUT" 2>&1 | tee -a "$OUT/log"  # no GPU: the worker alone vs
    # while another thread launches (16 host cores: the share's ops are short, so a 5 ms GIL wait would weigh)
    timeout 300 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB --host-format bf16 \
      --also-threads 8 12 --also-switch-interval 0.0005 0.0001 0.00002 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    # at bd3e9cb OMP_WAIT_POLICY=PASSIVE gave the highest host GEMV rates at 15-16 threads (47-54 G params/s against
    # 38-45 by default; noisy): the same split with worker pools that sleep between regions
    OMP_WAIT_POLICY=PASSIVE timeout 200 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB \
      --host-format bf16 --also-switch-interval 0.0005 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  cpu-rank-joins)  # issue 16 after the device side of a join stopped waiting on the host (cuStreamWaitValue32 on a
                  # pinned counter): bf16 at the planner's fraction, again with a 0.5 ms GIL switch interval (1.19x at
                  # 5638238, where the joins blocked) and with the worker's norm and MLP share op by op instead of one
                  # traced call (runtime.host_call, unmeasured on a GPU host); then bf16 and int8 host weights with worker pools that sleep
                  # between parallel regions (OMP_WAIT_POLICY=PASSIVE: the highest host GEMV rates at bd3e9cb, 47-54 G
                  # params/s at 15-16 threads against 38-45 by default, noisy), in the order the call's time allows
    timeout 200 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB --host-format bf16 \
      --also-switch-interval 0.0005 --also-eager --out "$OUT" 2>&1 | tee -a "$OUT/log"
    OMP_WAIT_POLICY=PASSIVE timeout 150 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB \
      --host-format bf16 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    OMP_WAIT_POLICY=PASSIVE timeout 150 python3 -X faulthandler bench/cpu_rank.py --model llama-3-8b --budget 6GiB \
      --host-format int8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  formats-70b)  # issue 15 at the 70B shape, two formats per call (a load each, ~3 min): FORMATS="bf16 int4" first, then
                # FORMATS="lossless int8" BF16=<the first call's JSON, committed>; BUDGET=80GiB (the H200; on an
                # H100 pass a budget below its free memory, e.g. 72GiB, for both calls)
    [ -d .whl-nvcomp ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl-nvcomp/*.whl
    timeout 560 python3 bench/compressed.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --formats ${FORMATS:-bf16 int4} \
      --new-tokens 8 ${BF16:+--bf16-json "$BF16"} --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  cpu-rank-70b)  # issue 16 at the 70B shape: one load, plain streaming then the CPU rank; HOST_FORMAT=bf16|int8
                 # (one call each), BUDGET as for formats-70b
    timeout 560 python3 -X faulthandler bench/cpu_rank.py --model llama-3-70b --budget "${BUDGET:-80GiB}" \
      --host-format "${HOST_FORMAT:-bf16}" --new-tokens 8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  moe)  # issue 17: expert-aware against dense streaming, Mixtral-8x7B shape at 24 GiB
    timeout 560 python3 bench/moe.py --model mixtral-8x7b --budget 24GiB --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  moe-cpu)  # issue 17 item 3: the host computing a share of the missing experts (--cpu-experts auto) against copying
            # them all, Mixtral-8x7B shape at 24 GiB, batches 1 and 8 (two loads, ~2.5 min each)
    timeout 560 python3 bench/moe.py --model mixtral-8x7b --budget 24GiB --modes experts experts+cpu --out "$OUT" 2>&1 \
      | tee -a "$OUT/log"
    ;;
  moe-scout-dense)  # issue 17 on the H200 (needs_h200: 203 GiB of bf16 do not fit an H100 machine's GPU and host):
                    # Llama-4-Scout shape at the largest budget, dense-layer streaming, batches 1 and 8 (one load)
    timeout 560 python3 bench/moe.py --model llama-4-scout-109b --budget auto --modes dense --batches 1 8 \
      --new-tokens 8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  moe-scout)  # the same shape expert-aware, against the dense run's JSON committed from moe-scout-dense:
              # DENSE=bench/results/moe-llama-4-scout-109b-auto-....json (same GPU; refused otherwise). Since 865a824
              # resident layers multiply only their selected expert at batch 1 (they read all 16 before: b1 at 0.83 of
              # floor); from 5 (token, expert) pairs up, batch 8 here, they run transformers' all-expert bmm as before
    timeout 560 python3 bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --batches 1 8 \
      --new-tokens 8 --dense-json "${DENSE:?pass DENSE=the moe-scout-dense JSON}" --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  moe-scout-depth)  # the same with a deeper ring (DEPTH, default 6: 7 slots of ~0.38 GB): at depth 2 Scout's batch 1 reached
                    # 0.83 of its floor, the link idle while the 31 resident layers run after the 17 streamed ones
    timeout 560 python3 bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --batches 1 8 \
      --new-tokens 8 --depth "${DEPTH:-6}" --dense-json "${DENSE:?pass DENSE=the moe-scout-dense JSON}" --out "$OUT" 2>&1 \
      | tee -a "$OUT/log"
    ;;
  moe-scout-spread)  # the same plan loaded twice: streamed layers first (as planned), then spread evenly among the
                     # resident ones (--spread), so the ring's copies run between resident layers (~6 min, the H200)
    timeout 590 python3 bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --spread --batches 1 8 \
      --new-tokens 8 --dense-json "${DENSE:?pass DENSE=the moe-scout-dense JSON}" --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  llama4-identity)  # issue 17: which per-expert kernel reproduces transformers' Llama 4 MoE bit for bit (one Scout-sized
                    # block, ~1 min), then resident vs dense vs expert-aware tokens on a Scout cut to 6 layers (~2 min)
    timeout 400 python3 bench/llama4_identity.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  int4-expand)  # issue 15: the int4 Triton expansion against the torch path, 8B layer (~1 min), then its GPU tests
    timeout 120 python3 bench/int4_expand.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout 120 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider tests/test_gpu_formats.py -k int4 2>&1 \
      | tail -8 | tee -a "$OUT/log"
    ;;
  expert-fetch)  # issue 17 item 1: copy after sync vs zero-copy vs prefetch for one MoE layer's experts, SHAPES (default
                 # "scout mixtral"), batches 1 and 8 (~1 min a shape; 8 GiB of pinned host memory)
    for shape in ${SHAPES:-scout mixtral}; do
      timeout 200 python3 bench/expert_fetch.py --shape "$shape" --batches 1 8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    done
    ;;
  speculative)  # 70B at BUDGET=80GiB (the H200: the plan needs ~78.7 GiB): pass cost, oracle points against plain (serial
                # verify), 64 new tokens so acceptance noise stays well under the 15% gate (~5 min)
    timeout 560 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 64 --repeats 1 \
      --pass-k 1 8 64 --points 0.8:8 0.9:16 0.6:8 --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-spread)  # 70B at BUDGET=80GiB: the same plan twice, streamed layers first, then spread among the resident
                       # ones (--spread): a serial verify pass adds the resident layers' compute per token (H100 at 76
                       # GiB: +32-37 ms a token), which the link can hide only where copies run beside it (~8.5 min)
    timeout 580 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 64 --repeats 1 \
      --pass-k 1 --points 0.8:8 0.9:16 --spread --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-8b-graphs)  # issue 14: 8B at 6 GiB, eager then CUDA graphs on the same model (plain graphed, the graphed
                          # verify pass sweep 1/9/17, oracle points twice: capture, then replay) (~5 min)
    timeout 560 python3 bench/speculative.py --model llama-3-8b --budget 6GiB --new-tokens 96 --repeats 1 \
      --pass-k 1 --points 0.8:8 0.9:16 0.6:8 --graphs --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-graphs)  # issue 14: 70B at BUDGET=80GiB loaded with CUDA graphs, no eager runs: graphed plain, the graphed
                       # verify pass sweep 1/9/17 and the oracle points (each twice: capture, replay) (~6 min)
    timeout 570 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 48 \
      --points 0.8:8 0.9:16 --graphs-only --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-long)  # issue 14: 70B graphed, 160 new tokens so the oracle's acceptance nears its setting (at 96 tokens
                     # 0.8:8 drew 3.96 tokens a pass where 4.33 are expected: 3.31x); BUDGET=76GiB on an H100 (~7.5 min)
    timeout 580 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 160 \
      --points 0.8:8 0.9:16 --serial-k 1 9 17 --graphs-only --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-long-spread)  # issue 14: speculative-long with the streamed layers spread among the resident ones
                            # (--layout spread): a serial verify pass's resident compute (~25 ms a token at 76 GiB
                            # with the first 37 layers streamed) runs beside the copies instead of after them
    timeout -s INT 80 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider tests/test_gpu_graphs.py \
      -k speculative 2>&1 | tail -6 | tee -a "$OUT/log"  # spread and graphs together, on a small model first (~1 min)
    timeout 505 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 160 \
      --points 0.8:8 0.9:16 --serial-k 1 9 17 --graphs-only --layout spread --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-self-70b)  # issue 14 (iii): speculate='self' end to end at the 70B shape, one load (the planner's int4
                         # draft inside BUDGET): plain decoding of that plan, then chains 4 and 8 (random weights:
                         # acceptance is meaningless, reported as measured) (~6 min)
    timeout 570 python3 bench/speculative.py --model llama-3-70b --budget "${BUDGET:-80GiB}" --new-tokens 16 \
      --self-only --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  quick)  # one short call (~6 min): 8B at 6 GiB loaded with CUDA graphs (graphed plain, verify sweep, oracle points),
          # the GPU tests of the graphed verify, int4 and GGUF pass-through expansion, then the int4 kernel's time
    timeout 250 python3 bench/speculative.py --model llama-3-8b --budget 6GiB --new-tokens 64 \
      --points 0.8:8 0.9:16 --graphs-only --out "$OUT" 2>&1 | tee -a "$OUT/log"
    timeout -s INT 150 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider tests/test_gpu_graphs.py \
      tests/test_gguf_legacy_quants.py tests/test_gguf_low_kquants.py tests/test_compressed_tensors_int4.py \
      tests/test_gguf_moe_experts.py tests/test_gpu_formats.py -k "speculative or int4 or reference or dequantization" 2>&1 \
      | tail -15 | tee -a "$OUT/log"
    timeout 100 python3 bench/int4_expand.py --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  quick-graphs)  # the shortest useful call (~3 min): the graphed verify's GPU test, then 8B graphed speculation
    timeout -s INT 120 python3 -m pytest -m gpu -q -rfEs --tb=short -p no:cacheprovider tests/test_gpu_graphs.py -k speculative \
      2>&1 | tail -8 | tee -a "$OUT/log"
    timeout 250 python3 bench/speculative.py --model llama-3-8b --budget 6GiB --new-tokens 48 \
      --points 0.8:8 0.9:16 --graphs-only --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  speculative-8b)  # 8B at 6 GiB: the same points with 96 new tokens, then speculate='self' end to end (~3 min)
    timeout 400 python3 bench/speculative.py --model llama-3-8b --budget 6GiB --new-tokens 96 --repeats 1 \
      --pass-k 1 8 --points 0.8:8 0.9:16 0.6:8 --self-draft --out "$OUT" 2>&1 | tee -a "$OUT/log"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh STEP (the steps are listed at the top of this file)" >&2
    exit 2
    ;;
esac
