"""`overspill plan` and `overspill probe`: tables, JSON, one-line errors and help text.

All through `cli.main` in process (as tests/test_cli.py does for bad input): `plan` never imports
torch, so each call takes milliseconds; `probe` imports torch once for the CPU-only profile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from overspill import cli, commands
from overspill.planning.placement import plan_for
from overspill.planning.plan import Tier, footprint_from_spec
from overspill.planning.planview import layer_groups, render
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.spec import spec_from_config

ROOT = Path(__file__).resolve().parents[1]
PLAN_FLAGS = ["--gpu-memory", "--context", "--batch", "--depth", "--dtype", "--profile", "--json"]
PROBE_FLAGS = ["--refresh", "--json"]
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 256}


def plan(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, out: str, err: str, *words: str) -> str:
    assert code == 1 and not out and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("overspill: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_70b_table_has_group_rows_and_a_prediction(capsys) -> None:
    code, out, err = plan(capsys, "llama-3-70b", "--profile", "h100-pcie5")
    assert code == 0 and not err
    # 77.5 GiB budget: the first 37 of 80 layers stream, the last 43 stay; one row per group.
    assert re.search(r"^layers 0-36 +\| pinned \(streamed\) +\| 37 layers +\| 59 GiB +\| 59 GiB over the link", out, re.M)
    assert re.search(r"^layers 37-79 +\| device \(resident\) +\| 43 layers", out, re.M)
    for row in ("embeddings", "lm_head", "ring slots", "workspace", "total on GPU"):
        assert re.search(rf"^{row} +\|", out, re.M), row
    assert "3 x 1.59 GiB" in out and "KV 1.25 GiB (4096 tokens x batch 1)" in out
    # Link-bound at the floor: 59 GiB per token over 54 GB/s = 0.85 tok/s.
    assert "predicted decode: 0.85 tok/s at batch 1; link floor 0.85 tok/s" in out
    assert "bottleneck: link" in out and "predicted prefill" in out and "largest batch" in out
    assert "reference profile" not in out  # --profile was explicit


def test_default_profile_on_a_cpu_machine_is_the_h100_reference(capsys, monkeypatch) -> None:
    monkeypatch.setattr(commands, "_cuda_device_present", lambda: False)
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "6GiB")
    assert code == 0
    assert "reference: H100" in out and "run `overspill probe` on the GPU machine" in out
    assert re.search(r"^layers 0-24 +\| pinned \(streamed\) +\| 25 layers", out, re.M)
    assert "of 6 GiB budget" in out


def test_json_has_plan_profile_model_and_spec(capsys) -> None:
    code, out, err = plan(capsys, "llama-3-70b", "--profile", "h100-pcie5", "--json")
    assert code == 0 and not err
    d = json.loads(out)
    assert d["model"] == "llama-3-70b" and d["profile"] == REFERENCE_PROFILES["h100-pcie5"].name
    assert len(d["plan"]["layer_tiers"]) == 80 and d["plan"]["layer_tiers"][0] == "pinned"
    assert d["plan"]["prediction"]["bottleneck"] == "link"
    assert d["spec"]["num_layers"] == 80 and d["spec"]["num_params"] > 70e9


def test_json_keeps_stdout_clean_with_the_reference_note(capsys, monkeypatch) -> None:
    monkeypatch.setattr(commands, "_cuda_device_present", lambda: False)
    code, out, err = plan(capsys, "qwen2.5-7b", "--json")
    assert code == 0 and json.loads(out)["plan"]["layer_tiers"] == ["device"] * 28
    assert "reference profile" in err


@pytest.mark.parametrize(("model", "layers"), [("mixtral-8x7b", 32), ("llama-4-scout-109b", 48)])
def test_moe_models_plan(capsys, model: str, layers: int) -> None:
    code, out, _ = plan(capsys, model, "--profile", "h100-pcie5", "--host-memory", "256GiB")  # Scout: 203 GiB of bf16
    assert code == 0 and "(routed experts)" in out and "predicted decode" in out
    code, out, _ = plan(capsys, model, "--profile", "gh200", "--json")
    assert code == 0 and len(json.loads(out)["plan"]["layer_tiers"]) == layers


def test_flags_reach_the_plan(capsys) -> None:
    code, out, _ = plan(capsys, "llama-3-8b", "--profile", "a100-pcie4", "--gpu-memory", "10GiB",
                        "--context", "1024", "--batch", "2", "--depth", "3", "--dtype", "float16", "--json")
    assert code == 0
    p = json.loads(out)["plan"]
    assert p["workload"]["context"] == 1024 and p["workload"]["batch"] == 2
    assert p["depth"] == 3 and p["slots"] == 4 and p["budget_bytes"] == 10 * 2**30
    assert json.loads(out)["spec"]["dtype"] == "float16"


def test_directory_and_config_path_with_a_tiny_config(capsys, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        code, out, _ = plan(capsys, model, "--profile", "h100-pcie5", "--gpu-memory", "1GiB")
        assert code == 0 and re.search(r"^layers 0-3 +\| device \(resident\) +\| 4 layers", out, re.M)


def test_hub_id_is_read_from_the_local_cache_only(capsys, tmp_path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(tmp_path / name) if repo == "me/tiny" else None)
    code, out, _ = plan(capsys, "me/tiny", "--profile", "h100-pcie5", "--json")
    assert code == 0 and json.loads(out)["model"] == "me/tiny"
    one_line_error(*plan(capsys, "me/absent", "--profile", "h100-pcie5"), "me/absent", "local Hugging Face cache")


def test_budget_too_small_names_the_minimum(capsys) -> None:
    line = one_line_error(*plan(capsys, "llama-3-8b", "--profile", "h100-pcie5", "--gpu-memory", "1GiB"), "minimum")
    # 2.59 GiB once every layer's KV may live in host memory, counting one layer's attention
    # transients during a 2048-token prefill chunk (GQA-expanded KV, boolean and bf16 mask) and the slack.
    assert "2.59 GiB" in line and "--gpu-memory" in line and "host memory" in line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["no-such-model"], ["no-such-model", "not found", "llama-3-8b"]),
        (["owner/not-cached"], ["owner/not-cached", "local Hugging Face cache"]),
        (["llama-3-8b", "--gpu-memory", "6XB"], ["6XB", "6GiB"]),
        (["llama-3-8b", "--gpu-memory", "500GiB"], ["500 GiB", "free"]),
        (["llama-3-8b", "--dtype", "int3"], ["int3", "bfloat16"]),
        (["llama-3-8b", "--context", "0"], ["context"]),
        (["llama-3-8b", "--batch", "0"], ["batch"]),
        (["llama-3-8b", "--depth", "0"], ["depth"]),
        (["llama-3-8b", "--profile", "cpu", "--gpu-memory", "20GiB"], ["cpu", "no GPU", "h100-pcie5"]),
    ],
    ids=["unknown-model", "hub-id-not-cached", "bad-size", "budget-above-free", "bad-dtype", "zero-context",
         "zero-batch", "zero-depth", "cpu-profile"],
)
def test_bad_input_is_one_line(capsys, args: list[str], words: list[str]) -> None:
    one_line_error(*plan(capsys, *args, *([] if "--profile" in args else ["--profile", "h100-pcie5"])), *words)


def test_config_problems_are_one_line(capsys, tmp_path) -> None:
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}))
    one_line_error(*plan(capsys, str(missing), "--profile", "h100-pcie5"), "vocab_size")
    (tmp_path / "empty").mkdir()
    one_line_error(*plan(capsys, str(tmp_path / "empty"), "--profile", "h100-pcie5"), "config.json")
    (tmp_path / "broken.json").write_text("{not json")
    one_line_error(*plan(capsys, str(tmp_path / "broken.json"), "--profile", "h100-pcie5"), "JSON")


def test_render_groups_alternating_tiers() -> None:
    # Groups are runs of one tier, whatever the order (a future planner may interleave them).
    from dataclasses import replace

    fp = footprint_from_spec(spec_from_config(TINY))
    base = plan_for(fp, REFERENCE_PROFILES["h100-pcie5"], budget_bytes=2**30)
    tiers = (Tier.PINNED, Tier.DEVICE, Tier.DEVICE, Tier.PINNED)
    mixed = replace(base, layer_tiers=tiers, prediction=None)
    assert layer_groups(mixed) == [(0, 0, Tier.PINNED), (1, 2, Tier.DEVICE), (3, 3, Tier.PINNED)]
    text = render(mixed, fp, spec_from_config(TINY), REFERENCE_PROFILES["h100-pcie5"], "tiny")
    assert "layer 0 " in text and "layers 1-2" in text and "layer 3 " in text and "n/a" in text


def test_probe_json_on_this_machine(capsys) -> None:
    assert cli.main(["probe", "--json"]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["name"] and "h2d_bytes_s" in d
    import torch

    if not torch.cuda.is_available():
        assert d["gpu_total_bytes"] == 0 and "CPU-only" in out.err


@pytest.mark.parametrize(("command", "flags"), [("plan", PLAN_FLAGS), ("probe", PROBE_FLAGS)])
def test_help_mentions_every_flag(capsys, command: str, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, flag
    # Nothing added silently: every option the parser knows is in the help, with a description.
    sub = next(a for a in cli._build_parser()._subparsers._group_actions).choices[command]
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text, option
        assert action.help, action.dest
    if command == "plan":
        text = " ".join(text.split())  # argparse wraps to the terminal width
        assert "default 4096" in text and "default 1" in text and "default 2" in text
        assert "h100-pcie5" in text and "free GPU memory minus" in text


def test_plan_command_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys; from overspill import cli; "
        "assert cli.main(['plan', 'llama-4-scout-109b', '--profile', 'h100-pcie5', '--host-memory', '256GiB']) == 0; "
        "assert 'torch' not in sys.modules, 'plan imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr


def test_unsupported_architecture_is_planned_as_llama_with_a_note(capsys, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "somearch"}))
    code, out, _ = plan(capsys, str(tmp_path), "--profile", "h100-pcie5", "--gpu-memory", "1GiB")
    assert code == 0 and "no byte layout for model_type 'somearch'" in out


def test_plan_serve_plans_what_serve_loads_and_unmeasured_managed_is_not_chosen() -> None:
    """`--serve` reserves one engine pass, so layers stay resident that `generate`'s reserve streams;
    no profile has measured managed prefetch faster than copies, so even GH200 copies."""
    import subprocess
    import sys

    def table(*extra: str) -> str:
        cmd = [sys.executable, "-m", "overspill.cli", "plan", "llama-3-8b", "--gpu-memory", "6GiB", "--context", "256",
               "--batch", "64", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    generate, serve = table("--profile", "h100-pcie5"), table("--profile", "h100-pcie5", "--serve")
    layers = lambda text: text.split("embeddings")[0]  # noqa: E731 - the layer rows of the table
    assert "layers 0-31" in layers(generate) and "device (resident)" not in layers(generate)
    assert "device (resident)" in layers(serve)
    assert "pinned (streamed)" in table("--profile", "gh200") and "managed" not in generate


def test_a_spread_plan_shows_one_row_per_tier(capsys):
    # `plan --speculate` spreads the streamed layers (layout auto): the table lists them in one row, not one per run
    code, out, _ = plan(capsys, "llama-3-70b", "--gpu-memory", "76GiB", "--profile", "h100-pcie5", "--speculate", "ngram")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("layer", "the other layers"))]
    assert len(rows) == 2 and rows[0].startswith("layers 0, 2, 4, ...") and "(spread)" in rows[0]
    assert rows[1].startswith("the other layers") and "device (resident)" in rows[1]
    code, out, _ = plan(capsys, "llama-3-70b", "--gpu-memory", "76GiB", "--profile", "h100-pcie5")
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.startswith("layers")] == \
        ["layers 0-37", "layers 38-79"]


def test_largest_batch_line_says_it_counts_kv_on_the_gpu(capsys) -> None:
    """A batch-1 plan that keeps its KV in host memory was followed by "largest batch ...: 0": the count is of
    sequences whose KV fits on the GPU, and the line says so."""
    code, out, _ = plan(capsys, "qwen3-30b-a3b", "--gpu-memory", "6GiB", "--context", "131072",
                        "--profile", "h100-pcie5")
    assert code == 0 and "KV layers 0-45" in out
    line = next(line for line in out.splitlines() if line.startswith("largest batch"))
    assert line == ("largest batch with its KV on the GPU at 131072 tokens of context: 0 (this plan keeps KV in host "
                    "memory instead)")
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5")
    assert code == 0 and "largest batch with its KV on the GPU at 4096 tokens of context: 1\n" in out


def test_stream_format_bytes_per_step_count_host_kv_as_the_prediction_does(capsys) -> None:
    """With host-tier KV the formats table showed only the layers' bytes (9.75 GiB) beside a link floor computed
    from layers plus KV (102 GiB a step), and beside the MoE table's bytes/step, which counts the KV."""
    code, out, _ = plan(capsys, "llama-3-8b", "--context", "131072", "--batch", "8", "--profile", "h100-pcie5")
    assert code == 0 and "KV layers 0-22" in out
    per_step = re.search(r"link floor [\d.]+ tok/s \(([\d.]+ \w+) per step", out).group(1)
    assert per_step == "102 GiB"
    assert re.search(rf"^bf16 +\| {per_step} +\|", out, re.M), out
    assert "bytes/step counts the host-tier KV too" in out
    code, out, _ = plan(capsys, "qwen3-30b-a3b", "--gpu-memory", "6GiB", "--context", "131072",
                        "--profile", "h100-pcie5")
    moe = re.search(r"^experts +\| 1 +\| ([\d.]+ \w+) +\|", out, re.M).group(1)
    assert re.search(rf"^bf16 +\| {moe} +\|", out, re.M), out


