"""Hand-written RNN, LSTM and GRU: drop-in twins of ``torch.nn.RNN/LSTM/GRU`` (batch_first).

Each class names and shapes its parameters exactly as torch does (``weight_ih_l0``, ...), follows
torch's gate order and equations, and returns ``(outputs, state)`` in torch's format, so equal
weights give equal logits. A cell is one ``step`` (its equations) and one ``step_backward`` (their
derivative, written by hand); ``ManualRecurrent.forward`` unrolls any cell over time and layers.

Speed: the input projection of a whole sequence is one matmul, hoisted out of the time loop; when
gradients are needed the loop runs inside ``BackpropThroughTime``, an autograd Function whose
backward is the hand-written loop over ``step_backward``. Tiny recurrent models are dominated by
per-operation overhead, and this replaces ~40 autograd nodes per time step by none.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parity_lab.models import native

# Derivatives through an activation, from its output, each one fused kernel:
# sigmoid_grad(grad, s) = grad * s * (1 - s), tanh_grad(grad, t) = grad * (1 - t * t).
sigmoid_grad = torch.ops.aten.sigmoid_backward
tanh_grad = torch.ops.aten.tanh_backward

INFERENCE_BLOCK = 64  # time steps per block without gradients (bench: the fastest of 16..4096)
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # per layer, as torch names them
State = tuple[torch.Tensor, ...]  # one layer's recurrent state: (h,) or, for the LSTM, (h, c)
Saved = tuple[torch.Tensor, ...]  # what one step records for its backward


class ManualRecurrent(nn.Module):
    """Unrolls ``step`` over time and layers; subclasses define the cell."""

    num_gates: int  # rows of weight_ih / weight_hh, in units of hidden_size
    state_size: int = 1  # tensors in one layer's state: 1 (h) or 2 (h, c)

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("hand-written recurrent layers are batch_first only")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        rows = self.num_gates * hidden_size
        for layer in range(num_layers):
            columns = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(rows, columns)))
            self.register_parameter(
                f"weight_hh_l{layer}", nn.Parameter(torch.empty(self.weight_hh_shape()))
            )
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(rows)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(rows)))
        self.reset_parameters()

    def weight_hh_shape(self) -> tuple[int, ...]:
        """Shape of each layer's recurrent weight, which ``step`` receives as ``weight_hh``:
        torch's ``(num_gates * hidden_size, hidden_size)``; a cell may declare another (IndRNN's
        diagonal ``(hidden_size,)``) and keeps the traced backward and its true parameter count."""
        return (self.num_gates * self.hidden_size, self.hidden_size)

    def reset_parameters(self) -> None:
        """torch's initialisation: every weight uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{name}_l{layer}") for name in WEIGHT_NAMES)

    def step(
        self,
        x_proj: torch.Tensor,
        state: State,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        saved: list[Saved] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One time step: projected input ``W_ih x + b_ih`` and state -> (output h, new state).

        Appends to ``saved`` (when given) what ``step_backward`` needs.
        """
        raise NotImplementedError

    def step_backward(
        self,
        grad_h: torch.Tensor,
        grad_state: State,
        saved: Saved,
        weight_hh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Gradient of one ``step``, given the gradient of its output h and of its new state's
        other tensors (the LSTM's c): (d x_proj, d (W_hh h + b_hh), d previous state)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        if not torch.is_grad_enabled() and x.shape[1] > INFERENCE_BLOCK:
            # Long inference (evaluation at a million bits) in blocks of time with the state
            # carried: a block's input projection stays in cache instead of streaming through
            # memory (4096 steps x 512 strings of an LSTM's gates are 0.5 GB).
            outputs = []
            for block in x.split(INFERENCE_BLOCK, dim=1):
                output, state = self(block, state)
                outputs.append(output)
            return torch.cat(outputs, dim=1), state
        batch = x.shape[0]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros,) * self.state_size
        elif self.state_size == 1:
            state = (state,)
        layer_states = list(zip(*(s.unbind(0) for s in state), strict=True))
        # Under torch.compile the loop is traced as plain ops and the compiler derives the backward.
        # A new cell that defines only ``step`` gets a backward derived from it once, by tracing.
        hand_written_backward = (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(p.requires_grad for p in self.parameters())
        )
        x = x.transpose(0, 1)  # time-major inside: each step reads and writes contiguous rows
        for layer in range(self.num_layers):
            weight_ih, weight_hh, bias_ih, bias_hh = self.layer_weights(layer)
            x_proj = torch.nn.functional.linear(x, weight_ih, bias_ih)  # all steps at once
            native = self.native_layer(x_proj, weight_hh, bias_hh, tuple(layer_states[layer]))
            if native is not None:
                x, layer_state = native
            elif hand_written_backward and has_own_backward(self):
                x, *layer_state = BackpropThroughTime.apply(
                    self, x_proj, weight_hh, bias_hh, *layer_states[layer]
                )
            elif hand_written_backward and (
                derived := derive_backward(self, x_proj[0], weight_hh, bias_hh, layer_states[layer])
            ):
                x, *layer_state = DerivedBackpropThroughTime.apply(
                    self, derived, x_proj, weight_hh, bias_hh, *layer_states[layer]
                )
            else:
                x, layer_state = self.unroll(x_proj, tuple(layer_states[layer]), weight_hh, bias_hh)
            layer_states[layer] = tuple(layer_state)
        stacked = tuple(torch.stack(s) for s in zip(*layer_states, strict=True))
        return x.transpose(0, 1), stacked[0] if self.state_size == 1 else stacked

    def native_layer(
        self, x_proj: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State] | None:
        """One layer through a compiled whole-sequence kernel (``native.py``), or None where this
        cell has none or it cannot run; then ``step`` runs, as always."""
        return None

    def unroll(
        self,
        x_proj: torch.Tensor,
        state: State,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        saved: list[Saved] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Run ``step`` over every time step of one layer (time-major): outputs, final state."""
        outputs = []
        for x_t in x_proj.unbind(0):
            h, state = self.step(x_t, state, weight_hh, bias_hh, saved)
            outputs.append(h)
        return torch.stack(outputs), state


def defining_class(cell: ManualRecurrent, name: str) -> type | None:
    """The class whose body defines method ``name`` for ``cell``; None when the instance itself
    holds it (a method patched onto one object)."""
    if name in vars(cell):
        return None
    return next(klass for klass in type(cell).__mro__ if name in vars(klass))


def has_own_backward(cell: ManualRecurrent) -> bool:
    """Whether ``cell.step_backward`` is written for ``cell.step``: defined by the class that
    defines ``step`` or a subclass of it. A subclass that changes only ``step`` inherits a
    ``step_backward`` of other equations, so its backward is derived from its ``step`` instead."""
    if getattr(type(cell).step_backward, "__func__", type(cell).step_backward) is (
        ManualRecurrent.step_backward
    ) and "step_backward" not in vars(cell):
        return False  # none written
    step, backward = defining_class(cell, "step"), defining_class(cell, "step_backward")
    if backward is None:  # patched onto this object: written for whatever step it has
        return True
    return step is not None and issubclass(backward, step)


class BackpropThroughTime(torch.autograd.Function):
    """One layer unrolled over time, with the hand-written backward of its cell.

    ``apply(cell, x_proj, weight_hh, bias_hh, *state) -> (outputs, *final_state)``, time-major.
    The forward loop records each step's intermediates; the backward walks the steps in reverse
    through ``cell.step_backward`` and forms the weight gradients with one matmul over all steps.
    """

    @staticmethod
    def forward(
        ctx: Any,
        cell: ManualRecurrent,
        x_proj: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        *state: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        saved: list[Saved] = []
        outputs, final_state = cell.unroll(x_proj, state, weight_hh, bias_hh, saved)
        # Per-step intermediates live on ctx: neither inputs nor outputs, and one SavedVariable
        # each would cost more than the step's own arithmetic.
        ctx.cell, ctx.steps = cell, saved
        ctx.save_for_backward(weight_hh, outputs, state[0])
        return (outputs, *final_state)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor | None, *grad_final: torch.Tensor | None):
        cell: ManualRecurrent = ctx.cell
        weight_hh, outputs, h0 = ctx.saved_tensors
        # gradient reaching the state after the last step
        grad_state = tuple(torch.zeros_like(h0) if g is None else g for g in grad_final)
        grad_x_proj, grad_hh = [], []
        for t in reversed(range(outputs.shape[0])):
            grad_h = grad_state[0] if grad_outputs is None else grad_state[0] + grad_outputs[t]
            grad_x, grad_pre_hh, grad_state = cell.step_backward(
                grad_h, grad_state[1:], ctx.steps[t], weight_hh
            )
            grad_x_proj.append(grad_x)
            grad_hh.append(grad_pre_hh)
        grad_x_all = torch.stack(grad_x_proj[::-1])
        # (W_hh h + b_hh) is the input projection itself for the RNN and LSTM, not for the GRU
        grad_hh_all = grad_x_all if grad_hh[0] is grad_x_proj[0] else torch.stack(grad_hh[::-1])
        grad_hh_all = grad_hh_all.flatten(0, 1)  # (time * batch, gates)
        h_prev = torch.cat([h0.unsqueeze(0), outputs[:-1]]).flatten(0, 1)
        grad_weight_hh = grad_hh_all.t().mm(h_prev)
        grad_bias_hh = grad_hh_all.sum(0)
        return (None, grad_x_all, grad_weight_hh, grad_bias_hh, *grad_state)


@dataclasses.dataclass
class DerivedStep:
    """One step's forward and backward as plain aten graphs, traced from a cell's ``step``.

    ``forward(x_proj, weight_hh, bias_hh, *state)`` returns the step's outputs, then the tensors its
    backward needs; ``backward(*those, *output gradients)`` returns the gradients of
    ``(x_proj, weight_hh, bias_hh, *state)``. The outputs are ``(h, *new_state)``, or just
    ``new_state`` when the output h is ``new_state[0]`` (every cell here).

    With ``deferred``, the weight gradients are left for one matmul over all steps, as in the
    hand-written backward: instead of ``d weight_hh, d bias_hh`` the backward returns ``G, H, D``
    with ``d weight_hh = G^T H`` and ``d bias_hh`` the sum of D's rows.

    After ``COMPILE_AFTER`` time steps both graphs are compiled to C++ by inductor (once; see
    ``compile_step``): ``steps`` counts them, ``compiled`` says the attempt was made.
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any]
    num_outputs: int
    output_is_state: bool
    deferred: bool
    steps: int = 0
    compiled: bool = False


# Time steps a derived step runs eagerly before its graphs are compiled to C++: compiling takes
# seconds (cached on disk by inductor afterwards) and makes each step about 3x faster, so short
# runs and tests never compile; PARITY_LAB_COMPILE_AFTER=0 compiles at once, -1 never.
COMPILE_AFTER = int(os.environ.get("PARITY_LAB_COMPILE_AFTER", "200000"))

# Per cell and input signature: tracing takes a fraction of a second, once.
_derived: weakref.WeakKeyDictionary[ManualRecurrent, dict[tuple, DerivedStep | None]] = (
    weakref.WeakKeyDictionary()
)


def derive_backward(
    cell: ManualRecurrent,
    x_proj: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor,
    state: State,
) -> DerivedStep | None:
    """``step``'s forward and backward graphs for these shapes (traced on first use), or None
    (with a warning) where the step cannot be traced or reads parameters it is not passed."""
    tensors = (x_proj, weight_hh, bias_hh, *state)
    key = tuple((t.shape, t.dtype, t.device) for t in tensors)
    cache = _derived.setdefault(cell, {})
    if key not in cache:
        own = {f"{name}_l{layer}" for layer in range(cell.num_layers) for name in WEIGHT_NAMES}
        if {name for name, _ in cell.named_parameters()} != own:
            # a parameter the step reads from ``self`` would be traced as a constant: no gradient
            cache[key] = None
            return None
        try:
            cache[key] = DerivedStep(*trace_step(cell, tensors))
        except Exception as error:  # any Python the tracer cannot follow: autograd runs the step
            warnings.warn(
                f"{type(cell).__name__}: could not derive a backward from step ({error}); "
                "autograd differentiates every step instead (slower, same gradients)",
                stacklevel=2,
            )
            cache[key] = None
    return cache[key]


def trace_step(
    cell: ManualRecurrent, tensors: tuple[torch.Tensor, ...], decompositions: dict | None = None
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, int, bool, bool]:
    """Trace ``step`` at these inputs (AOTAutograd, no compiler): ``DerivedStep``'s fields."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import default_partition

    graphs: dict[str, torch.fx.GraphModule] = {}
    layout: dict[str, Any] = {}

    def capture(name: str) -> Callable:
        def compiler(graph: torch.fx.GraphModule, _: Any) -> Callable:
            graphs[name] = without_detach(graph)
            return make_boxed_func(graph)

        return compiler

    def one_step(x_proj, weight_hh, bias_hh, *state):  # noqa: ANN001, ANN202
        h, new_state = cell.step(x_proj, tuple(state), weight_hh, bias_hh)
        layout["output_is_state"] = h is new_state[0]
        outputs = tuple(new_state) if layout["output_is_state"] else (h, *new_state)
        layout["num_outputs"] = len(outputs)
        return outputs

    examples = [t.detach().clone().requires_grad_() for t in tensors]
    traced = aot_function(
        one_step,
        capture("forward"),
        capture("backward"),
        partition_fn=default_partition,
        decompositions=decompositions,
    )
    outputs = traced(*examples)
    torch.autograd.grad(outputs, examples, [torch.ones_like(o) for o in outputs])
    backward, deferred = defer_weight_gradients(graphs["backward"])
    return graphs["forward"], backward, layout["num_outputs"], layout["output_is_state"], deferred


def compile_step(
    derived: DerivedStep, cell: ManualRecurrent, tensors: tuple[torch.Tensor, ...]
) -> None:
    """Replace ``derived``'s graphs by inductor's C++ for them (traced again, decomposed into the
    operations inductor fuses); on any failure warn once and keep the eager graphs."""
    derived.compiled = True
    try:
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        inputs = [t.detach() for t in tensors]
        with torch.enable_grad():  # called from inside an autograd Function's forward
            forward, backward, num_outputs, _, deferred = trace_step(
                cell, tuple(inputs), select_decomp_table()
            )
        with config.patch(compile_threads=1):  # no pool of compiler processes for two graphs
            forward = compile_fx_inner(forward, inputs)
            outputs = forward(list(inputs))
            tangents = [torch.zeros_like(o) for o in outputs[:num_outputs]]
            backward = compile_fx_inner(backward, [*outputs[num_outputs:], *tangents])
    except Exception as error:  # no C++ compiler, or a graph inductor cannot take
        warnings.warn(
            f"{type(cell).__name__}: could not compile its derived step ({error}); it stays "
            "eager (slower, same results)",
            stacklevel=2,
        )
        return
    derived.forward = lambda *args: forward(list(args))
    derived.backward = lambda *args: backward(list(args))
    derived.deferred = deferred


def without_detach(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the graph's ``detach`` calls: no-ops here, where no autograd runs."""
    for node in list(graph.graph.nodes):
        if node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def defer_weight_gradients(graph: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, bool]:
    """Rewrite a step's backward to return the factors of its weight gradients, when they have
    the usual form ``d weight_hh = G^T H`` and ``d bias_hh = sum of D's rows`` (weight_hh used as
    ``h W^T``): summing the steps then takes one matmul instead of one per step."""
    aten = torch.ops.aten

    def transposes(node: Any) -> bool:
        return isinstance(node, torch.fx.Node) and (
            node.target is aten.t.default
            or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])
        )

    def untranspose(node: Any) -> tuple[Any, int]:
        count = 0
        while transposes(node):
            node, count = node.args[0], count + 1
        return node, count

    output = next(n for n in graph.graph.nodes if n.op == "output")
    grads = list(output.args[0])
    product, outer = untranspose(grads[1])
    bias = grads[2]
    if isinstance(bias, torch.fx.Node) and bias.target in (aten.view.default, aten.squeeze.dim):
        bias = bias.args[0]
    if not (
        outer % 2 == 0
        and isinstance(product, torch.fx.Node)
        and product.target is aten.mm.default
        and untranspose(product.args[0])[1] == 1
        and isinstance(bias, torch.fx.Node)
        and bias.target is aten.sum.dim_IntList
        and list(bias.args[1]) == [0]
    ):
        return graph, False
    factors = (untranspose(product.args[0])[0], product.args[1], bias.args[0])
    output.args = (tuple([grads[0], *factors, *grads[3:]]),)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph, True


