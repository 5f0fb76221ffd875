"""The exactness certificate (parity_lab.certify) and the worst-case strings."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from parity_lab.certify import (
    MERGE_WIDTHS,
    START,
    IntervalCell,
    Proof,
    Search,
    _inside,
    bit_input,
    certify,
    interval_cell,
    predicts_wrong,
    readout_right,
    verify,
)
from parity_lab.compact import expand, run_length
from parity_lab.data import encode
from parity_lab.models import ManualGRU, ManualLSTM, ManualRNN, ParityRNN
from parity_lab.models.handset import handset_gru, handset_lstm, handset_rnn
from parity_lab.worst_case import STREAMS, first_wrong_structured, worst_case
from tests.oracle import ParityOracle, oracle_model

HANDSET = {"lstm": handset_lstm, "gru": handset_gru, "rnn": handset_rnn}


@pytest.fixture(scope="module")
def certified() -> dict:
    return {name: (build(), certify(build())) for name, build in HANDSET.items()}


@pytest.mark.parametrize("name", list(HANDSET))
def test_the_hand_set_networks_certify(certified: dict, name: str) -> None:
    model, verdict = certified[name]
    assert verdict.certified is True, verdict.note
    assert verdict.counterexample is None


def leaky_lstm(forget_bias: float) -> ParityRNN:
    """The hand-set LSTM with a forget gate that is not quite 1 on a 0: its cell decays."""
    model = handset_lstm()
    with torch.no_grad():
        model.rnn.bias_ih_l0[1] = forget_bias  # sigmoid(forget_bias) < 1 in float32
    return model


def run_bits(model: ParityRNN, bits: str) -> int:
    tensor = torch.tensor([[int(b) for b in bits]])
    logits, _ = model.run(encode(tensor, torch.tensor([len(bits)]), "bit"))
    return int(logits[0, -1] > 0)


def test_a_leaky_network_gets_a_real_counterexample() -> None:
    model = leaky_lstm(3.0)
    verdict = certify(model)
    assert verdict.certified is False
    bits = expand(verdict.counterexample)
    assert run_bits(model, bits) != bits.count("1") % 2  # the real network is wrong on it


def test_a_certified_network_is_right_on_long_random_and_structured_strings(
    certified: dict,
) -> None:
    model, _ = certified["lstm"]
    assert first_wrong_structured(model, 20_000, "bit") is None
    bits = torch.randint(0, 2, (1, 200_000), generator=torch.Generator().manual_seed(0))
    logits, _ = model.run(encode(bits, torch.tensor([bits.shape[1]]), "bit"))
    assert (logits[0] > 0).long().equal(torch.cumsum(bits[0], 0).remainder(2))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.5])
def test_a_perturbed_network_certifies_or_is_shown_wrong(scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    for build in HANDSET.values():
        model = build()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * p.abs().max() * torch.randn(p.shape, generator=generator))
        verdict = certify(model, probe_len=0)  # the proof search alone must be sound
        if verdict.certified is False:
            bits = expand(verdict.counterexample)
            assert run_bits(model, bits) != bits.count("1") % 2
        if verdict.certified is True:  # a proof: then no worst-case string may be wrong
            assert worst_case(model, 4096, "bit") is None


CORES = {
    "lstm": (nn.LSTM, ManualLSTM),
    "gru": (nn.GRU, ManualGRU),
    "rnn": (nn.RNN, ManualRNN),
}


@pytest.mark.parametrize("kind", list(CORES))
@pytest.mark.parametrize("layers", [1, 2])
@torch.no_grad()
def test_the_interval_step_contains_the_float32_step(kind: str, layers: int) -> None:
    """A box around a real state maps to a box around the real next state, for both bits, both
    implementations, and states reached by random strings (zero-width boxes and wide ones)."""
    torch.manual_seed(0)
    builtin, manual = CORES[kind]
    model = ParityRNN(builtin, input_size=1, hidden_size=6, num_layers=layers)
    twin = ParityRNN(manual, input_size=1, hidden_size=6, num_layers=layers)
    twin.load_state_dict(model.state_dict())
    bits = torch.randint(0, 2, (64, 30))
    for net in (model, twin):
        cell = interval_cell(net)
        _, state = net.run(encode(bits, torch.full((64,), 30), "bit"))
        for bit in (0, 1):
            x = torch.full((64, 1), bit)
            _, after = net.run(encode(x, torch.full((64,), 1), "bit"), state)
            before_vec, after_vec = state_vectors(state, kind), state_vectors(after, kind)
            for row in range(64):
                point = before_vec[row].double().numpy()
                for radius in (0.0, 1e-3):
                    lo, hi = cell.step((point - radius, point + radius), bit_input(bit, "bit"))
                    real = after_vec[row].double().numpy()
                    assert (lo <= real).all() and (real <= hi).all()


@pytest.mark.parametrize("kind", list(CORES))
@torch.no_grad()
def test_the_interval_logit_contains_the_networks_logit(kind: str) -> None:
    """The readout of a box around a real state contains the real logit: the last layer's ``h``
    is read, in a network of two layers."""
    torch.manual_seed(0)
    model = ParityRNN(CORES[kind][0], input_size=1, hidden_size=6, num_layers=2)
    bits = torch.randint(0, 2, (64, 30))
    logits, state = model.run(encode(bits, torch.full((64,), 30), "bit"))
    cell, points = interval_cell(model), state_vectors(state, kind).double().numpy()
    for point, logit in zip(points, logits[:, -1].double().numpy(), strict=True):
        lo, hi = cell.logit((point, point))
        assert lo[0] <= logit <= hi[0]


def state_vectors(state, kind: str) -> torch.Tensor:
    """(batch, size) in IntervalCell's layout: per layer h (then c for the LSTM)."""
    if kind == "lstm":
        h, c = state
        return torch.cat([torch.cat([h[k], c[k]], dim=1) for k in range(h.shape[0])], dim=1)
    h = state[0] if isinstance(state, tuple) else state
    return torch.cat(list(h.unbind(0)), dim=1)


