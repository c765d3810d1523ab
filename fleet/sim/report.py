"""Reports of a run: the JSON document, the plot of the loss and the task's metrics (with ε
spent for a DP job) and the privacy plot of `hfl privacy`."""

from __future__ import annotations

import json
from pathlib import Path

from fleet.sim.follow import RoundRow


def write_json(path: Path, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return Path(path)


def plot_rounds(rows: list[RoundRow], path: Path, title: str) -> Path:
    """Per round, one line per job: the loss, then each of the task's metrics (held-out
    solid, the agents' federated evaluation dashed), and the privacy budget spent when a job
    is differentially private."""
    names = list(dict.fromkeys(k for r in rows for k in (*r.metrics, *r.federated)))
    private = any(r.epsilon is not None for r in rows)
    panels = 1 + len(names) + private
    fig, axes = _pyplot().subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    for job in sorted({r.job for r in rows}):
        rs = [r for r in rows if r.job == job]
        x = [r.round for r in rs]
        axes[0].plot(x, [r.loss for r in rs], marker="o", label=f"{job} held-out")
        axes[0].plot(x, [r.federated_loss for r in rs], linestyle="--",
                     label=f"{job} federated eval")
        for ax, name in zip(axes[1:], names, strict=False):
            ax.plot(x, [r.metrics.get(name, float("nan")) for r in rs], marker="o",
                    label=f"{job} held-out")
            ax.plot(x, [r.federated.get(name, float("nan")) for r in rs], linestyle="--",
                    label=f"{job} federated eval")
        if private:
            axes[-1].plot(x, [r.epsilon for r in rs], marker="o", label=job)
    xlabel = "global round (model version)"
    axes[0].set(xlabel=xlabel, ylabel="loss")
    for ax, name in zip(axes[1:], names, strict=False):
        ax.set(xlabel=xlabel, ylabel=name)
    if private:
        axes[-1].set(xlabel=xlabel, ylabel="ε spent")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path, title)


def plot_epsilon(curve: list[float], path: Path, title: str) -> Path:
    """ε spent after each global round (the plot of `hfl privacy`)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot(range(1, len(curve) + 1), curve, marker="o" if len(curve) <= 50 else None)
    ax.set(xlabel="global round (model version)", ylabel="ε spent (worst case over agents)")
    ax.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_curves(curves: dict[str, list[float]], path: Path, title: str,
                reference: tuple[float, str] | None = None,
                ylim: tuple[float, float] = (0, 1)) -> Path:
    """Test accuracy per global round, one line per label (the benchmarks' plots), with an
    optional horizontal reference (a target or a paper's figure) and its label."""
    fig, ax = _pyplot().subplots(figsize=(8, 5))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label)
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle=":", label=reference[1])
    ax.set(xlabel="global round", ylabel="MNIST test accuracy (10,000 images)", ylim=ylim)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return Path(path)