class DerivedBackpropThroughTime(torch.autograd.Function):
    """One layer unrolled over time through a ``DerivedStep``: ``BackpropThroughTime`` for a
    cell without ``step_backward``. Each step's graph replaces about as many autograd nodes as
    the step has operations; the weight gradients are summed over steps."""

    @staticmethod
    def forward(
        ctx: Any,
        cell: ManualRecurrent,
        derived: DerivedStep,
        x_proj: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        *state: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        derived.steps += x_proj.shape[0]
        if not derived.compiled and 0 <= COMPILE_AFTER <= derived.steps:
            compile_step(derived, cell, (x_proj[0], weight_hh, bias_hh, *state))
        outputs, saved = [], []
        for x_t in x_proj.unbind(0):
            result = derived.forward(x_t, weight_hh, bias_hh, *state)
            new, saved_t = result[: derived.num_outputs], result[derived.num_outputs :]
            state = tuple(new) if derived.output_is_state else tuple(new[1:])
            outputs.append(new[0])
            saved.append(saved_t)
        ctx.derived, ctx.steps = derived, saved
        ctx.save_for_backward(weight_hh, bias_hh, *state)
        return (torch.stack(outputs), *state)

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor | None, *grad_final: torch.Tensor | None):
        derived: DerivedStep = ctx.derived
        weight_hh, bias_hh, *final = ctx.saved_tensors
        grad_state = [
            torch.zeros_like(s) if g is None else g for s, g in zip(final, grad_final, strict=True)
        ]
        grad_weight_hh, grad_bias_hh = torch.zeros_like(weight_hh), torch.zeros_like(bias_hh)
        grad_x_proj, factors = [], []
        for t in reversed(range(len(ctx.steps))):
            grad_h = None if grad_outputs is None else grad_outputs[t]
            if derived.output_is_state:
                first = grad_state[0] if grad_h is None else grad_state[0] + grad_h
                tangents = [first, *grad_state[1:]]
            else:
                tangents = [torch.zeros_like(grad_state[0]) if grad_h is None else grad_h]
                tangents += grad_state
            grads = derived.backward(*ctx.steps[t], *tangents)
            grad_x_proj.append(grads[0])
            if derived.deferred:
                factors.append(grads[1:4])
                grad_state = grads[4:]
            else:
                grad_weight_hh += grads[1]
                grad_bias_hh += grads[2]
                grad_state = grads[3:]
        grad_x_all = torch.stack(grad_x_proj[::-1])
        if factors:
            factors.reverse()
            left, right, rows = (
                # the factors are often d x_proj itself (the step adds W_hh h to x_proj)
                grad_x_all.flatten(0, 1) if f[0] is grad_x_proj[-1] else torch.cat(f)
                for f in zip(*factors, strict=True)
            )
            grad_weight_hh, grad_bias_hh = left.t().mm(right), rows.sum(0)
        return (None, None, grad_x_all, grad_weight_hh, grad_bias_hh, *grad_state)


