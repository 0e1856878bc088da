"""`overspill batch`: run an OpenAI Batch file (JSONL) through one `Engine`, for throughput.

Input lines: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`. Output lines: `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}`, appended and flushed the moment their request ends, so they come in completion order
and a killed run resumes: lines already in the output are not run again, except those that failed with
a server error (5xx: the engine failed, not the input), whose rows are removed so they run again. A
bad line gets the status and OpenAI error body the server would answer (400, 404, 405) and the
batch goes on; a request that fails while generating gets its own 500 row, the others are untouched.

The calling thread validates, tokenizes and submits requests while the engine's queue has room, so
the engine always has sequences to decode together. Each request's events collect in a sink on the
engine thread; finished requests come back through one queue to the calling thread, the only writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..errors import OverspillError
from .engine import Engine, Event, GenerationRequest, InvalidRequest, QueueFull
from .openai_protocol import (
    ApiError, Collected, ServerConfig, TokenTexts, check_at_least_one, generation_request, load_for_serving,
    sampling_defaults, served_name, validation_error,
)
from .requests import check_speculate
from .schemas import ChatCompletionRequest, CompletionRequest

_CHAT_URLS = {"/v1/chat/completions": True, "/v1/completions": False}  # url -> is it chat?


@dataclass(frozen=True)
class BatchSummary:
    """What one `run_batch` did. failed: error lines written (bad input or failed generation);
    unfinished: requests cancelled by the engine closing, not written, so a rerun does them;
    rerun: rows of an earlier run that had failed with a server error, removed and run again."""

    total: int
    skipped: int
    ok: int
    failed: int
    unfinished: int
    prompt_tokens: int
    generated_tokens: int
    wall_seconds: float
    rerun: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def report(self) -> str:
        rerun = f"; {self.rerun} run again after a server error" if self.rerun else ""
        line = (f"{self.ok} ok, {self.failed} failed of {self.total} requests ({self.skipped} skipped: already "
                f"in the output{rerun}); {self.generated_tokens} tokens generated in {self.wall_seconds:.1f} s = "
                f"{self.tokens_per_second:.1f} tok/s")
        if self.unfinished:
            line += f"; {self.unfinished} unfinished (run again to finish them)"
        return line


@dataclass
class _Line:
    """One input line. key ties it to its output line: ("id", custom_id) for a request, or
    ("error", message) for a line without a usable custom_id or a repeated one (the message names
    the input line, so a rerun recognizes the error line it wrote before)."""

    number: int
    key: tuple[str, str]
    custom_id: str | None
    data: dict | None = None
    error: ApiError | None = None


@dataclass
class _Job:
    custom_id: str | None
    collected: Collected


def check_paths(input_path: str | Path, output_path: str | Path) -> tuple[Path, Path]:
    """Both paths, checked before any model work: the input is a file, the output's folder exists."""
    inp, out = Path(input_path).expanduser(), Path(output_path).expanduser()
    if not inp.is_file():
        raise OverspillError(f"batch input {inp} does not exist or is not a file; pass a JSONL file of requests")
    if out.is_dir():
        raise OverspillError(f"batch output {out} is a directory; pass a file path such as {out / 'output.jsonl'}")
    if not out.parent.is_dir():
        raise OverspillError(f"the folder of batch output {out} does not exist; create {out.parent} first")
    if inp.resolve() == out.resolve():
        raise OverspillError(f"batch input and output are the same file ({inp}); pass another output path")
    return inp, out


