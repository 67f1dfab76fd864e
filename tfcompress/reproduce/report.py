"""REPORT.md: a header saying how the run was made, then one section per experiment, then what was not verified."""

import datetime
import os
import platform

from tfcompress._files import write_atomically


def markdown_table(headers, rows):
    """A GitHub markdown table; numbers are formatted by the caller (cells are str()-ed as they are)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header(context, seconds_by_experiment):
    """Title, command, seed, profile, data and machine, and how long each experiment took."""
    p = context.profile
    if context.data_dir is None:
        data = (f"planted-signal synthetic Criteo: {p.rows:,} train + {p.eval_rows:,} eval rows, the Kaggle table "
                f"sizes x {p.cardinality_scale:g}, seed {context.seed}")
    else:
        data = f"converted TFRecords from `{context.data_dir}` (no planted ceiling: real labels)"
    lines = [
        "# tfcompress reproduce report",
        "",
        f"- Command: `{context.command}`",
        f"- Seed: {context.seed}; profile `{p.name}`",
        f"- Data: {data}",
        f"- Model: DLRM, embedding dim {p.embedding_dim}, bottom MLP {list(p.bottom_mlp)}, top MLP "
        f"{list(p.top_mlp)}, {p.optimizer} lr {p.learning_rate:g}, batch {p.batch_size:,} (unless a section says "
        "otherwise)",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU core(s), Python {platform.python_version()}; "
        f"written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        "Every number below comes from this run. Times are single runs on a shared machine: compare the ratios "
        "within a table, not absolute values across reports.",
        "",
        markdown_table(["experiment", "minutes"],
                       [[name, f"{seconds / 60:.1f}"] for name, seconds in seconds_by_experiment.items()]
                       + [["total", f"{sum(seconds_by_experiment.values()) / 60:.1f}"]]),
    ]
    return "\n".join(lines)


def write_report(context, sections, seconds_by_experiment):
    """Write <out>/REPORT.md from the experiments' sections (each a markdown string); returns its path."""
    path = os.path.join(context.out_dir, "REPORT.md")
    text = header(context, seconds_by_experiment) + "\n" + "\n".join(sections)
    write_atomically(path, text)
    return path
