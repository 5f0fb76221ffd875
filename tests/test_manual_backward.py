"""The hand-written backward through time, the LSTM's C kernel and the backward derived from a
lone ``step`` all give torch's gradients."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from parity_lab.models import ManualGRU, ManualLSTM, ManualRNN, manual, native
from parity_lab.models.manual import BackpropThroughTime, ManualRecurrent

TWINS = [(ManualRNN, torch.nn.RNN), (ManualLSTM, torch.nn.LSTM), (ManualGRU, torch.nn.GRU)]


def initial_state(cell: torch.nn.Module, num_layers: int, batch: int) -> torch.Tensor | tuple:
    shape = (num_layers, batch, cell.hidden_size)
    states = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    return tuple(states) if isinstance(cell, ManualLSTM | torch.nn.LSTM) else states[0]


def gradients(core: torch.nn.Module, x: torch.Tensor, state: torch.Tensor | tuple) -> dict:
    """Gradients of a loss reading every output and the final state, by parameter/input name."""
    outputs, final = core(x, state)
    finals = final if isinstance(final, tuple) else (final,)
    weights = torch.linspace(-1, 1, outputs.numel(), dtype=outputs.dtype).view_as(outputs)
    loss = (outputs * weights).sum() + sum((f**2).sum() for f in finals)
    states = state if isinstance(state, tuple) else (state,)
    names = [name for name, _ in core.named_parameters()] + ["x"] + ["state"] * len(states)
    tensors = [*core.parameters(), x, *states]
    grads = torch.autograd.grad(loss, tensors)
    return {f"{n}{i}": g for i, (n, g) in enumerate(zip(names, grads, strict=True))}


@pytest.mark.parametrize(("manual", "builtin"), TWINS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_manual_gradients_equal_builtin_gradients(manual, builtin, num_layers: int) -> None:
    assert_builtin_gradients(manual, builtin, num_layers)


def assert_builtin_gradients(cell_type, builtin, num_layers: int) -> torch.nn.Module:
    """A ``cell_type`` core holding ``builtin``'s weights gives its gradients (float64); returns
    the core."""
    torch.manual_seed(0)
    reference = builtin(2, 5, num_layers, batch_first=True).double()
    cell = cell_type(2, 5, num_layers, batch_first=True).double()
    cell.load_state_dict(reference.state_dict())
    x = torch.randn(7, 11, 2, dtype=torch.float64, requires_grad=True)
    state = initial_state(cell, num_layers, 7)
    expected, actual = gradients(reference, x, state), gradients(cell, x, state)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)
    return cell


@pytest.mark.parametrize("manual", [m for m, _ in TWINS])
def test_hand_written_backward_passes_gradcheck(manual) -> None:
    """Checked against finite differences, independently of torch's built-in cells."""
    torch.manual_seed(0)
    cell = manual(2, 3).double()
    x_proj = torch.randn(4, 3, cell.num_gates * 3, dtype=torch.float64, requires_grad=True)
    state = [
        torch.randn(3, 3, dtype=torch.float64, requires_grad=True) for _ in range(cell.state_size)
    ]
    assert torch.autograd.gradcheck(
        lambda x_proj, weight_hh, bias_hh, *state: BackpropThroughTime.apply(
            cell, x_proj, weight_hh, bias_hh, *state
        ),
        (x_proj, cell.weight_hh_l0, cell.bias_hh_l0, *state),
    )


@pytest.mark.parametrize("manual", [m for m, _ in TWINS])
def test_inference_path_equals_training_path(manual) -> None:
    """Without gradients the cells skip the saving loop; the outputs must not change."""
    torch.manual_seed(0)
    core = manual(1, 4, 2)
    x = torch.randint(0, 2, (3, 6, 1)).float()
    with_grad, _ = core(x)
    with torch.no_grad():
        without_grad, _ = core(x)
    torch.testing.assert_close(with_grad.detach(), without_grad, atol=0, rtol=0)


class StepOnlyLSTM(ManualLSTM):
    """ManualLSTM as a new cell is written: ``step`` alone."""

    step_backward = ManualRecurrent.step_backward


