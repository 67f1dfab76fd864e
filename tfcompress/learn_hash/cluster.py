"""Frequency-aware 1-D agglomerative clustering of ids by one teacher value ("Learning to Collide", stage 2).

The ids are sorted by their teacher value, so only neighbouring clusters ever merge and every cluster is a contiguous
run of the sorted order. The clustering runs in rounds, each one a handful of whole-array NumPy operations (no Python
loop per id or per merge), which is what lets a 10M-id table finish in well under a minute:

1. candidates: every pair of neighbouring clusters whose merged size stays within `max_cluster_size`;
2. rank: by frequency score first, lowest first, then by distance between the two cluster values. The frequency
   score of a cluster is `count / ||C||_2 + 1` (C: the per-id count vector of the whole table, so the score is at
   least 1 and grows with traffic); a pair scores the product of its two clusters' scores. Rare ids are thus merged
   first, and the frequent ones, which carry most of the training signal, keep their own rows the longest;
3. select: the best `ceil(merge_fraction * clusters)` candidates, never more than the merges still needed;
4. split chains: selected pairs that share a cluster form chains; each chain is split left to right into disjoint
   pairs (A B C D E with all four pairs selected merges AB and CD and leaves E), so a cluster merges at most once per
   round and no merged cluster exceeds the cap;
5. merge: sizes and counts add, values become frequency-weighted means (or plain means with `weighted=False`).

Rounds repeat until exactly `num_clusters` remain: a round never executes more merges than are still needed, so the
count cannot overshoot. When no pair under the cap is left but merges are still needed, the cap is lifted for the
rest (with a warning) rather than missing the target.

Example:

>>> result = cluster_1d(values=[0.0, 0.1, 5.0, 5.2], counts=[1, 1, 1, 1], num_clusters=2)
>>> result.labels.tolist(), result.sizes.tolist()
([0, 0, 1, 1], [2, 2])
"""

import dataclasses
import math
import warnings

import numpy as np


@dataclasses.dataclass
class ClusterResult:
    """Output of `cluster_1d`.

    Attributes:
        labels: int64 [n], the cluster of each input id (input order); clusters are numbered in increasing value.
        values: float64 [k], each cluster's (weighted) mean teacher value.
        sizes: int64 [k], ids per cluster.
        counts: float64 [k], summed access counts per cluster.
        rounds: how many merge rounds ran.
        cap_lifted: True when the size cap had to be lifted to reach the target.
    """

    labels: np.ndarray
    values: np.ndarray
    sizes: np.ndarray
    counts: np.ndarray
    rounds: int
    cap_lifted: bool = False


def _check_inputs(values, counts, num_clusters, max_cluster_size, merge_fraction):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"values must be finite, got {values[bad]} at position {bad}")
    if counts is None:
        counts = np.ones(values.size)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != values.shape:
        raise ValueError(f"counts must have the shape of values {values.shape}, got {counts.shape}")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("counts must be finite and >= 0")
    if int(num_clusters) != num_clusters or not 1 <= num_clusters <= values.size:
        raise ValueError(f"num_clusters must be an integer in [1, {values.size}], got {num_clusters!r}")
    if max_cluster_size is not None and (int(max_cluster_size) != max_cluster_size or max_cluster_size < 1):
        raise ValueError(f"max_cluster_size must be None or an integer >= 1, got {max_cluster_size!r}")
    if not 0.0 < merge_fraction <= 1.0:
        raise ValueError(f"merge_fraction must be in (0, 1], got {merge_fraction!r}")
    return values, counts, int(num_clusters)


def _chain_split(selected):
    """Of selected neighbour pairs (bool [k-1]), the ones to execute: alternate pairs of each chain, left first.

    A chain is a run of consecutive selected pairs; its pairs at even positions (0, 2, 4, ...) are executed, so no
    cluster takes part in two merges of one round.
    """
    positions = np.arange(selected.size)
    # Start of the run each position belongs to: the last unselected position before it, plus one.
    last_gap = np.maximum.accumulate(np.where(selected, -1, positions))
    offset_in_chain = positions - last_gap - 1
    return selected & (offset_in_chain % 2 == 0)


