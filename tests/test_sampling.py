"""Choosing the next token: sampling against transformers' logits processors, its draws, its launches."""
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from bailong.generation import Sampling, generate, process_logits, seen_mask

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)

@pytest.mark.parametrize("s", [Sampling(0.7, 0, 1.0, 1.0), Sampling(1.0, 5, 1.0, 1.0), Sampling(1.0, 0, 0.8, 1.0),
                               Sampling(1.0, 0, 1.0, 1.3), Sampling(0.6, 40, 0.9, 1.1), Sampling(1.0, 1, 1.0, 1.0)])
def test_logit_processing_matches_transformers(s):
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3  # rows of their own: each its own top-k and top-p threshold
    seen = torch.randint(0, 100, (4, 30))
    expected = logits.clone()
    for proc in [RepetitionPenaltyLogitsProcessor(s.repetition_penalty) if s.repetition_penalty != 1 else None,
                 TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(s.top_k) if s.top_k else None,
                 TopPLogitsWarper(s.top_p) if s.top_p < 1 else None]:
        if proc is not None:
            expected = proc(seen, expected)
    torch.testing.assert_close(dense(logits, seen_mask(seen, 100), s), expected)


def dense(logits, seen, s):
    """process_logits' candidates as (B, V) logits: those not among them -inf."""
    values, ids = process_logits(logits, seen, s)
    return values if ids is None else torch.full_like(logits, float("-inf")).scatter(-1, ids, values)


def test_sampling_draws_each_token_with_its_probability_and_never_a_filtered_one():
    from bailong.generation import sample
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    rows = 40_000  # the same logits in every row: one draw each
    for s in [Sampling(0.8, 0, 1.0, 1.0, seed=1), Sampling(1.0, 4, 1.0, 1.0, seed=1),
              Sampling(1.0, 0, 0.7, 1.3, seed=1), Sampling(0.7, 6, 0.8, 1.2, seed=1)]:
        seen = seen_mask(torch.tensor([[3, 5]]), 12).expand(rows, -1).clone()
        expected = dense(logits, seen[:1], s).softmax(-1)[0]
        tokens = sample(logits.expand(rows, -1), seen, s, torch.Generator().manual_seed(s.seed))
        counts = torch.bincount(tokens, minlength=12).double() / rows
        assert (counts[expected == 0] == 0).all()  # filtered by top-k or top-p: never drawn
        # within 5 standard errors of each probability
        torch.testing.assert_close(counts, expected.double(), atol=5 * (0.25 / rows) ** 0.5, rtol=0)
        assert seen[torch.arange(rows), tokens].all()  # each row's draw marked as seen


def test_greedy_takes_the_first_of_tied_logits_with_top_k_and_top_p_set():
    """Greedy is argmax, as transformers' is, whatever top-k (whose order among ties is torch.topk's) and top-p say."""
    from bailong.generation import sample
    logits = torch.randn(3, 1000).bfloat16().float()
    logits[:, [7, 300, 901]] = 50.0
    token = sample(logits, seen_mask(torch.tensor([[1]] * 3), 1000), Sampling(temperature=0, top_k=40, top_p=0.5))
    assert token.tolist() == [7, 7, 7]


def test_logits_that_are_not_finite_are_reported_not_sampled(tiny, monkeypatch):
    from bailong.generation import sample
    logits = torch.randn(3, 10)
    logits[0, 4], logits[1, 2] = float("nan"), float("inf")
    for s in [GREEDY, Sampling(temperature=1.0), Sampling(temperature=1e-38)]:  # the last overflows logits / T
        tokens = sample(logits, seen_mask(torch.tensor([[0]] * 3), 10), s, torch.Generator().manual_seed(0))
        assert tokens[:2].tolist() == [-1, -1] and (tokens[2] >= 0 or s.temperature == 1e-38)
    vocab = tiny.config.vocab_size
    monkeypatch.setattr(tiny.lm_head, "forward", lambda h: torch.full((*h.shape[:-1], vocab), float("nan")))
    with pytest.raises(FloatingPointError, match="not finite"):
        generate(tiny, [1, 2, 3], 5, GREEDY)


def test_sampling_never_waits_for_the_device():
    """No operation whose result the host must read: a scalar, or a data-dependent shape (boolean indexing
    finds its indices on the host first; the sampling before this version did it twice a token)."""
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    from bailong.generation import sample

    class Waits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            indices = pytree.tree_leaves(args[1:2]) if func.name().startswith("aten::index") else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices) or func.name() in (
                    "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
                    "aten::multinomial", "aten::item"):
                self.ops.append(func.name())
            return func(*args, **(kwargs or {}))
    logits, seen = torch.randn(3, 50), seen_mask(torch.randint(0, 50, (3, 9)), 50)
    with Waits() as waits:
        for s in [GREEDY, Sampling(), Sampling(1.0, 0, 0.5, 1.2, seed=0)]:
            sample(logits, seen, s, torch.Generator().manual_seed(0) if s.seed is not None else None)
    assert waits.ops == []


def test_sampling_launch_budget():
    """Kernels a token's choice launches (aten operations that write, as tests/launch_count.py counts them): a
    budget that fails if it grows; with top-k on, nothing sorts the vocabulary (top-p works on the k candidates)."""
    from launch_count import Launches

    from bailong.generation import sample
    logits, seen = torch.randn(1, 3000), seen_mask(torch.randint(0, 3000, (1, 50)), 3000)
    for s, budget in [(GREEDY, 9), (Sampling(seed=0), 29)]:
        with Launches() as launches:
            sample(logits, seen, s, torch.Generator().manual_seed(0))
        assert len(launches.aten) <= budget and "aten::sort" not in launches.aten, launches.aten

