"""Reading checkpoints onto any world size: Meta's format and Hugging Face's.

Meta's format is ``params.json`` + ``consolidated.NN.pth`` shards; a Hugging Face
directory is ``config.json`` + ``*.safetensors`` (one file, or several listed in
``model.safetensors.index.json``), which :class:`HFCheckpoint` presents as a single
Meta-format shard. :func:`open_checkpoint` tells them apart.

A checkpoint saved with model-parallel size ``k`` is loaded on ``n`` ranks by
assembling, for each tensor, exactly the slice rank ``r`` needs from the source
shards (memory-mapped, so untouched bytes are never read): shards are merged when
``k > n``, split when ``k < n``, and key/value heads are replicated when ``n`` is
larger than ``n_kv_heads``. Each rank holds only its own slice.

Memory: files are mapped privately and read-only in practice, so a tensor loaded
without conversion is used in place (no copy). When a tensor is converted (dtype,
device, a merge or a column slice), the pages of its source that were read are
handed back to the kernel right away (:meth:`ShardedState.release`), so the
resident size stays near the size of the converted weights instead of growing by
every source page touched.
"""

import ctypes
import json
import math
import mmap
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import hf, progress
from .model import ModelArgs

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"

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
    """Every tensor key of a Meta checkpoint of architecture ``args``, in model order."""
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
    """Shape of the slice of ``key`` that ``rank`` of ``world`` holds."""
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
    """The ``consolidated.NN.pth`` shards of ``ckpt_dir``, in order; a clear error if none or one is missing."""
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


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    """[start, stop) addresses of the bytes ``t`` spans in its storage."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + span * t.element_size()


def _load_libc():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()
_COPY_BLOCK_BYTES = 16 * 2**20  # MetaCheckpoint.owned_tensor copies (and releases) this much source at a time


def privately_mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s bytes lie in a private (copy-on-write) mapping of the file ``path`` (Linux only).

    Only such pages may be released with :func:`release_pages`: the kernel re-reads
    them from the file if they are touched again.
    """
    if _LIBC is None or t.device.type != "cpu" or t.numel() == 0:
        return False
    address = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in parts[0].split("-"))
                if low <= address < high:
                    return len(parts) == 6 and parts[1][3] == "p" and parts[5].rstrip("\n") == os.path.realpath(path)
    except (OSError, ValueError, IndexError):
        return False
    return False


