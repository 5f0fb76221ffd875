"""Start-up checks of a composed config: a bad value fails before any work, naming key and rule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from parity_lab import COMPILE_MODES, EIGENVALUES, ENCODING_SIZES, READOUTS, SCHEDULES

SUPERVISIONS = ("final", "every_step")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def resumable_run(run_dir: str) -> Path:
    """The run directory ``resume=`` names, if it holds an unfinished run; else ``ConfigError``."""
    path = Path(run_dir)
    if not (path / ".hydra" / "config.yaml").is_file():
        raise ConfigError(
            f"resume={run_dir!r} is invalid: expected a run directory holding .hydra/config.yaml"
        )
    if (path / "metrics.json").is_file():
        raise ConfigError(
            f"resume={run_dir!r} is invalid: that run already finished (it has metrics.json)"
        )
    return path


def resume_config(run_dir: str) -> DictConfig:
    """The config an unfinished run was started with, set to resume it in its own directory."""
    cfg = OmegaConf.load(resumable_run(run_dir) / ".hydra" / "config.yaml")
    cfg.resume = run_dir
    return cfg


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _int(cfg: DictConfig, key: str, minimum: int, optional: bool = False) -> None:
    value = _value(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _choice(cfg: DictConfig, key: str, allowed: Iterable[str]) -> None:
    value = _value(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid: allowed values are {list(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first config value that cannot work."""
    _int(cfg, "seed", 0)
    _int(cfg, "model.hidden_size", 1)
    _int(cfg, "model.num_layers", 1)
    _choice(cfg, "model.readout", READOUTS)
    _choice(cfg, "model.compile", COMPILE_MODES)
    if "eigenvalues" in cfg.model:  # linear_rnn and deltanet only
        _choice(cfg, "model.eigenvalues", EIGENVALUES)
    if "max_len" in cfg.model:  # the Transformer: it cannot train on longer strings
        _int(cfg, "model.max_len", cfg.data.max_len)
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
    _choice(cfg, "data.curriculum.schedule", SCHEDULES)
    _int(cfg, "data.curriculum.start_len", 1)
    _int(cfg, "data.curriculum.steps", 1)
    if cfg.data.curriculum.schedule != "none" and cfg.data.num_train is not None:
        raise ConfigError(
            f"data.curriculum.schedule={cfg.data.curriculum.schedule!r} needs fresh strings: "
            f"set data.num_train=null (it is {cfg.data.num_train})"
        )
    lr = _value(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: expected a finite number > 0")
    clip = _value(cfg, "trainer.gradient_clip_val")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, int | float) or not 0 < clip < math.inf
    ):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} is invalid: expected a finite number > 0 or null"
        )
    _int(cfg, "trainer.max_steps", -1)  # -1: no step limit (then max_epochs ends the run)
    _int(cfg, "trainer.max_epochs", -1, optional=True)
    _int(cfg, "trainer.val_check_interval", 1)  # in training steps
    lengths = _value(cfg, "eval.lengths")
    if not OmegaConf.is_list(lengths) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths
    ):
        raise ConfigError(f"eval.lengths={lengths} is invalid: expected a list of integers >= 1")
    _int(cfg, "eval.num_val", 1)
    _int(cfg, "eval.num_test", 1)
    stop = _value(cfg, "eval.stop_when_solved")
    if not isinstance(stop, bool):
        raise ConfigError(f"eval.stop_when_solved={stop!r} is invalid: expected true or false")
    _int(cfg, "eval.curve.max_len", 1, optional=True)
    for key in ("dense_until", "per_decade", "num_strings"):
        _int(cfg, f"eval.curve.{key}", 1)
    _int(cfg, "eval.curve.chunk_len", 1, optional=True)
    _int(cfg, "num_threads", 1)
    if cfg.resume is not None:
        resumable_run(str(cfg.resume))


class ValidateBeforeRun(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a single run's config is checked
    before Hydra creates the run directory and before torch loads, so a bad value costs a fraction
    of a second and leaves nothing behind. Sweep jobs are checked in the job (``error.txt``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except ConfigError as error:
            raise SystemExit(f"config error: {error}") from None
