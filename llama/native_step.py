"""A whole decode step in one native call, for a model that runs our kernels everywhere.

Where :mod:`llama.kernel_choice` measured our kernels fastest for every piece of the decode
step on this machine (``gemv`` for every linear layer, or ``int8-gemv`` for every one, and
``native-attention``), the step no longer needs torch between them: ``decode_step.cpp`` runs
the same kernels, stage by stage, in one parallel region (one call instead of ~30 operators
per layer; see its header for the measurements). :func:`why_not` says why a model cannot
take it (a CPU without the kernels, another kernel chosen somewhere, model parallel, ...);
:class:`NativeStep` binds one to a model and its KV cache. The model runner
(:mod:`llama.runner`) uses it for eager decode steps of up to :data:`llama.native.MAX_ROWS`
rows; ``LLAMA_NATIVE_STEP=0`` in the environment turns it off (every step through the model's
modules, with the same kernels).

The results are the model's (``Transformer.decode_step``) within the dtype's rounding: the
C++ rounds where torch rounds, but its sums run in another order.
"""

import ctypes
import os
import time
from typing import List, Optional, Sequence, Set

import torch

from . import distributed, linear_kernels, native
from .model import ModelArgs, Transformer
from .parallel_layers import linear_layers
from .quantize import quantize_model

ENV = "LLAMA_NATIVE_STEP"


class _Layer(ctypes.Structure):  # StepLayer in llama/csrc/decode_step.cpp
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "attention_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
        "sq", "sk", "sv", "so", "s1", "s2", "s3", "cache_k", "cache_v",
    )]


class _Model(ctypes.Structure):  # StepModel in llama/csrc/decode_step.cpp
    _fields_ = [(name, ctypes.c_int64) for name in (
        "dim", "hidden", "heads", "kv_heads", "head_dim", "vocab", "n_layers", "max_seq_len",
    )] + [("eps", ctypes.c_float)] + [(name, ctypes.c_void_p) for name in (
        "embedding", "norm", "output", "output_scales", "rope_cos", "rope_sin", "layers",
    )]


_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _projections(block) -> List[torch.nn.Module]:
    attention, ffn = block.attention, block.feed_forward
    return [attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w2, ffn.w3]


def plan_allows(dtype: torch.dtype, int8: bool, kernels: Set[str], attention: Optional[str], world: int = 1) -> str:
    """'' if a model with these kernel picks (its linear layers' ``kernels``, its decode ``attention``)
    would take the one-call step, else why not: the part of :func:`why_not` a kernel plan decides."""
    if os.environ.get(ENV, "1") == "0":
        return f"turned off ({ENV}=0)"
    if world != 1:
        return "model parallel: the ranks exchange activations between the products"
    want = "int8-gemv" if int8 else "gemv"
    if set(kernels) != {want}:
        return f"its linear layers run {', '.join(sorted(kernels))}, not all {want}"
    if attention != "native-attention":
        return f"its decode attention is {attention}, not native-attention"
    if native.decode_step_entry(dtype, int8) is None:
        return f"no native decode step for {dtype} with {'int8' if int8 else 'float'} weights on this CPU"
    return ""


def describe(why: str) -> str:
    """What a decode step runs, from :func:`why_not` or :func:`plan_allows`: for reports."""
    return "one native call (llama/native_step.py)" if not why else f"the model's modules ({why})"


