"""The Llama 2 transformer (Touvron et al., 2023), on fairscale model-parallel layers.

Pre-normalisation with RMSNorm, rotary position embeddings (RoPE), grouped-query
attention and a SwiGLU feed-forward block. Attribute names match the keys of
Meta's ``consolidated.NN.pth`` shards, so loading is a strict ``load_state_dict``.
The KV cache (:class:`KVCache`) is preallocated for ``max_batch_size x max_seq_len``
and passed to the layers: each of its rows holds one sequence at its own position.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, linear_kernels, native
from .parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, project


@dataclass
class ModelArgs:
    """Model hyper-parameters: the keys of ``params.json``, plus the reference's default
    cache sizes (``max_batch_size``, ``max_seq_len``), kept so that code written for the
    reference that builds ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)`` runs."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: taken from the tokenizer at build time
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Code Llama uses 1e6

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or isinstance(self.n_kv_heads, bool) or self.n_kv_heads < 1
        ):
            raise ValueError(f"n_kv_heads must be a positive integer or absent, got {self.n_kv_heads!r}")
        if not isinstance(self.vocab_size, int) or (self.vocab_size < 1 and self.vocab_size != -1):
            raise ValueError(f"vocab_size must be a positive integer or -1 (from the tokenizer), got {self.vocab_size!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head dimension dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ffn_dim_multiplier must be positive or absent, got {self.ffn_dim_multiplier!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_json(cls, path: Union[str, Path], **overrides) -> "ModelArgs":
        """Read ``params.json``; unknown keys are an error naming them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint directory must contain params.json")
        try:
            params = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(params).__name__}")
        return cls.from_dict(params, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, params: dict, source: str = "params", **overrides) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{source} has unknown keys {unknown}; known keys are {sorted(known)} "
                "(is this a Llama 2 checkpoint in Meta's format?)"
            )
        return cls(**{**params, **overrides})

    def valid_model_parallel_sizes(self, limit: int = 64) -> list:
        """World sizes this model can be split over (heads, dims and vocabulary must divide)."""
        sizes = []
        for n in range(1, limit + 1):
            if (
                self.n_heads % n == 0
                and self.dim % n == 0
                and self.ffn_hidden_dim % n == 0
                and (self.vocab_size < 1 or self.vocab_size % n == 0)
                and (self.kv_heads % n == 0 or n % self.kv_heads == 0)
            ):
                sizes.append(n)
        return sizes

    def check_model_parallel_size(self, world_size: int) -> None:
        if world_size not in self.valid_model_parallel_sizes(limit=max(64, world_size)):
            raise ValueError(
                f"this model cannot be split over {world_size} model-parallel ranks "
                f"(n_heads={self.n_heads}, n_kv_heads={self.kv_heads}, dim={self.dim}, "
                f"ffn hidden={self.ffn_hidden_dim}, vocab_size={self.vocab_size}); "
                f"sizes that work: {self.valid_model_parallel_sizes()}"
            )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.fused = False  # in one native call (llama.native.rms_norm); set by Transformer.use_decode_attention

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and native.norms(x, self.weight):  # the same math in one call: llama/csrc/norm_rope.cpp
            return native.rms_norm(x, self.weight, self.eps)
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(head_dim: int, end: int, theta: float = 10000.0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles m * theta^(-2i/d), each (end, head_dim/2), float32.

    The same angles as the reference's complex ``freqs_cis`` (cos + i sin), kept as two
    real tables so that every decode step is a few multiply-adds, not a complex round trip.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x by its position's angle.

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (bsz or 1, seqlen, head_dim/2), the
    angles of each token's own position (rows of a batch may sit at different positions).
    Meta's layout pairs adjacent features (Hugging Face's permutes them into halves).
    ``fused``: in one native call (:func:`llama.native.rope`), where it applies.
    """
    if fused and native.ropes(x, cos, sin):  # the same math in one call: llama/csrc/norm_rope.cpp
        return native.rope(x, cos, sin)
    # (bsz, seqlen, heads, head_dim) -> (bsz, seqlen, heads, head_dim/2, 2)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[:, :, None, :]  # broadcast over heads
    sin = sin[:, :, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class LayerCache(nn.Module):
    """One layer's keys and values: (max_batch_size, n_local_kv_heads, max_seq_len, head_dim) each.

    The layout attention reads directly, so a step copies nothing but the new tokens'
    keys and values. Row ``i`` (a *slot*) holds one sequence; its positions need not
    line up with any other row's.
    """

    def __init__(self, shape: Tuple[int, int, int, int], device, dtype):
        super().__init__()
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)


class KVCache(nn.Module):
    """The preallocated KV cache of a whole model: ``max_batch_size`` rows of ``max_seq_len`` positions.

    Made by whoever runs the model (``llama.runner.ModelRunner``, or ``Transformer`` itself
    for the reference's ``forward(tokens, start_pos)``) and passed to every layer; the
    model's weights know nothing of it. Not part of the state dict.
    """

    def __init__(self, params: ModelArgs, max_batch_size: int, max_seq_len: int, device, dtype):
        super().__init__()
        world = distributed.model_parallel_world_size()
        n_local_kv_heads = max(1, params.kv_heads // world)
        shape = (max_batch_size, n_local_kv_heads, max_seq_len, params.head_dim)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.layers = nn.ModuleList(LayerCache(shape, device, dtype) for _ in range(params.n_layers))


class Segments(NamedTuple):
    """Where the tokens of a prefill go: sequence ``i`` is ``lengths[i]`` consecutive
    tokens of the flattened input, written to cache row ``rows[i]`` from position ``starts[i]``.

    ``masks[i]`` (set by :meth:`Transformer.prefill`, once for all layers): None for a
    sequence that starts at position 0 (causal), else which cached positions each of its
    queries sees.
    """

    rows: List[int]
    starts: List[int]
    lengths: List[int]
    masks: Optional[List[Optional[torch.Tensor]]] = None


class DecodeRows(NamedTuple):
    """One new token for each of cache rows ``0..bsz-1``, row ``i`` at ``positions[i]``.

    ``mask`` (bsz, 1, 1, kv_len): the cached positions each row attends to (``<= positions[i]``).
    ``same_position``: when every row is at this one position (eager only), the write is
    a slice and attention needs no mask: the common case costs what it did before rows
    had positions of their own. ``rows``: ``arange(bsz)``, made once per step for the
    per-row writes. ``lengths``: ``positions + 1``, the cached positions each row attends
    to, for the native decode attention.
    """

    positions: torch.Tensor
    mask: Optional[torch.Tensor]
    same_position: Optional[int] = None
    rows: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, over a KV cache passed in.

    Each model-parallel rank holds ``n_heads / world`` query heads and
    ``n_kv_heads / world`` key/value heads; when the world is larger than
    ``n_kv_heads`` each rank holds one key/value head, replicated across ranks.
    """

    def __init__(self, args: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        world = distributed.model_parallel_world_size()
        self.n_kv_heads = args.kv_heads
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = max(1, args.kv_heads // world)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        kv_dim = self.n_local_kv_heads * world * self.head_dim  # replicated heads count once per rank
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, gather_output=False, device=device, dtype=dtype)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, gather_output=False, device=device, dtype=dtype)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, gather_output=False, device=device, dtype=dtype)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True, device=device, dtype=dtype)
        # The decode step's attention: "sdpa" (torch's scaled_dot_product_attention) or
        # "native-attention" (llama.native.decode_attention, CPU), set by llama.kernel_choice;
        # a prefill's likewise (llama.native.prefill_attention), chosen on its own.
        self.decode_attention = "sdpa"
        self.prefill_attention = "sdpa"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v for q (b, heads, s, d) and k, v (b, kv_heads, L, d).

        No mask: a whole sequence from position 0 (s == L, causal) or a single query
        that sees every key. With a mask (b or 1, 1, s, L) and grouped heads, each group's
        queries are folded into one kv head's query axis: plain multi-head attention
        over the cache as it is (no copy of the keys per query head), which every fused
        kernel takes with a mask (flash-style kernels refuse grouped heads with a mask).
        """
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=self.n_rep > 1)
        if self.n_rep == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, s, d = q.shape
        # (b, heads, s, d) -> (b, kv_heads, n_rep * s, d): query head h belongs to kv head h // n_rep
        folded = q.reshape(b, self.n_local_kv_heads, self.n_rep * s, d)
        if s > 1:  # (b, 1, s, L) -> (b, 1, n_rep * s, L): the same rows for each folded head
            mask = mask.repeat(1, 1, self.n_rep, 1)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
        return out.view(b, self.n_local_heads, s, d)

    def _native_decode(self, xq: torch.Tensor) -> bool:
        """Whether this decode step's attention runs natively (chosen, and possible for these heads)."""
        return self.decode_attention == "native-attention" and xq.device.type == "cpu" and native.attends(xq.dtype, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[LayerCache],
        batch: Union[None, Segments, DecodeRows],
    ) -> torch.Tensor:
        """x (bsz, seqlen, dim) -> (bsz, seqlen, dim).

        ``batch`` says how the tokens sit in the cache: ``DecodeRows`` (one token per row,
        each at its own position), ``Segments`` (bsz 1: several sequences' chunks, one
        after the other) or ``None`` (whole sequences from position 0, no cache: training).
        """
        bsz, seqlen, _ = x.shape
        xq, xk, xv = project(x, self.wq, self.wk, self.wv)  # self.wq(x), self.wk(x), self.wv(x)
        # (bsz, seqlen, heads * head_dim) -> (bsz, seqlen, heads, head_dim)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        fused = "native-attention" in (self.decode_attention, self.prefill_attention)  # the native path's RoPE too
        xq = apply_rotary_emb(xq, cos, sin, fused)
        xk = apply_rotary_emb(xk, cos, sin, fused)

        if isinstance(batch, DecodeRows):
            if batch.same_position is not None:
                pos = batch.same_position
                # (bsz, 1, kv_heads, head_dim) -> (bsz, kv_heads, 1, head_dim)
                cache.cache_k[:bsz, :, pos : pos + 1] = xk.transpose(1, 2)
                cache.cache_v[:bsz, :, pos : pos + 1] = xv.transpose(1, 2)
            else:
                # Write each row's new key and value at its own position, into the full buffers
                # (a write into a view of them is copied out and back under torch.compile).
                cache.cache_k[batch.rows, :, batch.positions] = xk[:, 0]  # (bsz, kv_heads, head_dim)
                cache.cache_v[batch.rows, :, batch.positions] = xv[:, 0]
            if self._native_decode(xq):
                # (bsz, 1, heads, head_dim) -> (bsz, heads, head_dim): each row over its own positions, no mask
                # compiled: the same kernel as an operator of the graph
                attend = native.decode_attention_op if torch.compiler.is_compiling() else native.decode_attention
                output = attend(xq.view(bsz, self.n_local_heads, self.head_dim), cache.cache_k, cache.cache_v, batch.lengths)
                return self.wo(output.view(bsz, seqlen, -1))
            # the first max(positions) + 1 cached positions; with one position for all rows, no mask
            kv_len = batch.same_position + 1 if batch.same_position is not None else batch.mask.shape[-1]
            keys, values = cache.cache_k[:bsz, :, :kv_len], cache.cache_v[:bsz, :, :kv_len]
            output = self._attend(xq.transpose(1, 2), keys, values, batch.mask)
        elif isinstance(batch, Segments):
            native_prefill = self.prefill_attention == "native-attention" and native.prefill_attends(xq[0], cache.cache_k[0])
            outputs, offset = [], 0
            for row, start, length, mask in zip(*batch):
                end = start + length
                # (length, kv_heads, head_dim) -> (kv_heads, length, head_dim)
                cache.cache_k[row, :, start:end] = xk[0, offset : offset + length].transpose(0, 1)
                cache.cache_v[row, :, start:end] = xv[0, offset : offset + length].transpose(0, 1)
                if native_prefill:  # causal over the row's positions 0..end-1, token-major in and out
                    outputs.append(native.prefill_attention(xq[0, offset : offset + length], cache.cache_k[row],
                                                            cache.cache_v[row], start))  # (length, heads, head_dim)
                else:
                    q = xq[:, offset : offset + length].transpose(1, 2)  # (1, heads, length, head_dim)
                    keys, values = cache.cache_k[row : row + 1, :, :end], cache.cache_v[row : row + 1, :, :end]
                    outputs.append(self._attend(q, keys, values, mask))
                offset += length
            if native_prefill:
                # (tokens, heads, head_dim) -> (1, tokens, heads * head_dim)
                output = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
                return self.wo(output.view(bsz, seqlen, -1))
            output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        else:
            output = self._attend(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), None)
        # (bsz, heads, seqlen, head_dim) -> (bsz, seqlen, heads * head_dim)
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, device=device, dtype=dtype)
        self.w2 = RowParallelLinear(hidden_dim, dim, input_is_parallel=True, device=device, dtype=dtype)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, gather_output=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.w1, self.w3)  # self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, *, device=None, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.head_dim
        self.attention = Attention(args, device=device, dtype=dtype)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device, dtype=dtype)

    def forward(self, x, cos, sin, cache, batch):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, batch)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 2 decoder.

    ``Transformer(params)`` allocates (uninitialised) weights on ``device`` in ``dtype``
    (default CPU, float32) together with the RoPE tables and a KV cache of
    ``params.max_batch_size x params.max_seq_len``, like the reference. ``Llama.build``
    instead constructs it on the ``"meta"`` device, loads the checkpoint with
    ``assign=True``, calls :meth:`allocate_buffers` and gives it the cache its model
    runner allocates. A one-process model-parallel group is created if none exists.

    Entry points: :meth:`forward` (the reference's: every row from cache row 0 at the
    same position), :meth:`prefill` (chunks of several sequences, each in its own cache
    row at its own position), :meth:`decode_step` (one token per row, each at its own
    position; static shapes for ``torch.compile``) and :meth:`forward_train`.
    """

    def __init__(self, params: ModelArgs, *, device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError("params.vocab_size must be set (it is -1 in params.json: take it from the tokenizer)")
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        distributed.init_model_parallel(None, device if device.type != "meta" else torch.device("cpu"))
        params.check_model_parallel_size(distributed.model_parallel_world_size())
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(layer_id, params, device=device, dtype=dtype) for layer_id in range(params.n_layers)
        )
        self.norm = RMSNorm(params.dim, eps=params.norm_eps, device=device, dtype=dtype)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True, device=device, dtype=dtype)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.cache: Optional[KVCache] = None
        if device.type != "meta":
            self.allocate_buffers(device, dtype)
            self.cache = KVCache(params, params.max_batch_size, params.max_seq_len, device, dtype)

    def use_prefill_attention(self, kernel: str) -> None:
        """Prefills attend with ``kernel`` (``"sdpa"`` or ``"native-attention"``, see :class:`Attention`);
        the native one brings the fused RMSNorm and RoPE (see :meth:`use_decode_attention`)."""
        for block in self.layers:
            block.attention.prefill_attention = kernel
        self._fuse_norms()

    def use_decode_attention(self, kernel: str) -> None:
        """Decode steps attend with ``kernel`` (``"sdpa"`` or ``"native-attention"``, see
        :class:`Attention`); the native one brings the fused RMSNorm and RoPE: one native call each,
        for decode rows and prefills alike, wherever either attention is native."""
        for block in self.layers:
            block.attention.decode_attention = kernel
        self._fuse_norms()

    def _fuse_norms(self) -> None:
        attentions = [block.attention for block in self.layers]
        fused = any("native-attention" in (a.decode_attention, a.prefill_attention) for a in attentions)
        for block in self.layers:
            block.attention_norm.fused = block.ffn_norm.fused = fused
        self.norm.fused = fused

    def allocate_buffers(self, device: Union[str, torch.device], dtype: torch.dtype) -> None:
        """Allocate the RoPE tables (``max_seq_len`` positions) on ``device``."""
        self.rope_cos, self.rope_sin = precompute_rope(
            self.params.head_dim, self.params.max_seq_len, self.params.rope_theta, device=device
        )

    def _check_cache(self) -> KVCache:
        if self.cache is None:
            raise ValueError("this model has no KV cache: give it one (model.cache = KVCache(...)) or use Llama.build")
        return self.cache

    def _run_layers(self, h: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """The decoder stack on embeddings ``h``; ``positions`` (bsz or 1, seqlen) index the RoPE tables."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (bsz or 1, seqlen, head_dim/2)
        caches = self.cache.layers if batch is not None else [None] * self.n_layers
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, cache, batch)
        return self.norm(h)

    def prefill(self, tokens: torch.Tensor, segments: Segments, logit_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run chunks of several sequences in one pass, each into its own cache row.

        tokens: (T,) the chunks one after the other, as ``segments`` describes them (a
        chunk may continue what an earlier call cached in its row). Returns float32
        logits (K, vocab_size) at the flattened indices ``logit_index`` (K,), or at
        every token when it is None. The matrix products see all T tokens at once.
        """
        cache = self._check_cache()
        for row, start, length in zip(segments.rows, segments.starts, segments.lengths):
            if not 0 <= row < cache.max_batch_size:
                raise ValueError(f"cache row {row} does not exist (max_batch_size={cache.max_batch_size})")
            if start < 0 or length < 1 or start + length > cache.max_seq_len:
                raise ValueError(
                    f"positions {start}..{start + length - 1} exceed max_seq_len={cache.max_seq_len}"
                )
        spans = list(zip(segments.starts, segments.lengths))
        positions = torch.cat([torch.arange(start, start + length, device=tokens.device) for start, length in spans])
        # Made once for every layer. A chunk continuing a cached prefix: its query i sees keys
        # 0..start + i, (1, 1, length, start + length); one from position 0 is plain causal.
        masks = [
            None if start == 0
            else torch.ones(length, start + length, dtype=torch.bool, device=tokens.device).tril(start)[None, None]
            for start, length in spans
        ]
        segments = segments._replace(masks=masks)
        with linear_kernels.prefill_pass():  # int8 layers may run their prefill kernel
            h = self._run_layers(self.tok_embeddings(tokens[None]), positions[None], segments)[0]  # (T, dim)
            if logit_index is not None:
                h = h[logit_index]
            return self.output(h).float()

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: Optional[int] = None, same_position: Optional[int] = None
    ) -> torch.Tensor:
        """Logits (bsz, vocab_size), float32, for one new token per cache row ``0..bsz-1``.

        tokens: (bsz, 1); positions: (bsz,) long, row ``i``'s token goes to position
        ``positions[i]`` and attends to the row's positions ``0..positions[i]``.
        ``kv_len``: attend over the first ``kv_len`` cache positions (at least
        ``max(positions) + 1``); default all of them. With the default, every shape is
        independent of the positions, so one compiled version (CUDA graphs included)
        serves every step of every generation. ``same_position``: the one position of every
        row, when the caller knows them all equal (eager: a slice write, no mask).
        """
        cache = self._check_cache()
        if same_position is not None:
            batch = DecodeRows(positions, None, same_position, lengths=positions + 1)
        else:
            kv_len = cache.max_seq_len if kv_len is None else kv_len
            # (bsz, kv_len) -> (bsz, 1, 1, kv_len): broadcast over heads and queries
            mask = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
            batch = DecodeRows(positions, mask, rows=torch.arange(tokens.shape[0], device=tokens.device), lengths=positions + 1)
        h = self._run_layers(self.tok_embeddings(tokens), positions[:, None], batch)
        return self.output(h)[:, -1].float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for ``tokens`` (bsz, seqlen) at positions ``start_pos..``, using the KV cache.

        The reference's entry point: row ``i`` of the batch is cache row ``i``, and every
        row is at the same position. Returns (bsz, seqlen, vocab_size), or
        (bsz, 1, vocab_size) with ``last_only``, which skips the output projection for
        all but the last position.
        """
        bsz, seqlen = tokens.shape
        cache = self._check_cache()
        if bsz > cache.max_batch_size:
            raise ValueError(f"batch of {bsz} sequences exceeds max_batch_size={cache.max_batch_size}")
        if start_pos + seqlen > cache.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len={cache.max_seq_len}")
        segments = Segments(list(range(bsz)), [start_pos] * bsz, [seqlen] * bsz)
        index = None
        if last_only:  # the last token of each row in the flattened (bsz * seqlen) input
            index = torch.arange(1, bsz + 1, device=tokens.device) * seqlen - 1
        logits = self.prefill(tokens.reshape(-1), segments, index)
        return logits.view(bsz, 1 if last_only else seqlen, -1)

    def forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for whole sequences from position 0, without the KV cache, with autograd."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        return self.output(self._run_layers(self.tok_embeddings(tokens), positions, None)).float()