def run_batch(engine: Engine, input_path: str | Path, output_path: str | Path, config: ServerConfig,
              progress: bool = True) -> BatchSummary:
    """Run every request of an OpenAI Batch input file through a started `engine`.

    Args:
        engine: a started `Engine`; its `tokenizer` and `tokenizer_lock` tokenize the prompts.
        input_path: JSONL, one `{"custom_id", "method", "url", "body"}` per line.
        output_path: JSONL results, appended; custom_ids (and error lines) already there are skipped,
            unless they failed with a server error (5xx): those rows are removed and run again.
        config: the served model name (bodies must name it), context and max_tokens limit.
        progress: show a tqdm bar over requests on stderr and say how many were skipped.

    Returns:
        A `BatchSummary` of this run (skipped lines are not counted in ok/failed).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    inp, out = check_paths(input_path, output_path)
    lines = _read_input(inp)
    written, rerun = _prepare_output(out)
    todo = [line for line in lines if line.key not in written]
    skipped = len(lines) - len(todo)
    if progress and skipped:
        tqdm.write(f"skipping {skipped} of {len(lines)} requests already in {out}")
    if progress and rerun:
        tqdm.write(f"running {rerun} requests again that had failed with a server error")
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="req", disable=not progress,
                                                       dynamic_ncols=True) as bar:
        run = _Run(engine, config, f, bar, start)
        for line in todo:
            run.do(line)
        run.drain(until_idle=True)
    return BatchSummary(len(lines), skipped, run.ok, run.failed, run.unfinished, run.prompt_tokens,
                        run.generated_tokens, time.perf_counter() - start, rerun)


class _Run:
    """State of one `run_batch`: submits requests, writes finished ones (on the calling thread only)."""

    def __init__(self, engine: Engine, config: ServerConfig, f, bar, start: float):
        self.engine, self.config, self.f, self.bar, self.start = engine, config, f, bar, start
        self.finished: queue.Queue[tuple[_Job, Event]] = queue.Queue()
        self.texts = TokenTexts(engine.tokenizer, engine.tokenizer_lock)
        self.in_flight = 0
        self.ok = self.failed = self.unfinished = self.prompt_tokens = self.generated_tokens = 0

    def do(self, line: _Line) -> None:
        try:
            if line.error is not None:
                raise line.error
            job, req = self._prepare(line)
        except Exception as exc:  # one bad line must not stop the batch; the server answers these 500
            err = exc if isinstance(exc, ApiError) else ApiError(
                500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
            self._write(line.custom_id, err.status, err.body())
            return
        refused = self._submit(job, req)
        if refused is not None:
            self._write(line.custom_id, refused.status, refused.body())
            return
        self.in_flight += 1
        self.drain(until_idle=False)

    def _submit(self, job: _Job, req: GenerationRequest) -> ApiError | None:
        """Queue `req`, waiting for room; the error to write if the engine refuses it (None: queued)."""
        while True:  # keep the engine's queue full: wait for one to finish only when it has no room
            try:
                self.engine.submit(req, self._sink(job))
                return None
            except QueueFull:
                self.drain(until_idle=False, block=True)
            except InvalidRequest as exc:  # e.g. a seed past 64 bits, or more KV than the engine holds
                return ApiError(400, str(exc), param=_body_param(exc.field, job.collected.chat), code=exc.code)
            except RuntimeError as exc:  # the engine thread died or closed: no later line can run either
                self.drain(until_idle=True)  # an ended engine has ended every request: write their rows
                raise OverspillError(f"{exc}; the results so far are in the output: run the batch again to "
                                     "finish it") from exc

    def _prepare(self, line: _Line) -> tuple[_Job, GenerationRequest]:
        """Validate and tokenize like the server's handlers; raises ApiError with the server's status."""
        data = line.data
        url, method = data.get("url"), data.get("method", "POST")
        if not isinstance(url, str) or url not in _CHAT_URLS:
            raise ApiError(404, f"url {url!r} is not served; use one of {', '.join(_CHAT_URLS)}",
                           "not_found_error", param="url")
        if method != "POST":
            raise ApiError(405, f"method {method!r} is not allowed; batch requests use POST", param="method")
        chat = _CHAT_URLS[url]
        try:
            body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data.get("body"))
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        if body.stream:
            raise ApiError(400, "stream is not supported in a batch", param="stream")
        req = generation_request(body, self.engine.tokenizer, self.engine.tokenizer_lock, self.config)
        if body.speculate is not None:
            req = dataclasses.replace(req, speculate=body.speculate)
        return _Job(line.custom_id, Collected(chat, len(req.prompt_ids))), req

    def _sink(self, job: _Job):
        def sink(event: Event) -> None:  # on the engine thread: collect, hand over when finished
            if job.collected.add(event):
                self.finished.put((job, event))

        return sink

    def drain(self, until_idle: bool, block: bool = False) -> None:
        """Write finished requests: all that are ready, at least one if `block`, every one if `until_idle`."""
        while self.in_flight:
            try:
                job, event = self.finished.get(block=block or until_idle)
            except queue.Empty:
                return
            self.in_flight -= 1
            self._finish(job, event)
            block = False

    def _finish(self, job: _Job, event: Event) -> None:
        if event.finish == "cancelled":  # the engine closed under us: leave it for a rerun
            self.unfinished += 1
            return
        self.generated_tokens += event.completion_tokens
        status, body = job.collected.response(self.config.model_name, self.texts)
        if status == 200:
            self.prompt_tokens += job.collected.prompt_tokens
            if event.speculation is not None:
                body["usage"]["speculation"] = event.speculation.as_dict()
        self._write(job.custom_id, status, body)

    def _write(self, custom_id: str | None, status: int, body: dict) -> None:
        result = {
            "id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None,
        }
        line = json.dumps(result, ensure_ascii=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (a custom_id's "\ud800" escape): write it escaped again
                line = json.dumps(result, ensure_ascii=True)
        self.f.write(line + "\n")
        self.f.flush()
        if status == 200:
            self.ok += 1
        else:
            self.failed += 1
        self.bar.set_postfix_str(f"{self.generated_tokens / (time.perf_counter() - self.start):.1f} tok/s", refresh=False)
        self.bar.update(1)


def _body_param(field: str, chat: bool) -> str:
    """The request body's name for a `GenerationRequest` field."""
    names = {"max_new_tokens": "max_tokens", "prompt_ids": "messages" if chat else "prompt",
             "logprobs": "top_logprobs" if chat else "logprobs"}
    return names.get(field, field)


