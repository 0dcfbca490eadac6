"""Chat completion with a Llama 2 chat model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat_completion.py          # the built-in demo model, no download
    python example_chat_completion.py --interactive --system "Answer briefly."   # chat in the terminal

Replies are printed as they are generated when stdout is a terminal (--stream
true/false to choose); the text is the same either way.
"""

from typing import List, Optional

import fire

from llama import Dialog, Llama
from llama.chat_repl import run_chat
from llama.cli import print_events, resolve_model, stream_flag
from llama.distributed import report_rank_failures
from llama.guard import checkers_from_specs
from llama.streaming import StreamEvent, in_order


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
    compile: bool = False,
    quantize: Optional[str] = None,
    stream: Optional[bool] = None,
    interactive: bool = False,
    system: Optional[str] = None,
    safety: Optional[str] = None,
):
    """Answer a few dialogs: single questions, multi-turn conversations and system prompts.

    Without --ckpt_dir, runs the built-in demo model (built on first use).
    max_gen_len defaults to max_seq_len - 1.
    --compile: torch.compile the decode step (CUDA graphs on CUDA, Inductor on CPU; warm-up printed).
    --quantize int8: weight-only int8 linear layers (about half the bytes per token of bfloat16).
    --stream true/false: print replies as they are generated (default: when stdout is a terminal).
    --interactive: chat instead (with --system "..." as the system prompt): replies stream,
    the conversation is kept (its oldest turns dropped when it outgrows max_seq_len),
    /reset forgets it, /quit or Ctrl-D ends. Works under torchrun: rank 0 reads the input.
    --safety llamaguard:DIR,keywords:FILE: check prompts and replies (comma-separated checkers:
    Llama Guard from DIR, with the tokenizer.model in DIR or its parent; regular expressions,
    one per line, from FILE); unsafe ones are refused and every report is printed.
    """
    stream = stream_flag(stream)
    ckpt_dir, tokenizer_path = resolve_model(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        quantize=quantize,
        pack_weights=False if compile else None,  # compile() then uses its frozen CPU kernels
    )
    generator.safety_checkers = checkers_from_specs(safety, device=device, dtype=dtype)
    if interactive:
        if compile:
            generator.compile(warmup_batch_sizes=(1,))
        run_chat(generator, system, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        return
    if system is not None:
        raise SystemExit("--system goes with --interactive (the example dialogs have their own system prompts)")

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
    if compile:  # warm up the batch size the first batch will have
        generator.compile(warmup_batch_sizes=(min(len(dialogs), max_batch_size),))
    results = None
    if stream:  # the same batch, shown one reply after the other as it is generated
        events = in_order(
            generator.stream_batch_chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        )
    else:
        results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        events = (StreamEvent(i, result["generation"]["content"], True) for i, result in enumerate(results))
    print_events(
        events,
        lambda i: "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in dialogs[i]) + "> Assistant: ",
        results,
    )


if __name__ == "__main__":
    with report_rank_failures():  # a rank that only learnt of another's error says so in one line
        fire.Fire(main)
