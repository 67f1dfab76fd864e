"""A small MovieLens-shaped ranking data set with a planted signal, made in memory from a seed (nothing downloaded).

One row is one (user, movie) impression with a 0/1 label ("liked"). The columns are what a Keras / TFRS / keras-rs
ranking model over MovieLens consumes:

    user_id       str [N]        "u0" .. "u{num_users-1}"            -> StringLookup -> Embedding
    item_id       str [N]        "i0" .. "i{num_items-1}"            -> StringLookup -> Embedding
    genres        list of lists  e.g. ["Action", "Comedy"], [] (some movies have none): a multi-hot bag
    history       str [N, L]     the user's earlier movies, most recent first, right-padded with "" (the padding)
    age           float32 [N]    the user's age, 18..70
    hour_of_day   float32 [N]    0..23, derived from timestamp
    timestamp     int64 [N]      seconds since the epoch (2015-2016); handy for a time split, no feature itself
    label         int64 [N]      0/1

Why "" pads `history`: `keras.layers.StringLookup(vocabulary=..., mask_token="")` maps "" to index 0 (and unknown
ids to 1), which is exactly what `keras.layers.Embedding(..., mask_zero=True)` masks; so the sequence goes through
StringLookup -> Embedding(mask_zero=True) with no extra step. `genres` is a Python list of lists because rows have
different lengths: `tf.ragged.constant(data["genres"], dtype=tf.string)` makes the `[N, None]` RaggedTensor.

The planted model (the world is drawn from `seed`; rows too, so equal arguments give equal data)::

    logit = intercept + user_bias[u] + item_bias[i] + sum_g genre_effect[g] / sqrt(k)      first-order effects
            + pref[u] . multi_hot(genres of i) / sqrt(k)                                     user x genre taste
            + <user_vec[u], item_vec[i]> / sqrt(D)                                          user x item affinity
            + age_effect * (age - 44) / 15 + hour_effect * cos(2 pi (hour - 20) / 24)       dense effects
    label ~ Bernoulli(sigmoid(logit))

`history` is drawn from the same affinity (candidates by popularity, the user's best-liked kept), so a sequence model
can infer the user's taste from it. Items share latent directions with their genres, so genres carry signal about
the item too. `planted_probability` (with `return_probability=True`) is the ceiling: its AUC on the rows is the best
any model can do (about 0.8 at the defaults).

Example:
    >>> data = movielens_like(1000, num_users=50, num_items=80, seed=0)
    >>> data["user_id"][:2].tolist(), data["history"].shape
    (['u35', 'u5'], (1000, 10))
"""

import csv
import math
import os

import numpy as np

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "Western",
)
LATENT_DIM = 8
HISTORY_CANDIDATES = 4  # history: this many popularity-drawn candidates per slot, the user's best-liked kept
ROW_CHUNK = 8192  # rows whose history is drawn at once (bounds memory at ROW_CHUNK * L * HISTORY_CANDIDATES * D)
TIMESTAMP_START = 1420070400  # 2015-01-01T00:00:00Z
TIMESTAMP_SPAN = 2 * 365 * 86400
GENRES_DELIMITER = "|"
CSV_COLUMNS = ("user_id", "item_id", "genres", "history", "age", "hour_of_day", "timestamp", "label")

# The schema TOML that `tfcompress data convert --format csv` reads the CSV of `write_movielens_like_csv` with:
# genres and history are multi-valued ("Action|Comedy" is two tokens), the rest one value per field.
MOVIELENS_LIKE_SCHEMA_TOML = """\
name = "movielens_like"
delimiter = ","
header = true
label = "label"
dense = ["age", "hour_of_day"]
sparse = ["user_id", "item_id"]
genres = {type = "categorical", multi = "|"}
history = {type = "categorical", multi = "|"}
"""


def user_ids(num_users):
    """The user vocabulary, "u0" .. "u{num_users-1}" (e.g. for StringLookup(vocabulary=...))."""
    return [f"u{k}" for k in range(num_users)]


