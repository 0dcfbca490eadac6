"""Llama.build(compile=True): the torch.compile'd static-shape decode step (frozen Inductor
on the CPU) generates what the eager path generates. About 20 s of compilation."""

from llama import Llama
from llama.packed_linear import is_packed


def test_compiled_decode_matches_eager(tiny_checkpoint, tiny_tokenizer_path):
    kwargs = dict(max_seq_len=48, max_batch_size=2, device="cpu")
    eager = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    compiled = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), compile=True, **kwargs)
    assert compiled._decode_step is not None and not is_packed(compiled.model)
    prompts = ["the river", "once upon a time a fox"]
    a = eager.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    b = compiled.text_completion(prompts, temperature=0, max_gen_len=20, logprobs=True)
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["logprobs"], rb["logprobs"]))
    assert diff < 1e-4
    # A packed model compiled later is unpacked first (Inductor packs frozen weights itself).
    assert is_packed(eager.model)
    eager.compile(warmup_batch_sizes=(2,))
    assert not is_packed(eager.model)
    c = eager.text_completion(prompts, temperature=0, max_gen_len=20)
    assert [r["generation"] for r in c] == [r["generation"] for r in a]
