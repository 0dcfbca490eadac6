"""The engine's thread and the requests in flight: outputs to asyncio queues, health, drain.

One thread loads the model and then runs ``engine.run_loop``; the event loop's thread
adds and aborts requests (both thread-safe on the engine). Each batch of outputs is
handed to the event loop with ``call_soon_threadsafe`` and routed to the queue of the
HTTP request that owns it. The same class watches the engine: a loop that raises marks
it failed, one that makes no progress for ``stall_timeout_s`` while requests wait marks
it stalled, and in both cases every request in flight gets an error at once instead of
waiting forever.
"""

import asyncio
import logging
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .metrics import Metrics
from .protocol import ApiError, service_unavailable

log = logging.getLogger("llama.server")

LOADING, READY, STALLED, FAILED, DRAINING = "loading", "ready", "stalled", "failed", "draining"


class Choice:
    """One engine request: a choice of an HTTP request's response."""

    __slots__ = ("index", "prompt_index", "request_id", "request", "queue", "arrival", "first_token_at",
                 "last_token_at", "finished")

    def __init__(self, index: int, prompt_index: int, request_id: str, queue: asyncio.Queue, arrival: float):
        self.index = index
        self.prompt_index = prompt_index
        self.request_id = request_id
        self.request = None  # the engine's Request
        self.queue = queue
        self.arrival = arrival
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.finished = False


