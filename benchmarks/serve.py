"""Serving under load, over loopback: ``llama.server`` and, as a peer, ``transformers serve``.

Each server is started on 127.0.0.1 with the same random-weight checkpoint (ours: Meta
``.pth``; the peer: the same weights converted with ``python -m llama.convert --to hf``),
the same threads and float32, and gets the same load: streaming ``/v1/completions`` of
``--gen-tokens`` greedy tokens from prompts of 8-128 words, sent by 1, 16 and 64
concurrent clients (``--clients``), each sending ``--requests-per-client`` requests one
after the other. Reported per server and number of clients:

* TTFT: from sending a request to its first piece of text (p50, p99, max);
* ITL: inter-token latency, per request the time from its first piece of text to its last over its
  tokens - 1 (p50, p99 over the requests);
* aggregate tok/s: completion tokens of all requests / the phase's wall time;
* complete: requests that ended with one finish reason, no error, the token count asked
  for (a random model can emit EOS early: counted as ``eos``) and, for ours, ``[DONE]``;
  correct: the text equals that of the same prompt alone (the 1-client phase, or the first
  time the prompt was answered by that server).

The peer needs ``accelerate`` and ``protobuf`` (to read ``tokenizer.model``) installed;
it runs offline (``HF_HUB_OFFLINE=1``) from the converted directory.

Everything is bounded: at most ``--timeout`` seconds per phase (a request still running
then counts as lost) and a fixed number of requests. Nothing leaves the machine.

    python benchmarks/serve.py --shape 110m --threads 2 --peer --out benchmarks/results/serve_cpu_110m_epyc-zen5.json
    python benchmarks/serve.py --shape tiny --clients 1,4 --requests-per-client 2   # smoke test

The last line of stdout is the result as one JSON object.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench import SHAPES, machine, write_placeholder_tokenizer  # benchmarks/bench.py: run from this folder

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
REAL_TOKENIZER = REPO.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"
CORPUS = REPO / "llama" / "demo_data" / "corpus.txt"


# ----------------------------------------------------------------------------- setup


def write_checkpoints(workdir: Path, params: dict, tokenizer: Optional[Path], with_hf: bool) -> dict:
    """Random float32 weights as a Meta checkpoint (+ a Hugging Face copy), with a tokenizer beside them."""
    import torch

    from llama.checkpoint import InMemoryState, random_state_dict, save_checkpoint
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer

    meta = workdir / "meta"
    meta.mkdir(parents=True)
    tok_path = meta / "tokenizer.model"
    if tokenizer is not None and Tokenizer(str(tokenizer)).n_words == params["vocab_size"]:
        shutil.copyfile(tokenizer, tok_path)
        source = str(tokenizer)
    else:  # no tokenizer, or not this shape's vocabulary
        write_placeholder_tokenizer(tok_path, params["vocab_size"])
        source = "placeholder (bench.write_placeholder_tokenizer)"
    args = ModelArgs(**params)
    save_checkpoint(InMemoryState(args, [random_state_dict(args, seed=0, dtype=torch.float32)]), meta, 1, params)
    paths = {"meta": str(meta), "tokenizer": str(tok_path), "tokenizer_source": source}
    if with_hf:
        from llama.convert import convert_to_hf

        convert_to_hf(meta, workdir / "hf", tokenizer=tok_path)
        paths["hf"] = str(workdir / "hf")
    return paths


def make_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` prompts of 8-128 words drawn from the demo corpus (fixed seed)."""
    words = CORPUS.read_text().split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(8, 128)
        start = rng.randrange(len(words) - length)
        prompts.append(" ".join(words[start : start + length]))
    return prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port, its output in a log file."""

    def __init__(self, name: str, cmd: List[str], port: int, env: dict, log: Path, model: str):
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.log = open(log, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, path: str, timeout: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return time.monotonic() - self.start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.name} was not ready within {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------- load


async def one_request(client, server: Server, prompt: str, gen_tokens: int, usage: bool) -> dict:
    """Stream one completion; returns its timings, text and checks."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    result = {"prompt": prompt, "text": "", "times": [], "finish": [], "error": None, "done": False, "tokens": None}
    start = time.perf_counter()
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result["error"] = str(chunk["error"])[:200]
                    continue
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        result["text"] += choice["text"]
                        result["times"].append(time.perf_counter() - start)
                    if choice.get("finish_reason"):
                        result["finish"].append(choice["finish_reason"])
    except Exception as e:  # noqa: BLE001 - a lost request is a result, not a crash of the benchmark
        result["error"] = f"{type(e).__name__}: {e}"[:200]
    result["elapsed"] = time.perf_counter() - start
    return result


