"""``train(cfg) -> metrics``: one run, from a composed config to ``metrics.json``."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from parity_lab.callbacks import LastCheckpoint, SolvedTracker, TrainingProgressBar
from parity_lab.certify import exactness_metrics
from parity_lab.config import validate
from parity_lab.curve import length_curve
from parity_lab.evaluate import readable_lengths, skip_note
from parity_lab.module import ParityModule, metric_name
from parity_lab.run_files import (
    RunFileError,
    check_checkpoint_archive,
    first_line,
    refuse_links,
    run_lock,
    write_atomic,
)
from parity_lab.tensorboard_log import WHOLE_RUN, RunLogger, log_run_record
from parity_lab.worst_case import worst_case


def result_scalars(metrics: dict[str, Any], validated_last_step: bool) -> dict[str, float]:
    """The run's results as TensorBoard scalars at its last step, where no series holds them yet.

    Values that exist once per run go to their own group (``whole_run/``, after ``train/`` and
    ``val/``), so that those two hold only series. The final evaluation re-scores the validation
    sets (``val/acc``, ``test/acc_len_<L>``), so it joins the ``val/`` series only if training
    ended between two validations.
    """
    scalars = {
        f"{WHOLE_RUN}/solved": float(metrics["solved"]),
        f"{WHOLE_RUN}/train_seconds": metrics["train_seconds"],
    }
    if not validated_last_step:
        scalars["val/acc"] = metrics["val/acc"]
        for key, value in metrics.items():
            if key.startswith("test/acc_len_") or key == "test/acc_pool":
                scalars[key.replace("test/", "val/", 1)] = value
    if metrics["solved_step"] is not None:
        scalars[f"{WHOLE_RUN}/solved_step"] = metrics["solved_step"]
    for key in ("test/exact_until", "test/acc_unseen"):  # measured with eval.curve
        if key in metrics:
            scalars[key.replace("test/", f"{WHOLE_RUN}/", 1)] = metrics[key]
    return scalars


def scaled_accuracies(metrics: dict[str, Any]) -> dict[str, float]:
    """``test/scaled_acc_len_<L>`` = (acc - 0.5) / 0.5 for every ``test/acc_len_<L>`` (0: chance,
    1: perfect, as the xLSTM paper reports parity), ``test/scaled_acc_mean``, their mean, and
    ``test/scaled_acc_pool`` for the ``eval.pool`` set (the published tables' figure)."""
    scaled = {
        name.replace("test/acc_len_", "test/scaled_acc_len_"): (value - 0.5) / 0.5
        for name, value in metrics.items()
        if name.startswith("test/acc_len_")
    }
    if scaled:
        scaled["test/scaled_acc_mean"] = sum(scaled.values()) / len(scaled)
    if "test/acc_pool" in metrics:
        scaled["test/scaled_acc_pool"] = (metrics["test/acc_pool"] - 0.5) / 0.5
    return scaled


def summary(cfg: DictConfig, metrics: dict[str, Any], run_dir: Path, num_parameters: int) -> str:
    accuracies = "  ".join(
        f"{'val' if name == 'val/acc' else 'len ' + name.rsplit('_', 1)[1]}: {value:.3f}"
        for name, value in metrics.items()
        if name == "val/acc" or name.startswith("test/acc_len_")
    )
    if "test/acc_pool" in metrics:
        pool = cfg.eval.pool
        accuracies += (
            f"\n  pool      {pool.num} strings of {pool.min_len}..{pool.max_len} bits: "
            f"{metrics['test/acc_pool']:.4f}, scaled {metrics['test/scaled_acc_pool']:.4f}"
        )
    if "test/scaled_acc_mean" in metrics:
        accuracies += "\n  scaled    " + "  ".join(
            f"len {name.rsplit('_', 1)[1]}: {value:.3f}"
            for name, value in metrics.items()
            if name.startswith("test/scaled_acc_len_")
        )
        accuracies += f"  mean: {metrics['test/scaled_acc_mean']:.3f}   ((acc - 0.5) / 0.5)"
    if "test/exact_until" in metrics:
        accuracies += (
            f"\n  lengths   right on every string tried up to {metrics['test/exact_until']} bits "
            f"(random strings alone: {metrics['test/exact_until_random']}), mean accuracy beyond "
            f"training {metrics.get('test/acc_unseen', float('nan')):.3f} (length_curve.png)"
        )
    if metrics.get("worst_case_wrong") is not None:
        accuracies += f"\n  worst case  wrong on {metrics['worst_case_wrong']}"
    if "certified" in metrics:
        verdict = {True: "certified: right on every string of every length", None: "not certified"}
        text = verdict.get(metrics["certified"], "certified: false")
        if metrics["certified"] is False and metrics["certified_counterexample"]:
            text += f", wrong on {metrics['certified_counterexample']}"
        accuracies += f"\n  proof     {text} ({metrics['certify_note']})"
    solved = (
        f"solved at step {metrics['solved_step']}"
        if metrics["solved_step"] is not None
        else "not solved"
    )
    return (
        f"\n{cfg.model.rnn._target_.rsplit('.', 1)[-1]} hidden={cfg.model.hidden_size} "
        f"({num_parameters:,} parameters), lengths "
        f"{cfg.data.min_len}..{cfg.data.max_len}, {cfg.data.supervision} labels: {solved}; "
        f"{metrics['global_step']} steps in {metrics['train_seconds']:.1f} s\n"
        f"  accuracy  {accuracies}\n"
        f"  run dir   {run_dir}   (tensorboard --logdir {run_dir})\n"
        f"  checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}\n"
    )


class Interrupted(RuntimeError):
    """The run received SIGTERM (a scheduler's preemption, ``kill``); its checkpoint is kept."""

    def __init__(self, run_dir: Path, step: int, after_training: bool = False) -> None:
        if after_training:
            message = (
                f"stopped by SIGTERM after training ended at step {step}, before metrics.json was "
                "written (final evaluation or length curve); the checkpoint of that step is kept, "
                "and resuming runs only the evaluation again"
            )
        else:
            message = f"stopped by SIGTERM at step {step}; the checkpoint of that step is kept"
        super().__init__(message)
        self.run_dir = run_dir


def sigterm_interrupts(run_dir: Path, step: int) -> Callable[[], None]:
    """From now on SIGTERM raises ``Interrupted`` (after training); returns the function that
    puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # handlers belong to the main thread

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(run_dir, step, after_training=True)

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def check_checkpoint(path: Path, module: ParityModule) -> None:
    """``RunFileError`` naming a checkpoint that is cut short, larger in its archive than the
    model's checkpoint can be (checked before any tensor is read), holds more than weights-only
    data, another model's weights, or weights that are not finite (else Lightning fails mid-start
    with a long traceback, or trains a broken model)."""
    from parity_lab.predict import non_finite_weight, tensor_bytes

    check_checkpoint_archive(path, tensor_bytes(module))
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state_dict = state_dict["state_dict"]
    except Exception as error:
        raise RunFileError(f"{path}: not a readable checkpoint ({first_line(error)})") from None
    try:
        module.load_state_dict(state_dict)
    except Exception as error:
        raise RunFileError(
            f"{path}: its weights do not fit the model of the run's config ({first_line(error)})"
        ) from None
    if (name := non_finite_weight(state_dict)) is not None:
        raise RunFileError(f"{path}: weight {name} is not finite (NaN or infinity): refusing it")


def train(
    cfg: DictConfig, run_dir: Path | None = None, extra_callbacks: Sequence[L.Callback] = ()
) -> dict[str, Any]:
    """Train one model as ``cfg`` says, write ``metrics.json`` in ``run_dir`` and return it.

    With ``cfg.resume`` set, the run continues in that directory from its last checkpoint.
    ``extra_callbacks`` join the run's own (benchmarks use them to time its phases).
    """
    validate(cfg)
    if cfg.resume is not None:
        run_dir = Path(cfg.resume)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):  # one writer per run directory
        refuse_links(run_dir)  # nothing is written through a link
        return train_locked(cfg, run_dir, extra_callbacks)


def train_locked(
    cfg: DictConfig, run_dir: Path, extra_callbacks: Sequence[L.Callback]
) -> dict[str, Any]:
    """``train``'s work, in ``run_dir``, once it holds the run's lock."""
    torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, verbose=False)

    model = instantiate(cfg.model)
    # A Transformer reads at most model.max_len bits: longer eval lengths are skipped, recorded,
    # and keep the run from counting as solved.
    eval_lengths, skipped = readable_lengths(model, list(cfg.eval.lengths))
    if skipped:
        print(skip_note(model, skipped, "eval.lengths") + "; the run cannot count as solved")
    datamodule = instantiate(
        cfg.data,
        seed=cfg.seed,
        eval_lengths=eval_lengths,
        num_val=cfg.eval.num_val,
        num_test=cfg.eval.num_test,
        pool=cfg.eval.get("pool"),
    )
    module = ParityModule(
        model=model,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        supervision=cfg.data.supervision,
        eval_names=datamodule.eval_names,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") is not None else None,
        saturation=cfg.get("saturation"),
    )
    logger = RunLogger(run_dir, name="", version="", default_hp_metric=False)

    def right_on_worst_case() -> bool:
        was_training = model.training
        model.eval()
        try:
            return worst_case(model, max(eval_lengths, default=1), cfg.data.encoding) is None
        finally:
            model.train(was_training)

    solved = SolvedTracker(
        cfg.eval.stop_when_solved and not skipped,
        right_on_worst_case if cfg.eval.get("stop_needs_worst_case", False) else None,
    )
    checkpoint = LastCheckpoint(run_dir / "checkpoints" / "last.ckpt")
    callbacks: list[L.Callback] = [solved, checkpoint]
    if cfg.trainer.get("enable_progress_bar", True):
        bar = TrainingProgressBar(
            refresh_rate=25,  # redrawing costs time per step
            batches_per_epoch=datamodule.batches_per_epoch,
            open_ended=cfg.eval.stop_when_solved,
        )
        callbacks.append(bar)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=[*callbacks, *extra_callbacks],
        default_root_dir=run_dir,
    )

    start = time.perf_counter()
    resume_from = checkpoint.path if cfg.resume is not None and checkpoint.path.is_file() else None
    if resume_from is not None:
        check_checkpoint(resume_from, module)
    if cfg.resume is not None:
        print(f"resuming {run_dir} from {resume_from or 'step 0: it has no checkpoint yet'}")
    try:  # Lightning's own SIGTERM handling stops the loop at a step's end, as SIGTERMException
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        train_seconds = time.perf_counter() - start
        trainer.test(module, datamodule=datamodule, verbose=False)
    except SIGTERMException:
        raise Interrupted(run_dir, trainer.global_step) from None
    # The final evaluation ran under Lightning's SIGTERM handler, which it has since removed (the
    # default would end the process without a word): the curve and the writes run under ours.
    restore_sigterm = sigterm_interrupts(run_dir, trainer.global_step)
    metrics: dict[str, Any] = {  # the module logs the test pass for metrics.json only
        name: trainer.callback_metrics[name].item()
        for name in (metric_name("test", set_name) for set_name in datamodule.eval_names)
    }
    metrics["solved"] = not skipped and all(v == 1.0 for k, v in metrics.items() if "acc" in k)
    metrics.update(scaled_accuracies(metrics))
    metrics["solved_step"] = None if skipped else solved.solved_step
    if skipped:
        metrics["test/skipped_lengths"] = skipped
    metrics["global_step"] = trainer.global_step
    metrics["train_seconds"] = round(train_seconds, 3)
    step = metrics["global_step"]
    if cfg.eval.curve.max_len is not None and (metrics["solved"] or not cfg.eval.curve.only_solved):
        metrics.update(length_curve(module.model, cfg, run_dir, logger.experiment, step))
    metrics.update(exactness_metrics(module.model, cfg, metrics))

    writer = logger.experiment
    for tag, value in result_scalars(metrics, solved.validated_step == step).items():
        writer.add_scalar(tag, value, step)
    num_parameters = sum(p.numel() for p in module.model.parameters())
    printed = summary(cfg, metrics, run_dir, num_parameters)
    log_run_record(writer, cfg, run_dir, printed, step)
    logger.close()
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    restore_sigterm()
    print(printed)
    return metrics
