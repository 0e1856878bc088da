#!/usr/bin/env bash
# Download, on the CPU machine, the wheels the lent GPU image lacks, into .whl/ (git-ignored) for the
# device tool's `carry`. The image has torch 2.11, transformers 5.17, accelerate, httpx, prometheus-client,
# matplotlib, pytest, nvidia-ml-py and cuda-bindings, but no fastapi/uvicorn/pydantic (server, batch) and
# no RMM (unified memory). About 10 MB in all. On the GPU machine, start each command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
binary=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
common=("${binary[@]}" -d .whl)
# the server stack with its dependency closure (versions tested on CPU with this code)
python3 -m pip download -q "${common[@]}" fastapi==0.165.0 uvicorn==0.54.0 pydantic==2.14.4
# gguf for the GGUF tests (pure Python; numpy and pyyaml are on the image)
python3 -m pip download -q --no-deps "${common[@]}" gguf==0.19.0
# RMM for CUDA 13 (torch 2.11+cu130 there); its cuda-bindings and numpy needs are met by the image
python3 -m pip download -q --no-deps "${common[@]}" rmm-cu13==26.10.0 librmm-cu13==26.10.0 rapids-logger==0.3.0
# nvCOMP for CUDA 13 (overspill[compress]: --stream-format lossless), about 34 MB, in a folder of its own: with it
# installed, stream_format="auto" picks lossless, so only the steps that mean to test it carry .whl-nvcomp
python3 -m pip download -q --no-deps "${binary[@]}" -d .whl-nvcomp nvidia-nvcomp-cu13==6.0.0.12 nvidia-libnvcomp-cu13==6.0.0.12
# the embedded SmolLM2's config and tokenizer (not its weights) for the GPU tests that need a tokenizer: .smol
HF_HUB_OFFLINE=1 OVERSPILL_CACHE=/tmp/overspill-smol .venv/bin/python -c "import overspill; overspill.load(progress=False)" >/dev/null
mkdir -p .smol && find /tmp/overspill-smol/gguf -maxdepth 2 -type f ! -name '*.safetensors' -exec cp {} .smol/ \;
# and its GGUF metadata without tensors (1.7 MB), which the tiny GGUFs of the GGUF tests start from
HF_HUB_OFFLINE=1 .venv/bin/python bench/gguf_metadata.py .smol/metadata.gguf
ls .whl .whl-nvcomp .smol
du -sh .whl .whl-nvcomp .smol
