"""The hf engine's next-token sampler (metareward/engines/sampling.py): the top-p nucleus as
transformers defines it, draws that follow the nucleus's probabilities, and seeded repeats."""

import pytest
import torch
from transformers import TopPLogitsWarper

from metareward.engines.sampling import CANDIDATES, nucleus, sample_next_tokens


def _kept(values: torch.Tensor, ids: torch.Tensor) -> list[set[int]]:
    return [set(row_ids[row_values > 0].tolist()) for row_values, row_ids in zip(values, ids)]


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_the_nucleus_is_the_one_transformers_keeps(top_p):
    generator = torch.Generator().manual_seed(0)
    # peaked rows (a few tokens hold the mass) and flat ones (the nucleus is wider than the candidates)
    logits = torch.cat([torch.randn(8, 5000, generator=generator) * 6, torch.randn(4, 5000, generator=generator) * 0.1])
    probabilities = torch.softmax(logits, dim=-1)
    warped = TopPLogitsWarper(top_p)(None, logits.clone())
    expected = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in warped]
    values, ids = nucleus(probabilities, top_p)
    assert _kept(values, ids) == expected
    assert any(len(kept) > CANDIDATES for kept in expected)  # the full-sort fallback was exercised
    assert all(len(kept) < 100 for kept in expected[:8])


def test_draws_follow_the_nucleus_probabilities_and_never_leave_it():
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).expand(20000, -1)
    tokens = sample_next_tokens(logits, temperature=1.0, top_p=0.9)
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    # the nucleus of 0.9 is {0, 1, 2} (0.5 + 0.3 < 0.9 <= 0.95), renormalised over 0.95
    assert counts[3] == 0 and counts[4] == 0
    assert counts[:3].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], abs=0.015)


def test_without_top_p_every_token_can_be_drawn_but_none_of_probability_zero():
    torch.manual_seed(2)
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf"), 0.0]]).expand(30000, -1)
    tokens = sample_next_tokens(logits, temperature=0.7, top_p=1.0)
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert counts[1] == 0 and counts[3] == 0
    assert counts[[0, 2, 4]].tolist() == pytest.approx([1 / 3] * 3, abs=0.015)


def test_temperature_sharpens_the_draws():
    logits = torch.log(torch.tensor([[0.6, 0.4]])).expand(20000, -1)
    torch.manual_seed(3)
    cold = sample_next_tokens(logits, temperature=0.5, top_p=1.0).float().mean()
    # at temperature 0.5 the odds square: 0.4^2 / (0.6^2 + 0.4^2) = 0.3077 for token 1
    assert float(cold) == pytest.approx(0.16 / 0.52, abs=0.015)


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(4)) * 3
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(sample_next_tokens(logits, temperature=0.8, top_p=0.95))
    torch.manual_seed(8)
    other = sample_next_tokens(logits, temperature=0.8, top_p=0.95)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], other)
