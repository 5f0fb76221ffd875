"""The model contract of DESIGN.md, for every model config."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from parity_lab.data import make_batch, sample_bits
from tests.conftest import CONF, compose_config

MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
BUILTIN_TWINS = [(m.removesuffix("_manual"), m) for m in MODELS if m.endswith("_manual")]


def build(model: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(compose_config(f"model={model}", *overrides).model)


def random_batch(encoding: str = "bit", num: int = 6, min_len: int = 1, max_len: int = 9):
    bits, lengths = sample_bits(torch.Generator().manual_seed(1), num, min_len, max_len)
    return make_batch(bits, lengths, encoding)


def test_every_model_kind_is_configured() -> None:
    assert {"rnn", "lstm", "gru", "rnn_manual", "lstm_manual", "gru_manual"} <= set(MODELS)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("encoding", ["bit", "pair"])
def test_logits_have_one_value_per_position(model_name: str, encoding: str) -> None:
    model = build(model_name, f"data.encoding={encoding}")
    batch = random_batch(encoding)
    assert model(batch.x, batch.lengths).shape == batch.x.shape[:2]


@pytest.mark.parametrize("model_name", MODELS)
def test_prediction_alone_equals_prediction_in_padded_batch(model_name: str) -> None:
    model = build(model_name, "model.num_layers=2")
    batch = random_batch(num=8, min_len=1, max_len=12)
    batched = model.final_logits(model(batch.x, batch.lengths), batch.lengths)
    for i in range(len(batch.lengths)):
        n = int(batch.lengths[i])
        alone = model(batch.x[i : i + 1, :n], batch.lengths[i : i + 1])[0, n - 1]
        torch.testing.assert_close(batched[i], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_valid_outputs_ignore_padding_values(model_name: str) -> None:
    model = build(model_name)
    batch = random_batch(num=8, max_len=12)
    garbage = batch.x.clone()
    padding = torch.arange(batch.x.shape[1]) >= batch.lengths[:, None]
    garbage[padding] = 7.0
    valid = ~padding
    torch.testing.assert_close(
        model(batch.x, batch.lengths)[valid], model(garbage, batch.lengths)[valid]
    )


@pytest.mark.parametrize(("builtin", "manual"), BUILTIN_TWINS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_manual_twin_has_builtin_state_dict_and_logits(
    builtin: str, manual: str, num_layers: int
) -> None:
    reference = build(builtin, f"model.num_layers={num_layers}", "model.hidden_size=5")
    twin = build(manual, f"model.num_layers={num_layers}", "model.hidden_size=5")
    reference_state, twin_state = reference.state_dict(), twin.state_dict()
    assert {k: v.shape for k, v in twin_state.items()} == {
        k: v.shape for k, v in reference_state.items()
    }
    twin.load_state_dict(reference_state)
    batch = random_batch(num=16, max_len=30)
    torch.testing.assert_close(
        twin(batch.x, batch.lengths), reference(batch.x, batch.lengths), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("builtin", "manual"), BUILTIN_TWINS)
def test_manual_twin_has_builtin_gradients(builtin: str, manual: str) -> None:
    reference, twin = build(builtin), build(manual)
    twin.load_state_dict(reference.state_dict())
    batch = random_batch(num=16, max_len=20)
    for model in (reference, twin):
        model.final_logits(model(batch.x, batch.lengths), batch.lengths).sum().backward()
    for (name, p_ref), (_, p_twin) in zip(
        reference.named_parameters(), twin.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_twin.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_name", MODELS)
def test_chunked_run_equals_whole_run(model_name: str) -> None:
    model = build(model_name)
    batch = random_batch(num=4, min_len=10, max_len=10)
    whole = model(batch.x, batch.lengths)
    first, state = model.run(batch.x[:, :6])
    second, _ = model.run(batch.x[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


def test_padded_end_readout_reads_the_last_padded_position() -> None:
    model = build("lstm", "model.readout=padded_end")
    batch = random_batch(num=8, min_len=1, max_len=12)
    logits = model(batch.x, batch.lengths)
    assert torch.equal(model.final_logits(logits, batch.lengths), logits[:, -1])


def test_new_cell_with_only_a_step_trains_through_autograd() -> None:
    """README's recipe for a new cell (define ``step``) works without a hand-written backward."""
    from parity_lab.models import ManualRNN, ParityRNN
    from parity_lab.models.manual import ManualRecurrent

    class StepOnlyRNN(ManualRNN):
        step_backward = ManualRecurrent.step_backward  # as if never written

    torch.manual_seed(0)
    reference = ParityRNN(ManualRNN, 1, 4)
    step_only = ParityRNN(StepOnlyRNN, 1, 4)
    step_only.load_state_dict(reference.state_dict())
    batch = random_batch(num=8, max_len=10)
    for model in (reference, step_only):
        model.final_logits(model(batch.x, batch.lengths), batch.lengths).sum().backward()
    for p_ref, p_new in zip(reference.parameters(), step_only.parameters(), strict=True):
        torch.testing.assert_close(p_new.grad, p_ref.grad)
