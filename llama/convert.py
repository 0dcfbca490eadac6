"""Convert checkpoints between Meta's format and Hugging Face's, tensor by tensor.

Usage::

    python -m llama.convert --to hf   SRC DST [--tokenizer PATH] [--dtype D] [--max-shard-size 2GB]
    python -m llama.convert --to meta SRC DST [--model-parallel-size N] [--dtype D]

``--to hf`` writes a directory ``transformers.LlamaForCausalLM.from_pretrained``
loads: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-NNNNN-of-NNNNN.safetensors`` with ``model.safetensors.index.json`` beyond
``--max-shard-size``), ``tokenizer.model`` when one is found (``--tokenizer``, else
next to SRC or in its parent, where Meta's download puts it) and ``checklist.chk``.
``--to meta`` writes ``params.json``, ``consolidated.NN.pth`` and ``checklist.chk``.

SRC may be in either format, with any number of shards. Tensors keep their dtype
unless ``--dtype`` is given. safetensors files are written as a stream, one tensor
at a time; a Meta output shard is assembled in memory before ``torch.save``
(the whole model for one shard), and source pages are released as they are read.
"""

import argparse
import json
import math
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import hf
from .checkpoint import (
    HF_INDEX,
    HF_SINGLE,
    expected_keys,
    global_shape,
    local_shape,
    open_checkpoint,
    read_params,
    save_checkpoint,
)
from .progress import Progress
from .verify import write_checklist

DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # bytes per safetensors file before splitting
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or ``"1000000"`` (KB/MB/GB are powers of 1000)."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GB, 500MB, 10GiB or a number of bytes")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").upper()
    base = 1024 if suffix == "IB" else 1000
    size = int(number * base ** " KMGT".index(unit or " "))
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return size


def write_safetensors(
    path: Path,
    entries: List[Tuple[str, Tuple[int, ...], torch.dtype]],
    produce: Callable[[int], torch.Tensor],
    metadata: Optional[Dict[str, str]] = None,
    written: Optional[Callable[[int], None]] = None,
) -> int:
    """Write a safetensors file whose tensors are made one at a time; returns the data bytes written.

    ``entries`` lists (name, shape, dtype) in file order, so the header can be written
    first; ``produce(i)`` returns tensor ``i``, which is written and dropped (then
    ``written(i)`` is called) before the next is made. Unlike
    ``safetensors.torch.save_file``, the file's tensors are never all in memory at once.
    """
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; writing them on a big-endian machine is not supported")
    header: Dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": hf.SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, dtype) in enumerate(entries):
            t = produce(i)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            del t
            if written is not None:
                written(i)
    return offset


