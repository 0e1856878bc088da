"""`python -m overspill.cli`: help text, one-line errors without tracebacks, and one real run.

Help and the end-to-end run start real subprocesses, as a user would; the matrix of bad inputs
goes through `cli.main` in process (each subprocess would spend seconds importing torch), with two
of them repeated in a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overspill import cli

ROOT = Path(__file__).resolve().parents[1]
RUN_FLAGS = [
    "--gpu-memory", "--dtype", "--random-weights", "--depth", "--context", "--device",
    "--prompt", "--max-new-tokens", "--no-chat-template", "--seed", "--temperature", "--top-p", "--top-k",
]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "overspill.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_top_level_help() -> None:
    out = run_cli("--help")
    assert out.returncode == 0 and not out.stderr
    assert "--traceback" in out.stdout and "run" in out.stdout


def test_run_help_mentions_every_flag() -> None:
    out = run_cli("run", "--help")
    assert out.returncode == 0
    for flag in RUN_FLAGS:
        assert flag in out.stdout, flag
    # Every option the parser knows is documented in the help (nothing added silently).
    parser = cli._build_parser()
    run_parser = next(a for a in parser._subparsers._group_actions).choices["run"]
    for action in run_parser._actions:
        for option in action.option_strings:
            assert option in out.stdout, option
        assert action.help, action.dest


def test_no_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "usage: overspill" in capsys.readouterr().out


# (case id, extra arguments; {tmp} is a scratch directory, expected words in the error line)
ERROR_CASES = [
    ("unknown-path", ["/nonexistent/dir"], ["/nonexistent/dir", "not found"]),
    ("unknown-hub-id", ["nobody/nothing"], ["nobody/nothing", "local Hugging Face cache"]),
    ("missing-gguf", ["{tmp}/x.gguf"], ["x.gguf", "does not exist"]),
    ("not-a-gguf", ["{tmp}/garbage.gguf"], ["garbage.gguf", "truncated or not a GGUF file", "download it again"]),
    ("shipped-config-without-random-weights", ["llama-3-8b"], ["llama-3-8b", "--random-weights"]),
    ("bad-dtype", ["--dtype", "int3"], ["int3", "bfloat16"]),
    ("cpu-experts-on-a-dense-model", ["--cpu-experts", "on"], ["cpu_experts='on'", "no routed experts"]),
    ("bad-memory", ["--gpu-memory", "6XB"], ["6XB", "6GiB"]),
    ("budget-too-small", ["--gpu-memory", "10MiB"], ["10 MiB", "minimum", "--gpu-memory"]),
    ("no-config-json", ["{tmp}/empty"], ["config.json"]),
    ("not-a-causal-lm", ["{tmp}/t5"], ["t5", "causal LM"]),
    ("config-without-weights", ["{tmp}/llama-without-weights"], ["safetensors", "--random-weights"]),
    ("zero-context", ["--context", "0"], ["context"]),
    ("zero-depth", ["--depth", "0", "--gpu-memory", "250MiB"], ["depth"]),
    ("truncated-safetensors", ["{tmp}/truncated"], ["model.safetensors", "truncated or corrupt", "download it again"]),
    ("garbage-safetensors", ["{tmp}/garbage"], ["model.safetensors", "truncated or corrupt", "download it again"]),
    ("config-not-json", ["{tmp}/config-not-json"], ["config.json", "JSON"]),
    ("config-bad-field", ["{tmp}/config-bad-field"], ["config.json", "hidden_size"]),
    ("config-zero-heads", ["{tmp}/config-zero-heads"], ["config.json", "zero"]),
    # transformers would fill in a 7B llama's sizes: refused as `plan` refuses it
    ("config-without-sizes", ["{tmp}/config-without-sizes"], ["config.json", "missing required keys", "hidden_size"]),
    ("encoder-with-random-weights", ["{tmp}/bert", "--random-weights"], ["bert", "decoder-only causal LM"]),
    ("corrupt-tokenizer", ["{tmp}/tokenizer-not-json"], ["tokenizer", "download"]),
    ("generation-config-not-json", ["{tmp}/generation-config-not-json"], ["generation_config.json", "fix or delete"]),
    ("empty-prompt", ["--prompt", "", "--no-chat-template"], ["empty", "--prompt"]),
    ("unknown-device", ["--device", "banana"], ["banana", "cpu", "cuda"]),
    ("unknown-speculate", ["--speculate", "magic"], ["magic", "ngram", "draft:PATH"]),
    ("missing-draft-model", ["--speculate", "draft:/nonexistent/draft"], ["/nonexistent/draft", "draft model"]),
]


def corrupt_checkpoints(tmp: Path, good: Path) -> None:
    """Copies of a good checkpoint with one thing broken, as a half-finished download or a bad edit leaves it."""
    for name in ("truncated", "garbage", "config-not-json", "config-bad-field", "config-zero-heads", "tokenizer-not-json",
                 "generation-config-not-json"):
        shutil.copytree(good, tmp / name)
    weights = (good / "model.safetensors").read_bytes()
    (tmp / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp / "garbage" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (tmp / "config-not-json" / "config.json").write_text("{not json")
    (tmp / "tokenizer-not-json" / "tokenizer.json").write_text('{"version": "1.0", not json')
    (tmp / "generation-config-not-json" / "generation_config.json").write_text("{not json")
    config = json.loads((good / "config.json").read_text())
    (tmp / "config-bad-field" / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    (tmp / "config-zero-heads" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    (tmp / "config-without-sizes").mkdir()
    (tmp / "config-without-sizes" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp / "bert").mkdir()  # an encoder: transformers builds a "causal LM" from it, but its attention looks ahead
    (tmp / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 100})
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_checkpoint) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    corrupt_checkpoints(tmp, tiny_checkpoint("llama"))
    (tmp / "empty").mkdir()
    (tmp / "garbage.gguf").write_bytes(bytes(range(256)) * 4)  # a wrong file saved under a .gguf name
    (tmp / "t5").mkdir()  # an encoder-decoder: transformers has no causal LM for it
    (tmp / "t5" / "config.json").write_text(
        json.dumps({"model_type": "t5", "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64, "vocab_size": 100})
    )
    (tmp / "llama-without-weights").mkdir()  # a valid causal-LM config but no weights next to it
    (tmp / "llama-without-weights" / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 100})
    )
    return tmp


def check_one_line_error(returncode: int, stdout: str, stderr: str, words: list[str]) -> None:
    assert returncode == 1, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("overspill: error:")]
    # Exactly one error line, and it is the last thing printed (no stack, no continuation lines).
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.mark.parametrize(("case", "args", "words"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gives_one_line_error(
    scratch, default_model_dir, capsys, case: str, args: list[str], words: list[str]
) -> None:
    # In process, through the same `main` the console script calls: any exception other than
    # OverspillError would escape `main` and fail the test, which is what a traceback would be.
    argv = ["run", *(a.replace("{tmp}", str(scratch)) for a in args), "--max-new-tokens", "2"]
    code = cli.main(argv)
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["/nonexistent/dir"], ["not found"]),  # fails before any model work
        (["--gpu-memory", "10MiB"], ["minimum"]),  # fails after building the default model
    ],
    ids=["unknown-path", "budget-too-small"],
)
def test_bad_input_in_a_real_process(default_model_dir, args: list[str], words: list[str]) -> None:
    out = run_cli("run", *args)
    check_one_line_error(out.returncode, out.stdout, out.stderr, words)


def test_negative_max_new_tokens_is_refused_before_loading(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli.commands, "run_main", lambda args: pytest.fail("loaded before checking --max-new-tokens"))
    code = cli.main(["run", "--max-new-tokens=-3"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["--max-new-tokens", "-3", "0 to load the model"])
    help_text = " ".join(cli._build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "0 loads the model and prints its placement" in help_text


def test_run_refuses_more_tokens_than_its_context(default_model_dir) -> None:
    """`run` plans KV for --context tokens; a prompt and --max-new-tokens past it would outgrow that
    reservation, so it refuses as serve does (it generated past it before)."""
    out = run_cli("run", "--context", "8", "--max-new-tokens", "40", "--gpu-memory", "400MiB")
    check_one_line_error(out.returncode, out.stdout, out.stderr, ["--max-new-tokens 40", "8-token context", "--context"])


def test_cheap_mistakes_are_refused_before_loading(capsys, monkeypatch) -> None:
    """What a flag alone gets wrong is said before minutes of loading, naming the flag."""
    import torch

    from overspill import api

    monkeypatch.setattr(api, "resolve", lambda *a, **k: pytest.fail("resolved the model before checking the flags"))
    cases = [(["run", "--context", "8", "--max-new-tokens", "8"], ["--max-new-tokens 8", "8-token context"]),
             (["run", "--kv-gpu-memory", "12XB"], ["--kv-gpu-memory", "'12XB'"]),
             (["run", "--context", "0"], ["--context", "got 0"]),
             (["run", "--temperature", "-0.5"], ["--temperature", "-0.5"]),
             (["run", "--temperature", "nan"], ["--temperature", "nan"]),
             (["run", "--temperature", "0.7", "--top-p", "0"], ["--top-p", "got 0"]),
             (["run", "--top-k", "-2"], ["--top-k", "-2"])]
    if not torch.cuda.is_available():
        cases.append((["run", "--cuda-graphs"], ["--cuda-graphs", "CUDA device"]))
    for argv, words in cases:
        code = cli.main(argv)
        out = capsys.readouterr()
        check_one_line_error(code, out.out, out.err, words)


def test_run_samples_as_generate_does_with_its_seed(tiny_checkpoint, capsys) -> None:
    """`run --temperature T --top-p P --top-k K --seed S` prints the tokens transformers' sampled `generate` gives
    with that seed on the same model (some layers streamed from host memory); the default stays greedy."""
    import ast

    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = "streamed"
    ids = torch.tensor([[b % reference.config.vocab_size for b in prompt.encode()]])

    def printed(*flags: str) -> list[int]:
        assert cli.main(["run", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--gpu-memory", "800KiB",
                         "--context", "64", "--dtype", "float32", *flags]) == 0
        out = capsys.readouterr().out
        assert "streamed from pinned host memory" in out
        return ast.literal_eval(next(line for line in out.splitlines() if line.startswith("[")))

    def generated(**kwargs) -> list[int]:
        torch.manual_seed(kwargs.pop("seed", 0))
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=0, **kwargs)
        return out[0, ids.shape[1]:].tolist()

    sampled = printed("--temperature", "1.5", "--top-p", "0.95", "--top-k", "40", "--seed", "11")
    assert sampled == generated(do_sample=True, temperature=1.5, top_p=0.95, top_k=40, seed=11)
    assert printed() == generated(do_sample=False)
    assert sampled != generated(do_sample=False)  # it sampled (random weights: near-uniform next tokens)


def test_plan_takes_dtype_auto_and_blames_a_bad_dtype_on_the_flag(capsys) -> None:
    assert cli.main(["plan", "llama-3-8b", "--dtype", "auto", "--profile", "h100-pcie5"]) == 0
    assert "(llama, bfloat16)" in capsys.readouterr().out
    code = cli.main(["plan", "llama-3-8b", "--dtype", "bogus"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["--dtype", "'bogus'"])
    assert "config.json" not in out.err


def test_argparse_errors_have_no_traceback() -> None:
    out = run_cli("run", "--max-new-tokens", "many")
    assert out.returncode == 2
    assert "invalid int value" in out.stderr and "Traceback" not in out.stderr


def test_run_default_model_end_to_end(default_model_dir) -> None:
    out = run_cli("run", "--max-new-tokens", "8", "--gpu-memory", "400MiB")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    # The placement summary: 400 MiB (float32 on the CPU) forces streaming; the checkpoint's own Q4_1 codes stream
    # as int4 (encoded: a 2-slot ring at depth 2, `placement.ring_slots`).
    assert "streamed from pinned host memory" in text
    assert "ring: 2 slots" in text and "stream format: int4" in text
    assert "of 400 MiB" in text
    # The answer starts, and the speed line reports 8 tokens.
    assert "> What is the highest mountain in the world?" in text
    assert "highest mountain" in text.split("> What is the highest mountain in the world?")[1]
    assert "8 tokens;" in text and "tok/s" in text
    # The converted copy came from the test cache, not the user's.
    assert str(default_model_dir).startswith(os.environ["OVERSPILL_CACHE"])


def test_serve_command_answers_over_http(default_model_dir) -> None:
    """`overspill serve` end to end: loads the default model, binds to loopback, answers, stops on SIGTERM."""
    import socket
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(command("serve", "--port", str(port), "--max-batch", "4", "--prefix-cache", "16MiB"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "KV reserved for 4 sequences" in out and "serving 'SmolLM2-135M-Instruct'" in out


BROKEN = ["truncated", "garbage", "config-not-json", "config-bad-field", "config-zero-heads", "tokenizer-not-json", "bert",
          "generation-config-not-json"]


def command_args(command: str, model: str, tmp: Path) -> list[str]:
    """argv for COMMAND on MODEL with flags that keep a successful run short."""
    if command == "serve":
        return ["serve", model, "--port", "0", "--max-batch", "1"]
    if command == "batch":
        (tmp / "requests.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Hi"}}\n')  # an empty input is refused before loading
        return ["batch", str(tmp / "requests.jsonl"), str(tmp / "results.jsonl"), "--model", model, "--max-batch", "1"]
    return [command, model]


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("command", ["serve", "batch"])
def test_serving_commands_give_one_line_for_a_broken_model(scratch, capsys, command: str, broken: str) -> None:
    pytest.importorskip("fastapi")
    code = cli.main(command_args(command, str(scratch / broken), scratch))
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, [])


@pytest.mark.parametrize(
    ("broken", "words"),
    [("config-not-json", ["config.json", "JSON"]), ("config-bad-field", ["big"]),
     ("config-zero-heads", ["cannot plan", "zero", "config.json"]), ("bert", ["bert", "decoder-only causal LM"])],
)
def test_plan_gives_one_line_for_a_broken_config(scratch, capsys, broken: str, words: list[str]) -> None:
    code = cli.main(["plan", str(scratch / broken), "--profile", "h100-pcie5"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, words)


@pytest.mark.parametrize("broken", ["truncated", "garbage"])
def test_plan_reads_only_the_config_of_a_broken_checkpoint(scratch, capsys, broken: str) -> None:
    # Planning never opens the weights, so a half-downloaded file does not stop it.
    assert cli.main(["plan", str(scratch / broken), "--profile", "h100-pcie5"]) == 0
    assert "layers 0-" in capsys.readouterr().out


def test_truncated_checkpoint_in_a_real_process(scratch) -> None:
    out = subprocess.run([sys.executable, "-m", "overspill", "run", str(scratch / "truncated")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    check_one_line_error(out.returncode, out.stdout, out.stderr, ["truncated or corrupt"])


@pytest.mark.parametrize(
    "args", [[], ["--help"], ["run", "/nonexistent/dir"], ["run", "--max-new-tokens", "many"]],
    ids=["no-command", "help", "error", "usage-error"],
)
def test_python_dash_m_overspill_behaves_as_the_script(args: list[str]) -> None:
    script = Path(sys.executable).with_name("overspill")
    entry = "import sys; from overspill.cli import main; sys.exit(main())"  # what the script runs
    as_script = [str(script)] if script.exists() else [sys.executable, "-c", entry]
    got = subprocess.run([sys.executable, "-m", "overspill", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    want = subprocess.run([*as_script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode == want.returncode, got.stderr
    assert (got.stdout, got.stderr) == (want.stdout, want.stderr)  # argparse's prog is "overspill" either way


def test_plan_without_a_model_plans_the_embedded_one(default_model_dir, capsys) -> None:
    """`run`, `serve` and `batch` default to the embedded model; `plan` does too, once it is converted."""
    assert cli.main(["plan", "--profile", "h100-pcie5"]) == 0
    assert capsys.readouterr().out.startswith("model: SmolLM2-135M-Instruct (llama, ")


def test_a_reader_leaving_early_is_not_a_traceback() -> None:
    """`overspill plan MODEL | head -3`: the pipe closes before plan prints; it stops quietly with 141 (SIGPIPE's
    status) instead of a BrokenPipeError traceback."""
    proc = subprocess.Popen(command("plan", "llama-3-8b", "--profile", "h100-pcie5"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # no reader left before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert not err, err


def test_run_refuses_tokens_past_a_learned_position_table(tmp_path, capsys) -> None:
    """GPT-2 looks positions up in a table of n_positions rows: generating past it raised IndexError from torch's
    embedding (a traceback after loading). A rotary model computes positions past its limit and still runs."""
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                                  "vocab_size": 300, "n_positions": 16,
                                                  "bos_token_id": 0, "eos_token_id": 0}))  # in range: no warning
    args = ["--random-weights", "--prompt", "twelve bytes", "--no-chat-template", "--max-new-tokens", "8"]
    code = cli.main(["run", str(gpt2), *args])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["12 tokens", "--max-new-tokens 8", "16 positions", "--prompt"])
    assert cli.main(["run", str(gpt2), *args[:-1], "4"]) == 0  # 16 tokens: within the table
    assert "the answer is meaningless text" in capsys.readouterr().out  # --random-weights says what its text is
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "intermediate_size": 64,
                                                   "vocab_size": 300, "max_position_embeddings": 16}))
    assert cli.main(["run", str(llama), *args]) == 0


def test_every_option_that_takes_a_value_states_its_default() -> None:
    """`--help` for every flag: an option taking a value says what happens without it (run's --ranks did not)."""
    sub = next(a for a in cli._build_parser()._subparsers._group_actions)
    for name in ("run", "plan", "probe"):  # serve and batch take --gpus/--ranks "only 1 for now"
        for action in sub.choices[name]._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                assert "default" in action.help.lower(), (name, action.option_strings)
