"""The CPU rank (issue 16): streamed layers split between the "GPU" and the host CPU give the
resident model's logits and greedy tokens.

On this CPU-only machine the "GPU" share runs the ring with host copies and the CPU share runs on
the rank's worker thread, so the split arithmetic (head groups, MLP columns, the two joins, the
CPU heads' own KV) is checked end to end for every tiny dense architecture, batch 1 and batched,
with the KV on the "device" and in the host tier.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from overspill.api import placement_of
from overspill.errors import OverspillError
from overspill.runtime import cpu_rank
from overspill.runtime.split_layer import SplitLayer
from overspill.runtime.tp_split import SUPPORTED, Share, dims_of, share_of, split_tensor

from conftest import ARCHS, N_LAYERS, hf_config
from test_placement import GEN, load_tiny, prompts

DENSE = [a for a in ARCHS if a in SUPPORTED]


def _reference(path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _generate(model, ids, mask=None):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **GEN)
    return out.sequences, torch.stack(out.logits)


def _split_model(path, fraction: float = 0.8, max_tokens: int = 64, **kwargs):
    # 0.8: MLP columns first (`share_of`), so this is the least that also puts a KV head on the CPU
    model = load_tiny(path, resident=0, **kwargs)
    cpu_rank.enable(model, {i: fraction for i in range(N_LAYERS)}, threads=1, max_tokens=max_tokens)
    return model


@pytest.mark.parametrize("arch", DENSE)
def test_split_tensors_keep_gqa_groups_and_rebuild_the_layer(arch: str, reference_weights) -> None:
    # Every split parameter's GPU and CPU parts are whole KV-head groups (q rows of a group follow
    # its KV head) and whole MLP columns, and put back together they are the layer's own tensor.
    layer, config = reference_weights(arch)
    dims = dims_of(config)
    share = Share(1, 48)  # of 2 KV heads (groups of 2 query heads) and 96 intermediate columns
    d = dims.head_dim
    for name, tensor in layer.named_parameters():
        gpu, cpu = split_tensor(dims, share, name, tensor.detach())
        if cpu is None:
            assert gpu is tensor.detach() or torch.equal(gpu, tensor)
            continue
        if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(torch.cat([gpu, cpu], dim=1), tensor)
        elif name.startswith("self_attn.q_proj"):
            assert gpu.shape[0] == (dims.kv_heads - 1) * dims.group * d  # GPU: KV head 0's query group
            assert torch.equal(torch.cat([gpu, cpu]), tensor)
        elif name in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            assert torch.equal(gpu, cpu)  # per head_dim: every rank needs it whole
        elif name == "self_attn.qkv_proj.weight":
            q, k, v = tensor.split([dims.heads * d, dims.kv_heads * d, dims.kv_heads * d])
            half_q = q.shape[0] // 2
            assert torch.equal(gpu, torch.cat([q[:half_q], k[:d], v[:d]]))
            assert torch.equal(cpu, torch.cat([q[half_q:], k[d:], v[d:]]))
        elif name == "mlp.gate_up_proj.weight":
            gate, up = tensor.chunk(2)
            assert torch.equal(gpu, torch.cat([gate[:48], up[:48]]))
            assert torch.equal(cpu, torch.cat([gate[48:], up[48:]]))
        else:
            assert torch.equal(torch.cat([gpu, cpu]), tensor)


@pytest.fixture(scope="session")
def reference_weights():
    def get(arch: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
        return model.model.layers[0], model.config

    return get


@pytest.mark.parametrize("arch", DENSE)
def test_split_layers_match_resident_batch_1_and_batched(arch: str, tiny_checkpoint) -> None:
    path = tiny_checkpoint(arch)
    ref = _reference(path)
    model = _split_model(path)
    layers = model.get_submodule(placement_of(model).layers_path)
    assert all(isinstance(layer, SplitLayer) and layer.share == Share(1, 95) for layer in layers)
    single, batch, mask = prompts()
    with torch.no_grad():
        got, got_logits = _generate(model, single)
        want, want_logits = _generate(ref, single)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        got, got_logits = _generate(model, batch, mask)
        want, want_logits = _generate(ref, batch, mask)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_the_worker_joins_each_layer_on_the_host_as_the_device_does(arch: str, tiny_checkpoint, monkeypatch) -> None:
    """The worker keeps its own copy of the residual stream (the next layer's input comes from it, not from the
    device) and it equals the device's bit for bit; gemma2, which normalizes the joined sums, sends every input."""
    model = _split_model(tiny_checkpoint(arch))
    rank = placement_of(model).cpu_rank
    carried = []  # per job: whether its input is the worker's own copy (no input sent)
    submit = rank.submit
    monkeypatch.setattr(rank, "submit", lambda fn, x, *args: carried.append(x is None) or submit(fn, x, *args))
    single, _, _ = prompts()
    with torch.no_grad():
        _generate(model, single)
    rank.pool.submit(lambda: None).result()  # the last job's host join has finished
    assert torch.equal(rank.carry, rank.carry_for)
    layers = len(model.get_submodule(placement_of(model).layers_path))
    steps = GEN["max_new_tokens"]  # passes, the prompt's included (12 tokens: under max_tokens, so split too)
    assert len(carried) == layers * steps
    assert sum(carried) == (0 if arch == "gemma2" else (layers - 1) * steps)  # else all but each pass's first


