"""A proof that a trained classic RNN computes parity on every string of every length.

``certify(model, encoding)`` returns a ``Certificate``: ``certified`` is ``True`` with a proof,
``False`` with a string the real network gets wrong, or ``None`` when neither was found.

The proof is a finite graph of labelled boxes (one interval per coordinate of the whole
recurrent state, every layer's ``h`` and, for the LSTM, ``c``):

1. the start state (all zeros) lies in box 0, the start box, labelled 0;
2. for every box ``B`` labelled ``p`` and every bit ``b``, the interval image ``step(B, b)``
   lies inside one box other than the start box, labelled ``p XOR b``;
3. on every box but the start box, labelled ``p``, the head's logit is ``> 0`` if ``p = 1`` and
   ``<= 0`` if ``p = 0``.

By induction on the string, the state after any string of at least one bit lies in a box other
than the start box, labelled with its parity (1 and 2), so the prediction is right (3): for every
string of every length. The start box needs no readout: the empty string is never scored, and
trained networks often give it a positive logit.

Soundness for the float32 network. ``step`` is evaluated in interval arithmetic on float64 that
bounds what the float32 computation can return:

- an affine map ``W x + c`` of ``m`` terms, computed in float32 in any order (blocked, fused or
  not), is within ``gamma_m * sum |w_i x_i|`` of its exact value, ``gamma_m = m u / (1 - m u)``,
  ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1);
- a product or a sum of two float32 numbers is rounded once: relative error at most ``u``;
- ``sigmoid`` and ``tanh`` are monotone; their float32 implementations are assumed to return a
  value within 8 units in the last place of the exact function at the computed argument (tanh:
  plus ``2^-22`` absolute, since the C kernel computes it as ``2 sigmoid(2x) - 1``), never
  outside the function's range, and exactly the end of the range where the exact value is
  within half an ulp of it (saturated gates are exactly 0 or 1, which exact networks rely on).
  These are the assumptions about the kernels; ``tests/test_certify.py`` checks them on the
  machine it runs on, for torch's and the C kernel's cells, on states that random strings reach;
- every bound is widened by ``2^-126`` (underflow to zero or subnormals) and the float64
  bookkeeping's own rounding is covered by a relative margin of ``2^-40``.

``verify`` re-checks 1-3 from the boxes alone, independently of the search that built them; a
certificate is only ``True`` when ``verify`` accepts it. Counterexamples are only reported after
the real network, run through its own ``run``, was seen to get the string wrong.

Scope: ``nn.RNN`` (tanh or relu), ``nn.LSTM``, ``nn.GRU`` and their hand-written twins, any
number of layers, ``bit`` or ``pair`` encoding. Other cores get ``None`` with the reason in
``note``: the linear RNN and DeltaNet are evaluated by a chunked scan whose float32 rounding
differs from a step-by-step recurrence, the sLSTM's stabiliser and normaliser grow without
bound, the mLSTM's and the published blocks' interval steps are not written, and a Transformer
has no recurrent state.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity_lab.cli import Parser, add_trust_argument, positive

MAX_BOXES = 3000  # per merge width: a few seconds at most on a trained 8-16 unit cell


def make_parser() -> Parser:
    """The command line of ``python -m parity_lab.certify``: nothing heavy imported."""
    parser = Parser(
        prog="python -m parity_lab.certify",
        description="Prove that a trained run is right on every string of every length, or find "
        "a string it gets wrong (worst-case strings first, then a search for a proof).",
    )
    parser.add_argument(
        "run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="a trained run (outputs/runs/...)"
    )
    parser.add_argument(
        "--max-boxes", type=positive, default=MAX_BOXES, help="boxes per proof attempt"
    )
    parser.add_argument(
        "--probe-len", type=positive, default=4096, help="longest worst-case string tried, in bits"
    )
    add_trust_argument(parser)
    return parser


if __name__ == "__main__":  # --help and usage errors answer before the seconds of import torch
    make_parser().parse_args()

import numpy as np
import torch
from torch import nn

from parity_lab.data import encode
from parity_lab.models import LinearRNN, ManualGRU, ManualLSTM, ManualRNN, ParityRNN
from parity_lab.worst_case import first_wrong_structured, worst_case

U = 2.0**-24  # float32 unit roundoff
ULPS = 8  # assumed accuracy of float32 sigmoid and tanh, in units in the last place
TANH_ABSOLUTE = 2.0**-22  # tanh as 2 sigmoid(2x) - 1 (the C kernel) is off by ~ulp(1) near 0
TINY = 2.0**-126  # smallest normal float32: covers subnormals flushed to zero
F32 = np.float32


def gamma(terms: int) -> float:
    return terms * U / (1 - terms * U)


Box = tuple[np.ndarray, np.ndarray]  # (lower, upper): float32 values held as float64


def up(x: np.ndarray) -> np.ndarray:
    """The least float32 >= x (x float64): a float32 value known to be >= x is >= this."""
    y = x.astype(F32)
    y = np.where(y.astype(np.float64) < x, np.nextafter(y, F32(np.inf)), y)
    return y.astype(np.float64)


def down(x: np.ndarray) -> np.ndarray:
    """The greatest float32 <= x."""
    return -up(-x)


def nearest(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """float32 round-to-nearest of the exact value ``s + err`` (``s`` its float64 rounding,
    ``err`` the residual from ``two_sum``): ``s`` rounds alike unless it is a float32 midpoint."""
    y = s.astype(F32).astype(np.float64)
    low = np.where(y > s, np.nextafter(y.astype(F32), F32(-np.inf)).astype(np.float64), y)
    high = np.where(y < s, np.nextafter(y.astype(F32), F32(np.inf)).astype(np.float64), y)
    midpoint = (low != high) & ((low + high) / 2 == s)
    return np.where(midpoint & (err > 0), high, np.where(midpoint & (err < 0), low, y))


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def rounded_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 round-to-nearest of the exact ``a + b`` (a, b float64)."""
    return nearest(*two_sum(a, b))


