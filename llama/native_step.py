"""A whole decode step in one native call, for a model that runs our kernels everywhere.

Where every piece of the decode step runs our kernels (``gemv`` for every linear layer, or
``int8-gemv`` for every one, and ``native-attention``), the step no longer needs torch between
them: ``decode_step.cpp`` runs the same kernels, stage by stage, in one parallel region (one
call instead of ~30 operators per layer; see its header for the measurements). A model gets
there when :mod:`llama.kernel_choice` measured our kernels fastest for every piece, or where
it measured the whole step faster so even though another kernel is faster per call for a
shape (:func:`llama.kernel_choice.prefer_one_call_step`, with :func:`step_overheads`).
:func:`why_not` says why a model cannot take it (a CPU without the kernels, another kernel
chosen somewhere, model parallel, ...); :class:`NativeStep` binds one to a model and its KV
cache. The model runner (:mod:`llama.runner`) uses it for eager decode steps of up to
:data:`llama.native.MAX_STEP_ROWS` rows; ``LLAMA_NATIVE_STEP=0`` in the environment turns it
off (every step through the model's modules, with the same kernels).

The results are the model's (``Transformer.decode_step``) within the dtype's rounding: the
C++ rounds where torch rounds, but its sums run in another order.
"""

import ctypes
import os
import time
from typing import List, Optional, Sequence, Set, Tuple

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


def _int8(kernels: Set[str]) -> bool:
    return "int8-gemv" in kernels


def _kernels(model: Transformer) -> Set[str]:
    """The kernels of the model's linear layers (:data:`llama.linear_kernels.KERNELS` names)."""
    return {linear_kernels.name_of(layer.kernel) for _, layer in linear_layers(model)}


def sizes_allow(dtype: torch.dtype, int8: bool, in_features: Sequence[int], head_dim: int) -> str:
    """'' if the kernels' steps divide these sizes (the linear layers' inner sizes, the head size), else why not."""
    entry = native._ENTRIES.get(dtype)
    # int8 products take inner sizes in steps of 64; their attention and norms need the head size in steps of
    # the AVX-512 float kernels' (16 float32, 32 bfloat16; AVX2's 8 and 16 divide them); float weights: the dtype's step
    step, head_step = (native.INT8_STEP, 16 if dtype == torch.float32 else 32) if int8 else ((entry.step,) * 2 if entry else (0, 0))
    if not step or any(k % step for k in in_features) or head_dim % head_step:
        return (f"its sizes (inner sizes {sorted(set(in_features))}, head size {head_dim}) are not multiples of the "
                f"kernels' steps ({step} and {head_step})")
    return ""


def plan_allows(dtype: torch.dtype, int8: bool, kernels: Set[str], attention: Optional[str], world: int = 1,
                in_features: Sequence[int] = (), head_dim: Optional[int] = None) -> str:
    """'' if a model with these kernel picks (its linear layers' ``kernels``, its decode ``attention``)
    and sizes would take the one-call step, else why not: the part of :func:`why_not` that a kernel
    plan decides (:func:`llama.kernel_choice.prefer_one_call_step` asks it too)."""
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
    return sizes_allow(dtype, int8, in_features, head_dim) if head_dim is not None else ""


def describe(why: str) -> str:
    """What a decode step runs, from :func:`why_not` or :func:`plan_allows`: for reports."""
    return "one native call (llama/native_step.py)" if not why else f"the model's modules ({why})"


def _bound_tensors(model: Transformer, int8: bool) -> List[Tuple[str, torch.Tensor, Optional[torch.dtype]]]:
    """(what, tensor, the dtype it must have or None for the model's) of every tensor the step reads or writes."""
    f32 = torch.float32
    out = [("embedding", model.tok_embeddings.weight, None), ("norm", model.norm.weight, None),
           ("output", model.output.weight, torch.int8 if int8 else None), ("rope_cos", model.rope_cos, f32),
           ("rope_sin", model.rope_sin, f32)]
    if int8:
        out.append(("output scales", model.output.scales, f32))
    for i, (block, layer_cache) in enumerate(zip(model.layers, model.cache.layers)):
        out += [(f"layer {i} attention_norm", block.attention_norm.weight, None), (f"layer {i} ffn_norm", block.ffn_norm.weight, None),
                (f"layer {i} cache_k", layer_cache.cache_k, None), (f"layer {i} cache_v", layer_cache.cache_v, None)]
        for name, p in zip(_PROJECTIONS, _projections(block)):
            out.append((f"layer {i} {name}", p.weight, torch.int8 if int8 else None))
            if int8:
                out.append((f"layer {i} {name} scales", p.scales, f32))
    return out


