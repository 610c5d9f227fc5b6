"""Per-site decision threshold: calibrated on validation scores, checked by brute force."""

import itertools

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from core.training.loops import binary_scores, calibrate_threshold, rates_at_threshold


def brute_force_best(scores, labels):
    """Best balanced accuracy over every threshold that splits the sorted scores anywhere."""
    cuts = [float("-inf"), *sorted(set(scores.tolist())), float("inf")]
    return max(balanced_accuracy_score(labels.numpy(), (scores >= t).numpy()) for t in cuts)


@pytest.mark.parametrize("seed", range(6))
def test_calibrated_threshold_reaches_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40 + 10 * seed
    labels = (torch.rand(n, generator=g) < 0.2 + 0.1 * seed).long()
    labels[:2] = torch.tensor([0, 1])  # both classes
    # overlapping classes, some ties (rounded scores)
    scores = (torch.randn(n, generator=g) + 1.2 * labels).mul(4).round().div(4).double()
    threshold = calibrate_threshold(scores, labels)
    got = rates_at_threshold(scores, labels, threshold)
    assert got["balanced-accuracy"] == pytest.approx(brute_force_best(scores, labels))


def test_rates_match_sklearn_and_majority_bias_is_undone():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, generator=g) < 0.8).long()  # 80% prevalence
    scores = torch.randn(200, generator=g).double() + 1.5 * labels + 3.0  # all "positive" at 0
    at_zero = rates_at_threshold(scores, labels, 0.0)
    assert at_zero["balanced-accuracy"] == pytest.approx(0.5)  # a shared bias: chance
    threshold = calibrate_threshold(scores, labels)
    rates = rates_at_threshold(scores, labels, threshold)
    predicted = (scores >= threshold).numpy()
    assert rates["sensitivity"] == pytest.approx(recall_score(labels.numpy(), predicted))
    assert rates["specificity"] == pytest.approx(
        recall_score(labels.numpy(), predicted, pos_label=0)
    )
    assert rates["balanced-accuracy"] > 0.7


def test_binary_scores_rank_like_softmax_and_reject_multiclass():
    logits = torch.randn(30, 2)
    scores = binary_scores(logits)
    p1 = torch.softmax(logits, 1)[:, 1]
    for i, j in itertools.combinations(range(30), 2):
        assert (scores[i] > scores[j]) == (p1[i] > p1[j])
    with pytest.raises(ValueError, match=r"\(N, 1\) or \(N, 2\)"):
        binary_scores(torch.randn(5, 3))


def test_one_class_calibration_split_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="both classes"):
        calibrate_threshold(torch.randn(10).double(), torch.ones(10, dtype=torch.long))
