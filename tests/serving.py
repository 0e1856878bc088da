"""Helpers for the server tests: uvicorn on a loopback port in a thread, and OpenAI's error shape."""

from __future__ import annotations

import threading
import time

ERROR_KEYS = {"message", "type", "param", "code"}


class Running:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `port` is the one the OS picked."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def load_smollm(model_dir, context: int):
    """The embedded SmolLM2 in float32 (batched and solo greedy decodes then agree exactly)."""
    import overspill

    model, tok = overspill.load(model_dir, gpu_memory=None, dtype="float32", progress=False, context=context)
    return model, tok, overspill.api.placement_of(model).plan.workload.context


def openai_error(resp, status: int, param: str | None = None) -> dict:
    """The `error` object of `resp`, after checking its status and OpenAI's shape."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def wait_idle(engine, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while engine.live_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
