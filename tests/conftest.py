"""Shared fixtures: compose the real config from conf/, shrunk so a run takes seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import parity_lab  # noqa: F401  (registers the ${input_size:...} resolver)

# Tiny models run fastest on one thread, and on a 2-core machine more threads oversubscribe.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small evaluation sets and a short budget: enough to exercise every path quickly.
FAST = [
    "eval.num_val=64",
    "eval.num_test=64",
    "eval.lengths=[30]",
    "trainer.enable_progress_bar=false",
]


def compose_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """The config ``python -m parity_lab`` composes from ``overrides`` (``hydra``: with its
    ``hydra`` node: mode, sweeper, launcher)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def make_config() -> Callable[..., DictConfig]:
    """``make_config(*overrides)``: the real composed config, shrunk for speed."""
    return lambda *overrides: compose_config(*FAST, *overrides)


def event_tags(run_dir: Path, kind: str = "scalars") -> set[str]:
    """Tags of one kind (``scalars``, ``images``) in every TensorBoard event file under run_dir."""
    tags: set[str] = set()
    for events in run_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()[kind])
    return tags


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one scalar tag in run_dir's event files, in the order written."""
    series: list[tuple[int, float]] = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            series += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return series


def save_as_run(run_dir: Path, cfg: DictConfig, model: nn.Module) -> None:
    """Write ``model`` as a run of ``cfg`` in ``run_dir``: Hydra's config record and a Lightning
    checkpoint, as training leaves them (for predict and analyze)."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 0}, run_dir / "checkpoints" / "last.ckpt")
