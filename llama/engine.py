"""The generation engine: requests, slots, a scheduler and per-request sampling.

Every row of the preallocated KV cache is a *slot* that holds one request at its own
position. Each :meth:`Engine.step`:

1. takes the requests added (and aborted) since the last step;
2. gives free slots to waiting requests, first come first served (the lowest free slot
   first, so that the rows in use stay at the front of the cache);
3. **prefills**: runs the next chunks of the prompts not yet in the cache through the
   model in one pass, at most ``prefill_chunk_tokens`` tokens while other rows are
   decoding (so a long prompt cannot stall them for long), as many as fit otherwise.
   A prompt whose last chunk ran yields its first generated token;
4. **decodes**: one token for every row past its prompt, each at its own position, in
   one batched step (compiled, when the runner is) over the rows up to the last decoding
   one; where the step is one native call (:mod:`llama.native_step`) it runs the decoding
   rows only, skipping free and prefilling rows in front of them;
5. ends the rows that reached EOS, a stop string, their ``max_gen_len`` or the end of
   the context, or were aborted, and frees their slots for the next step.

So rows end independently, and a request that arrives while others run joins at the
next step. Each request samples with its own generator, seeded from its own seed:
what it generates depends on its prompt, its parameters and its seed only, not on what
shares the batch (up to the last bits of the floating-point sums, which the batch
size can change).

Model parallel: every rank runs the same engine on the same inputs, so every rank
takes the same decisions. When every rank calls the API with the same arguments
(``Llama.generate`` under torchrun), they add the same requests. When only rank 0
receives requests (a server), :meth:`Engine.run_loop` broadcasts them from rank 0 at
each step before anyone schedules.
"""

import collections
import itertools
import threading
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import distributed
from .model import Segments
from .runner import ModelRunner
from .sampling import check_sampling_args, sample_rows
from .streaming import TextStream, normalize_stop

FINISH_REASONS = ("eos", "stop", "length", "abort")
MAX_TOP_LOGPROBS = 20
_SEED_LIMIT = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated.

    Args:
        temperature: 0 is greedy; otherwise the logits are divided by it before sampling.
        top_p: nucleus sampling threshold, in (0, 1].
        max_gen_len: most tokens generated; None: until EOS, a stop string or the end of
            the context (``max_seq_len``).
        stop: strings that end the generation; the text ends just before the first one
            and no part of one is ever emitted.
        logprobs: report the log-probability of each generated token (log-softmax of the
            raw logits, before temperature).
        top_logprobs: also report the ``n`` most likely tokens at each position (0..20).
        echo: the text continues the prompt (its first piece keeps its leading space);
            with ``logprobs``, the prompt's tokens are scored too (``Request.prompt_logprobs``).
        seed: seed of the request's sampling generator; None: drawn from the engine's.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: Optional[int] = None
    stop: Tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_p)
        if self.max_gen_len is not None and (not _is_int(self.max_gen_len) or self.max_gen_len < 0):
            raise ValueError(f"max_gen_len must be an integer >= 0 or None, got {self.max_gen_len!r}")
        object.__setattr__(self, "stop", tuple(normalize_stop(self.stop)))
        for name in ("logprobs", "echo"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _SEED_LIMIT):
            raise ValueError(f"seed must be an integer in 0..2**63-1 or None, got {self.seed!r}")


class RequestOutput(NamedTuple):
    """What a step produced for one request (only requests with something new are reported).

    ``text`` is the new text; ``token_ids`` the generated tokens whose text is now wholly
    emitted, with their ``logprobs`` / ``top_logprobs`` when asked for: over a request's
    outputs they add up to its final (kept) tokens. ``finished`` is True on its last
    output, with ``finish_reason`` one of :data:`FINISH_REASONS`.
    """

    request_id: str
    text: str
    token_ids: List[int]
    logprobs: Optional[List[float]]
    top_logprobs: Optional[List[Dict[int, float]]]
    finished: bool
    finish_reason: Optional[str]
    num_prompt_tokens: int
    num_generated_tokens: int