class ManualRNN(ManualRecurrent):
    """Elman RNN: h = tanh(W_ih x + b_ih + W_hh h + b_hh)."""

    num_gates = 1

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        (h,) = state
        h = torch.tanh(x_proj + torch.addmm(bias_hh, h, weight_hh.t()))
        if saved is not None:
            saved.append((h,))
        return h, (h,)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        (h,) = saved
        grad_pre = tanh_grad(grad_h, h)
        return grad_pre, grad_pre, (grad_pre.mm(weight_hh),)


class ManualLSTM(ManualRecurrent):
    """LSTM with torch's gate order (input, forget, cell, output)."""

    num_gates = 4
    state_size = 2

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        h, c_prev = state
        gates = x_proj + torch.addmm(bias_hh, h, weight_hh.t())
        sig = torch.sigmoid(gates)  # one kernel for the input, forget and output gates ...
        i, f, _, o = sig.chunk(4, dim=1)
        g = torch.tanh(gates[:, 2 * self.hidden_size : 3 * self.hidden_size])  # ... tanh for g
        c = f * c_prev + i * g
        tanh_c = torch.tanh(c)
        h = o * tanh_c
        if saved is not None:  # what each gate multiplies: i*g, f*c_prev, g*i, o*tanh(c)
            saved.append((sig, g, torch.cat([g, c_prev, i, tanh_c], dim=1), f, o, tanh_c))
        return h, (h, c)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        sig, g, multiplies, f, o, tanh_c = saved
        (grad_c,) = grad_state
        grad_c = grad_c + tanh_grad(grad_h * o, tanh_c)
        grad_gates = torch.cat([grad_c, grad_c, grad_c, grad_h], dim=1) * multiplies
        grad_pre = sigmoid_grad(grad_gates, sig)
        cell = slice(2 * self.hidden_size, 3 * self.hidden_size)
        grad_pre[:, cell] = tanh_grad(grad_gates[:, cell], g)
        return grad_pre, grad_pre, (grad_pre.mm(weight_hh), grad_c * f)

    def native_layer(self, x_proj, weight_hh, bias_hh, state):
        # The kernel runs only where it computes what this cell's step and step_backward do.
        if not native.lstm_applies(x_proj, weight_hh, bias_hh, *state) or not kernel_agrees(self):
            return None
        tensors = (x_proj, weight_hh, bias_hh, *state)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outputs, h, c = native.lstm_training(*tensors)
        else:
            outputs, h, c = native.lstm_inference(*tensors)
        return outputs, (h, c)


