"""The Llama 2 transformer (Touvron et al., 2023), on fairscale model-parallel layers.

Pre-normalisation with RMSNorm, rotary position embeddings (RoPE), grouped-query
attention and a SwiGLU feed-forward block. Attribute names match the keys of
Meta's ``consolidated.NN.pth`` shards, so loading is a strict ``load_state_dict``.
The KV cache is preallocated for ``max_batch_size x max_seq_len``.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear


@dataclass
class ModelArgs:
    """Model hyper-parameters: the keys of ``params.json`` plus the cache sizes."""

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

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_rope(head_dim: int, end: int, theta: float = 10000.0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles m * theta^(-2i/d), each (end, head_dim/2), float32.

    The same angles as the reference's complex ``freqs_cis`` (cos + i sin), kept as two
    real tables so that every decode step is a few multiply-adds, not a complex round trip.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x by its position's angle.

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim/2).
    Meta's layout pairs adjacent features (Hugging Face's permutes them into halves).
    """
    # (bsz, seqlen, heads, head_dim) -> (bsz, seqlen, heads, head_dim/2, 2)
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]  # broadcast over batch and heads
    sin = sin[None, :, None, :]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and a preallocated KV cache.

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
        # (max_batch, n_local_kv_heads, max_seq_len, head_dim): the layout attention reads
        # directly, so a decode step copies nothing but the new token's keys and values.
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def allocate_cache(self, max_batch_size: int, max_seq_len: int, device, dtype) -> None:
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        use_cache: bool = True,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # (bsz, seqlen, heads * head_dim) -> (bsz, seqlen, heads, head_dim)
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)

        # (bsz, seqlen, heads, head_dim) -> (bsz, heads, seqlen, head_dim)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        if isinstance(start_pos, torch.Tensor):
            # Static shapes for torch.compile / CUDA graphs: write at a position held in a
            # tensor and attend over the whole cache, masking positions not yet written.
            self.cache_k[:bsz].index_copy_(2, start_pos, xk)
            self.cache_v[:bsz].index_copy_(2, start_pos, xv)
            keys, values = self.cache_k[:bsz], self.cache_v[:bsz]
        elif use_cache:
            end = start_pos + seqlen
            self.cache_k[:bsz, :, start_pos:end] = xk
            self.cache_v[:bsz, :, start_pos:end] = xv
            keys = self.cache_k[:bsz, :, :end]
            values = self.cache_v[:bsz, :, :end]
        else:
            keys, values = xk, xv

        # Causal when the queries start the sequence; an explicit mask when a chunk
        # continues a cached prefix; none for a single query, which sees everything.
        is_causal = mask is None and seqlen > 1
        output = F.scaled_dot_product_attention(
            xq, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_rep > 1
        )
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
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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

    def forward(self, x, start_pos, cos, sin, mask, use_cache: bool = True):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask, use_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 2 decoder.

    ``Transformer(params)`` allocates (uninitialised) weights on ``device`` in ``dtype``
    (default CPU, float32) together with the KV cache and RoPE tables, like the
    reference. ``Llama.build`` instead constructs it on the ``"meta"`` device, loads
    the checkpoint with ``assign=True`` and then calls :meth:`allocate_buffers`.
    A one-process model-parallel group is created if none exists.
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
        if device.type != "meta":
            self.allocate_buffers(device, dtype)

    def allocate_buffers(self, device: Union[str, torch.device], dtype: torch.dtype) -> None:
        """Allocate the RoPE tables and the KV cache (``max_batch_size x max_seq_len``) on ``device``."""
        self.rope_cos, self.rope_sin = precompute_rope(
            self.params.head_dim, self.params.max_seq_len, self.params.rope_theta, device=device
        )
        for layer in self.layers:
            layer.attention.allocate_cache(self.params.max_batch_size, self.params.max_seq_len, device, dtype)

    def _hidden(self, tokens: torch.Tensor, start_pos: int, use_cache: bool) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if use_cache and bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} sequences exceeds max_batch_size={self.params.max_batch_size}")
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len={self.params.max_seq_len}"
            )
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[start_pos : start_pos + seqlen]
        sin = self.rope_sin[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1 and start_pos > 0:
            # Query i (absolute position start_pos + i) sees keys 0..start_pos + i.
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device).tril(start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask, use_cache)
        return self.norm(h)

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (bsz, vocab_size), float32, for one new token per row at position ``pos``.

        tokens: (bsz, 1); pos: (1,) long tensor on the model's device. Every shape is
        independent of the position, so a compiled version (CUDA graphs included) is
        reused for the whole generation. Attends over the full cache with a mask.
        """
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (1, head_dim/2)
        # (1, max_seq_len): broadcast over (bsz, heads, 1 query, max_seq_len keys)
        mask = (torch.arange(self.params.max_seq_len, device=tokens.device) <= pos).view(1, -1)
        for layer in self.layers:
            h = layer(h, pos, cos, sin, mask)
        return self.output(self.norm(h))[:, -1].float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for ``tokens`` (bsz, seqlen) at positions ``start_pos..``, using the KV cache.

        Returns (bsz, seqlen, vocab_size), or (bsz, 1, vocab_size) with ``last_only``,
        which skips the output projection for all but the last position.
        """
        h = self._hidden(tokens, start_pos, use_cache=True)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    def forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for whole sequences from position 0, without the KV cache, with autograd."""
        return self.output(self._hidden(tokens, 0, use_cache=False)).float()
