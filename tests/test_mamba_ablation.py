"""The Mamba ablation's switches do what the docs say, and its stored steps are cumulative."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from parity_lab.models.mamba import Mamba
from tests.conftest import compose_config


def by_hand(model: Mamba, x: torch.Tensor) -> torch.Tensor:
    """One layer of a Mamba with ``selective: false`` and ``skip: false``, written out from its
    equations: ``h_t = a_t h_{t-1} + dt_t B u_t`` with one ``B`` and ``C`` for every step, and
    ``y_t = C . h_t`` without a ``D`` term; with or without the norm and residual."""
    layer = model.layers[0]
    mixer = layer.mixer
    e = model.embedding(x)
    read = layer.norm(e) if layer.residual else e
    u, z = mixer.in_proj(read).chunk(2, dim=-1)
    u = F.silu(mixer.conv1d.bias + u * mixer.conv1d.weight[:, 0, 0])  # kernel 1
    dt = F.softplus(mixer.dt_proj(mixer.x_proj(u)))  # (batch, time, inner)
    A = -torch.exp(mixer.A_log)  # (inner, d_state)
    h = x.new_zeros(x.shape[0], mixer.inner, mixer.d_state)
    ys = []
    for t in range(x.shape[1]):
        a = 2 * torch.exp(dt[:, t, :, None] * A) - 1
        h = a * h + (dt[:, t] * u[:, t])[..., None] * mixer.B
        ys.append(h @ mixer.C)
    out = mixer.out_proj(torch.stack(ys, dim=1) * F.silu(z))
    return e + out if layer.residual else out


@pytest.mark.parametrize("residual", [True, False])
def test_fixed_b_and_c_without_skip_follow_their_equations(residual: bool) -> None:
    torch.manual_seed(0)
    model = Mamba(2, 8, 1, eigenvalues="signed", d_state=3, selective=False, skip=False,
                  residual=residual)  # fmt: skip
    with torch.no_grad():  # off the initial values, so every term counts
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    mixer = model.layers[0].mixer
    assert mixer.x_proj.out_features == mixer.dt_rank  # B and C are not projected from the input
    assert "layers.0.mixer.D" not in dict(model.named_parameters())
    assert ("layers.0.norm.weight" in model.state_dict()) == residual
    bits = torch.randint(0, 2, (4, 13))
    x = torch.stack([bits, 1 - bits], dim=-1).float()
    expected = by_hand(model.double(), x.double())
    torch.testing.assert_close(model(x.double())[0], expected, atol=1e-12, rtol=1e-12)
    # the C kernel (float32) computes the same model, outputs and gradients
    fast = model.float()
    y = fast(x)[0]
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    kernel_grads = {name: p.grad.clone() for name, p in fast.named_parameters()}
    reference = model.double()
    reference.zero_grad()
    (by_hand(reference, x.double()) * weights.double()).sum().backward()
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(
            kernel_grads[name].double(), parameter.grad, atol=1e-3, rtol=1e-3, msg=name
        )


def test_the_switches_on_are_the_published_block() -> None:
    """All three switches on (their defaults) give the same parameters, draws and outputs."""
    torch.manual_seed(3)
    default = Mamba(2, 8, 1, eigenvalues="signed")
    torch.manual_seed(3)
    explicit = Mamba(2, 8, 1, eigenvalues="signed", selective=True, skip=True, residual=True)
    for (name, a), (_, b) in zip(
        default.state_dict().items(), explicit.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


STEPS = {  # what each stored step changes, on top of the steps before it
    1: {"model.d_state": 1},
    2: {"model.selective": False},
    3: {"model.skip": False},
    4: {"model.residual": False},
    5: {"model.head": "logit", "loss": "builtin"},
}


def test_each_stored_step_adds_one_change_to_the_published_signed_mamba() -> None:
    base = compose_config("experiment=state_tracking", "model=mamba_signed")
    expected = OmegaConf.to_container(base)
    for step, changes in STEPS.items():
        for key, value in changes.items():
            if key == "loss":  # a group choice: the whole loss config
                expected["loss"] = OmegaConf.to_container(compose_config(f"loss={value}").loss)
            else:
                section, name = key.split(".")
                expected[section][name] = value
        composed = OmegaConf.to_container(compose_config(f"experiment=mamba_ablation_{step}"))
        assert composed == expected, f"mamba_ablation_{step}"
