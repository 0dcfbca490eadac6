"""Llama.build(compile=True): the torch.compile'd static-shape decode step (Inductor
on the CPU) generates what the eager path generates, with packed and dense weights. About 40 s of
compilation."""

import pytest

from llama import Llama
from llama.packed_linear import is_packed


@pytest.mark.parametrize("pack_weights", [True, False], ids=["packed", "dense"])
def test_compiled_decode_matches_eager(tiny_checkpoint, tiny_tokenizer_path, pack_weights):
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu", pack_weights=pack_weights)
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
    assert compiled._decode_step is not None and is_packed(compiled.model) == pack_weights
    prompts = ["the river", "once upon a time a fox"]
    a = eager.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    b = compiled.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["logprobs"], rb["logprobs"]))
    assert diff < 1e-4
    # Compiling a model that is already in use (another batch size compiles on first use).
    eager.compile(warmup_batch_sizes=(2,))
    c = eager.text_completion(prompts, temperature=0, max_gen_len=20)
    assert [r["generation"] for r in c] == [r["generation"] for r in a]
