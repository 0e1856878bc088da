"""`overspill.load`: a placed model and its tokenizer, usable with `generate` and `pipeline` unchanged."""

from __future__ import annotations

import importlib.util
import operator
import os
import warnings
from dataclasses import replace
from typing import Any

import torch

from .errors import OverspillError, one_line
from .planning import moe
from .planning.formats import NATIVE, check_format, check_format_plan, choose, format_blocker, resolve_auto, with_format
from .planning.host_experts import check_mode as check_cpu_experts
from .planning.host_experts import refusal as host_experts_refusal
from .planning.host_experts import supported as host_experts_supported
from .planning.host_experts import why_dense
from .planning.hostmem import check_host
from .planning.placement import AUTO_MARGIN_BYTES, choose_streaming, spreads
from .planning.prequantized import Prequantized, scheme_of, settle_format
from .planning.plan import (
    DEFAULT_CONTEXT,
    DEFAULT_DEPTH,
    MANAGED_MODES,
    Plan,
    Workload,
    footprint_from_spec,
)
from .planning.profile import Profile
from .planning.routing import MoeBasis
from .planning.self_draft import Machine, plan_self_draft
from .planning.speculation import auto_source, prefix_instead
from .planning.spec import DEFAULT_DTYPE, dtype_name, missing_keys, positions_note
from .planning.trees import check_tree
from .planning.units import parse_budget, parse_bytes
from .runtime.checkpoint import CheckpointReader, RandomWeights
from .runtime.cpu_rank import enable_planned, plan_cpu_rank
from .runtime.experts import enable_host_experts
from .runtime.graphs import keep_grouped_experts
from .runtime.hardware import host_available_bytes
from .runtime.loader import (
    Placement,
    build_skeleton,
    decoder_layers,
    encoded_layer_bytes,
    materialize,
    measured_spec,
    placement_of,  # re-exported: `overspill.api.placement_of` is public
    use_planned_cache,
)
from .runtime.prequantized import QuantizedReader
from .runtime.sources import ModelSource, budget_beside_draft, check_architecture, resolve

# The dtypes `load` computes in, by their names in the planner's table (`overspill.planning.spec.DTYPE_BYTES`).
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in ("bfloat16", "float16", "float32")}