def test_probe_says_it_is_measuring_before_the_silent_seconds(capsys, monkeypatch) -> None:
    from overspill.runtime import hardware

    assert cli.main(["probe", "--json"]) == 0
    out = capsys.readouterr()
    json.loads(out.out)  # stdout stays one JSON object
    import torch

    if not torch.cuda.is_available():
        assert "measuring this machine's host CPU" in out.err
    measured = REFERENCE_PROFILES["h100-pcie5"]
    monkeypatch.setattr(commands, "_cuda_device_present", lambda: True)
    monkeypatch.setattr(hardware, "probe", lambda refresh=False: measured)
    assert cli.main(["probe", "--refresh"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("measuring this machine (about 10-30 s") and "H100" in out.out


def test_a_cpu_only_profile_describes_no_gpu() -> None:
    """The CPU-only profile printed 'GPU memory 0.0 GiB', 'host->GPU 0.0 GB/s' and a placeholder 'bf16 matmul:
    1 TFLOP/s' beside a measured GEMM, and said its GEMV ran 'while the link copies'."""
    from dataclasses import replace

    from overspill.planning.profile import REFERENCE_PROFILES

    cpu = replace(REFERENCE_PROFILES["cpu"], cpu_threads=1, cpu_gemm_flops_s=0.19e12)
    text = cpu.summary()
    assert "no GPU; host memory available" in text and "on 1 thread," in text
    for gpu_word in ("GPU memory", "host->GPU", "bf16 matmul", "while the link copies", "join"):
        assert gpu_word not in text, gpu_word
    gpu = replace(REFERENCE_PROFILES["h100-pcie5"], cpu_threads=15).summary()
    assert all(word in gpu for word in ("GPU memory", "bf16 matmul", "while the link copies", "join"))