def why_not(model: Transformer) -> str:
    """'' if :class:`NativeStep` can run ``model``'s decode steps, else why not."""
    weight = model.tok_embeddings.weight
    dtype = weight.dtype
    if weight.device.type != "cpu":
        return "not on the CPU"
    cache = model.cache
    if cache is None:
        return "no KV cache"
    layers = [layer for _, layer in linear_layers(model)]
    kernels = {linear_kernels.name_of(layer.kernel) for layer in layers}
    int8 = _int8(kernels)
    attention = {block.attention.decode_attention for block in model.layers}
    params = model.params
    in_features = [layer.weight.shape[1] for layer in layers]
    why = plan_allows(dtype, int8, kernels, attention.pop() if len(attention) == 1 else "mixed",
                      distributed.model_parallel_world_size(), in_features, params.head_dim)
    if why:
        return why
    if len(cache.layers) != params.n_layers:
        return "its KV cache has another number of layers"
    shape = (cache.max_batch_size, params.kv_heads, cache.max_seq_len, params.head_dim)
    if any(tuple(layer.cache_k.shape) != shape or tuple(layer.cache_v.shape) != shape for layer in cache.layers):
        return f"its KV cache is not {shape} per layer"
    if tuple(model.rope_cos.shape) != tuple(model.rope_sin.shape) or model.rope_cos.shape[0] < cache.max_seq_len \
            or model.rope_cos.shape[1] != params.head_dim // 2:
        return f"its RoPE tables do not cover the cache's {cache.max_seq_len} positions of head size {params.head_dim}"
    if tuple(weight.shape) != (params.vocab_size, params.dim):
        return "its embedding is not (vocab_size, dim)"
    for what, t, want in _bound_tensors(model, int8):
        if t.dtype != (want or dtype):
            return f"its {what} is {t.dtype}, not {want or dtype}"
        if not t.is_contiguous() or t.device.type != "cpu":
            return f"its {what} is not a contiguous CPU tensor"
    return ""


