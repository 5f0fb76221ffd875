"""End to end: smoke runs of every model and loss, a real learning run, and a multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from parity_lab.certify import predicts_wrong
from parity_lab.compact import expand
from parity_lab.data import ParityBatch, eval_set
from parity_lab.models import ParityRNN
from parity_lab.train import train
from tests.conftest import CONF, FAST, ROOT, event_tags, scalar_series

MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))


class TrainedModel(L.Callback):
    """Keeps the model a run ends with, to score it independently of the run's own metrics."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.model = pl_module.model


@torch.no_grad()
def accuracy_on(model: ParityRNN, batch: ParityBatch) -> float:
    """Share of the batch's strings whose parity, counted from the input bits themselves, is the
    sign of the model's logit after the string's last bit (one string at a time: no padding)."""
    right = []
    for x, length in zip(batch.x, batch.lengths.tolist(), strict=True):
        bits = x[:length, 0]  # both encodings hold the bit first
        logits, _ = model.run(x[None, :length])
        right.append(int(logits[0, -1] > 0) == int(bits.sum()) % 2)
    return sum(right) / len(right)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("loss", ["builtin", "manual"])
def test_fast_dev_run(model: str, loss: str, make_config, tmp_path: Path) -> None:
    """One step of every model and loss; the reported accuracies are those of the model the run
    ends with, recomputed here string by string on the run's own evaluation sets."""
    cfg = make_config(f"model={model}", f"loss={loss}", "+trainer.fast_dev_run=true")
    trained = TrainedModel()
    metrics = train(cfg, run_dir=tmp_path, extra_callbacks=[trained])
    assert metrics["global_step"] == 1
    trained.model.eval()
    for name, min_len, max_len, num in (
        ("val", cfg.data.min_len, cfg.data.max_len, cfg.eval.num_val),
        ("len_30", 30, 30, cfg.eval.num_test),
    ):
        strings = eval_set(cfg.seed, name, num, min_len, max_len, cfg.data.encoding)
        key = "val/acc" if name == "val" else f"test/acc_{name}"
        assert metrics[key] == pytest.approx(accuracy_on(trained.model, strings), abs=1e-6), key
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_every_step_pair_encoding_fixed_set_runs(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        "data=fixed",
        "data.max_len=6",
        "data.num_train=40",
        "data.batch_size=16",
        "data.supervision=every_step",
        "data.encoding=pair",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "eval.stop_when_solved=false",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["global_step"] == 6  # 2 epochs of ceil(40 / 16) batches


def progress_bar_text(
    make_config, tmp_path: Path, capsys: pytest.CaptureFixture, *overrides: str
) -> str:
    """Everything the progress bar drew in a run with ``overrides``, one redraw per line."""
    train(make_config("trainer.enable_progress_bar=true", *overrides), run_dir=tmp_path)
    return capsys.readouterr().out.replace("\r", "\n")


def test_progress_bar_counts_steps_without_a_total_when_the_run_stops_once_solved(
    make_config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = progress_bar_text(
        make_config, tmp_path, capsys,
        "trainer.max_steps=30", "trainer.val_check_interval=10", "model.hidden_size=2",
    )  # fmt: skip
    assert "Training: 30 steps [" in out and "val/acc=" in out and "train/loss=" in out
    assert "/30" not in out and "<" not in out.split("Training:")[-1]  # no total, no ETA
    assert "LSTM hidden=2 (43 parameters)" in out  # 4 gates x 2 x (1 + 2) + 2 x 8 biases + 3


def test_progress_bar_total_is_the_epoch_on_a_fixed_training_set(
    make_config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = progress_bar_text(
        make_config, tmp_path, capsys,
        "data.num_train=40", "data.batch_size=16", "trainer.max_steps=-1", "trainer.max_epochs=2",
    )  # fmt: skip
    assert "Epoch 1: 100%" in out and "3/3 [" in out  # ceil(40 / 16) batches per epoch
    assert "/?" not in out


def test_small_lstm_learns_parity_of_short_strings(make_config, tmp_path: Path) -> None:
    """A real learning run: 100% on held-out random strings of lengths 1..8 and 16; ``solved``
    also asks for every worst-case string, which such a barely trained network misses."""
    cfg = make_config(
        "data.max_len=8",
        "model.hidden_size=8",
        "eval.lengths=[8,16]",
        "eval.num_val=256",
        "eval.num_test=256",
        "trainer.max_steps=600",
        "seed=1",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["val/acc"] == 1.0 and metrics["test/acc_len_16"] == 1.0
    assert metrics["global_step"] < 600  # stopped once the validation sets were all right
    wrong = metrics["worst_case_wrong"]
    assert metrics["solved"] is (wrong is None)
    assert (metrics["solved_step"] is None) is (wrong is not None)
    if wrong is not None:  # a real mistake, of at most 16 bits
        model = instantiate(cfg.model)
        weights = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        model.load_state_dict({k[6:]: v for k, v in weights["state_dict"].items()})
        bits = expand(wrong)
        assert len(bits) <= 16 and predicts_wrong(model, bits, "bit")
        assert metrics["certified"] is False and metrics["certified_counterexample"] == wrong
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert {"train/loss", "train/acc", "val/acc", "val/acc_len_16"} <= event_tags(tmp_path)
    # TensorBoard's validation steps count steps as the stop does: all right there, not before.
    val_acc = dict(scalar_series(tmp_path, "val/acc"))
    assert val_acc[metrics["global_step"]] == 1.0
    assert all(acc < 1.0 for step, acc in val_acc.items() if step < metrics["global_step"])


def test_multirun_leaves_one_run_dir_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "parity_lab",
        "-m",
        "model=rnn,gru",
        "trainer.max_steps=20",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0_model=rnn", "1_model=gru"]  # only what differs
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["global_step"] == 20
        assert {"train/loss", "val/acc"} <= event_tags(job)
        assert (job / ".hydra" / "config.yaml").is_file()
