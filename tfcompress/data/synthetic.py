"""Planted-signal synthetic click logs shaped like Criteo Kaggle or Avazu: the package's embedded default data.

Rows look like the real logs (heavy-tailed dense counts with missing values, Zipf-distributed categorical ids over
tables with the real cardinalities), and the labels come from a known ("planted") model, so every dataset comes with
its own ceiling: the AUC of the planted click probabilities on the generated rows (`stats.json`, `ceiling_auc`).

The planted model, per row::

    logit = intercept + scale * ( sqrt(w_b) * B + sqrt(w_i) * I + sqrt(w_d) * D ) / sqrt(w_b + w_i + w_d)
    B     = sum_f u_f * bias_f(id_f)                                  first-order effects
    I     = sum_{(f,g) in pairs} w_fg * <v_f(id_f), v_g(id_g)> / sqrt(k)   pairwise interactions (fixed random pairs)
    D     = sum_d a_d * x_d + b_d * relu(x_d - knee_d)                dense effects on x = log1p(count), missing -> 0
    label ~ Bernoulli(sigmoid(logit))

B, I and D are each standardized on a fixed calibration sample; `scale` is set by bisection so that the expected
AUC of the planted probabilities is `target_auc`, and `intercept` by bisection so that the click rate is
`click_rate`. Both are deterministic functions of the seed and the options.

Per-id quantities are never stored (the largest Criteo table has 10M ids): they are computed from (table, id) with a
counter-based hash (splitmix64 over uint64, vectorized in NumPy). Ids fall into latent groups
(group = hash(table, id) mod G_t, G_t = min(n_t, num_groups)); an id's latent vector is its group centroid plus a
smaller per-id perturbation (`within_group_noise`), and likewise its bias. So "similar ids" exist: ids of one group
behave alike, which a learned-hashing layer can exploit.

Ids: rank r ~ bounded Zipf(s_t) on [0, n_t) by inverse CDF; id = (r * A_t + B_t) mod n_t with gcd(A_t, n_t) = 1, a
bijection that scatters the head over the id space without a 10M-entry permutation array.

Streams: the world (exponents, bijections, centroids, weights, pairs) comes from `seed`; each chunk of
`CHUNK_ROWS` rows of a split draws from its own streams keyed by (seed, split, chunk, quantity). Output therefore
depends only on the seed and the options, is byte-identical across runs, and a dataset of R rows is a prefix of
one with more rows. Memory is constant in the number of rows (apart from 5 bytes per row kept for the exact AUC).

Example:
    >>> stats = generate("/tmp/synth", dataset="criteo", rows=100_000, eval_rows=10_000, cardinality_scale=0.01)
    >>> round(stats["splits"]["train"]["click_rate"], 2)
    0.25
"""

import json
import logging
import math
import os
import shutil

import numpy as np

from tfcompress.data.encoding import splitmix64
from tfcompress.data.schema import Schema
from tfcompress.data.tfrecord import ShardWriter, serialize_rows
from tfcompress.metrics import exact_auc, log_loss

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CHUNK_ROWS = 65536  # rows per independent random stream; part of the output definition (changing it changes data)
CALIBRATION_ROWS = 32768
DEFAULT_ROWS_PER_SHARD = 262144
STATS_FILENAME = "stats.json"

# Criteo Kaggle (Display Advertising Challenge) per-column distinct-value counts of C1..C26.
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10,
    5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
# Fraction of missing values of I1..I13 in the Kaggle training set (rounded).
CRITEO_DENSE_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.77, 0.22]
# log-scale location and spread of each dense count (count = floor(exp(mu + sigma * z))): small counts for most
# columns, thousands for I5, matching the orders of magnitude of the real columns.
CRITEO_DENSE_MU = [0.5, 1.2, 1.8, 1.5, 7.5, 3.5, 1.5, 2.3, 3.8, 0.2, 0.8, 0.3, 1.7]
CRITEO_DENSE_SIGMA = [1.2, 1.8, 1.3, 1.0, 1.8, 1.6, 1.3, 1.0, 1.4, 0.6, 0.9, 1.0, 1.1]

