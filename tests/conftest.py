"""Shared fixtures: tiny random-weight checkpoints per architecture and an isolated overspill cache.

Checkpoints are real `save_pretrained` directories (config.json + model.safetensors), so tests
exercise the same loader path as a downloaded model; each is built once per session.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # overspill never downloads; neither do its tests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_LAYERS = 8  # 4 resident + 3 ring slots < 8: "about half resident" really streams
VOCAB = 256
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,  # larger than HF's 0.02 so random logits are far apart and greedy tokens vary
    **SPECIAL,
}
# Sliding windows (16) are shorter than prompt + new tokens (12 + 16), so windowed attention is exercised.
TINY_CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", **SMALL},
    "mistral": {"model_type": "mistral", **SMALL, "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", **SMALL, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 4},
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 32},
    "phi3": {"model_type": "phi3", **SMALL, "sliding_window": 16},
    "gemma2": {"model_type": "gemma2", **SMALL, "head_dim": 16, "sliding_window": 16},  # tied embeddings
    "mixtral": {"model_type": "mixtral", **SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
}
ARCHS = sorted(TINY_CONFIGS)


def hf_config(arch: str):
    """The transformers config object for a tiny architecture."""
    from transformers import AutoConfig

    d = dict(TINY_CONFIGS[arch])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(d.pop("model_type"), **d)


def gpu_memory_before() -> int:
    """CUDA bytes allocated before a measurement, with earlier tests' models collected and the peak
    reset: their placed models sit in reference cycles until the next collection, so an absolute
    peak would count them against this test's budget."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


@pytest.fixture(scope="session", autouse=True)
def overspill_cache(tmp_path_factory) -> Path:
    """Point OVERSPILL_CACHE at a session directory, so the embedded-model conversion never touches
    the user's cache (subprocesses inherit it through os.environ)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("overspill-cache")
    mp.setenv("OVERSPILL_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(arch) -> Path`: a saved random-weight checkpoint, built once per arch per session."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            import torch
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32).eval()
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(str(path))
            built[arch] = path
        return built[arch]

    return make


@pytest.fixture(scope="session")
def default_model_dir(overspill_cache) -> Path:
    """The embedded SmolLM2 GGUF converted (once, in this process) into the session cache, so CLI
    subprocesses started later all find the converted copy instead of racing to write it."""
    from overspill.runtime.sources import resolve

    return resolve(None).config_dir
