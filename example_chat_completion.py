"""Chat completion with a Llama 2 chat model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat_completion.py          # the built-in demo model, no download
"""

from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.cli import rank0_print, resolve_model


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    """Answer a few dialogs: single questions, multi-turn conversations and system prompts.

    Without --ckpt_dir, runs the built-in demo model (built on first use).
    max_gen_len defaults to max_seq_len - 1.
    """
    ckpt_dir, tokenizer_path = resolve_model(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
    )

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "user", "content": "I am planning a walk along a river. What should I bring?"},
            {
                "role": "assistant",
                "content": "Water, a light jacket in case of rain, comfortable shoes and a map of the path.",
            },
            {"role": "user", "content": "And if it gets dark early?"},
        ],
        [
            {"role": "system", "content": "Always answer with a haiku."},
            {"role": "user", "content": "Tell me about rain."},
        ],
        [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ]
    results = generator.chat_completion(
        dialogs,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            rank0_print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        rank0_print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        rank0_print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