def test_a_failure_on_either_side_ends_the_pass_with_its_error(tiny_checkpoint, monkeypatch) -> None:
    """The device side and the worker wait on each other within a layer: an error on one side must reach the
    caller, not leave the other waiting forever; the model decodes again afterwards."""
    import threading

    model = _split_model(tiny_checkpoint("llama"))
    layer = model.get_submodule(placement_of(model).layers_path)[1]
    single, _, _ = prompts()
    want = _generate(model, single)[0]
    for side in ("worker", "device"):
        def boom(*args, **kwargs):
            raise RuntimeError(f"{side} failed")

        if side == "device":
            monkeypatch.setattr(layer.gpu_mlp, "forward", boom)
        else:  # the worker's norm and MLP share: one traced call since the first pass
            monkeypatch.setattr(layer, "mlp_call", boom)
        errors = []
        run = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, _generate, model, single)))
        run.start()
        run.join(60)
        assert not run.is_alive() and errors and f"{side} failed" in str(errors[0].value)
        monkeypatch.undo()
        assert torch.equal(_generate(model, single)[0], want)
    rank = placement_of(model).cpu_rank
    for where in ("before the job", "after its last hand-over"):
        calls = []

        def failing(*args, where=where, real_run=rank._run, real_received=rank.received):
            calls.append(1)
            if where == "before the job" and len(calls) == 3:  # as a failed copy event would
                raise RuntimeError(f"failed {where}")
            if where != "before the job" and len(calls) == 6:  # layer 2's wait for the device's MLP sum
                raise RuntimeError(f"failed {where}")
            return (real_run if where == "before the job" else real_received)(*args)

        monkeypatch.setattr(rank, "_run" if where == "before the job" else "received", failing)
        errors = []
        run = threading.Thread(target=lambda: errors.append(pytest.raises(Exception, _generate, model, single)))
        run.start()
        run.join(60)
        assert not run.is_alive() and errors, where  # no hang, and no tokens from a stale residual
        monkeypatch.undo()
        assert torch.equal(_generate(model, single)[0], want)


def _raises_within(seconds: float, fn, *args):
    """The exception `fn(*args)` raises, run on a thread: a hang fails the test instead of blocking the run."""
    import threading

    caught = []

    def run():
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            caught.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    assert caught, "no error reached the Python thread"
    return caught[0]


def test_a_worker_failure_reaches_the_python_thread_and_releases_every_join(tiny_checkpoint, monkeypatch) -> None:
    """The device's side of a join no longer waits on a future of the job: a job that raises records its error
    and releases the joins it promised (their sums NaN), and the Python thread raises that error at its next
    join or submit. Either way no join stays unreleased, nothing stays recorded, and the model decodes again."""
    model = _split_model(tiny_checkpoint("llama"))
    rank = placement_of(model).cpu_rank
    layers = model.get_submodule(placement_of(model).layers_path)
    single, _, _ = prompts()
    want = _generate(model, single)[0]

    def boom(*args, **kwargs):
        raise RuntimeError("worker attention failed")

    monkeypatch.setattr(layers[2].worker_modules[0], "forward", boom)  # before its first hand-over: at a join
    error = _raises_within(60, _generate, model, single)
    assert isinstance(error, RuntimeError) and "worker attention failed" in str(error)
    monkeypatch.undo()
    handoff = rank.handoff
    assert handoff.error is None and handoff.delivered == handoff.issued and handoff.counter.item() == handoff.issued
    assert torch.equal(_generate(model, single)[0], want)

    # after its last hand-over in the last layer: raised at that layer's join if the Python thread checks after the
    # error is recorded, else at the next pass's first submit
    calls, joins_per_pass = [], 2 * len(layers)

    def late(box, real=rank.received):
        calls.append(1)
        if len(calls) == joins_per_pass:
            raise RuntimeError("failed after the last hand-over")
        return real(box)

    monkeypatch.setattr(rank, "received", late)
    submitted = []
    submit = rank.submit
    monkeypatch.setattr(rank, "submit", lambda *args: submitted.append(1) or submit(*args))
    error = _raises_within(60, _generate, model, single)
    assert "failed after the last hand-over" in str(error)
    assert len(submitted) in (len(layers), len(layers) + 1)
    monkeypatch.undo()
    assert handoff.error is None and handoff.delivered == handoff.issued
    recorded = RuntimeError("recorded by an earlier job")  # as a job of the last pass leaves it: the next submit raises
    handoff.error = recorded
    assert _raises_within(60, _generate, model, single) is recorded and handoff.error is None
    assert torch.equal(_generate(model, single)[0], want)


