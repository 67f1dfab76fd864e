"""How big a reproduce run is: the data, model and training every experiment starts from.

"full" is sized to finish every experiment in at most 60 minutes on 2 CPU cores; "tiny" runs the same code
paths on a few thousand rows in well under a minute per experiment, so the default test target can prove the
command still works end to end. Experiments scale their own sweeps by the profile's `name` (each module's
`SETTINGS`), so adding an experiment never touches this file.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    # Synthetic data (ignored with --data, which brings its own rows and tables).
    rows: int
    eval_rows: int
    cardinality_scale: float
    # The model and training that every accuracy experiment shares unless it says otherwise.
    embedding_dim: int
    bottom_mlp: tuple
    top_mlp: tuple
    optimizer: str
    learning_rate: float
    batch_size: int
    eval_batch_size: int


PROFILES = {
    # 26 Criteo tables scaled to 1% of Kaggle's sizes (338k ids); Adagrad, as the ROBE-Z paper trains DLRM.
    # Measured: every experiment together in about 30 minutes on 2 quiet cores (REPORT.md lists each one's time).
    "full": Profile(name="full", rows=1_000_000, eval_rows=100_000, cardinality_scale=0.01, embedding_dim=16,
                    bottom_mlp=(64, 32), top_mlp=(128, 64), optimizer="adagrad", learning_rate=0.2,
                    batch_size=2048, eval_batch_size=16384),
    "tiny": Profile(name="tiny", rows=6_000, eval_rows=2_000, cardinality_scale=0.0005, embedding_dim=8,
                    bottom_mlp=(16,), top_mlp=(16,), optimizer="adagrad", learning_rate=0.05,
                    batch_size=512, eval_batch_size=2048),
}


def get_profile(name):
    """The profile called `name`; ValueError naming the known ones otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
