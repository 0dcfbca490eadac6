"""The model runner: a model, its KV cache and its (optionally compiled) decode step.

The engine (:mod:`llama.engine`) decides *what* runs at each step; the runner runs it:
:meth:`ModelRunner.prefill` puts chunks of prompts into their cache rows in one pass,
:meth:`ModelRunner.decode` feeds one token to each of the first rows of the cache,
each row at its own position. With :meth:`ModelRunner.compile`, decoding goes through
a ``torch.compile``'d graph: on one CPU rank with dense float weights, one graph for every
batch size (the batch size is a symbol, so the step holds one copy of the compiled weights
however many sizes run); elsewhere (CUDA graphs, packed or int8 weights, model parallel)
one static-shape graph per batch size.
Positions are a tensor, so no prompt or generation length ever recompiles it.
"""

import time
import types
import warnings
from typing import List, Optional, Sequence

import torch

from . import distributed, native_step, packed_linear
from .model import KVCache, Segments, Transformer

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


def _own_code(func):
    """A copy of ``func`` (a function, or a bound method) with a code object of its own.

    Dynamo keys its cache of compiled graphs by code object. Shared by every model, that
    cache would keep each compiled model's graphs (frozen weights included) alive after
    the model is gone, and hit Dynamo's recompile limit (8) after a few models and batch
    sizes in one process. Its own code object gives each model a cache freed with it.
    """
    bound_to = getattr(func, "__self__", None)
    func = getattr(func, "__func__", func)
    clone = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    return clone if bound_to is None else types.MethodType(clone, bound_to)


def _any_batch_size(step, max_batch_size: int, tune_for: int):
    """``step(tokens, positions)`` compiled once for every batch size from 1 to ``max_batch_size``.

    The batch dimension is marked *unbacked*: Dynamo neither specializes it nor guards on
    it, so no size (1 included) compiles a second graph, and the CPU step holds one copy
    of the frozen, packed weights instead of one per size. An unbacked size has no value
    at compile time, so Inductor autotunes its GEMMs for ``tune_for`` rows
    (``unbacked_symint_fallback``): on a Zen 5 EPYC (110m shape, float32), kernels tuned
    for 8 rows ran batch 8 1.3x-1.4x as fast as those tuned for 1 row, and batch 1
    0.8x-0.9x as fast.
    """
    def any_batch(tokens, positions):
        # What the KV cache implies but an unbacked size cannot know: at most its rows, one position each.
        torch._check(tokens.shape[0] <= max_batch_size)
        torch._check(positions.shape[0] == tokens.shape[0])
        return step(tokens, positions)

    # dynamic=False: nothing else becomes a symbol. Dynamo's automatic dynamic shapes key on
    # the source line, so a second model with another max_batch_size would turn the bound above
    # into a symbol that no longer bounds the slice of the cache.
    compiled = torch.compile(_own_code(any_batch), fullgraph=True, dynamic=False)

    def call(tokens, positions):
        torch._dynamo.decorators.mark_unbacked(tokens, 0)
        torch._dynamo.decorators.mark_unbacked(positions, 0)
        return compiled(tokens, positions)

    return _with_inductor_config(call, {**_CPU_FROZEN_GEMM, "unbacked_symint_fallback": tune_for})


