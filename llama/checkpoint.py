"""Reading Meta-format checkpoints (``params.json`` + ``consolidated.NN.pth``) onto any world size.

A checkpoint saved with model-parallel size ``k`` is loaded on ``n`` ranks by
assembling, for each tensor, exactly the slice rank ``r`` needs from the source
shards (memory-mapped, so untouched bytes are never read): shards are merged when
``k > n``, split when ``k < n``, and key/value heads are replicated when ``n`` is
larger than ``n_kv_heads``. Each rank holds only its own slice (plus whatever the
page cache keeps of the mapped files).
"""

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .model import ModelArgs

# Dimension along which each tensor is split across model-parallel ranks
# (None: replicated). Keys are matched by suffix.
_SPLIT_DIMS = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding splits the embedding dimension
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "output.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}
IGNORED_KEYS = {"rope.freqs"}  # the reference stores its RoPE table; we recompute it


def split_dim(key: str) -> Optional[int]:
    """The dimension along which ``key`` is sharded, or None when it is replicated."""
    for suffix, dim in _SPLIT_DIMS.items():
        if key == suffix or key.endswith("." + suffix):
            return dim
    raise KeyError(f"unknown checkpoint key {key!r}")


def expected_keys(args: ModelArgs) -> List[str]:
    keys = ["tok_embeddings.weight"]
    for i in range(args.n_layers):
        keys += [f"layers.{i}.{suffix}" for suffix in _SPLIT_DIMS if suffix.startswith(("attention", "feed_forward", "ffn_norm"))]
    return keys + ["norm.weight", "output.weight"]


def _is_kv(key: str) -> bool:
    return key.endswith(("attention.wk.weight", "attention.wv.weight"))


def global_shape(key: str, args: ModelArgs) -> Tuple[int, ...]:
    """Shape of the unsharded tensor ``key``."""
    hd, hidden = args.head_dim, args.ffn_hidden_dim
    suffix = key.split(".", 2)[-1] if key.startswith("layers.") else key
    return {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "attention.wq.weight": (args.n_heads * hd, args.dim),
        "attention.wk.weight": (args.kv_heads * hd, args.dim),
        "attention.wv.weight": (args.kv_heads * hd, args.dim),
        "attention.wo.weight": (args.dim, args.n_heads * hd),
        "feed_forward.w1.weight": (hidden, args.dim),
        "feed_forward.w3.weight": (hidden, args.dim),
        "feed_forward.w2.weight": (args.dim, hidden),
        "output.weight": (args.vocab_size, args.dim),
        "attention_norm.weight": (args.dim,),
        "ffn_norm.weight": (args.dim,),
        "norm.weight": (args.dim,),
    }[suffix]


def rank_range(key: str, args: ModelArgs, rank: int, world: int) -> Tuple[int, int]:
    """Global [start, stop) along the split dimension that ``rank`` of ``world`` holds."""
    extent = global_shape(key, args)[split_dim(key)]
    if _is_kv(key) and world > args.kv_heads:
        # Each rank holds one whole key/value head, shared by world/n_kv_heads ranks.
        head = rank // (world // args.kv_heads)
        return head * args.head_dim, (head + 1) * args.head_dim
    return rank * extent // world, (rank + 1) * extent // world


def local_shape(key: str, args: ModelArgs, rank: int, world: int) -> Tuple[int, ...]:
    shape = list(global_shape(key, args))
    dim = split_dim(key)
    if dim is not None:
        start, stop = rank_range(key, args, rank, world)
        shape[dim] = stop - start
    return tuple(shape)


