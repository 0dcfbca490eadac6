"""The script ``tests/test_model_parallel.py`` runs under torchrun (or plain ``python`` for world size 1).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/mp_worker.py \\
        --tokenizer TOKENIZER --out OUT_DIR --case plain=CKPT_DIR --case gqa=CKPT_DIR [--check-disagreement]

For each ``--case NAME=DIR`` it builds ``Llama`` from DIR on all ranks and writes, from rank 0:

* ``OUT_DIR/NAME.logits.pt``: float32 logits of a fixed token batch;
* ``OUT_DIR/NAME.json``: greedy and seeded top-p generations of fixed prompts, the same
  served by ``Engine.run_loop`` with requests added on rank 0 only, the world size, the
  checkpoint's shard count and the model's local weight shapes.

``--compile`` builds with ``compile=True``, so the generations use the compiled decode step.

``--check-disagreement`` then gives each rank different prompts, and different
``max_seq_len`` to ``Llama.build``, and writes the error each rank got to
``OUT_DIR/disagreement.json``. ``--fail-rank R --fail HOW`` makes rank R fail
(``corrupt``: its copy of the checkpoint is truncated; ``dtype``: it passes a bad
dtype, so it fails before joining the process group; ``exit``: it dies without a
word after loading, like a process killed for memory) so the test can check that
the whole job ends, non-zero, with the error shown.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama import Llama  # noqa: E402
from llama import distributed  # noqa: E402
from llama.engine import SamplingParams  # noqa: E402

MAX_SEQ_LEN = 64
MAX_BATCH_SIZE = 4
SEED = 7
PROMPTS = ["The river ran", "Numbers, letters and", "A café in the square sold"]
MAX_GEN_LEN = 10


def logits_tokens(vocab_size: int) -> torch.Tensor:
    """The fixed (2, 20) token batch whose logits are compared across world sizes."""
    return torch.randint(3, vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))


def run_case(
    name: str, ckpt_dir: str, tokenizer: str, out: Optional[Path], dtype: Optional[str] = "float32", compile: bool = False
) -> Dict:
    """Build, compute logits and generations; write them (rank 0) under ``out``; return the record."""
    llama = Llama.build(
        ckpt_dir, tokenizer, MAX_SEQ_LEN, MAX_BATCH_SIZE, seed=SEED, device="cpu", dtype=dtype, compile=compile
    )
    model = llama.model
    logits = model.forward(logits_tokens(model.params.vocab_size), 0)
    prompt_tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    greedy, _ = llama.generate(prompt_tokens, MAX_GEN_LEN, temperature=0.0)
    sampled, _ = llama.generate(prompt_tokens, MAX_GEN_LEN, temperature=1.0, top_p=0.9)
    record = {
        "served": serve(llama),
        "world": distributed.model_parallel_world_size(),
        "shards": len(list(Path(ckpt_dir).glob("consolidated.*.pth"))),
        "greedy": greedy,
        "sampled": sampled,
        "local_shapes": {k: list(v.shape) for k, v in model.state_dict().items() if ".1." not in k},
    }
    if out is not None and distributed.is_main_process():
        torch.save(logits, out / f"{name}.logits.pt")
        (out / f"{name}.json").write_text(json.dumps(record))
    return record


def serve(llama: Llama) -> list:
    """Generations served by ``Engine.run_loop``: only rank 0 adds requests (more than there
    are slots, one of them while the others run); every rank steps the engine with it."""
    engine = llama.engine
    requests: list = []
    if distributed.global_rank() == 0:
        prompts = [llama.tokenizer.encode(p * (1 + i % 3), bos=True, eos=False) for i, p in enumerate(PROMPTS * 2)]
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0.0 if i % 2 else 1.0, max_gen_len=MAX_GEN_LEN, seed=100 + i)
            requests.append(engine.add_request(prompt, params))

    def join_late(outputs) -> None:
        if len(requests) == 2 * len(PROMPTS):
            late = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
            requests.append(engine.add_request(late, SamplingParams(temperature=1.0, max_gen_len=8, seed=9)))

    engine.run_loop(lambda: len(requests) > 2 * len(PROMPTS) and all(r.finished for r in requests), join_late)
    return [r.output_tokens for r in requests]


def check_disagreement(ckpt_dir: str, tokenizer: str, out: Path) -> None:
    """Each rank passes different arguments; every rank must get a ValueError saying so."""
    import torch.distributed as dist

    rank = distributed.global_rank()
    got = {}
    llama = Llama.build(ckpt_dir, tokenizer, MAX_SEQ_LEN, MAX_BATCH_SIZE, seed=SEED, device="cpu", dtype="float32")
    tokens = llama.tokenizer.encode(PROMPTS[rank % len(PROMPTS)], bos=True, eos=False)
    for what, call in (
        ("prompts", lambda: llama.generate([tokens], 4, temperature=0.0)),
        ("build", lambda: Llama.build(ckpt_dir, tokenizer, MAX_SEQ_LEN + rank, MAX_BATCH_SIZE, seed=SEED, device="cpu")),
    ):
        try:
            call()
            got[what] = None
        except ValueError as e:
            got[what] = str(e)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, got)
    if distributed.is_main_process():
        (out / "disagreement.json").write_text(json.dumps(everyone))


def corrupt_copy(ckpt_dir: str, out: Path, rank: int) -> str:
    """A copy of ``ckpt_dir`` whose first shard is cut in half."""
    bad = out / f"corrupt-rank{rank}"
    shutil.copytree(ckpt_dir, bad)
    shard = bad / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return str(bad)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", action="append", default=[], help="NAME=CKPT_DIR (repeatable)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--check-disagreement", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail", choices=["corrupt", "dtype", "exit"], default=None)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    failing = args.fail is not None and rank == args.fail_rank

    cases = [c.split("=", 1) for c in args.case]
    for name, ckpt_dir in cases:
        dtype = "float32"
        if failing and args.fail == "corrupt":
            ckpt_dir = corrupt_copy(ckpt_dir, args.out, rank)
        if failing and args.fail == "dtype":
            dtype = "float33"
        if failing and args.fail == "exit":
            Llama.build(ckpt_dir, args.tokenizer, MAX_SEQ_LEN, MAX_BATCH_SIZE, seed=SEED, device="cpu", dtype=dtype)
            os._exit(3)
        run_case(name, ckpt_dir, args.tokenizer, args.out, dtype=dtype, compile=args.compile)
    if args.check_disagreement:
        check_disagreement(cases[0][1], args.tokenizer, args.out)


if __name__ == "__main__":
    with distributed.report_rank_failures():
        main()