def compile_decode_step(model: Transformer, device: torch.device, max_batch_size: int, tune_for: int):
    """``torch.compile`` of ``model.decode_step`` for ``device``, called as ``step(tokens, positions)``;
    returns ``(step, any_batch_size)``: whether one graph serves every batch size.

    CUDA: ``mode="reduce-overhead"`` (CUDA graphs: one launch per token, a graph per
    batch size). CPU, one rank, float weights: Inductor with frozen weights and its
    autotuned C++ GEMM kernels (``_CPU_FROZEN_GEMM``), one graph for any batch size
    (:func:`_any_batch_size`, tuned for ``tune_for`` rows); the compiled step holds one
    packed copy of the dense layers' weights, next to the model's dense ones that the eager
    prefill uses. Layers on the ``gemv`` kernel call it as the operator ``llama::gemv_linear``
    and the native decode attention is ``llama::decode_attention``: no copy for them. CPU with
    oneDNN-packed weights (:mod:`llama.packed_linear`, one copy of the weights): the
    products stay oneDNN calls and Inductor fuses the work between them; at model
    parallel > 1, float32 weights are packed here for this path. CPU with int8 weights:
    plain Inductor (freezing would fold the dequantized weights into float constants).
    """
    from .quantize import is_quantized

    single_graph = distributed.model_parallel_world_size() == 1  # collectives break the graph
    if distributed.is_cuda(device):
        return torch.compile(_own_code(model.decode_step), mode="reduce-overhead", fullgraph=single_graph, dynamic=False), False
    dense_float = not (is_quantized(model) or packed_linear.is_packed(model))
    if single_graph and dense_float:
        return _any_batch_size(model.decode_step, max_batch_size, tune_for), True
    if not single_graph and dense_float:
        # Split into several graphs by the collectives, the step decoded wrong tokens with
        # the C++ GEMM kernels (torch 2.13, 2 ranks); oneDNN-packed weights decode right.
        if packed_linear.packing_supported(device, model.tok_embeddings.weight.dtype):
            packed_linear.pack_linear_weights(model)
    return torch.compile(_own_code(model.decode_step), fullgraph=single_graph, dynamic=False), False  # traced on first call


