"""Run and sweep-job directory names: short, bounded, confined to their parent directory.

A sweep job is ``<job number>_<the overrides that differ between jobs>``, a single run
``<time>_<name>`` or ``<time>_<its overrides>``, with short keys (``model=gru``,
``hidden_size=16``, ``seed=1``). Hydra computes the directories from ``conf/config.yaml`` through
the resolvers registered in ``parity_lab/__init__.py``. Which overrides are the same in every job
is known only before the sweep starts, so ``python -m parity_lab`` adds them to Hydra's own
``hydra.job.config.override_dirname.exclude_keys`` (``constant_overrides``); each job, in whatever
process a launcher starts it, leaves those keys out of its name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

MAX_NAME = 48  # characters of a job dir name (or of a single run's suffix)
HASH_CHARS = 6  # hex digits of the hash that ends a cut name
SEED_KEY = "seed"  # named last: runs that differ only by seed sort together
UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")  # no separator, quote, space, bracket or shell char
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
# Overrides through which a run may become a multirun without -m (stored sweeps set hydra.mode).
SWEEP_KEYS = ("sweep", "hydra.mode", "hydra.sweeper", "hydra/sweeper")


def _parse(overrides: Iterable[str]) -> list[Override]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def override_values(overrides: Iterable[str]) -> dict[str, str]:
    """Command-line overrides as key -> value text, in order (``+model.x=1`` -> ``model.x: 1``);
    deletions (``~key``) left out."""
    return {
        o.key_or_group: o.get_value_element_as_str() for o in _parse(overrides) if not o.is_delete()
    }


def safe(text: str) -> str:
    """``text`` with every character outside ``A-Z a-z 0-9 . _ + = , -`` replaced by ``_`` and no
    ``..``, so that it is one path component that stays where it is put."""
    return re.sub(r"\.{2,}", "_", UNSAFE.sub("_", text))


def bounded(text: str, limit: int = MAX_NAME) -> str:
    """``text`` if it has at most ``limit`` characters, else cut to fit with ``-`` and a hash of
    the whole text appended, so that different long names stay different. The cut keeps whole
    ``key=value`` parts where one fits (``max_steps=5-<hash>`` would misread ``max_steps=50``)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:HASH_CHARS]
    head = text[: limit - HASH_CHARS - 1]
    if text[len(head)] != "," and "," in head:
        head = head[: head.rindex(",")]
    return f"{head.rstrip(',=_.-')}-{digest}"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last component (``model.hidden_size`` -> ``hidden_size``); keys that would
    read the same keep as many trailing components as tell them apart (``data.max_len``)."""
    parts = {key: re.split(r"[./]", key) for key in keys}
    depth = dict.fromkeys(keys, 1)
    while True:
        shorts = {key: ".".join(parts[key][-depth[key] :]) for key in keys}
        clashes = [k for k in keys if list(shorts.values()).count(shorts[k]) > 1]
        if not any(depth[k] < len(parts[k]) for k in clashes):
            return shorts
        for key in clashes:
            depth[key] += 1


def is_group(key: str) -> bool:
    """Whether ``key`` is a config group of ``conf/`` (``model``, ``experiment``), whose choice
    names a file there."""
    return key.isidentifier() and key != "hydra" and (CONFIG_DIR / key).is_dir()


def override_label(
    overrides: Iterable[str], exclude_keys: Iterable[str] = (), limit: int = MAX_NAME
) -> str:
    """``model=gru,hidden_size=16,seed=1`` from a run's command-line overrides, leaving out
    ``exclude_keys``: group choices and other top-level keys first, then nested keys, seed last,
    each group in command-line order (which is the same in every job of a sweep). Past ``limit``
    characters a group choice is written as its value alone (``state_tracking_1to40,
    linear_rnn_signed,seed=0``), so a cut that follows keeps the choices in view."""
    excluded = set(exclude_keys)
    values = {k: v for k, v in override_values(overrides).items() if k not in excluded}

    def order(key: str) -> int:
        return 2 if key == SEED_KEY else int("." in key)

    keys = sorted(values, key=order)  # stable: command-line order within each rank
    shorts = short_keys(keys)
    label = safe(",".join(f"{shorts[key]}={values[key]}" for key in keys))
    if len(label) <= limit:
        return label
    parts = (values[key] if is_group(key) else f"{shorts[key]}={values[key]}" for key in keys)
    return safe(",".join(parts))


def job_dir_name(num: int, overrides: Sequence[str], exclude_keys: Sequence[str]) -> str:
    """A sweep job's directory: ``<num>_<the overrides that differ between jobs>``."""
    label = override_label(overrides, exclude_keys, MAX_NAME - len(f"{num}_"))
    return bounded(f"{num}_{label}" if label else str(num))


