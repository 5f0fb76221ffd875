"""Sweep summary: ``python -m parity_lab.report SWEEP_DIR``, also run when a multirun ends.

Writes ``summary.csv`` (one row per job), ``summary.md`` (jobs grouped by configuration, seeds
aggregated) and ``summary.png`` into the sweep directory. Every job Hydra planned is listed: a job
whose directory has ``metrics.json`` is ``ok``; one with ``error.txt`` instead is ``failed``; one
whose ``metrics.json`` or Hydra record cannot be read (empty, cut short, not numbers) is
``corrupt``; one with neither is ``unfinished`` (killed, still running, or crashed without a
record); one planned in ``multirun.yaml`` but without a directory is ``missing``. Kept light: no
torch, no lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import os
import signal
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from parity_lab.compact import expand
from parity_lab.naming import CONFIG_DIR
from parity_lab.run_files import (
    CorruptResultError,
    atomic_path,
    read_metrics,
    read_run_yaml,
    write_atomic,
)

STATUSES = ("ok", "failed", "corrupt", "unfinished", "missing")
SEED_KEY = "seed"  # aggregated over, never part of a configuration


def tested_length(metric: str) -> int | None:
    """``test/acc_len_100`` -> 100; None for any other metric."""
    prefix, _, length = metric.rpartition("_")
    return int(length) if prefix == "test/acc_len" and length.isdigit() else None


@dataclass
class Job:
    """One planned or found job of a sweep."""

    num: int | None
    status: str
    overrides: dict[str, str]
    dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def longest_len(self) -> int | None:
        """The longest string length this job was tested at (``test/acc_len_<L>``)."""
        lengths = [tested_length(k) for k in self.metrics]
        return max((n for n in lengths if n is not None), default=None)

    @property
    def acc_longest(self) -> float | None:
        length = self.longest_len
        return None if length is None else self.metrics[f"test/acc_len_{length}"]


def override_dict(overrides: Iterable[str]) -> dict[str, str]:
    """``["+sweep=x", "model.hidden_size=4"]`` -> ``{"sweep": "x", "model.hidden_size": "4"}``."""
    pairs = (override.split("=", 1) for override in overrides if "=" in override)
    return {key.lstrip("+~"): value for key, value in pairs}


def expand_sweep(params: dict[str, Any], overrides: Iterable[str]) -> list[list[str]]:
    """Each job's overrides, in job-number order, as Hydra's basic sweeper expands
    ``hydra.sweeper.params`` and the command line's overrides (``model=lstm,gru seed=range(3)``)."""
    arguments = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    # Like BasicSweeper.split_arguments: a later override of a key replaces an earlier one (in
    # place), and jobs are the cartesian product of every key's values, numbered in that order.
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def planned_overrides(sweep_dir: Path) -> list[list[str]] | None:
    """The jobs Hydra planned, from the sweep's ``multirun.yaml``; None when that file is absent
    or a sweeper other than the basic one planned them."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:  # as text: nothing in a run's files is resolved (an ${oc.env:...} stays as written)
        hydra_cfg = OmegaConf.to_container(read_run_yaml(path), resolve=False)["hydra"]
        sweeper, task = hydra_cfg["sweeper"], [str(o) for o in hydra_cfg["overrides"]["task"]]
    except Exception:
        return None
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        return expand_sweep(sweeper.get("params") or {}, task)
    except Exception:  # glob() and the like need the config to expand: list found jobs only
        return None


def _job_num(job_dir: Path) -> int | None:
    """Hydra's ``hydra.job.num`` of a job dir, else the number its name starts with."""
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    with contextlib.suppress(Exception):  # unreadable: the directory name still tells
        num = OmegaConf.to_container(read_run_yaml(hydra_yaml), resolve=False)["hydra"]["job"]
        num = num["num"]
        if isinstance(num, int):
            return num
    prefix = job_dir.name.split("_", 1)[0]
    return int(prefix) if prefix.isdigit() else None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")[:160]


