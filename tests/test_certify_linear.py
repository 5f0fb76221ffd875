"""The proof for the one-layer linear RNN (parity_lab.certify_linear) and its training recipe
(experiment=certified_linear: model.input_bias=false and the transition saturation penalty)."""

from __future__ import annotations

import pytest
import torch

from parity_lab.certify import certify
from parity_lab.certify_linear import bit_values, contraction_radius, linear_proof
from parity_lab.compact import expand
from parity_lab.config import validate
from parity_lab.data import encode
from parity_lab.models import LinearRNN, ParityRNN
from parity_lab.models.handset import handset_linear_rnn
from parity_lab.models.linear_rnn import SATURATED_LOG_DECAY
from parity_lab.train import train
from parity_lab.worst_case import first_wrong_structured, worst_case


def run_bits(model: ParityRNN, bits: str) -> int:
    tensor = torch.tensor([[int(b) for b in bits]])
    logits, _ = model.run(encode(tensor, torch.tensor([len(bits)]), "bit"))
    return int(logits[0, -1] > 0)


def with_contracting_units(seed: int = 0, extra: int = 3) -> ParityRNN:
    """The hand-set parity unit, plus ``extra`` random units that contract on both bits and feed
    the readout a little: the proof has to bound them, for every length."""
    source = handset_linear_rnn()
    model = ParityRNN(LinearRNN, input_size=1, hidden_size=1 + extra, eigenvalues="signed")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        layer, hand = model.rnn.layers[0], source.rnn.layers[0]
        n = 1 + extra
        for part in range(3):  # rows: dt, b, gate; the parity unit is unit 0 of each part
            layer.in_proj.weight[part * n] = hand.in_proj.weight[part]
            layer.in_proj.bias[part * n] = hand.in_proj.bias[part]
        layer.A_log.copy_(torch.cat([hand.A_log, torch.zeros(extra)]))
        layer.in_proj.bias[1 : 1 + extra] = 0.5  # dt: transitions well inside (-1, 1)
        layer.out_proj.weight[:, 0] = hand.out_proj.weight[0, 0]
        layer.out_proj.weight[0, 1:] = 0.002
        layer.out_proj.bias.zero_()
        model.head.weight.zero_()
        model.head.weight[0, 0] = 1.0
        model.head.bias.copy_(source.head.bias)
    return model


def test_the_hand_set_linear_rnn_certifies_and_is_right_far_beyond() -> None:
    model = handset_linear_rnn()
    verdict = certify(model)
    assert verdict.certified is True and "parity unit 0" in verdict.note, verdict.note
    assert first_wrong_structured(model, 20_000, "bit") is None
    bits = torch.randint(0, 2, (1, 1_000_000), generator=torch.Generator().manual_seed(0))
    logits, _ = model.run(encode(bits, torch.tensor([bits.shape[1]]), "bit"))
    assert (logits[0] > 0).long().equal(torch.cumsum(bits[0], 0).remainder(2))


def test_contracting_units_are_bounded_and_the_proof_holds() -> None:
    model = with_contracting_units()
    proof = linear_proof(model, "bit")
    assert not isinstance(proof, str), proof
    assert proof.parity_units == [0] and proof.holds and (proof.radius[1:] > 0).all()
    assert certify(model).certified is True
    assert worst_case(model, 4096, "bit") is None


@pytest.mark.parametrize("signed", [True, False])
def test_the_bound_contains_every_state_the_scan_computes(signed: bool) -> None:
    """R of the module doc, for random contracting units, against the states the network's own
    scans compute on long strings: the training path, and inference in chunks with the state
    carried. Strings of mostly 0s or 1s push units towards their fixed points."""
    torch.manual_seed(1)
    eigenvalues = "signed" if signed else "positive"
    model = ParityRNN(LinearRNN, input_size=1, hidden_size=6, eigenvalues=eigenvalues)
    with torch.no_grad():
        model.rnn.layers[0].in_proj.bias[:6] = torch.linspace(-3, 1, 6)  # slow and fast units
        model.rnn.layers[0].in_proj.weight[6:12] *= 20  # large inputs b
    values = bit_values(model)
    radius = [contraction_radius(values["a"][:, i], values["b"][:, i]) for i in range(6)]
    assert all(r is not None for r in radius)
    generator = torch.Generator().manual_seed(2)
    for density in (0.02, 0.5, 0.98):
        bits = (torch.rand(3, 5000, generator=generator) < density).float().unsqueeze(-1)
        with torch.enable_grad():
            _, h = model.rnn.layers[0](bits, None)  # every state of the training path
        reached = h.detach().abs().amax(dim=(0, 1))
        state = None
        for chunk in bits.split(700, dim=1):
            with torch.no_grad():
                _, state = model.rnn(chunk, state)
            reached = torch.maximum(reached, state[0].abs().amax(dim=0))
        for unit in range(6):
            assert reached[unit] <= radius[unit]
        assert (reached > 0.05 * torch.tensor(radius)).any()  # the bound is not vacuous


def test_a_parity_unit_takes_exactly_two_values_in_every_scan() -> None:
    model = handset_linear_rnn()
    c = model.rnn.layers[0].in_proj.weight[1, 0].item()
    bits = torch.randint(0, 2, (2, 3001), generator=torch.Generator().manual_seed(3))
    x = bits.float().unsqueeze(-1)
    parity = torch.cumsum(bits, 1).remainder(2).float()
    _, h = model.rnn.layers[0](x, None)
    assert torch.equal(h[..., 0], c * parity)
    with torch.no_grad():
        _, last = model.rnn(x[:, :1000])
        _, last = model.rnn(x[:, 1000:], last)
    assert torch.equal(last[0, :, 0], c * parity[:, -1])


