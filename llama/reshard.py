"""Rewrite a Meta-format checkpoint for another model-parallel size.

Usage: ``python -m llama.reshard SRC_DIR DST_DIR --model-parallel-size N``

Writes ``consolidated.00.pth .. consolidated.{N-1}.pth``, ``params.json`` and a new
``checklist.chk``. Source shards are memory-mapped and output shards are written one
at a time, so peak memory is about one output shard plus the source pages it reads.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import open_checkpoint, read_params, save_checkpoint
from .distributed import select_dtype


def reshard(src: Path, dst: Path, model_parallel_size: int, dtype=None) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("DST_DIR must differ from SRC_DIR (the source shards are read while writing)")
    checkpoint = open_checkpoint(src)
    params = read_params(src)
    save_checkpoint(checkpoint, dst, model_parallel_size, params, dtype=dtype)
    for extra in ("tokenizer.model",):
        if (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="checkpoint directory (params.json + consolidated.NN.pth)")
    parser.add_argument("dst", type=Path, help="output directory")
    parser.add_argument("--model-parallel-size", "-n", type=int, required=True, help="number of output shards")
    parser.add_argument("--dtype", default=None, help="convert to float32, bfloat16 or float16 (default: keep)")
    args = parser.parse_args(argv)
    import torch

    dtype = select_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
    start = time.time()
    try:
        reshard(args.src, args.dst, args.model_parallel_size, dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.model_parallel_size} shard(s) to {args.dst} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