# Avazu CTR (Kaggle) distinct-value counts of its 21 categorical fields, then hour-of-day and weekday derived from
# the `hour` timestamp. Avazu has no dense features.
AVAZU_SPARSE_NAMES = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18",
    "C19", "C20", "C21", "hour_of_day", "weekday",
]
AVAZU_CARDINALITIES = [
    7, 7, 4737, 7745, 26, 8552, 559, 36, 2686408, 6729486, 8251, 5, 4, 2626, 8, 9, 435, 4, 68, 172, 60, 24, 7,
]
# Time fields are close to uniform, not Zipf.
AVAZU_ZIPF_OVERRIDES = {"hour_of_day": 0.3, "weekday": 0.1}

DATASETS = ("criteo", "avazu")

DEFAULT_OPTIONS = {
    "latent_dim": 8,
    "num_groups": 64,
    "within_group_noise": 0.5,
    "num_pairs": None,  # None: 2 * n_sparse pairs
    "bias_weight": 0.35,
    "interaction_weight": 0.45,
    "dense_weight": 0.2,
    "target_auc": 0.80,
    "click_rate": 0.25,
    "zipf_exponent_range": [1.05, 1.2],
}

SPLIT_CODES = {"train": 1, "eval": 2, "calibration": 3}
# One stream per random quantity, so each is a prefix-stable sequence in the row index.
_STREAM_RANKS, _STREAM_DENSE, _STREAM_MISSING, _STREAM_LABEL = range(4)

_SQRT3 = math.sqrt(3.0)


def bounded_zipf_ranks(uniforms, n, exponent):
    """Ranks in [0, n) with P(rank = r) ~ (r + 1)^-exponent, by the inverse CDF of the continuous density on [1, n+1).

    Args:
        uniforms: floats in [0, 1).
        n: number of ranks (table size), >= 1.
        exponent: Zipf exponent s >= 0 (0 is uniform).
    """
    u = np.asarray(uniforms, dtype=np.float64)
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(float(n + 1), u)
    else:
        one_minus_s = 1.0 - exponent
        x = np.power(1.0 + u * (math.pow(n + 1.0, one_minus_s) - 1.0), 1.0 / one_minus_s)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


def scale_cardinalities(cardinalities, cardinality_scale):
    """max(1, round(n * scale)) per table."""
    return [max(1, int(round(n * cardinality_scale))) for n in cardinalities]


