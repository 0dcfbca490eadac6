"""Text completion with a Llama 2 model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    python example_text_completion.py          # the built-in demo model, no download

Completions are printed as they are generated when stdout is a terminal (--stream
true/false to choose); the text is the same either way.
"""

from typing import List, Optional

import fire

from llama import Llama
from llama.cli import print_events, resolve_model, stream_flag
from llama.distributed import report_rank_failures
from llama.guard import checkers_from_specs
from llama.streaming import StreamEvent, in_order


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    stream: Optional[bool] = None,
    safety: Optional[str] = None,
):
    """Complete a few prompts: plain continuations and few-shot patterns.

    Without --ckpt_dir, runs the built-in demo model (built on first use).
    Pretrained models only continue text: the prompt should make the answer its natural continuation.
    --compile: torch.compile the decode step (CUDA graphs on CUDA, Inductor on CPU; warm-up printed).
    --quantize int8: weight-only int8 linear layers (about half the bytes per token of bfloat16).
    --stream true/false: print completions as they are generated (default: when stdout is a terminal).
    --safety llamaguard:DIR,keywords:FILE: check prompts and completions (comma-separated checkers:
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

    prompts: List[str] = [
        # Plain continuation
        "The river",
        "Simply put, the theory of relativity states that ",
        # A short note in a given register
        """A short note to the team, thanking them for shipping the release:

Hi everyone,

I wanted to""",
        # Few-shot translation
        """Translate English to German:

cheese => Käse
good morning => guten Morgen
thank you => danke
bread =>""",
    ]
    if compile:  # warm up the batch size the first batch will have
        generator.compile(warmup_batch_sizes=(min(len(prompts), max_batch_size),))
    results = None
    if stream:  # the same batch, shown one completion after the other as it is generated
        events = in_order(
            generator.stream_batch_text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        )
    else:
        results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        events = (StreamEvent(i, result["generation"], True) for i, result in enumerate(results))
    print_events(events, lambda i: f"{prompts[i]}\n> ", results)


if __name__ == "__main__":
    with report_rank_failures():  # a rank that only learnt of another's error says so in one line
        fire.Fire(main)
