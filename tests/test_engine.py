"""The engine's continuous batching on CPU: batched greedy decode equals each request run alone.

Tiny float32 random-weight models (conftest) loaded through `overspill.load` with 4 of 8 layers
resident, so the batch runs through the real streaming ring. Prompts of different lengths join and
leave the batch at different steps, which exercises left padding, trimming and position ids.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from overspill.serving.batching import DecodeBatch, mergeable
from overspill.serving.engine import Engine, GenerationRequest

from test_placement import load_tiny

PROMPTS = [(5, 9, 14, 3), (7,) * 11, tuple(range(30, 48)), (8, 200), (100, 101, 102), (60,) * 6]
NEW = [12, 5, 9, 16, 3, 10]  # rows leave the batch at different steps
FULL_ATTENTION = ["llama", "qwen3", "mixtral"]
SLIDING = ["mistral", "qwen2", "phi3", "gemma2"]  # windows of 16 < prompt + new tokens (conftest)


class IdsTokenizer:
    """Decodes token ids as space-separated numbers, so events carry the exact tokens."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {i}" for i in ids)


class Steps:
    """Records the batch size of every decode step; `check()`, if set, runs there too (on the engine thread)."""

    def __init__(self):
        self.sizes: list[int] = []
        self.check = None

    def first_token(self, seconds): ...
    def inter_token(self, seconds): ...
    def generated(self, tokens): ...

    def decode_step(self, batch_size, seconds):
        self.sizes.append(batch_size)
        if self.check is not None:
            self.check()


def fail_forward(model, when):
    """Make the model's forward raise "device fault" for passes whose input ids `when(ids)` picks;
    returns the hook handle (`.remove()` heals it)."""
    def hook(module, args, kwargs):
        if when(kwargs["input_ids"]):
            raise RuntimeError("device fault")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _engine(model, **kwargs) -> Engine:
    model.generation_config.eos_token_id = None  # random weights: let every request run its full length
    # as if the plan had reserved KV for max_batch sequences of the 64-token context (load_tiny plans for 1)
    kwargs.setdefault("kv_capacity_tokens", 64 * kwargs.get("max_batch", 1))
    engine = Engine(model, IdsTokenizer(), metrics=Steps(), **kwargs)
    engine.start()
    return engine


def _outputs(engine: Engine, requests: list[GenerationRequest], together: bool) -> list[str]:
    if together:
        engine.hold(True)  # queue them all, so they are admitted into one batch
        handles = [engine.submit(r) for r in requests]
        engine.hold(False)
        return ["".join(e.text for e in h) for h in handles]
    return ["".join(e.text for e in engine.submit(r)) for r in requests]


def _assert_equals_generate(model, outputs: list[str]) -> None:
    """Each output equals transformers' greedy `generate` of its prompt alone."""
    for prompt, new, text in zip(PROMPTS, NEW, outputs):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0)
        assert text == "".join(f" {i}" for i in out[0, len(prompt):].tolist())


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW)]


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_batched_greedy_equals_solo(tiny_checkpoint, arch):
    model = load_tiny(tiny_checkpoint(arch), resident=4)
    engine = _engine(model, max_batch=4, prefill_chunk=5)  # 6 requests > 4 places: later ones join mid-decode
    try:
        solo = _outputs(engine, _requests(), together=False)
        assert max(engine.metrics.sizes) == 1
        engine.metrics.sizes.clear()
        batched = _outputs(engine, _requests(), together=True)
        assert batched == solo
        assert max(engine.metrics.sizes) == 4 and len(set(engine.metrics.sizes)) > 2  # rows joined and left
        seeded = [GenerationRequest(p, 6, temperature=0.9, top_k=20, seed=i) for i, p in enumerate(PROMPTS)]
        assert _outputs(engine, seeded, together=True) == _outputs(engine, seeded, together=False)
        assert [len(s.split()) for s in solo] == NEW
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
    finally:
        engine.close()


def test_batched_matches_transformers_generate(tiny_checkpoint):
    """Against plain `generate` on the same placed model: the batch path adds no error of its own."""
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=8)
    passes = []
    hook = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        batched = _outputs(engine, _requests(), together=True)
        assert max(engine.metrics.sizes) == len(PROMPTS)
        # one pass prefills all six prompts together, then one pass per step until the longest is done
        assert len(passes) == 1 + max(NEW) - 1
    finally:
        hook.remove()
        engine.close()
    _assert_equals_generate(model, batched)