def found_job(job_dir: Path) -> Job:
    """A job from its directory: its overrides and, if it finished, its metrics."""
    overrides_yaml = job_dir / ".hydra" / "overrides.yaml"
    try:  # text, as written: never resolved (an ${oc.env:...} would read the environment)
        written = OmegaConf.to_container(read_run_yaml(overrides_yaml), resolve=False)
        if not isinstance(written, list):
            raise ValueError("expected a list of overrides")
        overrides = override_dict(str(o) for o in written)
    except Exception as error:
        # the reason alone, cut: the file is named once, whatever the length of its path
        reason = " ".join(str(error).split()).removeprefix(f"{overrides_yaml}: ")[:120]
        return Job(_job_num(job_dir), "corrupt", {}, job_dir, note=f"{overrides_yaml}: {reason}")
    job = Job(_job_num(job_dir), "unfinished", overrides, dir=job_dir)
    if (job_dir / "metrics.json").is_file():
        try:
            job.status, job.metrics = "ok", read_metrics(job_dir / "metrics.json")
        except CorruptResultError as error:
            job.status, job.note = "corrupt", str(error)
    elif (job_dir / "error.txt").is_file():
        job.status, job.note = "failed", _last_line(job_dir / "error.txt")
    else:
        job.note = "no metrics.json and no error.txt: killed, still running, or crashed"
    return job


def recorded_value(job_dir: Path | None, key: str) -> str:
    """What ``key`` was in a job that did not override it, as its directory records it: a group's
    choice (``.hydra/hydra.yaml``), else the config's value as written, never resolved
    (``.hydra/config.yaml``); ``""`` when not recorded."""
    try:
        if key.isidentifier() and (CONFIG_DIR / key).is_dir():  # a group: model, experiment
            path, parts = job_dir / ".hydra" / "hydra.yaml", ["hydra", "runtime", "choices", key]
        else:
            path, parts = job_dir / ".hydra" / "config.yaml", key.split(".")
        value = OmegaConf.to_container(read_run_yaml(path), resolve=False)
        for part in parts:
            value = value[part]
    except Exception:  # no directory (a missing job), no such key, an unreadable record
        return ""
    if isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
        return f"[{','.join(map(str, value))}]"  # as an override writes it: [50,100]
    return "" if isinstance(value, dict | list) else "null" if value is None else str(value)


def fill_unset(jobs: list[Job]) -> None:
    """Jobs of several sweeps: a key some override and others not gets, in the others, the value
    they ran with, so that the table compares like with like (never a blank ``key=``)."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    for job in jobs:
        for key in keys:
            if key not in job.overrides and key != SEED_KEY and job.status != "corrupt":
                job.overrides[key] = recorded_value(job.dir, key)


def drop_rerun(jobs: list[Job]) -> list[Job]:
    """Jobs of several sweeps: one that did not finish in one sweep (stopped, or never started)
    and ran ok in another, with the same overrides, counts once, as the run that finished."""
    done = {tuple(sorted(job.overrides.items())) for job in jobs if job.status == "ok"}
    return [
        job
        for job in jobs
        if job.status == "ok" or tuple(sorted(job.overrides.items())) not in done
    ]


def collect_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep: those with a directory, and planned ones without (``missing``)."""
    job_dirs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")})
    jobs = [found_job(d) for d in job_dirs if d != sweep_dir]
    found_nums = {job.num for job in jobs}
    for num, overrides in enumerate(planned_overrides(sweep_dir) or []):
        if num not in found_nums:
            jobs.append(Job(num, "missing", override_dict(overrides), note="no job directory"))
    return sorted(jobs, key=lambda j: (j.num is None, j.num if j.num is not None else 0, j.dir))


