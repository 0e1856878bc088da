"""The CPU rank's joins without a host wait (`cpu_rank.Handoff`): the device's stream waits for a counter in
pinned host memory that the worker raises (`cuStreamWaitValue32`), so the Python thread launches a whole
decode pass. The driver binding is checked against a fake libcuda here; the rest needs a GPU
(`pytest -m gpu tests/test_gpu_cpu_rank_joins.py`; tests/test_gpu_cpu_rank.py runs whole split models
on CUDA, every join through this path)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from overspill.errors import OverspillError
from overspill.runtime import cuda_driver

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fake_driver(monkeypatch):
    """A libcuda with the entry points the joins use; `status` is what the stream wait answers."""
    fake = SimpleNamespace(calls=[], status=0)

    def wait(stream, address, value, flags):
        fake.calls.append((stream, address, value, flags))
        return fake.status

    def error_name(status, out):
        out._obj.value = b"CUDA_ERROR_NOT_SUPPORTED" if status == 801 else None
        return 0 if status == 801 else 1

    def device_pointer(out, host, flags):
        out._obj.value = host.value + 0x1000
        return 0

    fake.cuInit = lambda flags: 0
    fake.cuStreamWaitValue32_v2, fake.cuGetErrorName, fake.cuMemHostGetDevicePointer_v2 = wait, error_name, device_pointer
    monkeypatch.setattr(cuda_driver, "_library", lambda: fake)
    monkeypatch.setattr(cuda_driver, "_initialised", lambda: True)
    cuda_driver._stream_wait_value32.cache_clear()
    yield fake
    cuda_driver._stream_wait_value32.cache_clear()


def test_stream_wait_binds_the_v2_symbol_and_passes_the_value_mod_2_32(fake_driver) -> None:
    cuda_driver.stream_wait_value32(7, 0x5000, 2**32 + 5)
    assert fake_driver.calls == [(7, 0x5000, 5, cuda_driver.STREAM_WAIT_VALUE_GEQ)]
    assert cuda_driver._stream_wait_value32() is fake_driver.cuStreamWaitValue32_v2
    assert cuda_driver.host_device_pointer(0x7000) == 0x8000


def test_driver_errors_are_one_line(fake_driver) -> None:
    fake_driver.status = 801
    with pytest.raises(OverspillError, match=r"cuStreamWaitValue32 failed: CUDA_ERROR_NOT_SUPPORTED \(801\)") as info:
        cuda_driver.stream_wait_value32(0, 0x5000, 1)
    assert "\n" not in str(info.value)
    fake_driver.status = 999  # a code the driver cannot name
    with pytest.raises(OverspillError, match=r"cuStreamWaitValue32 failed: CUresult \(999\)"):
        cuda_driver.stream_wait_value32(0, 0x5000, 1)


def test_a_driver_without_the_v2_symbol_uses_the_plain_one_and_without_either_says_so(fake_driver) -> None:
    fake_driver.cuStreamWaitValue32 = fake_driver.cuStreamWaitValue32_v2
    del fake_driver.cuStreamWaitValue32_v2
    cuda_driver.stream_wait_value32(3, 0x5000, 2)
    assert fake_driver.calls == [(3, 0x5000, 2, 0)]
    del fake_driver.cuStreamWaitValue32
    cuda_driver._stream_wait_value32.cache_clear()
    with pytest.raises(OverspillError, match="has no cuStreamWaitValue32"):
        cuda_driver.stream_wait_value32(3, 0x5000, 2)


def _synchronize_within(stream: torch.cuda.Stream, seconds: float) -> None:
    """Fail, instead of hanging the run, where a stream does not finish."""
    deadline = time.monotonic() + seconds
    while not stream.query():
        assert time.monotonic() < deadline, f"the stream did not finish within {seconds} s"
        time.sleep(0.001)


@pytest.mark.gpu
@cuda
def test_a_stream_waits_for_the_pinned_counter_before_copying() -> None:
    counter = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    src = torch.zeros(4096, pin_memory=True)
    address = cuda_driver.host_device_pointer(counter.data_ptr())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cuda_driver.stream_wait_value32(stream.cuda_stream, address, 1)
        out = src.to("cuda", non_blocking=True)
    time.sleep(0.05)
    blocked = not stream.query()
    src.fill_(3.0)
    counter.fill_(1)  # from the host, after the values: the copy reads them
    _synchronize_within(stream, 10)
    assert blocked, "the copy ran before the counter reached 1"
    assert torch.equal(out.cpu(), torch.full_like(src, 3.0))


@pytest.mark.gpu
@cuda
def test_handoff_on_cuda_queues_each_join_behind_its_delivery_and_a_failure_releases_the_rest_as_nan() -> None:
    # (not yet run on a GPU) sequence numbers across the counter's 2**32 wrap: the wait compares cyclically
    from overspill.runtime.cpu_rank import Handoff

    handoff = Handoff(torch.device("cuda"))
    handoff.issued = handoff.delivered = 2**32 - 2
    handoff.counter.fill_(-2)  # 2**32 - 2 as an int32
    like = torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda")
    tickets = [handoff.ticket(like) for _ in range(3)]
    assert [t.seq for t in tickets] == [2**32 - 1, 2**32, 2**32 + 1] and tickets[0].dst.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = [handoff.collect(t) for t in tickets]  # returns at once: the waits are the stream's
    part = torch.randn(4, 64)
    handoff.deliver(tickets[0], part)
    time.sleep(0.05)
    waiting = not stream.query()  # the second join still waits
    handoff.deliver(tickets[1], 2 * part)
    handoff.fail(RuntimeError("job failed"), upto=tickets[2].seq)
    _synchronize_within(stream, 10)
    assert waiting
    assert torch.equal(got[0].cpu(), part.bfloat16()) and torch.equal(got[1].cpu(), (2 * part).bfloat16())
    assert got[2].isnan().all()
    with pytest.raises(RuntimeError, match="job failed"):  # raised before a wait is queued: nothing hangs
        handoff.collect(handoff.ticket(like))


@pytest.mark.gpu
@cuda
def test_a_decode_pass_launches_without_waiting_for_the_worker(tiny_checkpoint, monkeypatch) -> None:
    # (not yet run on a GPU) with the worker's first MLP share held back 0.5 s, the Python thread still
    # launches the whole pass at once (every join is a stream wait), and the logits are the resident model's.
    from transformers import DynamicCache

    from overspill.api import placement_of
    from overspill.runtime import cpu_rank
    from test_cpu_rank import _reference
    from test_gpu_cpu_rank import N_LAYERS, _all_streamed
    from test_placement import prompts

    path = tiny_checkpoint("llama")
    model = _all_streamed(path)
    rank = cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), max_tokens=64)
    layers = model.get_submodule(placement_of(model).layers_path)
    single = prompts()[0].cuda()
    ref = _reference(path).cuda()
    caches = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model(single, past_key_values=caches[0], use_cache=True)
        want = ref(single, past_key_values=caches[1], use_cache=True)
        step = want.logits[:, -1:].argmax(-1)
        want = ref(step, past_key_values=caches[1], use_cache=True).logits.float().cpu()
        torch.cuda.synchronize()
        real = layers[0].mlp_call  # the worker's norm and MLP share: one traced call

        def slow(*args, **kwargs):
            time.sleep(0.5)
            return real(*args, **kwargs)

        monkeypatch.setattr(layers[0], "mlp_call", slow)
        start = time.perf_counter()
        out = model(step, past_key_values=caches[0], use_cache=True)
        launched = time.perf_counter() - start
        got = out.logits.float().cpu()
        finished = time.perf_counter() - start
    print(f"decode pass launched in {launched * 1e3:.1f} ms, finished in {finished * 1e3:.1f} ms; "
          f"waited at joins {rank.waited_s * 1e3:.1f} ms")
    assert launched < 0.25 <= 0.5 <= finished
    assert rank.handoff.delivered == rank.handoff.issued and rank.handoff.error is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