class HalfMemoryLSTM(ManualLSTM):
    """A subclass that changes ``step`` only: half the cell state is forgotten before each step.
    It inherits a ``step_backward`` (and a C kernel) of other equations."""

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        h, c = state
        return super().step(x_proj, (h, 0.5 * c), weight_hh, bias_hh, saved)


class PyTorchLSTM(ManualLSTM):
    """ManualLSTM without its C kernel."""

    def native_layer(self, *_):
        return None


def float32_twins(hidden: int, num_layers: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    kernel, reference = ManualLSTM(2, hidden, num_layers), PyTorchLSTM(2, hidden, num_layers)
    reference.load_state_dict(kernel.state_dict())
    return kernel, reference


@pytest.mark.parametrize(("hidden", "num_layers"), [(16, 1), (3, 2)])
def test_lstm_kernel_equals_the_pytorch_step(hidden: int, num_layers: int) -> None:
    """The C kernel (float32) gives the Python equations' outputs, final state and gradients."""
    if native.load("lstm", hidden) is None:
        pytest.skip("no C compiler")
    kernel, reference = float32_twins(hidden, num_layers)
    x = torch.randn(5, 9, 2, requires_grad=True)
    state = tuple(torch.randn(num_layers, 5, hidden, requires_grad=True) for _ in range(2))
    expected, actual = gradients(reference, x, state), gradients(kernel, x, state)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the inference path keeps two cell states, not all of them
        (out_ref, final_ref), (out, final) = reference(x, state), kernel(x, state)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-6, rtol=1e-5)


