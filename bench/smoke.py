"""What the benchmark scripts share: a device sync for timings, and the tiny model their `--smoke`
runs save and load (a CPU check of the script; it measures nothing useful)."""

from __future__ import annotations

from pathlib import Path

SMOKE_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def smoke_model(out_dir: Path) -> Path:
    """Save the seeded tiny float32 llama under `out_dir/smoke-model` and return its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SMOKE_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=torch.float32)
    path = Path(out_dir) / "smoke-model"
    model.save_pretrained(path)
    return path