# (cell class, its step, its step_backward, hidden size) -> whether the C kernel agrees with them
_kernel_agrees: dict[tuple[Any, ...], bool] = {}
KERNEL_CHECK_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}  # float32, the kernel's fast exp


def kernel_agrees(cell: ManualLSTM) -> bool:
    """Whether the C kernel computes what ``cell.step`` and ``cell.step_backward`` compute
    (outputs, final state and every gradient), checked once per process, cell equations and
    hidden size on a small random input. A cell whose equations were edited, patched or
    overridden gets one warning and runs its Python ``step``; a cell without a ``step_backward``
    of its own (``has_own_backward``) runs its ``step``, with a backward derived from it."""
    if not has_own_backward(cell):
        return False
    step, backward = cell.step, cell.step_backward
    key = (type(cell), getattr(step, "__func__", step), getattr(backward, "__func__", backward))
    key += (cell.hidden_size,)
    if key not in _kernel_agrees:
        difference = kernel_difference(cell)
        _kernel_agrees[key] = difference == 0.0
        if difference:
            warnings.warn(
                f"{type(cell).__name__}: the C kernel does not compute what its step and "
                f"step_backward do (largest difference {difference:.3g} on a test input): it "
                "runs its Python step instead (slower)",
                stacklevel=3,
            )
    return _kernel_agrees[key]