class Request:
    """One prompt being generated for: its parameters, its slot, its tokens and text so far.

    Read-only for callers. ``finish_reason`` is set once it ends: ``"eos"``, ``"stop"``
    (a stop string), ``"length"`` (``max_gen_len`` or the context bound) or ``"abort"``.
    """

    def __init__(
        self,
        request_id: str,
        prompt_tokens: List[int],
        params: SamplingParams,
        seed: int,
        max_seq_len: int,
        tokenizer,
        device: torch.device,
        detokenize: bool = True,
    ):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        # The text is followed only when asked for (or needed for stop strings).
        self.stream: Optional[TextStream] = None
        if detokenize or params.stop:
            self.stream = TextStream(tokenizer, params.stop, prompt_tokens if params.echo else ())
        gen_limit = max_seq_len if params.max_gen_len is None else len(prompt_tokens) + params.max_gen_len
        self.max_len = min(max_seq_len, gen_limit)  # prompt + generation never exceed this
        self.output_tokens: List[int] = []  # generated so far (EOS excluded)
        self.logprobs: Optional[List[float]] = [] if params.logprobs else None
        self.top_logprobs: Optional[List[Dict[int, float]]] = [] if params.top_logprobs else None
        self.prompt_logprobs: Optional[List[float]] = None
        if params.echo and params.logprobs:
            self.prompt_logprobs = [0.0] * len(prompt_tokens)  # the first token has no prediction
        self.text = ""  # emitted so far
        self.slot: Optional[int] = None
        self.num_cached = 0  # positions of its cache row written so far
        self.finish_reason: Optional[str] = None
        self.collect = False  # keep outputs in .outputs (for callers that poll rather than get a callback)
        self.outputs: Deque[RequestOutput] = collections.deque()
        self.order = -1  # place in the engine's arrival order (the same on every rank)
        self._reported = 0  # tokens reported in outputs so far

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """Past its prompt: it holds a sampled token that the next decode step feeds."""
        return self.slot is not None and self.num_cached >= len(self.prompt_tokens) and bool(self.output_tokens)

    def kept_tokens(self) -> int:
        """How many generated tokens count: all, or after a stop string those before it."""
        return self.stream.kept_tokens() if self.stream is not None else len(self.output_tokens)

    @property
    def generated(self) -> List[int]:
        """The generated tokens that count (see :meth:`kept_tokens`)."""
        return self.output_tokens[: self.kept_tokens()]

    @property
    def generated_logprobs(self) -> Optional[List[float]]:
        return None if self.logprobs is None else self.logprobs[: self.kept_tokens()]

    def _reportable(self) -> int:
        if self.finished and self.finish_reason != "abort":  # an aborted request's held-back text is dropped
            return self.kept_tokens()
        return self.stream.emitted_tokens() if self.stream is not None else len(self.output_tokens)

    def _output(self, text: str) -> Optional[RequestOutput]:
        """The output for what happened since the last one (None when nothing did)."""
        count = max(self._reported, self._reportable())
        new = slice(self._reported, count)
        self._reported = count
        self.text += text
        if not (text or new.stop > new.start or self.finished):
            return None
        return RequestOutput(
            self.request_id,
            text,
            self.output_tokens[new],
            None if self.logprobs is None else self.logprobs[new],
            None if self.top_logprobs is None else self.top_logprobs[new],
            self.finished,
            self.finish_reason,
            len(self.prompt_tokens),
            count,
        )


