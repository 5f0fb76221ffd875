"""Start-up checks of a composed config: a bad value fails before any work, naming key and rule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from parity_lab import ENCODING_SIZES, SCHEDULES
from parity_lab.models.classifier import READOUTS

SUPERVISIONS = ("final", "every_step")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


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
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr!r} is invalid: expected a number > 0")
    lengths = _value(cfg, "eval.lengths")
    if not OmegaConf.is_list(lengths) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths
    ):
        raise ConfigError(f"eval.lengths={lengths} is invalid: expected a list of integers >= 1")
    _int(cfg, "eval.num_val", 1)
    _int(cfg, "eval.num_test", 1)
    _int(cfg, "eval.curve.max_len", 1, optional=True)
    for key in ("dense_until", "per_decade", "num_strings", "chunk_len"):
        _int(cfg, f"eval.curve.{key}", 1)
    _int(cfg, "num_threads", 1)