async def run_phase(server: Server, prompts: List[str], clients: int, per_client: int, gen_tokens: int,
                    usage: bool, timeout: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: List[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def user(k: int) -> None:
            for j in range(per_client):
                prompt = prompts[(k * per_client + j) % len(prompts)]
                results.append(await one_request(client, server, prompt, gen_tokens, usage))

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(user(k)) for k in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * per_client, "wall_s": wall, "results": results}


def percentile(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(phase: dict, gen_tokens: int, reference: Dict[str, str], require_done: bool) -> dict:
    results = phase["results"]
    ttft = [r["times"][0] for r in results if r["times"]]
    itl = []  # per request: the mean gap between its tokens (pieces read together would otherwise count as 0)
    tokens, complete, correct, eos, problems = 0, 0, 0, 0, []
    for r in results:
        n = r["tokens"] if r["tokens"] is not None else len(r["times"])
        tokens += n
        if n > 1 and len(r["times"]) > 1:
            itl.append((r["times"][-1] - r["times"][0]) / (n - 1))
        finish = r["finish"][0] if len(r["finish"]) == 1 else None
        ok = (r["done"] or not require_done) and r["error"] is None and finish in ("length", "stop")
        if finish == "length":
            ok = ok and (r["tokens"] is None or r["tokens"] == gen_tokens)
        elif finish == "stop":
            eos += 1
        if ok:
            complete += 1
            expected = reference.setdefault(r["prompt"], r["text"])
            correct += expected == r["text"]
        elif len(problems) < 5:
            problems.append({k: r[k] for k in ("error", "done", "finish", "tokens")})
    return {
        "clients": phase["clients"],
        "requests": phase["requests"],
        "answered": len(results),
        "done_marker": sum(r["done"] for r in results),
        "complete": complete,
        "correct": correct,
        "eos": eos,
        "lost": phase["requests"] - complete,
        "problems": problems,
        "wall_s": round(phase["wall_s"], 2),
        "tokens": tokens,
        "tok_s": round(tokens / phase["wall_s"], 1),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_max_s": max(ttft) if ttft else None,
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


def load_test(server: Server, args, prompts: List[str]) -> List[dict]:
    # Ours: exact usage asked for, and the stream must end with [DONE]. transformers serve sends usage unasked
    # and ends its streams without [DONE] (5.24), which is not held against it.
    usage = server.name == "ours"
    reference: Dict[str, str] = {}
    asyncio.run(run_phase(server, prompts[:2], 2, 1, args.gen_tokens, usage, args.timeout))  # warm-up
    phases = []
    for clients in args.clients:
        per_client = args.requests_per_client if clients > 1 else max(args.requests_per_client, 8)
        phase = asyncio.run(run_phase(server, prompts, clients, per_client, args.gen_tokens, usage, args.timeout))
        summary = summarize(phase, args.gen_tokens, reference, require_done=usage)
        phases.append(summary)
        print(f"  {server.name}: {clients:3d} client(s): {summary['tok_s']:7.1f} tok/s, TTFT p50 "
              f"{summary['ttft_p50_s'] or 0:.2f} s p99 {summary['ttft_p99_s'] or 0:.2f} s, complete "
              f"{summary['complete']}/{summary['requests']}, correct {summary['correct']}", flush=True)
    return phases


def measure(server: Server, args, prompts: List[str]) -> dict:
    """Wait for ``server``, run the load on it, stop it."""
    try:
        ready = server.wait_ready("/health", 900)
        print(f"{server.name} ready in {ready:.1f} s", flush=True)
        return {"command": " ".join(server.proc.args[1:]), "ready_s": round(ready, 1),
                "phases": load_test(server, args, prompts)}
    finally:
        server.stop()


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="110m", choices=sorted(SHAPES))
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each server")
    p.add_argument("--clients", default="1,16,64", help="concurrent clients per phase (comma-separated)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends, one by one")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16, help="ours: slots (the rest of the clients wait)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--tokenizer", type=Path, default=REAL_TOKENIZER if REAL_TOKENIZER.is_file() else None,
                   help="tokenizer.model for the shape (default: the Llama 2 tokenizer when it is at "
                        "../shared/llama2-tokenizer; a placeholder without language when none has the shape's "
                        "vocabulary size)")
    p.add_argument("--peer", action="store_true", help="also run `transformers serve --continuous-batching`")
    p.add_argument("--compile", action="store_true", help="ours: --compile")
    p.add_argument("--timeout", type=float, default=600, help="seconds a phase may take at most")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--keep", type=Path, default=None, help="write the checkpoints and logs here (kept)")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    params = dict(SHAPES[args.shape])
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LLAMA_API_KEY")}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    prompts = make_prompts(max(64, max(args.clients) * args.requests_per_client))
    out = {"what": "streaming /v1/completions under load over loopback", "shape": args.shape, "params": params,
           "gen_tokens": args.gen_tokens, "prompt_words": "8-128", "greedy": True, "threads": args.threads,
           "max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len, "servers": {}}
    try:
        print(f"writing the {args.shape} checkpoint{' and its Hugging Face copy' if args.peer else ''} "
              f"into {workdir}", flush=True)
        paths = write_checkpoints(workdir, params, args.tokenizer, args.peer)
        out["tokenizer"] = paths["tokenizer_source"]

        port = free_port()
        cmd = [sys.executable, "-m", "llama.server", "--ckpt_dir", paths["meta"], "--tokenizer_path",
               paths["tokenizer"], "--model-name", "bench", "--max_seq_len", str(args.max_seq_len),
               "--max_batch_size", str(args.max_batch_size), "--max-queue", "1024", "--device", "cpu",
               "--port", str(port), "--no-access-log", "--log-level", "warning"]
        cmd += ["--compile"] if args.compile else []
        out["servers"]["ours"] = measure(Server("ours", cmd, port, env, workdir / "ours.log", "bench"), args, prompts)
        if args.peer:
            transformers_cli = shutil.which("transformers")
            if transformers_cli is None:
                out["servers"]["transformers"] = {"skipped": "the `transformers` command is not installed"}
            else:
                port = free_port()
                cmd = [transformers_cli, "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", paths["hf"]]
                peer = Server("transformers", cmd, port, env, workdir / "transformers.log", paths["hf"])
                out["servers"]["transformers"] = measure(peer, args, prompts)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    out["machine"] = machine(torch.device("cpu"), args.threads)
    print_table(out)
    print(json.dumps(out))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    lost = sum(p["lost"] for s in out["servers"].values() for p in s.get("phases", []))
    return 1 if lost else 0


def print_table(out: dict) -> None:
    def ms(v):
        return "-" if v is None else f"{1000 * v:.0f} ms" if v < 1 else f"{v:.2f} s"

    print()
    print("| server | clients | aggregate tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | complete | correct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, server in out["servers"].items():
        for p in server.get("phases", []):
            print(f"| {name} | {p['clients']} | {p['tok_s']:.1f} | {ms(p['ttft_p50_s'])} | {ms(p['ttft_p99_s'])} | "
                  f"{ms(p['itl_p50_s'])} | {ms(p['itl_p99_s'])} | {p['complete']}/{p['requests']} | "
                  f"{p['correct']}/{p['complete']} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
