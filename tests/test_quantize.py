"""Weight-only int8 quantization (llama.quantize): kernels, agreement with the float model, loading.

Agreement is measured on the tiny configurations of tests/test_model.py with random
weights. Random models have near-ties everywhere (their logits are nearly flat), so
even bfloat16 changes a few greedy tokens; the checks are therefore: logits close
(relative error, against the bfloat16 error as a yardstick), perplexity and KL of
sampled text, top-1 agreement, and greedy tokens equal up to the first near-tie.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import kernel_choice
from llama.checkpoint import random_state_dict
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama import linear_kernels
from llama.parallel_layers import ColumnParallelLinear, RowParallelLinear, linear_layers
from llama.quantize import (
    int8_linear,
    is_quantized,
    is_quantized_key,
    quantize_model,
    quantize_weight,
    weight_bytes,
)

REPO = Path(__file__).resolve().parents[1]

# The reference configurations of tests/test_model.py.
CONFIGS = {
    "plain": dict(dim=128, n_layers=3, n_heads=4, multiple_of=64, vocab_size=300, norm_eps=1e-5),
    "gqa": dict(
        dim=128, n_layers=3, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
        rope_theta=1e6, vocab_size=300, norm_eps=1e-6,
    ),
}
PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3, 77, 64, 12, 8], [1, 2, 3, 4, 5]]


class NoEosTokenizer:
    pad_id, eos_id, bos_id = -1, -100, 1


def models(name, std, dtype=torch.float32):
    """(args, float model, int8 model) on the same random weights."""
    args = ModelArgs(**CONFIGS[name], max_seq_len=128, max_batch_size=4)
    state = {k: v.to(dtype) for k, v in random_state_dict(args, seed=1, std=std).items()}
    float_model = Transformer(args, dtype=dtype)
    float_model.load_state_dict(state)
    int8_model = Transformer(args, dtype=dtype)
    int8_model.load_state_dict(state)
    return args, float_model, quantize_model(int8_model)


def rel_error(got, ref):
    return ((got - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- kernels


def test_quantize_weight_rows():
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_weight(w, scale_dtype=torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (37,)
    assert q.abs().max() <= 127
    nonzero = [r for r in range(37) if r != 5]
    assert (q[nonzero].abs().amax(dim=1) == 127).all()  # the largest entry of each row maps to +-127
    assert (q[5] == 0).all() and torch.isfinite(scales).all()
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()  # round to nearest


def test_quantize_weight_chunks_and_scale_dtype(monkeypatch):
    import llama.quantize as quantize

    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    whole = quantize_weight(w, scale_dtype=torch.bfloat16)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 16 * 7)  # 7 rows at a time
    chunked = quantize_weight(w, scale_dtype=torch.bfloat16)
    assert chunked[1].dtype == torch.bfloat16
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    # q is rounded against the stored (bfloat16) scales: q * scale is within half a step of w
    q, s = chunked
    assert ((q.float() * s.float()[:, None] - w).abs() <= s.float()[:, None] * 0.5001 + 1e-6).all()


@pytest.mark.parametrize("in_features", [64, 30])  # 30: not a multiple of 8, the dequantize fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_int8_linear_matches_dequantized_weight(in_features, dtype, lead):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, in_features, generator=g)
    q, scales = quantize_weight(w, scale_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
    x = torch.randn(*lead, in_features, generator=g).to(dtype)
    got = int8_linear(x, q, scales)
    ref = F.linear(x.float(), q.float() * scales.float()[:, None])
    assert got.dtype == dtype and got.shape == (*lead, 48)
    assert rel_error(got.float(), ref) < 1e-2


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int8_logits_close_to_float(name, dtype):
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    for std in (0.02, 0.1):
        args, float_model, int8_model = models(name, std, dtype)
        ref = float_model.forward(tokens, 0)
        got = int8_model.forward(tokens, 0)
        err = rel_error(got, ref)
        print(f"{name} {dtype} std={std}: relative logits error int8 {err:.4f}")
        assert err < 0.05
        if dtype == torch.float32:  # yardstick: the same model run in bfloat16
            _, bf16_model, _ = models(name, std, torch.bfloat16)
            bf16_err = rel_error(bf16_model.forward(tokens, 0), ref)
            print(f"   bfloat16 {bf16_err:.4f}")
            assert err < 3 * bf16_err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int8_perplexity_and_top1_agree_with_float(name):
    """Text sampled from the float model scores the same under the int8 model (std 0.1: peakier logits)."""
    args, float_model, int8_model = models(name, std=0.1)
    sampled, _ = Llama(float_model, NoEosTokenizer(), seed=3).generate(PROMPTS, 64, temperature=1.0, top_p=1.0, echo=True)
    length = min(map(len, sampled))
    tokens = torch.tensor([s[:length] for s in sampled])
    ref, got = float_model.forward(tokens, 0)[:, :-1], int8_model.forward(tokens, 0)[:, :-1]
    targets = tokens[:, 1:]
    nll_ref = F.cross_entropy(ref.transpose(1, 2), targets)
    nll_got = F.cross_entropy(got.transpose(1, 2), targets)
    ppl_ratio = (nll_got - nll_ref).exp().item()
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"{name}: perplexity {nll_ref.exp():.2f} float, {nll_got.exp():.2f} int8 (ratio {ppl_ratio:.4f}); "
          f"KL {kl:.5f} nats; top-1 agreement {top1:.3f}")
    assert abs(ppl_ratio - 1) < 0.01
    assert kl < 0.003
    assert top1 > 0.9


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int8_greedy_tokens_equal_float_until_a_near_tie(name):
    """Greedy int8 generation equals the float model's up to the first position where
    the float model's two best tokens are closer than the int8 logits error."""
    args, float_model, int8_model = models(name, std=0.02)
    ref_tokens, _ = Llama(float_model, NoEosTokenizer()).generate(PROMPTS, 32, temperature=0)
    got_tokens, _ = Llama(int8_model, NoEosTokenizer()).generate(PROMPTS, 32, temperature=0)
    equal = []
    for prompt, ref, got in zip(PROMPTS, ref_tokens, got_tokens):
        seq = torch.tensor([prompt + ref])
        float_logits = float_model.forward(seq, 0)[0, len(prompt) - 1 : -1]  # the logits that chose each token
        int8_logits = int8_model.forward(seq, 0)[0, len(prompt) - 1 : -1]
        tolerance = 2 * (float_logits - int8_logits).abs().max().item()
        top2 = float_logits.topk(2, dim=-1).values
        near_tie = ((top2[:, 0] - top2[:, 1]) < tolerance).nonzero()
        decisive = int(near_tie[0]) if len(near_tie) else 32
        n_equal = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), 32)
        equal.append(n_equal)
        assert n_equal >= decisive, (prompt, n_equal, decisive)
    print(f"{name}: greedy tokens equal to float for {equal} of 32")


