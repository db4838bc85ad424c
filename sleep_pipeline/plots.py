"""Plots for asset metadata, as Markdown with an embedded PNG (the Dagster UI renders it)."""

from __future__ import annotations

import base64
import io


def loss_curve_markdown(metrics: list[dict], title: str = "Learn: loss") -> str:
    """Train loss and validation loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#dd8452")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_markdown(fig, title)


def figure_markdown(fig, title: str) -> str:
    """A matplotlib figure as Markdown with the PNG inline (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