class EngineThread:
    """Loads (``load() -> (engine, safety_checkers)``) and runs the engine in a thread of its own."""

    def __init__(self, load: Callable[[], Tuple[Any, list]], metrics: Metrics, stall_timeout_s: float = 120.0,
                 on_load_failure: Optional[Callable[[BaseException], None]] = None):
        self._load = load
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self._on_load_failure = on_load_failure
        self.engine = None
        self.safety_checkers: list = []
        self.state = LOADING
        self.error: Optional[str] = None
        self._live: Dict[str, Choice] = {}
        self._stop = False
        self._last_progress = time.monotonic()
        self._busy_since = time.monotonic()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._watchdog: Optional[asyncio.Task] = None

    # ---------------------------------------------------------------- lifecycle (event loop thread)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._main, name="llama-engine", daemon=True)
        self._thread.start()
        self._watchdog = self._loop.create_task(self._watch())

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, end the engine's loop and wait (at most ``timeout_s``) for its thread."""
        self.abort_all(service_unavailable("the server is shutting down", "server_shutting_down"))
        self._stop = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._thread is not None and self._thread.is_alive() and self.engine is not None:  # still loading: leave it
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.0f s; exiting without it", timeout_s)

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests; abort those still running after ``timeout_s``."""
        if self.state == DRAINING:
            return
        self.state = DRAINING
        log.info("draining: %d request(s) in flight get %.0f s to finish", len(self._live), timeout_s)
        self._loop.call_later(timeout_s, self.abort_all, service_unavailable(
            f"the server is shutting down and stopped this request after {timeout_s:g} s", "server_shutting_down"))

    # ---------------------------------------------------------------- the engine's thread

    def _main(self) -> None:
        try:
            engine, checkers = self._load()
        except BaseException as e:  # noqa: BLE001 - reported, and the server stops
            log.error("loading the model failed:\n%s", traceback.format_exc())
            self.state, self.error = FAILED, f"loading the model failed: {type(e).__name__}: {e}"
            if self._on_load_failure is not None:
                self._call_in_loop(self._on_load_failure, e)
            return
        self.engine, self.safety_checkers = engine, checkers
        if self.state == LOADING:
            self.state = READY
        log.info("model loaded: serving (max_batch_size=%d, max_seq_len=%d)", engine.max_batch_size, engine.max_seq_len)
        try:
            engine.run_loop(lambda: self._stop, self._on_outputs)
        except BaseException as e:  # noqa: BLE001 - every waiting client is told; /health turns red
            log.error("the engine failed:\n%s", traceback.format_exc())
            self.state, self.error = FAILED, f"the engine failed: {type(e).__name__}: {e}"
            self._call_in_loop(self.abort_all, ApiError(500, "the generation engine failed; see the server's log",
                                                        "server_error", None, "engine_failed"))

    def _on_outputs(self, outputs: Sequence[Any]) -> None:
        now = time.monotonic()
        self._last_progress = now
        if outputs:
            self._call_in_loop(self._dispatch, outputs, now)

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    # ---------------------------------------------------------------- requests (event loop thread)

    @property
    def num_in_flight(self) -> int:
        return len(self._live)

    def check_available(self) -> None:
        """A 503 unless the engine can take requests now."""
        if self.state == LOADING:
            raise service_unavailable("the model is still loading; retry shortly (GET /health shows the progress)",
                                      "model_loading")
        if self.state == DRAINING:
            raise service_unavailable("the server is shutting down", "server_shutting_down")
        if self.state in (FAILED, STALLED):
            raise service_unavailable(f"the generation engine is unavailable ({self.error})", f"engine_{self.state}")

    def submit(self, jobs: Sequence[Tuple[int, int, List[int], Any]], queue: asyncio.Queue, arrival: float,
               request_id: str) -> List[Choice]:
        """Add ``(choice index, prompt index, prompt tokens, SamplingParams)`` jobs; outputs go to ``queue``
        as ``(choice, RequestOutput)``, an error as an ``ApiError``. On a ValueError nothing stays added."""
        choices: List[Choice] = []
        try:
            for index, prompt_index, tokens, params in jobs:
                choice = Choice(index, prompt_index, f"{request_id}-{index}", queue, arrival)
                choice.request = self.engine.add_request(tokens, params, request_id=choice.request_id)
                if not self._live:
                    self._busy_since = time.monotonic()
                self._live[choice.request_id] = choice
                choices.append(choice)
        except BaseException:
            self.release(choices)
            raise
        return choices

    def release(self, choices: Sequence[Choice]) -> None:
        """Forget ``choices``; those not finished are aborted (their slots free at the next step)."""
        for choice in choices:
            if self._live.pop(choice.request_id, None) is not None and not choice.finished and self.engine is not None:
                self.engine.abort(choice.request_id)

    def abort_all(self, error: ApiError) -> None:
        """Abort every request in flight; each HTTP request gets ``error``."""
        live, self._live = self._live, {}
        told = set()
        for choice in live.values():
            if self.engine is not None:
                self.engine.abort(choice.request_id)
            if id(choice.queue) not in told:
                told.add(id(choice.queue))
                choice.queue.put_nowait(error)

    def _dispatch(self, outputs: Sequence[Any], at: float) -> None:
        metrics = self.metrics
        for out in outputs:
            choice = self._live.get(out.request_id)
            if choice is None:
                continue  # released (client gone) or aborted
            k = len(out.token_ids)
            if k:
                if choice.first_token_at is None:
                    choice.first_token_at = at
                    metrics.ttft.observe(at - choice.arrival)
                else:
                    metrics.itl.observe((at - choice.last_token_at) / k, k)
                choice.last_token_at = at
                metrics.generation_tokens.inc(k)
            if out.finished:
                choice.finished = True
                del self._live[out.request_id]
                metrics.duration.observe(at - choice.arrival)
            choice.queue.put_nowait((choice, out))

    async def _watch(self) -> None:
        """Mark the engine stalled when requests wait and it reports nothing for ``stall_timeout_s``."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_timeout_s / 4))
            since = max(self._last_progress, self._busy_since)
            quiet = time.monotonic() - since
            if self.state == READY and self._live and quiet > self.stall_timeout_s:
                self.state = STALLED
                self.error = f"no progress for {quiet:.0f} s with {len(self._live)} request(s) in flight"
                log.error("the engine is stalled: %s", self.error)
                self.abort_all(service_unavailable(f"the generation engine is stalled ({self.error})",
                                                   "engine_stalled"))
            elif self.state == STALLED and quiet < self.stall_timeout_s and self._last_progress > self._busy_since:
                log.warning("the engine is making progress again")
                self.state, self.error = READY, None