def test_handoff_delivers_in_order_and_a_failed_job_releases_its_joins_as_nan() -> None:
    import threading

    from overspill.runtime.cpu_rank import Handoff

    handoff = Handoff(torch.device("cpu"))
    like = torch.zeros(2, 3, dtype=torch.bfloat16)
    first, second, third = (handoff.ticket(like) for _ in range(3))
    assert [t.seq for t in (first, second, third)] == [1, 2, 3] and first.dst.dtype == torch.bfloat16
    part = torch.randn(2, 3)
    handoff.deliver(first, part)  # float32 in, the device partial's dtype out
    assert torch.equal(handoff.collect(first), part.to(torch.bfloat16)) and handoff.counter.item() == 1
    waiting = []
    collector = threading.Thread(target=lambda: waiting.append(pytest.raises(RuntimeError, handoff.collect, third)))
    collector.start()
    collector.join(0.2)
    assert collector.is_alive()  # on the CPU the Python thread waits for the worker's sum
    handoff.fail(RuntimeError("job failed"), upto=3)
    collector.join(10)
    assert not collector.is_alive() and "job failed" in str(waiting[0].value)
    assert second.dst.isnan().all() and third.dst.isnan().all() and handoff.counter.item() == 3
    # the counter is the sequence number mod 2**32 as an int32, as cuStreamWaitValue32 compares it (cyclically)
    handoff.error, handoff.issued, handoff.delivered = None, 2**32 - 1, 2**32 - 1
    wrapped = handoff.ticket(like)
    handoff.deliver(wrapped, part)
    assert wrapped.seq == 2**32 and handoff.counter.item() == 0 and torch.equal(handoff.collect(wrapped), part.bfloat16())


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_join_counter_is_stored_in_order_on_each_host(machine: str, monkeypatch) -> None:
    """x86 stores the counter plainly; other hosts through libatomic's store-release (present on this host too,
    so its call is checked here), or refuse with what to install."""
    from overspill.errors import OverspillError
    from overspill.runtime import cpu_rank

    if machine != "x86_64" and cpu_rank._atomic_store32() is None:
        pytest.skip("no libatomic.so.1 on this host")
    counter = torch.zeros(1, dtype=torch.int32)
    store = cpu_rank.counter_store(machine)
    assert store is (cpu_rank.plain_store32 if machine == "x86_64" else cpu_rank.release_store32)
    for value in (7, -(2**31), 2**31 - 1, -1):
        store(counter.data_ptr(), value)
        assert counter.item() == value
    if machine != "x86_64":  # refused when the handoff is made, never in the worker
        monkeypatch.setattr(cpu_rank, "_atomic_store32", lambda: None)
        with pytest.raises(OverspillError, match="libatomic"):
            cpu_rank.counter_store(machine)


@pytest.mark.parametrize("fraction", [0.5, 0.8])  # MLP columns only; and a KV head
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_wide_passes_compute_the_cpu_share_on_the_device(arch: str, fraction: float, tiny_checkpoint) -> None:
    # max_tokens=1: prompts (12 tokens) and batched decode (2 tokens a pass) are wide, so the CPU
    # share is copied beside the slot's share and computed there, its heads' KV written to the host
    # layers; batch-1 decode (1 token) goes back to the worker, reading that KV.
    path = tiny_checkpoint(arch)
    ref = _reference(path)
    model = _split_model(path, fraction, max_tokens=1)
    single, batch, mask = prompts()
    with torch.no_grad():
        got, got_logits = _generate(model, single)
        want, want_logits = _generate(ref, single)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(_generate(model, batch, mask)[0], _generate(ref, batch, mask)[0])
    layer = model.get_submodule(placement_of(model).layers_path)[0]
    home = layer.cpu_share.named_views()["mlp.down_proj.weight"]
    assert layer.cpu_mlp.down_proj.weight.data_ptr() == home.data_ptr()  # back on its host buffer after a wide pass


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_the_cpu_share_is_what_the_cpu_computes(arch: str, tiny_checkpoint) -> None:
    # Control: zeroing the CPU's share (its heads' o_proj columns, its MLP columns) changes the
    # logits, so the CPU worker's partial sums are really part of every layer's output.
    path = tiny_checkpoint(arch)
    model = _split_model(path)
    single, _, _ = prompts()
    with torch.no_grad():
        _, before = _generate(model, single)
        for layer in model.get_submodule(placement_of(model).layers_path):
            layer.cpu_attn.o_proj.weight.zero_()
            layer.cpu_mlp.down_proj.weight.zero_()
        _, after = _generate(model, single)
    assert (before[0] - after[0]).abs().max() > 1e-2


