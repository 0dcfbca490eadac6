"""Our Transformer against Hugging Face's LlamaForCausalLM holding the same weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llama.checkpoint import random_state_dict  # noqa: E402
from llama.hf import hf_config, meta_to_hf_state_dict  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.packed_linear import pack_linear_weights, packing_supported  # noqa: E402

PACKED = pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])

CONFIGS = {
    # Llama-2-7B's architecture (MHA, multiple_of rounding), scaled down.
    "plain": dict(dim=128, n_layers=3, n_heads=4, multiple_of=64, vocab_size=300, norm_eps=1e-5),
    # 70B-style grouped-query attention, Code Llama's rope_theta, ffn_dim_multiplier.
    "gqa": dict(
        dim=128, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
        rope_theta=1e6, vocab_size=300, norm_eps=1e-6,
    ),
}


def build_pair(name, max_seq_len=96, max_batch_size=4, std=0.1, packed=False):
    args = ModelArgs(**CONFIGS[name], max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    state = random_state_dict(args, seed=1, std=std)
    ours = Transformer(args)
    ours.load_state_dict(state)
    if packed:  # the default eager path of Llama.build for float32 on the CPU
        if not packing_supported(torch.device("cpu"), torch.float32):
            pytest.skip("this torch build cannot pack weights (no oneDNN)")
        assert pack_linear_weights(ours) == 7 * args.n_layers + 1
    config = transformers.LlamaConfig(**hf_config(args, dtype=torch.float32))
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.load_state_dict(meta_to_hf_state_dict(state, args))
    return args, ours, theirs


@PACKED
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, packed):
    args, ours, theirs = build_pair(name, packed=packed)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(tokens).logits
    got = ours.forward(tokens, 0)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    print(f"{name} ({'packed' if packed else 'dense'}): max abs logits diff vs transformers = {diff:.2e}")
    assert diff <= 1e-4


@PACKED
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generation_matches_transformers(name, packed):
    from llama.generation import Llama

    args, ours, theirs = build_pair(name, packed=packed)

    class NoEosTokenizer:  # generate() needs only the special ids
        pad_id, eos_id, bos_id = -1, -100, 1

    llama = Llama(ours, NoEosTokenizer())
    prompts = [[1, 17, 42, 99, 5], [1, 250, 3, 77, 64, 12, 8]]
    got, _ = llama.generate(prompts, max_gen_len=32, temperature=0)
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            ref = theirs.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt):].tolist()
        assert out == ref


@PACKED
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_incremental_decode_equals_full_forward(name, packed):
    args, ours, _ = build_pair(name, packed=packed)
    tokens = torch.randint(0, args.vocab_size, (3, 30), generator=torch.Generator().manual_seed(1))
    full = ours.forward(tokens, 0)
    # A prefix, then a chunk continuing it (explicit mask path), then one token at a time.
    pieces = [ours.forward(tokens[:, :10], 0), ours.forward(tokens[:, 10:17], 10)]
    pieces += [ours.forward(tokens[:, p : p + 1], p) for p in range(17, 30)]
    incremental = torch.cat(pieces, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_last_only_matches_full():
    args, ours, _ = build_pair("gqa")
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    full = ours.forward(tokens, 0)
    last = ours.forward(tokens, 0, last_only=True)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5


def test_forward_rejects_too_long_and_too_wide():
    args, ours, _ = build_pair("plain", max_seq_len=16, max_batch_size=2)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        ours.forward(torch.zeros(1, 17, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        ours.forward(torch.zeros(3, 4, dtype=torch.long), 0)


def test_bfloat16_close_to_float32():
    args, ours, _ = build_pair("gqa")
    args16 = ModelArgs(**{**args.__dict__})
    low = Transformer(args16, dtype=torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ours.state_dict().items()})
    tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = ours.forward(tokens, 0)
    got = low.forward(tokens, 0)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()
