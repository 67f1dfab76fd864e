"""`tfcompress reproduce`: the seed papers' claims, rerun on planted-signal synthetic data (or converted real data).

One module per experiment; each has `NAME`, `TITLE`, `run(context) -> dict` (JSON-able results) and
`report(results, context) -> str` (a REPORT.md section, with its PNG figures written through `context.figure`).
`runner.run_reproduce` runs them in order, keeps each one's results in `<out>/results/<NAME>.json` (an interrupted
run resumes after the last finished experiment, and after the last finished training run inside one), and
writes `<out>/REPORT.md`.

    tfcompress reproduce                          # profile "full": <= 60 minutes on 2 CPU cores
    tfcompress reproduce --profile tiny           # seconds: what the default test target runs
    tfcompress reproduce --data data/criteo_kaggle --out reproduce_criteo
"""

# Module names under tfcompress.reproduce, in report order.
EXPERIMENTS = ("robe_ratios", "robe_chunks", "gradients", "mlet_grid", "pruning_sweep", "learned_hash_sweep",
               "systems")