@pytest.mark.parametrize("arch", SLIDING)
def test_sliding_window_models_batch_exactly(tiny_checkpoint, arch):
    """Rows of different lengths share sliding-window layers that keep only their last 15 columns."""
    model = load_tiny(tiny_checkpoint(arch), resident=4)
    engine = _engine(model, max_batch=4, prefill_chunk=12)
    try:
        assert engine.max_batch == 4 and engine.batching_note is None
        solo = _outputs(engine, _requests(), together=False)
        engine.metrics.sizes.clear()
        assert _outputs(engine, _requests(), together=True) == solo
        assert max(engine.metrics.sizes) == 4
    finally:
        engine.close()


def test_sliding_windows_equal_transformers_generate(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint("mistral"), resident=8)
    engine = _engine(model, max_batch=8)
    try:
        batched = _outputs(engine, _requests(), together=True)
    finally:
        engine.close()
    _assert_equals_generate(model, batched)


def test_kv_admission_counts_padding_and_waits(tiny_checkpoint):
    """Rows share one cache padded to the widest row: a short request does not fit beside a long one
    in this capacity, so it waits (FIFO); then three short ones share it."""
    model = load_tiny(tiny_checkpoint("llama"), resident=8)
    engine = _engine(model, max_batch=3, kv_block_tokens=8, kv_capacity_tokens=96)  # 12 blocks of 8 tokens
    try:
        assert engine.kv_stats().total_blocks == 12
        big = GenerationRequest(tuple(range(3, 40)), 20)  # 57 tokens: 8 blocks
        small = GenerationRequest((5, 6), 30)  # 32 tokens: 4 blocks, but 2 rows x 8 blocks beside `big`
        engine.hold(True)
        handles = [engine.submit(big), engine.submit(small), engine.submit(small), engine.submit(small)]
        engine.hold(False)
        assert all(list(h)[-1].finish == "length" for h in handles)
        assert engine.metrics.sizes[0] == 1 and max(engine.metrics.sizes) == 3  # big alone, then 3 x 4 blocks
        assert engine.kv_stats().used_blocks == 0 and engine.kv_stats().reserved_blocks == 0
        with pytest.raises(ValueError, match="exceeds the context of 64"):
            engine.submit(GenerationRequest(tuple(range(3, 50)), 20))
        with pytest.raises(ValueError, match="KV blocks"):  # fits the context, not the capacity
            Engine(model, IdsTokenizer(), kv_block_tokens=8, kv_capacity_tokens=32).submit(big)
    finally:
        engine.close()


def test_cancel_mid_batch_frees_its_row(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=4)
    try:
        reqs = _requests()[:3]
        solo = _outputs(engine, reqs, together=False)
        engine.hold(True)
        handles = [engine.submit(r) for r in reqs]
        doomed = engine.submit(GenerationRequest((9, 9, 9), 40))
        engine.hold(False)
        events = iter(doomed)
        next(events)
        engine.cancel(doomed)
        assert list(events)[-1].finish == "cancelled"
        assert ["".join(e.text for e in h) for h in handles] == solo
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
    finally:
        engine.close()


def _cache(lengths: list[int], heads: int = 2, dim: int = 4, layers: int = 2) -> list[DynamicCache]:
    caches = []
    for i, n in enumerate(lengths):
        cache = DynamicCache()
        for layer in range(layers):
            k = torch.full((1, heads, n, dim), float(10 * i + layer))
            cache.update(k, -k, layer)
        caches.append(cache)
    return caches


def _appending_forward(seen: list):
    """Stands in for the model's pass: records a step's inputs and appends a column of 99s to every layer."""
    def forward(input_ids, cache, attention_mask, position_ids):
        seen.append((input_ids.tolist(), tuple(attention_mask.shape), position_ids.tolist()))
        for layer in range(len(cache.layers)):
            step = torch.full((input_ids.shape[0], 2, 1, 4), 99.0)
            cache.update(step, -step, layer)
        return torch.zeros((input_ids.shape[0], 8))

    return forward


