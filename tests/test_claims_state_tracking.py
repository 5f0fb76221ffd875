"""Claims about the state-tracking families, each built so that a plausible silent bug fails it:
the hand-set signed linear RNN is exact at any length (a closed reachable-state proof), a signed
DeltaNet reaches an exact reflection and with it exact parity, the mLSTM's stabiliser keeps
extreme gates finite, every new core read in evaluation chunks with its state carried gives what
one pass gives, and a length a model cannot read keeps a perfect run from counting as solved.
``tests/test_frontier_models.py`` holds the per-step definitions; this file does not repeat
them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from parity_lab.data import encode
from parity_lab.models import MLSTM, SLSTM, CausalTransformer, DeltaNet, LinearRNN, ParityRNN
from parity_lab.models.handset import GAIN, handset_linear_rnn
from parity_lab.train import train

# --- hand-set models: exact at any length, proved --------------------------------------------


def closed_states(model: ParityRNN, start, key: Callable, longest: int) -> set:
    """Every (state, true parity) pair reachable from ``start`` by reading, with the state
    carried, chunks of every bit string of 1..``longest`` bits through ``model.run`` (so through
    the scan's blocks and padding, not only single steps). Asserts, for every chunk from every
    pair, the right answer after each of its bits, and that the set closes small."""
    seen, frontier = {(key(start), 0)}, [(start, 0)]
    chunks = [bits for n in range(1, longest + 1) for bits in itertools.product((0, 1), repeat=n)]
    while frontier:
        state, parity = frontier.pop()
        for bits in chunks:
            x = encode(torch.tensor([bits]), torch.tensor([len(bits)]), "bit")
            logits, after = model.run(x, state)
            running = [(parity + sum(bits[: t + 1])) % 2 for t in range(len(bits))]
            assert (logits[0] > 0).long().tolist() == running, (key(state), parity, bits)
            pair = (key(after), running[-1])
            if pair not in seen:
                seen.add(pair)
                frontier.append((after, running[-1]))
            assert len(seen) <= 4, "reachable states do not close: not a finite automaton"
    return seen


@torch.no_grad()
def test_handset_linear_rnn_is_exact_at_every_length() -> None:
    """A proof, not a sample. Each step's transition is exactly +-1 and its gate exactly the
    gain, and the (state, parity) pairs reachable by chunks of up to 5 bits close on two: state 0
    with even parity, 1 with odd. Every string of any length, in any chunking, is a sequence of
    such chunks, so it ends in one of these pairs, answered right."""
    model = handset_linear_rnn()
    layer = model.rnn.layers[0]
    a, b, gate = layer.transition(torch.tensor([[[0.0], [1.0]]]))
    assert a.flatten().tolist() == [1.0, -1.0] and b.flatten().tolist() == [0.0, 1.0]
    assert torch.equal(nn.functional.silu(gate), torch.full_like(gate, GAIN))
    seen = closed_states(model, None, lambda s: None if s is None else s.item(), longest=5)
    assert seen == {(None, 0), (0.0, 0), (1.0, 1)}


def handset_deltanet(eigenvalues: str) -> ParityRNN:
    """A 1-unit DeltaNet tracking parity when beta can reach 2: the memory ``S`` (1 x 1), key
    and query +1, value 1/2, beta ``2 sigmoid(K (2x - 1))``: 0 on a 0 (``S`` kept), 2 on a 1
    (``S -> -S + 1``, the reflection plus the write). ``S`` is the parity. With beta at most 1
    (positive eigenvalues) a 1 sets ``S`` to 1/2 whatever it was."""
    k = GAIN
    model = ParityRNN(DeltaNet, input_size=1, hidden_size=1, eigenvalues=eigenvalues)
    model.load_state_dict(
        {
            # in_proj rows: q, k, v, gate, beta
            "rnn.layers.0.in_proj.weight": torch.tensor([[0.0], [0.0], [0.0], [0.0], [2 * k]]),
            "rnn.layers.0.in_proj.bias": torch.tensor([1.0, 1.0, 0.5, k, -k]),
            "rnn.layers.0.out_proj.weight": torch.tensor([[1.0]]),
            "rnn.layers.0.out_proj.bias": torch.tensor([0.0]),
            "head.weight": torch.tensor([[1.0]]),
            "head.bias": torch.tensor([-k / 2]),
        }
    )
    return model


@torch.no_grad()
def test_signed_deltanet_reaches_an_exact_reflection_and_exact_parity() -> None:
    """Signed beta reaches 2 exactly, so the transition ``I - beta k k^T`` has eigenvalue exactly
    -1, and the hand-set DeltaNet's reachable (memory, parity) pairs close on two: exact at any
    length. The same weights with positive eigenvalues cannot tell '1' from '11'."""
    layer = handset_deltanet("signed").rnn.layers[0]
    _, k, _, beta, _ = layer.projections(torch.tensor([[[0.0], [1.0]]]))
    assert beta.flatten().tolist() == [0.0, 2.0] and k.flatten().tolist() == [1.0, 1.0]
    key = lambda s: None if s is None else s.item()  # noqa: E731
    seen = closed_states(handset_deltanet("signed"), None, key, longest=3)
    assert seen == {(None, 0), (0.0, 0), (1.0, 1)}
    positive = handset_deltanet("positive")
    logits = positive(torch.ones(1, 2, 1), torch.tensor([2]))
    assert logits[0, 0] == logits[0, 1]  # the same answer to '1' and '11': one is wrong


# --- the mLSTM stabiliser --------------------------------------------------------------------


def test_mlstm_stays_finite_with_extreme_gates() -> None:
    """Input-gate pre-activations of +-500 (exp overflows float32 past 88) and a forget gate near
    0: without the stabiliser the memory and normaliser are inf and h is nan."""
    torch.manual_seed(0)
    core = MLSTM(1, 2)
    with torch.no_grad():
        core.layers[0].in_proj.weight[-2:].fill_(1000.0)  # i~ and f~ = +-500
    pattern = torch.tensor([0.5, -0.5, 0.5, 0.5, -0.5] * 8)
    x = torch.stack([pattern, -pattern]).unsqueeze(2).requires_grad_()
    outputs, state = core(x)
    outputs.sum().backward()
    assert torch.isfinite(outputs).all() and all(torch.isfinite(s).all() for s in state)
    assert torch.isfinite(x.grad).all()
    assert outputs.abs().max() > 1e-3  # not finite merely by being zero


# --- chunked evaluation equals one pass ------------------------------------------------------

NEW_CORES = {
    "linear_rnn": lambda: LinearRNN(2, 4, num_layers=2, eigenvalues="positive"),
    "linear_rnn_signed": lambda: LinearRNN(2, 4, num_layers=2, eigenvalues="signed"),
    "deltanet": lambda: DeltaNet(2, 4, num_layers=2, eigenvalues="positive"),
    "deltanet_signed": lambda: DeltaNet(2, 4, num_layers=2, eigenvalues="signed"),
    "slstm": lambda: SLSTM(2, 4, num_layers=2),
    "mlstm": lambda: MLSTM(2, 4, num_layers=2),
    "transformer": lambda: CausalTransformer(2, 8, num_layers=2, max_len=256),
}


@pytest.mark.parametrize("name", NEW_CORES)
@torch.no_grad()
def test_chunks_with_the_state_carried_equal_one_pass(name: str) -> None:
    """Evaluation reads long strings in chunks of 64 bits with the state carried (the last chunk
    shorter): every output of every chunk, and the final state, equal one pass over 200 bits."""
    torch.manual_seed(0)
    core = NEW_CORES[name]().double().eval()
    bits = torch.randint(0, 2, (3, 200))
    x = encode(bits, torch.full((3,), 200), "pair").double()
    whole, whole_state = core(x)
    pieces, state = [], None
    for chunk in x.split(64, dim=1):
        output, state = core(chunk, state)
        pieces.append(output)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-9, atol=1e-9)
    for carried, direct in zip(
        state if isinstance(state, tuple) else (state,),
        whole_state if isinstance(whole_state, tuple) else (whole_state,),
        strict=True,
    ):
        torch.testing.assert_close(carried, direct, rtol=1e-9, atol=1e-9)


# --- lengths a model cannot read never count as solved ---------------------------------------


def test_a_perfect_run_with_a_skipped_length_is_not_solved(
    make_config, tmp_path: Path, monkeypatch
) -> None:
    """The default LSTM, given a Transformer's limit (``max_len`` 40), solves its readable
    lengths; length 60 is skipped and recorded, and the run is not solved, has no solved_step
    and does not stop early."""
    monkeypatch.setattr(ParityRNN, "max_len", property(lambda self: 40))
    cfg = make_config(
        "eval.lengths=[30,60]",
        "eval.curve.max_len=100",
        "eval.curve.num_strings=32",
        "trainer.max_steps=600",
        "seed=0",
    )
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["val/acc"] == 1.0 and metrics["test/acc_len_30"] == 1.0, metrics
    assert "test/acc_len_60" not in metrics and metrics["test/skipped_lengths"] == [60]
    assert metrics["solved"] is False and metrics["solved_step"] is None
    assert metrics["global_step"] == 600