@pytest.mark.parametrize("fraction", [0.5, 0.8])  # MLP columns only; and a KV head
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_split_layers_with_host_tier_kv(arch: str, fraction: float, tiny_checkpoint) -> None:
    # The GPU heads' KV in the TieredCache's host tier (staged through its ring), the CPU heads' KV
    # in the rank's own host layers: greedy tokens as resident.
    path = tiny_checkpoint(arch)
    ref = _reference(path)
    dims = dims_of(hf_config(arch))
    kv_layer = 2 * dims.kv_heads * dims.head_dim * 4 * 64  # float32, the tests' 64-token context
    model = _split_model(path, fraction, kv_gpu_memory=6 * kv_layer)  # 5 of 8 layers keep KV in host memory
    assert placement_of(model).plan.kv_host_layers
    single, batch, mask = prompts()
    with torch.no_grad():
        assert torch.equal(_generate(model, single)[0], _generate(ref, single)[0])
        assert torch.equal(_generate(model, batch, mask)[0], _generate(ref, batch, mask)[0])


def test_fractions_round_to_whole_groups_and_columns() -> None:
    dims = dims_of(hf_config("llama"))
    # MLP columns first (192 weights each), then KV-head groups (6144 each) for what the columns cannot hold
    assert share_of(dims, 0.0) == Share(0, 0)
    assert share_of(dims, 0.2) == Share(0, 32) and share_of(dims, 0.5) == Share(0, 80)
    assert share_of(dims, 0.6) == Share(0, 95)  # every column the GPU can spare, and 0.03 of a KV head: none
    assert share_of(dims, 0.8) == Share(1, 95) == share_of(dims, 1.0)  # the GPU keeps a head and a column
    assert cpu_rank.tp_share(dims, 0.001) is None


def test_moe_layers_are_refused(tiny_checkpoint) -> None:
    model = load_tiny(tiny_checkpoint("mixtral"), resident=0)
    with pytest.raises(OverspillError, match="cpu_compute='off'"):
        cpu_rank.enable(model, {0: 0.5})


def test_load_with_a_cpu_fraction_splits_every_streamed_layer(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen2")
    model = load_tiny(path, resident=4, cpu_compute=0.5)
    plan = placement_of(model).plan
    assert plan.cpu_fraction == 0.5 and plan.cpu_max_tokens == 64
    layers = model.get_submodule(placement_of(model).layers_path)
    assert [isinstance(layer, SplitLayer) for layer in layers] == [i in plan.streamed_layers for i in range(N_LAYERS)]
    single, batch, mask = prompts()
    ref = _reference(path)
    with torch.no_grad():
        assert torch.equal(_generate(model, single)[0], _generate(ref, single)[0])
        assert torch.equal(_generate(model, batch, mask)[0], _generate(ref, batch, mask)[0])


def test_auto_stays_off_without_a_link_and_explicit_modes_are_refused_where_they_cannot_split(tiny_checkpoint) -> None:
    model = load_tiny(tiny_checkpoint("llama"), resident=4, cpu_compute="auto")
    plan = placement_of(model).plan
    assert plan.cpu_fraction == 0 and any("CPU rank off: no probed GPU link" in n for n in plan.notes)
    model = load_tiny(tiny_checkpoint("mixtral"), resident=4, cpu_compute="auto")
    assert any("is not split" in n for n in placement_of(model).plan.notes)
    with pytest.raises(OverspillError, match="--cpu-compute 0.5: model_type 'mixtral'"):
        load_tiny(tiny_checkpoint("mixtral"), resident=4, cpu_compute=0.5)
    with pytest.raises(OverspillError, match="speculative verification"):
        load_tiny(tiny_checkpoint("llama"), resident=4, cpu_compute="on", speculate="ngram")
    with pytest.raises(OverspillError, match="cpu_compute must be"):
        load_tiny(tiny_checkpoint("llama"), resident=4, cpu_compute="fast")


def test_splitting_a_model_that_has_already_decoded(tiny_checkpoint) -> None:
    # The ring has copies of whole layers in flight from the last pass: enable() restarts it, so the
    # next pass refills the slots with the GPU shares.
    path = tiny_checkpoint("mistral")
    model = load_tiny(path, resident=0)
    single, _, _ = prompts()
    with torch.no_grad():
        want = _generate(model, single)
        cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), threads=1)
        got = _generate(model, single)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_splitting_frees_each_whole_layer_before_packing_the_next(tiny_checkpoint, monkeypatch) -> None:
    # The host peak while splitting is one whole layer over the split ones, not every streamed layer twice
    # (at the 70B shape the streamed bytes alone are ~60 GB of a 128 GiB host).
    import gc
    import weakref

    model = load_tiny(tiny_checkpoint("llama"), resident=0)
    hosts = [weakref.ref(layer.host) for layer in placement_of(model).ring.layers]
    alive_at_each_split = []

    def counting(streamed, *args, **kwargs):
        gc.collect()
        alive_at_each_split.append(sum(ref() is not None for ref in hosts))
        return SplitLayer(streamed, *args, **kwargs)

    monkeypatch.setattr(cpu_rank, "SplitLayer", counting)
    cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), threads=1)
    assert alive_at_each_split == [N_LAYERS - i for i in range(N_LAYERS)]