def _smallest(primary, secondary, take):
    """Positions of the `take` smallest (primary, secondary, position) triples, in no particular order.

    The same set as `np.lexsort((positions, secondary, primary))[:take]`, found with two O(n) partitions instead of
    an O(n log n) sort: everything strictly below the take-th primary value, then the ties at it by secondary
    value, then the ties at that by position (lowest first).
    """
    if take >= primary.size:
        return np.arange(primary.size)
    kth = np.partition(primary, take - 1)[take - 1]
    below = np.flatnonzero(primary < kth)
    ties = np.flatnonzero(primary == kth)
    need = take - below.size
    if need < ties.size:
        tie_secondary = secondary[ties]
        kth2 = np.partition(tie_secondary, need - 1)[need - 1]
        below2 = ties[tie_secondary < kth2]
        ties2 = ties[tie_secondary == kth2]  # ascending positions: flatnonzero keeps order
        ties = np.concatenate([below2, ties2[: need - below2.size]])
    return np.concatenate([below, ties])


def cluster_1d(values, counts=None, num_clusters=1, max_cluster_size=None, weighted=True, merge_fraction=0.25):
    """Cluster ids on a line (their teacher values) into exactly `num_clusters` contiguous runs.

    Args:
        values: float [n], one teacher value per id.
        counts: float or int [n] >= 0, accesses per id (None: all 1). Drives the frequency score and the weights.
        num_clusters: clusters to end with, in [1, n].
        max_cluster_size: most ids in one cluster (None: no cap). Respected as long as any merge under it is left.
        weighted: cluster values are count-weighted means (a cluster of only zero-count ids falls back to the plain
            mean); False: plain means.
        merge_fraction: at most this fraction of the current clusters is selected for merging per round, in (0, 1].
            Smaller is closer to one-merge-at-a-time agglomerative clustering, larger is faster.

    Returns:
        ClusterResult.

    Raises:
        ValueError: empty or non-finite values, counts of another shape or negative, num_clusters outside [1, n].
    """
    values, counts, target = _check_inputs(values, counts, num_clusters, max_cluster_size, merge_fraction)
    n = values.size
    order = np.argsort(values, kind="stable")
    x = values[order]
    w = counts[order]
    norm = float(np.sqrt(np.sum(w * w)))
    norm = norm if norm > 0 else 1.0

    # Per-cluster sums; a cluster is the run of sorted positions [starts[j], starts[j + 1]).
    starts = np.arange(n, dtype=np.int64)
    size = np.ones(n, dtype=np.int64)
    weight = w.copy()
    weighted_sum = x * w
    plain_sum = x.copy()
    mean = x.copy()
    cap = np.inf if max_cluster_size is None else int(max_cluster_size)
    cap_lifted = False
    rounds = 0

    while starts.size > target:
        k = starts.size
        needed = k - target
        merged_size = size[:-1] + size[1:]
        candidates = merged_size <= cap
        if not candidates.any():
            warnings.warn(f"no neighbouring clusters fit max_cluster_size={max_cluster_size} with {needed} merges "
                          f"still needed to reach {target} clusters; lifting the cap", stacklevel=2)
            cap, cap_lifted = np.inf, True
            candidates = np.ones(k - 1, dtype=bool)
        candidate_index = np.flatnonzero(candidates)
        score = weight / norm + 1.0
        pair_score = (score[:-1] * score[1:])[candidate_index]
        distance = (mean[1:] - mean[:-1])[candidate_index]
        take = min(needed, candidate_index.size, max(1, math.ceil(merge_fraction * k)))
        chosen = candidate_index[_smallest(pair_score, distance, take)]
        selected = np.zeros(k - 1, dtype=bool)
        selected[chosen] = True
        executed = _chain_split(selected)

        # Cluster j + 1 joins cluster j for every executed pair j; the rest start a new cluster.
        keep = np.ones(k, dtype=bool)
        keep[1:] = ~executed
        new_starts = np.flatnonzero(keep)
        size = np.add.reduceat(size, new_starts)
        weight = np.add.reduceat(weight, new_starts)
        weighted_sum = np.add.reduceat(weighted_sum, new_starts)
        plain_sum = np.add.reduceat(plain_sum, new_starts)
        starts = starts[new_starts]
        if weighted:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(weight > 0, weighted_sum / np.where(weight > 0, weight, 1.0), plain_sum / size)
        else:
            mean = plain_sum / size
        rounds += 1

    labels_sorted = np.repeat(np.arange(starts.size, dtype=np.int64), size)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return ClusterResult(labels=labels, values=mean, sizes=size, counts=weight, rounds=rounds, cap_lifted=cap_lifted)