class Engine:
    """Continuous batching over the ``max_batch_size`` slots of a :class:`~llama.runner.ModelRunner`.

    Args:
        runner: the model runner (model, KV cache, compiled step).
        tokenizer: the model's ``llama.Tokenizer`` (for EOS and the text of each request).
        generator: where requests without a seed draw theirs (``Llama.generator``).
        prefill_chunk_tokens: most prompt tokens run in a step while other rows decode.
        max_prefill_tokens: most prompt tokens run in one pass when no row decodes.

    ``add_request`` and ``abort`` may be called from any thread; ``step`` (and
    ``run_loop``) from one thread at a time.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        generator: Optional[torch.Generator] = None,
        *,
        prefill_chunk_tokens: int = 256,
        max_prefill_tokens: int = 4096,
    ):
        if not _is_int(prefill_chunk_tokens) or prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be a positive integer, got {prefill_chunk_tokens!r}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_batch_size = runner.max_batch_size
        self.max_seq_len = runner.max_seq_len
        self.vocab_size = runner.model.vocab_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(1)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk_tokens)
        self.slots: List[Optional[Request]] = [None] * self.max_batch_size
        self.waiting: Deque[Request] = collections.deque()
        self.requests: Dict[str, Request] = {}  # every unfinished request, by id
        self._inbox: List[tuple] = []  # ("add", spec) and ("abort", id), applied at the next step
        self._created: Dict[str, Request] = {}  # requests added here, not yet applied
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._ids = itertools.count()
        self._arrivals = itertools.count()  # order of arrival: scheduling never reads a clock

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt_tokens: Sequence[int],
        params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        *,
        detokenize: bool = True,
    ) -> Request:
        """Queue a prompt (token ids); it joins a free slot at the next step. Thread-safe.

        Raises ``ValueError`` now for an empty prompt, one longer than ``max_seq_len``,
        token ids outside the vocabulary or an id already in use. ``detokenize=False``
        skips following the text (token-level callers), unless stop strings need it.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = list(prompt_tokens)
        if not prompt:
            raise ValueError("the prompt is empty; every prompt needs at least one token (e.g. BOS)")
        if len(prompt) > self.max_seq_len:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens long, more than max_seq_len={self.max_seq_len}; "
                "shorten it or build with a larger max_seq_len"
            )
        if not all(_is_int(t) and 0 <= t < self.vocab_size for t in prompt):
            bad = next(t for t in prompt if not (_is_int(t) and 0 <= t < self.vocab_size))
            raise ValueError(f"prompt token {bad!r} is not an id of this model's vocabulary (0..{self.vocab_size - 1})")
        with self._lock:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, _SEED_LIMIT, (1,), generator=self.generator))
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
            elif request_id in self.requests or request_id in self._created:
                raise ValueError(f"request id {request_id!r} is already in use")
            spec = (request_id, prompt, params, seed, detokenize)
            request = self._make_request(spec)
            self._created[request_id] = request
            self._inbox.append(("add", spec))
        self._wakeup.set()
        return request

    def abort(self, request_id: str) -> None:
        """End a request (waiting or running) at the next step; its slot is freed. Thread-safe.
        Unknown or finished ids are ignored."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.requests or self._inbox)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot (including those added since the last step)."""
        with self._lock:
            return len(self.waiting) + len(self._created)

    @property
    def num_running(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self.slots)

    def _make_request(self, spec: tuple) -> Request:
        request_id, prompt, params, seed, detokenize = spec
        return Request(
            request_id, prompt, params, seed, self.max_seq_len, self.tokenizer, self.runner.device, detokenize
        )

    def _take_inbox(self) -> List[tuple]:
        with self._lock:
            commands, self._inbox = self._inbox, []
            return commands

    # -- the step ---------------------------------------------------------------------------

    def step(self, commands: Optional[List[tuple]] = None) -> List[RequestOutput]:
        """Run one scheduling step (see the module doc); returns the outputs it produced.

        ``commands``: what :meth:`run_loop` received from rank 0; by default this
        engine's own inbox.
        """
        if commands is None:
            commands = self._take_inbox()
        outputs: List[RequestOutput] = []
        self._apply(commands, outputs)
        self._admit(outputs)
        self._prefill(outputs)
        self._decode(outputs)
        return outputs

    def _apply(self, commands: List[tuple], outputs: List[RequestOutput]) -> None:
        for kind, arg in commands:
            if kind == "add":
                with self._lock:
                    request = self._created.pop(arg[0], None)
                request = request if request is not None else self._make_request(arg)
                request.order = next(self._arrivals)
                self.requests[request.request_id] = request
                self.waiting.append(request)
            elif kind == "abort":
                request = self.requests.get(arg)
                if request is not None:
                    self._finish(request, "abort", outputs)

    def _admit(self, outputs: List[RequestOutput]) -> None:
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            if request.max_len <= len(request.prompt_tokens) and request.prompt_logprobs is None:
                # Nothing to generate and nothing to score: done without running the model.
                self._finish(request, "length", outputs)
                continue
            slot = self.slots.index(None)
            self.slots[slot] = request
            request.slot = slot
            request.num_cached = 0

    def _prefill(self, outputs: List[RequestOutput]) -> None:
        pending = [r for r in self.slots if r is not None and r.num_cached < len(r.prompt_tokens)]
        if not pending:
            return
        pending.sort(key=lambda r: r.order)  # first come, first prefilled
        decoding = any(r is not None and r.decoding for r in self.slots)
        budget = self.prefill_chunk_tokens if decoding else self.max_prefill_tokens
        tokens: List[int] = []
        rows, starts, lengths, logit_index = [], [], [], []
        plan: List[Tuple[Request, int, int, int]] = []  # request, start, length, index of its first logits row
        for request in pending:
            if budget <= 0:
                break
            start = request.num_cached
            length = min(len(request.prompt_tokens) - start, budget)
            offset = len(tokens)
            tokens += request.prompt_tokens[start : start + length]
            rows.append(request.slot)
            starts.append(start)
            lengths.append(length)
            plan.append((request, start, length, len(logit_index)))
            if request.prompt_logprobs is not None:  # every position scores the next prompt token
                logit_index += range(offset, offset + length)
            elif start + length == len(request.prompt_tokens):  # the last one picks the first new token
                logit_index.append(offset + length - 1)
            budget -= length
        logits = self.runner.prefill(tokens, Segments(rows, starts, lengths), logit_index)
        ready, ready_rows = [], []
        for request, start, length, first in plan:
            request.num_cached = start + length
            done = request.num_cached == len(request.prompt_tokens)
            if request.prompt_logprobs is not None:
                chunk = F.log_softmax(logits[first : first + length], dim=-1)
                prompt = request.prompt_tokens
                # logits at position p score prompt token p + 1
                scored = [p for p in range(start, start + length) if p + 1 < len(prompt)]
                if scored:
                    index = torch.tensor([p - start for p in scored], device=chunk.device)
                    targets = torch.tensor([prompt[p + 1] for p in scored], device=chunk.device)
                    values = chunk[index, targets].tolist()
                    for p, value in zip(scored, values):
                        request.prompt_logprobs[p + 1] = value
                last_row = first + length - 1
            else:
                last_row = first
            if not done:
                continue
            if request.max_len <= len(request.prompt_tokens):
                self._finish(request, "length", outputs)
            else:
                ready.append(request)
                ready_rows.append(last_row)
        if ready:
            self._sample(ready, logits[torch.tensor(ready_rows, device=logits.device)], outputs)

    def _decode(self, outputs: List[RequestOutput]) -> None:
        decoding = [r for r in self.slots if r is not None and r.decoding]
        if not decoding:
            return
        n = max(r.slot for r in decoding) + 1
        if len(decoding) < n and self.runner.decodes_rows(len(decoding)):
            # Rows in front of the last decoding one are free or prefilling: a step that reads any
            # cache rows (one native call) runs only the decoding ones.
            logits = self.runner.decode_rows([r.output_tokens[-1] for r in decoding],
                                             [min(r.num_cached, self.max_seq_len - 1) for r in decoding],
                                             [r.slot for r in decoding])
            for request in decoding:
                request.num_cached += 1
            self._sample(decoding, logits, outputs)
            return
        size = max(n, self.runner.step_batch_size(n))
        # Rows that are not decoding (free, or still prefilling) are fed token 0 at their next
        # position: a write that is overwritten before anything reads it.
        positions = [0] * size
        for slot in range(size):
            request = self.slots[slot]
            if request is not None:
                positions[slot] = min(request.num_cached, self.max_seq_len - 1)
        tokens = [0] * n
        for request in decoding:
            tokens[request.slot] = request.output_tokens[-1]
        logits = self.runner.decode(tokens, positions)
        for request in decoding:
            request.num_cached += 1
        if len(decoding) < n:  # some rows in front of the last one are not decoding
            logits = logits[torch.tensor([r.slot for r in decoding], device=logits.device)]
        self._sample(decoding, logits, outputs)

    def _sample(self, requests: List[Request], logits: torch.Tensor, outputs: List[RequestOutput]) -> None:
        """Pick each request's next token from its logits row (float32, (len(requests), vocab))."""
        tokens = sample_rows(
            logits,
            [r.params.temperature for r in requests],
            [r.params.top_p for r in requests],
            [r.generator for r in requests],
        ).tolist()
        scored = [i for i, r in enumerate(requests) if r.logprobs is not None or r.top_logprobs is not None]
        chosen: Dict[int, float] = {}
        tops: Dict[int, Dict[int, float]] = {}
        if scored:
            index = torch.tensor(scored, device=logits.device)
            logp = F.log_softmax(logits[index], dim=-1)
            picked = logp[torch.arange(len(scored), device=logp.device), torch.tensor([tokens[i] for i in scored], device=logp.device)]
            chosen = dict(zip(scored, picked.tolist()))
            k = max((requests[i].params.top_logprobs for i in scored), default=0)
            if k:
                values, ids = torch.topk(logp, k, dim=-1)
                for j, i in enumerate(scored):
                    n = requests[i].params.top_logprobs
                    tops[i] = dict(zip(ids[j, :n].tolist(), values[j, :n].tolist()))
        for i, (request, token) in enumerate(zip(requests, tokens)):
            if token == self.tokenizer.eos_id:
                self._finish(request, "eos", outputs)
                continue
            request.output_tokens.append(token)
            if request.logprobs is not None:
                request.logprobs.append(chosen[i])
            if request.top_logprobs is not None:
                request.top_logprobs.append(tops[i])
            text = request.stream.add(token) if request.stream is not None else ""
            if request.stream is not None and request.stream.stopped:
                self._finish(request, "stop", outputs, text)
            elif len(request.prompt_tokens) + len(request.output_tokens) >= request.max_len:
                self._finish(request, "length", outputs, text)
            else:
                self._report(request, text, outputs)

    def _finish(self, request: Request, reason: str, outputs: List[RequestOutput], text: str = "") -> None:
        if request.stream is not None and reason != "abort":
            text += request.stream.finish()
        request.finish_reason = reason
        if request.slot is not None:
            self.slots[request.slot] = None
            request.slot = None
        if request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)
        self._report(request, text, outputs)

    def _report(self, request: Request, text: str, outputs: List[RequestOutput]) -> None:
        output = request._output(text)
        if output is None:
            return
        outputs.append(output)
        if request.collect:
            request.outputs.append(output)

    # -- serving --------------------------------------------------------------------------

    def run_loop(
        self,
        should_stop: Callable[[], bool],
        on_outputs: Callable[[List[RequestOutput]], None],
        idle_wait_s: float = 0.05,
    ) -> None:
        """Step while there is work, until ``should_stop()``; for a serving thread.

        Every rank calls it. Rank 0 takes the requests added to its engine (from any
        thread) and broadcasts them, with the aborts and the order to stop, before each
        step, so every rank schedules the same step; the other ranks' ``should_stop``
        and ``on_outputs`` are not used. Idle, rank 0 waits for a request (up to
        ``idle_wait_s`` at a time, to look at ``should_stop``) and the others wait for
        rank 0 without a time limit (see ``distributed.wait_for_rank0``).
        """
        leader = distributed.global_rank() == 0
        shared = distributed.world_size() > 1
        while True:
            if leader:
                stop = should_stop()
                if not stop and not self.has_unfinished():
                    self._wakeup.wait(idle_wait_s)
                    self._wakeup.clear()
                    continue
                commands = self._take_inbox()
                if shared:
                    distributed.wait_for_rank0(None if stop else commands)
                if stop:
                    return
            else:
                commands = distributed.wait_for_rank0(None)
                if commands is None:
                    return
            outputs = self.step(commands)
            if leader and outputs:
                on_outputs(outputs)
