"""Next-token selection: greedy, or temperature + nucleus (top-p) sampling."""

from typing import Optional, Sequence, Union

import torch


# Candidates tried before a full sort: a nucleus usually holds a few dozen tokens, and
# ``topk`` of a few hundred is ~20x cheaper than sorting a 32000-token vocabulary.
_TOP_P_CANDIDATES = (256,)


def sample_top_p(
    probs: torch.Tensor,
    p: Union[float, torch.Tensor],
    generator: Union[None, torch.Generator, Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """Draw one token per row from the smallest set of tokens whose probability mass exceeds ``p``.

    probs: (bsz, vocab) probabilities. ``p``: one threshold, or one per row (bsz,).
    ``generator``: one for the whole batch, or one per row (each row's draw then depends
    on its own generator only, whatever else shares the batch). Returns (bsz, 1) token
    ids. The token that crosses ``p`` is kept, so the nucleus is never empty.

    The nucleus is looked for among the ``k`` most probable tokens first (``topk``,
    sorted); when every row's top ``k`` hold more than ``p``, no token outside them can
    be in the nucleus, so this is exactly the full-sort nucleus at a fraction of the
    cost. Otherwise (flat distributions) it falls back to sorting the whole vocabulary.
    """
    vocab = probs.shape[-1]
    if isinstance(p, torch.Tensor):
        p = p.to(probs.device, probs.dtype)[:, None]  # (bsz, 1)
    for k in _TOP_P_CANDIDATES:
        if k >= vocab:
            break
        probs_sort, probs_idx = torch.topk(probs, k, dim=-1)  # (bsz, k), descending
        if bool((probs_sort.sum(dim=-1, keepdim=True) > p).all()):
            return _draw_from_nucleus(probs_sort, probs_idx, p, generator)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    return _draw_from_nucleus(probs_sort, probs_idx, p, generator)


def _draw_from_nucleus(probs_sort: torch.Tensor, probs_idx: torch.Tensor, p, generator) -> torch.Tensor:
    """Sample from sorted probabilities (bsz, n) after zeroing those outside the nucleus; (bsz, 1) ids."""
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # the mass before the token already exceeds p
    probs_sort = probs_sort.masked_fill(mask, 0.0)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    if generator is None or isinstance(generator, torch.Generator):
        next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    else:  # one generator per row: a row's draw does not depend on the others
        next_token = torch.cat(
            [torch.multinomial(row[None], num_samples=1, generator=g) for row, g in zip(probs_sort, generator)]
        )
    return torch.gather(probs_idx, -1, next_token)


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Pick the next token of each row from its last-position ``logits`` (bsz, vocab): (bsz,)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    generators: Sequence[Optional[torch.Generator]],
) -> torch.Tensor:
    """Next token of each row of ``logits`` (bsz, vocab) with the row's own settings: (bsz,).

    Row ``i`` is greedy when ``temperatures[i] == 0``, else drawn by nucleus sampling
    with ``top_ps[i]`` from ``generators[i]``. The rows that sample share one softmax
    and one top-k; each draws with its own generator.
    """
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([temperatures[i] for i in sampled], device=logits.device, dtype=logits.dtype)
        probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
        p = torch.tensor([float(top_ps[i]) for i in sampled])
        drawn = sample_top_p(probs, p, [generators[i] for i in sampled]).reshape(-1)
        tokens[index] = drawn
    return tokens


def check_sampling_args(temperature: float, top_p: float) -> None:
    # bool is an int subclass: True would silently mean temperature 1
    is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not is_number or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
