"""The speed options (speculate, stream format, CPU rank, MoE streaming, host experts) mean the same through
every entry point: each command that loads a model documents them, passes `load` what the Python API would
get, and `overspill plan` predicts with the choice `load` makes (or refuses what it refuses, in the same words).

What a command hands `load` is read by replacing `overspill.api.load` (each command imports it when called),
so no weights are read; the plan/load comparisons load tiny checkpoints on the CPU.
"""

from __future__ import annotations

import inspect
import json
import socket

import pytest

from overspill import api, cli
from overspill.errors import OverspillError

from test_cli import check_one_line_error
from test_gguf_moe_experts import CONTEXT as MOE_CONTEXT
from test_gguf_moe_experts import moe_gguf  # noqa: F401 (a fixture: the tiny GGUF MoE whose experts keep their codes)
from test_placement import load_tiny

# load's keyword per flag of the four speed features (and the options they combine with)
SPEED_OPTIONS = {"--speculate": "speculate", "--speculate-tree": "speculate_tree", "--stream-format": "stream_format",
                 "--cpu-compute": "cpu_compute", "--cpu-compute-format": "cpu_compute_format",
                 "--moe-streaming": "moe_streaming", "--cpu-experts": "cpu_experts", "--layout": "layout"}
LOADING_COMMANDS = ("run", "serve", "batch", "plan")
REQUEST = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Hi"}}\n'


class _Loaded(Exception):
    """Raised by the stand-in `load`, so a command stops before it reads weights or serves."""