def test_decode_batch_pads_on_join_and_trims_on_leave():
    seen = []
    batch = DecodeBatch(torch.device("cpu"), _appending_forward(seen))
    a, b, c = _cache([3, 5, 2])
    assert mergeable(a)
    for name, cache, n in (("a", a, 3), ("b", b, 5), ("c", c, 2)):
        batch.join([name], cache, torch.ones((1, n), dtype=torch.bool))
    assert batch.rows == ["a", "b", "c"]
    assert batch.valid.tolist() == [[False, False, True, True, True], [True] * 5, [False] * 3 + [True] * 2]
    assert batch.cache.layers[1].keys.shape == (3, 2, 5, 4)
    assert batch.cache.layers[1].keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]  # row a, layer 1: padded left
    assert batch.decode([1, 2, 3]).shape == (3, 8)
    assert seen == [([[1], [2], [3]], (3, 6), [[3], [5], [2]])]  # each row's position: its own token count
    batch.keep([0, 2])  # b leaves: two leading columns are padding in both remaining rows
    assert batch.rows == ["a", "c"] and batch.valid.shape == (2, 4)
    assert batch.cache.layers[0].keys.shape == (2, 2, 4, 4)
    assert batch.cache.layers[0].keys[1, 0, :, 0].tolist() == [0, 20, 20, 99]  # row c: one pad, 2 tokens, step


def test_decode_batch_keeps_sliding_layers_on_the_global_timeline():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    def sliding(n: int, value: float) -> DynamicCache:
        cache = DynamicCache()
        cache.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
        cache.update(torch.full((1, 1, n, 1), value), torch.full((1, 1, n, 1), value), 0)
        return cache

    long, short = sliding(6, 1.0), sliding(2, 2.0)
    assert mergeable(long) and long.layers[0].keys.shape[-2] == 3  # the window keeps 3 columns
    batch = DecodeBatch(torch.device("cpu"), _appending_forward([]))
    batch.join(["long"], long, torch.ones((1, 6), dtype=torch.bool))
    batch.join(["short"], short, torch.ones((1, 2), dtype=torch.bool))
    layer = batch.cache.layers[0]
    assert layer.cumulative_length == 6 and layer.keys[:, 0, :, 0].tolist() == [[1, 1, 1], [0, 2, 2]]
    batch.keep([1])  # the long row leaves: 4 leading columns were padding for the short one
    assert batch.valid.shape == (1, 2) and layer.cumulative_length == 2
    assert layer.keys[:, 0, :, 0].tolist() == [[2, 2]]


def test_failures_end_only_their_requests_and_free_their_kv(tiny_checkpoint, monkeypatch):
    """A sampling failure on a chunked prompt, and a forward failure of a decode step, each end with an
    error event; KV is freed and the engine keeps serving."""
    import overspill.serving.sampling as sampling

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=4, prefill_chunk=4)
    real = sampling.pick_tokens

    def flaky(logits, params, uniforms):
        if any(p.temperature > 0 for p in params):
            raise RuntimeError("probability tensor contains nan")
        return real(logits, params, uniforms)

    try:
        monkeypatch.setattr(sampling, "pick_tokens", flaky)
        chunked = engine.submit(GenerationRequest(tuple(range(3, 13)), 5, temperature=1.0))  # 3 chunks of 4
        events = list(chunked)
        assert events[-1].finish == "error" and "nan" in events[-1].error
        assert engine.live_requests() == 0 and engine.kv_stats().reserved_blocks == 0
        monkeypatch.setattr(sampling, "pick_tokens", real)
        calls = []

        def fourth_pass_on(ids):  # the passes from the fourth on that decode
            calls.append(ids.shape)
            return ids.shape[1] == 1 and len(calls) > 3

        hook = fail_forward(model, fourth_pass_on)
        handles = [engine.submit(r) for r in _requests()[:2]]
        assert [list(h)[-1].finish for h in handles] == ["error", "error"]
        hook.remove()
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
        assert [e.finish for e in engine.submit(GenerationRequest((5, 6), 3))][-1] == "length"
    finally:
        engine.close()