def test_uncovered_linear_rnns_are_undecided_with_the_reason() -> None:
    two = ParityRNN(LinearRNN, input_size=1, hidden_size=2, num_layers=2, eigenvalues="signed")
    assert "more than one layer" in certify(two, probe_len=0).note
    drifting = handset_linear_rnn()
    with torch.no_grad():
        drifting.rnn.layers[0].in_proj.bias[1] = 1e-6  # b(0) != 0: a 0 adds 1e-6, forever
    verdict = certify(drifting, probe_len=0)
    assert verdict.certified is None and "neither a parity unit" in verdict.note
    # and rightly so: it is wrong once the drift crosses the readout
    assert run_bits(drifting, "1" + "0" * 100) == 1
    no_parity = with_contracting_units()
    with torch.no_grad():
        no_parity.rnn.layers[0].in_proj.weight[0] = 0.0  # the parity unit now contracts too:
        no_parity.rnn.layers[0].in_proj.bias[0] = 0.5  # the same a, inside (-1, 1), on both bits
    assert "none holds parity" in linear_proof(no_parity, "bit")


def test_a_readout_the_bound_cannot_vouch_for_is_not_certified() -> None:
    model = with_contracting_units()
    with torch.no_grad():
        model.rnn.layers[0].out_proj.weight[0, 1:] = 500.0  # the contracting units now dominate
    proof = linear_proof(model, "bit")
    assert not isinstance(proof, str) and not proof.holds
    assert certify(model, probe_len=0).certified is not True


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.5])
def test_a_perturbed_linear_rnn_certifies_or_is_shown_wrong(scale: float) -> None:
    generator = torch.Generator().manual_seed(4)
    for seed in range(4):
        model = with_contracting_units(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * p.abs().max() * torch.randn(p.shape, generator=generator))
        verdict = certify(model)
        if verdict.certified is False:
            bits = expand(verdict.counterexample)
            assert run_bits(model, bits) != bits.count("1") % 2
        if verdict.certified is True:
            assert worst_case(model, 20_000, "bit") is None


def test_the_penalty_is_zero_at_the_float32_ends_and_its_gradient_does_not_vanish() -> None:
    model = handset_linear_rnn()
    x = torch.tensor([[[0.0], [1.0]]])
    assert torch.equal(model.rnn.saturation(x), torch.zeros(1, 2, 1))  # a = 1 and -1 exactly
    core = LinearRNN(1, 1, eigenvalues="signed", input_bias=False)
    with torch.no_grad():
        core.layers[0].in_proj.weight.zero_()
        core.layers[0].in_proj.bias[0] = -12.0  # a = 1 - 6e-6: nearly holds
    (gradient,) = torch.autograd.grad(core.saturation(x).sum(), core.layers[0].in_proj.bias)
    assert gradient[0] > 0.01  # a gradient of 1 - a^2 would be ~1e-5 here
    a = core.layers[0].transition(x)[0]
    assert 0 < 1 - a.min() < 1e-4  # and pushing dt down makes it hold: a -> 1
    hold, end = SATURATED_LOG_DECAY["signed"]
    ends = torch.exp(-torch.exp(torch.tensor([hold, end])))  # a at both ends, in float32
    assert ends[0] == 1.0 and 2 * ends[1] - 1 == -1.0


def test_without_an_input_bias_a_zero_bit_adds_exactly_nothing() -> None:
    core = LinearRNN(1, 4, eigenvalues="signed", input_bias=False)
    with torch.no_grad():
        core.layers[0].in_proj.bias.normal_()  # even a bias that was set is not read
    _, b, _ = core.layers[0].transition(torch.zeros(1, 5, 1))
    assert torch.equal(b, torch.zeros(1, 5, 4))
    out, _ = core(torch.ones(1, 3, 1))
    out.sum().backward()  # nor trained: the bias of b gets no gradient
    assert torch.equal(core.layers[0].in_proj.bias.grad[4:8], torch.zeros(4))
    assert core.layers[0].in_proj.bias.grad[:4].abs().sum() > 0


def test_the_stored_recipe_validates_and_its_sweep_runs_the_ablations(make_config) -> None:
    cfg = make_config("experiment=certified_linear")
    validate(cfg)
    assert cfg.model.hidden_size == 1 and cfg.model.input_bias is False
    assert cfg.saturation.weight > 0 and not cfg.eval.stop_when_solved
    with pytest.raises(Exception, match=r"^model.input_bias='no' is invalid"):
        validate(make_config("experiment=certified_linear", "model.input_bias=no"))


def test_the_recipe_certifies_a_trained_linear_rnn(make_config, tmp_path) -> None:
    """experiment=certified_linear as stored (seed 3), its length curve shortened to 2,000 bits.
    Shorter schedules do not close the proof: with the penalty from step 2,500 and 4,000 or
    5,000 steps in all, a(0) ends 2e-6 to 3e-4 short of 1."""
    cfg = make_config("experiment=certified_linear", "seed=3", "eval.curve.max_len=2000")
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["certified"] is True, metrics["certify_note"]
    assert metrics["worst_case_wrong"] is None
