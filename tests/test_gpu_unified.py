"""GPU tests of `enable_unified_memory` (`pytest -m gpu`, with RMM installed; always within free memory).

The allocator swap is process-wide and permanent, and pytest's process has touched CUDA already,
so each check runs in a fresh Python process. Pools stay far below the GPU's free memory: on a
PCIe GPU oversubscribed managed memory can hang the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("rmm") is None, reason="needs RMM (pip install 'overspill[rmm]')"),
]

GENERATE = """
import ctypes, json, sys, torch
from transformers import pipeline
unified = sys.argv[2] == "unified"
if unified:
    from overspill.runtime.unified import enable_unified_memory
    decision = enable_unified_memory("2GiB")
pipe = pipeline("text-generation", model=sys.argv[1], dtype=torch.bfloat16, device="cuda:0")
out = pipe("The highest mountain", max_new_tokens=12, do_sample=False, return_full_text=False)
ids = pipe.tokenizer("The highest mountain", return_tensors="pt")["input_ids"].to("cuda:0")
tokens = pipe.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
managed = None
big_refused = None
if unified:
    cuda = ctypes.CDLL("libcuda.so.1")
    flag = ctypes.c_uint()
    ptr = next(pipe.model.parameters()).data_ptr()
    assert cuda.cuPointerGetAttribute(ctypes.byref(flag), 8, ctypes.c_uint64(ptr)) == 0  # IS_MANAGED
    managed = bool(flag.value)
    try:
        torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # over the 2 GiB pool, far below free memory
        big_refused = False
    except (RuntimeError, MemoryError):
        big_refused = True
print(json.dumps({"text": out[0]["generated_text"], "tokens": tokens[0].tolist(), "managed": managed,
                  "big_refused": big_refused}))
"""


def _run(model_dir: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(model_dir), mode], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unified_memory_pipeline_matches_plain_cuda_and_caps_the_pool(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    _char_tokenizer().save_pretrained(tmp_path)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  eos_token_id=1, pad_token_id=0, bos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    plain, unified = _run(tmp_path, "plain"), _run(tmp_path, "unified")
    assert unified["tokens"] == plain["tokens"] and len(plain["tokens"]) == 20 + 12
    assert unified["text"] == plain["text"]  # the pipeline ran under unified memory
    assert unified["managed"] is True  # the weights live in CUDA managed memory
    assert unified["big_refused"] is True  # the pool cap holds: no oversubscription


def _char_tokenizer():
    """A character-level tokenizer built offline (the GPU machine cannot download one)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({chr(c): len(vocab) + i for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")