def why_not(model: Transformer) -> str:
    """'' if :class:`NativeStep` can run ``model``'s decode steps, else why not."""
    weight = model.tok_embeddings.weight
    dtype = weight.dtype
    if weight.device.type != "cpu":
        return "not on the CPU"
    if model.cache is None:
        return "no KV cache"
    kernels = {linear_kernels.name_of(layer.kernel) for _, layer in linear_layers(model)}
    int8 = "int8-gemv" in kernels
    attention = {block.attention.decode_attention for block in model.layers}
    why = plan_allows(dtype, int8, kernels, attention.pop() if len(attention) == 1 else "mixed",
                      distributed.model_parallel_world_size())
    if why:
        return why
    params = model.params
    # inner sizes: multiples of the products' step; head size: of the attention's (int8: 32, its widest)
    step, head_step = (native.INT8_STEP, 32) if int8 else (native._ENTRIES[dtype].step,) * 2
    if params.dim % step or params.ffn_hidden_dim % step or params.head_dim % head_step:
        return (f"its sizes (dim {params.dim}, hidden {params.ffn_hidden_dim}, head size {params.head_dim}) are not "
                f"multiples of the kernels' steps ({step}, head size {head_step})")
    tensors = [model.norm.weight, model.output.weight, model.rope_cos, model.rope_sin]
    for block in model.layers:
        tensors += [block.attention_norm.weight, block.ffn_norm.weight, *(p.weight for p in _projections(block))]
        if int8:
            tensors += [p.scales for p in _projections(block)]
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        return "a weight is not contiguous"
    floats = [model.norm.weight, *(b.attention_norm.weight for b in model.layers), *(b.ffn_norm.weight for b in model.layers)]
    if any(t.dtype != dtype for t in floats) or (not int8 and any(p.weight.dtype != dtype for b in model.layers for p in _projections(b))):
        return "its weights are not all in one dtype"
    if int8 and any(p.scales.dtype != torch.float32 for b in model.layers for p in [*_projections(b), model.output]):
        return "its int8 scales are not float32"
    if model.rope_cos.dtype != torch.float32:
        return "its RoPE tables are not float32"
    return ""