def kernel_difference(cell: ManualLSTM, steps: int = 3, batch: int = 2) -> float:
    """0.0 when the kernel's outputs, final state and gradients on a small random input match
    the Python step's and step_backward's within float32 tolerance, else the largest
    difference (inf when the Python path fails). Draws from its own generator: the global
    random state, and so every seeded run, is untouched."""
    hidden = cell.hidden_size
    generator = torch.Generator().manual_seed(0)

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1).requires_grad_()

    with torch.inference_mode(False), torch.enable_grad():
        inputs = (
            uniform(steps, batch, 4 * hidden),
            uniform(4 * hidden, hidden),
            uniform(4 * hidden),
            uniform(batch, hidden),
            uniform(batch, hidden),
        )
        weights = [torch.rand(shape, generator=generator) for shape in
                   ((steps, batch, hidden), (batch, hidden), (batch, hidden))]  # fmt: skip
        results = []
        for run in (
            lambda: native.lstm_training(*inputs),
            lambda: (
                BackpropThroughTime.apply(cell, *inputs)
                if has_own_backward(cell)
                else cell.unroll(inputs[0], tuple(inputs[3:]), inputs[1], inputs[2])
            ),
        ):
            try:
                outputs = run()
                outputs = (outputs[0], *outputs[1]) if len(outputs) == 2 else outputs
                loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            except Exception:
                return math.inf
            results.append([*outputs, *(g if g is not None else torch.zeros(1) for g in grads)])
    largest = 0.0
    for kernel, python in zip(*results, strict=True):
        if kernel.shape != python.shape:
            return math.inf
        if not torch.allclose(kernel, python, **KERNEL_CHECK_TOLERANCE):
            largest = max(largest, (kernel - python).abs().max().item())
    return largest


