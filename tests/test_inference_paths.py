"""Every model's inference path against its training path, across several pieces and chunks.

Without gradients the cores take other code paths than in training: the linear RNN scans
time-major pieces in place (``LinearRNN.infer``), the hand-written cells run blocks of time and
the LSTM its C kernel's inference entry, the Transformer torch's fused encoder; evaluation reads
long strings in chunks with the state carried (``parity_lab.evaluate``). Every number published
beyond the training lengths comes from these paths, so each is held to the training path (one
differentiable pass) here, with the pieces and chunks cut small so that their logic runs at test
sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from parity_lab import evaluate
from parity_lab.data import encode, key_generator
from parity_lab.models import ManualLSTM, ParityRNN, linear_rnn, mamba, manual
from parity_lab.models.linear_rnn import LinearRNNLayer
from parity_lab.models.mamba import MambaMixer
from parity_lab.models.manual import ManualRecurrent
from tests.conftest import CONF, compose_config

MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
STEPS, CHUNK, NUM = 40, 16, 24  # 40 bits read in chunks of 16, 16 and 8
PIECE = 5  # steps per piece wherever a core cuts its input (the real sizes are 64 to 256)
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # float32: pieces and chunks round differently


def build(name: str) -> ParityRNN:
    torch.manual_seed(0)
    return instantiate(compose_config(f"model={name}", "model.num_layers=2").model)


def tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor of a state, in order (a tensor, tuples, a list of tuples)."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for part in state for t in tensors(part)] if isinstance(state, list | tuple) else []


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Cut inputs into pieces of ``PIECE`` steps wherever a core cuts them; returns the lengths
    of the pieces that the cutting code paths then read, as they read them."""
    seen: list[int] = []
    monkeypatch.setattr(linear_rnn, "PIECE", PIECE)  # the linear RNN's training pieces
    monkeypatch.setattr(linear_rnn, "MIN_PIECE", PIECE)  # ... and its inference pieces
    monkeypatch.setattr(linear_rnn, "INFERENCE_VALUES", 1)
    monkeypatch.setattr(mamba, "PIECE", PIECE)
    monkeypatch.setattr(manual, "INFERENCE_BLOCK", PIECE)

    def recorded(method: Callable, time_dim: int) -> Callable:
        def wrapper(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(x.shape[time_dim])
            return method(self, x, *args, **kwargs)

        return wrapper

    for cls, name, time_dim in (
        (LinearRNNLayer, "infer", 0),  # time-major
        (LinearRNNLayer, "forward", 1),
        (MambaMixer, "forward", 1),
        (ManualRecurrent, "unroll", 0),  # one call per layer and block
        (ManualLSTM, "native_layer", 0),  # ... or through the C kernel
    ):
        monkeypatch.setattr(cls, name, recorded(getattr(cls, name), time_dim))
    return seen


def chunked(model: ParityRNN, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Logits of ``x`` read chunk by chunk with the state carried, as evaluation reads."""
    logits, state = [], None
    for chunk in x.split(CHUNK, dim=1):
        out, state = model.run(chunk, state)
        logits.append(out)
    return torch.cat(logits, dim=1), state


def random_input(seed: int = 0) -> torch.Tensor:
    bits = torch.randint(0, 2, (3, STEPS), generator=torch.Generator().manual_seed(seed))
    return encode(bits, torch.full((3,), STEPS), "bit")


# Cores that cut long inputs into pieces: in training and inference, or in inference only.
CUT_IN_TRAINING = {"LinearRNN", "Mamba"}
CUT_IN_INFERENCE = CUT_IN_TRAINING | {"ManualLSTM", "ManualGRU", "ManualRNN", "SLSTM"}


def assert_cut(seen: list[int], cut: bool) -> None:
    """Pieces of at most ``PIECE`` steps were read, at least one per piece of each layer."""
    if cut:
        assert seen and max(seen) <= PIECE and len(seen) >= 2 * STEPS // PIECE, seen
    else:
        assert not seen or max(seen) > PIECE, seen


@pytest.mark.parametrize("model_name", MODELS)
def test_inference_path_equals_the_training_path(model_name: str, small_pieces, monkeypatch):
    """Outputs and final state of the training path in one pass equal (1) the training path cut
    into pieces and (2) the inference path, in eval and in train mode, read in chunks with the
    state carried, itself cut into pieces."""
    model = build(model_name).train()
    core = type(model.rnn).__name__
    x = random_input()
    with monkeypatch.context() as real_sizes:  # the reference: one pass, nothing cut
        for module, name in ((linear_rnn, "PIECE"), (mamba, "PIECE")):
            real_sizes.setattr(module, name, 10**6)
        expected, expected_state = model.run(x)
    assert expected.requires_grad
    expected, expected_state = expected.detach(), [t.detach() for t in tensors(expected_state)]
    small_pieces.clear()
    pieces, _ = model.run(x)
    torch.testing.assert_close(pieces.detach(), expected, **TOLERANCE)
    assert_cut(small_pieces, core in CUT_IN_TRAINING)
    for mode in (False, True):
        model.train(mode)
        small_pieces.clear()
        with torch.inference_mode():
            logits, state = chunked(model, x)
        assert_cut(small_pieces, core in CUT_IN_INFERENCE)
        torch.testing.assert_close(logits, expected, **TOLERANCE)
        for carried, direct in zip(tensors(state), expected_state, strict=True):
            torch.testing.assert_close(carried, direct, **TOLERANCE)


def drawn_bits(key: tuple, num: int, total: int) -> torch.Tensor:
    """The bits evaluation draws from ``key``: chunk by chunk, as ``parity_lab.evaluate`` does."""
    generator = key_generator(*key)
    return torch.cat(
        [
            torch.randint(0, 2, (num, min(CHUNK, total - start)), generator=generator,
                          dtype=evaluate.BITS)
            for start in range(0, total, CHUNK)
        ],
        dim=1,
    )  # fmt: skip


def training_path_right(model: ParityRNN, bits: torch.Tensor, encoding: str) -> torch.Tensor:
    """Whether the training path's prediction after each prefix is its parity (num, total)."""
    with torch.enable_grad():
        logits, _ = model.run(encode(bits, torch.full((len(bits),), bits.shape[1]), encoding))
    assert logits.abs().min() > 1e-4  # no prediction that rounding alone could flip
    return (logits > 0).long() == bits.long().cumsum(1).remainder(2)


@pytest.mark.parametrize(
    "model_name", ["linear_rnn_signed", "lstm_manual", "mamba_signed", "slstm", "transformer"]
)
def test_evaluation_scores_the_training_paths_predictions(model_name: str, small_pieces) -> None:
    """``accuracy_by_length`` and ``accuracy_at_length``, reading 40 bits in chunks of 16
    through cores cut in pieces of 5, give the accuracies of the training path's predictions
    on the same strings, at every length, chunk boundaries included."""
    model, encoding = build(model_name), "bit"
    lengths = [1, 2, 5, 15, 16, 17, 32, 33, 39, 40]
    right = training_path_right(model, drawn_bits((3, "curve"), NUM, STEPS), encoding)
    curve = evaluate.accuracy_by_length(model, lengths, NUM, 3, encoding, chunk_len=CHUNK)
    assert curve == {n: right[:, n - 1].float().mean().item() for n in lengths}
    assert min(curve.values()) > 0.2 and max(curve.values()) < 1.0  # random, not constant
    right = training_path_right(model, drawn_bits((3, "long", STEPS), NUM, STEPS), encoding)
    accuracy = evaluate.accuracy_at_length(model, STEPS, NUM, 3, encoding, chunk_len=CHUNK)
    assert accuracy == right[:, -1].float().mean().item()