# ----------------------------------------------------------------------------- modules and loading


def test_quantize_model_swaps_every_linear_layer():
    args, float_model, int8_model = models("gqa", std=0.02)
    layers = [layer for _, layer in linear_layers(int8_model)]
    assert len(layers) == 7 * args.n_layers + 1 and all(layer.kernel is linear_kernels.int8 for layer in layers)
    assert is_quantized(int8_model) and not is_quantized(float_model)
    assert isinstance(int8_model.output, ColumnParallelLinear) and int8_model.output.gather_output
    assert isinstance(int8_model.layers[0].attention.wo, RowParallelLinear)
    assert int8_model.layers[0].attention.wo.weight.dtype == torch.int8
    assert int8_model.layers[0].attention.wk.weight.shape == float_model.layers[0].attention.wk.weight.shape
    # only the embedding and the norms remain floating point parameters
    assert {n for n, _ in int8_model.named_parameters()} == {
        n for n, _ in float_model.named_parameters() if n.startswith("tok_embeddings") or "norm" in n
    }
    float_bytes, int8_bytes = weight_bytes(float_model), weight_bytes(int8_model)
    assert int8_bytes < 0.27 * float_bytes  # 1 byte instead of 4, plus scales and norms


def test_int8_layers_keep_the_checkpoint_keys():
    """The int8 layers are the float ones holding int8 ``weight`` and ``scales``: checkpoints load strictly."""
    args, float_model, int8_model = models("plain", std=0.02)
    float_keys = set(float_model.state_dict())
    scales = {k[: -len("weight")] + "scales" for k in float_keys if is_quantized_key(k)}
    assert len(scales) == 7 * args.n_layers + 1 and set(int8_model.state_dict()) == float_keys | scales
    wq = float_model.layers[0].attention.wq
    with pytest.raises(ValueError, match="scales"):
        wq.set_weight(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="scales"):
        wq.set_weight(torch.zeros(4, 4), torch.ones(4))
    assert wq.kernel is linear_kernels.dense


