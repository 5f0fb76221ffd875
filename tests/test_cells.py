"""Every hand-written cell, found by walking ``ManualRecurrent``'s subclasses, against plain loops.

Checked for each: the batched, padded forward against a loop over ``step`` one string at a time,
and a hand-written ``step_backward`` (if any) against autograd through that loop. The example of
docs/cells.md is run as written, from a directory outside the repository.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import parity_lab.models
from parity_lab.models.manual import ManualRecurrent
from tests.conftest import FAST, ROOT

CELLS_DOC = (ROOT / "docs" / "cells.md").read_text()


def doc_block(first_line: str) -> str:
    """The fenced code block of docs/cells.md that starts with ``first_line``."""
    for block in re.findall(r"```\w*\n(.*?)```", CELLS_DOC, flags=re.DOTALL):
        if block.startswith(first_line):
            return block
    raise LookupError(f"docs/cells.md has no code block starting {first_line!r}")


EXAMPLE_CELL = doc_block("# my_cells.py")
EXAMPLE_YAML = doc_block("# my_conf/model/mgu.yaml")


def hand_written_cells() -> list[type[ManualRecurrent]]:
    """Every ManualRecurrent subclass in parity_lab.models, the doc's example, and the modules
    named in ``PARITY_LAB_CELLS`` (comma-separated), for checking a cell of your own."""
    for module in pkgutil.iter_modules(parity_lab.models.__path__, "parity_lab.models."):
        importlib.import_module(module.name)
    for name in filter(None, os.environ.get("PARITY_LAB_CELLS", "").split(",")):
        importlib.import_module(name)
    example = types.ModuleType("my_cells")
    exec(compile(EXAMPLE_CELL, "docs/cells.md", "exec"), example.__dict__)
    found, stack = [], [ManualRecurrent]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            if "step" in cls.__dict__:  # defines a cell, not only helpers on top of one
                found.append(cls)
    return sorted(set(found), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


CELLS = hand_written_cells()
IDS = [f"{cls.__module__.removeprefix('parity_lab.models.')}.{cls.__name__}" for cls in CELLS]


def has_hand_written_backward(cls: type[ManualRecurrent]) -> bool:
    return cls.step_backward is not ManualRecurrent.step_backward


def plain_loop(
    cell: ManualRecurrent, x: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``step`` applied one time step and one layer at a time: outputs and final state, with
    ``state`` as ``state_size`` tensors ``(num_layers, batch, hidden)``."""
    finals = []
    for layer in range(cell.num_layers):
        weight_ih, weight_hh, bias_ih, bias_hh = cell.layer_weights(layer)
        layer_state, outputs = tuple(s[layer] for s in state), []
        for t in range(x.shape[1]):
            h, layer_state = cell.step(
                x[:, t] @ weight_ih.T + bias_ih, layer_state, weight_hh, bias_hh
            )
            outputs.append(h)
        x = torch.stack(outputs, dim=1)
        finals.append(layer_state)
    return x, tuple(torch.stack(parts) for parts in zip(*finals, strict=True))


def as_tuple(cell: ManualRecurrent, state: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple:
    return (state,) if cell.state_size == 1 else tuple(state)


def as_torch_state(cell: ManualRecurrent, state: tuple[torch.Tensor, ...]):
    return state[0] if cell.state_size == 1 else state


def make_cell(cls: type[ManualRecurrent]) -> ManualRecurrent:
    torch.manual_seed(0)
    return cls(3, 4, num_layers=2, batch_first=True).double()


def random_state(cell: ManualRecurrent, batch: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, batch, 4, dtype=torch.float64) for _ in range(cell.state_size))


def test_the_walk_finds_the_twins_and_the_docs_example() -> None:
    names = {cls.__name__ for cls in CELLS}
    assert {"ManualRNN", "ManualLSTM", "ManualGRU", "MinimalGatedUnit"} <= names


@pytest.mark.parametrize("cls", CELLS, ids=IDS)
def test_batched_forward_matches_a_loop_over_each_string(cls: type[ManualRecurrent]) -> None:
    cell = make_cell(cls)
    lengths = [7, 1, 4, 7, 2]
    x = torch.randn(len(lengths), 7, 3, dtype=torch.float64)
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0  # zero-padded past each string's end, as the data module pads
    state = random_state(cell, len(lengths))
    with torch.no_grad():
        outputs, final = cell(x, as_torch_state(cell, state))
        final = as_tuple(cell, final)
        for i, n in enumerate(lengths):
            alone, alone_final = plain_loop(
                cell, x[i : i + 1, :n], tuple(s[:, i : i + 1] for s in state)
            )
            torch.testing.assert_close(outputs[i, :n], alone[0])
            if n == x.shape[1]:
                for batched, single in zip(final, alone_final, strict=True):
                    torch.testing.assert_close(batched[:, i], single[:, 0])


