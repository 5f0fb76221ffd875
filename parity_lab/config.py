"""Start-up checks of a composed config: a bad value fails before any work, naming key and rule."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from parity_lab import (
    COMPILE_MODES,
    DENSITIES,
    EIGENVALUES,
    ENCODING_SIZES,
    HEADS,
    LR_SHAPES,
    POSITIONAL,
    READOUTS,
    SCHEDULES,
)
from parity_lab.run_files import (
    CorruptResultError,
    RunFileError,
    read_metrics,
    read_run_config,
)

SUPERVISIONS = ("final", "every_step")
# Cores whose outputs lie in [-1, 1], where the saturation penalty mean(1 - h^2) means something,
# and the linear RNN, whose penalty saturates its transitions instead (LinearRNN.saturation).
SATURATING_CORES = tuple(
    f"{module}.{name}"
    for module, names in (
        ("torch.nn", ("RNN", "GRU", "LSTM")),
        ("parity_lab.models", ("ManualRNN", "ManualGRU", "ManualLSTM", "LinearRNN")),
    )
    for name in names
)
TOKEN_LOSS = "torch.nn.CrossEntropyLoss"  # loss=token_ce, the tokens head's loss


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def resumable_run(run_dir: str) -> Path:
    """The run directory ``resume=`` names, if it holds an unfinished run; else ``ConfigError``.

    A ``metrics.json`` that cannot be read as one (a write cut short) leaves the run unfinished.
    """
    path = Path(run_dir)
    if not (path / ".hydra" / "config.yaml").is_file():
        raise ConfigError(
            f"resume={run_dir!r} is invalid: expected a run directory holding .hydra/config.yaml"
        )
    try:
        read_metrics(path / "metrics.json")
    except (CorruptResultError, FileNotFoundError):
        return path
    raise ConfigError(
        f"resume={run_dir!r} is invalid: that run already finished (it has metrics.json)"
    )


def resume_config(run_dir: str) -> DictConfig:
    """The config an unfinished run was started with, set to resume it in its own directory.

    It is resolved once and checked: it builds nothing but the project's own classes (any other
    ``_target_`` is refused), and holds those plain values only, no interpolation.
    """
    config_path = resumable_run(run_dir) / ".hydra" / "config.yaml"
    try:
        cfg = read_run_config(config_path)
    except RunFileError as error:
        raise ConfigError(str(error)) from None
    cfg.resume = literal(run_dir)
    return cfg


def literal(text: str) -> str:
    """``text`` as an OmegaConf string value that reads back as ``text``: ``${`` escaped, so a
    directory name holding one is not taken for an interpolation."""
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _int(
    cfg: DictConfig, key: str, minimum: int, optional: bool = False, maximum: int | None = None
) -> None:
    value = _value(cfg, key)
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = (
            f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
        )
        allowed += " or null" if optional else ""
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _choice(cfg: DictConfig, key: str, allowed: Iterable[str]) -> None:
    value = _value(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid: allowed values are {list(allowed)}")


def validate(cfg: DictConfig, for_training: bool = True) -> None:
    """Raise ``ConfigError`` for the first config value that cannot work. ``for_training=False``
    (a finished run read back by predict or analyze) skips the memory check and ``resume``."""
    _int(cfg, "seed", 0, maximum=2**32 - 1)  # numpy's seed range, which Lightning seeds too
    _int(cfg, "model.hidden_size", 1)
    _int(cfg, "model.num_layers", 1)
    _choice(cfg, "model.readout", READOUTS)
    _choice(cfg, "model.compile", COMPILE_MODES)
    if "head" in cfg.model:
        _choice(cfg, "model.head", HEADS)
    head = OmegaConf.select(cfg, "model.head", default="logit")
    token_loss = OmegaConf.select(cfg, "loss._target_") == TOKEN_LOSS
    if (head == "tokens") != token_loss:
        raise ConfigError(
            f"model.head={head!r} with loss={OmegaConf.select(cfg, 'loss._target_')!r} is "
            "invalid: the tokens head trains with loss=token_ce, and token_ce needs "
            "model.head=tokens"
        )
    if "eigenvalues" in cfg.model:  # linear_rnn and the deltanets only
        _choice(cfg, "model.eigenvalues", EIGENVALUES)
    for key in ("d_state", "expand", "dt_rank", "d_conv"):  # mamba
        if key in cfg.model:
            _int(cfg, f"model.{key}", 1)
    if "dt_min" in cfg.model and not 0 < cfg.model.dt_min <= cfg.model.dt_max:
        raise ConfigError(
            f"model.dt_min={cfg.model.dt_min}, model.dt_max={cfg.model.dt_max} are invalid: "
            "expected 0 < dt_min <= dt_max"
        )
    if "max_len" in cfg.model:  # the Transformer: it cannot train on longer strings
        _int(cfg, "model.max_len", cfg.data.max_len)
    if "positional" in cfg.model:
        _choice(cfg, "model.positional", POSITIONAL)
    if "num_heads" in cfg.model:
        _int(cfg, "model.num_heads", 1)
        if cfg.model.hidden_size % cfg.model.num_heads:
            raise ConfigError(
                f"model.num_heads={cfg.model.num_heads} is invalid: expected a divisor of "
                f"model.hidden_size={cfg.model.hidden_size}"
            )
    if "conv_size" in cfg.model:  # the published blocks' short convolution (the sLSTM's optional)
        optional_conv = cfg.model.rnn._target_.endswith(".SLSTMPublished")
        _int(cfg, "model.conv_size", 0 if optional_conv else 1)
    saturation = OmegaConf.select(cfg, "saturation.weight", default=0.0)
    if (
        isinstance(saturation, bool)
        or not isinstance(saturation, int | float)
        or not (0 <= saturation < math.inf)
    ):
        raise ConfigError(
            f"saturation.weight={saturation!r} is invalid: expected a finite number >= 0"
        )
    if "saturation" in cfg:
        _int(cfg, "saturation.start_step", 0)
    if saturation > 0:
        core = OmegaConf.select(cfg, "model.rnn._target_")
        relu = OmegaConf.select(cfg, "model.rnn.nonlinearity") == "relu"
        if core not in SATURATING_CORES or relu:
            raise ConfigError(
                f"saturation.weight={saturation} with model.rnn._target_={core!r} is invalid: "
                "the penalty needs a core whose outputs lie in [-1, 1] (rnn with tanh, gru, lstm "
                "and their manual twins) or a linear_rnn, whose transitions it saturates"
            )
    _int(cfg, "data.min_len", 1)
    _int(cfg, "data.max_len", 1)
    if cfg.data.min_len > cfg.data.max_len:
        raise ConfigError(
            f"data.min_len={cfg.data.min_len} > data.max_len={cfg.data.max_len}: "
            "lengths are drawn from min_len..max_len, so min_len must be <= max_len"
        )
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.num_train", 1, optional=True)
    _choice(cfg, "data.supervision", SUPERVISIONS)
    _choice(cfg, "data.encoding", ENCODING_SIZES)
    if "density" in cfg.data:
        _choice(cfg, "data.density", DENSITIES)
    _choice(cfg, "data.curriculum.schedule", SCHEDULES)
    _int(cfg, "data.curriculum.start_len", 1)
    _int(cfg, "data.curriculum.steps", 1)
    start_len = cfg.data.curriculum.start_len
    if cfg.data.curriculum.schedule != "none" and start_len > cfg.data.max_len:
        raise ConfigError(
            f"data.curriculum.start_len={start_len} > data.max_len={cfg.data.max_len}: "
            "a curriculum starts at or below the longest training length, so start_len must be "
            "<= max_len"
        )
    if cfg.data.curriculum.schedule != "none" and cfg.data.num_train is not None:
        raise ConfigError(
            f"data.curriculum.schedule={cfg.data.curriculum.schedule!r} needs fresh strings: "
            f"set data.num_train=null (it is {cfg.data.num_train})"
        )
    momentum = OmegaConf.select(cfg, "optimizer.momentum")  # SGD's; Adam has none
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, int | float) or not momentum >= 0
    ):
        raise ConfigError(f"optimizer.momentum={momentum!r} is invalid: expected a number >= 0")
    lr = _value(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: expected a finite number > 0")
    if cfg.get("scheduler") is not None:
        _int(cfg, "scheduler.warmup_steps", 0)
        _int(cfg, "scheduler.decay_steps", 1)
        if cfg.scheduler.decay_steps < cfg.scheduler.warmup_steps:
            raise ConfigError(
                f"scheduler.decay_steps={cfg.scheduler.decay_steps} < scheduler.warmup_steps="
                f"{cfg.scheduler.warmup_steps}: decay_steps must be >= warmup_steps (the decay "
                "starts when the warm-up ends)"
            )
        _choice(cfg, "scheduler.shape", LR_SHAPES)
        final = _value(cfg, "scheduler.final_factor")
        if isinstance(final, bool) or not isinstance(final, int | float) or not 0 <= final <= 1:
            raise ConfigError(
                f"scheduler.final_factor={final!r} is invalid: expected a number in [0, 1]"
            )
    clip = _value(cfg, "trainer.gradient_clip_val")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf
    ):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} is invalid: expected a finite number > 0 or null"
        )
    max_steps = _value(cfg, "trainer.max_steps")  # -1: no step limit (max_epochs ends the run)
    if (
        isinstance(max_steps, bool)
        or not isinstance(max_steps, int)
        or max_steps == 0
        or max_steps < -1
    ):
        raise ConfigError(
            f"trainer.max_steps={max_steps!r} is invalid: expected an integer >= 1, or -1 for no "
            "step limit"
        )
    _int(cfg, "trainer.max_epochs", -1, optional=True)
    _int(cfg, "trainer.log_every_n_steps", 1)
    _int(cfg, "trainer.val_check_interval", 1)  # in training steps
    lengths = _value(cfg, "eval.lengths")
    if (
        not OmegaConf.is_list(lengths)
        or not lengths
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths)
    ):
        raise ConfigError(
            f"eval.lengths={lengths} is invalid: expected a non-empty list of integers >= 1 "
            "(a run counts as solved only when it is exact at these held-out lengths)"
        )
    _int(cfg, "eval.num_val", 1)
    _int(cfg, "eval.num_test", 1)
    if OmegaConf.select(cfg, "eval.pool") is not None:  # absent from runs written before it
        _int(cfg, "eval.pool.num", 1)
        _int(cfg, "eval.pool.min_len", 1)
        _int(cfg, "eval.pool.max_len", cfg.eval.pool.min_len)
    if "certify" in cfg.eval:
        # absent from runs written before the certificate existed: those read as not certified
        flag = _value(cfg, "eval.certify")
        if not isinstance(flag, bool):
            raise ConfigError(f"eval.certify={flag!r} is invalid: expected true or false")
    flags = ["eval.stop_when_solved", "eval.curve.only_solved"]
    flags += ["model.input_bias"] * ("input_bias" in cfg.model)  # linear_rnn
    flags += ["eval.stop_needs_worst_case"] * ("stop_needs_worst_case" in cfg.eval)
    for key in flags:
        flag = _value(cfg, key)
        if not isinstance(flag, bool):
            raise ConfigError(f"{key}={flag!r} is invalid: expected true or false")
    stop = cfg.eval.stop_when_solved
    endless = cfg.data.num_train is None or cfg.trainer.max_epochs == -1
    if cfg.trainer.max_steps == -1 and not stop and endless:
        raise ConfigError(
            "trainer.max_steps=-1 is invalid here: with eval.stop_when_solved=false and "
            + ("fresh strings (data.num_train=null)" if cfg.data.num_train is None else "")
            + ("" if cfg.data.num_train is None else "trainer.max_epochs=-1")
            + " the run never ends; expected a step limit (trainer.max_steps >= 1)"
        )
    _int(cfg, "eval.curve.max_len", 1, optional=True)
    for key in ("dense_until", "per_decade", "num_strings"):
        _int(cfg, f"eval.curve.{key}", 1)
    _int(cfg, "eval.curve.chunk_len", 1, optional=True)
    _int(cfg, "num_threads", 1)
    if not for_training:
        return
    check_memory(cfg)
    if cfg.resume is not None:
        resumable_run(str(cfg.resume))


# Gates of the dense recurrent cores (torch's and their Manual* twins): each gate has an input and a
# recurrent weight matrix. Any other core is estimated by a lower bound (its head's weights only).
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
# Cores whose state is a hidden_size x hidden_size matrix per layer and row: every step of
# training keeps about MATRIX_COPIES such matrices for the backward (the memory, its decayed
# copy, the rank-one write), and evaluation holds as many at a time.
MATRIX_MEMORY = ("MLSTM", "DeltaNet")
MATRIX_COPIES = 3


def physical_memory() -> int:
    """Bytes of memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: DictConfig) -> None:
    """``ConfigError`` when training the model or holding the evaluation sets needs more memory
    than this machine has: an estimate from the sizes alone, before any tensor exists."""
    hidden, layers = cfg.model.hidden_size, cfg.model.num_layers
    core = str(OmegaConf.select(cfg, "model.rnn._target_", default="") or "")
    dense_gates = GATES.get(core.rsplit(".", 1)[-1].removeprefix("Manual"))
    gates = dense_gates or 1
    inputs = ENCODING_SIZES[cfg.data.encoding]
    weights = gates * hidden * (inputs + hidden + 2) * layers if dense_gates else hidden
    # per row and step: the floats of the state that backward keeps (vector: ~gates x hidden)
    state = gates * hidden
    matrix = core.rsplit(".", 1)[-1] in MATRIX_MEMORY
    if matrix:
        weights = hidden * (4 * inputs + hidden + 6) * layers  # in and out projections
        state = MATRIX_COPIES * hidden * hidden
    # fp32 weights, gradients and two Adam moments; one batch's activations kept for backward
    training = 16 * weights + 4 * cfg.data.batch_size * cfg.data.max_len * state * layers
    # every evaluation set at once (bits, targets, inputs), and one batch's outputs of the core
    lengths = list(cfg.eval.lengths)
    evaluation = (
        25 * cfg.eval.num_test * sum(lengths)
        + 4 * min(cfg.eval.num_test, 1024) * max(lengths, default=0) * hidden * layers
    )
    if matrix:  # one batch's matrices, a step at a time
        evaluation += 4 * min(cfg.eval.num_test, 1024) * state * layers
    available = physical_memory()
    for key, value, needed, what in (
        ("model.hidden_size", hidden, training, "training (weights, gradients, Adam state and "
         "one batch's activations" + (", a hidden_size^2 memory per row and step)" if matrix
         else ")")),
        ("eval.lengths", lengths, evaluation, f"evaluating {cfg.eval.num_test} strings of each "
         "length (eval.curve.max_len measures long strings in chunks)"),
    ):  # fmt: skip
        if needed > available:
            raise ConfigError(
                f"{key}={value} is invalid: {what} needs about {needed / 2**30:,.0f} GiB, more "
                f"than the {available / 2**30:,.0f} GiB of memory here"
            )


class ValidateBeforeRun(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a single run's config is checked
    before Hydra creates the run directory and before torch loads, so a bad value costs a fraction
    of a second and leaves nothing behind. Sweep jobs are checked in the job (``error.txt``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except ConfigError as error:
            raise SystemExit(f"config error: {error}") from None