def test_build_quantize_int8(tiny_checkpoint, tiny_tokenizer_path):
    kwargs = dict(max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    quantized = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), quantize="int8", **kwargs)
    reference = Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), **kwargs)
    model = quantized.model
    w2 = model.layers[1].feed_forward.w2
    assert isinstance(w2, RowParallelLinear) and w2.kernel is linear_kernels.int8
    assert w2.weight.dtype == torch.int8 and w2.scales.dtype == torch.bfloat16  # bfloat16: float32 on the CPU
    assert not any(p.requires_grad for p in model.parameters())
    tokens = torch.randint(3, model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    # quantizing while loading gives exactly what quantizing the loaded float model gives (run with the same
    # kernels: the prefill of int8 layers, and the attention, are chosen by measurement)
    expected_model = quantize_model(reference.model)
    kernel_choice.apply(expected_model, model.kernel_plan)
    expected = expected_model.forward(tokens, 0)
    assert torch.equal(model.forward(tokens, 0), expected)
    out = quantized.text_completion(["The river"], max_gen_len=5, temperature=0)
    assert isinstance(out[0]["generation"], str)


def test_build_rejects_unknown_quantize_mode(tiny_checkpoint, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="int8"):
        Llama.build(str(tiny_checkpoint), str(tiny_tokenizer_path), 64, 2, device="cpu", quantize="int4")


WORKER = """
import sys, torch
sys.path.insert(0, {repo!r})
from llama import Llama, distributed
llama = Llama.build({ckpt!r}, {tok!r}, 64, 2, device="cpu", dtype="float32", quantize="int8")
tokens = torch.randint(3, llama.model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
logits = llama.model.forward(tokens, 0)
shapes = {{k: list(v.shape) for k, v in llama.model.state_dict().items() if k.startswith("layers.0.")}}
if distributed.is_main_process():
    torch.save({{"logits": logits, "shapes": shapes}}, {out!r})
"""


def test_int8_on_two_ranks_matches_one(tmp_path, tiny_tokenizer_path):
    """Each rank quantizes its own shard: column-parallel layers split the rows (same scales
    as one rank), row-parallel layers split the columns (every row on every rank, each
    scaled by the largest entry of its local half: a different, equally fine grid)."""
    from helpers import make_checkpoint

    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=-1)
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, params, tiny_tokenizer_path)
    out = tmp_path / "mp2.pt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), ckpt=str(ckpt), tok=str(tiny_tokenizer_path), out=str(out)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LLAMA_DIST_TIMEOUT="30", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    mp2 = torch.load(out)
    assert mp2["shapes"]["layers.0.attention.wq.weight"] == [32, 64]  # rows split
    assert mp2["shapes"]["layers.0.attention.wo.weight"] == [64, 32]  # columns split
    assert mp2["shapes"]["layers.0.attention.wq.scales"] == [32]
    assert mp2["shapes"]["layers.0.attention.wo.scales"] == [64]  # every output row on every rank

    mp1 = Llama.build(str(ckpt), str(tiny_tokenizer_path), 64, 2, device="cpu", dtype="float32", quantize="int8")
    tokens = torch.randint(3, mp1.model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    err = rel_error(mp2["logits"], mp1.model.forward(tokens, 0))
    print(f"relative logits error, 2 ranks vs 1: {err:.4f}")
    assert err < 2e-2