def swept_keys(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between jobs (seed excluded), and the fixed ones."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    swept, fixed = [], {}
    for key in keys:
        values = {job.overrides.get(key) for job in jobs}
        if len(values) > 1:
            if key != SEED_KEY:
                swept.append(key)
        elif key != SEED_KEY:
            fixed[key] = values.pop() or ""
    return swept, fixed


def metric_keys(jobs: list[Job]) -> list[str]:
    """Every metric any job reported: ``val/acc`` first, then tested lengths ascending."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.metrics))

    def order(key: str) -> tuple[int, int]:
        if key == "val/acc":
            return (0, 0)
        length = tested_length(key)
        return (2, 0) if length is None else (1, length)

    return sorted(keys, key=order)


def write_csv(jobs: list[Job], sweep_dir: Path) -> Path:
    override_keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    metrics = metric_keys(jobs)
    path = sweep_dir / "summary.csv"
    with atomic_path(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", "dir", *override_keys, *metrics, "note"])
        for job in jobs:
            writer.writerow(
                [
                    job.num,
                    job.status,
                    os.path.relpath(job.dir, sweep_dir) if job.dir else "",
                    *(job.overrides.get(k, "") for k in override_keys),
                    *(job.metrics.get(k, "") for k in metrics),
                    job.note,
                ]
            )
    return path


@dataclass
class Group:
    """The jobs of one configuration (all swept overrides but the seed equal)."""

    config: dict[str, str]
    jobs: list[Job]

    @property
    def ok(self) -> list[Job]:
        return [job for job in self.jobs if job.status == "ok"]

    @property
    def solved(self) -> list[Job]:
        return [job for job in self.ok if job.metrics.get("solved")]

    @property
    def success_rate(self) -> float | None:
        return len(self.solved) / len(self.ok) if self.ok else None

    def values(self, metric: str) -> list[float]:
        if metric == "acc_longest":
            return [job.acc_longest for job in self.ok if job.acc_longest is not None]
        return [
            float(job.metrics[metric]) for job in self.ok if job.metrics.get(metric) is not None
        ]

    @property
    def median_solved_step(self) -> float | None:
        steps = [
            job.metrics["solved_step"]
            for job in self.solved
            if job.metrics.get("solved_step") is not None
        ]
        return statistics.median(steps) if steps else None

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.config.items()) or "all jobs"


def group_jobs(jobs: list[Job], swept: list[str]) -> list[Group]:
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        config = {key: job.overrides.get(key, "") for key in swept}
        groups.setdefault(tuple(config.values()), Group(config, [])).jobs.append(job)
    return list(groups.values())


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% score interval of a success rate: 2/2 gives [0.34, 1], 0/2 [0, 0.66]."""
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials**2)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def longest_label(groups: list[Group]) -> str:
    lengths = {job.longest_len for group in groups for job in group.ok} - {None}
    return f"acc @ len {lengths.pop()}" if len(lengths) == 1 else "acc @ longest len"


