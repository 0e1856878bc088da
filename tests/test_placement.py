"""Placed models generate exactly what the same model generates fully resident.

Every tiny architecture is loaded under budgets that keep 0, 4 or all 8 decoder layers on the
"device" (on a CPU-only machine the same ring runs with host copies), and greedy tokens are
compared with plain `transformers`. The embedded SmolLM2-135M-Instruct checks a real model through
`pipeline` and `generate`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import overspill
from overspill.api import placement_of
from overspill.planning.placement import budget_for, streaming_plan
from overspill.planning.plan import Tier, Workload
from overspill.runtime.executor import HostEmbedding, StreamedLayer
from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

from conftest import ARCHS, N_LAYERS, TINY_CONFIGS, VOCAB

CONTEXT = 64
GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)  # min: eos cannot cut it short
QUESTION = [{"role": "user", "content": "What is the highest mountain in the world?"}]


def prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 12-token prompt, and a batch of two with the first row left-padded by 3."""
    g = torch.Generator().manual_seed(1234)
    single = torch.randint(3, VOCAB, (1, 12), generator=g)
    batch = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(batch)
    batch[0, :3], mask[0, :3] = 0, 0
    return single, batch, mask


def resident_budget(path, resident: int, dtype: torch.dtype = torch.float32, depth: int = 2) -> int:
    """The budget (bytes) under which the CPU planner keeps exactly `resident` layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), dtype)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], dtype)
    return budget_for(fp, Workload(CONTEXT, 1, activation_floor=0), resident, depth)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """`reference(arch, dtype) -> model`: the checkpoint loaded by plain transformers, fully resident."""
    cache: dict = {}

    def get(arch: str, dtype: torch.dtype = torch.float32):
        if (arch, dtype) not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint(arch)), dtype=dtype)
            cache[arch, dtype] = model.eval()
        return cache[arch, dtype]

    return get


def load_tiny(path, resident: int, dtype=torch.float32, depth: int = 2, **kwargs):
    # whole streamed layers: `resident_budget` is dense streaming's (tests/test_moe.py covers expert streaming)
    kwargs.setdefault("moe_streaming", "dense")
    model, _ = overspill.load(
        path, gpu_memory=resident_budget(path, resident, dtype, depth), dtype=dtype, context=CONTEXT,
        depth=depth, progress=False, **kwargs
    )
    return model


def generate_with_logits(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every step, [new_tokens, batch, vocab]."""
    out = model.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN, **kwargs)
    return out.sequences, torch.stack(out.logits)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def layers_of(model) -> torch.nn.ModuleList:
    return model.get_submodule(placement_of(model).layers_path)


