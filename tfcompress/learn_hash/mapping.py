"""Mapping artifacts: id -> row arrays of learned hashing, built from teacher values and counts, saved as .npz.

A `TableMapping` holds, for one embedding table of n ids, K arrays id -> row (one per teacher dimension, each used
by its own internal table of the layer), stored in the smallest unsigned integer dtype that holds the largest row.

Row layout of internal table k:

    [0, clusters_k)                       the clusters of the seen ids, in increasing teacher value
    clusters_k                            the shared "unseen" row (only when some id has count 0)
    [clusters_k + unseen, num_rows[k])    private rows of the most frequent ids (frequency-based double hashing)

Unseen-id rule: an id that was never accessed (count 0 in the counts the mapping was built from) has no trained
teacher value to place it by, so all such ids share ONE extra row per internal table. It is never merged with a
cluster of seen ids. With counts from the training split the student never trains it either: it stays near its
small initial value, a near-neutral vector, as an untrained row of a full table would. `min_count` > 1 widens the
rule to ids accessed fewer than `min_count` times: a teacher value learned from one or two rows mostly encodes
those rows' labels, and clustering by it would group rare ids by their training labels (which the student then
overfits); these ids then share the row and the student trains it as the embedding of "rare" ids.

Private rows (frequency-based double hashing, `private_fraction` p): the `floor(p * n)` most accessed ids keep a row
of their own and are not clustered. With the "concat" combiner each internal table holds one private row per such
id (d/K wide, d in all). With "sum" only internal table 0 holds it; the other tables still place the id in its
cluster, and the private row (trained freely) absorbs the difference, so the id still costs exactly d parameters.

Budget: `num_rows` is the table's size in full-width (d) rows. "sum": the K internal tables of width d share it
(private rows included); "concat": each of the K internal tables (width about d/K) has that many rows.

Example:

>>> teacher = np.random.default_rng(0).standard_normal((1000, 2))
>>> counts = np.random.default_rng(1).integers(0, 5, 1000)
>>> mapping = build_table_mapping(teacher, counts, num_rows=100, combiner="sum")
>>> mapping.num_rows, mapping.rows.dtype
((50, 50), dtype('uint8'))
"""

import dataclasses
import json
import os

import numpy as np

from tfcompress.learn_hash.cluster import cluster_1d

COMBINERS = ("sum", "concat")
MAPPING_FORMAT_VERSION = 1