def _read_input(path: Path) -> list[_Line]:
    """Every non-blank line, parsed; malformed and repeated lines carry the error their output will hold."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not JSON
    except UnicodeDecodeError as exc:
        raise OverspillError(f"batch input {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines: list[_Line] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except ValueError as exc:
            lines.append(_anonymous(number, f"input line {number} is not valid JSON: {exc}", code="invalid_json"))
            continue
        cid = data.get("custom_id") if isinstance(data, dict) else None
        if not isinstance(cid, str) or not cid:
            lines.append(_anonymous(number, f"input line {number} has no custom_id (a non-empty string)",
                                    param="custom_id"))
        elif cid in first_seen:
            message = f"custom_id {cid!r} of input line {number} repeats input line {first_seen[cid]}"
            lines.append(_Line(number, ("error", message), cid, data,
                               ApiError(400, message, param="custom_id", code="duplicate_custom_id")))
        else:
            first_seen[cid] = number
            lines.append(_Line(number, ("id", cid), cid, data))
    return lines


def _anonymous(number: int, message: str, param: str | None = None, code: str | None = None) -> _Line:
    return _Line(number, ("error", message), None, error=ApiError(400, message, param=param, code=code))


def _prepare_output(path: Path) -> tuple[set[tuple[str, str]], int]:
    """Keys of the lines already in the output, and how many server-error rows were removed to run again.

    A last line cut short (a killed run) is removed. So is every row that failed with a server error
    (5xx: the engine or the machine failed, not the input), so that its request runs again and the
    output keeps one row per request; a 4xx row stays, since the same input would fail the same way.
    The file is rewritten (a temporary file renamed over it, so a kill cannot lose rows) only when a
    line goes. Any other line that is not a batch result stops the run, since appending would bury it."""
    if not path.exists():
        return set(), 0
    existing = _read_output(path)
    removed = len(existing.lines) - len(existing.kept)
    if existing.cut or removed:
        tmp = path.with_name(path.name + ".rewrite")
        tmp.write_bytes(b"".join(raw + b"\n" for raw in existing.kept))
        os.replace(tmp, path)
    return existing.keys, removed


@dataclass(frozen=True)
class _Output:
    """An existing output file as read. lines: its whole lines; kept: all but server-error rows;
    keys: the kept rows' keys; cut: its last line lacked its newline (and is dropped unless whole)."""

    lines: list[bytes]
    kept: list[bytes]
    keys: set[tuple[str, str]]
    cut: bool