def test_close_cancels_everything_and_refuses_new_requests(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=1)
    running = engine.submit(GenerationRequest((5, 6, 7), 50))
    queued = engine.submit(GenerationRequest((8, 9), 5))
    next(iter(running))
    engine.close()
    assert list(running)[-1].finish == "cancelled" and list(queued)[-1].finish == "cancelled"
    assert engine.cancelled_total == 2 and engine.live_requests() == 0
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(GenerationRequest((5,), 2))


def test_live_count_includes_requests_being_prefilled(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=4)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append((engine.live_requests(),
                                                                              engine.active_count)))
    try:
        _outputs(engine, _requests()[:3], together=True)
        assert seen[0] == (3, 3)  # the group's prefill pass: all three are counted while it runs
    finally:
        hook.remove()
        engine.close()


def test_prefix_cache_skips_the_shared_prompt_and_keeps_outputs(tiny_checkpoint):
    """Prompts prefilled together store their blocks (from any row of the padded pass); a later prompt
    long enough to be prefilled alone restores the shared blocks and computes only the rest."""
    from overspill.runtime.prefix import PrefixCache

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    shared = tuple(range(40, 56))  # 4 blocks of 4 tokens
    first = GenerationRequest(shared + (7, 8), 6)
    later = [GenerationRequest(shared + (9,), 6), GenerationRequest(shared[:8] + (3, 4, 5), 5),
             GenerationRequest(shared + (10, 11, 12), 4)]
    plain = _engine(model, max_batch=4)
    try:
        want = _outputs(plain, [first] + later, together=False)
    finally:
        plain.close()
    prefix = PrefixCache(model.config, capacity_tokens=256, block_tokens=4, dtype=torch.float32)
    grouping = _engine(model, max_batch=4, prefill_chunk=48, prefix_cache=prefix)
    try:
        # `first` is stored from row 1 of a left-padded group pass (2 columns of padding before it)
        longer = GenerationRequest(tuple(range(100, 120)), 3)
        assert _outputs(grouping, [longer, first], together=True)[1] == want[0]
        assert grouping.kv_stats().prefix_hit_tokens == 0
    finally:
        grouping.close()
    engine = _engine(model, max_batch=4, prefill_chunk=8, prefix_cache=prefix)  # these prompts are > 8: solo
    computed = []  # prompt tokens of each solo prefill pass (decode and group passes carry position ids)

    def record(module, args, kwargs):
        if "position_ids" not in kwargs:
            computed.append(kwargs["input_ids"].shape[1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert _outputs(engine, later, together=True) == want[1:]
        # 17 tokens reuse 4 blocks (one token left to compute: the model needs its logits), 11 reuse 2,
        # 19 reuse 4: each prefill computes only what follows its cached blocks
        assert sorted(computed) == [1, 3, 3]
        assert engine.kv_stats().prefix_hit_tokens == 16 + 8 + 16
        assert engine.live_requests() == 0 and prefix.manager.usage().host.used_blocks == 0
    finally:
        hook.remove()
        engine.close()


def blocks_disagree(engine: Engine) -> list[str]:
    """What the engine's block manager, its caches and its prefix pool disagree on (run on the engine thread).

    The manager is the one source: admission reserves every running row the widest reservation
    there, each row's filled blocks must hold exactly the KV its cache holds, the prefix pool's
    HOST blocks in use are exactly those its live leases hold, and its HOST_LAYER blocks in use are
    exactly those the live `TieredCache`s' host layers fill with their sealed tokens."""
    from overspill.runtime.kv import HostKVLayer, TieredCache

    s, m, batch = engine.scheduler, engine.blocks, engine.runner.batch
    found = []
    tiered = {id(c): c for c in [batch.cache] + [seq.cache for seq in s.running.values()] if isinstance(c, TieredCache)}
    if isinstance(batch.cache, TieredCache) and batch.cache.get_seq_length() != m.num_tokens(batch.rows[0].key):
        found.append(f"tiered row: cache {batch.cache.get_seq_length()} tokens, manager {m.num_tokens(batch.rows[0].key)}")
    sealed = [layer.get_seq_length() // layer.block_tokens * layer.block_tokens for cache in tiered.values()
              for layer in cache.layers if isinstance(layer, HostKVLayer)]
    layer_blocks = sum(-(-tokens // m.block_tokens) for tokens in sealed)
    if m.usage().host_layer.used_blocks != layer_blocks:
        found.append(f"{m.usage().host_layer.used_blocks} HOST_LAYER blocks in use, the tiered caches fill {layer_blocks}")
    for row, seq in enumerate(batch.rows):  # decoding: the cache's real columns of the row
        if m.num_tokens(seq.key) != int(batch.valid[row].sum()):
            found.append(f"row {row}: manager {m.num_tokens(seq.key)} tokens, cache {int(batch.valid[row].sum())}")
    for seq in s.prefilling:  # prefilling: its own cache, if it has one yet
        cached = seq.cache.get_seq_length() if seq.cache is not None else seq.prefilled
        if not m.num_tokens(seq.key) == seq.prefilled == cached:
            found.append(f"prefilling {seq.key}: manager {m.num_tokens(seq.key)}, {seq.prefilled}, cache {cached}")
    running = list(s.running.values())
    gpu, host = m.usage().gpu, m.usage().host
    widest = max((seq.need for seq in running), default=0)
    if gpu.used_blocks != len(running) * widest or any(len(m.block_table(seq.key)) != widest for seq in running):
        found.append(f"{gpu.used_blocks} GPU blocks held, admission reserved {len(running)} x {widest}")
    filled = sum(-(-m.num_tokens(seq.key) // m.block_tokens) for seq in running)
    if gpu.used_blocks - gpu.empty_blocks != filled:
        found.append(f"{gpu.used_blocks - gpu.empty_blocks} GPU blocks filled, the caches hold {filled}")
    leased = {ref for seq in running if seq.lease is not None for ref in m.block_table(seq.lease.seq_id)}
    if host.used_blocks != len(leased):
        found.append(f"{host.used_blocks} pool blocks in use, leases hold {len(leased)}")
    return found


@pytest.mark.parametrize("arch, tiered", [("llama", False), ("mistral", False), ("llama", True)])
def test_random_arrivals_and_cancels_keep_outputs_and_free_everything(tiny_checkpoint, arch, tiered, monkeypatch):
    """Requests arrive while others decode, some are cancelled mid-way; every finished one equals its
    solo run, every cancelled one ends 'cancelled', and no KV block or request state is left behind.
    At every decode step the engine's admission (its reservations), the caches and the prefix pool
    (llama: mistral's sliding windows take none) agree on the blocks in use, in one block manager;
    tiered: 5 of 8 layers keep KV in host memory (a `TieredCache` spilling every 8 tokens, one request
    at a time), their blocks counted in the same manager."""
    import functools
    import random
    import threading
    import time

    from transformers import AutoConfig

    import overspill
    from overspill.runtime.loader import Placement
    from overspill.runtime.prefix import PrefixCache

    rng = random.Random(7)
    if tiered:  # a KV budget of 3 layers: the first 5 keep theirs in host memory
        monkeypatch.setattr(Placement, "new_cache", functools.partialmethod(Placement.new_cache, block_tokens=8))
        config = AutoConfig.from_pretrained(tiny_checkpoint(arch))
        kv_layer = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4 * 64
        model, _ = overspill.load(tiny_checkpoint(arch), gpu_memory=None, dtype="float32", context=64,
                                  kv_gpu_memory=6 * kv_layer, progress=False)
        assert model.overspill.plan.kv_host_layers == tuple(range(5))
    else:
        model = load_tiny(tiny_checkpoint(arch), resident=4)
    prefix = PrefixCache(model.config, 96, block_tokens=4, dtype=torch.float32) if arch == "llama" else None
    engine = _engine(model, max_batch=3, prefill_chunk=7, kv_capacity_tokens=160, prefix_cache=prefix)
    disagreements: list[str] = []
    try:
        assert prefix is None or prefix.manager is engine.blocks
        assert engine.blocks.usage().host_layer.total_blocks == (5 * 64 // 4 if tiered else 0)
        shared = tuple(rng.randrange(3, 250) for _ in range(12))  # some prompts share 1-3 pool blocks
        requests = [GenerationRequest(shared[: rng.choice([0, 4, 8, 12])]
                                      + tuple(rng.randrange(3, 250) for _ in range(rng.randrange(1, 20))),
                                      rng.randrange(1, 14)) for _ in range(14)]
        solo = _outputs(engine, requests, together=False)
        peak_layer_blocks = []

        def check():
            disagreements.extend(blocks_disagree(engine))
            peak_layer_blocks.append(engine.blocks.usage().host_layer.used_blocks)

        engine.metrics.check = check
        doomed = {i for i in range(len(requests)) if rng.random() < 0.3}
        results: dict[int, list] = {}

        def consume(i, handle):
            events = []
            for event in handle:
                events.append(event)
                if i in doomed and len(events) == 2:
                    engine.cancel(handle)
            results[i] = events

        threads = []
        for i, request in enumerate(requests):
            handle = engine.submit(request)
            threads.append(threading.Thread(target=consume, args=(i, handle)))
            threads[-1].start()
            time.sleep(rng.random() * 0.01)
        for t in threads:
            t.join(60)
        for i, events in results.items():
            finish = events[-1].finish
            text = "".join(e.text for e in events)
            if finish == "cancelled":
                assert i in doomed and solo[i].startswith(text)
            else:
                assert finish == "length" and text == solo[i], i
        assert len(results) == len(requests)
        assert engine.live_requests() == 0
        assert engine.kv_stats().used_blocks == 0 and engine.kv_stats().reserved_blocks == 0
        assert max(engine.metrics.sizes) == 1 if tiered else max(engine.metrics.sizes) > 1
        assert not disagreements, disagreements[:5]
        assert (max(peak_layer_blocks) > 0) == tiered  # the tiered caches' host blocks were counted, and checked
        usage = engine.blocks.usage()
        assert usage.gpu.used_blocks == usage.host.used_blocks == usage.host_layer.used_blocks == 0  # freed or cached
        assert prefix is None or (engine.kv_stats().prefix_hit_tokens > 0 and usage.host.cached_blocks > 0)
    finally:
        engine.close()


def test_graph_buckets_are_powers_of_two_up_to_the_batch():
    from overspill.serving.graph_batch import bucket_for

    assert [bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [bucket_for(n, 64) for n in (1, 3, 17, 64)] == [1, 4, 32, 64]


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_graphed_batch_decodes_as_the_dynamic_batch(tiny_checkpoint, arch):
    """The engine over a model loaded with CUDA graphs decodes its batch through `GraphedBatch`
    (static KV, fixed buffers; on the CPU the same step runs eagerly): outputs equal the
    requests run alone through the dynamic batch, while rows join, leave and get compacted."""
    import random

    from overspill.runtime.graphs import enable_graphs
    from overspill.serving.graph_batch import GraphedBatch

    model = load_tiny(tiny_checkpoint(arch), resident=4)
    plain = _engine(model, max_batch=4, prefill_chunk=5)
    rng = random.Random(3)
    extra = [GenerationRequest(tuple(rng.randrange(3, 250) for _ in range(rng.randrange(1, 20))), rng.randrange(1, 30))
             for _ in range(10)]
    try:
        solo = _outputs(plain, _requests() + extra, together=False)
    finally:
        plain.close()
    enable_graphs(model, capture=False)
    engine = _engine(model, max_batch=4, prefill_chunk=5, kv_capacity_tokens=256)
    try:
        assert isinstance(engine.runner.batch, GraphedBatch)
        batched = _outputs(engine, _requests() + extra, together=True)
        assert batched == solo
        assert max(engine.metrics.sizes) == 4 and len(set(engine.metrics.sizes)) > 2
        assert engine.runner.batch.compactions > 0  # the 64-column width filled up and was compacted
        seeded = [GenerationRequest(p, 6, temperature=0.9, top_k=20, seed=i) for i, p in enumerate(PROMPTS)]
        assert _outputs(engine, seeded, together=True) == _outputs(engine, seeded, together=False)
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
    finally:
        engine.close()


def test_graphed_batch_holds_no_more_full_context_rows_than_the_kv_reserved(tiny_checkpoint):
    """A graphed batch's static KV holds `context` tokens a row: with the plan's one row reserved and no KV
    capacity given, --max-batch 4 decodes one request at a time (and says so) instead of allocating 4 rows."""
    from overspill.runtime.graphs import enable_graphs

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    assert model.overspill.plan.workload.batch == 1
    enable_graphs(model, capture=False)
    engine = Engine(model, IdsTokenizer(), max_batch=4)
    assert engine.max_batch == engine.runner.batch.max_rows == 1
    assert "at most 1 request decode together" in engine.batching_note
    wide = Engine(model, IdsTokenizer(), max_batch=4, kv_capacity_tokens=4 * engine.context)
    assert wide.max_batch == wide.runner.batch.max_rows == 4 and wide.batching_note is None


def test_kv_cap_without_a_gpu_budget_admits_the_rows_it_reserved(tiny_checkpoint):
    """Serving with --kv-gpu-memory and no GPU budget: the plan fits the largest batch whose KV stays within the
    cap, and the engine admits that many full-context rows' blocks, not --max-batch rows (which overran the cap)."""
    from transformers import AutoConfig

    import overspill

    config = AutoConfig.from_pretrained(tiny_checkpoint("llama"))
    row = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4 * 64 \
        * config.num_hidden_layers
    model, _ = overspill.load(tiny_checkpoint("llama"), gpu_memory=None, dtype="float32", context=64, batch=8,
                              fit_batch=True, kv_gpu_memory=2 * row + row // 2, progress=False)
    plan = model.overspill.plan
    assert plan.budget_bytes is None and plan.workload.batch == 2 and not plan.kv_host_layers
    engine = Engine(model, IdsTokenizer(), max_batch=8)
    assert engine.scheduler.total_blocks * engine.blocks.block_tokens == 2 * 64


def test_graphed_batch_warm_up_captures_every_bucket_and_leaves_it_empty(tiny_checkpoint, monkeypatch):
    """Before serving, each batch bucket's step is captured once per ring phase (simulated on the CPU:
    a "capture" records its key and replays run the step eagerly); requests then decode as before."""
    from overspill.runtime.graphs import StepGraphs, enable_graphs
    from overspill.serving.graph_batch import GraphedBatch

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    plain = _engine(model, max_batch=5, prefill_chunk=5)
    try:
        solo = _outputs(plain, _requests(), together=False)
    finally:
        plain.close()

    def fake_capture(self, body, key):
        self.graphs[key] = (None, None, [])
        return body()

    def fake_run(self, body, key=()):
        phase = 0 if self.ring is None else self.ring.step_phase()
        if self.capture and phase is not None and (key, phase) not in self.graphs:
            return self._warm_and_capture(body, (key, phase))
        return body()

    monkeypatch.setattr(StepGraphs, "_warm_and_capture", fake_capture)
    monkeypatch.setattr(StepGraphs, "run", fake_run)
    enable_graphs(model, capture=False)
    engine = Engine(model, IdsTokenizer(), metrics=Steps(), max_batch=5, prefill_chunk=5, kv_capacity_tokens=320)
    batch = engine.runner.batch
    assert isinstance(batch, GraphedBatch)
    batch.capture = True
    batch.warm_up()
    ring = model.overspill.ring
    phases = ring.n_slots // __import__("math").gcd(len(ring.layers), ring.n_slots)
    for b in (1, 2, 4, 5):
        assert sum(key[0] == (b,) for key in batch.graphs) == phases, b
    assert len(batch) == 0
    model.generation_config.eos_token_id = None
    engine.start()
    try:
        assert _outputs(engine, _requests(), together=True) == solo
    finally:
        engine.close()


def test_engine_outlives_a_failure_while_clearing_its_batch(tiny_checkpoint, monkeypatch):
    """If clearing the batch after a failed step raises too, the engine thread must live on: requests
    queued behind it would otherwise wait forever."""
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    engine = _engine(model, max_batch=2)
    keep = engine.runner.batch.keep
    state = {"fail": True}

    def failing_keep(rows):
        if not rows and state["fail"]:
            state["fail"] = False
            raise RuntimeError("inference tensor")
        return keep(rows)

    hook = fail_forward(model, lambda ids: ids.shape[1] == 1 and state["fail"])
    monkeypatch.setattr(engine.runner.batch, "keep", failing_keep)
    try:
        engine.hold(True)
        first, queued = engine.submit(GenerationRequest((5, 6), 4)), engine.submit(GenerationRequest((7, 8, 9), 4))
        later = [engine.submit(GenerationRequest((9, 10), 3)) for _ in range(2)]
        engine.hold(False)
        assert [e.finish for e in first][-1] == "error" and [e.finish for e in queued][-1] == "error"
        assert [[e.finish for e in h][-1] for h in later] == ["length", "length"]
        assert not state["fail"]  # clearing the batch did raise
        assert engine._thread.is_alive() and engine.live_requests() == 0
    finally:
        hook.remove()
        engine.close()



def test_runner_counts_latent_attention_kv_as_cached(tmp_path):
    """The engine admits by KV bytes per token: for DeepSeek's MLA that is the latent and rotary key it
    caches (the spec's one formula), not heads x head_dim keys and values (2.7x more for this tiny
    config, 28x for DeepSeek-V3); a batch of DeepSeek requests decodes as transformers' generate."""
    import warnings

    from transformers import AutoModelForCausalLM

    import overspill

    from test_spec import TINY, hf_config

    cfg = TINY["deepseek_v3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32).eval()
    reference.save_pretrained(str(tmp_path))
    reference.generation_config.eos_token_id = None  # as `_engine` does for the served model
    model, _ = overspill.load(str(tmp_path), dtype="float32", context=64, batch=4, progress=False)
    engine = _engine(model, max_batch=4)
    try:
        latent = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4 * cfg["num_hidden_layers"]
        assert engine.runner.token_bytes == (latent, 0)
        prompts = [tuple(3 + t % 120 for t in p) for p in PROMPTS]  # in the tiny vocabulary (128), no pad id 0
        outputs = _outputs(engine, [GenerationRequest(p, n) for p, n in zip(prompts, NEW)], together=True)
    finally:
        engine.close()
    for prompt, new, text in zip(prompts, NEW, outputs):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
        assert text == "".join(f" {i}" for i in out[0, len(prompt):].tolist())


def test_time_to_first_token_counts_the_wait_in_the_queue(tiny_checkpoint):
    """TTFT runs from submit, as its metric says: a request that waited in the queue (here: held 1 s)
    reports that wait, so the histogram is about what its caller saw."""
    import time

    class FirstTokens(Steps):
        def __init__(self):
            super().__init__()
            self.ttft: list[float] = []

        def first_token(self, seconds):
            self.ttft.append(seconds)

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    model.generation_config.eos_token_id = None
    engine = Engine(model, IdsTokenizer(), metrics=FirstTokens(), max_batch=2, kv_capacity_tokens=128)
    engine.start()
    try:
        engine.hold(True)
        start = time.perf_counter()
        events = iter(engine.submit(GenerationRequest((5, 6, 7), 2)))
        time.sleep(1.0)
        engine.hold(False)
        next(events)
        seen = time.perf_counter() - start  # what the caller waited for its first token
        list(events)
        [ttft] = engine.metrics.ttft
        assert seen - 0.5 < ttft <= seen, (ttft, seen)
    finally:
        engine.close()


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 20), (1.3, 0.8, 0)])
def test_a_seeded_request_samples_what_generate_samples_with_that_seed(tiny_checkpoint, temperature, top_p, top_k):
    """The server's sampler draws as transformers' `generate` does after `torch.manual_seed(S)` (and so as `run
    --seed S`), in a batch or alone: before, it drew one uniform a token from its own generator and parted
    from `generate` at the first sampled token."""
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    prompt, new = PROMPTS[2], 16
    model.generation_config.eos_token_id = None
    torch.manual_seed(7)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                         pad_token_id=0)
    want = "".join(f" {i}" for i in out[0, len(prompt):].tolist())
    engine = _engine(model, max_batch=3)
    try:
        request = GenerationRequest(prompt, new, temperature=temperature, top_p=top_p, top_k=top_k, seed=7)
        alone = "".join(e.text for e in engine.submit(request))
        neighbours = [GenerationRequest(p, n, temperature=0.9, seed=s) for s, (p, n) in enumerate(zip(PROMPTS, NEW))]
        batched = _outputs(engine, [neighbours[0], request, neighbours[3]], together=True)[1]
    finally:
        engine.close()
    assert alone == want and batched == want
