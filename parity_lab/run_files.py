"""A run directory is data: its config names only the project's own classes (or those the user
trusts on the command line), and results are written whole or not at all.

Kept light (no torch at import): the config checks and ``python -m parity_lab.report`` use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS_PACKAGE = "parity_lab.models"


class RunFileError(ValueError):
    """A file of a run directory that cannot be used; the message names it and what is wrong."""


class UnsafeConfigError(RunFileError):
    """A run's config names a ``_target_`` that is not one of the project's own."""


class CorruptResultError(RunFileError):
    """A result file that exists but cannot be read as one."""


def first_line(error: BaseException) -> str:
    """An exception's message on one short line (``load_state_dict``'s runs over many)."""
    text = " ".join(str(error).split())
    return (text if len(text) <= 200 else text[:200] + "...") or error.__class__.__name__


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` only once the block
    ends without error, so a reader (or a crash, or a full disk) never sees half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix
    )
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def read_metrics(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``; ``CorruptResultError`` saying why when it is not one
    (empty, cut short, not an object, a value that is not a number)."""
    path = Path(path)
    try:
        text = path.read_text()
        metrics = json.loads(text)
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptResultError(
            f"{path.name} is unreadable ({error.__class__.__name__})"
        ) from error
    except json.JSONDecodeError as error:
        what = "is empty" if not text.strip() else f"is not JSON ({error.msg}, line {error.lineno})"
        raise CorruptResultError(f"{path.name} {what}") from error
    if not isinstance(metrics, dict) or "val/acc" not in metrics:
        raise CorruptResultError(f"{path.name} is not a metrics object with val/acc")
    for key, value in metrics.items():
        if key.startswith(("val/", "test/")) and not _is_number(value):
            raise CorruptResultError(f"{path.name} has {key}={value!r}: not a number")
        plain = value is None or isinstance(value, bool) or _is_number(value)
        if not plain and not (isinstance(value, dict) and all(map(_is_number, value.values()))):
            raise CorruptResultError(f"{path.name} has {key}={value!r}: not a plain value")
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@cache
def project_targets() -> dict[str, frozenset[str]]:
    """Every ``_target_`` the project's own ``conf/`` files name, by top-level config key
    (``model``, ``data``, ``loss``, ...): what a run's config may ask to build."""
    return config_targets(CONF)


def config_targets(conf_dir: Path) -> dict[str, frozenset[str]]:
    """Every ``_target_`` the yaml files of one config directory name, by top-level config key
    (a file's group is its first folder below ``conf_dir``)."""
    found: dict[str, set[str]] = {}
    for path in sorted(Path(conf_dir).rglob("*.yaml")):
        group = path.relative_to(conf_dir).parts[0]
        if group in ("hydra", "config.yaml"):
            continue
        node = OmegaConf.load(path)
        if "# @package _global_" not in path.read_text().splitlines()[:5]:
            node = OmegaConf.create({group: node})
        for key_path, target in _targets(OmegaConf.to_container(node, resolve=False), ()):
            if key_path and isinstance(target, str):
                found.setdefault(str(key_path[0]), set()).add(target)
    return {group: frozenset(targets) for group, targets in found.items()}


TRUST_ENV = "PARITY_LAB_TRUST"  # comma-separated modules whose classes a run may name
TRUST_HINT = (
    "to use your own code, trust it from the command line: --trust MODULE (predict, analyze), "
    f"{TRUST_ENV}=MODULE, or the hydra.searchpath=[file://DIR] your yaml is in"
)
_trusted_modules: set[str] = set()
_trusted_targets: dict[str, set[str]] = {}


def trust(modules: Iterable[str] = (), searchpath: Iterable[str] = ()) -> None:
    """Let run configs name the user's own classes: every class of ``modules`` (and of their
    submodules), and the ``_target_``s the yaml files of each ``file://`` directory of
    ``searchpath`` name, under their group. Only ever called with what the user typed (command
    line, environment), never with anything read from a run directory."""
    _trusted_modules.update(modules)
    for entry in searchpath:
        if str(entry).startswith("file://") and Path(str(entry)[7:]).is_dir():
            for group, targets in config_targets(Path(str(entry)[7:])).items():
                _trusted_targets.setdefault(group, set()).update(targets)


def _is_trusted(target: str, group: str) -> bool:
    modules = _trusted_modules | set(filter(None, os.environ.get(TRUST_ENV, "").split(",")))
    module = target.rpartition(".")[0]
    return target in _trusted_targets.get(group, ()) or any(
        module == name or module.startswith(name + ".") for name in modules
    )


def _targets(node: Any, key_path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(key path, value)`` of every ``_target_`` in a plain container, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield key_path, value
            else:
                yield from _targets(value, (*key_path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, (*key_path, index))


def _is_model_class(target: str) -> bool:
    """Whether ``target`` names a ``torch.nn.Module`` class defined in ``parity_lab.models``,
    found by attribute lookup on that (already imported) package: nothing else is imported."""
    if not target.startswith(MODELS_PACKAGE + "."):
        return False
    import importlib

    import torch

    obj: Any = importlib.import_module(MODELS_PACKAGE)
    for name in target.removeprefix(MODELS_PACKAGE + ".").split("."):
        obj = getattr(obj, name, None)
    return (
        isinstance(obj, type)
        and issubclass(obj, torch.nn.Module)
        and obj.__module__.startswith(MODELS_PACKAGE)
    )


def checked_config(cfg: DictConfig | ListConfig, source: Path, key: str = "") -> Any:
    """``cfg`` resolved to plain values, once every ``_target_`` in it, at any depth, is one the
    project's own ``conf/<group>/`` files name (or a model class of ``parity_lab.models``, or one
    the user trusts: ``trust``);
    ``key`` is ``cfg``'s own place in the run's config (``model``), empty for the whole config.
    Raises ``UnsafeConfigError`` naming the first other target and ``source``.
    """
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:
        raise UnsafeConfigError(f"{source}: cannot read {key or 'the config'}: {error}") from None
    allowed = project_targets()
    prefix = (key,) if key else ()
    for key_path, target in _targets(plain, prefix):
        group = str(key_path[0]) if key_path else ""
        if isinstance(target, str) and (
            target in allowed.get(group, ())
            or (group == "model" and _is_model_class(target))
            or _is_trusted(target, group)
        ):
            continue
        where = ".".join(map(str, (*key_path, "_target_")))
        raise UnsafeConfigError(
            f"{source}: refusing {where}={target!r}: a run directory may only name the "
            f"project's own classes (those in conf/{group or '<group>'}/); {TRUST_HINT}"
        )
    return plain