def expected_auc(probs, scores=None):
    """E[#correctly ordered (pos, neg) pairs] / E[#pairs] when label_i ~ Bernoulli(probs_i), ranking by `scores`.

    With scores=None, `probs` must already be sorted by score (ascending).
    """
    probs = np.asarray(probs, dtype=np.float64)
    p = probs if scores is None else probs[np.argsort(scores, kind="stable")]
    negatives_below = np.cumsum(1.0 - p) - (1.0 - p)  # negative mass ranked strictly below each row
    correct = np.sum(p * negatives_below)
    pairs = p.sum() * (1.0 - p).sum() - np.sum(p * (1.0 - p))
    return float(correct / pairs)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _intercept_for_rate(signal, rate):
    """c with mean(sigmoid(c + signal)) == rate, by bisection (monotone in c)."""
    lo, hi = -40.0, 40.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if np.mean(_sigmoid(mid + signal)) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def normalize_options(options):
    """Planted-model options with defaults filled in, validated, as plain JSON types."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown generator options {unknown}; allowed: {sorted(DEFAULT_OPTIONS)}")
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options)
    opts["zipf_exponent_range"] = [float(v) for v in opts["zipf_exponent_range"]]
    for name in ("latent_dim", "num_groups"):
        if int(opts[name]) != opts[name] or opts[name] < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {opts[name]!r}")
        opts[name] = int(opts[name])
    if opts["num_pairs"] is not None:
        if int(opts["num_pairs"]) != opts["num_pairs"] or opts["num_pairs"] < 0:
            raise ValueError(f"num_pairs must be None or an integer >= 0, got {opts['num_pairs']!r}")
        opts["num_pairs"] = int(opts["num_pairs"])
    for name in ("within_group_noise", "bias_weight", "interaction_weight", "dense_weight"):
        opts[name] = float(opts[name])
        if not opts[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {opts[name]!r}")
    opts["target_auc"] = float(opts["target_auc"])
    if not 0.5 < opts["target_auc"] < 1.0:
        raise ValueError(f"target_auc must be in (0.5, 1), got {opts['target_auc']!r}")
    opts["click_rate"] = float(opts["click_rate"])
    if not 0.0 < opts["click_rate"] < 1.0:
        raise ValueError(f"click_rate must be in (0, 1), got {opts['click_rate']!r}")
    low, high = opts["zipf_exponent_range"] if len(opts["zipf_exponent_range"]) == 2 else (-1, -1)
    if not 0.0 <= low <= high:
        raise ValueError(f"zipf_exponent_range must be [low, high] with 0 <= low <= high, got "
                         f"{opts['zipf_exponent_range']!r}")
    return opts


def dataset_columns(dataset):
    """(dense_names, sparse_names, full cardinalities, dense_transform) of a dataset shape."""
    if dataset == "criteo":
        return ([f"I{i}" for i in range(1, 14)], [f"C{i}" for i in range(1, 27)],
                list(CRITEO_KAGGLE_CARDINALITIES), "log1p")
    if dataset == "avazu":
        return [], list(AVAZU_SPARSE_NAMES), list(AVAZU_CARDINALITIES), "none"
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


class PlantedModel:
    """The synthetic world of one (dataset, seed, cardinality_scale, options): feature distributions + label model.

    Example:
        >>> model = PlantedModel("criteo", seed=0, cardinality_scale=0.001)
        >>> rows = model.rows("train", 1000)
        >>> rows["sparse"].shape, rows["dense"].shape, rows["label"].shape
        ((1000, 26), (1000, 13), (1000,))

    Args:
        dataset: "criteo" (13 dense + 26 categorical) or "avazu" (23 categorical, no dense).
        seed: integer >= 0; picks the world and, with the split, the rows.
        cardinality_scale: table sizes are max(1, round(n * scale)); > 0.
        **options: planted-model options, see `DEFAULT_OPTIONS`:
            latent_dim (k), num_groups (G), within_group_noise (per-id spread around the group centroid, relative),
            num_pairs (interacting feature pairs), bias_weight / interaction_weight / dense_weight (variance
            shares of the three effects), target_auc (expected ceiling AUC), click_rate, zipf_exponent_range.
    """

    def __init__(self, dataset="criteo", seed=0, cardinality_scale=1.0, **options):
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not (isinstance(cardinality_scale, (int, float)) and cardinality_scale > 0):
            raise ValueError(f"cardinality_scale must be a number > 0, got {cardinality_scale!r}")
        self.dataset = dataset
        self.seed = int(seed)
        self.cardinality_scale = float(cardinality_scale)
        self.options = normalize_options(options)
        dense_names, sparse_names, full_cards, dense_transform = dataset_columns(dataset)
        self.cardinalities = scale_cardinalities(full_cards, self.cardinality_scale)
        self.schema = Schema(
            name=dataset, dense_names=dense_names, sparse_names=sparse_names, cardinalities=self.cardinalities,
            dense_transform=dense_transform, encoding="synthetic",
            extra={"generator": "tfcompress.data.synthetic", "generator_version": GENERATOR_VERSION,
                   "seed": self.seed, "cardinality_scale": self.cardinality_scale},
        )
        self._build_world()
        self._calibrate()

    @property
    def n_sparse(self):
        return len(self.cardinalities)

    @property
    def n_dense(self):
        return self.schema.n_dense

    # ---- the world: every draw from the model stream happens here, in a fixed order -------------------------

    def _build_world(self):
        opts = self.options
        rng = np.random.default_rng([self.seed, 0])
        f, k, g = self.n_sparse, opts["latent_dim"], opts["num_groups"]
        cards = np.asarray(self.cardinalities, dtype=np.int64)

        low, high = opts["zipf_exponent_range"]
        self.zipf_exponents = rng.uniform(low, high, size=f)
        overrides = AVAZU_ZIPF_OVERRIDES if self.dataset == "avazu" else {}
        for name, exponent in overrides.items():
            self.zipf_exponents[self.schema.sparse_names.index(name)] = exponent

        # Rank -> id bijection per table: A coprime with n, so (r * A + B) mod n permutes [0, n).
        raw_a = rng.integers(1, 2**40, size=f)
        raw_b = rng.integers(0, 2**40, size=f)
        self.id_multipliers = np.empty(f, dtype=np.int64)
        self.id_offsets = np.empty(f, dtype=np.int64)
        self._rank_multipliers = np.empty(f, dtype=np.int64)
        for t, n in enumerate(self.cardinalities):
            a = max(1, int(raw_a[t]) % n) if n > 1 else 0
            while math.gcd(a, n) != 1:  # stops at n - 1 at the latest, since gcd(n - 1, n) = 1
                a += 1
            self.id_multipliers[t] = a
            self.id_offsets[t] = int(raw_b[t]) % n
            self._rank_multipliers[t] = pow(a, -1, n) if n > 1 else 0

        self.hash_salts = rng.integers(0, 2**63, size=f, dtype=np.int64).astype(np.uint64)
        self.num_groups = np.minimum(cards, g)
        self.centroids = rng.standard_normal((f, g, k)).astype(np.float32)
        self.group_biases = rng.standard_normal((f, g)).astype(np.float32)
        self.feature_bias_weights = rng.standard_normal(f)
        norm = np.float32(1.0 / math.sqrt(1.0 + opts["within_group_noise"] ** 2))
        self._centroids_scaled = self.centroids * norm  # the 1/sqrt(1 + s^2) of `_within_group`, done once
        self._group_biases_scaled = self.group_biases * norm

        all_pairs = [(a, b) for a in range(f) for b in range(a + 1, f)]
        num_pairs = 2 * f if opts["num_pairs"] is None else opts["num_pairs"]
        if num_pairs > len(all_pairs):
            raise ValueError(f"num_pairs must be <= {len(all_pairs)} (all pairs of {f} features), got {num_pairs}")
        chosen = np.sort(rng.permutation(len(all_pairs))[:num_pairs])
        self.pairs = np.asarray([all_pairs[i] for i in chosen], dtype=np.int64).reshape(-1, 2)
        self.pair_weights = rng.standard_normal(num_pairs)
        self._pair_matrix = np.zeros((f, f), dtype=np.float32)  # sum_g W[f, g] v_g gives the interaction partner
        self._pair_matrix[self.pairs[:, 0], self.pairs[:, 1]] = self.pair_weights

        d = self.n_dense
        self.dense_linear = rng.standard_normal(d)
        self.dense_hinge = rng.standard_normal(d)
        self.dense_knees = rng.uniform(0.5, 3.0, size=d)
        if self.dataset == "criteo":
            self.dense_missing = np.asarray(CRITEO_DENSE_MISSING)
            self.dense_mu = np.asarray(CRITEO_DENSE_MU)
            self.dense_sigma = np.asarray(CRITEO_DENSE_SIGMA)

    # ---- per-id quantities: pure functions of (table, id) ---------------------------------------------------

    def _check_feature_ids(self, feature, ids):
        ids = np.asarray(ids, dtype=np.int64)
        n = self.cardinalities[feature]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"ids of feature {feature} must be in [0, {n}), got range [{ids.min()}, {ids.max()}]")
        return ids

    def _id_hash(self, features, ids):
        return splitmix64(ids.astype(np.uint64) ^ self.hash_salts[features])

    def group_of(self, feature, ids):
        """Latent group of each id of table `feature` (int64, in [0, min(n, num_groups)))."""
        ids = self._check_feature_ids(feature, ids)
        return self._groups(feature, self._id_hash(feature, ids))

    def _groups(self, features, h):
        return ((h >> np.uint64(32)) % self.num_groups[features].astype(np.uint64)).astype(np.int64)

    def latent_of(self, feature, ids):
        """Latent vector of each id of table `feature`: float32 [..., latent_dim]."""
        ids = self._check_feature_ids(feature, ids)
        features = np.full(ids.shape, feature)
        h = self._id_hash(feature, ids)
        return self._latents(features, h, self._groups(feature, h))

    def bias_of(self, feature, ids):
        """First-order bias of each id of table `feature` (float32)."""
        ids = self._check_feature_ids(feature, ids)
        features = np.full(ids.shape, feature)
        h = self._id_hash(feature, ids)
        return self._biases(features, h, self._groups(feature, h))

    def _within_group(self, center, bits):
        """(center + s * noise) / sqrt(1 + s^2), noise uniform with variance 1 from 16-bit hash fields `bits`.

        The division keeps every latent dimension (and the bias) at unit variance for any noise level s;
        `center` comes already divided (see `_build_world`).
        """
        s = self.options["within_group_noise"]
        norm = math.sqrt(1.0 + s * s)
        # noise = ((bits + 0.5) * 2 / 65536 - 1) * sqrt(3), folded into one multiply-add.
        step = np.float32(s * _SQRT3 * 2.0 / 65536.0 / norm)
        offset = np.float32(s * _SQRT3 * (1.0 / 65536.0 - 1.0) / norm)
        out = bits.astype(np.float32)
        out *= step
        out += offset
        out += center
        return out

    def _latents(self, features, h, groups):
        k = self.options["latent_dim"]
        g = self.options["num_groups"]
        # Each extra 64-bit hash word holds four 16-bit noise fields; a uint16 view reads them without shifting.
        words = np.stack([splitmix64(h + np.uint64(w + 1)) for w in range(-(-k // 4))], axis=-1)
        bits = words.astype("<u8", copy=False).view("<u2")[..., :k]
        center = self._centroids_scaled.reshape(-1, k)[features * g + groups]
        return self._within_group(center, bits)

    def _biases(self, features, h, groups):
        center = self._group_biases_scaled.reshape(-1)[features * self.options["num_groups"] + groups]
        return self._within_group(center, (h & np.uint64(0xFFFF)).astype(np.uint16))

    def ranks_to_ids(self, feature, ranks):
        """id = (rank * A + B) mod n for table `feature`."""
        n = self.cardinalities[feature]
        return (np.asarray(ranks, dtype=np.int64) * self.id_multipliers[feature] + self.id_offsets[feature]) % n

    def ids_to_ranks(self, feature, ids):
        """Inverse of `ranks_to_ids`: popularity rank of each id (0 = most frequent)."""
        n = self.cardinalities[feature]
        ids = self._check_feature_ids(feature, ids)
        return ((ids - self.id_offsets[feature]) % n) * self._rank_multipliers[feature] % n

    # ---- rows ------------------------------------------------------------------------------------------------

    def _stream(self, split, chunk_index, quantity):
        return np.random.default_rng([self.seed, SPLIT_CODES[split], chunk_index, quantity])

    def sample_features(self, split, chunk_index, n):
        """Features of `n` rows of one chunk: sparse int64 [n, F], dense float32 [n, D] (log1p(count), 0 if missing)."""
        uniforms = self._stream(split, chunk_index, _STREAM_RANKS).random((n, self.n_sparse))
        sparse = np.empty((n, self.n_sparse), dtype=np.int64)
        for t, card in enumerate(self.cardinalities):
            ranks = bounded_zipf_ranks(uniforms[:, t], card, self.zipf_exponents[t])
            sparse[:, t] = self.ranks_to_ids(t, ranks)
        if self.n_dense == 0:
            return sparse, np.zeros((n, 0), dtype=np.float32)
        z = self._stream(split, chunk_index, _STREAM_DENSE).standard_normal((n, self.n_dense))
        counts = np.floor(np.exp(self.dense_mu + self.dense_sigma * z))
        missing = self._stream(split, chunk_index, _STREAM_MISSING).random((n, self.n_dense)) < self.dense_missing
        dense = np.where(missing, 0.0, np.log1p(counts)).astype(np.float32)
        return sparse, dense

    def _raw_effects(self, sparse, dense):
        """Unscaled (B, I, D) effects of rows, float64 [n] each."""
        n = sparse.shape[0]
        # Feature-major layout [F, n]: the latents come out as [F, n, k], ready for one matmul over features.
        ids = np.ascontiguousarray(sparse.T)
        features = np.broadcast_to(np.arange(self.n_sparse)[:, None], ids.shape)
        h = self._id_hash(features, ids)
        groups = self._groups(features, h)
        first_order = self.feature_bias_weights @ self._biases(features, h, groups).astype(np.float64)
        if len(self.pairs):
            latents = self._latents(features, h, groups)  # [F, n, k]
            # I = sum_f <v_f, sum_g W[f, g] v_g>: one [F, F] x [F, n*k] product instead of a gather per pair.
            partners = (self._pair_matrix @ latents.reshape(self.n_sparse, -1)).reshape(latents.shape)
            interactions = np.einsum("fnk,fnk->n", latents, partners)
            interactions = interactions.astype(np.float64) / math.sqrt(self.options["latent_dim"])
        else:
            interactions = np.zeros(n)
        if self.n_dense:
            x = dense.astype(np.float64)
            dense_effect = x @ self.dense_linear + np.maximum(x - self.dense_knees, 0.0) @ self.dense_hinge
        else:
            dense_effect = np.zeros(n)
        return first_order, interactions, dense_effect

    def _combined_signal(self, sparse, dense, effects=None):
        """The standardized, weighted sum of the three effects (before scale and intercept)."""
        if effects is None:
            effects = self._raw_effects(sparse, dense)
        total = np.zeros(sparse.shape[0])
        for effect, mean, std, weight in zip(effects, self._effect_means, self._effect_stds, self._effect_weights):
            if weight > 0:
                total += weight * (effect - mean) / std
        return total

    def _calibrate(self):
        sparse, dense = self.sample_features("calibration", 0, CALIBRATION_ROWS)
        effects = self._raw_effects(sparse, dense)
        opts = self.options
        weights = [opts["bias_weight"], opts["interaction_weight"], opts["dense_weight"]]
        self._effect_means = [float(e.mean()) for e in effects]
        self._effect_stds = [float(e.std()) for e in effects]
        # An effect that is constant here (no dense columns, all tables of size 1, ...) carries no signal.
        weights = [w if s > 1e-12 else 0.0 for w, s in zip(weights, self._effect_stds)]
        if sum(weights) <= 0:
            raise ValueError(
                f"the planted model has no signal for dataset={self.dataset!r}, cardinality_scale="
                f"{self.cardinality_scale} and weights (bias, interaction, dense) = "
                f"{(opts['bias_weight'], opts['interaction_weight'], opts['dense_weight'])}"
            )
        total = math.sqrt(sum(weights))
        self._effect_weights = [math.sqrt(w) / total for w in weights]
        # Sorted once: the order of the rows by logit does not depend on the (positive) scale.
        signal = np.sort(self._combined_signal(sparse, dense, effects))

        # Expected AUC grows with the scale (intercept re-fit each time), so bisection finds target_auc.
        lo, hi = 0.0, 1.0
        while self._expected_auc_at(signal, hi) < opts["target_auc"]:
            hi *= 2.0
            if hi > 1e4:
                raise ValueError(f"target_auc={opts['target_auc']} is out of reach for this planted model")
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if self._expected_auc_at(signal, mid) < opts["target_auc"]:
                lo = mid
            else:
                hi = mid
        self.scale = 0.5 * (lo + hi)
        self.intercept = _intercept_for_rate(self.scale * signal, opts["click_rate"])
        self.calibration = {
            "rows": CALIBRATION_ROWS, "scale": self.scale, "intercept": self.intercept,
            "expected_auc": self._expected_auc_at(signal, self.scale),
            "effect_weights": dict(zip(("bias", "interaction", "dense"), self._effect_weights)),
        }

    def _expected_auc_at(self, signal, scale):
        """Expected AUC of the planted probabilities at `scale`, intercept re-fit; `signal` sorted ascending."""
        logits = scale * signal
        intercept = _intercept_for_rate(logits, self.options["click_rate"])
        return expected_auc(_sigmoid(intercept + logits))  # `signal` is sorted

    def logit(self, sparse, dense):
        """Planted click logit of rows (float64 [n]); sparse int [n, F] ids in range, dense float [n, D] as stored."""
        sparse = np.asarray(sparse, dtype=np.int64)
        dense = np.asarray(dense, dtype=np.float32)
        if sparse.ndim != 2 or sparse.shape[1] != self.n_sparse:
            raise ValueError(f"sparse must have shape [n, {self.n_sparse}], got {sparse.shape}")
        if dense.shape != (sparse.shape[0], self.n_dense):
            raise ValueError(f"dense must have shape [{sparse.shape[0]}, {self.n_dense}], got {dense.shape}")
        cards = np.asarray(self.cardinalities)
        bad = (sparse < 0) | (sparse >= cards)
        if bad.any():
            row, feature = np.argwhere(bad)[0]
            raise ValueError(f"id {sparse[row, feature]} of feature {feature} (row {row}) is outside "
                             f"[0, {cards[feature]})")
        return self.intercept + self.scale * self._combined_signal(sparse, dense)

    def chunk(self, split, chunk_index, n):
        """Rows [chunk_index * CHUNK_ROWS, + n) of a split: dict of label int64 [n], dense, sparse, logit."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= n <= CHUNK_ROWS:
            raise ValueError(f"n must be in [0, {CHUNK_ROWS}], got {n}")
        sparse, dense = self.sample_features(split, chunk_index, n)
        logit = self.intercept + self.scale * self._combined_signal(sparse, dense)
        label = (self._stream(split, chunk_index, _STREAM_LABEL).random(n) < _sigmoid(logit)).astype(np.int64)
        return {"label": label, "dense": dense, "sparse": sparse, "logit": logit}

    def iter_chunks(self, split, rows):
        """Yields the chunks that make up the first `rows` rows of a split."""
        for chunk_index, start in enumerate(range(0, rows, CHUNK_ROWS)):
            yield self.chunk(split, chunk_index, min(CHUNK_ROWS, rows - start))

    def rows(self, split, rows):
        """The first `rows` rows of a split as one dict of arrays (for tests and small in-memory use)."""
        chunks = list(self.iter_chunks(split, rows))
        if not chunks:
            return {"label": np.zeros(0, np.int64), "dense": np.zeros((0, self.n_dense), np.float32),
                    "sparse": np.zeros((0, self.n_sparse), np.int64), "logit": np.zeros(0)}
        return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


