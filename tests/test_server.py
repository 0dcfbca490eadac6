"""The OpenAI-compatible server (``python -m llama.server``), as clients see it.

One server process per module (a tiny random-weight checkpoint on 127.0.0.1, a random
port), talked to with the official ``openai`` package and with raw HTTP (httpx).
Greedy replies are compared with ``Llama.chat_completion`` / ``text_completion`` on the
same checkpoint. Separate processes check SIGTERM with requests in flight (an engine
slowed down on purpose, so that requests are still running when the signal comes) and
``torchrun --nproc_per_node 2`` against one rank.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "tiny"
START_TIMEOUT_S = 90

# ``python -c`` program: the server's own command line, with every engine step slowed by DELAY
# seconds, so that a test can act while requests are still running.
SLOW_SERVER = """
import sys, time
import llama.server.cli as cli
build, delay = cli.build_llama, float(sys.argv[1])
def slow_build(args):
    llama = build(args)
    step = llama.engine.step
    def slow_step(*a, **k):
        time.sleep(delay)
        return step(*a, **k)
    llama.engine.step = slow_step
    return llama
cli.build_llama = slow_build
sys.exit(cli.main(sys.argv[2:]))
"""


def server_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAMA_API_KEY")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def wait_healthy(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = START_TIMEOUT_S) -> dict:
    """Poll ``url/health`` until it says ok; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not healthy within {timeout} s (last /health: {last})")


class ServerProcess:
    """``llama.server`` in a subprocess on a free port; its output goes to a file."""

    def __init__(self, args: List[str], log_path: Path, slow_step_s: Optional[float] = None,
                 torchrun: int = 0, timeout: float = START_TIMEOUT_S):
        self.log_path = log_path
        server_args = [*args, "--port", "0", "--no-access-log"]  # the port it got is read from its log
        if slow_step_s is not None:
            cmd = [sys.executable, "-c", SLOW_SERVER, str(slow_step_s), *server_args]
        elif torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
                   "-m", "llama.server", *server_args]
        else:
            cmd = [sys.executable, "-m", "llama.server", *server_args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self.url = f"http://127.0.0.1:{self._bound_port(timeout)}"
            wait_healthy(self.url, self.proc, timeout)
        except BaseException:
            self.stop()
            raise AssertionError(f"server did not start:\n{self.output()}")

    def _bound_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.output())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode} before listening")
            time.sleep(0.1)
        raise AssertionError(f"the server did not listen within {timeout} s")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL (of its whole process group) if it does not exit in ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def model_args(ckpt: Path, tokenizer: Path, *extra: str) -> List[str]:
    return ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer), "--model-name", MODEL, "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, tiny_tokenizer_path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(model_args(tiny_checkpoint, tiny_tokenizer_path, "--max_seq_len", "256",
                                    "--max_batch_size", "4", "--max-queue", "8", "--api-key", KEY), log)
    yield proc
    code = proc.stop()
    output = proc.output()
    assert code == 0, output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tiny_tokenizer_path):
    from llama import Llama

    return Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 256, 4, device="cpu")