def affine(weight: np.ndarray, bias: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Box:
    """What float32 can return for ``weight @ x + bias``, x float32 in [lo, hi], summed in any
    order: within ``gamma_m sum |terms|`` of the exact value, and itself a float32."""
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    centre = weight @ mid + bias
    spread = np.abs(weight) @ rad
    magnitude = np.abs(weight) @ np.maximum(np.abs(lo), np.abs(hi)) + np.abs(bias)
    # float64 bookkeeping (2^-40 relative covers its own rounding) + float32's worst case
    error = gamma(weight.shape[1] + 2) * magnitude + 2.0**-40 * (magnitude + spread) + TINY
    return up(centre - spread - error), down(centre + spread + error)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def monotone(
    function, lo: np.ndarray, hi: np.ndarray, low: float, high: float, absolute: float = 0.0
) -> Box:
    """A monotone float32 activation on [lo, hi]: within ``ULPS`` ulps of the exact value (taken
    at the float64 value, 2^-50 relative), never outside its range, and exactly ``low`` or
    ``high`` where the exact value rounds to it (saturation, which exact parity networks use)."""
    f_lo, f_hi = function(lo), function(hi)
    slack_lo = ULPS * np.spacing(np.abs(f_lo).astype(F32)).astype(np.float64) + absolute + TINY
    slack_hi = ULPS * np.spacing(np.abs(f_hi).astype(F32)).astype(np.float64) + absolute + TINY
    lower = np.clip(up(f_lo * (1 - np.sign(f_lo) * 2.0**-50) - slack_lo), low, high)
    upper = np.clip(down(f_hi * (1 + np.sign(f_hi) * 2.0**-50) + slack_hi), low, high)
    # Saturation: an exact value within half an ulp of the range's end rounds to the end.
    half_ulp_below_one = 2.0**-25  # float32 values just below 1 are 2^-24 apart
    lower = np.where(f_lo * (1 - 2.0**-50) > high - half_ulp_below_one, high, lower)
    if low < 0:  # tanh: the same at -1 (sigmoid's 0 needs no rule: tiny values vanish in sums)
        upper = np.where(f_hi * (1 - 2.0**-50) < low + half_ulp_below_one, low, upper)
    return lower, upper


def sigmoid(lo: np.ndarray, hi: np.ndarray) -> Box:
    return monotone(_sigmoid, lo, hi, 0.0, 1.0)


def tanh(lo: np.ndarray, hi: np.ndarray) -> Box:
    return monotone(np.tanh, lo, hi, -1.0, 1.0, TANH_ABSOLUTE)


def relu(lo: np.ndarray, hi: np.ndarray) -> Box:
    return np.maximum(lo, 0.0), np.maximum(hi, 0.0)  # exact in float32


def _products(a: Box, b: Box) -> Box:
    """Exact bounds of ``a * b`` (products of float32s are exact in float64)."""
    p = np.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
    return p.min(axis=0), p.max(axis=0)


def multiply(a: Box, b: Box) -> Box:
    lo, hi = _products(a, b)
    zero = np.zeros_like(lo)
    return rounded_sum(lo, zero), rounded_sum(hi, zero)


def add(a: Box, b: Box) -> Box:
    return rounded_sum(a[0], b[0]), rounded_sum(a[1], b[1])


def multiply_add(a: Box, b: Box, c: Box) -> Box:
    """``a * b + c``, rounded as two operations or fused into one (compilers may fuse)."""
    lo, hi = _products(a, b)
    separate = add(multiply(a, b), c)
    return np.minimum(separate[0], rounded_sum(lo, c[0])), np.maximum(
        separate[1], rounded_sum(hi, c[1])
    )


def sum_of_products(a: Box, b: Box, c: Box, d: Box) -> Box:
    """``a * b + c * d``, with either product possibly fused into the addition."""
    ab, cd = multiply(a, b), multiply(c, d)
    first, second = multiply_add(a, b, cd), multiply_add(c, d, ab)
    return np.minimum(first[0], second[0]), np.maximum(first[1], second[1])


@dataclass
class Layer:
    """One layer's float32 weights as float64 arrays, in torch's layout and gate order."""

    weight_ih: np.ndarray
    weight_hh: np.ndarray
    bias_ih: np.ndarray
    bias_hh: np.ndarray


@dataclass
class IntervalCell:
    """The interval step of a classic cell: the state is every layer's h (and c), concatenated."""

    kind: str  # "rnn_tanh", "rnn_relu", "lstm", "gru"
    hidden: int
    layers: list[Layer]
    head_weight: np.ndarray
    head_bias: np.ndarray

    @property
    def parts(self) -> int:
        return 2 if self.kind == "lstm" else 1

    @property
    def size(self) -> int:
        return self.parts * self.hidden * len(self.layers)

    def step(self, box: Box, x: np.ndarray) -> Box:
        lo, hi = box
        n, out_lo, out_hi = self.hidden, [], []
        inputs: Box = (x, x)
        for index, layer in enumerate(self.layers):
            start = index * self.parts * n
            h = (lo[start : start + n], hi[start : start + n])
            joint_w = np.concatenate([layer.weight_ih, layer.weight_hh], axis=1)
            joint_lo = np.concatenate([inputs[0], h[0]])
            joint_hi = np.concatenate([inputs[1], h[1]])
            if self.kind == "gru":
                new_h = self._gru(layer, inputs, h)
            else:
                pre = affine(joint_w, layer.bias_ih + layer.bias_hh, joint_lo, joint_hi)
                if self.kind == "rnn_tanh":
                    new_h = tanh(*pre)
                elif self.kind == "rnn_relu":
                    new_h = relu(*pre)
                else:
                    c = (lo[start + n : start + 2 * n], hi[start + n : start + 2 * n])
                    new_h, new_c = self._lstm(pre, c)
            out_lo.append(new_h[0])
            out_hi.append(new_h[1])
            if self.kind == "lstm":
                out_lo.append(new_c[0])
                out_hi.append(new_c[1])
            inputs = new_h
        return np.concatenate(out_lo), np.concatenate(out_hi)

    def _lstm(self, pre: Box, c: Box) -> tuple[Box, Box]:
        n = self.hidden

        def gate(k: int) -> Box:
            return pre[0][k * n : (k + 1) * n], pre[1][k * n : (k + 1) * n]

        i, f, o = sigmoid(*gate(0)), sigmoid(*gate(1)), sigmoid(*gate(3))
        g = tanh(*gate(2))
        new_c = sum_of_products(f, c, i, g)
        return multiply(o, tanh(*new_c)), new_c

    def _gru(self, layer: Layer, inputs: Box, h: Box) -> Box:
        n = self.hidden
        x_proj = affine(layer.weight_ih, layer.bias_ih, *inputs)
        hidden = affine(layer.weight_hh, layer.bias_hh, *h)
        rz = add(  # x_proj and W_hh h + b_hh are separate float32 results
            (x_proj[0][: 2 * n], x_proj[1][: 2 * n]), (hidden[0][: 2 * n], hidden[1][: 2 * n])
        )
        r_lo, r_hi = sigmoid(*rz)
        r, z = (r_lo[:n], r_hi[:n]), (r_lo[n:], r_hi[n:])
        candidate = tanh(
            *multiply_add(
                r,
                (hidden[0][2 * n :], hidden[1][2 * n :]),
                (x_proj[0][2 * n :], x_proj[1][2 * n :]),
            )
        )
        keep = rounded_sum(1.0 - z[1], 0 * z[1]), rounded_sum(1.0 - z[0], 0 * z[0])
        return sum_of_products(keep, candidate, z, h)

    def logit(self, box: Box) -> Box:
        start = (len(self.layers) - 1) * self.parts * self.hidden
        h = (box[0][start : start + self.hidden], box[1][start : start + self.hidden])
        return affine(self.head_weight, self.head_bias, *h)


def interval_cell(model: ParityRNN) -> IntervalCell | str:
    """The model's ``IntervalCell``, or a sentence saying why its core is not covered."""
    core = model.rnn
    kinds = {nn.LSTM: "lstm", ManualLSTM: "lstm", nn.GRU: "gru", ManualGRU: "gru"}
    kind = next((k for cls, k in kinds.items() if type(core) is cls), None)
    if type(core) in (nn.RNN, ManualRNN):
        kind = "rnn_" + getattr(core, "nonlinearity", "tanh")
    if kind is None:
        return (
            f"{type(core).__name__} is not covered: the certificate handles the classic cells "
            "(rnn, lstm, gru and their manual twins) and the one-layer linear RNN only"
        )
    if getattr(core, "proj_size", 0) or getattr(core, "bidirectional", False):
        return f"{type(core).__name__} with a projection or both directions is not covered"

    def array(name: str, rows: int) -> np.ndarray:
        value = getattr(core, name, None)
        if value is None:
            return np.zeros(rows)
        return value.detach().cpu().double().numpy()

    gates = {"lstm": 4, "gru": 3}.get(kind, 1)
    rows = gates * core.hidden_size
    layers = [
        Layer(
            array(f"weight_ih_l{k}", rows),
            array(f"weight_hh_l{k}", rows),
            array(f"bias_ih_l{k}", rows),
            array(f"bias_hh_l{k}", rows),
        )
        for k in range(core.num_layers)
    ]
    head_w = model.head.weight.detach().cpu().double().numpy()
    head_b = model.head.bias.detach().cpu().double().numpy()
    return IntervalCell(kind, core.hidden_size, layers, head_w, head_b)


def bit_input(bit: int, encoding: str) -> np.ndarray:
    """What the network reads for one bit (``parity_lab.data.encode``), exactly."""
    return np.array([float(bit)] if encoding == "bit" else [float(bit), 1.0 - bit])


START = 0  # index of the start box: it holds the start state, never an image, and is not read


@dataclass
class Proof:
    """Labelled boxes: ``lower[k] <= state <= upper[k]`` holds strings of parity ``label[k]``."""

    lower: np.ndarray
    upper: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def _inside(proof: Proof, box: Box, label: int, first: int = START + 1) -> int:
    """Index (``>= first``) of a box of ``proof`` labelled ``label`` containing ``box``, or -1.
    Images go into boxes after the start box (``first=1``); only the start state may be in it."""
    ok = (
        (proof.label == label)
        & (proof.lower <= box[0]).all(axis=1)
        & (proof.upper >= box[1]).all(axis=1)
    )
    ok[:first] = False
    hits = np.flatnonzero(ok)
    return int(hits[0]) if hits.size else -1


def readout_right(cell: IntervalCell, box: Box, label: int) -> bool:
    lo, hi = cell.logit(box)
    return bool(lo[0] > 0) if label == 1 else bool(hi[0] <= 0)


def verify(cell: IntervalCell, proof: Proof, encoding: str) -> bool:
    """Check conditions 1-3 of the module doc from the boxes alone."""
    zero = np.zeros(cell.size)
    if _inside(proof, (zero, zero), 0, first=START) != START:
        return False
    for k in range(len(proof)):
        box, label = (proof.lower[k], proof.upper[k]), int(proof.label[k])
        if k != START and not readout_right(cell, box, label):
            return False
        for bit in (0, 1):
            if _inside(proof, cell.step(box, bit_input(bit, encoding)), label ^ bit) < 0:
                return False
    return True


@dataclass
class Search:
    """Grows labelled boxes from the start state; ``merge_width`` bounds how wide a box may get
    by absorbing images, ``inflate`` widens new boxes so that contracting images fall inside."""

    cell: IntervalCell
    encoding: str
    merge_width: float
    inflate: float = 0.1
    max_boxes: int = 2000
    max_expansions: int = 40000
    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # a string whose state first made the box
    merged: list[bool] = field(default_factory=list)

    def run(self) -> tuple[str, Proof | str | None]:
        """``("proof", Proof)``, ``("suspect", path)`` (a box on the wrong side of the readout
        made from one string), or ``("budget", None)``."""
        zero = np.zeros(self.cell.size)
        self._add((zero, zero), 0, "")
        queue, queued, expansions = [0], {0}, 0
        inputs = [bit_input(0, self.encoding), bit_input(1, self.encoding)]
        while queue:
            expansions += 1
            if expansions > self.max_expansions or len(self.labels) > self.max_boxes:
                return "budget", None
            k = queue.pop(0)
            queued.discard(k)
            box = (self.lower[k], self.upper[k])
            for bit in (0, 1):
                image = self.cell.step(box, inputs[bit])
                label = self.labels[k] ^ bit
                target = self._place(image, label, self.paths[k] + str(bit))
                if isinstance(target, str):
                    return "suspect", target
                if target is not None and target not in queued:
                    queue.append(target)
                    queued.add(target)
        proof = Proof(np.array(self.lower), np.array(self.upper), np.array(self.labels))
        return "proof", proof

    def _add(self, box: Box, label: int, path: str) -> int:
        self.lower.append(box[0].copy())
        self.upper.append(box[1].copy())
        self.labels.append(label)
        self.paths.append(path)
        self.merged.append(False)
        return len(self.labels) - 1

    def _place(self, image: Box, label: int, path: str) -> int | str | None:
        """Put ``image`` in a box; the box to (re)expand, None if nothing changed, or the path
        of a fresh box that the readout gets wrong."""
        lower, upper = np.array(self.lower), np.array(self.upper)
        same = np.array(self.labels) == label
        same[START] = False  # the start box holds the start state only (module doc)
        inside = same & (lower <= image[0]).all(axis=1) & (upper >= image[1]).all(axis=1)
        if inside.any():
            return None
        hull_lo, hull_hi = np.minimum(lower, image[0]), np.maximum(upper, image[1])
        width = np.where(same, (hull_hi - hull_lo).max(axis=1), np.inf)
        nearest = int(np.argmin(width))
        if width[nearest] <= self.merge_width:
            # A margin, so that images creeping outwards by rounding slack are absorbed at once.
            margin = self.merge_width * self.inflate / 4
            self.lower[nearest] = np.where(
                hull_lo[nearest] < lower[nearest], hull_lo[nearest] - margin, lower[nearest]
            )
            self.upper[nearest] = np.where(
                hull_hi[nearest] > upper[nearest], hull_hi[nearest] + margin, upper[nearest]
            )
            hull_lo[nearest], hull_hi[nearest] = self.lower[nearest], self.upper[nearest]
            self.merged[nearest] = True
            if not readout_right(self.cell, (hull_lo[nearest], hull_hi[nearest]), label):
                raise _TooCoarse(path)
            return nearest
        centre, radius = (image[0] + image[1]) / 2, (image[1] - image[0]) / 2
        radius = radius * (1 + self.inflate) + self.merge_width * self.inflate / 4
        k = self._add((centre - radius, centre + radius), label, path)
        if not readout_right(self.cell, (self.lower[k], self.upper[k]), label):
            if readout_right(self.cell, image, label):
                self.lower[k], self.upper[k] = image[0].copy(), image[1].copy()
            else:
                return path
        return k


class _TooCoarse(Exception):
    """A merged box crossed the readout: the partition is too coarse (or the network wrong)."""


@dataclass
class Certificate:
    certified: bool | None
    counterexample: str | None = None  # a string the real network gets wrong, as runs (1 0^24)
    boxes: int = 0
    seconds: float = 0.0
    note: str = ""


@torch.no_grad()
def predicts_wrong(model: ParityRNN, bits: str, encoding: str) -> bool:
    """Whether the real network, through its own ``run``, gets the parity of ``bits`` wrong."""
    if not bits:
        return False
    tensor = torch.tensor([[int(b) for b in bits]])
    device = next(model.parameters()).device
    logits, _ = model.run(encode(tensor, torch.tensor([len(bits)]), encoding).to(device))
    return int(logits[0, -1] > 0) != bits.count("1") % 2


MERGE_WIDTHS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)