def test_lstm_kernel_runs_when_it_applies(monkeypatch) -> None:
    """Float32 on the CPU goes through the kernel; float64, a subclass without its own
    ``step_backward`` and a subclass that changes ``step`` only run ``step``: outputs and
    gradients are then those of their own equations, with and without gradients."""
    if native.load("lstm", 4) is None:
        pytest.skip("no C compiler")
    calls, checks = [], []
    for name in ("lstm_inference", "lstm_training"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real: calls.append(a) or real(*a))
    check = manual.kernel_difference  # runs the kernel once on its test input: not a use
    monkeypatch.setattr(manual, "kernel_difference", lambda c: checks.append(c) or check(c))

    def kernel_runs() -> int:
        return len(calls) - len(checks)

    ManualLSTM(1, 4)(torch.zeros(2, 3, 1))
    with torch.no_grad():
        ManualLSTM(1, 4)(torch.zeros(2, 3, 1))
    assert kernel_runs() == 2
    ManualLSTM(1, 4).double()(torch.zeros(2, 3, 1, dtype=torch.float64))
    StepOnlyLSTM(1, 4)(torch.zeros(2, 3, 1))
    assert kernel_runs() == 2
    torch.manual_seed(0)
    cell = HalfMemoryLSTM(1, 4)
    x = torch.randn(2, 6, 1)
    outputs, (h, c) = cell(x)
    with torch.no_grad():
        inference, _ = cell(x)
    assert kernel_runs() == 2  # never the kernel: it computes ManualLSTM's equations
    # the reference: its step, unrolled by hand, differentiated by autograd
    x_proj = torch.nn.functional.linear(x.transpose(0, 1), cell.weight_ih_l0, cell.bias_ih_l0)
    state, expected = (torch.zeros(2, 4), torch.zeros(2, 4)), []
    for x_t in x_proj:
        out, state = cell.step(x_t, state, cell.weight_hh_l0, cell.bias_hh_l0)
        expected.append(out)
    expected = torch.stack(expected, dim=1)
    torch.testing.assert_close(outputs, expected)
    torch.testing.assert_close(inference, expected.detach())
    parent = ManualLSTM(1, 4)
    parent.load_state_dict(cell.state_dict())
    assert not torch.allclose(expected, parent(x)[0], atol=1e-3)  # other equations than its parent

    def loss(out: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return (out * weights).sum() + (final**2).sum()

    grads = torch.autograd.grad(loss(outputs, c), list(cell.parameters()))
    reference = torch.autograd.grad(loss(expected, state[1]), list(cell.parameters()))
    for grad, ref in zip(grads, reference, strict=True):
        torch.testing.assert_close(grad, ref)


def test_kernel_builds_are_keyed_by_their_source(monkeypatch, tmp_path) -> None:
    """A cached build is found again unchanged; an edited kernel source, or an edited header
    beside it, builds anew, so no stale library outlives the code it was built from."""
    if native.load("lstm", 4) is None:
        pytest.skip("no C compiler")
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    source = kernels / "lstm.c"
    source.write_text((native.KERNELS / "lstm.c").read_text())
    monkeypatch.setattr(native, "KERNELS", kernels)
    monkeypatch.setenv("PARITY_LAB_CACHE", str(tmp_path / "cache"))
    first = native.build("lstm", 2)
    built = first.stat().st_mtime_ns
    assert native.build("lstm", 2) == first and first.stat().st_mtime_ns == built
    source.write_text(source.read_text() + "\n/* an edit */\n")
    second = native.build("lstm", 2)
    assert second != first and native.cached(second) and native.cached(first)
    (kernels / "fast_math.h").write_text("/* a header the kernels include, edited */\n")
    third = native.build("lstm", 2)
    assert third not in (first, second) and native.cached(third)  # and by the headers
    assert native.build("lstm", 3) not in (first, second, third)  # and by hidden size


def test_loading_the_kernels_leaves_subnormal_floats_alone() -> None:
    """A -ffast-math shared library linked with -ffast-math sets flush-to-zero for the whole
    process when loaded (GCC's crtfastmath.o): PyTorch's float32 results would then depend on
    whether a kernel had been loaded. The kernels are linked without it, and those that flush
    denormals (Mamba's scan, the sLSTM's cell) restore the caller's setting on return."""
    code = (
        "import torch\n"
        "from parity_lab.models import deltanet_published, mamba, native, xlstm_published\n"
        "assert float(torch.tensor(1e-39) * 1) > 0\n"
        "libraries = [native.load('lstm', 4), mamba.scan_library(16),\n"
        "             xlstm_published.slstm_library(16), deltanet_published.delta_library(4)]\n"
        "assert all(library is not None for library in libraries)\n"
        "assert float(torch.tensor(1e-39) * 1) > 0, 'loading a kernel set flush-to-zero'\n"
        "from parity_lab.models import Mamba, SLSTMPublished\n"  # kernels flush in their calls
        "x = torch.rand(2, 5, 1)\n"
        "for model in (Mamba(1, 16), SLSTMPublished(1, 16)):\n"
        "    model(x, answers=torch.tensor([4, 2]))[0].sum().backward()\n"
        "assert float(torch.tensor(1e-39) * 1) > 0, 'a kernel call left flush-to-zero set'\n"
    )
    if native.load("lstm", 4) is None:
        pytest.skip("no C compiler")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PARITY_LAB_CACHE", str(tmp_path))
    native.kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the C kernel lstm.c"):
            outputs, _ = ManualLSTM(1, 7)(torch.zeros(2, 3, 1))
        assert outputs.shape == (2, 3, 7)
    finally:
        native.kernel.cache_clear()


@pytest.mark.parametrize(("step_only", "builtin"), [(StepOnlyLSTM, torch.nn.LSTM)])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_derived_backward_gives_builtin_gradients(step_only, builtin, num_layers: int) -> None:
    """A cell with only ``step`` trains through a backward traced from it: torch's gradients."""
    cell = assert_builtin_gradients(step_only, builtin, num_layers)
    derived = [d for d in manual._derived[cell].values()]
    assert len(derived) == 1  # one trace per input signature, shared by the layers
    assert all(d is not None and d.deferred for d in derived)  # weight gradients in one matmul


def test_step_reading_its_own_parameter_is_not_traced() -> None:
    """A parameter that ``step`` reads from ``self`` would be a constant in a trace: such a cell
    stays with autograd, and its gradient is still right."""

    class ScaledRNN(ManualRNN):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
            h, _ = super().step(x_proj * self.scale, state, weight_hh, bias_hh)
            return h, (h,)

    step_backward = ManualRecurrent.step_backward
    ScaledRNN.step_backward = step_backward
    cell = ScaledRNN(1, 3).double()
    x = torch.randn(2, 4, 1, dtype=torch.float64)
    cell(x)[0].sum().backward()
    assert manual._derived[cell] == {next(iter(manual._derived[cell])): None}
    assert cell.scale.grad is not None and cell.scale.grad != 0
    assert torch.autograd.gradcheck(
        lambda s: ScaledRNN.forward(cell, x * s)[0],
        torch.ones(1, dtype=torch.float64, requires_grad=True),
    )


def test_untraceable_step_warns_and_uses_autograd() -> None:
    class BranchingRNN(ManualRNN):
        step_backward = ManualRecurrent.step_backward

        def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
            h, new = super().step(x_proj, state, weight_hh, bias_hh)
            if bool(h.sum() > 1e9):  # data-dependent Python: no graph can hold it
                h = h * 0
            return h, (h,)

    torch.manual_seed(0)
    cell, reference = BranchingRNN(1, 3), ManualRNN(1, 3)
    reference.load_state_dict(cell.state_dict())
    x = torch.randn(2, 4, 1)
    with pytest.warns(UserWarning, match="could not derive a backward from step"):
        cell(x)[0].sum().backward()
    reference(x)[0].sum().backward()
    torch.testing.assert_close(cell.weight_hh_l0.grad, reference.weight_hh_l0.grad)


@pytest.mark.parametrize("cell", [ManualLSTM, ManualGRU])
def test_long_inference_in_blocks_equals_one_pass(cell, monkeypatch) -> None:
    """Without gradients a long sequence runs in blocks of time, the state carried across."""
    torch.manual_seed(0)
    core = cell(1, 4, 2)
    x = torch.randint(0, 2, (3, 10, 1)).float()
    with torch.no_grad():
        whole, whole_state = core(x)
        monkeypatch.setattr(manual, "INFERENCE_BLOCK", 3)
        blocks, blocks_state = core(x)
    torch.testing.assert_close(blocks, whole, atol=1e-6, rtol=1e-6)  # matmul sizes differ
    torch.testing.assert_close(blocks_state, whole_state, atol=1e-6, rtol=1e-6)


def test_derived_step_compiles_after_enough_steps(monkeypatch) -> None:
    """After ``COMPILE_AFTER`` time steps the derived graphs go to inductor, decomposed (here a
    stub stands in for inductor's seconds of C++ compilation), and the gradients stay torch's."""
    import torch._inductor.compile_fx as inductor

    compiled = []

    def stub(graph, inputs):
        compiled.append(graph)
        return lambda args: graph(*args)

    monkeypatch.setattr(inductor, "compile_fx_inner", stub)
    monkeypatch.setattr(manual, "COMPILE_AFTER", 20)
    torch.manual_seed(0)
    reference = torch.nn.LSTM(2, 5, batch_first=True).double()
    cell = StepOnlyLSTM(2, 5).double()
    cell.load_state_dict(reference.state_dict())
    x = torch.randn(7, 11, 2, dtype=torch.float64, requires_grad=True)
    state = initial_state(cell, 1, 7)
    gradients(cell, x, state)  # 11 steps: still eager
    assert compiled == []
    expected, actual = gradients(reference, x, state), gradients(cell, x, state)  # 22: compiled
    assert len(compiled) == 2  # forward and backward, once
    (derived,) = manual._derived[cell].values()
    assert derived.compiled and derived.deferred
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)
    gradients(cell, x, state)
    assert len(compiled) == 2


def test_failed_compilation_warns_and_stays_eager(monkeypatch) -> None:
    import torch._inductor.compile_fx as inductor

    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(inductor, "compile_fx_inner", broken)
    monkeypatch.setattr(manual, "COMPILE_AFTER", 0)
    cell = StepOnlyLSTM(1, 3)
    with pytest.warns(UserWarning, match="could not compile its derived step"):
        cell(torch.randn(2, 4, 1))[0].sum().backward()
    assert cell.weight_hh_l0.grad is not None
