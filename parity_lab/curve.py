"""Accuracy against length for a trained run: ``test/acc_unseen``, ``test/exact_until``, a png, a
TensorBoard image and the scalar series ``val/acc_by_length`` (step = length).

``eval.curve.max_len`` switches it on; lengths are every length up to ``eval.curve.dense_until``,
then ``eval.curve.per_decade`` log-spaced lengths per factor of ten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from parity_lab.evaluate import accuracy_by_length, curve_lengths, readable_lengths, skip_note
from parity_lab.models import ParityRNN
from parity_lab.run_files import atomic_path


def exact_until(curve: dict[int, float]) -> int:
    """The longest length up to which every evaluated length is 100% correct (0: none). An
    accuracy that is not a number (no strings scored) is not 100%."""
    exact = 0
    for length in sorted(curve):
        if not curve[length] >= 1.0:  # NaN compares false either way: never exact
            break
        exact = length
    return exact


def short_number(value: float, _position: int | None = None) -> str:
    """Axis label of a length: 1, 10, 100, 1k, 10k, 1M."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def plot_curve(curve: dict[int, float], train_lengths: tuple[int, int], num_strings: int) -> Any:
    """A figure of the share of strings wrong against length, both axes log, sized for
    TensorBoard's image card (340 x 200 pixels, shown unscaled): the training range shaded,
    ``exact_until`` marked, and a single mistake among ``num_strings`` strings visible (no
    mistake is drawn on the bottom line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(curve)
    none = 1 / (2 * num_strings)  # where "no mistake" sits on the log axis
    errors = [max(1.0 - curve[n], none) for n in lengths]
    exact = exact_until(curve)
    with plt.rc_context({"font.size": 8}):
        figure, axes = plt.subplots(figsize=(3.4, 2.0), dpi=100)
        axes.axvspan(*train_lengths, color="tab:green", alpha=0.15, label="trained")
        if exact:
            axes.axvline(
                exact, color="tab:red", linestyle="--", linewidth=1, label=f"exact to {exact:,}"
            )
        axes.plot(lengths, errors, marker=".", markersize=3, linewidth=1)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_ylim(none / 1.5, 1.5)
        ticks = {none: "none", 1 / num_strings: f"1 of {num_strings}", 0.1: "10%", 0.5: "50%"}
        axes.set_yticks(list(ticks), list(ticks.values()))
        axes.xaxis.set_major_formatter(short_number)
        axes.minorticks_off()
        axes.grid(alpha=0.3)
        axes.set_xlabel("string length (bits)")
        axes.set_ylabel("strings wrong")
        axes.legend(loc="best", fontsize=7, framealpha=0.8)
        figure.tight_layout(pad=0.3)
    return figure


def length_curve(
    model: ParityRNN, cfg: DictConfig, run_dir: Path, writer: Any, step: int
) -> dict[str, Any]:
    """Evaluate ``model`` over the configured lengths; write ``length_curve.png`` into ``run_dir``
    and the figure to TensorBoard ``writer``; return the metrics for ``metrics.json``."""
    options = cfg.eval.curve
    lengths, skipped = readable_lengths(
        model, curve_lengths(options.max_len, options.dense_until, options.per_decade)
    )
    if skipped:
        print(skip_note(model, skipped, "the length curve"))
    curve = accuracy_by_length(
        model, lengths, options.num_strings, cfg.seed, cfg.data.encoding, options.chunk_len
    )
    unseen = [acc for n, acc in curve.items() if n > cfg.data.max_len]
    figure = plot_curve(curve, (cfg.data.min_len, cfg.data.max_len), options.num_strings)
    with atomic_path(run_dir / "length_curve.png") as temporary:
        figure.savefig(temporary, dpi=200)  # sharp beyond TensorBoard
    writer.add_figure("val/length_curve", figure, global_step=step)
    for length, accuracy in curve.items():  # step = length, so runs overlay in Time Series
        writer.add_scalar("val/acc_by_length", accuracy, global_step=length)
    metrics: dict[str, Any] = {
        "test/exact_until": exact_until(curve),
        "length_curve": {str(n): acc for n, acc in curve.items()},
    }
    if skipped:  # not evaluated: neither in the curve nor in exact_until
        metrics["length_curve_skipped"] = skipped
    if unseen:
        metrics["test/acc_unseen"] = sum(unseen) / len(unseen)
    return metrics