def parse_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """A supported torch dtype; "auto" is bfloat16 on CUDA and float32 on the CPU, where bf16 matmuls
    without native support run ~13x slower (measured: SmolLM2 decode 1.9 vs 25 tok/s on 2 cores)."""
    if not isinstance(dtype, torch.dtype) and str(dtype).lower() == "auto":
        return DTYPES[DEFAULT_DTYPE] if device is None or device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype_name(dtype)]  # names and aliases of the planner's table ("bf16", "half")
    except (ValueError, KeyError):
        raise OverspillError(f"unsupported dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def resolve_budget(gpu_memory: int | str | None, device: torch.device) -> int | None:
    """Bytes of device memory the plan may use; None means no limit."""
    budget = parse_budget(gpu_memory, "gpu_memory (--gpu-memory)")
    if budget == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        budget = free - AUTO_MARGIN_BYTES
        if budget <= 0:
            raise OverspillError(f"GPU {device} has almost no free memory; free some or pass --gpu-memory")
    if budget is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if budget > free:
            raise OverspillError(
                f"gpu_memory {budget / 2**30:.1f} GiB is more than the {free / 2**30:.1f} GiB free on {device}; "
                f"pass a smaller --gpu-memory or 'auto'"
            )
    return budget


def _parse_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (cuda:0 when CUDA is available, else the CPU), or a one-line error
    naming the devices overspill runs on: torch's own error lists a dozen backends."""
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OverspillError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise OverspillError(f"overspill runs on cpu or cuda, not {dev.type}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OverspillError("device cuda requested but no CUDA device is available; omit --device to run on CPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OverspillError(f"there is no {dev}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 on")
    return dev


def _load_config(source: ModelSource) -> Any:
    """The transformers config, refused the way `overspill plan` refuses it (`check_architecture`)."""
    from transformers import AutoConfig

    where = source.config_dir / "config.json" if source.config_dir is not None else f"the config of {source.name}"
    try:
        if source.config_dict is not None:
            d = dict(source.config_dict)
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        else:
            config = AutoConfig.from_pretrained(str(source.config_dir))
    except Exception as exc:  # not JSON, no or unknown model_type, a field of the wrong type: a bad config.json
        raise OverspillError(f"{where} is invalid ({one_line(exc)}): fix it or download the model again") from None
    check_architecture(config.to_dict(), str(source.config_dir or source.name))
    missing = missing_keys(source.config())
    if missing:  # transformers filled in its defaults: the shape of another model
        raise OverspillError(f"{where} is missing required keys: {', '.join(missing)}: fix it or download the "
                             "model again")
    return config


def _prequantized(config: Any, source: ModelSource, random_weights: bool) -> Prequantized | None:
    """How the checkpoint arrives quantized (`planning.prequantized`), or None; its `quantization_config` is
    dropped from `config` either way, so transformers builds the plain architecture (random weights too)."""
    try:
        scheme = scheme_of(config.to_dict())
    except ValueError as exc:
        if random_weights:
            scheme = None
        else:
            raise OverspillError(f"{source.config_dir or source.name}: {exc}") from None
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config
    return None if random_weights else scheme


def _load_tokenizer(source: ModelSource, vocab_size: int | None):
    """The checkpoint's tokenizer, or None when it has none (transformers may then build an
    empty one from special tokens alone; such a tokenizer is discarded). Tokenizer files that fail
    to load are an error: running on with byte ids would hide a broken download."""
    if source.config_dir is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.config_dir))
    except Exception as exc:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((source.config_dir / name).exists() for name in files):
            return None
        raise OverspillError(
            f"the tokenizer in {source.config_dir} does not load ({one_line(exc)}): download its tokenizer files again"
        ) from None
    if vocab_size and len(tok) < min(vocab_size, 1000) // 2:
        return None
    return tok