@pytest.mark.parametrize("resident", [0, 4, N_LAYERS])
@pytest.mark.parametrize("arch", ARCHS)
def test_placed_generate_matches_resident(arch: str, resident: int, tiny_checkpoint, reference) -> None:
    path = tiny_checkpoint(arch)
    model = load_tiny(path, resident)
    ref = reference(arch)
    placement = placement_of(model)
    plan = placement.plan
    streamed = N_LAYERS - resident

    # The plan keeps exactly the *last* `resident` layers; the first ones stream.
    assert plan.resident_layers == tuple(range(streamed, N_LAYERS))
    assert plan.streamed_layers == tuple(range(streamed))
    layers = layers_of(model)
    assert [i for i, layer in enumerate(layers) if isinstance(layer, StreamedLayer)] == list(range(streamed))
    assert not any(p.device.type == "meta" for p in model.parameters())

    # Untied embeddings leave the device as soon as anything streams; tied ones (gemma2) stay.
    tied = bool(TINY_CONFIGS[arch].get("tie_word_embeddings", ref.config.tie_word_embeddings))
    host_embed = streamed > 0 and not tied
    assert plan.embed_tier is (Tier.HOST if host_embed else Tier.DEVICE)
    assert isinstance(model.get_input_embeddings(), HostEmbedding) == host_embed

    single, batch, mask = prompts()
    with torch.no_grad():
        # Same weights and kernels; logits agree to float rounding (GEMM paths may depend on alignment).
        close(model(single).logits, ref(single).logits)
        # Every decode step's logits match too (random tiny models often repeat one token).
        want, want_logits = generate_with_logits(ref, single)
        got, got_logits = generate_with_logits(model, single)
        assert torch.equal(got, want)
        close(got_logits, want_logits)
        # Batch of two with left padding and an attention mask.
        want_b, want_b_logits = generate_with_logits(ref, batch, attention_mask=mask)
        got_b, got_b_logits = generate_with_logits(model, batch, attention_mask=mask)
        assert torch.equal(got_b, want_b)
        close(got_b_logits, want_b_logits)

    if streamed:
        ring = placement.ring
        assert ring is not None and len(ring.layers) == streamed
        assert ring.n_slots == min(plan.depth + 1, streamed) == plan.slots
        # One restart: the initial priming. More would mean the ring lost the visiting order.
        assert ring.restarts == 1
        # Host staging holds exactly the streamed layers' packed bytes.
        assert placement.host_bytes == plan.streamed_bytes_per_step > 0
    else:
        assert placement.ring is None and plan.slots == 0 and placement.host_bytes == 0


# Ring shapes: slots dividing the streamed count or not, 2 slots, and 7 slots for 8 streamed layers.
@pytest.mark.parametrize(("depth", "resident"), [(1, 0), (1, 5), (2, 3), (3, 2), (6, 0)])
def test_ring_depths(depth: int, resident: int, tiny_checkpoint, reference) -> None:
    model = load_tiny(tiny_checkpoint("qwen2"), resident, depth=depth)
    ref = reference("qwen2")
    placement = placement_of(model)
    assert len(placement.plan.resident_layers) == resident
    assert placement.ring.n_slots == depth + 1
    single, batch, mask = prompts()
    with torch.no_grad():
        assert torch.equal(model.generate(single, **GEN), ref.generate(single, **GEN))
        assert torch.equal(
            model.generate(batch, attention_mask=mask, **GEN), ref.generate(batch, attention_mask=mask, **GEN)
        )
    assert placement.ring.restarts == 1


def test_bf16_streamed_matches_resident(tiny_checkpoint, reference) -> None:
    path = tiny_checkpoint("llama")
    model = load_tiny(path, 0, dtype=torch.bfloat16)
    ref = reference("llama", torch.bfloat16)
    # The placed weights are bf16 too (cast on load from the fp32 checkpoint).
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert placement_of(model).plan.resident_layers == ()
    single, batch, mask = prompts()
    with torch.no_grad():
        assert torch.equal(model.generate(single, **GEN), ref.generate(single, **GEN))
        assert torch.equal(
            model.generate(batch, attention_mask=mask, **GEN), ref.generate(batch, attention_mask=mask, **GEN)
        )
    assert placement_of(model).ring.restarts == 1


@pytest.mark.parametrize("streamed", [1, 2, 3])
def test_explicit_plan_streams_fewer_layers_than_slots(streamed: int, tiny_checkpoint, reference) -> None:
    # An explicit plan can stream counts the greedy rule never picks (fewer layers than ring slots).
    path = tiny_checkpoint("mistral")
    skeleton = build_skeleton(AutoConfig.from_pretrained(path), torch.float32)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.float32)
    plan = streaming_plan(fp, Workload(64, 2, activation_floor=0), streamed)
    model, _ = overspill.load(path, dtype="float32", plan=plan, progress=False)
    placement = placement_of(model)
    assert placement.plan.streamed_layers == tuple(range(streamed))
    assert placement.ring.n_slots == min(streamed, 3)
    single, _, _ = prompts()
    with torch.no_grad():
        assert torch.equal(model.generate(single, **GEN), reference("mistral").generate(single, **GEN))
    assert placement.ring.restarts == 1