# ---- writing a dataset directory ------------------------------------------------------------------------------


def _write_split(model, split, rows, directory, rows_per_shard):
    labels, probs = [], []
    with ShardWriter(directory, rows_per_shard) as writer:
        for chunk in model.iter_chunks(split, rows):
            writer.write(serialize_rows(chunk["label"], chunk["dense"], chunk["sparse"]))
            labels.append(chunk["label"].astype(np.uint8))
            probs.append(_sigmoid(chunk["logit"]).astype(np.float32))
    label = np.concatenate(labels) if labels else np.zeros(0, np.uint8)
    prob = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    both_classes = 0 < label.sum() < label.size
    return {
        "rows": int(rows),
        "clicks": int(label.sum()),
        "click_rate": float(label.mean()) if rows else None,
        "ceiling_auc": exact_auc(label, prob) if both_classes else None,
        "ceiling_log_loss": log_loss(label, prob) if rows else None,
        "shards": [os.path.basename(p) for p in writer.paths],
    }


def _dataset_is_complete(out_dir, stats):
    for split in ("train", "eval"):
        for shard in stats.get("splits", {}).get(split, {}).get("shards", []):
            if not os.path.isfile(os.path.join(out_dir, split, shard)):
                return False
    return os.path.isfile(os.path.join(out_dir, "schema.json"))


