"""`overspill run --ranks N` (the pipeline over layers in gloo processes) as a user runs it, and the
one-line refusals of what does not run as a pipeline yet (serve, batch, --gpus without GPUs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from overspill import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overspill.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("sampling", [(), ("--temperature", "1.3", "--top-k", "20", "--seed", "4")],
                         ids=["greedy", "sampled"])
def test_run_with_two_ranks_answers_like_one_process(default_model_dir, sampling) -> None:
    """Two ranks print one process's text: greedy, and sampled with a seed (every rank samples alike)."""
    args = ("run", "--prompt", "Hi", "--max-new-tokens", "8", *sampling)
    one = run_cli(*args)
    two = run_cli(*args, "--ranks", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    answer = one.stdout.split("> Hi\n", 1)[1].splitlines()[0]
    assert two.stdout.split("> Hi\n", 1)[1].splitlines()[0] == answer  # the same text
    assert "pipeline over 2 ranks" in two.stdout
    assert "layers 0-14 on rank 0 (cpu): 15/15 resident" in two.stdout
    assert "layers 15-29 on rank 1 (cpu)" in two.stdout
    assert "tok/s over 2 ranks (cpu)" in two.stdout
    assert two.stdout.count("> Hi") == 1  # only rank 0 prints


@pytest.mark.parametrize("command", ["serve", "batch"])
def test_serve_and_batch_refuse_ranks(command: str, capsys, tmp_path) -> None:
    files = [str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")] if command == "batch" else []
    assert cli.main([command, *files, "--gpus", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"overspill: error: {command} runs on one GPU for now (its engine batches on one device); "
                   f"--gpus/--ranks 2 work with `overspill run` only")


def test_gpus_without_cuda_and_bad_counts_are_one_line_errors(capsys) -> None:
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["run", "--gpus", "2"]) == 1
        assert "--ranks 2 runs the same pipeline in gloo processes" in capsys.readouterr().err
    assert cli.main(["run", "--ranks", "0"]) == 1
    assert capsys.readouterr().err.strip() == "overspill: error: --ranks must be at least 1, got 0"
    assert cli.main(["plan", "llama-3-8b", "--gpus", "0"]) == 1  # `args.gpus or 1` took 0 for 1
    assert capsys.readouterr().err.strip() == "overspill: error: --gpus must be at least 1, got 0"


def test_more_ranks_than_layers_are_refused_before_any_rank_starts(capsys, default_model_dir) -> None:
    """`run --ranks 40` spawned 40 processes (minutes on a small host) before the plan refused, and `plan --gpus
    100` printed the one-GPU plan first; both now refuse from the config's layer count alone."""
    from unittest import mock

    with mock.patch.object(cli.launch, "spawn", side_effect=AssertionError("spawned")):
        assert cli.main(["run", "--ranks", "40"]) == 1
    assert capsys.readouterr().err.strip() == ("overspill: error: --ranks 40: this model has 30 decoder layers and "
                                               "each rank needs at least one: use at most 30")
    assert cli.main(["plan", "llama-3-8b", "--gpus", "100"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "--gpus 100: this model has 32 decoder layers" in out.err


def test_run_help_documents_the_rank_flags() -> None:
    parser = cli._build_parser()
    run = next(a for a in parser._subparsers._group_actions).choices["run"]
    text = run.format_help()
    assert "--gpus N" in text and "--ranks N" in text and "torchrun" in text


def test_torchrun_starts_the_same_pipeline(default_model_dir) -> None:
    # torchrun sets RANK/WORLD_SIZE/MASTER_*: each process runs as one rank (gloo without CUDA)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    args = ("run", "--prompt", "Hi", "--max-new-tokens", "8")
    one = run_cli(*args)
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "overspill", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    answer = one.stdout.split("> Hi\n", 1)[1].splitlines()[0]
    assert two.stdout.split("> Hi\n", 1)[1].splitlines()[0] == answer
    assert "pipeline over 2 ranks" in two.stdout and two.stdout.count("> Hi") == 1


def test_plan_shows_the_split_over_gpus(capsys) -> None:
    assert cli.main(["plan", "llama-3-70b", "--gpu-memory", "24GiB", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "pipeline over 2 ranks" in out and "rank 1: layers 40-79" in out
    assert "against one GPU" in out and "x predicted" in out and "tensor parallel over 2 GPUs (not implemented" in out
    assert cli.main(["plan", "llama-3-70b", "--gpus", "2", "--json"]) == 1
    assert "--gpus with --json is not supported yet" in capsys.readouterr().err


def test_plan_gpus_gives_each_gpu_the_default_budget(capsys) -> None:
    """Without --gpu-memory each rank has its GPU's free memory less the margin, as `run --gpus` resolves "auto";
    the split was planned without any budget ("budget unlimited"), every layer of Scout resident, 0 B streamed."""
    assert cli.main(["plan", "llama-4-scout-109b", "--gpus", "2", "--host-memory", "1TiB",
                     "--profile", "h100-pcie5"]) == 0
    out = capsys.readouterr().out
    assert "budget unlimited" not in out and "0 B over its link" not in out
    assert "rank 0: layers 0-23 (24, 14 resident), embeddings + lm_head; budget 77.5 GiB" in out
    # the pipeline streams whole MoE layers while the one-GPU plan above streams experts: said, not left to contradict
    assert "stream whole MoE layers, as a pipeline does" in out
    assert cli.main(["plan", "llama-3-70b", "--gpus", "2", "--profile", "h100-pcie5"]) == 0
    out = capsys.readouterr().out
    assert "budget 77.5 GiB" in out and "MoE" not in out
