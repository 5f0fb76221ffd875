"""experiment=state_tracking is the published protocol: its data convention, head, loss,
optimizer groups and test pool, each checked against what the authors' code does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from torch.nn import functional as F

from parity_lab.config import ConfigError, validate
from parity_lab.data import ParityStream
from parity_lab.models import ParityRNN
from parity_lab.models.classifier import TokenHead
from parity_lab.module import ParityModule
from parity_lab.train import train
from tests.conftest import CONF, compose_config


def test_state_tracking_is_the_published_recipe() -> None:
    cfg = compose_config("experiment=state_tracking", "model=mamba_signed")
    # their min/max_sequence_length 3..40 count the answer position: 2..39 bits
    assert (cfg.data.min_len, cfg.data.max_len, cfg.data.batch_size) == (2, 39, 256)
    assert cfg.data.num_train is None and cfg.data.supervision == "final"
    assert cfg.model.head == "tokens" and cfg.loss._target_ == "torch.nn.CrossEntropyLoss"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 1e-3
    assert cfg.scheduler.warmup_steps == 2000 and cfg.scheduler.shape == "cosine"
    assert cfg.scheduler.decay_steps == cfg.trainer.max_steps == 20000
    assert cfg.scheduler.final_factor == 1e-3
    assert dict(cfg.eval.pool) == {"num": 8192, "min_len": 39, "max_len": 255}
    validate(cfg)


def test_no_stored_experiment_or_sweep_caps_wall_clock_time() -> None:
    stored = [*CONF.glob("experiment/*.yaml"), *CONF.glob("sweep/*.yaml")]
    assert stored
    assert [p.name for p in stored if "max_time" in p.read_text()] == []


def test_weight_decay_is_published_per_family() -> None:
    decays = {
        name: compose_config("experiment=state_tracking", f"model={name}").model.get("weight_decay")
        for name in ("mamba", "mamba_signed", "deltanet_published", "xlstm_slstm", "xlstm_mlstm")
    }
    assert decays == {
        "mamba": None,
        "mamba_signed": None,
        "deltanet_published": None,
        "xlstm_slstm": 0.1,
        "xlstm_mlstm": 0.1,
    }


def _module(cfg) -> ParityModule:  # noqa: ANN001
    return ParityModule(
        instantiate(cfg.model), instantiate(cfg.loss), instantiate(cfg.optimizer), "final", ["val"]
    )


def test_null_decay_takes_the_models_and_spares_vectors_and_the_embedding() -> None:
    cfg = compose_config("experiment=state_tracking", "model=mamba", "+model.weight_decay=0.1")
    module = _module(cfg)
    optimizer = module.configure_optimizers()
    decayed = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]
    }
    names = {n for n, p in module.model.named_parameters() if id(p) in decayed}
    assert "rnn.layers.0.mixer.in_proj.weight" in names and "head.classes.weight" in names
    spared = {n for n, _ in module.model.named_parameters()} - names
    assert {"rnn.embedding.weight", "rnn.layers.0.mixer.D", "rnn.layers.0.norm.weight"} <= spared
    assert all(
        p.ndim == 1 or "embedding" in n for n, p in module.model.named_parameters() if n in spared
    )
    # the xLSTM's published 0.1 spares its embedding too, named embed there
    module = _module(compose_config("experiment=state_tracking", "model=xlstm_mlstm"))
    group_of = {id(p): g for g in module.configure_optimizers().param_groups for p in g["params"]}
    decay = {n: group_of[id(p)]["weight_decay"] for n, p in module.model.named_parameters()}
    assert decay["rnn.embed.weight"] == 0.0 and decay["rnn.embed.bias"] == 0.0
    assert decay["rnn.layers.0.proj_up.weight"] == 0.1 and decay["head.classes.weight"] == 0.1
    # an explicit optimizer.weight_decay applies to every parameter, as before
    cfg = compose_config("experiment=state_tracking", "model=mamba", "optimizer.weight_decay=0.05")
    groups = _module(cfg).configure_optimizers().param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05


def test_tokens_head_reads_parity_as_the_difference_of_the_bit_scores() -> None:
    torch.manual_seed(0)
    head = TokenHead(5)
    h = torch.randn(3, 7, 5)
    scores = head.scores(h)
    assert torch.allclose(head(h).squeeze(-1), scores[..., 2] - scores[..., 1], atol=1e-6)
    assert head.classes.bias is None  # their lm_head has no bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "overrides",
    [
        ["model=lstm", "model.hidden_size=4"],
        # read the answers only (reads_answers): packed (Mamba, DeltaNet, the mLSTM), the last
        # block at the answers alone; in float32 through the C kernels
        ["model=mamba_signed", "model.hidden_size=8", "model.num_layers=2"],
        ["model=deltanet_published_signed", "model.hidden_size=8", "model.num_layers=2"],
        ["model=xlstm_mlstm", "model.hidden_size=8", "model.num_layers=2"],
        ["model=xlstm_slstm", "model.hidden_size=8", "model.num_layers=2", "model.conv_size=4"],
    ],
)
def test_training_loss_is_cross_entropy_of_three_classes_at_the_answer(
    overrides: list[str], dtype: torch.dtype
) -> None:
    """The training step's loss and gradients equal their loss computed from the outputs at
    every position, held to a float64 copy of the model: to 1e-12 in float64 (where the
    answer-only paths and the full forward agree to rounding), to 1e-3 of the largest gradient
    in float32 (the kernels, packed; these small random models' float32 gradients are up to 6e-4
    of the largest off float64 in either path, measured over 20 seeds)."""
    cfg = compose_config("experiment=state_tracking", *overrides)
    torch.manual_seed(0)
    module = _module(cfg).to(dtype)
    batch = ParityStream(0, 2, 9, 16, None, "pair").batch(0)
    loss = module.training_step(batch._replace(x=batch.x.to(dtype)), 0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    # the reference: their loss, the 3-way cross-entropy at the last bit, target token 1 + parity,
    # from the outputs at every position, in float64
    module = module.double()
    module.zero_grad()
    model: ParityRNN = module.model
    outputs, _ = model.rnn(batch.x.double())
    scores = outputs @ model.head.classes.weight.t()
    rows = torch.arange(16)
    answer = scores[rows, batch.lengths - 1]
    target = 1 + batch.targets[rows, batch.lengths - 1].long()
    reference = F.cross_entropy(answer, target)
    exact = dtype == torch.float64
    assert abs(float(loss) - float(reference)) < (1e-12 if exact else 1e-5)
    reference.backward()
    for name, parameter in module.named_parameters():
        scale = 1e-12 if exact else 1e-3 * float(parameter.grad.abs().max())
        torch.testing.assert_close(
            grads[name].double(), parameter.grad, atol=scale, rtol=0, msg=name
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+model.head=tokens"], "token_ce"),
        (["loss=token_ce"], "model.head=tokens"),
        (["+model.head=softmax"], "model.head"),
        (["eval.pool={num:0,min_len:3,max_len:5}"], "eval.pool.num"),
        (["eval.pool={num:8,min_len:9,max_len:5}"], "eval.pool.max_len"),
    ],
)
def test_bad_head_loss_or_pool_is_refused(overrides: list[str], message: str) -> None:
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_mamba_embedding_is_the_token_table_with_pair_encoding() -> None:
    pair = instantiate(compose_config("model=mamba", "data.encoding=pair").model).rnn.embedding
    assert pair.bias is None  # the rows of bit 0 and bit 1 are the weight's two columns
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (bit 1, bit 0) as (bit, 1 - bit)
    assert torch.equal(pair(x)[0], pair.weight.t())
    assert instantiate(compose_config("model=mamba").model).rnn.embedding.bias is not None


def test_a_run_reports_the_test_pool(tmp_path: Path) -> None:
    cfg = compose_config(
        "experiment=state_tracking",
        "model=lstm",
        "model.hidden_size=4",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "scheduler.warmup_steps=1",
        "data.batch_size=8",
        "eval.num_val=16",
        "eval.num_test=16",
        "eval.lengths=[39]",
        "eval.pool.num=32",
        "eval.certify=false",
        "trainer.enable_progress_bar=false",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert 0 <= metrics["test/acc_pool"] <= 1
    assert metrics["test/scaled_acc_pool"] == pytest.approx((metrics["test/acc_pool"] - 0.5) / 0.5)
    assert "pool" in (tmp_path / "metrics.json").read_text()


def published_datamodule() -> Any:
    """The published protocol's data, with a pool of 4,096 strings of 39..255 bits."""
    return instantiate(
        compose_config("experiment=state_tracking").data,
        seed=0,
        eval_lengths=[39],
        num_val=64,
        num_test=64,
        pool={"num": 4096, "min_len": 39, "max_len": 255},
        eval_batch_size=1024,
    )