def release_pages(source: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
    """Hand the resident pages of ``source`` back to the kernel (``madvise(MADV_DONTNEED)``).

    ``source`` must lie in a private mapping of an unmodified file (see
    :func:`privately_mapped_from`): its pages are then re-read from the file if
    touched again, so nothing is lost. Only pages entirely inside ``source`` are
    released, and nothing at all when ``keep`` (e.g. the loaded parameter) overlaps
    it, since ``keep`` then still uses those pages. A no-op off Linux.
    """
    if _LIBC is None or source.device.type != "cpu":
        return
    start, stop = _byte_range(source)
    if keep is not None and keep.device.type == "cpu":
        keep_start, keep_stop = _byte_range(keep)
        if keep_start < stop and start < keep_stop:
            return
    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, stop // page * page
    if high > low:
        _LIBC.madvise(low, high - low, mmap.MADV_DONTNEED)  # failure only means the pages stay resident


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

    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        return self.shard(0)["tok_embeddings.weight"].dtype

    def release(self, key: str, keep: Optional[torch.Tensor] = None) -> None:
        """Called when the caller is done reading ``key``: drop the source pages it read.

        ``keep`` is what the caller holds on to (the converted tensor); pages it still
        uses are kept. The default does nothing (e.g. for tensors held in memory).
        """

    def pieces(self, key: str, rank: int, world: int) -> List[Tuple[int, torch.Tensor]]:
        """(source shard, view) pairs that, concatenated along ``split_dim(key)``, make ``rank``'s slice.

        A replicated tensor is one piece: the whole tensor of shard 0.
        """
        dim = split_dim(key)
        if dim is None:
            return [(0, self.shard(0)[key])]
        start, stop = rank_range(key, self.args, rank, world)
        pieces = []
        index = start
        while index < stop:
            shard, offset, run = _locate(key, self.args, self.n_shards, index)
            take = min(run, stop - index)
            pieces.append((shard, self.shard(shard)[key].narrow(dim, offset, take)))
            index += take
        return pieces

    def tensor(self, key: str, rank: int, world: int) -> torch.Tensor:
        """The slice of ``key`` that ``rank`` of ``world`` holds (a view where possible)."""
        pieces = [t for _, t in self.pieces(key, rank, world)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, split_dim(key))

    def owned_tensor(self, key: str, rank: int, world: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Like :meth:`tensor`, but a new compact tensor (in ``dtype`` if given), never a view of the source.

        For writing shards: ``torch.save`` of a view would store the whole storage behind
        it. The source pages read are released (see :meth:`release`).
        """
        t = self.tensor(key, rank, world)
        out = t.to(dtype) if dtype is not None and t.dtype != dtype else t.clone()
        del t
        self.release(key, keep=out)
        return out

    def state_dict_for_rank(self, rank: int, world: int) -> Iterator[Tuple[str, torch.Tensor]]:
        """(key, slice) for every tensor of the model, in model order, for ``rank`` of ``world``."""
        for key in expected_keys(self.args):
            yield key, self.tensor(key, rank, world)

    def close(self) -> None:
        """Drop references to the source files (tensors still in use keep their mappings)."""


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
        self._unchecked: Dict[int, Dict[str, torch.Tensor]] = {}  # mapped for embedding_rows, not yet checked
        self._releasable: Dict[int, bool] = {}
        self._dtype: Optional[torch.dtype] = None

    def shard(self, index: int) -> Dict[str, torch.Tensor]:
        if index not in self._shards:
            path = self.paths[index]
            state = self._unchecked.pop(index) if index in self._unchecked else load_shard(path)
            self._check_shard(path, index, state)
            self._shards[index] = state
            first = next((t for t in state.values() if t.numel()), None)
            self._releasable[index] = first is not None and privately_mapped_from(first, path)
        return self._shards[index]

    def embedding_rows(self) -> int:
        """Rows of the token embedding, read from shard 0 before the shards are checked against params.json.

        So that a tokenizer of the wrong size is reported as such, not as a shape mismatch.
        """
        state = self._shards.get(0)
        if state is None:
            if 0 not in self._unchecked:
                self._unchecked[0] = load_shard(self.paths[0])
            state = self._unchecked[0]
        emb = state.get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            raise ValueError(f"{self.paths[0]} has no 2-d tok_embeddings.weight; it is not a Llama checkpoint shard")
        return emb.shape[0]

    def dtype(self) -> torch.dtype:
        self.shard(0)
        return self._dtype

    def release(self, key: str, keep: Optional[torch.Tensor] = None) -> None:
        for index, state in self._shards.items():
            if self._releasable.get(index) and key in state:
                release_pages(state[key], keep)

    def owned_tensor(self, key: str, rank: int, world: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """:meth:`ShardedState.owned_tensor`, copied from the mapped shards in blocks of rows.

        Each block's source pages are released as soon as it is copied, so besides the
        result only about ``_COPY_BLOCK_BYTES`` of source pages are resident at a time,
        however large the tensor and however many shards it is merged from.
        """
        pieces = self.pieces(key, rank, world)
        dim = split_dim(key)
        out = torch.empty(local_shape(key, self.args, rank, world), dtype=dtype or pieces[0][1].dtype)
        offset = 0
        for index, piece in pieces:
            target = out if dim is None else out.narrow(dim, offset, piece.shape[dim])
            offset += 0 if dim is None else piece.shape[dim]
            releasable = self._releasable.get(index, False)
            # Source bytes a row of the piece spans (a whole source row, for a column slice).
            row_bytes = piece.stride(0) * piece.element_size() if piece.dim() > 1 else piece.nbytes
            step = max(1, _COPY_BLOCK_BYTES // max(1, row_bytes)) if piece.dim() > 1 else max(1, len(piece))
            for row in range(0, len(piece), step):
                block = piece[row : row + step]
                target[row : row + step].copy_(block)
                if releasable:
                    release_pages(block)
            if releasable:
                release_pages(self._shards[index][key])  # the pages at block boundaries
        return out

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
        self._unchecked.clear()


def _hf_files(ckpt_dir: Path) -> List[Path]:
    """The safetensors files of a Hugging Face checkpoint directory (those the index names, if any)."""
    index = ckpt_dir / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (JSON with a weight_map): {e!r}") from None
        missing = [n for n in names if not (ckpt_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {missing}, not found in {ckpt_dir} (is a download incomplete?)")
        return [ckpt_dir / n for n in names]
    if (ckpt_dir / HF_SINGLE).is_file():
        return [ckpt_dir / HF_SINGLE]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{ckpt_dir} has config.json but no *.safetensors weights; only safetensors are read "
            "(convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


class HFCheckpoint(ShardedState):
    """A Hugging Face ``LlamaForCausalLM`` directory, presented as one full Meta-format shard.

    Tensors are read lazily from the memory-mapped safetensors files, one slice at a
    time, renamed to Meta keys, and q/k rows are permuted back to Meta's interleaved
    rotary layout. A rank's slice of q/k is a whole number of heads and the
    permutation stays within each head, so the slice is permuted on its own.
    Names, shapes and dtypes are checked against ``config.json`` when opening.
    """

    def __init__(self, ckpt_dir: Path, args: Optional[ModelArgs] = None, **overrides):
        self.ckpt_dir = Path(ckpt_dir)
        self.paths = _hf_files(self.ckpt_dir)
        config_path = self.ckpt_dir / "config.json"
        self.config = hf.read_hf_config(config_path)
        if args is None:
            args = hf.args_from_hf_config(self.config, source=str(config_path), **overrides)
        super().__init__(args, 1)
        self._handles = {}
        self._where: Dict[str, Tuple[Path, str]] = {}  # Meta key -> (file, Hugging Face name)
        self._releasable: Dict[Path, bool] = {}
        self._dtype: Optional[torch.dtype] = None
        self._expected = set(expected_keys(self.args))
        for path in self.paths:
            self._index_file(path)
        self._check_complete()

    def _open(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"cannot read {path}: the file is truncated or corrupted ({type(e).__name__}: {e}); download it again"
            ) from None

    def _index_file(self, path: Path) -> None:
        handle = self._handles[path] = self._open(path)
        first = None
        for name in handle.keys():
            if name.endswith(hf.HF_IGNORED_SUFFIXES):
                continue
            try:
                key = hf.hf_to_meta_name(name)
            except KeyError:
                raise ValueError(f"{path} holds tensor {name!r}, which is not part of a Llama 2 model") from None
            if key in self._where:
                raise ValueError(f"tensor {name} is in both {self._where[key][0]} and {path}")
            self._where[key] = (path, name)
            info = handle.get_slice(name)
            shape, code = tuple(info.get_shape()), info.get_dtype()
            dtype = hf.SAFETENSORS_DTYPES.get(code)
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has dtype {code}; expected one of {sorted(hf.SAFETENSORS_DTYPES)}")
            if self._dtype is not None and dtype != self._dtype:
                raise ValueError(
                    f"{path}: tensor {name} is {dtype} but other tensors are {self._dtype}; "
                    "all tensors of a checkpoint must share one dtype"
                )
            self._dtype = dtype
            if key in self._expected and shape != global_shape(key, self.args):
                raise ValueError(
                    f"{path}: tensor {name} ({key}) has shape {shape}, expected {global_shape(key, self.args)} "
                    "from config.json"
                )
            first = first or name
        if first is not None:
            self._releasable[path] = privately_mapped_from(handle.get_tensor(first), path)

    def _check_complete(self) -> None:
        keys, wanted = set(self._where), self._expected
        missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
        if missing or unexpected:

            def shown(keys: List[str]) -> List[str]:
                return [hf.meta_to_hf_name(k) for k in keys[:5]] + (["..."] if len(keys) > 5 else [])

            raise ValueError(
                f"the safetensors files in {self.ckpt_dir} do not match config.json "
                f"(num_hidden_layers={self.args.n_layers}): missing {shown(missing)}, unexpected {shown(unexpected)}"
            )

    def shard(self, index: int) -> Mapping:
        """The whole model as a lazy read-only mapping of Meta keys to full tensors (index 0 only)."""
        if index != 0:
            raise IndexError(f"a Hugging Face checkpoint is a single shard; got shard index {index}")
        return _LazyShard(self)

    def embedding_rows(self) -> int:
        path, name = self._where["tok_embeddings.weight"]
        return self._handles[path].get_slice(name).get_shape()[0]

    def dtype(self) -> torch.dtype:
        return self._dtype

    def tensor(self, key: str, rank: int, world: int) -> torch.Tensor:
        """The slice of ``key`` that ``rank`` of ``world`` holds, in Meta's layout."""
        path, name = self._where[key]
        dim = split_dim(key)
        if dim is None:
            return self._handles[path].get_tensor(name)
        start, stop = rank_range(key, self.args, rank, world)
        full = global_shape(key, self.args)[dim]
        if (start, stop) == (0, full):
            t = self._handles[path].get_tensor(name)
        else:
            piece = self._handles[path].get_slice(name)
            t = piece[start:stop] if dim == 0 else piece[:, start:stop]
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = hf.permute_from_hf(t.contiguous(), (stop - start) // self.args.head_dim)
        return t

    def release(self, key: str, keep: Optional[torch.Tensor] = None) -> None:
        path, name = self._where[key]
        if self._releasable.get(path) and path in self._handles:
            release_pages(self._handles[path].get_tensor(name), keep)

    def close(self) -> None:
        self._handles.clear()


class _LazyShard(Mapping):
    """Meta key -> full tensor of an :class:`HFCheckpoint`, read on access."""

    def __init__(self, checkpoint: HFCheckpoint):
        self._checkpoint = checkpoint

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._checkpoint._where:
            raise KeyError(key)
        return self._checkpoint.tensor(key, 0, 1)

    def __iter__(self):
        return iter(expected_keys(self._checkpoint.args))

    def __len__(self) -> int:
        return len(self._checkpoint._where)


def to_target(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Move/convert one tensor; a contiguous tensor already in place is returned as is (no copy)."""
    if t.device == device and t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(device=device, dtype=dtype).contiguous()


def rank_bytes(args: ModelArgs, rank: int, world: int, itemsize: Callable[[str], float]) -> int:
    """Bytes of this rank's weights once loaded, at ``itemsize(key)`` bytes per element (for progress)."""
    return int(sum(math.prod(local_shape(key, args, rank, world)) * itemsize(key) for key in expected_keys(args)))


def load_into(model: torch.nn.Module, source, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> None:
    """Fill ``model`` (built on the meta device) with its slice of ``source``, tensor by tensor.

    After each tensor is converted, the source pages it read are released, so at any
    time only one source tensor's pages are resident beside the converted weights.
    """
    state = {}
    with progress.for_loading(source, rank_bytes(source.args, rank, world, lambda key: dtype.itemsize)) as shown:
        for key, t in source.state_dict_for_rank(rank, world):
            state[key] = to_target(t, device, dtype)
            del t  # a merged or permuted source slice is freed before the next one is read
            source.release(key, keep=state[key])
            shown.update(state[key].nbytes)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)


def checkpoint_format(ckpt_dir: Path) -> str:
    """``"meta"`` (params.json) or ``"hf"`` (config.json + safetensors) for ``ckpt_dir``; a clear error otherwise.

    A directory holding both (some Hub repositories do) is read as whichever has weights, Meta's first.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found")
    meta, config = (ckpt_dir / "params.json").exists(), (ckpt_dir / "config.json").is_file()
    has_pth, has_safetensors = any(ckpt_dir.glob("consolidated.*.pth")), any(ckpt_dir.glob("*.safetensors"))
    if meta and (has_pth or not (config and has_safetensors)):
        return "meta"
    if config:
        return "hf"
    if has_pth:
        raise FileNotFoundError(
            f"{ckpt_dir / 'params.json'} not found: a Meta checkpoint directory must contain params.json "
            "next to its consolidated.NN.pth shards"
        )
    raise FileNotFoundError(
        f"{ckpt_dir} is not a checkpoint directory: it has neither params.json (Meta format, with "
        "consolidated.NN.pth shards) nor config.json with *.safetensors (Hugging Face format)"
    )


def read_params(ckpt_dir: Path) -> dict:
    """``params.json`` of a checkpoint directory (validated by ``ModelArgs``).

    For a Hugging Face directory, the equivalent Meta ``params.json`` built from config.json.
    """
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "hf":
        path = ckpt_dir / "config.json"
        return hf.meta_params(hf.args_from_hf_config(hf.read_hf_config(path), source=str(path)))
    path = ckpt_dir / "params.json"
    ModelArgs.from_json(path)  # raises a clear error for a missing, broken or unknown-keyed file
    return json.loads(path.read_text())


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Check every file of ``ckpt_dir/checklist.chk`` (md5); ValueError naming the files that fail."""
    from .verify import CHECKLIST, md5_file, read_checklist

    ckpt_dir = Path(ckpt_dir)
    checklist = ckpt_dir / CHECKLIST
    if not checklist.is_file():
        raise FileNotFoundError(
            f"{checklist} not found: cannot verify {ckpt_dir} (build with verify=False to skip the check)"
        )
    missing, corrupt = [], []
    for expected, name in read_checklist(checklist):
        path = ckpt_dir / name
        if not path.is_file():
            missing.append(name)
        elif md5_file(path) != expected:
            corrupt.append(name)
    if missing or corrupt:
        problems = ([f"missing: {missing}"] if missing else []) + ([f"md5 mismatch: {corrupt}"] if corrupt else [])
        raise ValueError(
            f"{ckpt_dir} failed verification against {CHECKLIST} ({'; '.join(problems)}); download those files again"
        )


def open_checkpoint(ckpt_dir: Path, vocab_size: Optional[int] = None, **overrides) -> ShardedState:
    """Open a checkpoint directory (Meta or Hugging Face format) for reading at any world size.

    ``vocab_size=-1`` in params.json is taken from ``vocab_size`` (the tokenizer's)
    or else from the embedding; ``overrides`` set ModelArgs fields (e.g. max_seq_len).
    """
    ckpt_dir = Path(ckpt_dir)
    if checkpoint_format(ckpt_dir) == "hf":
        return HFCheckpoint(ckpt_dir, **overrides)
    args = ModelArgs.from_json(ckpt_dir / "params.json", **overrides)
    checkpoint = MetaCheckpoint(ckpt_dir, args)
    if args.vocab_size == -1:
        checkpoint.args = replace(args, vocab_size=vocab_size if vocab_size is not None else checkpoint.embedding_rows())
    return checkpoint


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
        # One output shard in memory at a time; the source pages each tensor reads are released.
        shard = {key: source.owned_tensor(key, rank, n_shards, dtype) for key in expected_keys(source.args)}
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
