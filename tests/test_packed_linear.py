"""oneDNN-packed linear weights (llama/packed_linear.py): what Llama.build runs where packing
was measured faster (llama.kernel_choice) or asked for. Logits against transformers with
packed weights: test_model.py; every kernel against dense float32: test_kernel_choice.py."""

import pytest
import torch

from llama import Llama
from llama.packed_linear import is_packed, pack_linear_weights, packing_supported, unpack_linear_weights

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.device("cpu"), torch.float32), reason="this torch build cannot pack weights (no oneDNN)"
)


def build(ckpt, tok, **kwargs):
    return Llama.build(str(ckpt), str(tok), max_seq_len=64, max_batch_size=4, device="cpu", **kwargs)


def test_build_packs_when_asked_and_generates_the_same(tiny_checkpoint, tiny_tokenizer_path):
    packed = build(tiny_checkpoint, tiny_tokenizer_path, pack_weights=True)
    dense = build(tiny_checkpoint, tiny_tokenizer_path, pack_weights=False)
    assert is_packed(packed.model) and not is_packed(dense.model)
    prompts = ["the river", "a fox and", "plants"]
    a = packed.text_completion(prompts, temperature=0, max_gen_len=16, logprobs=True)
    b = dense.text_completion(prompts, temperature=0, max_gen_len=16, logprobs=True)
    assert [r["generation"] for r in a] == [r["generation"] for r in b]
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["logprobs"], rb["logprobs"]))
    assert diff < 1e-4


def test_state_dict_is_dense_and_exact(tiny_checkpoint, tiny_tokenizer_path):
    packed = build(tiny_checkpoint, tiny_tokenizer_path, pack_weights=True)
    dense = build(tiny_checkpoint, tiny_tokenizer_path, pack_weights=False)
    got, want = packed.model.state_dict(), dense.model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert not got[key].is_mkldnn and got[key].equal(want[key]), key


def test_unpack_and_pack_again(tiny_checkpoint, tiny_tokenizer_path):
    llama = build(tiny_checkpoint, tiny_tokenizer_path, kernels="packed")
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    before = llama.model.forward(tokens, 0)
    n = unpack_linear_weights(llama.model)
    assert n == 7 * llama.model.n_layers + 1 and not is_packed(llama.model)
    assert torch.allclose(llama.model.forward(tokens, 0), before, atol=1e-4)
    assert pack_linear_weights(llama.model) == n and is_packed(llama.model)


def test_not_packed_where_it_does_not_apply(tiny_checkpoint, tiny_tokenizer_path):
    assert not is_packed(build(tiny_checkpoint, tiny_tokenizer_path, pack_weights=False).model)
    quantized = build(tiny_checkpoint, tiny_tokenizer_path, quantize="int8").model
    assert not is_packed(quantized) and pack_linear_weights(quantized) == 0  # int8 layers keep their kernel
    # bfloat16 and float16 pack only where the CPU has the instructions (AVX512-BF16/AMX, AVX512-FP16)
    for dtype in ("bfloat16", "float16"):
        if packing_supported(torch.device("cpu"), getattr(torch, dtype)):
            assert is_packed(build(tiny_checkpoint, tiny_tokenizer_path, dtype=dtype, pack_weights=True).model)
        else:
            with pytest.raises(ValueError, match="float32 on the CPU"):
                build(tiny_checkpoint, tiny_tokenizer_path, dtype=dtype, pack_weights=True)
    with pytest.raises(ValueError, match="exclude each other"):
        build(tiny_checkpoint, tiny_tokenizer_path, quantize="int8", pack_weights=True)