def test_the_pool_is_uniform_over_its_lengths_and_its_own_set() -> None:
    datamodule = published_datamodule()
    assert datamodule.eval_names == ["val", "len_39", "pool"]
    lengths = datamodule.eval_sets()["pool"].lengths
    assert int(lengths.min()) == 39 and int(lengths.max()) == 255
    assert abs(lengths.float().mean().item() - 147) < 3  # uniform: mean (39 + 255) / 2


@pytest.mark.parametrize("readout", ["last", "padded_end"])
def test_evaluation_reads_each_batch_only_to_its_longest_string(readout: str) -> None:
    """The evaluation sets are batched shortest first, and a causal readout reads a batch only
    to its longest string: the pool's 39..255 bits cost about half of reading every batch to
    255. The predictions are those of the whole padded batch; the padding bug's readout
    (``padded_end``, which reads the padded end) still sees the whole width."""
    datamodule = published_datamodule()
    batches = list(datamodule.val_dataloader()[-1])
    lengths = torch.cat([b.lengths for b in batches])
    assert len(batches) == 4 and torch.equal(
        lengths, datamodule.eval_sets()["pool"].lengths.sort()[0]
    )
    torch.manual_seed(0)
    model = ParityRNN(torch.nn.LSTM, 2, 4, readout=readout)
    module = ParityModule(model, F.binary_cross_entropy_with_logits, None, "final", ["pool"])
    module.log = lambda *args, **kwargs: None
    seen = []
    forward = model.forward

    def spy(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = forward(x, lengths)
        seen.append((x.shape[1], model.final_logits(logits, lengths)))
        return logits

    model.forward = spy
    with torch.no_grad():
        for batch in batches:
            module._evaluate("val", batch, 0)
            whole = model.final_logits(forward(batch.x, batch.lengths), batch.lengths)
            width, final = seen[-1]
            full = batch.x.shape[1]
            assert width == (int(batch.lengths.max()) if readout == "last" else full)
            torch.testing.assert_close(final, whole)
    assert (seen[0][0] < 200) == (readout == "last")  # the shortest quarter: 39..93 bits
