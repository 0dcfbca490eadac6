"""``Llama``: build a model from a checkpoint and run text and chat completion.

Drop-in for the reference ``llama.generation``: same names, arguments, defaults and
return values, plus CPU support, any world size, explicit device/dtype and errors
that say what to change.
"""

import hashlib
import json
import time
import types
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import distributed, packed_linear, safety
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
from .model import ModelArgs, Transformer
from .sampling import check_sampling_args, next_tokens, sample_top_p  # noqa: F401
from .streaming import GeneratedText, StreamEvent, normalize_stop, stream_rows
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
    ) -> "Llama":
        """Load a checkpoint directory and tokenizer, ready to generate.

        Args:
            ckpt_dir: directory with ``params.json`` and ``consolidated.NN.pth`` shards
                (Meta's format), or with ``config.json`` and ``*.safetensors`` (Hugging Face's).
            tokenizer_path: the SentencePiece ``tokenizer.model``.
            max_seq_len: longest prompt + generation, in tokens (the KV cache length).
            max_batch_size: most sequences decoded at once (larger requests run in batches).
            model_parallel_size: ranks the model is split over; default: all processes
                (``WORLD_SIZE`` under torchrun, else 1). The checkpoint's shard count need
                not match: shards are merged or split while loading.
            seed: seed of the sampling generator (the same on every rank).
            device: torch device; default CUDA (this rank's GPU) when available, else CPU.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``;
                default bfloat16 on CUDA (float16 where unsupported), float32 on CPU.
            compile: compile the one-token decode step with ``torch.compile`` (static
                shapes over the preallocated cache; CUDA graphs on CUDA, frozen weights and
                autotuned C++ matrix kernels on CPU, which hold a second copy of the linear
                weights). Costs a warm-up (printed; about a minute per batch size for a
                110M model on 2 CPU cores) and pays off on long generations.
            verify: check the md5 sums of ``ckpt_dir/checklist.chk`` before loading
                (every rank reads every file once more; a ValueError names the files that fail).
            quantize: ``"int8"``: weight-only int8 linear layers (per output row scales),
                quantized tensor by tensor while loading; see :mod:`llama.quantize`.
            pack_weights: hold the linear layers' weights in oneDNN's packed layout, the
                faster eager path for float32 on the CPU (see :mod:`llama.packed_linear`).
                Default: on where supported, unless ``quantize`` or ``compile`` is given.
                With ``compile`` too, the compiled step keeps calling oneDNN on these
                weights: one copy of the weights, slower decoding than compile's default.
        """
        start_time = time.time()
        device = distributed.select_device(device)
        dtype = distributed.select_dtype(dtype, device)
        world = distributed.init_model_parallel(model_parallel_size, device)
        rank = distributed.model_parallel_rank()
        distributed.check_ranks_agree(
            (max_seq_len, max_batch_size, seed, str(dtype), world), "max_seq_len, max_batch_size, seed, dtype"
        )

        supported = packed_linear.packing_supported(device, dtype)
        # compile=True on the CPU keeps dense weights by default: the compiled step packs its own copy.
        pack = supported and quantize is None and not compile if pack_weights is None else bool(pack_weights)
        if pack and not supported:
            raise ValueError(f"pack_weights=True needs float32 on the CPU (here: {dtype} on {device})")
        if pack and quantize is not None:
            raise ValueError("pack_weights=True and quantize= exclude each other: int8 layers have their own kernels")

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
            if quantize is None:
                load_into(model, checkpoint, rank, world, device, dtype)
            else:
                from .quantize import load_quantized

                load_quantized(model, checkpoint, rank, world, device, dtype, quantize)
            if pack:  # before close(): the mapped pages each packed weight read are released
                packed_linear.pack_linear_weights(model, on_packed=checkpoint.release)
            checkpoint.close()
            model.allocate_buffers(device, dtype)
            return model, tokenizer

        model, tokenizer = distributed.run_on_all_ranks(load, "loading the checkpoint")
        if distributed.is_main_process():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        llama = Llama(model, tokenizer, seed=seed)
        if compile:
            llama.compile()
        return llama

    def compile(self, warmup_batch_sizes: Sequence[int] = (1,)) -> float:
        """Compile the decode step now; returns (and prints on rank 0) the warm-up seconds.

        Each new batch size compiles once more on first use, unless a larger one is
        compiled already: a batch then runs padded to the smallest such size (each
        compiled size is a separate graph, and on the CPU holds its own copy of the
        packed weights). On the CPU, a model whose weights are oneDNN-packed
        (``Llama.build``'s default without ``compile``) keeps them and compiles around
        them; one with dense float weights (``compile=True`` or ``pack_weights=False``
        at build) gets the faster frozen, autotuned kernels.
        """
        start = time.time()
        self._decode_step = compile_decode_step(self.model, self.device)
        self._compiled_batch_sizes = []
        with torch.inference_mode():
            for bsz in warmup_batch_sizes:
                self._compiled_batch_size(bsz)
                # Position 0 is written and later overwritten by the prefill of any prompt.
                tokens = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)
                for _ in range(2):  # the second call records the CUDA graph
                    self._decode_step(tokens, torch.zeros(1, dtype=torch.long, device=self.device))
        seconds = time.time() - start
        if distributed.is_main_process():
            print(f"Compiled the decode step in {seconds:.1f} seconds")
        return seconds

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        # A private generator: sampling never touches (or depends on) torch's global RNG.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._decode_step = None  # compiled one-token step, see compile()
        self._compiled_batch_sizes: List[int] = []  # batch sizes _decode_step has compiled for
        # Checkers used when a call passes no safety_checkers (see llama.safety); [] = no checks.
        self.safety_checkers: List[safety.SafetyChecker] = []

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
        With ``logprobs``, also returns the log-probability of each returned token.
        More prompts than ``max_batch_size`` are run in successive batches.
        """
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
        params = self.model.params
        out_tokens: List[List[int]] = []
        out_logprobs: List[List[float]] = []
        for start in range(0, len(prompt_tokens), params.max_batch_size):
            batch = prompt_tokens[start : start + params.max_batch_size]
            toks, probs = self._generate_batch(batch, max_gen_len, temperature, top_p, logprobs, echo)
            out_tokens += toks
            out_logprobs += probs
        return out_tokens, (out_logprobs if logprobs else None)

    def _check_generate_args(self, prompt_tokens, max_gen_len, temperature, top_p, stop=()) -> None:
        """Raise ValueError on bad arguments, or unless every rank passed the same ones."""
        check_sampling_args(temperature, top_p)
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        params = self.model.params
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(t)} tokens long, more than max_seq_len={params.max_seq_len}; "
                    "shorten it or build with a larger max_seq_len"
                )
        agreed = [prompt_tokens, max_gen_len, temperature, top_p] + ([list(stop)] if stop else [])
        digest = hashlib.sha256(json.dumps(agreed).encode()).hexdigest()
        distributed.check_ranks_agree(digest, "prompts and generation arguments")

    def _generate_batch(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
        state = None
        for state in self._decode(prompt_tokens, max_gen_len, temperature, top_p, logprobs):
            pass
        return state.results(echo)

    def _compiled_batch_size(self, bsz: int) -> int:
        """The batch size the compiled step runs ``bsz`` rows at: the smallest compiled one
        that fits, else ``bsz`` itself (compiled on first use)."""
        fits = [size for size in self._compiled_batch_sizes if size >= bsz]
        if fits:
            return min(fits)
        self._compiled_batch_sizes.append(bsz)
        return bsz

    def _decode(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
    ) -> Iterator["DecodeState"]:
        """Decode one batch (at most ``max_batch_size`` rows), yielding the state after each position.

        The caller may set ``state.stopped[i] = True`` between steps to end row ``i``
        early (e.g. on a stop string); the loop ends when every row has ended.
        """
        params = self.model.params
        bsz = len(prompt_tokens)
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        state = DecodeState(self.tokenizer, prompt_tokens, max_gen_len, total_len, logprobs, self.device)
        tokens, input_text_mask, pad_id = state.tokens, state.input_text_mask, self.tokenizer.pad_id

        positions = torch.arange(total_len, device=self.device)
        step_bsz = self._compiled_batch_size(bsz) if self._decode_step is not None else bsz
        # Padding rows feed token 0 into cache rows this batch does not use: any later
        # batch writes each position of its rows before attending to it.
        padding = torch.zeros(step_bsz - bsz, 1, dtype=tokens.dtype, device=self.device)
        prev_pos = 0
        if min_prompt_len == total_len:
            logits = self.model.forward(tokens, prev_pos)
            if logprobs:  # token t is scored by the logits at t - 1; position 0 keeps 0
                state.token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad_id
                )
        for cur_pos in range(min_prompt_len, total_len):
            # Rows whose prompt is longer than min_prompt_len take their next prompt
            # token instead of the sampled one, so they are fed through the cache too.
            if self._decode_step is not None and cur_pos - prev_pos == 1:
                pos = positions[prev_pos:cur_pos]  # a device view: no host-to-device copy per step
                step_tokens = tokens[:, prev_pos:cur_pos]  # (bsz, 1)
                if step_bsz > bsz:  # a larger compiled size: pad, rather than compile another graph
                    step_tokens = torch.cat([step_tokens, padding])  # (step_bsz, 1)
                logits = self._decode_step(step_tokens, pos)[:bsz, None]  # (bsz, 1, vocab)
            else:
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            next_token = next_tokens(logits[:, -1], temperature, top_p, self.generator)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                state.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=pad_id
                )
            state.stopped |= (~input_text_mask[:, cur_pos]) & (next_token == self.tokenizer.eos_id)
            state.cur_pos = cur_pos
            prev_pos = cur_pos
            yield state
            if bool(state.stopped.all()):
                break
        if min_prompt_len == total_len:
            yield state  # nothing to generate: the prompts fill the context

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
            max_gen_len = self.model.params.max_seq_len - 1
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
            max_gen_len = self.model.params.max_seq_len - 1
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
            if len(t) > self.model.params.max_seq_len:
                raise ValueError(
                    f"dialog {safe_ids[j]} is {len(t)} tokens long, more than max_seq_len="
                    f"{self.model.params.max_seq_len}; shorten it or build with a larger max_seq_len"
                )
        return unsafe, safe_ids, prompt_tokens

    def _generate_text(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop):
        """``generate`` with stop strings: per prompt the text (with ``echo``, the prompt's
        text first), the tokens reported and their log-probabilities (or None)."""
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p, stop)
        rows: List[GeneratedText] = []
        for _ in self._stream_events(prompt_tokens, max_gen_len, temperature, top_p, stop, logprobs, echo, rows):
            pass
        texts = [(self.tokenizer.decode(p) if echo else "") + row.text for p, row in zip(prompt_tokens, rows)]
        return texts, [row.tokens for row in rows], ([row.logprobs for row in rows] if logprobs else None)

    @torch.inference_mode()
    def _stream_events(
        self, prompt_tokens, max_gen_len, temperature, top_p, stop, logprobs=False, echo=False, results=None
    ) -> Iterator[StreamEvent]:
        """Decode in batches of ``max_batch_size``, yielding text events (arguments checked)."""
        batch_size = self.model.params.max_batch_size
        for start in range(0, len(prompt_tokens), batch_size):
            batch = prompt_tokens[start : start + batch_size]
            states = self._decode(batch, max_gen_len, temperature, top_p, logprobs)
            for event in stream_rows(states, self.tokenizer, batch, max_gen_len, stop, echo, results):
                yield event._replace(index=start + event.index)

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
        now; the model runs as the iterator is consumed (on every rank, under torchrun),
        so finish or drop one stream before starting another generation on this model.
        With ``safety_checkers`` (default ``self.safety_checkers``), prompts are checked
        as iteration starts and each reply once finished, *after* its pieces were
        yielded: each row's last event carries a ``llama.safety.SafetyNotice`` (the
        reports; the withdrawal text for an unsafe reply); see ``llama.safety.checked_stream``.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (use stream_text_completion for a single prompt)")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
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
            max_gen_len = self.model.params.max_seq_len - 1
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


class DecodeState:
    """Token buffer of one batch being decoded, and the rows that have ended."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens, max_gen_len, total_len, logprobs, device):
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.max_gen_len = max_gen_len
        bsz = len(prompt_tokens)
        tokens = torch.full((bsz, total_len), tokenizer.pad_id, dtype=torch.long)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
        self.tokens = tokens.to(device)  # (bsz, total_len), pad_id where nothing is yet
        self.input_text_mask = self.tokens != tokenizer.pad_id
        self.token_logprobs = torch.zeros_like(self.tokens, dtype=torch.float) if logprobs else None
        self.stopped = torch.zeros(bsz, dtype=torch.bool, device=device)  # EOS seen, or ended by the caller
        self.cur_pos = min(len(t) for t in prompt_tokens) - 1  # last filled position of every row

    def results(self, echo: bool) -> Tuple[List[List[int]], List[Optional[List[float]]]]:
        """Per row: the tokens (prompt too with ``echo``) cut at ``max_gen_len`` and the first EOS."""
        eos_id = self.tokenizer.eos_id
        all_logprobs = self.token_logprobs.tolist() if self.token_logprobs is not None else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(self.tokens[:, : self.cur_pos + 1].tolist()):
            start = 0 if echo else len(self.prompt_tokens[i])
            end = len(self.prompt_tokens[i]) + self.max_gen_len
            toks = toks[start:end]
            probs = all_logprobs[i][start:end] if all_logprobs is not None else None
            generated = len(self.prompt_tokens[i]) - start  # first generated index in toks
            if eos_id in toks[generated:]:  # an EOS inside an echoed prompt (chat turns) stays
                eos_idx = toks.index(eos_id, generated)
                toks = toks[:eos_idx]
                probs = probs[:eos_idx] if probs is not None else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, out_logprobs