def test_generate_under_inference_mode_then_no_grad(tiny_checkpoint) -> None:
    # A wide pass (the prompt, wider than max_tokens) writes the CPU heads' KV from the caller's thread; under
    # torch.inference_mode that made inference tensors the worker (not in inference mode) could not update:
    # "Inplace update to inference tensor outside InferenceMode". Found by bench/cpu_rank_agreement.py.
    path = tiny_checkpoint("llama")
    model = _split_model(path, max_tokens=4)
    ref = _reference(path)
    single, _, _ = prompts()
    with torch.inference_mode():
        first = _generate(model, single)[0]
        again = _generate(model, single)[0]
    with torch.no_grad():
        plain = _generate(model, single)[0]
        want = _generate(ref, single)[0]
    assert torch.equal(first, want) and torch.equal(again, want) and torch.equal(plain, want)


def test_smollm2_split_gives_plain_streamings_tokens(default_model_dir) -> None:
    # The embedded SmolLM2-135M (9 heads in 3 KV groups, 1536 MLP columns), float32 on the CPU: its
    # streamed layers split at 0.9 (all MLP columns but one and 2 of 3 KV groups to the CPU) answer with plain
    # streaming's tokens.
    # bf16 copies: under "auto" its Q4_1 codes would stream as int4, which the CPU rank does not split.
    import overspill

    model, tok = overspill.load(None, gpu_memory="400MiB", context=256, stream_format="bf16", progress=False)
    plan = placement_of(model).plan
    assert plan.streamed_layers
    chat = [{"role": "user", "content": "What is the highest mountain in the world?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        cpu_rank.enable(model, dict.fromkeys(plan.streamed_layers, 0.9), threads=1)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    layer = model.get_submodule(placement_of(model).layers_path)[plan.streamed_layers[0]]
    assert layer.share == Share(2, 1535)
    assert torch.equal(got, want)


def test_host_kv_follows_the_model_cache() -> None:
    # The CPU heads' KV keeps the model cache's length: a new sequence restarts it, a crop (as
    # speculative decoding makes) crops it, anything else (KV the host never saw) is refused.
    from transformers import DynamicCache

    from overspill.runtime.cpu_rank import HostKV
    from overspill.runtime.kv import PresizedLayer

    kv, cache = HostKV(capacity=8), DynamicCache()
    k = torch.randn(1, 2, 5, 4)
    kv.follow(cache, 0)
    assert isinstance(kv.layer, PresizedLayer)
    kv.update(k, k, 0)
    cache.update(k[:, :1], k[:, :1], 0)  # the GPU heads of the same 5 tokens
    cache.update(k[:, :1], k[:, :1], 0)  # ... 10 tokens: more than the host saw
    with pytest.raises(OverspillError, match="holds 5 tokens where the cache holds 10"):
        kv.follow(cache, 0)
    cache.crop(-7)  # keep 3 (transformers 5.25 crops by tokens removed)
    kv.follow(cache, 0)
    assert kv.layer.get_seq_length() == 3
    keys, _ = kv.update(k[:, :, :1], k[:, :, :1], 0)
    assert torch.equal(keys, torch.cat([k[:, :, :3], k[:, :, :1]], dim=2))
    kv.follow(DynamicCache(), 0)
    assert kv.layer.get_seq_length() == 0
