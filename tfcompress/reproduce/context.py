"""What every experiment of a reproduce run shares: where it writes, the profile, the data, and cached training.

`Context.train` is the one way an experiment trains a model: it builds a pipeline from the profile's defaults
plus the experiment's overrides, runs `tfcompress.train.train`, and keeps the result in
`<out>/runs/<name>/results.json`; a rerun of the same (interrupted) reproduce command loads it instead of
training again. `Context.figure` saves a PNG stamped with the command and seed that produced it.
"""

import dataclasses
import json
import os

from tfcompress._files import write_json_atomically
from tfcompress.pipeline import pipeline_from_dict
from tfcompress.train import prepare_data
from tfcompress.train import train as train_pipeline


@dataclasses.dataclass
class Context:
    out_dir: str
    profile: object  # profiles.Profile
    seed: int
    command: str
    data_dir: str = None  # converted TFRecords (`tfcompress data convert` output); None: synthetic data
    verbose: int = 0
    _prepared: object = dataclasses.field(default=None, repr=False)

    @property
    def runs_dir(self):
        return os.path.join(self.out_dir, "runs")

    @property
    def figures_dir(self):
        return os.path.join(self.out_dir, "figures")

    def data_section(self):
        """The pipelines' [data] section: the profile's synthetic Criteo, or the converted data of --data."""
        if self.data_dir is not None:
            return {"source": "tfrecord", "train": os.path.join(self.data_dir, "train"),
                    "eval": os.path.join(self.data_dir, "eval"), "schema": self.data_dir}
        p = self.profile
        return {"source": "synthetic", "dataset": "criteo", "rows": p.rows, "eval_rows": p.eval_rows,
                "seed": self.seed, "cardinality_scale": p.cardinality_scale,
                "path": os.path.join(self.out_dir, "data")}

    def data(self):
        """The prepared data (generated once; `tfcompress.train.PreparedData`): schema, files, ceiling AUC."""

        if self._prepared is None:
            self._prepared = prepare_data(self.pipeline("data", {"method": "full"}).data, "reproduce", self.verbose)
        return self._prepared

    def pipeline(self, name, compression, model=None, train=None):
        """A validated pipeline: the profile's model and training, with `model`/`train` keys overriding them."""
        p = self.profile
        raw = {
            "name": name,
            "data": self.data_section(),
            "model": dict({"arch": "dlrm", "embedding_dim": p.embedding_dim, "bottom_mlp": list(p.bottom_mlp),
                           "top_mlp": list(p.top_mlp)}, **(model or {})),
            "compression": dict(compression),
            "train": dict({"optimizer": p.optimizer, "learning_rate": p.learning_rate, "batch_size": p.batch_size,
                           "eval_batch_size": p.eval_batch_size, "epochs": 1, "seed": self.seed,
                           "save_model": False}, **(train or {})),
        }
        return pipeline_from_dict(raw, source=f"reproduce:{name}")

    def train(self, name, compression, model=None, train=None):
        """Train (or load the finished result of) the run `name`; returns `tfcompress.train.train`'s result."""

        saved = os.path.join(self.runs_dir, name, "results.json")
        if os.path.exists(saved):
            with open(saved) as f:
                return json.load(f)["result"]
        self.data()  # generate first, so that the data message comes once
        return train_pipeline(self.pipeline(name, compression, model, train), runs_dir=self.runs_dir,
                              verbose=self.verbose)

    def saved_model_numbers(self, run_name, result, filename, measure):
        """`measure(model_path)` (a JSON-able dict) of a finished run, kept in runs/<run_name>/<filename>.

        The saved model (large: tables plus optimizer state) is deleted once measured; a resumed run reads the
        numbers back and needs no model file.
        """
        path = os.path.join(self.runs_dir, run_name, filename)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        numbers = measure(result["model_path"])
        write_json_atomically(path, numbers)
        os.remove(result["model_path"])
        return numbers

    def figure(self, figure, name, caption):
        """Save a matplotlib figure as figures/<name>.png, stamped with the command and seed; its markdown."""
        import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)

        os.makedirs(self.figures_dir, exist_ok=True)
        figure.text(0.01, 0.005, f"{self.command}  (seed {self.seed})", fontsize=7, color="0.35",
                    ha="left", va="bottom")
        figure.tight_layout(rect=(0, 0.04, 1, 1))
        path = os.path.join(self.figures_dir, f"{name}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return (f"![{caption}](figures/{name}.png)\n\n*{caption}* Produced by `{self.command}` with seed "
                f"{self.seed}.\n")
