"""loss.png: the curves of a run, drawn from its metrics.jsonl (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from duomodal.files import atomic_write_bytes


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """loss.png: train loss against step, and the validation figures, from metrics.jsonl."""
    # matplotlib loads here, when a figure is drawn: importing it costs a second that the rest does not need
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend, lazily as above

    train_rows, val_rows = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            (train_rows if row.get("split") == "train" else val_rows).append(row)
    keys = [k for k in (val_rows[-1] if val_rows else {})
            if k not in ("split", "step", "loss", "dropped", "elapsed_s")][:4]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.5 * (1 + len(keys)), 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if val_rows and "loss" in val_rows[0]:
        ax.plot([r["step"] for r in val_rows], [r["loss"] for r in val_rows], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    for panel, key in zip(axes[0][1:], keys):  # one panel per validation figure: their scales differ
        panel.plot([r["step"] for r in val_rows if key in r], [r[key] for r in val_rows if key in r], "o-")
        panel.set_title(f"val {key}")
        panel.set_xlabel("step")
        panel.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())