def summary_table(groups: list[Group]) -> str:
    """Markdown table, one row per configuration."""
    header = [
        "configuration",
        "runs ok",
        "solved",
        "success rate",
        "95% interval (Wilson)",
        "val/acc",
        longest_label(groups),
        "median steps to solve",
        "not ok",
    ]
    # Length-curve metrics (eval.curve) get columns only when the sweep measured them.
    curve = any("test/exact_until" in job.metrics for group in groups for job in group.ok)
    if curve:
        header[-1:-1] = ["acc beyond training", "exact up to (bits, per job)"]
    # Scaled accuracy, (acc - 0.5) / 0.5 averaged over the tested lengths, as the xLSTM paper and
    # Grazzi et al. report parity: mean over seeds and the best seed (their tables show the best).
    scaled = any("test/scaled_acc_mean" in job.metrics for group in groups for job in group.ok)
    if scaled:
        header[-1:-1] = ["scaled acc (mean over lengths)", "best scaled acc"]
    # Table 3's own figure (experiment=state_tracking's 8,192-string pool), each job's and the
    # mean: a best-of-3 hides the spread the per-job values show.
    pool = any("test/scaled_acc_pool" in job.metrics for group in groups for job in group.ok)
    if pool:
        header[-1:-1] = ["scaled acc on the pool, per job", "pool: mean ± std"]
    # The exactness issue's three columns: certificates, worst-case strings, random strings.
    proofs = any("certified" in job.metrics for group in groups for job in group.ok)
    if proofs:
        header[-1:-1] = ["certified (true/false/none)", "shortest string found wrong"]
    random_exact = any("test/exact_until_random" in job.metrics for g in groups for job in g.ok)
    if random_exact:
        header[-1:-1] = ["exact up to, random strings only"]
    rows = [header, ["---"] * len(header)]
    for group in groups:
        not_ok = ", ".join(
            f"{n} {status}"
            for status in STATUSES[1:]
            if (n := sum(job.status == status for job in group.jobs))
        )
        rate, step = group.success_rate, group.median_solved_step
        rows.append(
            [
                group.label,
                f"{len(group.ok)}/{len(group.jobs)}",
                str(len(group.solved)),
                "-" if rate is None else f"{rate:.2f}",
                "-"
                if rate is None
                else "[{:.2f}, {:.2f}]".format(*wilson_interval(len(group.solved), len(group.ok))),
                _mean_std(group.values("val/acc")),
                _mean_std(group.values("acc_longest")),
                "-" if step is None else f"{step:g}",
                not_ok or "-",
            ]
        )
        if curve:
            exact = ", ".join(f"{v:.0f}" for v in group.values("test/exact_until")) or "-"
            rows[-1][-1:-1] = [_mean_std(group.values("test/acc_unseen")), exact]
        if scaled:
            values = group.values("test/scaled_acc_mean")
            best = f"{max(values):.3f}" if values else "-"
            rows[-1][-1:-1] = [_mean_std(values), best]
        if pool:
            values = group.values("test/scaled_acc_pool")
            rows[-1][-1:-1] = [", ".join(f"{v:.3f}" for v in values) or "-", _mean_std(values)]
        if proofs:
            verdicts = [job.metrics.get("certified") for job in group.ok]
            counts = "/".join(str(sum(v is x for v in verdicts)) for x in (True, False, None))
            wrong = [
                job.metrics.get("worst_case_wrong") or job.metrics.get("certified_counterexample")
                for job in group.ok
            ]
            shortest = min((w for w in wrong if w), key=lambda w: len(expand(w)), default=None)
            if shortest:
                first = f"`{shortest}`"
            else:  # certified false on a random string only (too long to write down), or none
                first = "a random string" if False in verdicts else "none"
            rows[-1][-1:-1] = [counts, first]
        if random_exact:
            values = group.values("test/exact_until_random")
            rows[-1][-1:-1] = [", ".join(f"{v:.0f}" for v in values) or "-"]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def write_markdown(
    sweep_dir: Path, jobs: list[Job], groups: list[Group], fixed: dict[str, str], plot: str
) -> Path:
    counts = ", ".join(
        f"{n} {status}"
        for status in STATUSES
        if (n := sum(job.status == status for job in jobs)) or status == "ok"
    )
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(jobs)} jobs: {counts}. Seeds are aggregated; success rate = solved / runs ok.",
    ]
    if fixed:
        lines.append("Same in every job: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()))
    lines += ["", summary_table(groups), ""]
    trouble = [job for job in jobs if job.status != "ok"]
    if trouble:
        lines += ["## Jobs not ok", "", "| job | status | overrides | note |", "|---|---|---|---|"]
        for job in trouble:
            overrides = " ".join(f"{k}={v}" for k, v in job.overrides.items())
            note = job.note.replace("|", "\\|")
            lines.append(f"| {job.num} | {job.status} | {overrides} | {note} |")
        lines.append("")
    lines += [f"![summary]({plot})", ""]
    path = sweep_dir / "summary.md"
    write_atomic(path, "\n".join(lines))
    return path


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


CATEGORY_SPREAD = 0.3  # of the gap between two categories: the width the series share there


def summary_figure(title: str, groups: list[Group], swept: list[str]) -> Any:
    """Success rate, val/acc and accuracy at the longest length against the most varied swept
    parameter, one series per combination of the others: a line over numbers, points beside
    each other over categories (model names: nothing between them to join)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = max(swept, key=lambda k: len({g.config[k] for g in groups}), default=None)
    x_values = list(dict.fromkeys(g.config[x_key] for g in groups)) if x_key else ["all jobs"]
    numeric = _numeric(x_values)
    positions = numeric if numeric else list(range(len(x_values)))
    lines: dict[str, list[tuple[float, Group]]] = {}
    for group in groups:
        hue = " ".join(f"{k}={v}" for k, v in group.config.items() if k != x_key)
        x = positions[x_values.index(group.config[x_key])] if x_key else 0
        lines.setdefault(hue, []).append((x, group))

    panels = [
        ("success rate", None),
        ("val/acc", "val/acc"),
        (longest_label(groups), "acc_longest"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), squeeze=False)
    for ax, (panel, metric) in zip(axes[0], panels, strict=True):
        for number, (hue, points) in enumerate(lines.items()):
            points.sort(key=lambda p: p[0])
            # over categories, each series a little aside, so that equal values do not hide
            spread = 0.0 if numeric or len(lines) < 2 else CATEGORY_SPREAD
            shift = spread * (number / max(len(lines) - 1, 1) - 0.5)
            xs, ys, errs = [], [], []
            for x, group in points:
                values = [] if metric is None else group.values(metric)
                y = (
                    group.success_rate
                    if metric is None
                    else (statistics.mean(values) if values else None)
                )
                if y is None:
                    continue
                xs.append(x + shift)
                ys.append(y)
                errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(
                xs,
                ys,
                yerr=None if metric is None else errs,
                marker="o",
                linestyle="-" if numeric else "none",  # categories: points, never joined
                capsize=3,
                label=hue or None,
            )
        if metric is not None:  # accuracies: 0.5 is guessing
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_title(panel)
        ax.set_xlabel(x_key or "")
        ax.set_ylim(-0.05, 1.05)
        if numeric and min(numeric) > 0 and max(numeric) / min(numeric) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(
            positions, x_values, rotation=0 if numeric else 30, ha="center" if numeric else "right"
        )
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    if any(lines):
        axes[0][-1].legend(fontsize="small")
    fig.suptitle(f"{title}: mean ± std over seeds")
    fig.tight_layout()
    return fig


def write_plot(sweep_dir: Path, groups: list[Group], swept: list[str]) -> Path:
    """``summary.png``: the ``summary_figure`` of the sweep."""
    import matplotlib.pyplot as plt

    fig = summary_figure(f"{sweep_dir.parent.name}/{sweep_dir.name}", groups, swept)
    path = sweep_dir / "summary.png"
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)
    return path


def write_report(sweep_dir: Path | str, sources: list[Path] | None = None) -> str:
    """Write summary.csv, summary.md and summary.png for a sweep dir; return the table. With
    ``sources``, the summary of all their jobs together (one table over several sweeps: a new
    cell beside a stored baseline) goes into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = [job for source in sources or [sweep_dir] for job in collect_jobs(source)]
    if sources and len(sources) > 1:
        jobs = drop_rerun(jobs)
        fill_unset(jobs)
    swept, fixed = swept_keys(jobs)
    groups = group_jobs(jobs, swept)
    write_csv(jobs, sweep_dir)
    plot = write_plot(sweep_dir, groups, swept)
    write_markdown(sweep_dir, jobs, groups, fixed, plot.name)
    return summary_table(groups)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): report when a multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Where jobs run in other processes (joblib, submitit), SIGTERM to the sweep's own
        process (a scheduler ending it) still leaves a summary, listing the jobs it cut short as
        unfinished, and exits 143. With the basic launcher the jobs run here, and each run's own
        SIGTERM handling ends the sweep with a summary (``parity_lab.__main__.run``)."""
        if config.hydra.launcher._target_.endswith("BasicLauncher"):
            return
        sweep_dir = Path(config.hydra.sweep.dir)

        def summarise_and_exit(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
            write_report(sweep_dir)
            print(f"sweep stopped by SIGTERM; summary: {sweep_dir / 'summary.md'}", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)

        signal.signal(signal.SIGTERM, summarise_and_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()  # as the run dirs are printed
        table = write_report(sweep_dir)
        print(f"\n{table}\n\nsummary: {sweep_dir / 'summary.md'} (+ summary.csv, summary.png)")


class ReportError(ValueError):
    """A path ``report`` cannot summarise; the message names it and says what to do instead."""


def find_sweeps(path: Path) -> list[Path]:
    """The sweep directories ``path`` stands for: itself when it is one, else every sweep below it.

    A sweep directory is one Hydra wrote ``multirun.yaml`` into, or, without that file (deleted, or
    never written by a launcher), one whose sub-directories are jobs (``<job>/.hydra/``).
    """
    if not path.exists():
        raise ReportError(f"{path}: no such directory")
    if not path.is_dir():
        raise ReportError(
            f"{path} is not a directory: expected a sweep directory (outputs/sweeps/...)"
        )
    if (path / "multirun.yaml").is_file():
        return [path]
    if (path / ".hydra").is_dir():
        raise ReportError(
            f"{path} is a single run, not a sweep: see it with "
            f"`python -m parity_lab.predict {path} BITS`, `python -m parity_lab.analyze {path}` "
            f"or `tensorboard --logdir {path}`"
        )
    sweeps = sorted({p.parent for p in path.rglob("multirun.yaml")})
    if sweeps:
        return sweeps
    if any((child / ".hydra").is_dir() for child in path.iterdir()):
        return [path]
    raise ReportError(f"{path} holds no sweep: no multirun.yaml and no job directories below it")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m parity_lab.report",
        description="Write summary.csv, summary.md and summary.png into a sweep directory and "
        "print its table. Works on a sweep still running, killed or with failed jobs: every "
        "planned job is listed as ok, failed, corrupt (unreadable results), unfinished or missing.",
        epilog="A directory holding several sweeps (e.g. outputs/sweeps/2026-11-23) gets one "
        "summary per sweep. For a single run, use python -m parity_lab.predict RUN_DIR BITS, "
        "python -m parity_lab.analyze RUN_DIR, or tensorboard --logdir RUN_DIR.",
    )
    parser.add_argument(
        "sweep_dir",
        type=Path,
        nargs="+",
        metavar="SWEEP_DIR",
        help="a sweep directory (outputs/sweeps/...), or a directory of sweeps; several: one "
        "table over all their jobs, written to --out",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the table over several SWEEP_DIRs goes (created; the sweeps are left as "
        "they are); required with more than one SWEEP_DIR",
    )
    args = parser.parse_args(argv)
    if len(args.sweep_dir) > 1 and args.out is None:
        parser.error("several SWEEP_DIRs make one table: say where it goes with --out DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweeps = [sweep for path in args.sweep_dir for sweep in find_sweeps(path)]
    except ReportError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    if len(args.sweep_dir) > 1:
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(args.out, sweeps))
        print(f"\nwrote {(args.out / 'summary.csv').absolute()}, summary.md, summary.png")
        return 0
    for sweep_dir in sweeps:
        if len(sweeps) > 1:
            print(f"\n== {sweep_dir} ==")
        print(write_report(sweep_dir))
        print(f"\nwrote {sweep_dir / 'summary.csv'}, summary.md, summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
