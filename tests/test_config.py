"""Every yaml in every config group composes and instantiates; experiments match DESIGN.md."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from parity_lab.module import ParityModule
from tests.conftest import CONF, compose_config

GROUP_FILES = sorted(
    (path.parent.name, path.stem)
    for path in CONF.glob("*/*.yaml")
    if path.parent.name in {"model", "data", "loss", "optimizer", "trainer", "experiment"}
)


def test_every_group_has_files() -> None:
    groups = {group for group, _ in GROUP_FILES}
    assert groups == {"model", "data", "loss", "optimizer", "trainer", "experiment"}


@pytest.mark.parametrize(("group", "name"), GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_group_file_composes_and_instantiates(group: str, name: str) -> None:
    cfg = compose_config(f"{group}={name}")
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    loss = instantiate(cfg.loss)
    assert isinstance(loss, torch.nn.Module)
    module = ParityModule(model, loss, instantiate(cfg.optimizer), cfg.data.supervision, ["val"])
    optimizer = module.configure_optimizers()  # the optimizer as training builds it
    assert isinstance(optimizer, torch.optim.Optimizer)
    datamodule = instantiate(cfg.data, seed=cfg.seed, eval_lengths=list(cfg.eval.lengths))
    batch = next(iter(datamodule.train_dataloader()))
    logits = model(batch.x, batch.lengths)
    assert logits.shape == batch.targets.shape
    if group == "trainer" and name == "gpu" and not torch.cuda.is_available():
        return  # composes; building a GPU Trainer needs a GPU
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_experiments_match_design() -> None:
    notebook = compose_config("experiment=notebook")
    assert notebook.model.hidden_size == 8 and notebook.optimizer.lr == 0.01
    assert (notebook.data.min_len, notebook.data.max_len, notebook.data.batch_size) == (1, 20, 10)
    assert notebook.trainer.max_steps == 1000 and notebook.data.supervision == "final"
    assert min(notebook.eval.lengths) == 50 and max(notebook.eval.lengths) == 100

    keras = compose_config("experiment=keras_blog")
    assert keras.model.rnn._target_ == "torch.nn.LSTM" and keras.model.hidden_size == 1
    assert keras.model.input_size == 2 and keras.data.encoding == "pair"
    assert (keras.data.min_len, keras.data.max_len) == (50, 50)
    assert keras.data.supervision == "every_step" and keras.data.num_train == 100_000
    assert keras.trainer.max_epochs == 10 and keras.data.batch_size == 128

    fixed = compose_config("experiment=openai_fixed50")
    variable = compose_config("experiment=openai_variable50")
    for cfg in (fixed, variable):
        assert cfg.model.rnn._target_ == "torch.nn.LSTM" and cfg.data.supervision == "final"
        assert cfg.data.num_train == 100_000 and cfg.data.max_len == 50
    assert fixed.data.min_len == 50 and variable.data.min_len == 1


def test_command_line_model_wins_over_experiment() -> None:
    cfg = compose_config("experiment=notebook", "model=lstm_manual")
    assert cfg.model.rnn._target_ == "parity_lab.models.ManualLSTM"
    assert cfg.model.hidden_size == 8


def test_fixed_data_follows_max_len() -> None:
    cfg = compose_config("data=fixed", "data.max_len=7")
    assert cfg.data.min_len == cfg.data.max_len == 7
