"""``python -m parity_lab.analyze RUN_DIR``: the automaton a trained network implements.

Runs the model on random strings and records its recurrent state after every bit (for an LSTM
both ``h`` and ``c``; a core may narrow it with an ``analysis_state`` method, as the sLSTM does
to ``h`` and ``c / n``); clusters the states with k-means; reads off the transitions on 0 and 1
by majority vote and each cluster's output by the network's majority prediction; and minimises
that automaton (Moore partition refinement). ``k`` grows from 1 until the minimal automaton
predicts what the network predicts at 99% of positions (the fidelity criterion of automaton
extraction). Reports whether it is the 2-state parity automaton. Writes
``analysis/automaton.json`` and ``analysis/trajectories.png`` (states projected on their first
two principal components) into the run directory, and the figure to TensorBoard.

For linear RNNs it also shows the learned transition values ``a_t`` read on a 0 and on a 1
(``analysis/transitions.json`` and ``.png``): parity needs a unit with ``a(0) = 1`` and
``a(1) = -1``; ``|a| < 1`` on either bit makes the state leak, which bounds the length to which
the network stays exact.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parity_lab.cli import Parser, add_trust_argument, positive


def make_parser() -> Parser:
    """The command line's parser: nothing heavy imported."""
    parser = Parser(prog="python -m parity_lab.analyze", description=__doc__)
    add = parser.add_argument
    add("run_dir", type=Path, metavar="RUN_DIR", help="a trained run (outputs/runs/...)")
    add("--strings", type=positive, default=256, help="random strings to run the network on")
    add(
        "--length",
        type=positive,
        default=None,
        help="bits in each string (default: the run's data.max_len)",
    )
    add(
        "--max-clusters",
        type=positive,
        default=32,
        help="largest k tried by k-means before giving up on a faithful automaton",
    )
    add(
        "--drift",
        type=positive,
        default=None,
        metavar="BITS",
        help="also follow streams of up to BITS bits and write analysis/drift.json",
    )
    add_trust_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (run as a script, it is read once before torch loads: below)."""
    return make_parser().parse_args(argv)


if __name__ == "__main__":  # --help and usage errors answer before the seconds of import torch
    parse_args()

import torch

import parity_lab  # noqa: F401  (registers the ${input_size:...} resolver)
from parity_lab.data import encode, key_generator
from parity_lab.evaluate import chunk_length
from parity_lab.models import ParityRNN
from parity_lab.predict import PredictError, load_run
from parity_lab.run_files import (
    CorruptResultError,
    RunFileError,
    atomic_path,
    read_metrics,
    refuse_links,
    run_lock,
    trust,
    write_atomic,
)

START = -1  # the automaton's start state: the zero state before any bit
RUNS = [8, 16, 24, 32, 48, 64, 128, 1024]  # runs of zeros after which parity loss is probed


@dataclass
class Automaton:
    """A Moore machine over bits: ``transitions[s] = (next on 0, next on 1)``, ``outputs[s]`` the
    predicted parity in state ``s`` (the start state's output is never read: no empty strings)."""

    start: int
    transitions: dict[int, tuple[int, int]]
    outputs: dict[int, int]

    @property
    def num_states(self) -> int:
        return len(self.transitions)

    def is_parity(self) -> bool:
        """Whether it outputs the parity of every non-empty string (a search over the reachable
        pairs of (state, true parity))."""
        seen, frontier = set(), [(self.start, 0)]
        while frontier:
            state, parity = frontier.pop()
            for bit in (0, 1):
                pair = (self.transitions[state][bit], parity ^ bit)
                if self.outputs[pair[0]] != pair[1]:
                    return False
                if pair not in seen:
                    seen.add(pair)
                    frontier.append(pair)
        return True


@dataclass
class Analysis:
    automaton: Automaton
    clusters: int  # k chosen for k-means, before minimisation
    transition_consistency: float  # share of observed transitions that follow the majority
    output_purity: float  # share of states whose prediction is their cluster's output
    agreement: float  # share of positions where the automaton predicts what the network does
    network_accuracy: float  # share of positions where the network's prediction is the parity


def state_vector(state: Any) -> torch.Tensor:
    """A recurrent state as ``(batch, features)``: a tensor with the batch on dim 1 (torch's
    ``(layers, batch, hidden)``, or a matrix memory ``(layers, batch, heads, d, d)``), or a
    tuple or list of them, nested or not (an LSTM's ``(h, c)``, an sLSTM's ``(h, c, n, m)``)."""
    if isinstance(state, tuple | list):
        parts = [p for p in state if not (isinstance(p, torch.Tensor) and p.numel() == 0)]
        return torch.cat([state_vector(part) for part in parts], dim=1)  # empty: a kernel-1 conv
    return state.transpose(0, 1).flatten(1)


def analysis_vector(model: ParityRNN, state: Any) -> torch.Tensor:
    """The part of a state that analysis clusters, as ``(batch, features)``: what the core's
    ``analysis_state(state)`` returns where it has one (the sLSTM: ``h`` and ``c / n``, without
    the normaliser's scale, which grows with the string), else the whole state."""
    select = getattr(model.rnn, "analysis_state", None)
    return state_vector(state if select is None else select(state))


@torch.no_grad()
def collect_states(
    model: ParityRNN, bits: torch.Tensor, encoding: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``(batch, time, features)`` and logits ``(batch, time)`` after each bit."""
    full = torch.full((bits.shape[0],), 1)
    states, logits, state = [], [], None
    for t in range(bits.shape[1]):
        logit, state = model.run(encode(bits[:, t : t + 1], full, encoding), state)
        states.append(analysis_vector(model, state))
        logits.append(logit[:, 0])
    return torch.stack(states, dim=1), torch.stack(logits, dim=1)


@dataclass
class Transitions:
    """Transition values ``a_t`` of one linear-RNN layer, split by the bit read at ``t``:
    ``per_unit[bit]`` each unit's mean, ``quantiles[bit]`` over every unit and position at
    ``QUANTILES``. A parity unit has ``a(0) = 1`` (keep) and ``a(1) = -1`` (flip)."""

    layer: int
    per_unit: dict[int, list[float]]
    quantiles: dict[int, list[float]]
    values: dict[int, torch.Tensor]  # every a_t read on that bit, (positions x units,)

    def flip_unit(self) -> int:
        """The unit closest to the parity flip, ``|a(0) - 1| + |a(1) + 1|`` smallest."""
        distance = [
            abs(keep - 1) + abs(flip + 1)
            for keep, flip in zip(self.per_unit[0], self.per_unit[1], strict=True)
        ]
        return min(range(len(distance)), key=distance.__getitem__)

    def half_life(self, unit: int) -> float:
        """Random bits after which ``unit`` keeps half of what it held: ``|a_t|`` multiply, so
        ``ln 2 / -mean(ln |a|)`` over equally likely bits; ``inf`` when ``|a(0)| = |a(1)| = 1``."""
        logs = [math.log(max(abs(self.per_unit[bit][unit]), 1e-30)) for bit in (0, 1)]
        rate = -sum(logs) / 2
        return math.inf if rate <= 0 else math.log(2) / rate


QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)


@torch.no_grad()
def transition_values(model: ParityRNN, bits: torch.Tensor, encoding: str) -> list[Transitions]:
    """Each layer's ``a_t`` on ``bits (batch, time)``, for cores made of layers with a
    ``transition(x) -> (a, ...)`` (parity_lab's linear RNNs); ``[]`` for any other core."""
    layers = getattr(model.rnn, "layers", None)
    if layers is None or not all(hasattr(layer, "transition") for layer in layers):
        return []
    x = encode(bits, torch.full((bits.shape[0],), bits.shape[1]), encoding)
    found = []
    for number, layer in enumerate(layers):
        a = layer.transition(x)[0]  # (batch, time, units)
        values = {bit: a[bits == bit] for bit in (0, 1)}  # (positions, units)
        q = torch.tensor(QUANTILES)
        found.append(
            Transitions(
                number,
                {bit: v.mean(dim=0).tolist() for bit, v in values.items()},
                {bit: torch.quantile(v.flatten(), q).tolist() for bit, v in values.items()},
                {bit: v.flatten() for bit, v in values.items()},
            )
        )
        x = layer(x, None)[0]
    return found


def plot_transitions(found: list[Transitions], title: str) -> Any:
    """Histograms of ``a_t`` on a 0 and on a 1, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(found), figsize=(5 * len(found), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], found, strict=True):
        bins = torch.linspace(-1, 1, 81).tolist()
        for bit, colour in ((0, "tab:blue"), (1, "tab:red")):
            values = layer.values[bit].tolist()
            ax.hist(values, bins=bins, color=colour, alpha=0.6, label=f"a_t on a {bit}")
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("transition value a_t")
        ax.set_ylabel("units x positions")
        ax.set_title(f"{title}, layer {layer.layer}")
        ax.legend(loc="upper center")
    figure.tight_layout()
    return figure


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """Cluster labels by Lloyd's algorithm from a k-means++ start (deterministic given seed)."""
    generator = key_generator(seed, "kmeans", k)
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centres) < k:
        distance = torch.cdist(points, centres).min(dim=1).values.square()
        if distance.sum() == 0:
            break
        pick = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centres = torch.cat([centres, points[pick]])
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        updated = torch.stack(
            [
                points[labels == c].mean(dim=0) if (labels == c).any() else centres[c]
                for c in range(len(centres))
            ]
        )
        if torch.equal(updated, centres):
            break
        centres = updated
    return torch.cdist(points, centres).argmin(dim=1)


def quantised_automaton(
    labels: torch.Tensor, bits: torch.Tensor, predictions: torch.Tensor
) -> tuple[Automaton, float, float]:
    """Majority transitions and outputs of clustered states ``labels (batch, time)``; returns the
    automaton, its transition consistency and its output purity."""
    previous = torch.cat([torch.full_like(labels[:, :1], START), labels[:, :-1]], dim=1)
    counts: dict[tuple[int, int], Counter] = {}
    for source, bit, target in zip(
        previous.flatten().tolist(), bits.flatten().tolist(), labels.flatten().tolist(), strict=True
    ):
        counts.setdefault((source, bit), Counter())[target] += 1
    states = sorted(set(labels.flatten().tolist()))
    sink = max(states) + 1  # stands for transitions never observed
    transitions, agree, total = {}, 0, 0
    for state in [START, *states]:
        row = []
        for bit in (0, 1):
            seen = counts.get((state, bit), Counter())
            target, votes = seen.most_common(1)[0] if seen else (sink, 0)
            row.append(target)
            agree, total = agree + votes, total + sum(seen.values())
        transitions[state] = (row[0], row[1])
    outputs, pure = {START: 0}, 0
    for state in states:
        votes = Counter(predictions[labels == state].tolist())
        outputs[state], count = votes.most_common(1)[0]
        pure += count
    if any(sink in row for row in transitions.values()):
        transitions[sink], outputs[sink] = (sink, sink), -1
    return Automaton(START, transitions, outputs), agree / total, pure / labels.numel()


def minimise(automaton: Automaton) -> Automaton:
    """The equivalent automaton with the fewest states on non-empty strings: Moore refinement of
    the reachable states, the start state merged into any state with the same successors."""
    reachable, frontier = {automaton.start}, [automaton.start]
    while frontier:
        for target in automaton.transitions[frontier.pop()]:
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    inner = sorted(s for s in reachable if s != automaton.start)
    block = {s: automaton.outputs[s] for s in inner}
    while True:
        signature = {s: (block[s], *(block[t] for t in automaton.transitions[s])) for s in inner}
        names = {sig: i for i, sig in enumerate(sorted(set(signature.values())))}
        refined = {s: names[signature[s]] for s in inner}
        if len(set(refined.values())) == len(set(block.values())):
            break
        block = refined
    block = refined
    transitions = {block[s]: tuple(block[t] for t in automaton.transitions[s]) for s in inner}
    outputs = {block[s]: automaton.outputs[s] for s in inner}
    start_successors = tuple(block[t] for t in automaton.transitions[automaton.start])
    same = [s for s, successors in transitions.items() if successors == start_successors]
    if same:
        return Automaton(same[0], transitions, outputs)
    start = len(transitions)
    transitions[start], outputs[start] = start_successors, 0
    return Automaton(start, transitions, outputs)


def run_automaton(automaton: Automaton, bits: torch.Tensor) -> torch.Tensor:
    """The automaton's output after every bit, ``(batch, time)``."""
    outputs = torch.empty_like(bits)
    for row, string in enumerate(bits.tolist()):
        state = automaton.start
        for t, bit in enumerate(string):
            state = automaton.transitions[state][bit]
            outputs[row, t] = automaton.outputs[state]
    return outputs


def analyze(
    model: ParityRNN,
    encoding: str = "bit",
    num_strings: int = 256,
    length: int = 50,
    max_clusters: int = 32,
    seed: int = 0,
    threshold: float = 0.99,
) -> tuple[Analysis, torch.Tensor, torch.Tensor]:
    """Extract and minimise the automaton; also return the states and bits it was read from."""
    bits = torch.randint(0, 2, (num_strings, length), generator=key_generator(seed, "analyze"))
    states, logits = collect_states(model, bits, encoding)
    predictions = (logits > 0).long()
    accuracy = (predictions == torch.cumsum(bits, dim=1).remainder(2)).float().mean().item()
    points = states.flatten(0, 1)
    best: Analysis | None = None
    for k in range(1, max_clusters + 1):
        labels = kmeans(points, k, seed).view(num_strings, length)
        automaton, consistency, purity = quantised_automaton(labels, bits, predictions)
        minimal = minimise(automaton)
        agreement = (run_automaton(minimal, bits) == predictions).float().mean().item()
        if best is None or agreement > best.agreement:
            best = Analysis(minimal, k, consistency, purity, agreement, accuracy)
        if agreement >= threshold:
            break
    return best, states, bits


@torch.no_grad()
def drift(
    model: ParityRNN,
    centres: torch.Tensor,
    lengths: list[int],
    encoding: str = "bit",
    num_strings: int = 256,
    seed: int = 0,
    chunk_len: int | None = None,
) -> list[dict[str, float]]:
    """How the state of long streams moves away from the states of short strings: at each length,
    accuracy, the smallest signed margin ``logit * (2 parity - 1)`` (negative: a wrong answer)
    and the largest distance from a state to its nearest ``centre``."""
    chunk_len = chunk_length(model, chunk_len)
    generator = key_generator(seed, "drift")
    wanted, rows, state = sorted(lengths), [], None
    parity = torch.zeros(num_strings, 1, dtype=torch.int64)
    position = 0
    for length in wanted:
        while position < length:
            size = min(chunk_len, length - position)
            bits = torch.randint(0, 2, (num_strings, size), generator=generator)
            parity = (parity + bits.sum(dim=1, keepdim=True)).remainder(2)
            sizes = torch.full((num_strings,), size)
            logits, state = model.run(encode(bits, sizes, encoding), state)
            position += size
        margin = logits[:, -1] * (2 * parity[:, 0] - 1)
        distance = torch.cdist(analysis_vector(model, state), centres).min(dim=1).values
        rows.append(
            {
                "length": length,
                "accuracy": (margin > 0).float().mean().item(),
                "min_margin": margin.min().item(),
                "max_distance": distance.max().item(),
            }
        )
    return rows


@torch.no_grad()
def zero_run_limits(
    model: ParityRNN,
    prefixes: torch.Tensor,
    encoding: str,
    longest: int,
    chunk_len: int | None = None,
) -> torch.Tensor:
    """For each prefix ``(batch, bits)``, the first ``n`` at which ``prefix + 0^n`` is predicted
    wrong: 0 if the prefix itself is, ``longest + 1`` if it stays right through ``longest`` zeros.

    Zeros keep the parity, so an exact automaton holds it through any run of them; a trained
    network may leak towards the other state, and random strings contain ever longer runs.
    """
    chunk_len = chunk_length(model, chunk_len)
    batch, size = prefixes.shape
    parity = prefixes.sum(dim=1).remainder(2)
    logits, state = model.run(encode(prefixes, torch.full((batch,), size), encoding))
    first = torch.full((batch,), longest + 1)
    first[(logits[:, -1] > 0).long() != parity] = 0
    done = 0
    while done < longest:
        size = min(chunk_len, longest - done)
        zeros = torch.zeros(batch, size, dtype=torch.int64)
        logits, state = model.run(encode(zeros, torch.full((batch,), size), encoding), state)
        wrong = (logits > 0).long() != parity[:, None]
        fresh = wrong.any(dim=1) & (first == longest + 1)
        first[fresh] = wrong.long().argmax(dim=1)[fresh] + done + 1
        done += size
    return first


@torch.no_grad()
def lost_after_zeros(
    model: ParityRNN, prefixes: torch.Tensor, encoding: str, runs: list[int]
) -> dict[int, float]:
    """Share of prefixes for which ``prefix + 0^z + 1`` is predicted wrong, for each run ``z``.

    A network whose output merely sags inside a long run of zeros recovers at the next 1; one
    whose state has crossed to the other parity stays wrong from then on.
    """
    batch, size = prefixes.shape
    parity = (prefixes.sum(dim=1) + 1).remainder(2)
    lost = {}
    for run in runs:
        bits = torch.cat(
            [prefixes, torch.zeros(batch, run, dtype=torch.int64), torch.ones(batch, 1).long()], 1
        )
        logits, _ = model.run(encode(bits, torch.full((batch,), bits.shape[1]), encoding))
        lost[run] = ((logits[:, -1] > 0).long() != parity).float().mean().item()
    return lost


def plot_trajectories(states: torch.Tensor, bits: torch.Tensor, title: str, shown: int = 4) -> Any:
    """States on their first two principal components, coloured by true parity, with the paths of
    a few strings drawn through them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = states.flatten(0, 1)
    mean = points.mean(dim=0)
    basis = torch.linalg.svd(points - mean, full_matrices=False).Vh[:2]

    def project(x: torch.Tensor) -> torch.Tensor:
        flat = (x - mean) @ basis.T
        return torch.cat([flat, torch.zeros(len(flat), 2 - flat.shape[1])], dim=1)

    projected = project(points).view(*states.shape[:2], 2)
    parity = torch.cumsum(bits, dim=1).remainder(2)
    figure, axes = plt.subplots(figsize=(5.5, 5))
    for value, colour in ((0, "tab:blue"), (1, "tab:red")):
        chosen = projected[parity == value]
        axes.scatter(
            chosen[:, 0], chosen[:, 1], s=6, alpha=0.3, color=colour, label=f"parity {value}"
        )
    origin = project(torch.zeros(1, points.shape[1]))
    for row in range(min(shown, len(bits))):
        path = torch.cat([origin, projected[row, :12]])
        axes.plot(path[:, 0], path[:, 1], linewidth=0.8, alpha=0.8, marker=".")
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.set_title(title)
    axes.legend(loc="best")
    figure.tight_layout()
    return figure


def report_transitions(found: list[Transitions], out: Path, title: str, run_dir: Path) -> None:
    """Print each layer's transition values by input bit; write transitions.json and .png."""
    print("  transition values a_t by input bit (quantiles 0, 5, 50, 95, 100%):")
    for layer in found:
        for bit in (0, 1):
            spread = " ".join(f"{q:+.4f}" for q in layer.quantiles[bit])
            print(f"    layer {layer.layer}, on a {bit}: {spread}")
        unit = layer.flip_unit()
        keep, flip = layer.per_unit[0][unit], layer.per_unit[1][unit]
        print(
            f"    closest to the parity flip: unit {unit}, a(0) = {keep:+.6f}, a(1) = {flip:+.6f};"
            f" it keeps half its content for {layer.half_life(unit):.4g} random bits"
        )
    records = []
    for t in found:
        half_life = t.half_life(t.flip_unit())
        records.append(
            {
                "layer": t.layer,
                "per_unit": t.per_unit,
                "quantiles": t.quantiles,
                "flip_unit": t.flip_unit(),
                "half_life": None if math.isinf(half_life) else half_life,  # None: never leaks
            }
        )
    write_atomic(out / "transitions.json", json.dumps(records, indent=2) + "\n")
    figure = plot_transitions(found, title)
    with atomic_path(out / "transitions.png") as temporary:
        figure.savefig(temporary, dpi=120)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as writer:
        writer.add_figure("analysis/transitions", figure)


def print_zero_run_probes(model: ParityRNN, cfg: Any, strings: int, length: int) -> None:
    """How long odd and even prefixes keep their parity through runs of zeros, and whether a later
    1 is still read right."""
    longest = 10_000
    prefixes = torch.randint(
        0, 2, (strings, length), generator=key_generator(cfg.seed, "zero_runs")
    )
    limits = zero_run_limits(model, prefixes, cfg.data.encoding, longest)
    for parity, name in ((1, "odd"), (0, "even")):
        mask = prefixes.sum(dim=1).remainder(2) == parity
        chosen = limits[mask]
        broken = chosen[(chosen > 0) & (chosen <= longest)]
        held = int((chosen > longest).sum())
        summary = f"holds {held} of {len(chosen)}"
        if len(broken):
            summary += (
                f", breaks {len(broken)}: after a run of min {int(broken.min())}, "
                f"median {int(broken.median())} zeros"
            )
        if (chosen == 0).any():
            summary += f", {int((chosen == 0).sum())} wrong before any zero"
        print(f"  {name}-parity {length}-bit prefixes + up to {longest} zeros: {summary}")
        lost = lost_after_zeros(model, prefixes[mask], cfg.data.encoding, RUNS)
        shares = ", ".join(f"{run}: {share:.2f}" for run, share in lost.items())
        print(f"    wrong after the next 1 (parity lost), by run of zeros: {shares}")


def run_status(run_dir: Path, network_accuracy: float) -> tuple[bool, str]:
    """Whether the run solved parity, and the first line that says so: from its ``metrics.json``,
    or, for an unfinished run, from the network's accuracy on the analysed strings."""
    try:
        metrics = read_metrics(run_dir / "metrics.json")
        solved = bool(metrics.get("solved"))
        source = f"metrics.json: val/acc {metrics['val/acc']:.3f}"
    except CorruptResultError as error:  # absent (unfinished) or unreadable
        solved = network_accuracy == 1.0
        unreadable = "" if not (run_dir / "metrics.json").exists() else f" ({error})"
        source = f"unfinished run{unreadable}, judged on the analysed strings"
    verdict = "solved" if solved else "NOT solved"
    return solved, f"{run_dir}: {verdict} ({source}; right at {network_accuracy:.4f} of positions)"


def certificate_line(proof: Any) -> str:
    """The certificate's verdict, the first line analyze prints."""
    if proof.certified is True:
        return f"certified: right on every string of every length ({proof.note})"
    if proof.certified is False:
        return f"not exact: wrong on {proof.counterexample} ({proof.note})"
    return f"not certified: no proof and no wrong string found ({proof.note})"


def automaton_line(is_parity: bool, proof: Any) -> str:
    """What the extracted automaton says, in words that never contradict the certificate."""
    if not is_parity:
        return "on the analysed strings it is NOT the 2-state parity automaton"
    if proof.certified is True:
        return "it is the 2-state parity automaton, at every length (certified)"
    if proof.certified is False:
        return (
            "on the analysed strings it behaves as the 2-state parity automaton, but it is not "
            f"one: it is wrong on {proof.counterexample}"
        )
    return (
        "on the analysed strings it is the 2-state parity automaton (not proven for every length)"
    )


def main(argv: list[str] | None = None) -> Analysis:
    args = parse_args(argv)
    trust(args.trust)

    torch.set_num_threads(1)
    try:
        model, cfg = load_run(args.run_dir)
    except PredictError as error:
        raise SystemExit(f"analyze: {error}") from None
    if model.max_len is not None:  # the Transformer: its "state" is the input read so far
        raise SystemExit(
            f"analyze: {args.run_dir} is a {type(model.rnn).__name__} run: it has no recurrent "
            "state of fixed size (it re-reads the input so far), so there is no automaton to "
            f"extract; python -m parity_lab.predict {args.run_dir} BITS answers for it"
        )
    try:
        with run_lock(args.run_dir):
            return analyze_run(args, model, cfg)
    except RunFileError as error:
        raise SystemExit(f"analyze: {error}") from None


def analyze_run(args: argparse.Namespace, model: ParityRNN, cfg: Any) -> Analysis:
    """``main``'s work on a loaded run, holding its lock: analysis/ and the figures."""
    refuse_links(args.run_dir)  # before the work: nothing is written through a link
    out = args.run_dir / "analysis"
    try:  # before the work: the results go into the run directory
        out.mkdir(exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise SystemExit(f"analyze: {out} cannot be written ({error.strerror})") from None
    length = args.length if args.length is not None else cfg.data.max_len
    result, states, bits = analyze(
        model, cfg.data.encoding, args.strings, length, args.max_clusters, cfg.seed
    )
    write_atomic(out / "automaton.json", json.dumps(asdict(result), indent=2) + "\n")
    title = f"{cfg.model.rnn._target_.rsplit('.', 1)[-1]} hidden {cfg.model.hidden_size}"
    figure = plot_trajectories(states, bits, title)
    with atomic_path(out / "trajectories.png") as temporary:
        figure.savefig(temporary, dpi=120)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(args.run_dir)) as writer:
        writer.add_figure("analysis/trajectories", figure)
    machine = result.automaton
    from parity_lab.certify import certify

    proof = certify(model, cfg.data.encoding)
    print(f"{args.run_dir}: {certificate_line(proof)}")
    solved, status = run_status(args.run_dir, result.network_accuracy)
    print(status)
    if proof.certified is False:
        print(
            f"  the network does not compute parity (wrong on {proof.counterexample}): the "
            "automaton below is what it computes on the analysed strings"
        )
    elif not solved:
        print("  not solved: the automaton below is what it computes on the analysed strings")
    print(f"  {args.strings} strings of {length} bits")
    print(
        f"  k-means k={result.clusters}: transition consistency "
        f"{result.transition_consistency:.4f}, output purity {result.output_purity:.4f}"
    )
    print(f"  minimal automaton: {machine.num_states} states, start {machine.start}")
    for state, (on0, on1) in sorted(machine.transitions.items()):
        print(f"    state {state} (output {machine.outputs[state]}): 0 -> {on0}, 1 -> {on1}")
    print(f"  agrees with the network on {result.agreement:.4f} of positions")
    print(f"  {automaton_line(machine.num_states == 2 and machine.is_parity(), proof)}")
    print(f"  written to {out}")
    found = transition_values(model, bits, cfg.data.encoding)
    if found:
        report_transitions(found, out, title, args.run_dir)
    if result.network_accuracy < 1.0:
        # The probes ask how long a right answer survives runs of zeros: moot when it is not right.
        print("  zero-run probes skipped: the network is already wrong on the analysed strings")
    else:
        print_zero_run_probes(model, cfg, args.strings, length)
    if args.drift:
        points = states.flatten(0, 1)
        labels = kmeans(points, result.clusters, cfg.seed)
        centres = torch.stack([points[labels == c].mean(dim=0) for c in labels.unique()])
        lengths = [n for n in (10**e for e in range(1, 8)) if n < args.drift] + [args.drift]
        rows = drift(model, centres, lengths, cfg.data.encoding, args.strings, cfg.seed)
        write_atomic(out / "drift.json", json.dumps(rows, indent=2) + "\n")
        print("  streams: length, accuracy, smallest signed margin, largest distance to a centre")
        for row in rows:
            print(
                f"    {row['length']:>9}  {row['accuracy']:.4f}  {row['min_margin']:+9.3f}  "
                f"{row['max_distance']:.2e}"
            )
    return result


if __name__ == "__main__":
    main()