class ModelRunner:
    """Runs ``model`` over a KV cache of ``max_batch_size`` rows (slots) of ``max_seq_len`` positions.

    The cache is allocated here and handed to the model (``model.cache``), so the
    reference's ``model.forward(tokens, start_pos)`` uses the same memory.
    """

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        if max_seq_len > model.rope_cos.shape[0]:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's RoPE tables ({model.rope_cos.shape[0]})")
        cache = model.cache
        if cache is None or (cache.max_batch_size, cache.max_seq_len) != (max_batch_size, max_seq_len):
            model.cache = None  # free the old one first
            dtype = model.norm.weight.dtype
            model.cache = KVCache(model.params, max_batch_size, max_seq_len, self.device, dtype)
        self._decode_step = None  # compiled one-token step, see compile()
        # the eager step in one native call (llama.native_step), for the kernel plan and cache it was made for
        self._native: Optional[native_step.NativeStep] = None
        self._native_for: Optional[tuple] = None
        self.any_batch_size = False  # whether _decode_step is one graph for every batch size
        self.compiled_batch_sizes: List[int] = []  # batch sizes _decode_step has run (a graph each unless any_batch_size)

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], segments: Segments, logit_index: Optional[Sequence[int]]) -> torch.Tensor:
        """Chunks of prompts (flattened ``tokens``, laid out by ``segments``) into their cache
        rows in one pass; float32 logits at the flattened indices ``logit_index`` (all if None)."""
        t = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        index = None if logit_index is None else torch.tensor(logit_index, dtype=torch.long).to(self.device)
        return self.model.prefill(t, segments, index)

    def step_batch_size(self, n: int) -> int:
        """The batch size a decode of cache rows ``0..n-1`` runs at: ``n`` eager or with one
        graph for every size; else the smallest compiled size that fits, else the next power
        of two (at most ``max_batch_size``), compiled on first use: as rows come and go, at
        most a few graphs are ever made."""
        if self._decode_step is None or self.any_batch_size:
            return n
        fits = [size for size in self.compiled_batch_sizes if size >= n]
        if fits:
            return min(fits)
        return min(self.max_batch_size, 1 << (n - 1).bit_length())

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One token for each of cache rows ``0..len(tokens)-1``, row ``i`` at ``positions[i]``.

        ``positions`` covers at least :meth:`step_batch_size` rows: rows past
        ``len(tokens)`` (run as padding of a compiled size) get token 0 at their given
        position, which the caller picks where a write is harmless (a row's next
        position, written again before it is read). Returns float32 logits (len(tokens), vocab).
        """
        n = len(tokens)
        step = self._row_decoder(n)
        if step is not None:  # the whole step in one native call (compiled or not)
            return step(tokens, positions)
        size = self.step_batch_size(n)
        padded = list(tokens) + [0] * (size - n)
        t = torch.tensor(padded, dtype=torch.long)[:, None].to(self.device, non_blocking=True)  # (size, 1)
        pos = torch.tensor(positions[:size], dtype=torch.long).to(self.device, non_blocking=True)
        if self._decode_step is None:
            first = positions[0]
            if all(p == first for p in positions[:size]):  # the common case: a slice write, no mask
                return self.model.decode_step(t, pos, same_position=first)
            return self.model.decode_step(t, pos, kv_len=max(positions[:size]) + 1)
        if size not in self.compiled_batch_sizes:
            self.compiled_batch_sizes.append(size)
        return self._decode_step(t, pos)[:n]

    def _row_decoder(self, n: int) -> Optional[native_step.NativeStep]:
        """The one-call step where it takes ``n`` tokens, else None."""
        step = self.native_decoder() if self.device.type == "cpu" else None
        return step if step is not None and 0 < n <= step.rows else None

    def decodes_rows(self, n: int) -> bool:
        """Whether :meth:`decode_rows` takes ``n`` tokens: the step is one native call, which reads any cache rows."""
        return self._row_decoder(n) is not None

    @torch.inference_mode()
    def decode_rows(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """One token for each of the distinct cache ``rows`` (``tokens[i]`` at ``positions[i]`` of row
        ``rows[i]``), whichever rows they are, where :meth:`decodes_rows` says so; float32 logits
        (len(tokens), vocab). The engine skips the rows in front of the last decoding one that are
        free or still prefilling, which :meth:`decode` must run too."""
        step = self._row_decoder(len(tokens))
        if step is None:
            raise ValueError(f"this model's decode step cannot take {len(tokens)} rows of its own choice")
        return step(tokens, positions, rows)

    def native_decoder(self) -> Optional[native_step.NativeStep]:
        """The eager decode step in one native call (:mod:`llama.native_step`) where the model can
        take it (:func:`llama.native_step.why_not`), else None; made again when the model's kernel
        plan, cache or weight tensors change."""
        wanted = (getattr(self.model, "kernel_plan", None), self.model.cache)
        stale = self._native is not None and not self._native.current(self.model)
        if stale or self._native_for is None or any(a is not b for a, b in zip(wanted, self._native_for)):
            self._native_for = wanted
            self._native = native_step.NativeStep.for_model(self.model)
        return self._native

    def compile(self, warmup_batch_sizes: Sequence[int] = (1,)) -> float:
        """Compile the decode step and warm it up for each batch size; returns the seconds taken.

        Where the eager step is one native call (:meth:`native_decoder`), steps of up to its rows
        stay so: there is nothing between our kernels for Inductor to fuse, and a graph would call
        them through the dispatcher. A graph is compiled only for a cache of more rows than that,
        and serves (and is warmed up for) the larger batch sizes.

        Where one graph serves every batch size (:func:`_any_batch_size`), the first compile
        tunes its kernels for the largest warm-up size. The warm-up writes position 0 of the
        first rows of the cache: call it while no sequence is in flight (a later prefill
        rewrites position 0 of any row it uses).
        """
        start = time.time()
        for bsz in warmup_batch_sizes:
            if not 1 <= bsz <= self.max_batch_size:
                raise ValueError(f"warm-up batch size {bsz} is not within 1..max_batch_size={self.max_batch_size}")
        native = self.native_decoder() if self.device.type == "cpu" else None
        if native is not None:
            if self.max_batch_size <= native.rows:
                return time.time() - start
            warmup_batch_sizes = [bsz for bsz in warmup_batch_sizes if bsz > native.rows]
        if self._decode_step is None:
            tune_for = max(warmup_batch_sizes, default=1)
            self._decode_step, self.any_batch_size = compile_decode_step(self.model, self.device, self.max_batch_size, tune_for)
        with torch.inference_mode():
            for bsz in warmup_batch_sizes:
                if bsz not in self.compiled_batch_sizes:
                    self.compiled_batch_sizes.append(bsz)
                tokens = torch.zeros(bsz, 1, dtype=torch.long, device=self.device)
                positions = torch.zeros(bsz, dtype=torch.long, device=self.device)
                for _ in range(2):  # the second call records the CUDA graph
                    self._decode_step(tokens, positions)
        return time.time() - start

    @property
    def compiled(self) -> bool:
        return self._decode_step is not None
