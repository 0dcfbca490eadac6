"""Next-token selection: nucleus sampling, greedy, seeding and argument checks."""

import math

import pytest
import torch

from llama.sampling import check_sampling_args, next_tokens, sample_top_p

# A fixed distribution in scrambled order, so that index bookkeeping after the sort is exercised.
PROBS = torch.tensor([0.05, 0.30, 0.0, 0.50, 0.15])  # sorted: 3 (.5), 1 (.3), 4 (.15), 0 (.05), 2 (0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(p: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    return sample_top_p(PROBS.expand(n, -1).clone(), p, gen(seed)).reshape(-1)


def test_top_p_near_zero_is_argmax():
    probs = torch.softmax(torch.randn(64, 100, generator=gen(1)) * 3, dim=-1)
    got = sample_top_p(probs.clone(), 1e-6, gen(2))
    assert got.shape == (64, 1)
    assert torch.equal(got[:, 0], probs.argmax(dim=-1))


@pytest.mark.parametrize(
    "p, nucleus",
    [
        (0.4, {3}),  # 0.5 alone exceeds 0.4
        (0.7, {3, 1}),  # the token that crosses p is kept
        (0.9, {3, 1, 4}),
        (1.0, {3, 1, 4, 0}),  # everything with probability > 0
    ],
)
def test_tokens_outside_the_nucleus_are_never_drawn(p, nucleus):
    got = draws(p)
    assert set(got.tolist()) == nucleus
    # Within the nucleus, tokens are drawn in proportion to their renormalised probability.
    mass = sum(PROBS[i].item() for i in nucleus)
    for i in nucleus:
        freq = (got == i).float().mean().item()
        expected = PROBS[i].item() / mass
        assert abs(freq - expected) < 4 * math.sqrt(expected * (1 - expected) / len(got)) + 1e-9


def test_zero_probability_tokens_never_drawn():
    assert 2 not in draws(1.0, n=8000).tolist()


def test_same_seed_same_draws_and_input_untouched():
    probs = torch.softmax(torch.randn(16, 50, generator=gen(3)), dim=-1)
    before = probs.clone()
    a = sample_top_p(probs, 0.9, gen(123))
    b = sample_top_p(probs, 0.9, gen(123))
    c = sample_top_p(probs, 0.9, gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(probs, before)  # sampling does not modify its input


def test_sampling_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    sample_top_p(PROBS.expand(8, -1).clone(), 0.9, gen(0))
    next_tokens(torch.randn(4, 10, generator=gen(0)), 1.0, 0.9, gen(0))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_temperature_zero_is_argmax_and_draws_nothing():
    logits = torch.randn(32, 77, generator=gen(5))
    g = gen(9)
    state = g.get_state()
    got = next_tokens(logits, 0.0, 0.9, g)
    assert got.shape == (32,)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(g.get_state(), state)  # greedy consumes no random numbers


def test_next_tokens_sampling_shape_and_seed():
    logits = torch.randn(6, 40, generator=gen(6))
    a = next_tokens(logits, 0.8, 0.95, gen(1))
    b = next_tokens(logits, 0.8, 0.95, gen(1))
    assert a.shape == (6,) and a.dtype == torch.long
    assert torch.equal(a, b)


def test_next_tokens_tiny_top_p_is_argmax_at_any_temperature():
    logits = torch.randn(20, 60, generator=gen(7))
    for temperature in (0.1, 1.0, 5.0):
        assert torch.equal(next_tokens(logits, temperature, 1e-6, gen(0)), logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [-0.1, -1, float("nan"), "0.5", None, True, False])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0 \(0 means greedy\)"):
        check_sampling_args(temperature, 0.9)


@pytest.mark.parametrize("top_p", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "0.9", None, True])
def test_bad_top_p(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        check_sampling_args(0.6, top_p)


@pytest.mark.parametrize("temperature, top_p", [(0, 1), (0.0, 0.5), (1.5, 1.0), (0.6, 1e-9)])
def test_good_arguments(temperature, top_p):
    check_sampling_args(temperature, top_p)


def full_sort_nucleus(probs: torch.Tensor, p: float) -> dict:
    """Token -> renormalised probability, computed the reference way (a full sort)."""
    probs_sort, probs_idx = torch.sort(probs, descending=True)
    keep = torch.cumsum(probs_sort, -1) - probs_sort <= p
    kept = probs_sort[keep] / probs_sort[keep].sum()
    return dict(zip(probs_idx[keep].tolist(), kept.tolist()))


@pytest.mark.parametrize("scale", [4.0, 0.05], ids=["peaked (top-k path)", "flat (full sort)"])
def test_large_vocabulary_draws_follow_the_full_sort_nucleus(scale):
    vocab, p, n = 2000, 0.8, 4000
    probs = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * scale, -1)
    nucleus = full_sort_nucleus(probs, p)
    if scale > 1:
        assert len(nucleus) < 256 < vocab  # the cheap path applies
    else:
        assert len(nucleus) > 256  # it does not
    rows = probs.expand(n, vocab).contiguous()
    got = sample_top_p(rows, p, gen(4)).reshape(-1).tolist()
    assert set(got) <= set(nucleus)
    counts = torch.bincount(torch.tensor(got), minlength=vocab).float() / n
    top = max(nucleus, key=nucleus.get)
    assert abs(counts[top].item() - nucleus[top]) < 0.03  # the most likely token's frequency
