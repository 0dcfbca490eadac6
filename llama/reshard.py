"""Rewrite a checkpoint for another model-parallel size.

Usage: ``python -m llama.reshard SRC_DIR DST_DIR --model-parallel-size N [--dtype D]``

Writes ``consolidated.00.pth .. consolidated.{N-1}.pth``, ``params.json`` and a new
``checklist.chk`` into DST_DIR (new or empty), and copies ``tokenizer.model`` when it
is found in SRC_DIR or its parent. SRC_DIR may have any number of shards (or be a
Hugging Face directory). Key/value heads are replicated across shards when N is
larger than ``n_kv_heads``, as the loader expects.

Memory: output shards are built one at a time, and the memory-mapped source is
copied in blocks whose pages are handed back to the kernel as soon as they are
copied, so the peak is about one output shard plus a few tens of MB
(``benchmarks/reshard_memory.py``). Loading does not need this step: ``Llama.build``
reshards on the fly; rewriting pays off when a checkpoint is loaded many times.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from .convert import convert_to_meta
from .distributed import select_dtype


def reshard(src: Path, dst: Path, model_parallel_size: int, dtype: Optional[torch.dtype] = None) -> List[Path]:
    """Write ``src`` as a checkpoint of ``model_parallel_size`` shards in ``dst``; returns the shards."""
    return convert_to_meta(Path(src), Path(dst), model_parallel_size, dtype)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on a usage or checkpoint error)."""
    parser = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="checkpoint directory (params.json + consolidated.NN.pth)")
    parser.add_argument("dst", type=Path, help="output directory (new or empty)")
    parser.add_argument("--model-parallel-size", "-n", type=int, required=True, help="number of output shards")
    parser.add_argument("--dtype", default=None, help="convert to float32, bfloat16 or float16 (default: keep)")
    args = parser.parse_args(None if argv is None else list(argv))
    start = time.time()
    try:
        dtype = select_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
        reshard(args.src, args.dst, args.model_parallel_size, dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.model_parallel_size} shard(s) to {args.dst} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
