"""A run directory is data: its config names only the project's own classes (or those the user
trusts on the command line), and results are written whole or not at all.

Kept light (no torch at import): the config checks and ``python -m parity_lab.report`` use it.
"""

from __future__ import annotations

import json
import math
import os
import re
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


class ResultWriteError(OSError):
    """A result file that could not be written (a full disk): the message names the file and the
    error, on one line. An ``OSError``, so callers that expect one still catch it."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(error.errno, f"{path}: cannot be written ({error.strerror or error})")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class RunInUseError(RunFileError):
    """Another process holds the run directory's lock: one writer per run."""


MAX_RUN_YAML = 1 << 20  # bytes: a run's config files are a few kB


def read_run_yaml(path: Path, what: str = "run file") -> Any:
    """A YAML file of a run directory as an OmegaConf node, refusing anchors and aliases (a few
    kB of aliases expand into gigabytes: a "billion laughs") and files over ``MAX_RUN_YAML``
    bytes, before anything builds the node. ``RunFileError`` names the file and the reason."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_RUN_YAML:
            raise RunFileError(f"{path}: more than {MAX_RUN_YAML:,} bytes: not a run's file")
        text = path.read_text()
        for token in yaml.scan(text):  # the scanner reads tokens; it expands nothing
            if isinstance(token, yaml.AnchorToken | yaml.AliasToken):
                line = token.start_mark.line + 1
                raise RunFileError(
                    f"{path}: refusing a YAML anchor or alias (line {line}): run files hold "
                    "plain values (aliases can expand a small file into a huge one)"
                )
        return OmegaConf.create(text)
    except RunFileError:
        raise
    except Exception as error:
        raise RunFileError(f"{path}: not a {what} ({first_line(error)})") from None


def first_line(error: BaseException) -> str:
    """An exception's message on one short line (``load_state_dict``'s runs over many)."""
    text = " ".join(str(error).split())
    return (text if len(text) <= 200 else text[:200] + "...") or error.__class__.__name__


def current_umask() -> int:
    """The process's umask (read by setting it, and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` only once the block
    ends without error, so a reader (or a crash, or a full disk) never sees half a file.

    The file gets the mode any new file gets (0666 less the umask), not ``mkstemp``'s 0600. A
    ``path`` that is a symbolic link is refused (``RunFileError``): nothing writes through a link.
    A failed write raises ``ResultWriteError`` naming ``path``.
    """
    path = Path(path)
    if path.is_symlink():
        raise RunFileError(f"{path}: is a symbolic link: refusing to write through it")
    try:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix
        )
    except OSError as error:
        raise ResultWriteError(path, error) from error
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
    finally:
        os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if isinstance(error, ResultWriteError):
            raise
        raise ResultWriteError(path, error) from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


# metrics.json entries that are text: worst-case strings written as runs (``1 0^24``), and why a
# certificate was not found.
TEXT_METRICS = frozenset(
    {"worst_case_wrong", "worst_case_wrong_long", "certified_counterexample", "certify_note"}
)


# metrics.json entries that are lists of lengths: those beyond a Transformer's max_len, which
# neither the held-out sets nor the length curve evaluated.
LENGTH_LISTS = frozenset({"test/skipped_lengths", "length_curve_skipped"})


def read_metrics(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``; ``CorruptResultError`` saying why when it is not one
    (empty, cut short, not an object, a value that is not a finite number: JSON's ``NaN`` is no
    accuracy)."""
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
        if key in LENGTH_LISTS:
            if not isinstance(value, list) or not all(
                _is_number(n) and isinstance(n, int) and n >= 1 for n in value
            ):
                raise CorruptResultError(f"{path.name} has {key}={value!r}: not a list of lengths")
            continue
        if key.startswith(("val/", "test/")) and not _is_number(value):
            raise CorruptResultError(f"{path.name} has {key}={value!r}: not a number")
        if key == "certified" and value not in (True, False, None):
            raise CorruptResultError(
                f"{path.name} has certified={value!r}: not true, false or null"
            )
        plain = value is None or isinstance(value, bool) or _is_number(value)
        plain = plain or (isinstance(value, str) and key in TEXT_METRICS)
        if not plain and not (isinstance(value, dict) and all(map(_is_number, value.values()))):
            raise CorruptResultError(f"{path.name} has {key}={value!r}: not a plain value")
    return metrics