def _locate(key: str, args: ModelArgs, n_shards: int, index: int) -> Tuple[int, int, int]:
    """Where global ``index`` along the split dim lives in a ``n_shards`` checkpoint.

    Returns (shard, offset in that shard, how many following indices are contiguous there).
    """
    if _is_kv(key) and n_shards > args.kv_heads:
        head = index // args.head_dim  # stored by its first replica
        return head * (n_shards // args.kv_heads), index % args.head_dim, args.head_dim - index % args.head_dim
    per_shard = global_shape(key, args)[split_dim(key)] // n_shards
    return index // per_shard, index % per_shard, per_shard - index % per_shard


def find_shards(ckpt_dir: Path) -> List[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found")
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(
            f"no checkpoint shards (consolidated.NN.pth) in {ckpt_dir}; download them with download.sh"
        )
    names = [p.name for p in shards]
    wanted = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if names != wanted:
        raise FileNotFoundError(f"{ckpt_dir} holds {names}; expected {wanted} (is a shard missing?)")
    return shards


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one ``.pth`` shard; only tensors are unpickled (never code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refused to load {path}: it holds Python objects other than tensors, which could run code "
            f"when unpickled. Use a checkpoint from a trusted source. ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for broken zips
        raise ValueError(f"cannot read {path}: the file is truncated or corrupted ({type(e).__name__}: {e}); "
                         "download it again and check it with `python -m llama.verify`") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a Llama checkpoint shard (expected a dict of tensors)")
    return state


class ShardedState:
    """A model's tensors stored as ``n_shards`` model-parallel shards, read for any world size.

    Subclasses provide :meth:`shard`; :meth:`tensor` assembles the slice a rank needs.
    """

    def __init__(self, args: ModelArgs, n_shards: int):
        self.args = args
        self.n_shards = n_shards

    def shard(self, index: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def embedding_rows(self) -> int:
        """Rows of the token embedding (the checkpoint's vocabulary size)."""
        return self.shard(0)["tok_embeddings.weight"].shape[0]

    def tensor(self, key: str, rank: int, world: int) -> torch.Tensor:
        """The slice of ``key`` that ``rank`` of ``world`` holds (a view where possible)."""
        dim = split_dim(key)
        if dim is None:
            return self.shard(0)[key]
        start, stop = rank_range(key, self.args, rank, world)
        pieces = []
        index = start
        while index < stop:
            shard, offset, run = _locate(key, self.args, self.n_shards, index)
            take = min(run, stop - index)
            pieces.append(self.shard(shard)[key].narrow(dim, offset, take))
            index += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def state_dict_for_rank(self, rank: int, world: int) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in expected_keys(self.args):
            yield key, self.tensor(key, rank, world)

    def close(self) -> None:
        pass


class InMemoryState(ShardedState):
    """Shards held as state dicts in memory (e.g. a freshly initialised model)."""

    def __init__(self, args: ModelArgs, shards: List[Dict[str, torch.Tensor]]):
        super().__init__(args, len(shards))
        self.shards = shards

    def shard(self, index: int) -> Dict[str, torch.Tensor]:
        return self.shards[index]


class MetaCheckpoint(ShardedState):
    """A Meta-format checkpoint directory; shards are memory-mapped on first use and checked."""

    def __init__(self, ckpt_dir: Path, args: ModelArgs):
        self.ckpt_dir = Path(ckpt_dir)
        self.paths = find_shards(self.ckpt_dir)
        super().__init__(args, len(self.paths))
        self._shards: Dict[int, Dict[str, torch.Tensor]] = {}
        self._dtype: Optional[torch.dtype] = None

    def shard(self, index: int) -> Dict[str, torch.Tensor]:
        if index not in self._shards:
            path = self.paths[index]
            state = load_shard(path)
            self._check_shard(path, index, state)
            self._shards[index] = state
        return self._shards[index]

    def _check_shard(self, path: Path, index: int, state: Dict[str, torch.Tensor]) -> None:
        keys = set(state) - IGNORED_KEYS
        wanted = set(expected_keys(self.args))
        missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match params.json (n_layers={self.args.n_layers}): "
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            )
        dtypes = {t.dtype for k, t in state.items() if k not in IGNORED_KEYS}
        if len(dtypes) > 1 or (self._dtype is not None and dtypes != {self._dtype}):
            raise ValueError(
                f"{path} holds tensors of dtypes {sorted(map(str, dtypes))} but earlier shards hold "
                f"{self._dtype}; all shards of a checkpoint must share one dtype"
            )
        self._dtype = dtypes.pop()
        for key in sorted(wanted):
            shape = local_shape(key, self.args, index, self.n_shards)
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"{path}: tensor {key} has shape {tuple(state[key].shape)}, expected {shape} "
                    f"from params.json for a checkpoint of {self.n_shards} shard(s)"
                )

    def close(self) -> None:
        self._shards.clear()


def to_target(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move/convert one tensor; a contiguous tensor already in place is returned as is (no copy)."""
    if t.device == device and t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(device=device, dtype=dtype).contiguous()


def load_into(model: torch.nn.Module, source, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> None:
    """Fill ``model`` (built on the meta device) with its slice of ``source``, tensor by tensor."""
    state = {key: to_target(t, device, dtype) for key, t in source.state_dict_for_rank(rank, world)}
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)


def read_params(ckpt_dir: Path) -> dict:
    """The raw ``params.json`` of a checkpoint directory (validated by ``ModelArgs``)."""
    path = Path(ckpt_dir) / "params.json"
    ModelArgs.from_json(path)  # raises a clear error for a missing, broken or unknown-keyed file
    return json.loads(path.read_text())


def open_checkpoint(ckpt_dir: Path, vocab_size: Optional[int] = None, **overrides) -> ShardedState:
    """Open a checkpoint directory for reading at any world size.

    ``vocab_size=-1`` in params.json is taken from ``vocab_size`` (the tokenizer's)
    or else from the embedding; ``overrides`` set ModelArgs fields (e.g. max_seq_len).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found")
    args = ModelArgs.from_json(ckpt_dir / "params.json", **overrides)
    if args.vocab_size == -1:
        if vocab_size is None:
            vocab_size = load_shard(find_shards(ckpt_dir)[0])["tok_embeddings.weight"].shape[0]
        args = replace(args, vocab_size=vocab_size)
    return MetaCheckpoint(ckpt_dir, args)


def save_checkpoint(
    source: ShardedState,
    out_dir: Path,
    n_shards: int,
    params: dict,
    dtype: Optional[torch.dtype] = None,
) -> List[Path]:
    """Write ``source`` as a Meta-format checkpoint of ``n_shards`` shards, one shard in memory at a time.

    Writes ``consolidated.NN.pth``, ``params.json`` and a fresh ``checklist.chk``.
    """
    from .verify import write_checklist

    source.args.check_model_parallel_size(n_shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(n_shards):
        # clone(): torch.save would otherwise store the whole storage behind each view.
        shard = {
            key: (t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone())
            for key, t in source.state_dict_for_rank(rank, n_shards)
        }
        path = out_dir / f"consolidated.{rank:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
        del shard
    (out_dir / "params.json").write_text(json.dumps(params))
    write_checklist(out_dir, [p.name for p in paths] + ["params.json"])
    return paths


def random_state_dict(
    args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02
) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state dict of normal random weights, norms at 1.

    For tests, benchmarks and as the starting point of the demo model. Sampled in
    float32 on the CPU, so the values do not depend on device or target dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in expected_keys(args):
        shape = global_shape(key, args)
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shape, dtype=dtype)
            continue
        scale = std / (2 * args.n_layers) ** 0.5 if key.endswith(("wo.weight", "w2.weight")) else std
        state[key] = (torch.randn(shape, generator=generator) * scale).to(dtype)
    return state