class NativeStep:
    """``model``'s decode step (:meth:`llama.model.Transformer.decode_step`) in one native call,
    over ``model.cache``. Build with :meth:`for_model` (which checks :func:`why_not`); call with
    tokens and positions."""

    def __init__(self, model: Transformer, entry):
        params, cache = model.params, model.cache
        self.model, self.cache, self.entry = model, cache, entry
        self.int8 = _int8(_kernels(model))
        self.vocab, self.max_seq_len = params.vocab_size, cache.max_seq_len
        self.rows = min(cache.max_batch_size, native.MAX_STEP_ROWS)  # tokens per call, each in a cache row of its own
        self.plan = getattr(model, "kernel_plan", None)
        bound = _bound_tensors(model, self.int8)
        # The tensors (their storage: a detached view keeps it alive even if a parameter's .data is
        # replaced) and the addresses the structs hold; current() checks both.
        self._objects = [t for _, t, _ in bound]
        self._keep = [t.detach() for t in self._objects]
        self._addresses = [t.data_ptr() for t in self._keep]
        self._spots = self._spot_check(model)
        ptr = {what: t.data_ptr() for what, t, _ in bound}

        layers = (_Layer * params.n_layers)()
        for i in range(params.n_layers):
            fields = {name: ptr[f"layer {i} {name}"] for name in _PROJECTIONS}
            if self.int8:
                fields.update({"s" + name[1:]: ptr[f"layer {i} {name} scales"] for name in _PROJECTIONS})  # wq -> sq, ...
            layers[i] = _Layer(attention_norm=ptr[f"layer {i} attention_norm"], ffn_norm=ptr[f"layer {i} ffn_norm"],
                               cache_k=ptr[f"layer {i} cache_k"], cache_v=ptr[f"layer {i} cache_v"], **fields)
        self._layers = layers
        self._struct = _Model(
            dim=params.dim, hidden=params.ffn_hidden_dim, heads=params.n_heads, kv_heads=params.kv_heads,
            head_dim=params.head_dim, vocab=params.vocab_size, n_layers=params.n_layers, max_seq_len=cache.max_seq_len,
            eps=params.norm_eps, embedding=ptr["embedding"], norm=ptr["norm"], output=ptr["output"],
            output_scales=ptr.get("output scales"), rope_cos=ptr["rope_cos"], rope_sin=ptr["rope_sin"],
            layers=ctypes.cast(layers, ctypes.c_void_p),
        )

    @classmethod
    def for_model(cls, model: Transformer) -> Optional["NativeStep"]:
        """A native step for ``model`` and its current cache, or None where :func:`why_not` says no."""
        if why_not(model):
            return None
        return cls(model, native.decode_step_entry(model.tok_embeddings.weight.dtype, _int8(_kernels(model))))

    def current(self, model: Transformer) -> bool:
        """Whether this step still reads ``model`` as it is: the same cache and kernel plan
        (:func:`llama.kernel_choice.apply` of a new plan may change the weights' layouts), every
        tensor it was bound to still at its address (``.to()`` of a submodule, or assigning a
        parameter's ``.data``, moves it), and, spot checked, the same tensors in the model
        (``load_state_dict(..., assign=True)`` replaces them all)."""
        return (
            model is self.model and model.cache is self.cache and getattr(model, "kernel_plan", None) is self.plan
            and all(t.data_ptr() == a for t, a in zip(self._objects, self._addresses))
            and self._spots == self._spot_check(model)
        )

    @staticmethod
    def _spot_check(model: Transformer) -> tuple:
        first, last = model.layers[0], model.layers[-1]
        return tuple(id(t) for t in (model.tok_embeddings.weight, model.output.weight, first.attention.wq.weight,
                                     last.feed_forward.w2.weight))

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Float32 logits (len(tokens), vocab) for one token per cache row, token ``i`` at
        ``positions[i]`` of cache row ``rows[i]`` (distinct rows; default ``0..len(tokens)-1``), as
        :meth:`llama.model.Transformer.decode_step` computes them for rows ``0..len(tokens)-1``."""
        n = len(tokens)
        if not 0 < n <= self.rows or len(positions) < n:
            raise ValueError(f"the native decode step takes 1..{self.rows} rows with a position each, got {n}")
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {list(tokens)}")
        if min(positions[:n]) < 0 or max(positions[:n]) >= self.max_seq_len:
            raise ValueError(f"positions must be in 0..{self.max_seq_len - 1}, got {list(positions[:n])}")
        row_array = None
        if rows is not None:
            if len(rows) != n or len(set(rows)) != n or min(rows) < 0 or max(rows) >= self.cache.max_batch_size:
                raise ValueError(f"rows must be {n} distinct cache rows in 0..{self.cache.max_batch_size - 1}, got {list(rows)}")
            row_array = (ctypes.c_int64 * n)(*rows)
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        status = self.entry(ctypes.byref(self._struct), (ctypes.c_int64 * n)(*tokens), (ctypes.c_int64 * n)(*positions[:n]),
                            row_array, n, logits.data_ptr(), torch.get_num_threads())
        if status:
            raise ValueError(f"the native decode step refused {n} rows")
        return logits


def step_overheads(n_layers: int, dtype: torch.dtype, int8: bool, batches: Sequence[int], rounds: int = 5,
                   steps: int = 8) -> Tuple[dict, float]:
    """Milliseconds per decode step that are not the products' own, for an ``n_layers`` model at each
    batch size: ``({b: (through the modules, one native call)}, cpu_share)``.

    Timed on a model of ``n_layers`` layers too small for its weights to cost anything (dim 64,
    one head), with our kernels everywhere: what is left of a step is the cost of running it,
    torch operators and Python for the modules, the stages' barriers for the one call.
    :func:`llama.kernel_choice.prefer_one_call_step` adds it to the products' measured times to
    choose between the two ways. Interleaved rounds, the best of each. ``cpu_share``: CPU time over
    wall time times threads during the one-call steps, whose threads all spin at every barrier:
    below 1 where other work took the cores.
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
    model.use_decode_attention("native-attention")
    one_call = NativeStep(model, native.decode_step_entry(dtype, int8))
    best = {b: [float("inf"), float("inf")] for b in batches}
    wall, cpu = 0.0, 0.0
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up
            for b in batches:
                tokens = [1] * b
                for way in (0, 1):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for i in range(steps):
                        if way == 0:  # what the runner does for rows at one position
                            t = torch.tensor(tokens)[:, None]
                            model.decode_step(t, torch.full((b,), i, dtype=torch.long), same_position=i)
                        else:
                            one_call(tokens, [i] * b)
                    elapsed = time.perf_counter() - start
                    if round_:
                        best[b][way] = min(best[b][way], elapsed / steps * 1000)
                        if way == 1:
                            wall, cpu = wall + elapsed, cpu + time.process_time() - start_cpu
    share = cpu / max(wall * torch.get_num_threads(), 1e-9)
    return {b: tuple(round(t, 4) for t in best[b]) for b in batches}, share
