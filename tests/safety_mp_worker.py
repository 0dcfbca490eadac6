"""The script ``tests/test_safety.py`` runs under torchrun to check Llama Guard at model-parallel size 2.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/safety_mp_worker.py SPEC.json

SPEC.json holds: ``guard_dir``, ``guard_tokenizer``, ``categories`` (pairs), ``max_seq_len``,
``prompt_dialogs`` and ``reply_dialogs`` (judged directly with ``check_batch``), and
``main_ckpt``, ``main_tokenizer``, ``chat_dialogs``, ``max_gen_len`` (a chat completion
with the checker), and ``out``: where rank 0 writes the results as JSON.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama import Llama, distributed  # noqa: E402
from llama.guard import LlamaGuardChecker  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    checker = LlamaGuardChecker(
        spec["guard_dir"],
        spec["guard_tokenizer"],
        max_seq_len=spec["max_seq_len"],
        categories=[tuple(c) for c in spec["categories"]],
        max_batch_size=4,
    )
    prompts = checker.check_batch(spec["prompt_dialogs"], "user")
    replies = checker.check_batch(spec["reply_dialogs"], "assistant")

    main_llama = Llama.build(spec["main_ckpt"], spec["main_tokenizer"], max_seq_len=256, max_batch_size=4)
    generated = []
    generate = main_llama.generate

    def spy(prompt_tokens, *args, **kwargs):
        generated.extend(prompt_tokens)
        return generate(prompt_tokens, *args, **kwargs)

    main_llama.generate = spy
    chat = main_llama.chat_completion(
        spec["chat_dialogs"], temperature=0.0, max_gen_len=spec["max_gen_len"], safety_checkers=[checker]
    )
    if distributed.global_rank() == 0:
        out = {
            "world_size": distributed.model_parallel_world_size(),
            "prompts": [r.to_dict() for r in prompts],
            "replies": [r.to_dict() for r in replies],
            "chat": chat,
            "generated_rows": len(generated),
        }
        Path(spec["out"]).write_text(json.dumps(out))
    # An orderly teardown: a rank exiting while another still holds the gloo group can abort it.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
