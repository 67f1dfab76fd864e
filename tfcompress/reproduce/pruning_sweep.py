"""FIITED chunk pruning over a sweep of memory ratios, against row pruning (K = 1 chunk per row) and full tables.

A chunk-pruned table (`tfcompress.layers.ChunkPrunedEmbedding`, method "pruned") splits every row into K chunks
of d/K floats; only the chunks of highest utility live in a pool sized at the budget (1/ratio of the full
table's chunks), and `tfcompress.ChunkPruningCallback` re-decides which every `period` steps. K = 1 is row
pruning (AdaEmbed), the layer's default; the FIITED paper's claim is that finer chunks (K > 1) keep more accuracy
at the same pool memory. The pool is allocated at the budget from the start; the bookkeeping that makes pruning
possible (an int32 address and a float32 utility per chunk of the FULL table, plus owners and a free stack per
pool slot) is not part of the ratio, so the memory actually saved is the full table's bytes minus pool and
bookkeeping, which this experiment reports from the trained layers themselves.
"""


from tfcompress._keras import keras
from tfcompress.chunk_pruning import chunk_pruned_layers
import tfcompress.models  # noqa: F401  (registers DLRM's layers for loading)
from tfcompress.reproduce.report import markdown_table

NAME = "pruning_sweep"
TITLE = "FIITED chunk pruning vs row pruning"
SETTINGS = {
    # period: steps between pruning events (T); ~19 events in the one pass of 195 steps of the full profile.
    "full": {"ratios": [2, 4, 8, 16], "chunks": [1, 2, 4], "passes": 1, "period": 10},
    "tiny": {"ratios": [2, 8], "chunks": [1, 2], "passes": 2, "period": 4},
}
BYTES_PER_FLOAT = 4


def pool_state(model_path):
    """What the chunk-pruned tables of the saved model at `model_path` hold after training.

    Returns:
        dict: capacity and live chunks (summed over the model's chunk-pruned layers), pool_bytes (the
        float32 pool, allocated at the budget), live_bytes (the chunks in use), metadata_bytes (address table,
        utilities, owners, free stack).
    """

    model = keras.models.load_model(model_path, compile=False)
    layers = chunk_pruned_layers(model)
    if not layers:
        raise ValueError(f"{model_path}: the model has no ChunkPrunedEmbedding layer")
    return {
        "capacity_chunks": sum(layer.capacity for layer in layers),
        "live_chunks": sum(layer.live_chunk_count() for layer in layers),
        "pool_bytes": sum(layer.capacity * layer.chunk_width * BYTES_PER_FLOAT for layer in layers),
        "live_bytes": sum(layer.live_chunk_count() * layer.chunk_width * BYTES_PER_FLOAT for layer in layers),
        "metadata_bytes": sum(layer.metadata_bytes for layer in layers),
    }


def run(context):
    settings = SETTINGS[context.profile.name]
    dim = context.profile.embedding_dim
    bad = [k for k in settings["chunks"] if dim % k]
    if bad:  # a configuration error of SETTINGS, not of the user's data
        raise ValueError(f"{NAME}: chunk counts {bad} do not divide the embedding dim {dim}")
    data = context.data()
    train = {"epochs": settings["passes"]}
    full = context.train(f"{NAME}_full", {"method": "full"}, train=train)
    runs = []
    for ratio in settings["ratios"]:
        for chunks in settings["chunks"]:
            run_name = f"{NAME}_{ratio}x_K{chunks}"
            compression = {"method": "pruned", "ratio": float(ratio), "num_chunks": chunks,
                           "pruning_period": settings["period"]}
            result = context.train(run_name, compression, train=dict(train, save_model=True))
            state = context.saved_model_numbers(run_name, result, "pool_state.json", pool_state)
            runs.append(dict(state, ratio=ratio, chunks=chunks, auc=result["auc"], log_loss=result["log_loss"],
                             full_table_bytes=result["logical_bytes"], train_seconds=result["train_seconds"],
                             samples_per_s=result["train_samples_per_s"]))
    return {"runs": runs, "full": {"auc": full["auc"], "log_loss": full["log_loss"],
                                   "table_bytes": full["logical_bytes"], "samples_per_s": full["train_samples_per_s"]},
            "ratios": settings["ratios"], "chunks": settings["chunks"], "passes": settings["passes"],
            "period": settings["period"], "embedding_dim": dim, "ceiling_auc": data.ceiling_auc}


