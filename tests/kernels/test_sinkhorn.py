import math

import pytest
import torch

from kernels.sinkhorn import sinkhorn


def reference_sinkhorn(scores, epsilon, num_iters):
    """SwAV's Sinkhorn-Knopp written out element by element in float64 (linear domain)."""
    B, K = scores.shape
    Q = [[math.exp(float(scores[b, k]) / epsilon) for b in range(B)] for k in range(K)]  # (K, B)
    total = sum(sum(row) for row in Q)
    Q = [[q / total for q in row] for row in Q]
    for _ in range(num_iters):
        for k in range(K):
            row_sum = sum(Q[k])
            Q[k] = [q / row_sum / K for q in Q[k]]
        for b in range(B):
            col_sum = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / col_sum / B
    out = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        col_sum = sum(Q[k][b] for k in range(K))
        for k in range(K):
            out[b, k] = Q[k][b] / col_sum
    return out


def random_scores(batch_size, num_prototypes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch_size, num_prototypes, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def test_rows_sum_to_one_and_output_is_detached():
    scores = random_scores(32, 10).requires_grad_()
    Q = sinkhorn(scores, epsilon=0.05, num_iters=3)
    assert Q.shape == (32, 10) and Q.dtype == torch.float32 and not Q.requires_grad
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(32), atol=1e-6, rtol=0)


def test_column_marginal_approaches_uniform():
    scores = random_scores(64, 8) + torch.linspace(0, 1, 8)  # favours the last prototypes
    uniform = torch.full((8,), 1 / 8)
    errors = [
        (sinkhorn(scores, epsilon=0.2, num_iters=num_iters).mean(dim=0) - uniform).abs().max()
        for num_iters in (0, 3, 30)
    ]
    assert errors[0] > 0.1
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


@pytest.mark.parametrize("num_iters", [0, 1, 3, 10])
def test_matches_float64_loop_reference(num_iters):
    scores = random_scores(12, 7, seed=num_iters)
    expected = reference_sinkhorn(scores, epsilon=0.1, num_iters=num_iters)
    Q = sinkhorn(scores, epsilon=0.1, num_iters=num_iters, use_double_precision=True)
    assert Q.dtype == torch.float64
    torch.testing.assert_close(Q, expected, atol=1e-12, rtol=1e-10)
    Q32 = sinkhorn(scores, epsilon=0.1, num_iters=num_iters)
    torch.testing.assert_close(Q32.double(), expected, atol=1e-5, rtol=1e-4)


def test_invariant_to_a_constant_added_to_scores():
    scores = random_scores(16, 5, seed=3, dtype=torch.float64)
    Q = sinkhorn(scores, epsilon=0.05, num_iters=3, use_double_precision=True)
    Q_shifted = sinkhorn(scores + 1000.0, epsilon=0.05, num_iters=3, use_double_precision=True)
    torch.testing.assert_close(Q_shifted, Q, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_scores_small_epsilon_stay_finite(dtype):
    # exp(scores / epsilon) overflows float32 without the shift, and (max - min) / epsilon = 2e5
    # underflows whole rows and columns to zero in the linear form.
    scores = (random_scores(32, 16, seed=5) * 100 + 500).to(dtype)
    Q = sinkhorn(scores, epsilon=1e-3, num_iters=3)
    assert Q.dtype == torch.float32 and torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(32), atol=1e-5, rtol=0)
    # The low-precision input is upcast before dividing by epsilon: same codes as from its float32 copy.
    torch.testing.assert_close(Q, sinkhorn(scores.float(), epsilon=1e-3, num_iters=3))


def test_hard_assignment_is_one_hot_at_the_soft_argmax():
    scores = random_scores(20, 6, seed=7)
    soft = sinkhorn(scores, epsilon=0.05, num_iters=3)
    hard = sinkhorn(scores, epsilon=0.05, num_iters=3, hard_assignment=True)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hard.sum(dim=1), torch.ones(20))
    assert torch.equal(hard.argmax(dim=1), soft.argmax(dim=1))