def certify(
    model: ParityRNN,
    encoding: str = "bit",
    merge_widths: tuple[float, ...] = MERGE_WIDTHS,
    max_boxes: int = MAX_BOXES,
    probe_len: int = 4096,
) -> Certificate:
    """First the worst-case strings up to ``probe_len`` bits (``parity_lab.worst_case``): a wrong
    one is the counterexample. Then a search for a proof (module doc), from coarse to fine
    partitions of the state space, each ending in ``verify``."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        wrong = worst_case(model, probe_len, encoding) if probe_len else None
        if wrong is not None:
            return Certificate(
                False,
                counterexample=wrong[1],
                seconds=time.perf_counter() - start,
                note=f"wrong on a worst-case string of {wrong[0]} bits",
            )
        if isinstance(model.rnn, LinearRNN):  # a direct proof, parity_lab.certify_linear
            from parity_lab.certify_linear import linear_proof

            proof = linear_proof(model, encoding)
            seconds = time.perf_counter() - start
            if isinstance(proof, str):
                return Certificate(None, seconds=seconds, note=proof)
            if proof.holds:
                return Certificate(True, boxes=4, seconds=seconds, note=proof.describe())
            return Certificate(
                None,
                seconds=seconds,
                note="the bounds of the contracting units do not keep the logit on the right "
                f"side ({proof.describe()}), and no string was found wrong",
            )
        cell = interval_cell(model)
        if isinstance(cell, str):
            return Certificate(None, seconds=time.perf_counter() - start, note=cell)
        suspects: list[str] = []
        for width in merge_widths:
            search = Search(cell, encoding, width, max_boxes=max_boxes)
            try:
                outcome, found = search.run()
            except _TooCoarse as error:
                outcome, found = "suspect", str(error)
            if outcome == "proof" and verify(cell, found, encoding):
                return Certificate(
                    True,
                    boxes=len(found),
                    seconds=time.perf_counter() - start,
                    note=f"{len(found)} boxes, merge width {width}",
                )
            if outcome == "suspect" and found not in suspects:
                suspects.append(found)
                if predicts_wrong(model, found, encoding):
                    return Certificate(
                        False,
                        counterexample=found,
                        seconds=time.perf_counter() - start,
                        note="the real network gets this string wrong",
                    )
        return Certificate(
            None,
            seconds=time.perf_counter() - start,
            note=f"no proof within {max_boxes} boxes at merge widths {list(merge_widths)}, "
            "and no string found wrong",
        )
    finally:
        model.train(was_training)


def first_wrong_length(curve: dict[str, float]) -> int | None:
    """The shortest length of a ``length_curve`` (``metrics.json``'s lengths -> accuracy) at which
    some string was wrong, or None. No accuracy (NaN: no string scored) is no wrong string."""
    wrong = [int(n) for n, accuracy in curve.items() if accuracy < 1.0]
    return min(wrong, default=None)


def exactness_metrics(model: ParityRNN, cfg: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """The worst-case and certificate entries of ``metrics.json`` for a trained run.

    ``worst_case_wrong``: the first worst-case string (``parity_lab.worst_case``) of at most
    ``max(eval.lengths)`` bits the model gets wrong, or None; ``solved`` requires None. With a
    length curve, ``test/exact_until_random`` is the curve's figure (random strings only) and
    ``test/exact_until`` also stops before the first structured string it gets wrong.
    ``certified`` (with ``certified_counterexample`` and ``certify_note``): see ``certify``; a
    string found wrong (structured, or a random one of the length curve) makes it False whatever
    family the model is.
    """
    encoding = cfg.data.encoding
    limit = model.max_len or float("inf")
    lengths = [n for n in cfg.eval.lengths if n <= limit]
    out: dict[str, Any] = {}
    wrong = worst_case(model, max(lengths, default=1), encoding)
    long_wrong = None  # a structured string beyond eval.lengths that the network gets wrong
    out["worst_case_wrong"] = None if wrong is None else wrong[1]
    if wrong is not None:
        out["solved"] = False
        out["solved_step"] = None
    if "test/exact_until" in metrics:
        random_exact = metrics["test/exact_until"]
        out["test/exact_until_random"] = random_exact
        longest = int(min(cfg.eval.curve.max_len, limit))
        first = first_wrong_structured(model, longest, encoding) if wrong is None else wrong
        out["test/exact_until"] = random_exact if first is None else min(random_exact, first[0] - 1)
        if first is not None and wrong is None:
            out["worst_case_wrong_long"] = first[1]
            long_wrong = first
    if cfg.eval.get("certify", False):
        if wrong is not None:
            verdict = Certificate(False, counterexample=wrong[1], note="a worst-case string")
        elif long_wrong is not None:  # a sound "no" for every family, covered by the proof or not
            verdict = Certificate(
                False,
                counterexample=long_wrong[1],
                note=f"a worst-case string of {long_wrong[0]} bits",
            )
        else:
            verdict = certify(model, encoding, probe_len=0)
        random_wrong = first_wrong_length(metrics.get("length_curve", {}))
        if verdict.certified is not False and random_wrong is not None:
            # a random string the network gets wrong is a sound "no" too; too long to record as
            # runs, it is named by how to draw it again
            note = (
                f"wrong on a random string of {random_wrong:,} bits: a prefix of one of the "
                f"length curve's streams (seed {cfg.get('seed')}, eval.curve)"
            )
            if verdict.certified:  # never expected: the proof would be unsound
                note += f"; a proof was found too ({verdict.note}), which this string refutes"
                warnings.warn(f"parity_lab.certify: {note}", stacklevel=2)
            verdict = Certificate(False, note=note)
        out["certified"] = verdict.certified
        out["certified_counterexample"] = verdict.counterexample
        out["certify_note"] = verdict.note
    else:
        out["certified"] = None
        out["certify_note"] = "not tried (eval.certify=false)"
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m parity_lab.certify RUN_DIR [RUN_DIR ...]``: one verdict line per run."""
    import sys

    args = make_parser().parse_args(argv)
    from parity_lab.predict import PredictError, load_run
    from parity_lab.run_files import trust

    trust(args.trust)
    torch.set_num_threads(1)
    for run_dir in args.run_dirs:
        try:
            model, cfg = load_run(run_dir)
        except PredictError as error:
            sys.exit(f"certify: {error}")
        verdict = certify(
            model, cfg.data.encoding, max_boxes=args.max_boxes, probe_len=args.probe_len
        )
        text = {True: "certified", False: "not exact", None: "undecided"}[verdict.certified]
        wrong = f", wrong on {verdict.counterexample}" if verdict.counterexample else ""
        print(f"{run_dir}\t{text}{wrong} ({verdict.note}; {verdict.seconds:.1f} s)")


if __name__ == "__main__":
    main()