def megabytes(n):
    return f"{n / 1e6:,.2f}"


def report(results, context):
    import matplotlib  # lazily: only the report draws (after choosing the Agg backend)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily: only the report draws (after choosing the Agg backend)

    runs, full, ceiling = results["runs"], results["full"], results["ceiling_auc"]
    rows = [["full", "-", f"{full['auc']:.4f}", f"{full['log_loss']:.4f}", "-", "-", megabytes(full["table_bytes"]),
             "1.0x", "-"]]
    for r in runs:
        state = r["pool_bytes"] + r["metadata_bytes"]
        rows.append([f"{r['ratio']:g}x", f"{r['chunks']}" + (" (rows)" if r["chunks"] == 1 else ""),
                     f"{r['auc']:.4f}", f"{r['log_loss']:.4f}",
                     f"{megabytes(r['live_bytes'])} ({r['live_chunks'] / r['capacity_chunks']:.0%} of pool)",
                     megabytes(r["metadata_bytes"]), megabytes(state), f"{r['full_table_bytes'] / state:.1f}x",
                     f"{r['samples_per_s'] / full['samples_per_s']:.2f}x" if r["samples_per_s"] and
                     full["samples_per_s"] else "-"])

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, k in enumerate(results["chunks"]):
        points = sorted((r["ratio"], r) for r in runs if r["chunks"] == k)
        ratios = [p[0] for p in points]
        label = f"K = {k}" + (" (row pruning)" if k == 1 else "")
        left.plot(ratios, [p[1]["auc"] for p in points], marker="o", color=f"C{i}", label=label)
        right.plot(ratios, [(p[1]["pool_bytes"] + p[1]["metadata_bytes"]) / 1e6 for p in points], marker="o",
                   color=f"C{i}", label=label)
    left.axhline(full["auc"], color="k", linestyle="-.", label="full tables")
    right.axhline(full["table_bytes"] / 1e6, color="k", linestyle="-.", label="full tables")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(results["ratios"])
        axis.set_xticklabels([f"{r:g}x" for r in results["ratios"]])
        axis.set_xlabel("pool ratio (full table chunks / pool chunks)")
        axis.legend(fontsize=7)
    left.set_ylabel(f"eval AUC after {results['passes']:g} epoch(s)")
    right.set_ylabel("embedding state MB (pool + bookkeeping)")
    right.set_ylim(bottom=0)
    figure_md = context.figure(figure, NAME, "Chunk-pruned DLRM: eval AUC (left) and the embedding state it "
                                             "actually holds (right) against the pool ratio, per chunks per row K.")
    return "\n".join([
        f"## {TITLE}", "",
        f"DLRM (d = {results['embedding_dim']}) with every table chunk-pruned, the pool at 1/ratio of the full "
        f"tables' chunks, K chunks per row (K = 1: row pruning), a pruning event every {results['period']} steps, "
        f"{results['passes']:g} epoch(s) with the profile's optimizer and seed; one run per configuration "
        "(differences of a few 0.001 are within seed noise). Live = chunks in the pool at the end. Bookkeeping "
        "(8 bytes per chunk of the full table plus 12 per pool slot) grows with K and is not counted by the "
        "ratio; state = pool + bookkeeping is the memory the layer really holds (optimizer slots for the pool "
        "come on top, as they do for full tables), and 'smaller' compares it with the full tables. The FIITED "
        "paper reports chunk pruning (K > 1) above row pruning at the same pool memory."
        + ("" if ceiling is None else f" The planted model's AUC (the ceiling) is {ceiling:.4f}."), "",
        markdown_table(["ratio", "K", "AUC", "log loss", "live MB", "bookkeeping MB", "state MB",
                        "smaller than full", "train samples/s vs full"], rows),
        figure_md])