def rnn_with_a_positive_start() -> ParityRNN:
    """The hand-set RNN plus a third unit that is 0 at the start and 1 after any bit; the head
    reads it so that the start state's logit is positive (+10) and every other logit is as
    before. Trained networks are like this: the empty string is never scored."""
    k, offset = 120.0, 70.0
    model = ParityRNN(nn.RNN, input_size=1, hidden_size=3)
    weights = {
        "rnn.weight_ih_l0": [[k], [k], [0.0]],
        "rnn.weight_hh_l0": [[k / 2, -k / 2, 0.0], [k / 2, -k / 2, 0.0], [0.0, 0.0, 0.0]],
        "rnn.bias_ih_l0": [-k / 2, -3 * k / 2, k],
        "rnn.bias_hh_l0": [0.0, 0.0, 0.0],
        "head.weight": [[k / 2, -k / 2, -offset]],
        "head.bias": [-k / 2 + offset],
    }
    model.load_state_dict({key: torch.tensor(value) for key, value in weights.items()})
    return model


def test_the_start_state_is_not_read_out() -> None:
    model = rnn_with_a_positive_start()
    assert model.head(torch.zeros(3)).item() > 0  # the start state is on the "odd" side
    assert first_wrong_structured(model, 2_000, "bit") is None  # yet every string is right
    verdict = certify(model)
    assert verdict.certified is True, verdict.note


def test_verify_rejects_a_tampered_proof() -> None:
    cell = interval_cell(handset_gru())
    boxes = [(np.array([-1e-30]), np.array([1e-30]))]
    proof = Proof(np.array([b[0] for b in boxes]), np.array([b[1] for b in boxes]), np.array([0]))
    assert not verify(cell, proof, "bit")  # not closed: a 1 leaves the only box


def resetting_relu() -> ParityRNN:
    """One ReLU unit, ``u' = relu(bit - 2 u)``, read as odd when ``u > 1/4``: a 1 toggles it
    between 0 and 1, but a 0 resets it to 0 (even), so it is wrong on ``10``."""
    model = ParityRNN(functools.partial(nn.RNN, nonlinearity="relu"), input_size=1, hidden_size=1)
    weights = {"weight_ih_l0": 1.0, "weight_hh_l0": -2.0, "bias_ih_l0": 0.0, "bias_hh_l0": 0.0}
    with torch.no_grad():
        for name, value in weights.items():
            getattr(model.rnn, name).fill_(value)
        model.head.weight.fill_(1.0)
        model.head.bias.fill_(-0.25)
    return model


def test_verify_checks_the_images_of_a_zero() -> None:
    """Boxes closed under every 1 and read out right, but a 0 takes the odd box's states to the
    even box: not a proof, and the network is indeed wrong on 10."""
    model = resetting_relu()
    assert predicts_wrong(model, "10", "bit") and not predicts_wrong(model, "1", "bit")
    start, odd, even = ([0.0], [0.0], 0), ([0.5], [1.5], 1), ([0.0], [0.2], 0)
    proof = Proof(*(np.array(part) for part in zip(start, odd, even, strict=True)))
    assert not verify(interval_cell(model), proof, "bit")


def cell_and_proof(model: ParityRNN) -> tuple[IntervalCell, Proof]:
    """The model's interval cell and a proof that ``verify`` accepts."""
    cell = interval_cell(model)
    for width in MERGE_WIDTHS:
        outcome, proof = Search(cell, "bit", width).run()
        if outcome == "proof" and verify(cell, proof, "bit"):
            return cell, proof
    raise AssertionError("no proof found")


