"""``Llama``: build a model from a checkpoint and run text and chat completion.

Drop-in for the reference ``llama.generation``: same names, arguments, defaults and
return values, plus CPU support, any world size, explicit device/dtype and errors
that say what to change. Generation runs on the engine (:mod:`llama.engine`: slots,
continuous batching, per-request sampling) over the model runner (:mod:`llama.runner`:
the model, its KV cache and compiled step); this module is the API on top of them.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import distributed, kernel_choice, safety
from .chat_format import (  # noqa: F401 - re-exported: upstream defines these here
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    SPECIAL_TAGS,
    UNSAFE_ERROR,
    ChatPrediction,
    CompletionPrediction,
    Dialog,
    Message,
    Role,
    encode_dialog,
    has_special_tags,
    validate_dialog,
)
from .checkpoint import load_into, open_checkpoint, verify_checkpoint
from .engine import Engine, Request, SamplingParams
from .model import ModelArgs, Transformer
from .runner import ModelRunner
from .sampling import check_sampling_args, sample_top_p  # noqa: F401 - upstream defines sample_top_p here
from .streaming import StreamEvent, normalize_stop
from .tokenizer import Tokenizer


class Llama:
    """A loaded model and its tokenizer."""

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[None, str, torch.device] = None,
        dtype: Union[None, str, torch.dtype] = None,
        compile: bool = False,
        verify: bool = False,
        quantize: Optional[str] = None,
        pack_weights: Optional[bool] = None,
        kernels: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint directory and tokenizer, ready to generate.

        Args:
            ckpt_dir: directory with ``params.json`` and ``consolidated.NN.pth`` shards
                (Meta's format), or with ``config.json`` and ``*.safetensors`` (Hugging Face's).
            tokenizer_path: the SentencePiece ``tokenizer.model``.
            max_seq_len: longest prompt + generation, in tokens (the KV cache length).
            max_batch_size: most sequences decoded at once: the rows (slots) of the KV cache.
                More prompts than that wait for a slot, which each takes as soon as
                another sequence ends.
            model_parallel_size: ranks the model is split over; default: all processes
                (``WORLD_SIZE`` under torchrun, else 1). The checkpoint's shard count need
                not match: shards are merged or split while loading.
            seed: seed of the sampling generator (the same on every rank).
            device: torch device; default CUDA (this rank's GPU) when available, else CPU.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``;
                default bfloat16 on CUDA (float16 where unsupported), float32 on CPU.
            compile: compile the one-token decode step with ``torch.compile`` (over the
                preallocated cache, positions as a tensor, so no prompt or generation
                length recompiles it; CUDA graphs on CUDA; on the CPU one graph for every
                batch size, with frozen weights: each linear shape runs what was measured
                faster here, Inductor's autotuned C++ matrix kernels (which hold a second,
                packed copy of those weights) or our ``gemv`` as an operator of the graph
                (no copy), and Inductor fuses the rest). Costs a warm-up (printed; about
                half a minute for a 110M model on 2 CPU cores) and pays off on long generations.
            verify: check the md5 sums of ``ckpt_dir/checklist.chk`` before loading
                (every rank reads every file once more; a ValueError names the files that fail).
            quantize: ``"int8"``: weight-only int8 linear layers (per output row scales),
                quantized tensor by tensor while loading; see :mod:`llama.quantize`.
            pack_weights: ``True``: hold the linear layers' weights in oneDNN's packed layout
                (see :mod:`llama.packed_linear`), i.e. ``kernels="packed"``; ``False``:
                ``kernels="dense"``. With ``compile`` too, the compiled step keeps calling
                oneDNN on packed weights: one copy of the weights, slower decoding than
                compile's default.
            kernels: the kernels, overriding the measured choice, comma-separated, at most
                one per kind: ``"dense"``, ``"gemv"`` (our matrix-vector kernels on the dense
                weights, :mod:`llama.native`) or ``"packed"`` for float weights; ``"int8"``,
                ``"int8-fp32"`` (float32 activations) or ``"int8-gemv"`` (AVX512-VNNI or AVX2) for
                ``quantize="int8"``, and ``"prefill-int8mm"`` or ``"prefill-dequantized"`` for
                those layers' prefill; ``"sdpa"`` or ``"native-attention"`` for the attention
                (decode steps and prefill); or ``"auto"``. Default (``None``): ``$LLAMA_KERNELS`` if
                set, else ``"auto"``: on the CPU, each shape gets the kernel measured fastest
                on this machine at the decode batch sizes the model runs (1, and up to 8
                within ``max_batch_size``; timed once on random weights, a few seconds, then
                cached in ``~/.cache/llama/kernels.json`` per CPU and torch version; see
                :mod:`llama.kernel_choice` and ``python -m llama.doctor``). Our native kernels
                are built on first use with the machine's C++ compiler (a few seconds, cached
                in ``~/.cache/llama/native``); without one they are simply not candidates.
                ``compile=True`` chooses between dense weights (its CPU step autotunes its
                own kernels for them) and ``gemv``; CUDA runs dense.
        """
        start_time = time.time()
        device = distributed.select_device(device)
        dtype = distributed.select_dtype(dtype, device)
        world = distributed.init_model_parallel(model_parallel_size, device)
        rank = distributed.model_parallel_rank()
        distributed.check_ranks_agree(
            (max_seq_len, max_batch_size, seed, str(dtype), world), "max_seq_len, max_batch_size, seed, dtype"
        )

        # Linear kernels: measured on this machine per shape (llama.kernel_choice), unless overridden.
        override = kernel_choice.check_override(kernels, pack_weights, device, dtype, quantize)
        if device.type == "cpu":
            kernel_choice.settle_threads()

        def load() -> Tuple[Transformer, Tokenizer]:
            if verify:
                verify_checkpoint(Path(ckpt_dir))
            tokenizer = Tokenizer(tokenizer_path)
            checkpoint = open_checkpoint(
                Path(ckpt_dir), vocab_size=tokenizer.n_words, max_seq_len=max_seq_len, max_batch_size=max_batch_size
            )
            params = checkpoint.args
            rows = checkpoint.embedding_rows()
            if rows != tokenizer.n_words or rows != params.vocab_size:
                raise ValueError(
                    f"the checkpoint's embedding has {rows} rows but the tokenizer {tokenizer_path} has "
                    f"{tokenizer.n_words} pieces (vocab_size={params.vocab_size}); "
                    "use the tokenizer.model that came with these weights"
                )
            params.check_model_parallel_size(world)
            model = Transformer(params, device="meta", dtype=dtype)
            # timed (if not cached) before the weights take memory; compile=True: the compiled step picks its own
            plan = kernel_choice.plan_for(model, device, dtype, override, quantized=quantize is not None, compile=compile)
            if quantize is None:
                load_into(model, checkpoint, rank, world, device, dtype)
            else:
                from .quantize import load_quantized

                load_quantized(model, checkpoint, rank, world, device, dtype, quantize)
            # before close(): the mapped pages each packed weight read are released
            kernel_choice.apply(model, plan, on_packed=checkpoint.release)
            checkpoint.close()
            model.allocate_buffers(device, dtype)
            return model, tokenizer

        model, tokenizer = distributed.run_on_all_ranks(load, "loading the checkpoint")
        kernel_choice.apply(model, kernel_choice.agree(model))  # every rank runs rank 0's kernels
        if distributed.is_main_process():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        llama = Llama(model, tokenizer, seed=seed, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        if compile:
            llama.compile()
        return llama

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        seed: int = 1,
        *,
        max_batch_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
    ):
        """A model and its tokenizer, ready to generate (``Llama.build`` makes one from a checkpoint).

        ``max_batch_size`` and ``max_seq_len`` size the KV cache (default: ``model.params``'s).
        """
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        # A private generator: sampling never touches (or depends on) torch's global RNG.
        # Each request draws its own seed from it, in the order the requests are made.
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        params = model.params
        self.runner = ModelRunner(model, max_batch_size or params.max_batch_size, max_seq_len or params.max_seq_len)
        self.engine = Engine(self.runner, tokenizer, self.generator)
        # Checkers used when a call passes no safety_checkers (see llama.safety); [] = no checks.
        self.safety_checkers: List[safety.SafetyChecker] = []

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.runner.max_batch_size

    def compile(self, warmup_batch_sizes: Sequence[int] = (1,)) -> float:
        """Compile the decode step now; returns (and prints on rank 0) the warm-up seconds.

        The step runs over the first rows of the cache, each at its own position, so no
        prompt or generation length compiles it again. On one CPU rank with dense float
        weights, one graph serves every batch size, with one frozen, packed copy of the
        linear weights; its GEMMs are tuned, at the first compile, for the largest of
        ``warmup_batch_sizes`` rows. Elsewhere (CUDA graphs, oneDNN-packed or int8 weights,
        model parallel) each batch size is a graph: a decode of ``n`` rows runs padded to
        the smallest compiled size >= ``n``, and a larger ``n`` compiles once more on first
        use. On the CPU, a model whose weights are oneDNN-packed
        (``Llama.build``'s default without ``compile``) keeps them and compiles around
        them; one with dense float weights (``compile=True`` or ``pack_weights=False``
        at build) gets the faster frozen, autotuned kernels. Where the eager step is one
        native call (every piece on our CPU kernels, :mod:`llama.native_step`), nothing is
        compiled: that is already the faster step. Call it while nothing is being generated.
        """
        if self.engine.has_unfinished():
            raise RuntimeError("compile() while requests are in flight: finish or abort them first")
        seconds = self.runner.compile(warmup_batch_sizes)
        if distributed.is_main_process():
            native = self.runner.native_decoder() if self.runner.device.type == "cpu" else None
            if native is None:
                print(f"Compiled the decode step in {seconds:.1f} seconds")
            elif self.runner.compiled:  # a graph for the batch sizes past the one-call step's rows
                print(f"The decode step is one native call (llama/native_step.py) for up to {native.rows} rows; "
                      f"compiled it for more in {seconds:.1f} seconds")
            else:  # every piece runs our kernels: the step is one native call already
                print("The decode step is one native call (llama/native_step.py): nothing to compile")
        return seconds

    # -- running requests on the engine ------------------------------------------------------

    def _add(self, prompt_tokens: List[List[int]], params: SamplingParams, detokenize: bool) -> List[Request]:
        requests = []
        try:
            for prompt in prompt_tokens:
                request = self.engine.add_request(prompt, params, detokenize=detokenize)
                request.collect = detokenize  # streams read each request's outputs
                requests.append(request)
        except BaseException:
            self._abort(requests)
            raise
        return requests

    def _abort(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if not request.finished:
                self.engine.abort(request.request_id)
        if any(not r.finished for r in requests):
            self.engine.step()  # frees their slots now; other callers' requests advance a step

    @torch.inference_mode()
    def _run(self, prompt_tokens: List[List[int]], params: SamplingParams, detokenize: bool) -> List[Request]:
        """Add the prompts and step the engine until every one of them has finished."""
        requests = self._add(prompt_tokens, params, detokenize)
        try:
            while not all(r.finished for r in requests):
                self.engine.step()
        except BaseException:
            self._abort(requests)
            raise
        return requests

    def _stream(self, prompt_tokens: List[List[int]], params: SamplingParams) -> Iterator[StreamEvent]:
        """Events of the prompts' generations as the engine steps (requests added on first ``next``;
        closing the iterator early aborts those still running)."""
        requests = self._add(prompt_tokens, params, detokenize=True)
        try:
            while True:
                for i, request in enumerate(requests):
                    while request.outputs:
                        out = request.outputs.popleft()
                        if out.text or out.finished:
                            yield StreamEvent(i, out.text, out.finished)
                if all(r.finished and not r.outputs for r in requests):
                    return
                with torch.inference_mode():
                    self.engine.step()
        finally:
            self._abort(requests)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt (a list of token ids) by up to ``max_gen_len`` tokens.

        ``temperature == 0`` is greedy; otherwise tokens are drawn by nucleus sampling.
        Each row stops at EOS (not included) or ``max_gen_len`` tokens, and prompt plus
        generation never exceed ``max_seq_len``. With ``echo`` the prompt is returned too.
        With ``logprobs``, also returns the log-probability of each returned token (0 for
        an echoed prompt's first token, which nothing predicts). Any number of prompts:
        they share the ``max_batch_size`` slots, each taking one as another ends.
        """
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
        params = SamplingParams(temperature, top_p, max_gen_len, logprobs=logprobs, echo=echo)
        return self._returned(prompt_tokens, self._run(prompt_tokens, params, detokenize=False), params)

    @staticmethod
    def _returned(prompt_tokens, requests: List[Request], params: SamplingParams):
        """Per request the tokens ``generate`` returns (the prompt first with ``echo``) and
        their log-probabilities (None without ``logprobs``)."""
        echo = params.echo
        tokens = [(list(p) if echo else []) + r.generated for p, r in zip(prompt_tokens, requests)]
        if not params.logprobs:
            return tokens, None
        return tokens, [(r.prompt_logprobs if echo else []) + r.generated_logprobs for r in requests]

    def _check_generate_args(self, prompt_tokens, max_gen_len, temperature, top_p, stop=()) -> None:
        """Raise ValueError on bad arguments, or unless every rank passed the same ones."""
        check_sampling_args(temperature, top_p)
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            if len(t) > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(t)} tokens long, more than max_seq_len={self.max_seq_len}; "
                    "shorten it or build with a larger max_seq_len"
                )
        # Every rank runs the same engine on the same requests: they must be given the same ones.
        agreed = [prompt_tokens, max_gen_len, temperature, top_p] + ([list(stop)] if stop else [])
        digest = hashlib.sha256(json.dumps(agreed).encode()).hexdigest()
        distributed.check_ranks_agree(digest, "prompts and generation arguments")

    def _generate_text(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop):
        """``generate`` that follows the text (for stop strings): per prompt the text (with
        ``echo``, the prompt's text first), the tokens reported and their log-probabilities."""
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, stop)
        params = SamplingParams(temperature, top_p, max_gen_len, tuple(stop), logprobs=logprobs, echo=echo)
        requests = self._run(prompt_tokens, params, detokenize=True)
        texts = [(self.tokenizer.decode(p) if echo else "") + r.text for p, r in zip(prompt_tokens, requests)]
        return (texts, *self._returned(prompt_tokens, requests, params))

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
        stop: Union[None, str, List[str]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt string; returns ``[{"generation": str, ...}]`` in order.

        With ``logprobs``, each result also has ``"tokens"`` (the decoded pieces) and
        ``"logprobs"``. ``max_gen_len=None`` means ``max_seq_len - 1``.
        ``safety_checkers`` (default ``self.safety_checkers``): prompts found unsafe are
        not generated for, unsafe generations are replaced by ``SAFETY_REFUSAL``, and
        each result gets a ``"safety"`` list of reports; see :mod:`llama.safety`.

        ``stop``: strings (or one string) that end a prompt's generation as soon as its
        generated text contains one; the text returned ends just before it, and
        ``"tokens"``/``"logprobs"`` keep the tokens whose text precedes it. Stop strings
        are looked for in the generated text only (with ``echo``: after the prompt).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
        checkers = safety.resolve_checkers(safety_checkers, self.safety_checkers)
        if checkers:
            options = dict(
                temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=logprobs, echo=echo, stop=stop
            )
            return safety.checked_text_completion(self, checkers, prompts, options)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        stop = normalize_stop(stop)
        if stop:
            texts, generation_tokens, generation_logprobs = self._generate_text(
                prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop
            )
        else:
            generation_tokens, generation_logprobs = self.generate(
                prompt_tokens=prompt_tokens,
                max_gen_len=max_gen_len,
                temperature=temperature,
                top_p=top_p,
                logprobs=logprobs,
                echo=echo,
            )
            texts = [self.tokenizer.decode(t) for t in generation_tokens]
        if logprobs:
            return [
                {
                    "generation": text,
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": logprobs_i,
                }
                for text, t, logprobs_i in zip(texts, generation_tokens, generation_logprobs)
            ]
        return [{"generation": text} for text in texts]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
        stop: Union[None, str, List[str]] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog; returns ``[{"generation": {"role": "assistant", "content": str}, ...}]``.

        A dialog is ``[system?, user, assistant, ..., user]``. A dialog containing the
        special tags ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>`` is not run and
        gets ``UNSAFE_ERROR`` as its content. ``safety_checkers`` (default
        ``self.safety_checkers``): as for :meth:`text_completion`. ``stop`` ends an
        answer just before the first stop string it contains (see ``text_completion``).
        """
        if not isinstance(dialogs, (list, tuple)) or (dialogs and isinstance(dialogs[0], dict)):
            raise ValueError("dialogs must be a list of dialogs (each a list of messages); wrap a single dialog in a list")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        checkers = safety.resolve_checkers(safety_checkers, self.safety_checkers)
        if checkers:
            for i, dialog in enumerate(dialogs):
                validate_dialog(dialog, i)  # before the checkers see them
            options = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=logprobs, stop=stop)
            return safety.checked_chat_completion(self, checkers, dialogs, options)
        unsafe, safe_ids, prompt_tokens = self._encode_dialogs(dialogs)
        stop = normalize_stop(stop)
        if prompt_tokens and stop:
            texts, generation_tokens, generation_logprobs = self._generate_text(
                prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, stop
            )
        else:
            generation_tokens, generation_logprobs = self.generate(
                prompt_tokens=prompt_tokens,
                max_gen_len=max_gen_len,
                temperature=temperature,
                top_p=top_p,
                logprobs=logprobs,
            ) if prompt_tokens else ([], [] if logprobs else None)
            texts = [self.tokenizer.decode(t) for t in generation_tokens]

        results: List[ChatPrediction] = [
            {"generation": {"role": "assistant", "content": UNSAFE_ERROR}} for _ in dialogs
        ]
        for j, i in enumerate(safe_ids):
            t = generation_tokens[j]
            results[i] = {"generation": {"role": "assistant", "content": texts[j]}}
            if logprobs:
                results[i]["tokens"] = [self.tokenizer.decode([x]) for x in t]
                results[i]["logprobs"] = generation_logprobs[j]
        if logprobs:
            for i in range(len(dialogs)):
                if unsafe[i]:
                    results[i]["tokens"], results[i]["logprobs"] = [], []
        return results

    def _encode_dialogs(self, dialogs: List[Dialog]) -> Tuple[List[bool], List[int], List[List[int]]]:
        """Validate ``dialogs``; returns which are unsafe (special tags), the indices of
        the others and their prompt tokens (each checked to fit ``max_seq_len``)."""
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        safe_ids = [i for i, u in enumerate(unsafe) if not u]
        prompt_tokens = [encode_dialog(self.tokenizer, dialogs[i]) for i in safe_ids]
        for j, t in enumerate(prompt_tokens):
            if len(t) > self.max_seq_len:
                raise ValueError(
                    f"dialog {safe_ids[j]} is {len(t)} tokens long, more than max_seq_len="
                    f"{self.max_seq_len}; shorten it or build with a larger max_seq_len"
                )
        return unsafe, safe_ids, prompt_tokens

    def _stream_events(self, prompt_tokens, max_gen_len, temperature, top_p, stop) -> Iterator[StreamEvent]:
        """Stream the prompts' generations as ``StreamEvent``s (arguments already checked)."""
        return self._stream(prompt_tokens, SamplingParams(temperature, top_p, max_gen_len, tuple(stop)))

    def stream_batch_text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Union[None, str, List[str]] = None,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
    ) -> Iterator[StreamEvent]:
        """Complete several prompts at once, streaming: yields ``StreamEvent(index, text, done)``.

        Each prompt's ``text`` pieces, in order, add up to its ``text_completion``
        generation (same arguments, same generator state); its last event has
        ``done=True``. Events of different prompts interleave as the batch advances;
        ``llama.streaming.in_order`` reorders them for printing. Arguments are checked
        now; the model runs as the iterator is consumed (on every rank, under torchrun).
        Streams and other calls on one model share its slots: each call steps the
        engine for everyone, so several may be in progress at once.
        With ``safety_checkers`` (default ``self.safety_checkers``), prompts are checked
        as iteration starts and each reply once finished, *after* its pieces were
        yielded: each row's last event carries a ``llama.safety.SafetyNotice`` (the
        reports; the withdrawal text for an unsafe reply); see ``llama.safety.checked_stream``.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (use stream_text_completion for a single prompt)")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        stop = normalize_stop(stop)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, stop)
        checkers = safety.resolve_checkers(safety_checkers, self.safety_checkers)
        if checkers:
            dialogs = [[{"role": "user", "content": p}] for p in prompts]
            return safety.checked_stream(self, checkers, dialogs, lambda rows: self._stream_events(
                [prompt_tokens[i] for i in rows], max_gen_len, temperature, top_p, stop))
        return self._stream_events(prompt_tokens, max_gen_len, temperature, top_p, stop)

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Union[None, str, List[str]] = None,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
    ) -> Iterator[str]:
        """Complete one prompt, yielding the generated text in pieces as tokens are produced.

        The pieces (never empty) concatenate to ``text_completion([prompt], ...)``'s
        generation for the same generator state; a character split over several tokens
        comes out whole, and no part of a stop string is ever yielded. Stopping the
        iteration early ends the generation. With safety checkers the last piece is a
        ``llama.safety.SafetyNotice`` (``""`` when safe), see ``stream_batch_text_completion``.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        events = self.stream_batch_text_completion([prompt], temperature, top_p, max_gen_len, stop, safety_checkers)
        return (event.text for event in events if event.text or isinstance(event.text, safety.SafetyNotice))

    def stream_batch_chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Union[None, str, List[str]] = None,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
    ) -> Iterator[StreamEvent]:
        """Answer several dialogs at once, streaming ``StreamEvent(index, text, done)``.

        Each dialog's pieces add up to its ``chat_completion`` content; a dialog with
        special tags gets ``UNSAFE_ERROR`` as a single event, before the others.
        ``safety_checkers``: as for ``stream_batch_text_completion``.
        """
        if not isinstance(dialogs, (list, tuple)) or (dialogs and isinstance(dialogs[0], dict)):
            raise ValueError("dialogs must be a list of dialogs (use stream_chat_completion for a single dialog)")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        stop = normalize_stop(stop)
        unsafe, safe_ids, prompt_tokens = self._encode_dialogs(dialogs)
        if prompt_tokens:
            self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, stop)
        checkers = safety.resolve_checkers(safety_checkers, self.safety_checkers)
        if checkers:
            return safety.checked_stream(self, checkers, dialogs, lambda rows: self.stream_batch_chat_completion(
                [dialogs[i] for i in rows], temperature, top_p, max_gen_len, stop, safety_checkers=[]
            ), judge_reply=[not u for u in unsafe])

        def events() -> Iterator[StreamEvent]:
            for i in range(len(dialogs)):
                if unsafe[i]:
                    yield StreamEvent(i, UNSAFE_ERROR, True)
            if prompt_tokens:
                for event in self._stream_events(prompt_tokens, max_gen_len, temperature, top_p, stop):
                    yield event._replace(index=safe_ids[event.index])

        return events()

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        stop: Union[None, str, List[str]] = None,
        safety_checkers: Optional[Sequence[safety.SafetyChecker]] = None,
    ) -> Iterator[str]:
        """Answer one dialog, yielding the assistant's reply in pieces as tokens are produced.

        The pieces (never empty) concatenate to ``chat_completion([dialog], ...)``'s
        content for the same generator state (``UNSAFE_ERROR`` for special tags).
        With safety checkers the last piece is a ``llama.safety.SafetyNotice`` (``""``
        when safe), see ``stream_batch_text_completion``.
        """
        if not isinstance(dialog, (list, tuple)) or (dialog and not isinstance(dialog[0], dict)):
            raise ValueError("dialog must be a list of messages (use stream_batch_chat_completion for several)")
        events = self.stream_batch_chat_completion([dialog], temperature, top_p, max_gen_len, stop, safety_checkers)
        return (event.text for event in events if event.text or isinstance(event.text, safety.SafetyNotice))
