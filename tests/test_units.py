"""Byte sizes users type (--gpu-memory, gpu_memory=) and the sizes overspill prints back."""

from __future__ import annotations

import pytest

from overspill.errors import OverspillError
from overspill.planning.units import format_bytes, parse_budget, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 2**30),
        ("6GB", 6 * 10**9),  # decimal units, like accelerate's max_memory
        ("512MiB", 512 * 2**20),
        ("500MB", 500 * 10**6),
        ("100kb", 100 * 10**3),
        ("1TiB", 2**40),
        ("6G", 6 * 2**30),  # bare K/M/G/T are binary
        ("250m", 250 * 2**20),
        ("1.5GiB", int(1.5 * 2**30)),
        (".5GiB", 2**29),
        (" 6 gib ", 6 * 2**30),  # case and spaces do not matter
        ("123", 123),
        ("123B", 123),
        ("0", 0),
    ],
)
def test_parse_bytes_strings(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_numbers() -> None:
    assert parse_bytes(123) == 123
    assert parse_bytes(0) == 0
    assert parse_bytes(12.7) == 12  # whole bytes
    assert parse_bytes(10**13) == 10**13


@pytest.mark.parametrize(
    "bad",
    ["6XB", "GiB", "", "  ", "abc", "six GiB", "6 Gi B", "-1GiB", "1e9", "1,5GiB", "6GiB6", "auto", None, [6]],
)
def test_parse_bytes_rejects_garbage(bad) -> None:
    with pytest.raises(OverspillError) as err:
        parse_bytes(bad)
    msg = str(err.value)
    # One line that names the bad value and shows the accepted forms.
    assert "invalid memory size" in msg and "6GiB" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", [-1, -0.5, -(2**40)])
def test_parse_bytes_rejects_negative(bad) -> None:
    with pytest.raises(OverspillError, match="negative"):
        parse_bytes(bad)


@pytest.mark.parametrize("bad", [True, False])
def test_parse_bytes_rejects_bool(bad) -> None:
    # bool is an int subclass: True must not silently mean one byte.
    with pytest.raises(OverspillError, match="invalid memory size"):
        parse_bytes(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_parse_bytes_rejects_non_finite(bad) -> None:
    with pytest.raises(OverspillError):
        parse_bytes(bad)


def test_parse_budget() -> None:
    # None: no limit; "auto": decided from free device memory later; anything else: bytes.
    assert parse_budget(None) is None
    assert parse_budget("auto") == "auto"
    assert parse_budget(" AUTO ") == "auto"
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget(1000) == 1000
    for bad in (True, "6XB", -5, "autox"):
        with pytest.raises(OverspillError):
            parse_budget(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536 * 2**20, "1.5 GiB"),
        (436_207_616, "416 MiB"),  # a Llama-3-8B layer
        (123.4 * 2**20, "123 MiB"),  # three significant figures
        (2**40, "1 TiB"),
        (2**50, "1024 TiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_bytes(n, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("n", [1, 999, 4096, 10**6, 3 * 2**20 + 17, 7.25 * 2**30, 3 * 10**12])
def test_format_then_parse_round_trips(n) -> None:
    # What overspill prints can be pasted back as --gpu-memory, within the 3 printed figures.
    assert parse_bytes(format_bytes(n)) == pytest.approx(n, rel=5e-3)


def test_dispatch_fit_separates_per_layer_and_per_step_time() -> None:
    from overspill.runtime.hardware import fit_dispatch

    # 0.7 ms per layer + 2.4 ms per step, exactly
    layer, step = fit_dispatch([(n, 0.0024 + 0.0007 * n) for n in (2, 8, 16)])
    assert abs(layer - 0.0007) < 1e-12 and abs(step - 0.0024) < 1e-12
    # noise on one point moves the fit less than it moved a two-point slope
    layer, _ = fit_dispatch([(2, 0.0038), (8, 0.0080 + 0.0006), (16, 0.0136)])
    assert 0.0006 < layer < 0.0008
    assert fit_dispatch([(4, 0.01), (4, 0.02)]) == (0.0, 0.015)  # one layer count: no slope


def test_pinned_pages_stay_locked_while_any_view_lives(monkeypatch) -> None:
    """The host KV tier and the prefix pool keep only typed views of their registered buffer; the
    pages must stay locked until the last view is gone (they were unlocked at once: ~10 GB/s copies)."""
    import gc

    import torch

    from overspill.runtime import layout

    calls: list[tuple[str, int]] = []

    class Runtime:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    typed = layout.host_tensor((4, 8), torch.float32, pinned=True)
    typed.fill_(1.5)
    view = typed[1:]
    del typed
    gc.collect()
    assert [kind for kind, _ in calls] == ["register"] and float(view.sum()) == 1.5 * 24
    ptr = calls[0][1]
    assert view.data_ptr() == ptr + 8 * 4
    del view
    gc.collect()
    assert calls == [("register", ptr), ("unregister", ptr)]


def test_size_errors_name_their_option_and_offer_auto_only_where_taken() -> None:
    from overspill.planning.units import parse_budget

    with pytest.raises(OverspillError) as err:
        parse_bytes("12XB", "--kv-gpu-memory")
    assert str(err.value).startswith("--kv-gpu-memory: invalid memory size '12XB'") and "'auto'" not in str(err.value)
    with pytest.raises(OverspillError) as err:
        parse_budget("12XB", "--gpu-memory")
    assert str(err.value).startswith("--gpu-memory: invalid memory size '12XB'") and "'auto'" in str(err.value)