@pytest.mark.parametrize(
    "cls", [c for c in CELLS if has_hand_written_backward(c)],
    ids=[i for c, i in zip(CELLS, IDS, strict=True) if has_hand_written_backward(c)],
)  # fmt: skip
def test_hand_written_backward_matches_autograd(cls: type[ManualRecurrent]) -> None:
    cell = make_cell(cls)
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(s.requires_grad_() for s in random_state(cell, 3))
    inputs = [x, *state, *cell.parameters()]
    weigh_out = torch.randn(3, 6, 4, dtype=torch.float64)
    weigh_state = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in state]

    def loss(outputs: torch.Tensor, final: tuple[torch.Tensor, ...]) -> torch.Tensor:
        terms = [(outputs * weigh_out).sum()]
        terms += [(f * w).sum() for f, w in zip(final, weigh_state, strict=True)]
        return torch.stack(terms).sum()

    outputs, final = cell(x, as_torch_state(cell, state))  # runs the hand-written backward
    hand_written = torch.autograd.grad(loss(outputs, as_tuple(cell, final)), inputs)
    autograd = torch.autograd.grad(loss(*plain_loop(cell, x, state)), inputs)
    names = ["x", *(f"state[{i}]" for i in range(len(state))), *dict(cell.named_parameters())]
    for name, ours, reference in zip(names, hand_written, autograd, strict=True):
        torch.testing.assert_close(ours, reference, msg=lambda m, name=name: f"{name}: {m}")


class DiagonalRNN(ManualRecurrent):
    """IndRNN (Li et al., 2018): h = relu(W x + b + u * h), its own diagonal recurrent weight."""

    num_gates = 1

    def weight_hh_shape(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):  # noqa: ANN001, ANN201
        h = torch.relu(x_proj + weight_hh * state[0] + bias_hh)
        return h, (h,)


STEP_ONLY = [c for c in [*CELLS, DiagonalRNN] if not has_hand_written_backward(c)]


@pytest.mark.parametrize("cls", STEP_ONLY, ids=[c.__name__ for c in STEP_ONLY])
def test_traced_backward_of_a_step_only_cell_matches_autograd(
    cls: type[ManualRecurrent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell that defines only ``step`` trains through the backward traced from it (not plain
    autograd), and its gradients match autograd through the plain loop."""
    from parity_lab.models import manual

    cell = make_cell(cls)
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(s.requires_grad_() for s in random_state(cell, 3))
    inputs = [x, *state, *cell.parameters()]
    calls = []
    apply = manual.DerivedBackpropThroughTime.apply
    monkeypatch.setattr(
        manual.DerivedBackpropThroughTime, "apply", lambda *a: calls.append(1) or apply(*a)
    )
    outputs, final = cell(x, as_torch_state(cell, state))
    assert len(calls) == cell.num_layers  # the traced backward, not autograd through each step
    loss = outputs.square().sum() + sum(f.sum() for f in as_tuple(cell, final))
    traced = torch.autograd.grad(loss, inputs)
    plain_out, plain_final = plain_loop(cell, x, state)
    reference = torch.autograd.grad(
        plain_out.square().sum() + sum(f.sum() for f in plain_final), inputs
    )
    for ours, theirs in zip(traced, reference, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_cell_with_its_own_recurrent_shape_counts_its_true_parameters() -> None:
    cell = DiagonalRNN(1, 16)
    assert sum(p.numel() for p in cell.parameters()) == 4 * 16  # W_ih, u, b_ih, b_hh


def test_docs_example_trains_from_another_directory(tmp_path: Path) -> None:
    """The example cell and yaml, written to a directory of their own, train from there through
    ``hydra.searchpath``, as docs/cells.md says."""
    (tmp_path / "my_cells.py").write_text(EXAMPLE_CELL)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mgu.yaml").write_text(EXAMPLE_YAML)
    command = [sys.executable, "-m", "parity_lab", "hydra.searchpath=[file://my_conf]", "model=mgu"]
    short = ["trainer.max_steps=20", "trainer.val_check_interval=10", "hydra.run.dir=run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's parity_lab, not another
    result = subprocess.run(
        [*command, *FAST, *short], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "_target_: my_cells.MinimalGatedUnit" in config
    assert "MinimalGatedUnit hidden=16" in result.stdout
