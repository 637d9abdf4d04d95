"""loss.png: the curves of a run, drawn from its metrics.jsonl (matplotlib, Agg backend)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from duomodal.config import atomic_write_bytes


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """loss.png: train loss against step, and the validation figures, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows, val_rows = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            (train_rows if row.get("split") == "train" else val_rows).append(row)
    keys = [k for k in (val_rows[-1] if val_rows else {})
            if k not in ("split", "step", "loss", "dropped", "elapsed_s")]
    fig, axes = plt.subplots(1, 2 if keys else 1, figsize=(10 if keys else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if val_rows and "loss" in val_rows[0]:
        ax.plot([r["step"] for r in val_rows], [r["loss"] for r in val_rows], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    if keys:
        ax2 = axes[0][1]
        for key in keys[:4]:
            ax2.plot([r["step"] for r in val_rows if key in r], [r[key] for r in val_rows if key in r],
                     "o-", label=key)
        ax2.set_xlabel("step")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())
