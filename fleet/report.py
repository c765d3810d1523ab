"""Reports of a run: the JSON document and the accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path

from fleet.follow import RoundRow


def write_json(path: Path, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def plot_rounds(rows: list[RoundRow], path: Path, title: str) -> Path:
    """Accuracy (held-out and federated) and loss per round, one line per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for job in sorted({r.job for r in rows}):
        rs = [r for r in rows if r.job == job]
        x = [r.round for r in rs]
        ax1.plot(x, [r.accuracy for r in rs], marker="o", label=f"{job} held-out")
        ax1.plot(x, [r.federated_accuracy for r in rs], linestyle="--",
                 label=f"{job} federated eval")
        ax2.plot(x, [r.loss for r in rs], marker="o", label=job)
    ax1.set(xlabel="global round (model version)", ylabel="accuracy", ylim=(0, 1))
    ax2.set(xlabel="global round (model version)", ylabel="held-out loss")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