def _is_number(value: Any) -> bool:
    """An int, or a float that is finite (not NaN, not infinite)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def refuse_links(directory: Path) -> None:
    """``RunFileError`` naming the first symbolic link inside ``directory`` (at any depth; the
    directory itself may be one): a command that writes into a run directory checks it first, so
    that no result, checkpoint or log is written through a link to somewhere else."""
    directory = Path(directory)
    for root, dirs, files in os.walk(directory):  # os.walk does not descend into links
        for name in sorted([*dirs, *files]):
            if os.path.islink(os.path.join(root, name)):
                link = Path(root) / name
                raise RunFileError(
                    f"{link}: is a symbolic link inside the run directory {directory}: refusing "
                    "to write there (replace it by a real file or directory)"
                )


LOCK_NAME = ".lock"
_held_locks: dict[str, tuple[int, int]] = {}  # run dir -> (file descriptor, holders here)


def hold_run_lock(run_dir: Path) -> None:
    """Take ``RUN_DIR/.lock`` (``fcntl.flock``) for one more holder in this process: one writer
    per run directory, whatever process or launcher runs it. Another process gets
    ``RunInUseError`` naming the process that holds it. The kernel releases the lock when the
    holder exits, however it exits (``release_run_lock`` gives it back earlier)."""
    import fcntl

    key = os.path.realpath(run_dir)
    if key in _held_locks:
        handle, count = _held_locks[key]
        _held_locks[key] = (handle, count + 1)
        return
    path = Path(run_dir) / LOCK_NAME
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise RunFileError(f"{path}: cannot be opened ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        raise RunInUseError(
            f"{run_dir}: in use by process {holder} (it holds {path}); one process writes a run "
            "at a time: wait for it to end, or stop it"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = (handle, 1)


def release_run_lock(run_dir: Path) -> None:
    """Give back one ``hold_run_lock``; the last one here unlocks the directory."""
    key = os.path.realpath(run_dir)
    handle, count = _held_locks[key]
    if count > 1:
        _held_locks[key] = (handle, count - 1)
    else:
        del _held_locks[key]
        os.close(handle)  # releases the lock


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """The run directory's lock (``hold_run_lock``) while the block runs."""
    hold_run_lock(run_dir)
    try:
        yield
    finally:
        release_run_lock(run_dir)


def check_checkpoint_archive(path: Path, tensor_bytes: int) -> None:
    """``RunFileError`` unless the checkpoint at ``path`` is a torch zip archive of stored
    (uncompressed) entries whose sizes add up to at most what a checkpoint of a model with
    ``tensor_bytes`` bytes of weights holds (weights, two Adam moments, a margin): checked in
    the archive's directory, before any tensor is read, so a small file cannot inflate into a
    large one in memory."""
    import zipfile

    allowed = 4 * tensor_bytes + (4 << 20)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile) as error:
        raise RunFileError(f"{path}: not a readable checkpoint ({first_line(error)})") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise RunFileError(
                f"{path}: refusing the compressed entry {entry.filename!r}: torch writes "
                "checkpoints uncompressed, and a compressed one can inflate far beyond its size"
            )
    total = sum(entry.file_size for entry in entries)
    if total > allowed:
        raise RunFileError(
            f"{path}: holds {total:,} bytes, more than the {allowed:,} a checkpoint of the run's "
            f"model ({tensor_bytes:,} bytes of weights) needs: refusing to load it"
        )


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
    "to use your own code, trust it from the command line: --trust MODULE (predict, analyze, "
    f"certify), {TRUST_ENV}=MODULE, or the hydra.searchpath=[file://DIR] your yaml is in"
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


def allowed_target(group: str, target: Any) -> bool:
    """Whether a run's config may build ``target`` under its top-level key ``group``: one of
    the project's own ``conf/<group>/`` targets, or a model class of ``parity_lab.models``.
    The one place to extend what a run directory may name."""
    return isinstance(target, str) and (
        target in project_targets().get(group, ())
        or (group == "model" and _is_model_class(target))
        or _is_trusted(target, group)
    )


def literal_values(node: Any) -> Any:
    """A plain container with every string's ``${`` escaped, so that an OmegaConf node made of
    it resolves to exactly these values: nothing in it is an interpolation any more."""
    if isinstance(node, dict):
        return {key: literal_values(value) for key, value in node.items()}
    if isinstance(node, list):
        return [literal_values(value) for value in node]
    if isinstance(node, str) and "${" in node:
        return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", node)
    return node


def built_config(plain: dict[str, Any]) -> DictConfig:
    """The DictConfig that builds exactly ``plain`` (checked values): no interpolation left."""
    cfg = OmegaConf.create(literal_values(plain))
    assert OmegaConf.to_container(cfg, resolve=True) == plain  # the values checked are built
    return cfg


def read_run_config(path: Path) -> DictConfig:
    """A run's ``.hydra/config.yaml``, resolved once, checked (``checked_config``) and returned
    as a config of exactly those plain values: what is checked is what gets built."""
    cfg = read_run_yaml(path, "run config")
    if not isinstance(cfg, DictConfig):
        raise RunFileError(f"{path}: not a run config (expected a mapping)")
    return built_config(checked_config(cfg, path))


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
        where = key or "the config"
        raise UnsafeConfigError(f"{source}: cannot read {where}: {first_line(error)}") from None
    prefix = (key,) if key else ()
    for key_path, target in _targets(plain, prefix):
        group = str(key_path[0]) if key_path else ""
        if allowed_target(group, target):
            continue
        where = ".".join(map(str, (*key_path, "_target_")))
        raise UnsafeConfigError(
            f"{source}: refusing {where}={target!r}: a run directory may only name the "
            f"project's own classes (those in conf/{group or '<group>'}/); {TRUST_HINT}"
        )
    return plain
