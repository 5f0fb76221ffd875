"""``python -m parity_lab.report``: what it says for paths that are not one sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from parity_lab.report import main


def fake_job(sweep_dir: Path, num: int, hidden: int) -> Path:
    """A finished job directory as a sweep leaves it (overrides and metrics only)."""
    job = sweep_dir / f"{num}_model.hidden_size={hidden}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- model.hidden_size={hidden}\n")
    metrics = {"val/acc": 1.0, "test/acc_len_50": 1.0, "solved": True, "solved_step": 100}
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_missing_path_is_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no_such_sweep"
    assert main([str(missing)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err


def test_single_run_is_refused_with_the_commands_for_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert main([str(run_dir)]) != 0
    err = capsys.readouterr().err
    assert "not a sweep" in err and "parity_lab.predict" in err and "tensorboard" in err
    assert not (run_dir / "summary.md").exists()


def test_directory_of_sweeps_gets_one_summary_per_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweeps = [tmp_path / "day" / "09-00-00", tmp_path / "day" / "10-00-00"]
    for sweep, hidden in zip(sweeps, (4, 8), strict=True):
        fake_job(sweep, 0, hidden)
        (sweep / "multirun.yaml").write_text(
            "hydra:\n  sweeper:\n    _target_: some.OtherSweeper\n  overrides:\n    task: []\n"
        )
    assert main([str(tmp_path / "day")]) == 0
    out = capsys.readouterr().out
    for sweep, hidden in zip(sweeps, (4, 8), strict=True):
        assert f"== {sweep} ==" in out
        with (sweep / "summary.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [row["model.hidden_size"] for row in rows] == [str(hidden)]  # never merged


def test_help_describes_the_argument(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "SWEEP_DIR" in out and "several sweeps" in out and "unfinished" in out


def test_success_rates_carry_a_wilson_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    for num, hidden in enumerate((4, 4, 8)):
        fake_job(sweep, num, hidden)
    (sweep / "2_model.hidden_size=8" / ".hydra" / "overrides.yaml").write_text(
        "- model.hidden_size=8\n- seed=1\n"
    )
    assert main([str(sweep)]) == 0
    table = (sweep / "summary.md").read_text()
    assert "95% interval (Wilson)" in table
    assert "| 1.00 | [0.34, 1.00] |" in table  # 2 of 2 solved says little
    assert "| 1.00 | [0.21, 1.00] |" in table  # 1 of 1 says less


def test_several_sweeps_make_one_table_in_out(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    baseline, new = tmp_path / "baseline", tmp_path / "new"
    fake_job(baseline, 0, 4)
    fake_job(new, 0, 8)
    with pytest.raises(SystemExit):  # where the table goes must be said
        main([str(baseline), str(new)])
    out = tmp_path / "compare"
    assert main([str(baseline), str(new), "--out", str(out)]) == 0
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["model.hidden_size"] for row in rows) == ["4", "8"]
    assert "model.hidden_size=4" in (out / "summary.md").read_text()
    assert not (baseline / "summary.md").exists() and not (new / "summary.md").exists()


def test_a_job_cut_short_in_one_sweep_and_rerun_in_another_counts_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Seeds 0-2 planned, seed 1 ran and seed 2 was stopped before it started; seed 2 ran
    alone in a second sweep. Together: 3 runs, all ok, none missing."""
    first, second = tmp_path / "seeds0-2", tmp_path / "seed2"
    (first / "multirun.yaml").parent.mkdir(parents=True)
    (first / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper."
        "BasicSweeper\n    params: {}\n  overrides:\n    task: ['seed=0,1,2']\n"
    )
    for num, root in ((0, first), (1, first), (0, second)):
        seed = 2 if root == second else num
        job = fake_job(root, num, 4)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    assert main([str(first)]) == 0
    assert "1 missing" in (first / "summary.md").read_text()  # alone, the first sweep lacks seed 2
    out = tmp_path / "together"
    assert main([str(first), str(second), "--out", str(out)]) == 0
    table = (out / "summary.md").read_text()
    assert "3 jobs: 3 ok" in table and "missing" not in table