class NativeStep:
    """``model``'s decode step (:meth:`llama.model.Transformer.decode_step`) in one native call,
    over ``model.cache``. Build with :meth:`for_model`; call with tokens and positions."""

    def __init__(self, model: Transformer, entry):
        params, cache = model.params, model.cache
        self.model, self.cache, self.entry = model, cache, entry
        self.int8 = linear_kernels.name_of(model.output.kernel) == "int8-gemv"
        self.vocab, self.max_seq_len, self.rows = params.vocab_size, cache.max_seq_len, min(cache.max_batch_size, native.MAX_ROWS)
        self.plan = getattr(model, "kernel_plan", None)
        self._spots = self._spot_check(model)
        self._keep: List[torch.Tensor] = []  # every tensor whose address the structs hold

        def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
            if t is None:
                return None
            self._keep.append(t)
            return t.data_ptr()

        def scales(layer) -> Optional[int]:
            return ptr(layer.scales) if self.int8 else None

        layers = (_Layer * params.n_layers)()
        for i, (block, layer_cache) in enumerate(zip(model.layers, cache.layers)):
            projections = _projections(block)
            fields = dict(zip(_PROJECTIONS, (ptr(p.weight) for p in projections)))
            fields.update(zip(("sq", "sk", "sv", "so", "s1", "s2", "s3"), (scales(p) for p in projections)))
            layers[i] = _Layer(attention_norm=ptr(block.attention_norm.weight), ffn_norm=ptr(block.ffn_norm.weight),
                               cache_k=ptr(layer_cache.cache_k), cache_v=ptr(layer_cache.cache_v), **fields)
        self._layers = layers
        self._struct = _Model(
            dim=params.dim, hidden=params.ffn_hidden_dim, heads=params.n_heads, kv_heads=params.kv_heads,
            head_dim=params.head_dim, vocab=params.vocab_size, n_layers=params.n_layers, max_seq_len=cache.max_seq_len,
            eps=params.norm_eps, embedding=ptr(model.tok_embeddings.weight), norm=ptr(model.norm.weight),
            output=ptr(model.output.weight), output_scales=scales(model.output), rope_cos=ptr(model.rope_cos),
            rope_sin=ptr(model.rope_sin), layers=ctypes.cast(layers, ctypes.c_void_p),
        )

    @classmethod
    def for_model(cls, model: Transformer) -> Optional["NativeStep"]:
        """A native step for ``model`` and its current cache, or None where :func:`why_not` says no."""
        if why_not(model):
            return None
        int8 = linear_kernels.name_of(model.output.kernel) == "int8-gemv"
        return cls(model, native.decode_step_entry(model.tok_embeddings.weight.dtype, int8))

    def current(self, model: Transformer) -> bool:
        """Whether this step still reads ``model`` as it is: the same cache, the same kernel plan
        (:func:`llama.kernel_choice.apply` of a new plan may change the weights' layouts) and, spot
        checked, the same weight tensors (``load_state_dict(..., assign=True)`` replaces them all)."""
        return (
            model is self.model and model.cache is self.cache and getattr(model, "kernel_plan", None) is self.plan
            and self._spots == self._spot_check(model)
        )

    @staticmethod
    def _spot_check(model: Transformer) -> tuple:
        first, last = model.layers[0], model.layers[-1]
        return tuple(t.data_ptr() for t in (model.tok_embeddings.weight, model.output.weight,
                                             first.attention.wq.weight, last.feed_forward.w2.weight))

    def __call__(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Float32 logits (len(tokens), vocab) for one token per cache row ``0..len(tokens)-1``,
        row ``i``'s at ``positions[i]`` (as :meth:`llama.model.Transformer.decode_step`)."""
        n = len(tokens)
        if not 0 < n <= self.rows or len(positions) < n:
            raise ValueError(f"the native decode step takes 1..{self.rows} rows with a position each, got {n}")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {list(tokens)}")
        if min(positions[:n]) < 0 or max(positions[:n]) >= self.max_seq_len:
            raise ValueError(f"positions must be in 0..{self.max_seq_len - 1}, got {list(positions[:n])}")
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        self.entry(ctypes.byref(self._struct), (ctypes.c_int64 * n)(*tokens), (ctypes.c_int64 * n)(*positions[:n]), n,
                   logits.data_ptr(), torch.get_num_threads())
        return logits


def step_overheads(n_layers: int, dtype: torch.dtype, int8: bool, batches: Sequence[int], rounds: int = 5,
                   steps: int = 8) -> dict:
    """Milliseconds per decode step that are not the products' own, for an ``n_layers`` model at each
    batch size: ``{b: (through the modules, one native call)}``.

    Timed on a model of ``n_layers`` layers too small for its weights to cost anything (dim 64,
    one head), with our kernels everywhere: what is left of a step is the cost of running it,
    torch operators and Python for the modules, the stages' barriers for the one call.
    :func:`llama.kernel_choice.prefer_one_call_step` adds it to the products' measured times to
    choose between the two ways. Interleaved rounds, the best of each.
    """
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=1, multiple_of=64, vocab_size=64, max_seq_len=32,
                     max_batch_size=max(batches))
    gen = torch.Generator().manual_seed(0)
    model = Transformer(args, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if int8:
        model = quantize_model(model, "int8")
    for _, layer in linear_layers(model):
        if int8:
            layer.set_weight(layer.weight, layer.scales.float(), linear_kernels.int8_gemv)
        else:
            layer.set_weight(layer.weight.data, kernel=linear_kernels.gemv)
    for block in model.layers:
        block.attention.decode_attention = "native-attention"
        block.attention_norm.fused = block.ffn_norm.fused = True
    model.norm.fused = True
    one_call = NativeStep(model, native.decode_step_entry(dtype, int8))
    best = {b: [float("inf"), float("inf")] for b in batches}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up
            for b in batches:
                tokens = [1] * b
                for way in (0, 1):
                    start = time.perf_counter()
                    for i in range(steps):
                        if way == 0:  # what the runner does for rows at one position
                            t = torch.tensor(tokens)[:, None]
                            model.decode_step(t, torch.full((b,), i, dtype=torch.long), same_position=i)
                        else:
                            one_call(tokens, [i] * b)
                    if round_:
                        best[b][way] = min(best[b][way], (time.perf_counter() - start) / steps * 1000)
    return {b: tuple(round(t, 4) for t in best[b]) for b in batches}