def _read_output(path: Path) -> _Output:
    """An existing output, read without changing it; OverspillError on a line that is not a batch
    result (which `check_files` finds before the model loads)."""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        try:
            json.loads(tail)
            lines.append(tail)  # a whole last line without its newline: keep it
        except ValueError:
            pass  # cut short by a killed run
    keys: set[tuple[str, str]] = set()
    kept: list[bytes] = []
    for number, raw in enumerate(lines, 1):
        if raw.strip():
            key, status = _result_key(raw, number, path)
            if 500 <= status < 600:
                continue
            keys.add(key)
        kept.append(raw)
    return _Output(lines, kept, keys, bool(tail))


def check_files(input_path: str | Path, output_path: str | Path) -> tuple[int, int]:
    """Everything `run_batch` would refuse about its files, checked before minutes of loading: the
    paths, the input as UTF-8 text with at least one request, and every line of an existing output as a
    batch result. Reads only: `run_batch` rewrites the output when it starts. Returns (input lines, lines
    still to run)."""
    inp, out = check_paths(input_path, output_path)
    lines = _read_input(inp)
    if not lines:
        raise OverspillError(f"batch input {inp} has no requests: one JSON object a line, "
                             '{"custom_id", "method", "url", "body"}')
    done = _read_output(out).keys if out.exists() else set()
    return len(lines), sum(1 for line in lines if line.key not in done)


def _result_key(raw: bytes, number: int, path: Path) -> tuple[tuple[str, str], int]:
    """An output line's key (as `_Line.key`) and status code."""
    try:
        result = json.loads(raw)
        cid, status = result["custom_id"], result["response"]["status_code"]
        error = result["response"]["body"]["error"] if status != 200 else {}
        if not isinstance(status, int) or not isinstance(error, dict):
            raise TypeError(status)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OverspillError(f"line {number} of existing output {path} is not a batch result; "
                             "move the file away or fix that line, then run again") from None
    duplicate = error.get("code") == "duplicate_custom_id"
    return (("id", cid) if cid is not None and not duplicate else ("error", error.get("message"))), status


def batch_main(args) -> int:
    """`overspill batch`: check the files, load the model, run the file, print the summary."""
    from ..api import placement_of
    from ..planning.units import parse_bytes
    from ..runtime.prefix import PrefixCache

    check_at_least_one(("--max-batch", args.max_batch), ("--max-new-tokens-limit", args.max_new_tokens_limit))
    check_speculate(getattr(args, "speculate", None), getattr(args, "speculate_tree", None))
    total, todo = check_files(args.input, args.output)
    prefix_bytes = parse_bytes(args.prefix_cache, "--prefix-cache")
    if not todo:  # a finished run resumed: nothing to load the model for
        print(f"all {total} requests of {args.input} are already in {args.output}: nothing to run")
        return 0
    model, tokenizer = load_for_serving(args)
    if tokenizer is None:
        raise OverspillError("batch needs a tokenizer, and this model has none (a config-only model?)")
    placement = placement_of(model)
    name = served_name(args.model)
    config = ServerConfig(name, placement.plan.workload.context, 2 * args.max_batch, args.max_new_tokens_limit,
                          sampling=sampling_defaults(model))
    prefix = PrefixCache.for_model(model, prefix_bytes) if prefix_bytes else None
    engine = Engine(model, tokenizer, config.max_queue, max_batch=args.max_batch, prefix_cache=prefix,
                    speculate=getattr(args, "speculate", None), speculate_tree=getattr(args, "speculate_tree", None))
    for note in (engine.batching_note, engine.speculator.note):  # as `serve` prints them
        if note:
            print(note)
    print(f"running {args.input} as model {name!r} -> {args.output}", flush=True)
    engine.start()
    try:
        summary = run_batch(engine, args.input, args.output, config)
    finally:
        engine.close()
    print(summary.report())
    return 0