def test_a_key_one_sweep_overrides_shows_what_the_other_sweep_ran_with(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A baseline swept without ``model=`` or ``model.hidden_size=`` beside a new sweep that sets
    them: the baseline's rows say what it ran with (its recorded choice and config), not ``=``."""
    baseline, new = tmp_path / "baseline", tmp_path / "new"
    job = fake_job(baseline, 0, 4)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (job / ".hydra" / "config.yaml").write_text("model:\n  hidden_size: 16\n")
    (job / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      model: lstm\n"
    )
    job = fake_job(new, 0, 8)
    (job / ".hydra" / "overrides.yaml").write_text("- model=gru\n- model.hidden_size=8\n- seed=0\n")
    assert main([str(baseline), str(new), "--out", str(tmp_path / "compare")]) == 0
    table = (tmp_path / "compare" / "summary.md").read_text()
    assert "| model=lstm model.hidden_size=16 |" in table
    assert "| model=gru model.hidden_size=8 |" in table


def plotted(groups: list, swept: list[str]) -> list[dict]:
    """Each panel of the summary figure: its series (label -> (x, y, line style)) and whether
    it marks chance."""
    import matplotlib.pyplot as plt

    from parity_lab.report import summary_figure

    fig = summary_figure("sweep", groups, swept)
    panels = []
    for ax in fig.axes:
        series = {
            c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
            for c in ax.containers
        }
        styles = {c.get_label(): c.lines[0].get_linestyle() for c in ax.containers}
        chance = any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.lines)
        panels.append({"series": series, "styles": styles, "chance": chance})
    plt.close(fig)
    return panels


def test_summary_figure_puts_categories_side_by_side_as_points_and_marks_chance() -> None:
    from parity_lab.report import Group, Job

    def group(config: dict[str, str], acc: float) -> Group:
        metrics = {"val/acc": acc, "test/acc_len_50": acc, "solved": acc == 1.0}
        return Group(config, [Job(0, "ok", dict(config), metrics=metrics)])

    models = [
        group({"model": m, "optimizer.lr": lr}, 1.0)
        for m in ("lstm", "gru", "rnn")
        for lr in ("0.01", "0.001")
    ]
    success, val, longest = plotted(models, ["model", "optimizer.lr"])
    assert not success["chance"] and val["chance"] and longest["chance"]
    for panel in (success, val, longest):
        assert set(panel["styles"].values()) == {"None"}  # model names: never joined
        (xs_a, ys_a), (xs_b, ys_b) = panel["series"].values()  # one series per lr
        assert ys_a == ys_b and all(a < b < a + 1 for a, b in zip(xs_a, xs_b, strict=True))
    sizes = [group({"model.hidden_size": h}, 1.0) for h in ("4", "8", "16")]
    (panel, *_) = plotted(sizes, ["model.hidden_size"])
    ((xs, _),) = panel["series"].values()
    assert xs == [4, 8, 16] and set(panel["styles"].values()) == {"-"}  # numbers: a line


def test_the_certificate_column_names_the_shortest_wrong_string_or_a_random_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Certified counts per group; the shortest wrong string among its seeds, and a group
    certified false on a random string alone says so rather than "none"."""
    sweep = tmp_path / "sweep"
    verdicts = {  # hidden size -> per-seed (certified, wrong string)
        4: [(False, "1 0^24"), (False, "1^3"), (None, None)],
        8: [(False, None), (None, None), (True, None)],
    }
    num = 0
    for hidden, runs in verdicts.items():
        for seed, (certified, wrong) in enumerate(runs):
            job = fake_job(sweep, num, hidden)
            (job / ".hydra" / "overrides.yaml").write_text(
                f"- model.hidden_size={hidden}\n- seed={seed}\n"
            )
            metrics = json.loads((job / "metrics.json").read_text())
            metrics.update(certified=certified, certified_counterexample=wrong)
            (job / "metrics.json").write_text(json.dumps(metrics))
            num += 1
    assert main([str(sweep)]) == 0
    table = (sweep / "summary.md").read_text().splitlines()
    rows = [
        next(line for line in table if line.startswith(f"| model.hidden_size={h} |"))
        for h in (4, 8)
    ]
    assert "| 0/2/1 | `1^3` |" in rows[0]
    assert "| 1/1/1 | a random string |" in rows[1]
