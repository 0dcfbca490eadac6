"""The server under trouble: clients that leave, a full queue, a stuck or failing engine, loading.

Each test runs a real uvicorn server in a thread of this process (127.0.0.1, a free port)
around a real engine on a tiny random-weight checkpoint, whose ``step`` the test can slow
down, block or make fail.
"""

import json
import threading
import time
from typing import Callable, Optional

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import sse_events  # noqa: E402

from llama.server import metrics as prom  # noqa: E402
from llama.server.app import ServerConfig, create_app  # noqa: E402

LONG = {"prompt": "The river", "max_tokens": 200, "temperature": 0, "stream": True}


class ControlledEngine:
    """Wraps ``engine.step``: ``delay`` seconds before each step, ``hold`` (an Event, set: run) blocks it,
    ``fail`` makes it raise."""

    def __init__(self, engine, delay: float = 0.0):
        self.engine = engine
        self.delay = delay
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False
        step = engine.step

        def controlled(*args, **kwargs):
            if self.delay:
                time.sleep(self.delay)
            self.hold.wait()
            if self.fail:
                raise RuntimeError("injected engine failure")
            return step(*args, **kwargs)

        engine.step = controlled


class ThreadServer:
    """``create_app`` served by uvicorn in a thread; ``load`` as the app takes it."""

    def __init__(self, load: Callable, ready: bool = True, **config):
        self.app = create_app(ServerConfig(model_name="tiny", **config), load)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ready = ready

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.started:
                self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
                if not self.ready or httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"

    def metrics(self) -> dict:
        return prom.parse(httpx.get(f"{self.url}/metrics").text)

    def wait_metric(self, name: str, value: float, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metrics().get(name) == value:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name} did not reach {value}: {self.metrics().get(name)}")


@pytest.fixture
def make_engine(tiny_checkpoint, tiny_tokenizer_path):
    """``make_engine(max_batch_size=2, delay=0.0) -> ControlledEngine`` on a fresh tiny model."""

    def make(max_batch_size: int = 2, delay: float = 0.0) -> ControlledEngine:
        from llama import Llama

        llama = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 512, max_batch_size, device="cpu")
        return ControlledEngine(llama.engine, delay)

    return make


def loader(controlled: ControlledEngine, gate: Optional[threading.Event] = None):
    def load():
        if gate is not None:
            gate.wait(60)
        return controlled.engine, []

    return load


def test_disconnect_mid_stream_frees_the_slot(make_engine):
    controlled = make_engine(delay=0.02)
    with ThreadServer(loader(controlled)) as srv:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=LONG, timeout=30) as r:
            lines = r.iter_lines()
            events = sse_events(lines)
            next(events), next(events)
            assert srv.metrics()["llama_running_rows"] == 1
        # The connection is closed: the request is aborted and its slot freed at the next step.
        srv.wait_metric("llama_running_rows", 0)
        srv.wait_metric("llama_requests_in_flight", 0)
        assert srv.metrics()['llama_requests_total{finish_reason="aborted"}'] == 1
        reply = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False, "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_waiting_for_a_non_streamed_reply(make_engine):
    controlled = make_engine(delay=0.02)
    with ThreadServer(loader(controlled)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
        srv.wait_metric("llama_running_rows", 0)
        srv.wait_metric("llama_requests_in_flight", 0)


def test_full_queue_answers_429(make_engine):
    controlled = make_engine(max_batch_size=2, delay=0.05)
    with ThreadServer(loader(controlled), max_queue=1) as srv, httpx.Client(timeout=30) as client:
        streams = []
        try:
            for _ in range(3):  # two slots and one place in the queue
                stream = client.stream("POST", f"{srv.url}/v1/completions", json=LONG)
                assert stream.__enter__().status_code == 200
                streams.append(stream)
            r = client.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"]
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and "busy" in error["message"]
            srv.wait_metric("llama_running_rows", 2)
            assert srv.metrics()["llama_queue_length"] == 1
            r = client.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False, "n": 4})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # can never fit
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        srv.wait_metric("llama_running_rows", 0)
        srv.wait_metric("llama_queue_length", 0)
        r = client.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False, "max_tokens": 2})
        assert r.status_code == 200


def test_stalled_engine_turns_health_red_and_fails_waiting_clients(make_engine):
    controlled = make_engine()
    with ThreadServer(loader(controlled), stall_timeout_s=1.0) as srv:
        controlled.hold.clear()  # the next step never returns (until released)
        start = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stalled"
        assert time.monotonic() - start < 10
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=LONG, timeout=30) as s:
            assert s.status_code == 503  # refused while stalled
        assert srv.metrics()["llama_engine_healthy"] == 0
        controlled.hold.set()  # the engine moves again: health comes back
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{srv.url}/health").json()
            time.sleep(0.1)
        r = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_failed_engine_answers_errors_not_hangs(make_engine):
    controlled = make_engine(delay=0.02)
    with ThreadServer(loader(controlled)) as srv:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=LONG, timeout=30) as r:
            events = sse_events(r.iter_lines())
            next(events)
            controlled.fail = True
            rest = list(events)
        assert rest[-1]["error"]["code"] == "engine_failed" and "Traceback" not in json.dumps(rest)
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "injected engine failure" in health.json()["error"]
        r = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def test_health_while_loading(make_engine):
    controlled = make_engine()
    gate = threading.Event()
    with ThreadServer(loader(controlled, gate), ready=False) as srv:
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert httpx.get(f"{srv.url}/v1/models").status_code == 200
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_safety_checks_refuse_prompts_and_replies(make_engine):
    from llama.safety import SAFETY_REFUSAL, SafetyResult

    def checker(dialog, role):
        if role == "user":  # prompts mentioning the mill are refused; every reply is found unsafe
            return SafetyResult(is_safe="mill" not in dialog[-1]["content"])
        return SafetyResult(is_safe=False, categories=["test"])

    controlled = make_engine()
    with ThreadServer(lambda: (controlled.engine, [checker])) as srv:
        chat = f"{srv.url}/v1/chat/completions"
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "Tell me about the mill"}]}, timeout=30)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == SAFETY_REFUSAL
        assert r.json()["usage"]["completion_tokens"] == 0
        body = {"messages": [{"role": "user", "content": "Tell me about the river"}], "max_tokens": 5}
        r = httpx.post(chat, json=body, timeout=30)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == SAFETY_REFUSAL
        assert r.json()["usage"]["completion_tokens"] == 5  # it was generated, then withheld
        with httpx.stream("POST", chat, json={**body, "stream": True}, timeout=30) as s:
            events = list(sse_events(s.iter_lines()))
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == [
            "content_filter"]
        assert srv.metrics()['llama_requests_total{finish_reason="content_filter"}'] == 3
