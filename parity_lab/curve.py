"""Accuracy against length for a trained run: ``test/acc_unseen``, a png and a TensorBoard image.

``eval.curve.max_len`` switches it on; lengths are every length up to ``eval.curve.dense_until``,
then ``eval.curve.per_decade`` log-spaced lengths per factor of ten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from parity_lab.evaluate import accuracy_by_length, curve_lengths
from parity_lab.models import ParityRNN
from parity_lab.run_files import atomic_path


def exact_until(curve: dict[int, float]) -> int:
    """The longest length up to which every evaluated length is 100% correct (0: none)."""
    exact = 0
    for length in sorted(curve):
        if curve[length] < 1.0:
            break
        exact = length
    return exact


def plot_curve(curve: dict[int, float], train_lengths: tuple[int, int], title: str) -> Any:
    """A matplotlib figure of accuracy against length (log x axis), training range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(curve)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.axvspan(train_lengths[0], train_lengths[1], color="tab:green", alpha=0.15, label="trained")
    axes.plot(lengths, [curve[n] for n in lengths], marker=".", markersize=3, linewidth=1)
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set_xscale("log")
    axes.set_ylim(0.4, 1.02)
    axes.set_xlabel("string length (bits)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(loc="lower left")
    figure.tight_layout()
    return figure


def length_curve(
    model: ParityRNN, cfg: DictConfig, run_dir: Path, writer: Any, step: int
) -> dict[str, Any]:
    """Evaluate ``model`` over the configured lengths; write ``length_curve.png`` into ``run_dir``
    and the figure to TensorBoard ``writer``; return the metrics for ``metrics.json``."""
    options = cfg.eval.curve
    lengths = curve_lengths(options.max_len, options.dense_until, options.per_decade)
    curve = accuracy_by_length(
        model, lengths, options.num_strings, cfg.seed, cfg.data.encoding, options.chunk_len
    )
    unseen = [acc for n, acc in curve.items() if n > cfg.data.max_len]
    title = (
        f"{cfg.model.rnn._target_.rsplit('.', 1)[-1]} hidden {cfg.model.hidden_size}, "
        f"seed {cfg.seed}, {options.num_strings} strings per length"
    )
    figure = plot_curve(curve, (cfg.data.min_len, cfg.data.max_len), title)
    with atomic_path(run_dir / "length_curve.png") as temporary:
        figure.savefig(temporary, dpi=120)
    writer.add_figure("test/length_curve", figure, global_step=step)
    metrics: dict[str, Any] = {
        "test/exact_until": exact_until(curve),
        "length_curve": {str(n): acc for n, acc in curve.items()},
    }
    if unseen:
        metrics["test/acc_unseen"] = sum(unseen) / len(unseen)
    return metrics
