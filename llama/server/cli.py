"""``python -m llama.server`` / ``llama-server``: arguments, model loading, ranks, uvicorn.

Rank 0 (the only process without torchrun) serves HTTP: uvicorn starts at once, the
model loads in the engine's thread meanwhile (``/health`` answers 503 ``loading``), and
then that thread runs ``engine.run_loop``. Under ``torchrun``, every other rank loads
the model too and runs ``engine.run_loop``, which receives rank 0's requests at each
step and returns when rank 0's loop stops.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, requests in flight get
``--drain-timeout`` seconds to finish and are then aborted (each client gets an error),
the engine's loop stops on every rank and the process exits 0.
"""

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import uvicorn

from .app import ServerConfig, create_app

API_KEY_ENV = "LLAMA_API_KEY"
log = logging.getLogger("llama.server")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="llama-server",
        description="An OpenAI-compatible HTTP server for Llama 2 (chat and text completions, streaming, a chat "
                    "page at /). Without --ckpt_dir it serves the built-in demo model.",
    )
    m = p.add_argument_group("model (as the example scripts)")
    m.add_argument("--ckpt_dir", "--ckpt-dir", default=None, help="checkpoint directory (Meta or Hugging Face)")
    m.add_argument("--tokenizer_path", "--tokenizer-path", default=None, help="tokenizer.model of the checkpoint")
    m.add_argument("--max_seq_len", "--max-seq-len", type=int, default=2048,
                   help="context of every request, prompt + reply, in tokens (default: %(default)s)")
    m.add_argument("--max_batch_size", "--max-batch-size", type=int, default=8,
                   help="requests generated at once (slots of the KV cache; default: %(default)s)")
    m.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else the CPU)")
    m.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--compile", action="store_true", help="torch.compile the decode step (warm-up at start, its kernels tuned for --max_batch_size rows)")
    m.add_argument("--quantize", default=None, choices=("int8",), help="weight-only int8 linear layers")
    m.add_argument("--safety", default=None,
                   help="llamaguard:DIR and/or keywords:FILE (comma-separated): prompts and replies found unsafe "
                        "are answered with a refusal, finish_reason content_filter")
    m.add_argument("--seed", type=int, default=1, help="seed of the requests that give none (default: %(default)s)")
    s = p.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for "
                                                       "every interface)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    s.add_argument("--api-key", "--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)")
    s.add_argument("--max-queue", "--max_queue", type=int, default=64,
                   help="requests waiting for a slot beyond the running ones; more get 429 (default: %(default)s)")
    s.add_argument("--model-name", "--model_name", default=None,
                   help="the model's name in the API (default: the checkpoint directory's name)")
    s.add_argument("--drain-timeout", "--drain_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds requests in flight get to finish (default: %(default)s)")
    s.add_argument("--stall-timeout", "--stall_timeout", type=float, default=120.0,
                   help="seconds without progress, with requests waiting, after which the engine counts as stalled: "
                        "/health turns red and those requests fail (default: %(default)s)")
    s.add_argument("--log-level", "--log_level", default="info", choices=("debug", "info", "warning", "error"))
    s.add_argument("--access-log", "--access_log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every HTTP request (default: on)")
    args = p.parse_args(argv)
    for name, low in (("max_seq_len", 2), ("max_batch_size", 1), ("max_queue", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0 <= args.port < 65536:
        p.error("--port must be in 0..65535")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.model_name is None:
        args.model_name = Path(args.ckpt_dir).resolve().name if args.ckpt_dir else "llama-demo"
    return args


def build_llama(args: argparse.Namespace):
    """Load the model (every rank) and return it with the safety checkers."""
    from ..cli import resolve_model
    from ..generation import Llama

    ckpt_dir, tokenizer_path = resolve_model(args.ckpt_dir, args.tokenizer_path)
    llama = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        pack_weights=False if args.compile else None,  # compile() then uses its frozen CPU kernels
    )
    if args.compile:  # one graph at the full batch size: smaller batches run padded to it
        llama.compile(warmup_batch_sizes=(args.max_batch_size,))
    return llama


def safety_checkers(args: argparse.Namespace) -> list:
    if not args.safety:
        return []
    try:
        from ..guard import checkers_from_specs
    except ImportError:  # before llama.guard existed
        from ..safety import checkers_from_specs  # type: ignore[attr-defined, no-redef]
    return checkers_from_specs(args.safety, device=args.device, dtype=args.dtype)


def configure_logging(level: str) -> None:
    logger = logging.getLogger("llama.server")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


class Server(uvicorn.Server):
    """uvicorn's Server, which also starts the drain on SIGTERM/SIGINT and exits 0 once drained."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]):
        super().__init__(config)
        self.on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            self.on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn re-raises the signal after shutting down; drained, we exit 0 instead.
                getattr(self, "_captured_signals", []).clear()


def serve(args: argparse.Namespace) -> int:
    """Rank 0: HTTP, with the model loading (then running) in the engine's thread. Returns the exit status."""
    failed: List[BaseException] = []
    server = None

    def load():
        llama = build_llama(args)
        return llama.engine, safety_checkers(args)

    def on_load_failure(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    config = ServerConfig(model_name=args.model_name, api_key=args.api_key, max_queue=args.max_queue,
                          stall_timeout_s=args.stall_timeout)
    app = create_app(config, load, on_load_failure)
    worker = app.state.worker

    def on_exit_signal() -> None:
        loop = worker._loop
        if loop is not None:
            loop.call_soon_threadsafe(worker.begin_drain, args.drain_timeout)

    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=args.access_log, timeout_graceful_shutdown=args.drain_timeout + 5,
                               lifespan="on")
    server = Server(uv_config, on_exit_signal)
    server.run()
    if failed:
        print(f"error: {worker.error}", file=sys.stderr)
        return 1
    return 0


def follow(args: argparse.Namespace) -> int:
    """A rank other than 0: load, then step the engine with rank 0 until it stops."""
    from ..distributed import report_rank_failures

    def on_signal(sig, frame):  # rank 0 drains and then stops us; this is the backstop if it cannot
        timer = threading.Timer(args.drain_timeout + 15, lambda: os._exit(1))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with report_rank_failures():
        llama = build_llama(args)
        llama.engine.run_loop(lambda: False, lambda outputs: None)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.safety and world > 1:
        print("error: --safety is not supported under torchrun yet (the checks would run on rank 0 alone)",
              file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return follow(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