def generate(out_dir, dataset="criteo", rows=1_000_000, eval_rows=100_000, seed=0, cardinality_scale=1.0,
             rows_per_shard=DEFAULT_ROWS_PER_SHARD, overwrite=False, **planted_options):
    """Write a synthetic dataset: out_dir/{schema.json, stats.json, train/part-*.tfrecord, eval/part-*.tfrecord}.

    Everything is written into a temporary directory inside `out_dir` and moved into place at the end, stats.json
    last: a directory with stats.json is complete. Calling again with the same arguments returns the stored stats
    without regenerating.

    Args:
        out_dir: dataset directory (created if missing).
        dataset: "criteo" or "avazu".
        rows: training rows, >= 1.
        eval_rows: evaluation rows, >= 0 (a separate random stream from training).
        seed: integer >= 0.
        cardinality_scale: table sizes are max(1, round(n * scale)).
        rows_per_shard: rows per TFRecord file.
        overwrite: replace a dataset made with other options (or an incomplete one) instead of raising.
        **planted_options: see `PlantedModel` / `DEFAULT_OPTIONS`.

    Returns:
        the stats dict (also in stats.json): per split rows, clicks, click_rate, ceiling_auc (exact AUC of the
        planted probabilities on the written rows), ceiling_log_loss, shards; plus options, calibration, version.

    Raises:
        ValueError: bad arguments, or out_dir holds a different / incomplete dataset and overwrite is False.
    """
    for name, value, minimum in (("rows", rows, 1), ("eval_rows", eval_rows, 0), ("rows_per_shard", rows_per_shard, 1)):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    rows, eval_rows, rows_per_shard = int(rows), int(eval_rows), int(rows_per_shard)
    out_dir = os.fspath(out_dir)
    options = {
        "generator_version": GENERATOR_VERSION, "dataset": dataset, "rows": rows, "eval_rows": eval_rows,
        "seed": int(seed), "cardinality_scale": float(cardinality_scale), "rows_per_shard": rows_per_shard,
        "planted": normalize_options(planted_options),
    }
    stats_path = os.path.join(out_dir, STATS_FILENAME)
    existing = [name for name in ("train", "eval", "schema.json", STATS_FILENAME)
                if os.path.exists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        previous = _read_stats(stats_path) if os.path.isfile(stats_path) else None
        if previous is None or not _dataset_is_complete(out_dir, previous):
            raise ValueError(f"{out_dir} holds an incomplete or foreign dataset ({', '.join(existing)}); "
                             f"pass overwrite=True to replace it or pick another directory")
        if previous.get("options") == options:
            return previous
        differing = sorted(k for k in set(options) | set(previous.get("options", {}))
                           if options.get(k) != previous.get("options", {}).get(k))
        raise ValueError(f"{out_dir} already holds a dataset generated with different options (differing: "
                         f"{differing}); pass overwrite=True to replace it or pick another directory")

    model = PlantedModel(dataset, seed=seed, cardinality_scale=cardinality_scale, **planted_options)
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = os.path.join(out_dir, f".generate-tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        splits = {}
        for split, n in (("train", rows), ("eval", eval_rows)):
            logger.info("generating %d %s rows of synthetic %s into %s", n, split, dataset, out_dir)
            splits[split] = _write_split(model, split, n, os.path.join(tmp_dir, split), rows_per_shard)
        model.schema.save(tmp_dir)
        stats = {
            "generator": "tfcompress.data.synthetic", "generator_version": GENERATOR_VERSION,
            "numpy_version": np.__version__, "dataset": dataset, "seed": int(seed),
            "cardinality_scale": float(cardinality_scale), "cardinalities": model.cardinalities,
            "options": options, "calibration": model.calibration, "splits": splits,
        }
        for name in existing:  # only reached with overwrite=True
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for name in ("train", "eval", "schema.json"):
            os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
        with open(os.path.join(tmp_dir, STATS_FILENAME), "w") as f:
            json.dump(stats, f, sort_keys=True, indent=2)
            f.write("\n")
        os.replace(os.path.join(tmp_dir, STATS_FILENAME), stats_path)  # the completion marker, written last
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _read_stats(stats_path)


def _read_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