def test_verify_needs_each_image_inside_a_box_at_both_ends() -> None:
    """Lowering one box's top below the top of an image it held (its bottom still below the
    image's bottom) breaks the proof."""
    cell, proof = cell_and_proof(handset_lstm())  # its images have width (the RNN's are points)
    images = [
        (cell.step((proof.lower[k], proof.upper[k]), bit_input(bit, "bit")), proof.label[k] ^ bit)
        for k, bit in itertools.product(range(len(proof)), (0, 1))
    ]
    (low, high), label = max(images, key=lambda image: (image[0][1] - image[0][0]).max())
    target, i = _inside(proof, (low, high), int(label)), int(np.argmax(high - low))
    assert high[i] > low[i]
    upper = proof.upper.copy()
    upper[target, i] = (low[i] + high[i]) / 2
    assert not verify(cell, Proof(proof.lower, upper, proof.label), "bit")


def test_verify_needs_every_even_box_wholly_on_the_even_side() -> None:
    """Shift the head so that one even box's logits straddle 0 (every odd box stays positive):
    the proof no longer holds."""
    cell, proof = cell_and_proof(handset_rnn())
    logits = [cell.logit((lo, hi)) for lo, hi in zip(proof.lower, proof.upper, strict=True)]
    even = [k for k in range(1, len(proof)) if proof.label[k] == 0]
    k = max(even, key=lambda k: logits[k][1][0])
    low, high = logits[k][0][0], logits[k][1][0]
    assert low < high <= 0
    shifted = dataclasses.replace(cell, head_bias=cell.head_bias - high + (high - low) / 2)
    assert not verify(shifted, proof, "bit")


def test_verify_reads_out_every_box_but_the_start_box() -> None:
    """A proof of the network whose start state reads odd, plus a copy of the start box right
    after it: closed under both bits (nothing lands in it), but that box is read out, wrongly."""
    cell, proof = cell_and_proof(rnn_with_a_positive_start())
    tampered = Proof(*(np.insert(p, 1, p[START], axis=0) for p in (proof.lower, proof.upper,
                                                                     proof.label)))  # fmt: skip
    assert not readout_right(cell, (tampered.lower[1], tampered.upper[1]), int(tampered.label[1]))
    assert not verify(cell, tampered, "bit")


def test_uncovered_cores_are_undecided_not_proven() -> None:
    from parity_lab.models import DeltaNet

    verdict = certify(ParityRNN(DeltaNet, input_size=1, hidden_size=2), probe_len=0)
    assert verdict.certified is None and "not covered" in verdict.note


def test_worst_case_strings_find_the_leak_random_strings_miss() -> None:
    model = leaky_lstm(6.0)  # forgets a little on every 0: survives short zero runs only
    found = worst_case(model, 4096, "bit")
    assert found is not None and found[1].startswith("1 0^")
    bits = expand(found[1])
    assert len(bits) == found[0] and run_bits(model, bits) != bits.count("1") % 2


def test_worst_case_strings_are_no_longer_than_asked() -> None:
    """``worst_case(model, L)`` tries strings of at most ``L`` bits, the exhaustive ones too: a
    model wrong only on strings of 12 bits is right as far as 11 bits go."""
    model = oracle_model(ParityOracle, 1, 1, wrong_at=12)
    assert worst_case(model, 11, "bit") is None
    assert worst_case(model, 12, "bit") == (12, "0^12")


def test_streams_and_names_agree() -> None:
    for stream in STREAMS:
        bits = "".join(str(int(b)) for b in stream.bits(0, 40))
        for n in (1, 2, 7, 40):
            assert expand(stream.name(n)) == bits[:n]
    assert run_length("1000000") == "1 0^6"
    assert expand("(1 0^3)^2 1") == "100010001"


def test_the_sweep_summary_shows_certificates_and_worst_case_strings() -> None:
    from parity_lab.report import Job, group_jobs, summary_table

    def job(seed: int, certified: bool | None, wrong: str | None, exact: int = 30) -> Job:
        metrics = {
            "val/acc": 1.0,
            "solved": wrong is None,
            "solved_step": None,
            "certified": certified,
            "worst_case_wrong": wrong,
            "certified_counterexample": wrong,
            "test/exact_until": exact,
            "test/exact_until_random": 100000,
            "test/acc_unseen": 1.0,
        }
        return Job(seed, "ok", {"model": "lstm", "seed": str(seed)}, metrics=metrics)

    jobs = [
        job(0, False, "0^99", exact=0),  # a short name for a long string
        job(1, None, None),
        job(2, False, "1 0^14", exact=14),
        job(3, True, None),
    ]
    table = summary_table(group_jobs(jobs, ["model"]))
    row = next(line for line in table.splitlines() if "model=lstm" in line)
    assert "1/2/1" in row  # true / false / none
    assert "`1 0^14`" in row  # the shortest string any seed got wrong, in bits
    assert "| 0, 30, 14, 30 |" in row  # exact up to, per job: 0 is a figure too
    assert "100000, 100000, 100000, 100000" in row  # the random-only figure, per job