def smallest_row_dtype(max_row):
    """The smallest unsigned NumPy dtype holding 0..max_row (uint8, uint16, uint32 or uint64)."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_row <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max_row must be < 2**64, got {max_row}")


@dataclasses.dataclass
class TableMapping:
    """id -> row of one embedding table, for each of its K internal tables.

    Attributes:
        rows: unsigned int [K, n]; rows[k, i] is the row of id i in internal table k, < num_rows[k].
        num_rows: K ints, rows of each internal table.
        combiner: "sum" or "concat": how the layer combines the K looked-up vectors.
        name: the table (feature) name, for messages.
        private: ids with private rows.
        unseen: ids that share the unseen row (count below the mapping's min_count, 1 by default).
    """

    rows: np.ndarray
    num_rows: tuple
    combiner: str = "sum"
    name: str = ""
    private: int = 0
    unseen: int = 0

    def __post_init__(self):
        rows = np.asarray(self.rows)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"mapping {self.name!r}: rows must be a non-empty integer array [K, n], got "
                             f"{rows.dtype} {rows.shape}")
        self.num_rows = tuple(int(m) for m in self.num_rows)
        if len(self.num_rows) != rows.shape[0]:
            raise ValueError(f"mapping {self.name!r}: {rows.shape[0]} row arrays but {len(self.num_rows)} num_rows")
        if self.combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS}, got {self.combiner!r}")
        for k, m in enumerate(self.num_rows):
            low, high = int(rows[k].min()), int(rows[k].max())
            if low < 0 or high >= m:
                raise ValueError(f"mapping {self.name!r}: internal table {k} maps into [{low}, {high}], outside "
                                 f"[0, {m})")
        self.rows = rows.astype(smallest_row_dtype(max(self.num_rows) - 1), copy=False)

    @property
    def cardinality(self):
        return int(self.rows.shape[1])

    @property
    def num_tables(self):
        return int(self.rows.shape[0])

    @property
    def nbytes(self):
        return int(self.rows.nbytes)


def _split_rows(total, parts):
    return [total // parts + (k < total % parts) for k in range(parts)]


def build_table_mapping(teacher_values, counts, num_rows, combiner="sum", private_fraction=0.0,
                        max_cluster_size=None, weighted=True, merge_fraction=0.25, min_count=1, name=""):
    """Cluster one table's ids by each teacher dimension into a `TableMapping` of `num_rows` full-width rows.

    Args:
        teacher_values: float [n, K] (or [n]): the teacher's embedding of each id; one mapping per column.
        counts: accesses per id, [n] >= 0 (None: every id counts once, none is unseen).
        num_rows: the table's budget in full-width rows (see the module doc), >= K (+ private rows).
        combiner: "sum" or "concat".
        private_fraction: the most frequent floor(private_fraction * n) seen ids keep private rows, in [0, 1).
        min_count: ids accessed fewer times share the unseen row instead of being clustered (see the module doc).
        max_cluster_size, weighted, merge_fraction: see `cluster_1d`.
        name: the table name, for messages.

    Raises:
        ValueError: a budget too small for one cluster per internal table plus the private and unseen rows, or
            arguments out of range (named).
    """
    values = np.asarray(teacher_values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"table {name!r}: teacher_values must be [n, K], got shape {values.shape}")
    n, num_tables = values.shape
    counts = np.ones(n) if counts is None else np.asarray(counts, dtype=np.float64)
    if counts.shape != (n,):
        raise ValueError(f"table {name!r}: counts must have shape ({n},), got {counts.shape}")
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if not 0.0 <= private_fraction < 1.0:
        raise ValueError(f"private_fraction must be in [0, 1), got {private_fraction!r}")
    if int(num_rows) != num_rows or num_rows < 1:
        raise ValueError(f"table {name!r}: num_rows must be an integer >= 1, got {num_rows!r}")

    if int(min_count) != min_count or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    seen = counts >= min_count
    num_private = min(int(np.floor(private_fraction * n)), int(seen.sum()))
    private_ids = np.zeros(0, dtype=np.int64)
    if num_private:
        # Most accessed first; equal counts by id, so the choice is deterministic.
        private_ids = np.lexsort((np.arange(n), -counts))[:num_private]
    private = np.zeros(n, dtype=bool)
    private[private_ids] = True

    cluster_budget = int(num_rows) - num_private
    per_table = _split_rows(cluster_budget, num_tables) if combiner == "sum" else [cluster_budget] * num_tables
    rows = np.empty((num_tables, n), dtype=np.int64)
    table_rows = []
    # Ids never seen (or too rare) share one row per internal table; the same ids in every table.
    unseen = ~seen & ~private
    has_unseen = bool(unseen.any())
    for k in range(num_tables):
        has_private = num_private > 0 and (combiner == "concat" or k == 0)
        clustered = seen & ~private if has_private else seen
        clusters = per_table[k] - int(has_unseen)
        if clusters < 1 and clustered.any():
            raise ValueError(
                f"table {name!r}: num_rows={num_rows} leaves {per_table[k]} row(s) for internal table {k} after "
                f"{num_private} private rows; need at least {1 + int(has_unseen)} (one cluster"
                f"{' + the unseen row' if has_unseen else ''})")
        members = np.flatnonzero(clustered)
        clusters = min(clusters, members.size)  # fewer ids than rows: every id keeps its own row
        if members.size:
            result = cluster_1d(values[members, k], counts[members], clusters, max_cluster_size=max_cluster_size,
                                weighted=weighted, merge_fraction=merge_fraction)
            rows[k, members] = result.labels
        rows[k, unseen] = clusters
        next_row = clusters + int(has_unseen)
        if has_private:
            rows[k, private_ids] = next_row + np.arange(num_private)
            next_row += num_private
        table_rows.append(next_row)
    return TableMapping(rows=rows, num_rows=tuple(table_rows), combiner=combiner, name=name, private=num_private,
                        unseen=int(unseen.sum()))


def save_mappings(path, mappings):
    """Write a list of `TableMapping` to one .npz (atomically: a temporary file renamed into place).

    Layout: `rows_<i>` (uint [K, n]) per table i, and `meta` (a JSON string: format version, per table name,
    cardinality, num_rows, combiner, private, unseen).
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"mapping files end in .npz, got {path!r}")
    meta = {
        "format_version": MAPPING_FORMAT_VERSION,
        "tables": [dict(name=m.name, cardinality=m.cardinality, num_rows=list(m.num_rows), combiner=m.combiner,
                        private=m.private, unseen=m.unseen) for m in mappings],
    }
    arrays = {f"rows_{i}": m.rows for i, m in enumerate(mappings)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[:-4] + f".tmp-{os.getpid()}.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def load_mappings(path):
    """The list of `TableMapping` saved by `save_mappings`.

    Raises:
        FileNotFoundError: no such file. ValueError: not a mapping file, or another format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mapping file {path} does not exist (write it with `tfcompress learn-hash`)")
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data:
            raise ValueError(f"{path} is not a learned-hash mapping file (no 'meta' entry)")
        meta = json.loads(str(data["meta"]))
        if meta.get("format_version") != MAPPING_FORMAT_VERSION:
            raise ValueError(f"{path}: mapping format version {meta.get('format_version')!r}, this tfcompress "
                             f"reads version {MAPPING_FORMAT_VERSION}")
        return [
            TableMapping(rows=data[f"rows_{i}"], num_rows=t["num_rows"], combiner=t["combiner"], name=t["name"],
                         private=t["private"], unseen=t["unseen"])
            for i, t in enumerate(meta["tables"])
        ]