# Inductor settings for the compiled CPU decode step with float weights. Freezing turns the
# weights into constants, which lets max-autotune offer its C++ GEMM template: it packs each
# weight once at compile time into blocks its AVX2/AVX-512 micro-kernel streams, and is chosen
# when it beats MKL/oneDNN (the ATEN choice) in a benchmark run at compile time. On our 2-core
# machines a 110m-shape decode step went from 40 tok/s (oneDNN-packed weights through
# llama::packed_linear) to 50 tok/s at batch 1, and from 150 to 230 tok/s at batch 8.
# No autotuning reports on stderr: the choices are Inductor's business, not the user's.
_CPU_FROZEN_GEMM = {
    "freezing": True,
    "max_autotune_gemm": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def _with_inductor_config(compiled, settings: dict):
    """Call ``compiled`` with Inductor's config patched to ``settings``.

    Why not ``torch.compile(options=...)``: those options reach Inductor only, while Dynamo
    decides at trace time, from the global config, whether parameters become constants
    (freezing) or graph inputs. Tracing happens inside a call (the first one for each
    batch size), so the patch must be active around every call.
    """
    from torch._inductor import config as inductor_config  # imported only by those who compile

    def call(*args):
        with inductor_config.patch(settings), warnings.catch_warnings():
            # Inductor's benchmarking touches TypedStorage, which warns once per process.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return compiled(*args)

    return call


def _with_own_code(method):
    """``method`` (bound) on a copy of its function with a code object of its own.

    Dynamo keys its cache of compiled graphs by code object. Shared by every model, that
    cache would keep each compiled model's graphs (frozen weights included) alive after
    the model is gone, and hit Dynamo's recompile limit (8) after a few models and batch
    sizes in one process. Its own code object gives each model a cache freed with it.
    """
    func = method.__func__
    clone = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    return types.MethodType(clone, method.__self__)


def compile_decode_step(model: Transformer, device: torch.device):
    """``torch.compile`` of ``model.decode_step`` for ``device``.

    CUDA: ``mode="reduce-overhead"`` (CUDA graphs: one launch per token). CPU, one rank,
    float weights: Inductor with frozen weights and its autotuned C++ GEMM kernels
    (``_CPU_FROZEN_GEMM``); the compiled step holds its own packed copy of the linear
    weights, next to the model's dense ones that the eager prefill uses. CPU with
    oneDNN-packed weights (:mod:`llama.packed_linear`, one copy of the weights): the
    products stay oneDNN calls and Inductor fuses the work between them; at model
    parallel > 1, float32 weights are packed here for this path. CPU with int8 weights:
    plain Inductor (freezing would fold the dequantized weights into float constants).
    """
    from .quantize import is_quantized

    single_graph = distributed.model_parallel_world_size() == 1  # collectives break the graph
    step = _with_own_code(model.decode_step)
    if distributed.is_cuda(device):
        return torch.compile(step, mode="reduce-overhead", fullgraph=single_graph, dynamic=False)
    compiled = torch.compile(step, fullgraph=single_graph, dynamic=False)  # traced on first call
    if is_quantized(model) or packed_linear.is_packed(model):
        return compiled
    if not single_graph:
        # Split into several graphs by the collectives, the step decoded wrong tokens with
        # the C++ GEMM kernels (torch 2.13, 2 ranks); oneDNN-packed weights decode right.
        if packed_linear.packing_supported(device, model.tok_embeddings.weight.dtype):
            packed_linear.pack_linear_weights(model)
        return compiled
    return _with_inductor_config(compiled, _CPU_FROZEN_GEMM)