def test_random_weights_independent_of_budget(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    single, _, _ = prompts()
    outputs = []
    for resident, seed in ((0, 0), (N_LAYERS, 0), (4, 0), (0, 1)):
        model = load_tiny(path, resident, random_weights=True, seed=seed)
        assert len(placement_of(model).plan.resident_layers) == resident
        with torch.no_grad():
            outputs.append(model.generate(single, **GEN))
    # Same seed: identical tokens wherever each tensor was placed.
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    # A different seed gives a different model.
    assert not torch.equal(outputs[0], outputs[3])


def test_ring_recovers_from_interrupted_forward(tiny_checkpoint, reference) -> None:
    model = load_tiny(tiny_checkpoint("llama"), 4)
    ref = reference("llama")
    ring = placement_of(model).ring
    single, _, _ = prompts()
    with torch.no_grad():
        want = ref.generate(single, **GEN)
        assert torch.equal(model.generate(single, **GEN), want)
        assert ring.restarts == 1

        # An exception inside streamed layer 2 (after its slot was entered) aborts the pass midway.
        def boom(module, args, kwargs):
            raise RuntimeError("boom")

        handle = layers_of(model)[2].block.register_forward_pre_hook(boom, with_kwargs=True)
        with pytest.raises(RuntimeError, match="boom"):
            model(single)
        handle.remove()

        # The next pass starts at layer 0 while the ring expects layer 2: it restarts once, stays correct.
        assert torch.equal(model.generate(single, **GEN), want)
        assert ring.restarts == 2

        # A pass abandoned before any layer ran (bad input to the embedding) leaves the ring in order.
        with pytest.raises(Exception):
            model(torch.full((1, 4), VOCAB + 10))
        assert torch.equal(model.generate(single, **GEN), want)
        assert ring.restarts == 2


def test_ring_recovers_from_out_of_order_layer_call(tiny_checkpoint, reference) -> None:
    model = load_tiny(tiny_checkpoint("mistral"), 4)
    ref = reference("mistral")
    ring = placement_of(model).ring
    single, _, _ = prompts()
    layers = layers_of(model)
    captured = {}

    # Record the arguments streamed layer 1 sees, then replay that call by itself, out of order.
    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(single, use_cache=False)  # no KV cache: replaying the layer must not append to it
        handle.remove()
        args, kwargs = captured["call"]
        alone = layers[1](*args, **kwargs)
        assert ring.restarts == 2  # the ring expected layer 0 and restarted at 1
        # The replayed layer computed with its own weights: same output as the reference's layer 1.
        expected = ref.model.layers[1](*args, **kwargs)
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        close(first(alone), first(expected))
        # The ring now expects layer 2; the next generate restarts once more at 0 and stays correct.
        assert torch.equal(model.generate(single, **GEN), ref.generate(single, **GEN))
        assert ring.restarts == 3


# --- the embedded SmolLM2-135M-Instruct (converted once per session into the test cache) -----------


@pytest.fixture(scope="module")
def smollm_streamed(default_model_dir):
    model, tokenizer = overspill.load(None, gpu_memory="500MiB", progress=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm_resident(default_model_dir):
    model, tokenizer = overspill.load(None, gpu_memory=None, progress=False)
    return model, tokenizer


def test_pipeline_on_streamed_default_model(smollm_streamed) -> None:
    model, tokenizer = smollm_streamed
    placement = placement_of(model)
    # 500 MiB (float32 on the CPU) is too small for all 30 layers: some stream through the ring.
    assert placement.plan.streamed_layers and placement.plan.resident_layers
    assert all(isinstance(layers_of(model)[i], StreamedLayer) for i in placement.plan.streamed_layers)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe(QUESTION, max_new_tokens=24, do_sample=False)
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert "Everest" in answer["content"]
    assert placement.ring.restarts == 1


def test_generate_on_resident_default_model(smollm_resident, smollm_streamed) -> None:
    model, tokenizer = smollm_resident
    assert placement_of(model).plan.streamed_layers == () and placement_of(model).ring is None
    enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "Everest" in answer
        # The streamed placement of the same checkpoint gives the same tokens.
        streamed, _ = smollm_streamed
        assert torch.equal(streamed.generate(**enc, max_new_tokens=24, do_sample=False), out)


# --- held-out architectures: layouts the loader was not written against ----------------------------

HELD_OUT_SHAPE = {"vocab_size": VOCAB, "initializer_range": 0.1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
HELD_OUT: dict[str, dict] = {
    # Pythia layout: transformers 5 names the head `lm_head` while save_pretrained writes `embed_out`.
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
                 "intermediate_size": 96, "max_position_embeddings": 256, **HELD_OUT_SHAPE},
    # Tied head, learned positions, blocks at `transformer.h`.
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": N_LAYERS, "n_head": 4, "n_positions": 256, **HELD_OUT_SHAPE},
    # Grouped KV heads under Falcon's own name (num_kv_heads), fused query_key_value.
    "falcon": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
               "new_decoder_architecture": True, "num_kv_heads": 2, **HELD_OUT_SHAPE},
}


@pytest.fixture(scope="session")
def held_out_checkpoint(tmp_path_factory):
    """`held_out_checkpoint(arch) -> Path`: a `save_pretrained` checkpoint of a HELD_OUT architecture."""
    built: dict[str, object] = {}

    def make(arch: str):
        if arch not in built:
            d = dict(HELD_OUT[arch])
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(d.pop("model_type"), **d)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            path = tmp_path_factory.mktemp(f"held-out-{arch}")
            model.save_pretrained(str(path))
            built[arch] = path
        return built[arch]

    return make


@pytest.mark.parametrize("resident", [0, 4])
@pytest.mark.parametrize("arch", sorted(HELD_OUT))
def test_held_out_architecture_streams_and_matches_transformers(arch: str, resident: int, held_out_checkpoint) -> None:
    path = held_out_checkpoint(arch)
    model = load_tiny(path, resident)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    plan = placement_of(model).plan
    # Streaming really happens: the first N_LAYERS - resident blocks go through the ring.
    assert plan.streamed_layers == tuple(range(N_LAYERS - resident))
    assert sum(isinstance(layer, StreamedLayer) for layer in layers_of(model)) == N_LAYERS - resident
    single, _, _ = prompts()
    with torch.no_grad():
        want, want_logits = generate_with_logits(ref, single)
        got, got_logits = generate_with_logits(model, single)
    assert torch.equal(got, want)
    close(got_logits, want_logits)


@pytest.mark.parametrize("arch", sorted(HELD_OUT))
def test_held_out_architecture_speculates_as_plain_greedy(arch: str, held_out_checkpoint) -> None:
    """Speculation verifies drafts one token at a time inside each block (`token_serial`), which must
    find the mask by name: GPT-2 passes it positionally, and every drafted pass raised a TypeError."""
    path = held_out_checkpoint(arch)
    model, _ = overspill.load(str(path), dtype="float32", context=64, speculate="ngram", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8] * 3])  # repeats, so the n-gram draft proposes tokens
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **gen), ref.generate(ids, **gen))


@pytest.mark.parametrize("arch", sorted(HELD_OUT))
def test_plan_sizes_held_out_architectures_as_load_measures_them(arch: str, held_out_checkpoint) -> None:
    """`overspill plan` on a checkpoint without a config formula here (GPT-2 names its sizes n_embd, n_head:
    it was refused as 'missing required keys') measures the meta model as `load` does, so both see one spec."""
    from overspill import commands
    from overspill.runtime.loader import measured_spec

    path = held_out_checkpoint(arch)
    spec = commands._plan_spec(str(path), "float32")
    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), torch.float32)
    assert spec == measured_spec(skeleton, decoder_layers(skeleton)[1], torch.float32)
    assert not spec.approximate