def item_ids(num_items):
    """The item vocabulary, "i0" .. "i{num_items-1}"."""
    return [f"i{k}" for k in range(num_items)]


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"movielens_like: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _power_law(rng, n, exponent):
    """Probabilities of n ids, rank^-exponent over a random permutation (popular ids scattered over the range)."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    probabilities = np.empty(n)
    probabilities[rng.permutation(n)] = weights / weights.sum()
    return probabilities


def _item_genres(rng, num_items):
    """Per item a sorted array of genre indices: 0 (5%), 1, 2 or 3 genres."""
    counts = rng.choice(4, size=num_items, p=[0.05, 0.45, 0.35, 0.15])
    return [np.sort(rng.choice(len(GENRES), size=k, replace=False)) for k in counts]


def movielens_like(num_rows, num_users=1000, num_items=2000, seed=0, history_length=10, return_probability=False):
    """Generate MovieLens-shaped impressions with a learnable planted label (module docstring: columns and model).

    Args:
        num_rows: rows N (>= 1).
        num_users: distinct users (>= 1); user ids are "u0".."u{num_users-1}".
        num_items: distinct movies (>= 1); item ids are "i0".."i{num_items-1}".
        seed: integer seed; equal arguments give equal data.
        history_length: L, the width of `history` (>= 1); rows hold 0..L earlier movies, right-padded with "".
        return_probability: also return `planted_probability` float64 [N], the planted click probability.

    Returns:
        dict of user_id, item_id (str arrays [N]), genres (list of N lists of str), history (str array [N, L]),
        age, hour_of_day (float32 [N]), timestamp (int64 [N]), label (int64 [N]) [, planted_probability].

    Raises:
        ValueError: a count that is not a positive integer (the message names it).
    """
    num_rows = _check_count("num_rows", num_rows, 1)
    num_users = _check_count("num_users", num_users, 1)
    num_items = _check_count("num_items", num_items, 1)
    history_length = _check_count("history_length", history_length, 1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D4C]))

    # ---- the world: per-user and per-item quantities -------------------------------------------------------
    n_genres = len(GENRES)
    genre_vecs = rng.normal(size=(n_genres, LATENT_DIM))
    genre_effect = rng.normal(scale=0.5, size=n_genres)
    item_genre_lists = _item_genres(rng, num_items)
    item_multi_hot = np.zeros((num_items, n_genres))
    for item, genres in enumerate(item_genre_lists):
        item_multi_hot[item, genres] = 1.0
    genre_count = np.maximum(item_multi_hot.sum(axis=1), 1.0)
    # Items lean towards their genres' directions, so genres also tell something about the item's latent vector.
    item_vecs = (item_multi_hot @ genre_vecs) / np.sqrt(genre_count)[:, None] + 0.8 * rng.normal(
        size=(num_items, LATENT_DIM))
    item_vecs /= np.sqrt(np.mean(item_vecs ** 2, axis=1, keepdims=True)) + 1e-12
    user_vecs = rng.normal(size=(num_users, LATENT_DIM))
    user_genre_pref = rng.normal(scale=0.8, size=(num_users, n_genres))
    user_bias = rng.normal(scale=0.6, size=num_users)
    item_bias = rng.normal(scale=0.6, size=num_items)
    user_age = rng.integers(18, 71, size=num_users).astype(np.float32)
    user_probability = _power_law(rng, num_users, 0.6)
    item_probability = _power_law(rng, num_items, 0.9)
    item_first_order = item_bias + (item_multi_hot @ genre_effect) / np.sqrt(genre_count)

    # ---- rows ------------------------------------------------------------------------------------------------
    users = rng.choice(num_users, size=num_rows, p=user_probability)
    items = rng.choice(num_items, size=num_rows, p=item_probability)
    timestamp = TIMESTAMP_START + rng.integers(0, TIMESTAMP_SPAN, size=num_rows, dtype=np.int64)
    hour_of_day = ((timestamp // 3600) % 24).astype(np.float32)
    age = user_age[users]

    taste = np.einsum("ng,ng->n", user_genre_pref[users], item_multi_hot[items]) / np.sqrt(genre_count[items])
    affinity = np.einsum("nd,nd->n", user_vecs[users], item_vecs[items]) / math.sqrt(LATENT_DIM)
    logit = (-0.6 + user_bias[users] + item_first_order[items] + taste + affinity
             + 0.3 * (age - 44.0) / 15.0 + 0.3 * np.cos(2 * np.pi * (hour_of_day - 20.0) / 24.0))
    probability = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(num_rows) < probability).astype(np.int64)

    lengths = rng.integers(0, history_length + 1, size=num_rows)
    history_index = np.full((num_rows, history_length), -1, dtype=np.int64)
    for start in range(0, num_rows, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, num_rows)
        n = stop - start
        candidates = rng.choice(num_items, size=(n, history_length * HISTORY_CANDIDATES), p=item_probability)
        score = np.einsum("nd,ncd->nc", user_vecs[users[start:stop]], item_vecs[candidates])
        score += rng.gumbel(size=score.shape)
        best = np.argsort(-score, axis=1)[:, :history_length]
        history_index[start:stop] = np.take_along_axis(candidates, best, axis=1)
    history_index[np.arange(history_length)[None, :] >= lengths[:, None]] = -1

    item_names = np.array(item_ids(num_items) + [""])  # index -1 -> "" (the padding)
    data = {
        "user_id": np.array(user_ids(num_users))[users],
        "item_id": item_names[items],
        "genres": [[GENRES[g] for g in item_genre_lists[i]] for i in items],
        "history": item_names[history_index],
        "age": age.astype(np.float32),
        "hour_of_day": hour_of_day,
        "timestamp": timestamp,
        "label": label,
    }
    if return_probability:
        data["planted_probability"] = probability
    return data


def write_movielens_like_csv(path, num_rows, num_users=1000, num_items=2000, seed=0, history_length=10):
    """Write `movielens_like(...)` as a CSV with a header (CSV_COLUMNS); returns the data dict it wrote.

    `genres` and `history` are "|"-joined ("Action|Comedy"; "" for none, the padding of history left out), the
    form `tfcompress data convert --format csv` reads with a multi-valued schema (MOVIELENS_LIKE_SCHEMA_TOML).
    No field holds a comma, so no quoting is needed (the converter does not interpret quotes).
    """
    data = movielens_like(num_rows, num_users=num_users, num_items=num_items, seed=seed,
                          history_length=history_length)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_NONE)
        writer.writerow(CSV_COLUMNS)
        for row in range(num_rows):
            writer.writerow([
                data["user_id"][row],
                data["item_id"][row],
                GENRES_DELIMITER.join(data["genres"][row]),
                GENRES_DELIMITER.join(h for h in data["history"][row] if h),
                f"{data['age'][row]:g}",
                f"{data['hour_of_day'][row]:g}",
                int(data["timestamp"][row]),
                int(data["label"][row]),
            ])
    return data