def _group(sizes: List[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Consecutive keys grouped so that each group stays within ``max_bytes`` (a larger tensor gets its own)."""
    groups: List[List[str]] = []
    total = max_bytes + 1
    for key, nbytes in sizes:
        if groups and total + nbytes <= max_bytes:
            groups[-1].append(key)
            total += nbytes
        else:
            groups.append([key])
            total = nbytes
    return groups


def find_tokenizer(src: Path, tokenizer: Optional[Path] = None) -> Optional[Path]:
    """``tokenizer`` if given (it must exist), else ``tokenizer.model`` in ``src`` or its parent, else None."""
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise FileNotFoundError(f"tokenizer file {tokenizer} not found (--tokenizer)")
        return tokenizer
    for candidate in (Path(src) / "tokenizer.model", Path(src).parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def _check_destination(src: Path, dst: Path) -> None:
    if not Path(src).is_dir():
        raise FileNotFoundError(f"checkpoint directory {src} not found")
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise ValueError("DST must differ from SRC (the source is read while writing)")
    if dst.is_dir():
        clash = sorted(
            p.name
            for p in dst.iterdir()
            if p.name in ("params.json", "config.json", HF_INDEX) or p.suffix in (".pth", ".safetensors")
        )
        if clash:
            raise ValueError(f"{dst} already holds a checkpoint ({clash[:4]}); choose a new or empty directory")


def convert_to_hf(
    src: Path,
    dst: Path,
    tokenizer: Optional[Path] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_position_embeddings: int = 4096,
) -> List[Path]:
    """Write checkpoint ``src`` (either format) as a Hugging Face ``LlamaForCausalLM`` directory ``dst``.

    Returns the safetensors files written.
    """
    from .tokenizer import Tokenizer

    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    tokenizer = find_tokenizer(src, tokenizer)
    source = open_checkpoint(src)
    try:
        args = source.args
        bos, eos = 1, 2
        if tokenizer is not None:
            tok = Tokenizer(str(tokenizer))
            if tok.n_words != source.embedding_rows():
                raise ValueError(
                    f"tokenizer {tokenizer} has {tok.n_words} pieces but the checkpoint's embedding has "
                    f"{source.embedding_rows()} rows; pass the tokenizer.model of these weights with --tokenizer"
                )
            bos, eos = tok.bos_id, tok.eos_id
        out_dtype = dtype or source.dtype()
        keys = expected_keys(args)
        names = {key: hf.meta_to_hf_name(key) for key in keys}
        sizes = [(key, math.prod(global_shape(key, args)) * out_dtype.itemsize) for key in keys]
        groups = _group(sizes, max_shard_size)

        dst.mkdir(parents=True, exist_ok=True)
        files = [dst / HF_SINGLE] if len(groups) == 1 else [
            dst / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
        ]
        weight_map, total = {}, 0
        with Progress(f"converting {src.name} to hf", sum(n for _, n in sizes), len(files), "files") as progress:
            for path, group in zip(files, groups):

                def produce(i: int, group=group) -> torch.Tensor:
                    key = group[i]
                    _, t = hf.meta_tensor_to_hf(key, source.tensor(key, 0, 1), args)
                    return t.to(out_dtype) if t.dtype != out_dtype else t

                def written(i: int, group=group) -> None:
                    source.release(group[i])
                    progress.update(math.prod(global_shape(group[i], args)) * out_dtype.itemsize)

                entries = [(names[k], global_shape(k, args), out_dtype) for k in group]
                total += write_safetensors(path, entries, produce, written=written)
                weight_map.update({names[k]: path.name for k in group})
                progress.update(items=1)
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (dst / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")

        config = hf.hf_config(args, out_dtype, max_position_embeddings, bos_token_id=bos, eos_token_id=eos)
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {  # the reference's sampling defaults
            "bos_token_id": bos,
            "eos_token_id": eos,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
            "max_length": max_position_embeddings,
        }
        (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        extras = []
        if tokenizer is not None:
            shutil.copyfile(tokenizer, dst / "tokenizer.model")
            extras.append("tokenizer.model")
        listed = [p.name for p in files] + ([HF_INDEX] if len(files) > 1 else [])
        write_checklist(dst, listed + ["config.json", "generation_config.json"] + extras)
        return files
    finally:
        source.close()


def convert_to_meta(
    src: Path,
    dst: Path,
    model_parallel_size: int = 1,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Optional[Path] = None,
) -> List[Path]:
    """Write checkpoint ``src`` (either format) as a Meta-format checkpoint of ``model_parallel_size`` shards.

    ``params.json`` gets Meta's keys (``multiple_of``/``ffn_dim_multiplier`` recovered from
    the SwiGLU size); ``tokenizer.model`` is copied when given or found beside SRC. Returns the shards.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    tokenizer = find_tokenizer(src, tokenizer)
    source = open_checkpoint(src)
    try:
        params = read_params(src)
        label = f"writing {src.name} as {model_parallel_size} shard(s)"
        with Progress(label, _meta_bytes(source, model_parallel_size, dtype)) as progress:
            _count_owned_tensors(source, progress)
            paths = save_checkpoint(source, dst, model_parallel_size, params, dtype=dtype)
    finally:
        source.close()
    if tokenizer is not None:
        shutil.copyfile(tokenizer, dst / "tokenizer.model")
    return paths


def _meta_bytes(source, n_shards: int, dtype: Optional[torch.dtype]) -> int:
    """Bytes of all ``n_shards`` output shards (key/value heads replicated where ``n_shards`` needs it)."""
    itemsize = (dtype or source.dtype()).itemsize
    keys = expected_keys(source.args)
    return sum(math.prod(local_shape(k, source.args, r, n_shards)) for r in range(n_shards) for k in keys) * itemsize


def _count_owned_tensors(source, progress: Progress) -> None:
    """Report each tensor ``save_checkpoint`` takes from ``source`` to ``progress`` (this instance only)."""
    owned_tensor = source.owned_tensor

    def counted(key: str, rank: int, world: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = owned_tensor(key, rank, world, dtype)
        progress.update(t.nbytes, note=f"shard {rank + 1}/{world}")
        return t

    source.owned_tensor = counted


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on a usage or checkpoint error)."""
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=("hf", "meta"), help="output format")
    parser.add_argument("src", type=Path, help="checkpoint directory (Meta or Hugging Face format)")
    parser.add_argument("dst", type=Path, help="output directory (new or empty)")
    parser.add_argument("--dtype", default=None, help="convert to float32, bfloat16 or float16 (default: keep)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model to copy (default: found beside SRC)")
    parser.add_argument("--max-shard-size", default="2GB", help="--to hf: largest safetensors file (default: %(default)s)")
    parser.add_argument("--max-position-embeddings", type=int, default=4096, help="--to hf: context length in config.json")
    parser.add_argument("--model-parallel-size", "-n", type=int, default=1, help="--to meta: number of shards")
    args = parser.parse_args(None if argv is None else list(argv))
    from .distributed import select_dtype

    start = time.time()
    try:
        dtype = select_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
        if args.to == "hf":
            files = convert_to_hf(
                args.src, args.dst, args.tokenizer, dtype, parse_size(args.max_shard_size), args.max_position_embeddings
            )
        else:
            files = convert_to_meta(args.src, args.dst, args.model_parallel_size, dtype, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} weight file(s) to {args.dst} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
