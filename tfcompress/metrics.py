"""Exact evaluation metrics in NumPy (no binning), for reports and for checking Keras' streaming metrics.

Example:
    >>> exact_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""

import numpy as np


def _binary_labels(labels, n_expected=None, name="labels"):
    labels = np.asarray(labels).reshape(-1)
    if n_expected is not None and labels.shape[0] != n_expected:
        raise ValueError(f"{name} has {labels.shape[0]} values but the scores have {n_expected}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"{name} must be 0 or 1; value {labels[index]!r} at index {index}")
    return labels.astype(bool)


def exact_auc(labels, scores):
    """Area under the ROC curve, computed exactly from ranks (Mann-Whitney U); tied scores count one half.

    Args:
        labels: 0/1 array [N] (any shape; flattened).
        scores: float array [N]; higher means more likely positive.

    Returns:
        float in [0, 1].

    Raises:
        ValueError: labels not 0/1, lengths differ, non-finite scores, or only one class present.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = _binary_labels(labels, scores.shape[0])
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite; index {int(np.argmax(~np.isfinite(scores)))} is not")
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # Average rank of each run of equal scores: ties contribute 1/2 per positive-negative pair.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.shape[0]]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.repeat(run_rank, ends - starts)
    positive_rank_sum = ranks[labels[order]].sum()
    u = positive_rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * float(n_neg)))


def log_loss(labels, probs, eps=1e-7):
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps] (so a 0 or 1 gives a finite loss).

    Args:
        labels: 0/1 array [N].
        probs: predicted P(label = 1), array [N].
        eps: clipping margin, in (0, 0.5).
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    labels = _binary_labels(labels, probs.shape[0])
    if probs.shape[0] == 0:
        raise ValueError("log_loss needs at least one example")
    if np.any(np.isnan(probs)):
        raise ValueError(f"probs must not be NaN; index {int(np.argmax(np.isnan(probs)))} is")
    probs = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(np.where(labels, np.log(probs), np.log1p(-probs))))