class ManualGRU(ManualRecurrent):
    """GRU with torch's gate order (reset, update, new); the reset gate scales W_hn h + b_hn."""

    num_gates = 3

    def step(self, x_proj, state, weight_hh, bias_hh, saved=None):
        (h_prev,) = state
        hidden = torch.addmm(bias_hh, h_prev, weight_hh.t())
        rz = 2 * self.hidden_size  # reset and update gates, side by side
        r, z = torch.sigmoid(x_proj[:, :rz] + hidden[:, :rz]).chunk(2, dim=1)
        h_n = hidden[:, rz:]
        n = torch.tanh(x_proj[:, rz:] + r * h_n)
        h = (1 - z) * n + z * h_prev
        if saved is not None:
            saved.append((r, z, n, h_n, h_prev))
        return h, (h,)

    def step_backward(self, grad_h, grad_state, saved, weight_hh):
        r, z, n, h_n, h_prev = saved
        grad_pre_n = tanh_grad(grad_h * (1 - z), n)
        grad_pre_r = sigmoid_grad(grad_pre_n * h_n, r)
        grad_pre_z = sigmoid_grad(grad_h * (h_prev - n), z)
        grad_x = torch.cat([grad_pre_r, grad_pre_z, grad_pre_n], dim=1)
        grad_hh = torch.cat([grad_pre_r, grad_pre_z, grad_pre_n * r], dim=1)
        return grad_x, grad_hh, (torch.addmm(grad_h * z, grad_hh, weight_hh),)