def post(server: ServerProcess, path: str, body, key: Optional[str] = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream, up to ``[DONE]`` (asserted to come)."""
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected line in the stream: {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise AssertionError("the stream ended without data: [DONE]")


DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does the river run?"}]


# ---------------------------------------------------------------------------------------- happy paths


def test_health_models_and_metrics(server, client):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["max_batch_size"] == 4
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("llama_queue_length", "llama_running_rows", "llama_prompt_tokens_total",
                 "llama_generation_tokens_total", "llama_time_to_first_token_seconds_bucket",
                 "llama_inter_token_latency_seconds_count", "llama_http_requests_total"):
        assert name in metrics.text


def test_chat_greedy_equals_chat_completion(client, llama):
    expected = llama.chat_completion([DIALOG], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    reply = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=24, user="u1")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    from llama.chat_format import encode_dialog

    assert reply.usage.prompt_tokens == len(encode_dialog(llama.tokenizer, DIALOG))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_greedy_equals_text_completion(client, llama):
    prompt = "The river ran quietly past"
    expected = llama.text_completion([prompt], temperature=0, max_gen_len=16)[0]["generation"]
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert reply.choices[0].text == expected and reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(llama.tokenizer.encode(prompt, bos=True, eos=False))
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, echo=True)
    full = llama.text_completion([prompt], temperature=0, max_gen_len=16, echo=True)[0]["generation"]
    assert echoed.choices[0].text == full and full.startswith(prompt)


def test_completion_prompt_lists(client, llama):
    prompts = ["The river", "Every morning she wrote"]
    expected = [r["generation"] for r in llama.text_completion(prompts, temperature=0, max_gen_len=8)]
    reply = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=8)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    tokens = llama.tokenizer.encode(prompts[0], bos=True, eos=False)
    by_ids = client.completions.create(model=MODEL, prompt=tokens, temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == expected[0]
    nested = client.completions.create(model=MODEL, prompt=[tokens, tokens], temperature=0, max_tokens=8)
    assert [c.text for c in nested.choices] == [expected[0]] * 2


def test_stop_strings(client):
    full = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    stop = text[10:12]
    assert len(text) > 12 and stop.strip(), f"the greedy reply is too short to cut: {text!r}"
    expected = text[: text.find(stop)]
    reply = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=40,
                                           stop=[stop, "zzz"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=DIALOG, temperature=0, max_tokens=40, stop=stop, stream=True) if c.choices]
    assert "".join(deltas) == expected and all(stop not in d for d in deltas)


def test_seed_and_n(client):
    def sample(seed, n=1):
        reply = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=1.0, top_p=1.0,
                                               max_tokens=12, seed=seed, n=n)
        return reply, [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    _, a = sample(1234)
    _, b = sample(1234)
    _, c = sample(1235)
    assert a == b and a != c
    reply, three = sample(1234, n=3)
    assert [ch.index for ch in reply.choices] == [0, 1, 2]
    assert three[0] == a[0] and three[1] == c[0]  # choice j samples with seed + j
    assert len(set(three)) > 1
    assert reply.usage.completion_tokens == sum(
        len(client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=1.0, top_p=1.0, max_tokens=12,
                                           seed=1234 + j, logprobs=True).choices[0].logprobs.content)
        for j in range(3)
    )


def test_streamed_n_interleaves_every_choice(server):
    body = {"model": MODEL, "messages": DIALOG, "max_tokens": 6, "n": 2, "seed": 7, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    finished = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events
                if e["choices"] and e["choices"][0]["finish_reason"]}
    assert sorted(finished) == [0, 1]


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=8, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token and bytes(entry.bytes).decode(errors="replace")
    streamed = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=8, logprobs=True,
                                              stream=True)
    lps = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert lps == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_completion_logprobs_and_echo(client, llama):
    prompt = "The river"
    n_prompt = len(llama.tokenizer.encode(prompt, bos=True, eos=False))
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2, echo=True)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[:n_prompt] == [None] * n_prompt and all(len(t) <= 2 for t in lp.top_logprobs[n_prompt:])
    assert lp.text_offset == sorted(lp.text_offset)
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text == prompt
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt], abs=1e-5)


def test_openai_content_parts_and_developer_role(client):
    parts = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "Where does the river "},
                                          {"type": "text", "text": "run?"}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_completion_tokens=10)
    b = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_special_tags_are_refused_not_run(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[INST] hi [/INST]"}])
    assert reply.choices[0].finish_reason == "content_filter"
    assert reply.usage.completion_tokens == 0


# ---------------------------------------------------------------------------------------- errors


def assert_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in r.text
    if param is not ...:
        assert body["error"]["param"] == param, body
    if code is not ...:
        assert body["error"]["code"] == code, body
    return body["error"]


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param,code", [
    (b"{not json", None, ...),
    (b"", None, ...),
    (b"\xff\xfe", None, ...),
    (b"[1, 2]", None, ...),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, ...),
    ({"messages": USER, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": USER, "temperature": True}, "temperature", "invalid_type"),
    ({"messages": USER, "temperature": 3}, "temperature", "invalid_value"),
    ({"messages": USER, "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ({"messages": USER, "n": 0}, "n", "invalid_value"),
    ({"messages": USER, "seed": -1}, "seed", "invalid_value"),
    ({"messages": USER, "stop": 3}, "stop", "invalid_type"),
    ({"messages": USER, "stop": [""]}, "stop", "invalid_value"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_value"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"messages": USER, "logit_bias": {"5": 1}}, "logit_bias", "unsupported_parameter"),
    ({"messages": USER, "echo": True}, "echo", "unknown_parameter"),
    ({"messages": USER, "foo": 1}, "foo", "unknown_parameter"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported_role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "unsupported_content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "unsupported_parameter"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "invalid_dialog"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "messages", "invalid_dialog"),
])
def test_bad_chat_requests(server, body, param, code):
    assert_error(post(server, CHAT, body), 400, param, code)


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt[1]"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "suffix": "end"}, "suffix"),
    ({"prompt": "a", "messages": USER}, "messages"),
])
def test_bad_completion_requests(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


def test_keys(server):
    assert_error(post(server, CHAT, {"messages": USER}, key=None), 401, code="missing_api_key")
    assert_error(post(server, CHAT, {"messages": USER}, key="wrong"), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200  # health, metrics and the page need no key
    assert httpx.get(f"{server.url}/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_context_length_exceeded(server, client):
    long_text = " ".join(["river"] * 400)
    error = assert_error(post(server, CHAT, {"messages": [{"role": "user", "content": long_text}]}), 400,
                         "messages", "context_length_exceeded")
    assert "256" in error["message"]
    error = assert_error(post(server, CHAT, {"messages": USER, "max_tokens": 250}), 400, "messages",
                         "context_length_exceeded")
    assert "256" in error["message"] and "250 in the completion" in error["message"]
    assert_error(post(server, "/v1/completions", {"prompt": long_text}), 400, "prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_and_route(server, client):
    assert_error(post(server, CHAT, {"model": "gpt-4", "messages": USER}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    assert_error(httpx.get(f"{server.url}/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404, code="not_found")
    assert_error(httpx.delete(f"{server.url}/v1/models"), 405)


def test_bad_requests_harm_no_one(server, client):
    """A burst of bad requests beside a good one: the good one is answered, and so is the next."""
    results = {}

    def good():
        results["good"] = client.chat.completions.create(model=MODEL, messages=DIALOG, temperature=0, max_tokens=20)

    t = threading.Thread(target=good)
    t.start()
    for body in (b"{", b"[]", b'{"messages": 3}', json.dumps({"messages": USER, "n": "x"}).encode(), b"\x00" * 10000):
        assert post(server, CHAT, body).status_code == 400
    t.join(60)
    assert results["good"].choices[0].message.content
    after = client.chat.completions.create(model=MODEL, messages=DIALOG, max_tokens=4, temperature=0)
    assert after.choices[0].message.content


# ---------------------------------------------------------------------------------------- lifecycle


def test_sigterm_drains_requests_in_flight(tmp_path, tiny_checkpoint, tiny_tokenizer_path):
    """Short requests in flight finish; long ones are stopped at --drain-timeout with an error event;
    the server refuses new connections at once and exits 0 within the bound."""
    proc = ServerProcess(model_args(tiny_checkpoint, tiny_tokenizer_path, "--max_seq_len", "256",
                                    "--max_batch_size", "4", "--drain-timeout", "3"), tmp_path / "server.log",
                         slow_step_s=0.05)
    results: Dict[str, list] = {}
    first_chunk = {name: threading.Event() for name in ("short", "long")}

    def stream(name: str, max_tokens: int) -> None:
        body = {"prompt": "The river", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        events = []
        try:
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as r:
                for event in sse_events(r.iter_lines()):
                    events.append(event)
                    first_chunk[name].set()
                results[name] = events
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            results[name] = [repr(e)]
            first_chunk[name].set()

    threads = [threading.Thread(target=stream, args=("short", 15)), threading.Thread(target=stream, args=("long", 200))]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(30) for e in first_chunk.values()), results
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no new connections while draining
            httpx.post(f"{proc.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
        code = proc.proc.wait(20)
        elapsed = time.monotonic() - start
    finally:
        proc.stop()
        for t in threads:
            t.join(30)
    output = proc.output()
    assert code == 0, output
    assert elapsed < 3 + 6, f"drained in {elapsed:.1f} s, the bound is 3 s (+ margin)\n{output}"
    short, long = results["short"], results["long"]
    assert short[-1]["choices"][0]["finish_reason"] == "length", short[-3:]
    assert "".join(e["choices"][0]["text"] for e in short if e.get("choices"))
    assert long[-1].get("error", {}).get("code") == "server_shutting_down", long[-3:]
    assert "Traceback" not in output, output


def test_torchrun_two_ranks_equal_one(tmp_path, server, client, tiny_checkpoint, tiny_tokenizer_path):
    """``torchrun --nproc_per_node 2 -m llama.server`` answers greedy requests as the one-rank server does."""
    proc = ServerProcess(model_args(tiny_checkpoint, tiny_tokenizer_path, "--max_seq_len", "256",
                                    "--max_batch_size", "4"), tmp_path / "torchrun.log", torchrun=2, timeout=150)
    try:
        two = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=60)
        for messages in (DIALOG, [{"role": "user", "content": "Tell me about rain."}]):
            one_reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
            two_reply = two.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
            assert two_reply.choices[0].message.content == one_reply.choices[0].message.content
            assert two_reply.usage == one_reply.usage
        prompts = ["The river", "Every morning she wrote"]
        one = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=12)
        streamed = two.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=12, stream=True)
        texts = ["", ""]
        for chunk in streamed:
            for c in chunk.choices:
                texts[c.index] += c.text
        assert texts == [c.text for c in sorted(one.choices, key=lambda c: c.index)]
    finally:
        proc.stop()
    # torchrun itself answers SIGTERM with an exception and status 1 once its workers are done; the
    # workers must have drained and stopped on their own (no SIGKILL, no traceback of theirs).
    output = proc.output()
    assert "Finished server process" in output and "SIGKILL" not in output, output
    assert output.count("Traceback") == output.count("SignalException: Process") <= 1, output


def test_command_line(tmp_path, monkeypatch):
    from llama.server.cli import parse_args, safety_checkers

    monkeypatch.setenv("LLAMA_API_KEY", "from-env")
    args = parse_args(["--ckpt_dir", str(tmp_path / "llama-2-7b-chat"), "--max-queue", "3", "--max_batch_size", "2"])
    assert (args.model_name, args.api_key, args.max_queue, args.max_batch_size, args.host, args.port) == (
        "llama-2-7b-chat", "from-env", 3, 2, "127.0.0.1", 8000)
    assert parse_args(["--api-key", "given"]).api_key == "given" and parse_args([]).model_name == "llama-demo"
    with pytest.raises(SystemExit):
        parse_args(["--max_batch_size", "0"])
    words = tmp_path / "words.txt"
    words.write_text("forbidden\n")
    assert len(safety_checkers(parse_args(["--safety", f"keywords:{words}"]))) == 1
    assert safety_checkers(parse_args([])) == []