def checked_name(name: Any) -> str:
    """The ``name`` of a run as it goes into its directory name, or ``ConfigError``."""
    from parity_lab.config import ConfigError  # parity_lab.config imports this package first

    text = str(name)
    if not text or safe(text) != text or len(text) > MAX_NAME:
        raise ConfigError(
            f"name={text!r} is invalid: expected 1 to {MAX_NAME} of the characters "
            "A-Z a-z 0-9 . _ + = , - (no '..'): it becomes part of the run's directory name"
        )
    return text


def run_dir_suffix(name: Any, overrides: Sequence[str], exclude_keys: Sequence[str]) -> str:
    """What follows a single run's time: ``_<name>``, else ``_<its overrides>``, else nothing."""
    if name is not None:
        return f"_{checked_name(name)}"
    label = override_label(overrides, exclude_keys)
    return f"_{bounded(label)}" if label else ""


def sweep_value_counts(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, int]:
    """How many values each override key takes in a sweep of a stored sweep's ``params`` and the
    command line's ``overrides`` (a later one of a key replaces an earlier one, as in Hydra's basic
    sweeper); 2 stands for "several" where the values cannot be counted (``glob``)."""
    counts: dict[str, int] = {}
    for override in _parse([*(f"{k}={v}" for k, v in params.items()), *overrides]):
        if not override.is_sweep_override():
            counts[override.key_or_group] = 1
            continue
        try:
            counts[override.key_or_group] = len(list(override.sweep_string_iterator()))
        except Exception:  # glob() needs the config repository to list its options
            counts[override.key_or_group] = 2
    return counts


def directory_overrides(argv: list[str]) -> list[str]:
    """``argv`` checked and completed for directory names before Hydra starts: a bad ``name=``
    raises ``ConfigError``; a multirun gets the overrides of ``constant_overrides``."""
    for arg in argv[1:]:
        if not arg.lstrip("+").startswith("name="):
            continue
        try:
            (override,) = _parse([arg])
        except Exception:  # Hydra's lexer refuses it (say, a non-ASCII letter): the same rule
            checked_name(arg.split("=", 1)[1])
            continue
        if not override.is_sweep_override() and override.value() is not None:
            checked_name(override.value())
    return constant_overrides(argv)


def constant_overrides(argv: list[str]) -> list[str]:
    """For a multirun, ``argv`` plus Hydra's ``override_dirname.exclude_keys`` extended by every
    override key that is the same in every job, so that job names show only what differs.

    The stored sweep's ``hydra.sweeper.params`` come from composing the config once (run mode,
    each swept value replaced by its first). Any other argv, or one Hydra cannot compose, is
    returned unchanged: Hydra then reports the problem itself.
    """
    overrides = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-")]
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in overrides]
    if EXCLUDE_KEYS in keys:
        return argv  # the user chose the excluded keys
    if not {"-m", "--multirun"} & set(argv) and not any(k.startswith(SWEEP_KEYS) for k in keys):
        return argv  # a single run: composing the config here would only cost time
    from hydra import compose, initialize_config_dir

    try:
        parsed = _parse(overrides)
        first_values = [
            f"{o.input_line.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}"
            if o.is_sweep_override()
            else o.input_line
            for o in parsed
        ]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=first_values, return_hydra_config=True)
    except Exception:
        return argv
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not {"-m", "--multirun"} & set(argv) and cfg.hydra.mode != RunMode.MULTIRUN:
        return argv

    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    task = [
        arg
        for arg, key in zip(overrides, keys, strict=True)
        if not key.startswith(("hydra.", "hydra/"))
    ]
    counts = sweep_value_counts(params, task)
    excluded = [*cfg.hydra.job.config.override_dirname.exclude_keys]
    excluded += [key for key, count in counts.items() if count == 1 and key not in excluded]
    quoted = ",".join(f"'{key}'" for key in excluded)
    # Beside the last override: Hydra's argparse reads the overrides as one run of positional
    # arguments, so one appended after options (`--cfg hydra -p hydra.sweeper`) would be refused.
    last = max((i for i, arg in enumerate(argv) if arg in overrides), default=len(argv) - 1)
    return [*argv[: last + 1], f"{EXCLUDE_KEYS}=[{quoted}]", *argv[last + 1 :]]