def _subparser(command: str):
    return next(a for a in cli._build_parser()._subparsers._group_actions).choices[command]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(command: str, tmp_path, *flags: str) -> list[str]:
    """argv for a loading command on the embedded model (never loaded here)."""
    if command == "serve":
        return ["serve", "--port", str(_free_port()), *flags]
    if command == "batch":
        (tmp_path / "in.jsonl").write_text(REQUEST)  # an empty input is refused before loading
        return ["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), *flags]
    return [command, *flags]


def _load_kwargs(monkeypatch, argv: list[str]) -> dict:
    """The keywords `cli.main(argv)` calls `overspill.api.load` with."""
    seen: dict = {}

    def fake_load(model=None, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(api, "load", fake_load)
    with pytest.raises(_Loaded):
        cli.main(argv)
    return seen


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_command_that_loads_or_plans_documents_the_speed_options(command: str) -> None:
    documented = {o: a.help for a in _subparser(command)._actions for o in a.option_strings}
    for flag in SPEED_OPTIONS:
        assert documented.get(flag), (command, flag)


@pytest.mark.parametrize("command", ["run", "serve", "batch"])
def test_defaults_reach_load_as_the_python_api_has_them(command: str, monkeypatch, tmp_path) -> None:
    defaults = {k: p.default for k, p in inspect.signature(api.load).parameters.items()}
    kwargs = _load_kwargs(monkeypatch, _argv(command, tmp_path))
    for key in SPEED_OPTIONS.values():
        if command != "run" and key in ("speculate_tree", "cpu_compute", "cpu_compute_format"):
            # the engine drafts trees itself; serve and batch run the CPU rank off, load's default
            assert key not in kwargs, key
            continue
        assert kwargs[key] == defaults[key], (command, key)


@pytest.mark.parametrize("command", ["run", "serve", "batch"])
def test_given_values_reach_load_unchanged(command: str, monkeypatch, tmp_path) -> None:
    given = {"--speculate": "ngram", "--stream-format": "int8", "--moe-streaming": "dense", "--cpu-experts": "auto",
             "--layout": "spread"}
    if command == "run":
        given.update({"--speculate-tree": "8", "--cpu-compute": "0.5", "--cpu-compute-format": "int8"})
    flags = [part for pair in given.items() for part in pair]
    kwargs = _load_kwargs(monkeypatch, _argv(command, tmp_path, *flags))
    for flag, value in given.items():
        expected = int(value) if flag == "--speculate-tree" else value
        assert kwargs[SPEED_OPTIONS[flag]] == expected, (command, flag)


# (flags beside --cpu-compute, the reason `load` gives for keeping the CPU rank off)
CPU_RANK_BLOCKERS = [(["--cuda-graphs"], "CUDA graphs cannot wait for the host's partial sums"),
                     (["--speculate", "ngram"], "speculative verification is not split yet"),
                     (["--serve"], "serve and batch do not run the CPU rank yet")]


@pytest.mark.parametrize(("flags", "reason"), CPU_RANK_BLOCKERS)
def test_plan_keeps_the_cpu_rank_off_where_load_and_serve_do(capsys, flags: list[str], reason: str) -> None:
    """`plan --cpu-compute auto` predicted the host's share beside CUDA graphs, speculation and `--serve`, none of
    which run it: `load` notes it off (serve never passes it), so the plan must predict plain streaming."""
    base = ["plan", "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--json"]
    assert cli.main([*base, "--cpu-compute", "auto"]) == 0
    alone = json.loads(capsys.readouterr().out)["plan"]
    assert alone["cpu_fraction"] > 0  # the 8B shape at 6 GiB gains from the host at batch 1
    assert cli.main([*base, "--cpu-compute", "auto", *flags]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["cpu_fraction"] == 0 and any(n.startswith(f"CPU rank off: {reason}") for n in plan["notes"])
    text = [a for a in base if a != "--json"]
    assert cli.main([*text, "--cpu-compute", "auto"]) == 0
    assert "CPU rank (--cpu-compute" in capsys.readouterr().out  # the per-batch table
    assert cli.main([*text, "--cpu-compute", "auto", *flags]) == 0
    assert "CPU rank (--cpu-compute" not in capsys.readouterr().out  # no gains shown for a rank that will not run
    code = cli.main([*base, "--cpu-compute", "0.5", *flags])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["--cpu-compute 0.5", reason, "--cpu-compute off"])


def test_plan_refuses_int8_host_weights_under_serve_as_serve_does(capsys) -> None:
    code = cli.main(["plan", "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--serve",
                     "--cpu-compute", "auto", "--cpu-compute-format", "int8"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["--cpu-compute-format int8", "serve and batch", "drop"])


def test_plan_and_load_refuse_a_split_beside_speculation_in_the_same_words(tiny_checkpoint, capsys) -> None:
    path = tiny_checkpoint("llama")
    capsys.readouterr()  # the checkpoint's save progress
    with pytest.raises(OverspillError) as refused:
        load_tiny(path, resident=4, cpu_compute=0.5, speculate="ngram")
    code = cli.main(["plan", str(path), "--gpu-memory", "128.5MiB", "--context", "64", "--profile", "h100-pcie5",
                     "--cpu-compute", "0.5", "--speculate", "ngram"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, [])
    assert out.err.strip() == f"overspill: error: {refused.value}"


def _plan_json(capsys, *flags: str) -> dict:
    assert cli.main(["plan", *flags, "--profile", "h100-pcie5", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("model", "budget", "drafts"), [("llama-3-8b", "6GiB", "ngram"), ("llama-3-8b", "40GiB", None),
                                                        ("mixtral-8x7b", "24GiB", None)])
def test_plan_speculate_auto_chooses_as_load_does(capsys, model: str, budget: str, drafts: str | None) -> None:
    """`run --speculate auto` (`load(speculate="auto")`) drafts with ngram where a pass crosses the link and not on a
    resident plan or beside expert streaming, keeping the prefix there (tests/test_speculative.py, test_moe.py);
    `plan --speculate auto` refused the value. It now places and forecasts as that choice does."""
    auto = _plan_json(capsys, model, "--gpu-memory", budget, "--speculate", "auto")
    same = _plan_json(capsys, model, "--gpu-memory", budget, *(["--speculate", drafts] if drafts else []))
    assert auto["plan"]["layer_tiers"] == same["plan"]["layer_tiers"]
    assert auto["plan"]["moe_streaming"] == same["plan"]["moe_streaming"]
    assert any(n.startswith(f"speculate auto: {drafts or 'plain decoding'}") for n in auto["plan"]["notes"])
    if drafts:
        assert auto["speculation"] == same["speculation"] and auto["speculation"]["source"] == drafts
    else:
        assert auto.get("speculation") is None


def test_plan_and_load_refuse_host_experts_for_a_ggufs_coded_experts_in_the_same_words(moe_gguf, capsys) -> None:
    """A converted GGUF MoE's routed experts stream as their codes (`Plan.expert_codes`), which the host cannot
    compute on: `load(cpu_experts="on")` refused it while `plan --cpu-experts on` placed it. Off, both stream experts as
    codes (the CPU load keeps no activation floor, so it gets plan's budget less that floor); on, both refuse alike."""
    from overspill.planning.plan import ACTIVATION_FLOOR_BYTES
    from overspill.planning.units import parse_bytes

    budget = "200MiB"
    on_cpu = parse_bytes(budget, "budget") - ACTIVATION_FLOOR_BYTES  # load on the CPU keeps no activation floor
    flags = ["--gpu-memory", budget, "--context", str(MOE_CONTEXT), "--dtype", "float32"]
    model, _ = api.load(moe_gguf, gpu_memory=on_cpu, dtype="float32", context=MOE_CONTEXT, progress=False)
    capsys.readouterr()  # the conversion's progress
    plan = _plan_json(capsys, str(moe_gguf), *flags)["plan"]
    placed = model.overspill.plan
    assert placed.moe_streaming == plan["moe_streaming"] == "experts" and placed.expert_codes
    assert plan["expert_codes"] and placed.streamed_layers and "pinned" in plan["layer_tiers"]
    with pytest.raises(OverspillError) as refused:
        api.load(moe_gguf, gpu_memory=on_cpu, dtype="float32", context=MOE_CONTEXT, progress=False, cpu_experts="on")
    assert "checkpoint's codes" in str(refused.value)
    code = cli.main(["plan", str(moe_gguf), *flags, "--profile", "h100-pcie5", "--cpu-experts", "on"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, [])
    assert out.err.strip() == f"overspill: error: {refused.value}"