def test_metrics_with_certificates_read_back(tmp_path) -> None:
    import json

    from parity_lab.run_files import CorruptResultError, read_metrics

    path = tmp_path / "metrics.json"
    good = {
        "val/acc": 1.0,
        "solved": False,
        "certified": False,
        "worst_case_wrong": "1 0^24",
        "certified_counterexample": "1 0^24",
        "certify_note": "a worst-case string",
    }
    path.write_text(json.dumps(good))
    assert read_metrics(path) == good
    for bad in ({"certified": "yes"}, {"some_key": "text"}):
        path.write_text(json.dumps({**good, **bad}))
        with pytest.raises(CorruptResultError):
            read_metrics(path)


def test_a_long_worst_case_failure_is_a_counterexample_for_an_uncovered_model() -> None:
    """A model the proof does not cover, right on short strings, wrong on `1 0^k` for a long k:
    certified is False with that string, not null."""
    from omegaconf import OmegaConf

    from parity_lab.certify import exactness_metrics
    from parity_lab.models.handset import handset_linear_rnn

    model = handset_linear_rnn()
    with torch.no_grad():
        model.rnn.layers[0].in_proj.bias[0] = -9.0  # a(0) just below 1: the state decays on 0s
    cfg = OmegaConf.create(
        {
            "data": {"encoding": "bit"},
            "eval": {"lengths": [16], "certify": True, "curve": {"max_len": 100_000}},
        }
    )
    out = exactness_metrics(model, cfg, {"test/exact_until": 100_000})
    assert out["worst_case_wrong"] is None  # right on every worst-case string to 16 bits
    assert out["certified"] is False
    bits = expand(out["certified_counterexample"])
    assert len(bits) > 16 and run_bits(model, bits) != bits.count("1") % 2
    # exact up to the string before it, whatever the random strings said
    assert out["test/exact_until"] == len(bits) - 1 and out["test/exact_until_random"] == 100_000


def test_a_random_string_wrong_makes_certified_false_not_null(monkeypatch) -> None:
    """The length curve found a random string wrong, no structured string is wrong and the
    search is undecided: certified is False (a real wrong string is a sound "no"), with no
    string to record and a note that says how to draw it again."""
    from omegaconf import OmegaConf

    import parity_lab.certify as certify_module
    from parity_lab.models.handset import handset_linear_rnn

    monkeypatch.setattr(
        certify_module, "certify", lambda *args, **kwargs: certify_module.Certificate(None)
    )
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "data": {"encoding": "bit"},
            "eval": {"lengths": [16], "certify": True, "curve": {"max_len": 64}},
        }
    )
    curve = {"1": 1.0, "40": 1.0, "50": 0.96875, "64": 1.0}
    out = certify_module.exactness_metrics(
        handset_linear_rnn(), cfg, {"test/exact_until": 40, "length_curve": curve}
    )
    assert out["worst_case_wrong"] is None and out["certified"] is False
    assert out["certified_counterexample"] is None
    assert "random string of 50 bits" in out["certify_note"] and "seed 3" in out["certify_note"]
    right = {"1": 1.0, "64": 1.0, "70": float("nan")}  # right where scored: null stands
    out = certify_module.exactness_metrics(
        handset_linear_rnn(), cfg, {"test/exact_until": 64, "length_curve": right}
    )
    assert out["certified"] is None


def test_a_random_string_wrong_overrules_a_proof_loudly(monkeypatch) -> None:
    """A proof and a real wrong string cannot both stand: the string wins, the note says a
    proof was refuted and a warning is raised (a sound search never gets here)."""
    from omegaconf import OmegaConf

    import parity_lab.certify as certify_module
    from parity_lab.models.handset import handset_linear_rnn

    monkeypatch.setattr(
        certify_module,
        "certify",
        lambda *args, **kwargs: certify_module.Certificate(True, note="4 boxes"),
    )
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "data": {"encoding": "bit"},
            "eval": {"lengths": [16], "certify": True, "curve": {"max_len": 64}},
        }
    )
    metrics = {"test/exact_until": 40, "length_curve": {"40": 1.0, "50": 0.5}}
    with pytest.warns(UserWarning, match="refutes"):
        out = certify_module.exactness_metrics(handset_linear_rnn(), cfg, metrics)
    assert out["certified"] is False and "4 boxes" in out["certify_note"]
