"""Pinned host pages are unlocked explicitly (`PinnedHost.close`) or by a finalizer that never syncs
the device inside a CUDA graph capture; the CUDA runtime is faked, so this runs on the CPU."""

from __future__ import annotations

import gc

import pytest
import torch

from overspill.runtime import layout


@pytest.fixture
def cuda_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    class Runtime:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync",)))
    monkeypatch.setattr(layout, "_deferred", type(layout._deferred)())
    return calls


def test_close_unlocks_every_page_after_one_sync_and_only_once(cuda_calls) -> None:
    pins = layout.PinnedHost()
    a = pins.tensor((4, 8), torch.float32)
    b = pins.tensor((16,), torch.bfloat16)
    assert pins.tensor((3,), torch.float32, pinned=False) is not None  # pageable: nothing to unlock
    ptrs = [ptr for kind, ptr in cuda_calls if kind == "register"]
    assert len(ptrs) == 2
    pins.close()
    assert cuda_calls[2:] == [("sync",), ("unregister", ptrs[0]), ("unregister", ptrs[1])]
    a.fill_(2.0)  # still valid memory, now pageable
    assert float(a.sum()) == 64.0
    del a, b
    gc.collect()
    pins.close()
    assert len(cuda_calls) == 5  # neither the finalizers nor a second close unlock again


def test_a_finalizer_during_capture_defers_the_unlock_to_a_safe_point(cuda_calls, monkeypatch) -> None:
    typed = layout.host_tensor((8,), torch.float32, pinned=True)
    ptr = cuda_calls[0][1]
    monkeypatch.setattr(layout, "_capturing", lambda: True)
    del typed
    gc.collect()  # the last view died inside a capture: no sync, the pages stay locked and mapped
    assert cuda_calls == [("register", ptr)] and len(layout._deferred) == 1
    monkeypatch.setattr(layout, "_capturing", lambda: False)
    layout.pinned_bytes(64)  # the next allocation is a safe point: it unlocks what was deferred
    assert cuda_calls[1:3] == [("sync",), ("unregister", ptr)] and not layout._deferred


def test_close_during_capture_defers_too(cuda_calls, monkeypatch) -> None:
    pins = layout.PinnedHost()
    held = pins.tensor((8,), torch.float32)
    monkeypatch.setattr(layout, "_capturing", lambda: True)
    pins.close()
    assert [kind for kind, *_ in cuda_calls] == ["register"]
    monkeypatch.setattr(layout, "_capturing", lambda: False)
    layout.release_deferred()
    assert [kind for kind, *_ in cuda_calls] == ["register", "sync", "unregister"] and held.numel() == 8


def test_nothing_to_unlock_costs_no_sync(cuda_calls) -> None:
    layout.release_deferred()
    with layout.PinnedHost():
        pass
    assert cuda_calls == []