def load(
    model: str | os.PathLike | None = None,
    gpu_memory: int | str | None = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    random_weights: bool = False,
    depth: int = DEFAULT_DEPTH,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    cudnn_sdpa: bool = False,
    plan: Plan | None = None,
    probe: bool = True,
    pipeline: bool = False,
    kv_gpu_memory: int | str | None = None,
    fit_batch: bool = False,
    cuda_graphs: bool = False,
    pass_tokens: int = 0,
    streaming: str = "auto",
    speculate: str | None = None,
    speculate_tree: int | None = None,
    stream_format: str = "auto",
    cpu_compute: str | float = "off",
    moe_streaming: str = "auto",
    cpu_compute_format: str = "bf16",
    cpu_experts: str = "off",
    layout: str = "auto",
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM with its layers split between GPU memory and pinned host memory.

    Args:
        model: a checkpoint directory, a Hugging Face id already in the local cache, a .gguf file,
            a shipped config name (with `random_weights`), or None for the embedded SmolLM2-135M.
        gpu_memory: device bytes the model may use: "6GiB", "auto" (free memory minus a margin),
            an int, or None (no limit). Layers that do not fit stream from pinned host memory.
        dtype: weight and compute dtype; "auto" is bfloat16 on CUDA, float32 on the CPU.
        random_weights: build from the config alone with seeded random weights (benchmarks).
        depth: how many layers ahead the ring copies.
        context, batch: the workload whose KV cache and activations the budget must leave room for.
        device: defaults to cuda:0 when CUDA is available, else the CPU (the same ring runs there).
        seed: seed for random weights.
        progress: show progress bars.
        cudnn_sdpa: keep PyTorch's cuDNN attention backend enabled. By default `load` turns it off
            process-wide (`overspill.runtime.hardware.disable_cudnn_sdpa` says why: it halved
            resident decode speed on the lent H100); flash / memory-efficient SDPA kernels run instead.
        plan: a placement to use instead of the greedy rule (e.g. from `streaming_plan`); it must
            have one tier per decoder layer. `gpu_memory` is then not consulted.
        kv_gpu_memory: device bytes the KV cache may use ("2GiB"); layers whose KV does not fit keep
            it in pinned host memory (a `TieredCache`, built by `generate` automatically). By default
            KV stays on the device unless even streaming every layer leaves no room for it.
        layout: which layers stream: "prefix" (the first ones), "spread" (evenly among the resident ones,
            so the ring's copies run beside resident layers: `planning.placement.streamed_tiers` says when that
            pays) or "auto" (spread where `speculate` verifies drafts, else prefix). Host-tier KV keeps the prefix.
        fit_batch: plan for the largest batch up to `batch` whose KV stays on the GPU (serving:
            host-tier KV runs one sequence at a time); `model.overspill.plan.workload.batch` says
            what was planned; with `kv_gpu_memory`, the KV kept on the GPU stays within it.
        pass_tokens: the most tokens one forward pass holds, for the activation reserve; 0 means
            what `generate` needs (batch x prompt, up to 2048 tokens each). The serving engine
            passes its bound (`placement.serving_pass_tokens`), so the budget keeps more layers resident.
        streaming: how streamed layers move: "copy" (pinned host memory copied into GPU ring
            slots), "managed" (CUDA managed memory, bulk-prefetched `depth` layers ahead and evicted
            after use), "mapped" (managed memory the GPU reads in place over the link), or "auto":
            mapped where the probe measured in-place reads faster than pinned copies, else copy
            (the H100 copies: 54 against 49 GB/s). On a PCIe GPU "managed" and "mapped" are
            refused unless the streamed layers fit in half the free memory.
        cuda_graphs: replay each decode step as a CUDA graph (streamed-layer copies included) over
            a static KV cache of `context` tokens; prefill stays eager. Off where the model cannot
            be graphed (host-tier KV, sliding windows), with a warning. CUDA only.
        speculate: decode batch-1 `generate`/`pipeline` calls speculatively: "auto" (ngram where the plan
            streams layers or KV over the link, else off: `planning.speculation.auto_source`), "ngram" (prompt lookup,
            no model), "draft:PATH" (a small model with the same tokenizer, resident) or "self" (the
            model's own layers in int4, resident; the plan decides how many layers draft and counts
            their bytes against resident bf16 layers: `overspill.planning.self_draft`). A streamed
            pass costs the same for 1 or 64 tokens, so each accepted draft token is speed; drafts
            are verified one token at a time inside each layer, so greedy output is plain greedy's.
            None (default): plain decoding. `overspill.runtime.speculative.enable` switches it later.
        speculate_tree: with `speculate`, draft trees of up to this many tokens a pass (at least 2)
            instead of chains: where the draft's first choice is wrong its second often is not, and
            one verify pass holds every branch (`overspill.runtime.trees`; greedy stays plain greedy).
            Each pass's budget adapts between 2 and this to the acceptance measured in the request
            (`planning.trees.tree_budget`), as chain length does. Under `cuda_graphs` verify passes are
            graphed chains, so trees run as chains there (the plan says so in a note), and where
            `speculate="auto"` turns speculation off it is unused (a note too). None: chains.
        stream_format: how streamed layers travel over the link (`overspill.planning.formats`); each
            expands into the compute dtype in its GPU slot, overlapped with compute, and resident
            layers are unchanged. "bf16" (as they are), "lossless" (byte planes with the high plane
            entropy-coded: nvCOMP ANS on a GPU, `pip install 'overspill[compress]'`, zlib on the CPU;
            identical bits, ~0.68 of the bytes), "int8" / "fp8" (1 byte a weight and a float32 scale per
            group of 128 inputs), "int4" (groups of 128 with zero points), all lossy; or "auto": lossless on a GPU
            where nvCOMP is installed and decodes faster than the link, else bf16 with a note. A checkpoint
            that arrives quantized (GPTQ / AWQ int4, FP8, GGUF Q8_0 / Q6_K / Q5_x / Q4_x:
            `overspill.planning.prequantized`) streams its own codes under "auto" and its own format's name,
            expanded to its reference dequantization bit for bit; any other format starts from the
            dequantized weights.
        moe_streaming: how streamed mixture-of-experts layers move (`overspill.planning.moe`): "experts"
            (the ring carries attention, router, norms and shared experts; only the routed experts the
            batch selects cross the link, into a GPU cache of hot experts sized from the budget),
            "dense" (whole layers), or "auto" (default): experts where the plan predicts it faster
            (fewer bytes per step without a probe). Expert streaming needs bf16 pinned copies and
            eager decode; "auto" stream format then stays bf16 for MoE models.
        cpu_experts: under expert streaming, routed experts missing from the GPU cache that the host
            computes from its pinned copy instead of copying them (`overspill.planning.host_experts`, as
            llama.cpp's --n-cpu-moe does): "off" (default until its GPU runs have measured the gain),
            "on" (every miss once the cache's free slots are filled), or "auto" (per layer, the misses routed
            to the fewest tokens while that shortens the layer at the probed link and host rates). The
            host's arithmetic rounds differently, so logits move within bf16 noise. Mixtral, Qwen2/3-MoE,
            DeepSeek-V3 and Llama 4 experts.
        cpu_compute: the host CPU as a second tensor-parallel rank of every streamed layer
            (`overspill.planning.cpu_rank`, issue 16): a fraction of each streamed layer (KV-head groups
            and MLP columns) stays in host memory and the host computes it while the GPU computes the
            rest; only the GPU's share crosses the link. "auto": where the plan predicts a gain of 5%
            or more (batch 1 on a PCIe link: about 2x); "on": the planner's fraction whatever the
            gain; a number: that fraction; "off" (default until its GPU tests have run). Dense
            llama/mistral/qwen2/qwen3/phi3/gemma2 layers, bf16 pinned copies, eager `generate` (not
            serve/batch, CUDA graphs or speculation yet).
        cpu_compute_format: how the host keeps and multiplies its share with `cpu_compute`: "bf16"
            (default: as loaded, the same arithmetic as GPU-only streaming) or "int8" (one byte a weight
            and a scale per output row, in place of the share: about half its host bytes and, where
            the probe measured it, about twice the host's speed, so the planner gives the host a larger
            share; lossy, so tokens may differ from bf16's). Independent of `stream_format`, which
            must stay bf16 under the CPU rank; refused with cpu_compute="off".
        pipeline: this process is one rank of a pipeline over layers (issue 18; `overspill.runtime.pipeline`),
            in the process group torchrun's variables describe (`overspill run --gpus N` starts one): the
            ranks agree on contiguous spans of decoder layers (`overspill.planning.pipeline.split_layers`),
            and each places its own span under its own `gpu_memory` on its own GPU (cuda:LOCAL_RANK),
            streaming over its own link; rank 0 also holds the embeddings and LM head. Every rank calls
            `generate` with the same arguments and gets the same tokens. Not with a caller's plan, CUDA
            graphs, speculation, the CPU rank, lossy stream formats or expert streaming yet.
        probe: on CUDA, measure the machine (`overspill.runtime.hardware.probe`, ~10 s once, then cached)
            so the plan carries a predicted speed and bottleneck.

    Returns:
        (model, tokenizer): a `transformers` model that `generate` and `pipeline` accept, with the
        placement at `model.overspill`; tokenizer is None for config-only models.
    """
    stage = None
    if pipeline:  # this rank's device, before anything is placed on it
        from .runtime.pipeline import join

        stage = join(device, plan, cuda_graphs, speculate, cpu_compute, stream_format, moe_streaming)
        device, moe_streaming = stage.device, "dense"
    dev = _parse_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    try:
        check_cpu_experts(cpu_experts)
    except ValueError as exc:
        raise OverspillError(f"{exc} (--cpu-experts)") from None
    if speculate is not None and not isinstance(speculate, str):  # e.g. speculate=True
        raise OverspillError(f"speculate (--speculate) names a draft source: 'auto', 'ngram', 'self' or "
                             f"'draft:PATH' (None: plain decoding), got {speculate!r}")
    whole = [("context (--context)", context), ("batch (--batch, --max-batch)", batch), ("depth (--depth)", depth),
             ("pass_tokens", pass_tokens)]
    if speculate_tree is not None:
        whole.append(("speculate_tree (--speculate-tree)", speculate_tree))
    for name, value in whole:  # before comparisons that would fail deep inside with a TypeError
        try:
            operator.index(value)
        except TypeError:
            raise OverspillError(f"{name} must be a whole number, got {value!r}") from None
    if pass_tokens < 0:
        raise OverspillError(f"pass_tokens must be 0 (what generate needs) or more, got {pass_tokens}")
    if plan is not None and not isinstance(plan, Plan):
        raise OverspillError(f"plan must be an overspill Plan (e.g. from "
                             f"overspill.planning.placement.streaming_plan), got {type(plan).__name__}")
    if speculate is not None and speculate != "self":
        from .runtime.drafts import check_source

        check_source(speculate)
    try:
        check_tree(speculate_tree, speculate)
    except ValueError as exc:
        raise OverspillError(f"speculate_tree (--speculate-tree): {exc}") from None
    if context < 1:
        raise OverspillError(f"context (--context) must be at least 1, got {context}")
    if batch < 1:
        raise OverspillError(f"batch (--batch, --max-batch) must be at least 1, got {batch}")
    if cuda_graphs and dev.type != "cuda":  # before minutes of loading
        raise OverspillError("cuda_graphs (--cuda-graphs) needs a CUDA device; leave it off on the CPU")
    budget = resolve_budget(gpu_memory, dev)
    kv_bytes = None if kv_gpu_memory is None else parse_bytes(kv_gpu_memory, "kv_gpu_memory (--kv-gpu-memory)")
    if dev.type == "cuda" and not cudnn_sdpa:
        from .runtime.hardware import disable_cudnn_sdpa

        disable_cudnn_sdpa()
    if dev.type == "cuda":
        _expandable_segments()
    source = resolve(model, random_weights=random_weights)
    config = _load_config(source)
    scheme = _prequantized(config, source, random_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = build_skeleton(config, torch_dtype)
    _attach_generation_config(skeleton, source)  # before the weights: a broken file fails fast
    layers_path, layers = decoder_layers(skeleton)
    try:
        spread = spreads(layout, speculate)
    except ValueError as exc:
        raise OverspillError(str(exc)) from None
    workload = Workload(context, batch, pass_tokens=pass_tokens, graphs=cuda_graphs, spread=spread)
    if dev.type != "cuda":
        workload = replace(workload, activation_floor=0)
    spec = measured_spec(skeleton, layers, torch_dtype)
    if stage is not None:  # plan only this rank's span of layers; the rest become weightless stand-ins
        spec = stage.own_span(skeleton, spec, budget, workload, depth)
    fp = footprint_from_spec(spec)  # as `overspill plan` sizes it
    moe_layers = moe.MoeLayers.from_spec(spec)
    user_plan = plan is not None
    profile = None
    if probe and dev.type == "cuda":
        from .runtime.hardware import probe as probe_machine

        profile = probe_machine(device=dev)
    fmt_blocker = format_blocker(streaming, cuda_graphs, speculate, cpu_compute)
    fmt, fmt_note = _stream_format(stream_format, dev, profile, fmt_blocker)
    fmt, fmt_note = settle_format(fmt, fmt_note, stream_format, scheme, fmt_blocker or ("the pipeline" if stage else None),
                                  moe_layers.is_moe and moe_streaming != "dense")
    exact = encoded_layer_bytes(layers, fmt)
    if scheme is not None and fmt == scheme.stream_format:  # which weights it stores quantized: from its files
        reader = QuantizedReader(source.weights_dir, scheme)
        try:
            reader.bind(skeleton)
            exact = encoded_layer_bytes(layers, fmt, reader, layers_path)
        finally:
            reader.close()
    fp = with_format(fp, choose(fp, fmt, exact=exact))
    if stream_format == "auto" and moe_layers.is_moe and moe_streaming != "dense" and scheme is not None \
            and scheme.experts:  # a converted GGUF's experts cross as their codes: their exact bytes, from its files
        moe_layers = _coded_experts(moe_layers, source, scheme, skeleton, layers, layers_path, torch_dtype)
    self_draft = draft_note = None
    if plan is None:
        budget, draft_note = budget_beside_draft(speculate, budget, dtype_name(torch_dtype), context)
        blocker = moe.blocker(fp.stream_format, streaming, cuda_graphs, speculate)
        if speculate == "self":  # the int4 draft's bytes come out of the budget the bf16 layers share
            self_draft, plan = plan_self_draft(fp, budget, workload, depth, kv_bytes, fit_batch, Machine.of(profile))
            # whole MoE layers beside the draft, as for any draft: "experts" refused, "auto" noted (`moe.choose`)
            plan, moe_note = moe.choose(plan, fp, moe_layers, budget, moe_streaming, depth, blocker)
        else:
            plan, moe_note = moe.place_moe(fp, moe_layers, budget, workload, depth, kv_bytes, fit_batch, moe_streaming,
                                           blocker, profile)
            if prefix_instead(plan, workload.spread, layout, speculate):  # it drafts nothing: keep the prefix
                workload = replace(workload, spread=False)
                plan, moe_note = moe.place_moe(fp, moe_layers, budget, workload, depth, kv_bytes, fit_batch,
                                               moe_streaming, blocker, profile)
        if moe_note:
            plan = replace(plan, notes=plan.notes + (moe_note,))
        if draft_note:
            plan = replace(plan, notes=plan.notes + (draft_note,))
        plan = replace(plan, kv_device_bytes=kv_bytes)  # serving's KV admission reads the rows it reserved
    elif len(plan.layer_tiers) != len(layers):
        raise OverspillError(f"the plan places {len(plan.layer_tiers)} layers but the model has {len(layers)}")
    else:  # a caller's plan: the loader sizes its slots for the format (and sends coded experts where it can)
        plan = replace(plan, stream_format=fmt if plan.streamed_layers else "bf16",
                       expert_codes=moe_layers.coded and plan.moe_streaming == "experts")
    managed_wins = profile is not None and profile.managed_wins
    if streaming == "auto":  # expert streaming and encoded layers arrive by pinned copies
        streaming = plan.streaming if user_plan else "copy" if plan.moe_streaming == "experts" or \
            plan.stream_format != NATIVE else streaming
    plan = _with_streaming(plan, streaming, dev, managed_wins)
    check_format_plan(plan, cuda_graphs, speculate)
    blocker = moe.blocker(plan.stream_format, plan.streaming, cuda_graphs, speculate)
    model_type = getattr(config.get_text_config(), "model_type", "")
    host_refusal = host_experts_refusal(
        cpu_experts, model_type, moe_layers.is_moe, plan.moe_streaming == "experts" and bool(plan.streamed_layers),
        why_dense(plan.notes, moe_streaming, pipeline=stage is not None), coded=plan.expert_codes)
    if host_refusal:  # before minutes of loading
        raise OverspillError(host_refusal)
    if plan.moe_streaming == "experts" and plan.streamed_layers and blocker:  # a caller's plan
        raise OverspillError(f"expert streaming does not combine with {blocker} yet: use moe_streaming='dense'")
    moe_cpu = cpu_experts if host_experts_supported(model_type) else "off"
    if profile is not None:
        plan = moe.predict(fp, plan, moe_layers, profile, moe_cpu)
    if fmt_note and plan.streamed_layers:  # as `overspill plan` notes it
        plan = replace(plan, notes=plan.notes + (fmt_note,))
    past = positions_note(spec, plan.workload.context)
    if past:  # as `overspill plan` notes it, after the format's note
        plan = replace(plan, notes=plan.notes + (past,))
    plan = plan_cpu_rank(fp, plan, profile, cpu_compute, config, cuda_graphs, speculate, cpu_compute_format)
    host = profile.host_available_bytes if profile is not None else host_available_bytes()
    check_host(fp, plan, host, on_cpu=dev.type != "cuda")  # before minutes of loading; as `overspill plan`
    if stage is not None:
        plan = stage.global_plan(plan)
    if random_weights:
        weights: CheckpointReader | RandomWeights = RandomWeights(seed, getattr(config, "initializer_range", 0.02))
    elif scheme is not None:
        weights = QuantizedReader(source.weights_dir, scheme)
    else:
        weights = CheckpointReader(source.weights_dir)
    try:
        placement = materialize(skeleton, plan, dev, weights, progress=progress)
    finally:
        if isinstance(weights, CheckpointReader):
            weights.close()
    skeleton.overspill = placement
    if placement.experts is not None:  # to re-predict the plan from measured routing (`runtime.routing`)
        skeleton.overspill_moe = MoeBasis(fp, moe_layers, profile, moe_cpu)
    use_planned_cache(skeleton, placement)
    keep_grouped_experts(skeleton)
    if stage is not None:
        stage.install(skeleton)
    enable_planned(skeleton, profile.cpu_threads if profile is not None and profile.cpu_threads else None)
    experts_note = enable_host_experts(skeleton, placement.experts, cpu_experts,
                                       profile.h2d_bytes_s if profile is not None else 0.0,
                                       profile.cpu_gemv_params_s if profile is not None else 0.0)
    if experts_note:
        placement.plan = replace(placement.plan, notes=placement.plan.notes + (experts_note,))
    if speculate == "auto":
        speculate = auto_source(plan)
        if speculate is None and speculate_tree:
            placement.plan = replace(placement.plan, notes=placement.plan.notes + (
                f"speculate_tree={speculate_tree} is unused: speculate='auto' decodes plainly on this plan "
                "(`planning.speculation.auto_source`); name a source (e.g. speculate='ngram') to draft trees",))
    if cuda_graphs:  # on a CUDA device (checked before loading)
        from .runtime.graphs import enable_graphs

        enable_graphs(skeleton)
    if speculate is not None:
        from .runtime.speculative import enable, graphed_verify

        if speculate_tree and graphed_verify(skeleton):
            placement.plan = replace(placement.plan, notes=placement.plan.notes + (
                f"draft trees (speculate_tree={speculate_tree}) run as chains under CUDA graphs: graphed "
                "verify passes hold chains only; drop cuda_graphs for trees",))
        if speculate == "self":
            from .runtime.self_draft import make_self_drafter

            skeleton.self_draft = self_draft  # None under a caller's plan: every layer, not counted in it
            enable(skeleton, make_self_drafter(skeleton), tree=speculate_tree)
            skeleton.speculation_source = "self"
        else:
            enable(skeleton, speculate, tree=speculate_tree)
    return skeleton, _load_tokenizer(source, getattr(config.get_text_config(), "vocab_size", None))


def _coded_experts(moe_layers: moe.MoeLayers, source: ModelSource, scheme: Prequantized, skeleton, layers,
                   layers_path: str, dtype: torch.dtype) -> moe.MoeLayers:
    """`moe_layers` with each routed expert's bytes over the link as the converted GGUF's codes
    (`expert_loader.coded_expert_bytes`, exact), where its files keep any."""
    from .runtime.expert_loader import coded_expert_bytes

    reader = QuantizedReader(source.weights_dir, scheme)
    try:
        reader.bind(skeleton)
        sizes = coded_expert_bytes(layers, reader, layers_path)
    finally:
        reader.close()
    return moe_layers if sizes is None else moe.with_codes(moe_layers, sizes, dtype.itemsize)


def _stream_format(name: str, dev: torch.device, profile: Profile | None,
                   blocker: str | None = None) -> tuple[str, str | None]:
    """(format, note) for `load(stream_format=...)`: "auto" picks lossless on a GPU where nvCOMP is
    installed and decodes faster than the probed link, else bf16 (`planning.formats.resolve_auto`),
    and bf16 where `blocker` rules encoded layers out."""
    from .runtime.lossless_codec import codec_installed

    try:
        check_format(name)
    except ValueError as exc:
        raise OverspillError(f"{exc} (--stream-format)") from None
    if name == "auto":
        if dev.type != "cuda":
            return NATIVE, None
        if profile is None:
            return resolve_auto(codec_installed(), 0.0, blocker=blocker)
        return resolve_auto(codec_installed(), profile.h2d_bytes_s, profile.decode_bytes_s, blocker=blocker)
    if name == "lossless" and dev.type == "cuda" and not codec_installed():
        raise OverspillError("stream format lossless needs nvCOMP on a GPU: pip install 'overspill[compress]', "
                             "or use --stream-format bf16")
    return name, None


def _expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place, unless the user configured it.

    A chunked prefill allocates attention temporaries that grow with every chunk (the grouped KV
    heads expanded to all heads: 4 GiB a layer at 128k tokens on the 70B shape); with fixed
    segments their freed blocks are split for other tensors and stay reserved, so memory the plan
    counted as free was not allocatable (a 128k prefill ran out with 8.7 GiB reserved but unused).
    """
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.10; older: torch.cuda's
    try:
        (setting or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    except (AttributeError, RuntimeError):  # an allocator without the setting: plain segments
        pass


def _has_cuda_bindings() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:  # no `cuda` package at all
        return False


def _with_streaming(plan: Plan, streaming: str, dev: torch.device, managed_wins: bool = False) -> Plan:
    """The plan with its streaming mode chosen, refusing managed memory that could hang a PCIe GPU."""
    if dev.type != "cuda":
        if streaming in MANAGED_MODES:
            raise OverspillError(f"{streaming} weights need a CUDA device; leave streaming at 'auto' or 'copy' on the CPU")
        return replace(plan, streaming=choose_streaming(streaming, managed_wins=False))
    mode = choose_streaming(streaming, managed_wins)
    notes = plan.notes
    if mode in MANAGED_MODES and streaming == "auto" and not _has_cuda_bindings():
        mode = "copy"
        notes += ("managed memory read in place measured faster here: pip install 'overspill[managed]' to use it; "
                  "copying from pinned memory meanwhile",)
    if mode in MANAGED_MODES and plan.streamed_layers:
        from .runtime.hardware import coherent_platform
        from .runtime.managed import check_managed_bytes

        coherent = coherent_platform(dev.index if dev.index is not None else torch.cuda.current_device())
        # what stays free once the plan's resident weights, slots and workspace are allocated
        free = max(torch.cuda.mem_get_info(dev)[0] - plan.device_bytes, 0)
        check_managed_bytes(plan.streamed_bytes_per_step, free, coherent)
        if not coherent and mode == "managed":
            notes += ("prefetched managed layers on a non-coherent GPU: the prediction assumes pinned-copy speed, "
                      "where bench/managed.py measured 24-33% of it on the H100 (mapped: 90%)",)
    return replace(plan, streaming=mode, notes=notes)


def _attach_generation_config(model: torch.nn.Module, source: ModelSource) -> None:
    if source.config_dir is None or not (source.config_dir / "generation_config.json").exists():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(source.config_dir))
    except Exception as exc:  # noqa: BLE001 - JSON, field or value errors of a dependency: one line
        raise OverspillError(f"cannot read generation_config.json in {source.config_dir}: {one_line(exc)}; "
                             f"fix or delete that file") from None
