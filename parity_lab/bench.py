"""``python -m parity_lab.bench``: how fast every model trains here, and how fast a run solves.

Measures, each a median over timed repeats after a warm-up (timings on a shared machine are noisy):

- training ms/step and strings/s of every model (forward, loss, backward, optimizer step; models
  built from the real configs in ``conf/model``), and each hand-written/built-in ratio;
- time to solve: wall time of the default ``python -m parity_lab`` (start-up included) over seeds,
  beside the PyTorch notebook's fastest setting (packed ``nn.RNN``, batch 10, lr 1e-2, lengths
  1..20, hidden 8) trained until it solves or reaches a step cap;
- where a default run's time goes: data generation and evaluation against the whole run;
- long-string evaluation: seconds to evaluate strings of ``--eval-bits`` bits;
- with ``--startup``, only whole-process start-up: ``python -c "import torch"``, ``predict`` on one
  string, a bad value refused, and the default run, each as a ratio to ``import torch``.

Prints tables and writes everything to ``--output`` as JSON. With every default it takes about
3 minutes (175 s on 2 shared CPU cores, one torch thread): the training steps of every model, 5
default runs, 3 notebook runs and the breakdown; ``--solve-seeds 0 --notebook-seeds 0
--no-breakdown`` times the training steps alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity_lab.cli import Parser, positive

CONF = Path(__file__).resolve().parents[1] / "conf"
TWINS = ["rnn", "rnn_manual", "lstm", "lstm_manual", "gru", "gru_manual"]
# every model of conf/model: the twins first, then the others by name
MODELS = TWINS + sorted({p.stem for p in (CONF / "model").glob("*.yaml")} - set(TWINS))
# Bench-only variants: a config model, and the class below that replaces its recurrent core.
VARIANTS = {
    "lstm_manual_pytorch": ("lstm_manual", "PyTorchLSTM"),
    "lstm_manual_autograd": ("lstm_manual", "AutogradLSTM"),
}
DEFAULT_MODELS = [
    m for twin in TWINS for m in (twin, *(v for v, (base, _) in VARIANTS.items() if base == twin))
] + [m for m in MODELS if m not in TWINS]


def config_dir(text: str) -> str:
    """An argparse type: a config directory of one's own, as ``hydra.searchpath`` names it
    (``file://DIR``) or plainly (``DIR``), made absolute."""
    path = Path(text.removeprefix("file://")).absolute()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return str(path)


def searchpath_override(dirs: list[str]) -> list[str]:
    """The ``hydra.searchpath`` override that adds ``dirs`` to parity_lab's ``conf/`` (none: no
    override), each entry quoted for Hydra's grammar (a directory name may hold ``,`` or ``]``)."""
    from parity_lab.__main__ import hydra_quoted

    entries = ",".join(hydra_quoted(f"file://{d}") for d in dirs)
    return [f"hydra.searchpath=[{entries}]"] if dirs else []


def make_parser() -> Parser:
    """The command line's parser: nothing heavy imported."""
    parser = Parser(prog="python -m parity_lab.bench", description=__doc__)
    add = parser.add_argument
    add(
        "--models",
        nargs="+",
        default=None,
        metavar="MODEL",
        help="models to time: names of conf/model (default: every one: "
        f"{', '.join(MODELS)}), the variants {', '.join(VARIANTS)}, or a model/NAME.yaml "
        "of a --searchpath",
    )
    add(
        "--searchpath",
        type=config_dir,
        action="append",
        default=[],
        metavar="DIR",
        help="a config directory of your own (file://DIR, as in hydra.searchpath=[file://DIR]; "
        "repeatable): its model/*.yaml can be timed, in --models, --eval-model and "
        "--solve-overrides",
    )
    add(
        "--experiment",
        default=None,
        metavar="NAME",
        help="time the training step of conf/experiment/NAME.yaml instead (e.g. state_tracking, "
        "the published protocol): its batch, lengths, encoding, loss and optimizer with its "
        "parameter groups, through ParityModule.training_step; --batch, --min-len and "
        "--max-len are then the experiment's",
    )
    add("--batch", type=positive, default=128, help="strings per training step")
    add("--min-len", type=positive, default=1, help="shortest string of the timed batches")
    add("--max-len", type=positive, nargs="+", default=[20], help="one or more max_len to time")
    add("--hidden", type=positive, default=16, help="hidden size of every timed model")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add("--threads", type=positive, default=1, help="torch CPU threads")
    add("--compile", default=None, help="model.compile mode for the timed models (e.g. default)")
    add("--warmup", type=int, default=10, help="untimed steps before timing")
    add(
        "--compile-after",
        type=int,
        default=0,
        help="time steps a cell without step_backward runs eagerly before its derived graphs are "
        "compiled (training runs: 200000; 0 here times the compiled steady state, -1 never)",
    )
    add("--repeats", type=positive, default=7, help="timed blocks; the median block is reported")
    add("--steps", type=positive, default=20, help="training steps per timed block")
    add(
        "--solve-seeds",
        type=int,
        default=5,
        help="time the default run with seeds 0..N-1 (0: skip)",
    )
    add(
        "--solve-overrides",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="overrides for the timed default runs and the breakdown (e.g. model=gru)",
    )
    add(
        "--notebook-seeds",
        type=int,
        default=3,
        help="time the notebook baseline with seeds 0..N-1 (0: skip)",
    )
    add(
        "--notebook-max-steps",
        type=positive,
        default=20000,
        help="steps after which a notebook run counts as not solved",
    )
    add(
        "--notebook-eval-every",
        type=positive,
        default=100,
        help="steps between the notebook runs' checks on their 100 test strings",
    )
    add(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time data generation and evaluation within one default run",
    )
    add("--eval-bits", type=positive, nargs="*", default=[], help="string lengths to evaluate")
    add("--eval-strings", type=positive, default=512, help="strings per evaluated length")
    add(
        "--eval-chunk",
        type=int,
        nargs="+",
        default=[0],
        help="bits per chunk to time; 0: the model's own (ParityRNN.eval_chunk_len, else 64)",
    )
    add(
        "--eval-model",
        nargs="+",
        default=["lstm"],
        help="models to evaluate: a model name, optionally followed by ,key=value overrides",
    )
    add("--eval-repeats", type=positive, default=1, help="rounds of the evaluation timings")
    add(
        "--startup",
        action="store_true",
        help="only time whole processes (import torch, predict, a bad value, the default run)",
    )
    add("--startup-repeats", type=positive, default=5, help="rounds of the --startup commands")
    add("--output", default="outputs/bench.json", help="where to write the JSON results")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (run as a script, it is read once before torch loads: below)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.min_len > min(args.max_len):
        parser.error(f"--min-len {args.min_len} is longer than --max-len {min(args.max_len)}")
    own = sorted({p.stem for d in args.searchpath for p in Path(d, "model").glob("*.yaml")})
    known = [*MODELS, *own]
    args.models = MODELS if args.models is None else args.models
    for name in args.models:
        if name not in known and name not in VARIANTS:
            parser.error(f"--models {name!r}: not a model; the models are {known + list(VARIANTS)}")
    for setting in args.eval_model:
        if setting.split(",")[0] not in known:
            parser.error(f"--eval-model {setting!r}: the name before ',' must be one of {known}")
    experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    if args.experiment is not None and args.experiment not in experiments:
        parser.error(f"--experiment {args.experiment!r}: not an experiment; they are {experiments}")
    return args


if __name__ == "__main__":  # --help and usage errors answer before the seconds of import torch
    parse_args()

import torch
from torch import nn

from parity_lab.data import ParityBatch, ParityStream, eval_set, key_generator, sample_bits
from parity_lab.models import manual
from parity_lab.models.manual import ManualLSTM, ManualRecurrent


class PyTorchLSTM(ManualLSTM):
    """``lstm_manual`` without its C kernel: ``step`` and the hand-written ``step_backward``."""

    def native_layer(self, *_: Any) -> None:
        return None


class AutogradLSTM(PyTorchLSTM):
    """``lstm_manual``'s ``step`` alone, as a new cell is written: its backward is derived."""

    step_backward = ManualRecurrent.step_backward


def compose(*overrides: str) -> Any:
    """The real composed config (``conf/``), as ``python -m parity_lab`` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import parity_lab  # noqa: F401  (registers the ${input_size:...} resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_training_step(
    model_name: str, max_len: int, args: argparse.Namespace
) -> Callable[[], None]:
    """One model's training step (forward, loss, backward, optimizer step) on fixed batches."""
    from hydra.utils import instantiate

    overrides = [f"model={model_name}", f"model.hidden_size={args.hidden}"]
    if model_name in VARIANTS:
        config_name, class_name = VARIANTS[model_name]
        core = globals()[class_name]
        overrides[0] = f"model={config_name}"
        overrides.append(f"model.rnn._target_={core.__module__}.{core.__qualname__}")
    overrides += searchpath_override(args.searchpath)
    if args.compile:
        overrides.append(f"model.compile={args.compile}")
    if args.experiment:
        overrides.insert(0, f"experiment={args.experiment}")
    cfg = compose(*overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    if args.experiment:
        return experiment_step(model, cfg, max_len, args)
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    stream = ParityStream(0, args.min_len, max_len, args.batch, None, "bit")
    batches = [[t.to(device) for t in stream.batch(i)] for i in range(4)]
    index = [0]

    def step() -> None:
        x, lengths, targets = batches[index[0] % len(batches)]
        index[0] += 1
        last = (lengths - 1).unsqueeze(1)
        final = model(x, lengths).gather(1, last).squeeze(1)
        loss = loss_fn(final, targets.gather(1, last).squeeze(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def experiment_step(
    model: torch.nn.Module, cfg: Any, max_len: int, args: argparse.Namespace
) -> Callable[[], None]:
    """A training step as an experiment's runs take it: ``ParityModule.training_step`` (its loss,
    e.g. the published one at the answer alone) and the optimizer ``configure_optimizers`` builds
    (parameter groups, per-family decay), on fixed batches of the experiment's strings. The
    learning-rate schedule is left out: it changes the numbers, not the work."""
    from hydra.utils import instantiate

    from parity_lab.module import ParityModule

    device = torch.device(args.device)
    module = ParityModule(
        model, instantiate(cfg.loss), instantiate(cfg.optimizer), cfg.data.supervision, ["val"]
    )
    module.log = module.log_dict = lambda *_, **__: None  # type: ignore[method-assign]
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    stream = ParityStream(0, args.min_len, max_len, args.batch, None, cfg.data.encoding)
    batches = [ParityBatch(*(t.to(device) for t in stream.batch(i))) for i in range(4)]
    index = [0]

    def step() -> None:
        loss = module.training_step(batches[index[0] % len(batches)], index[0])
        index[0] += 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_step_ms(
    models: list[str], max_len: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Milliseconds per training step of several models at one max_len, timed in turn.

    Each repeat times one block of ``--steps`` steps of every model, one model after the other,
    so a change in the machine's load hits all of them alike and their ratios stay meaningful;
    the median block is reported, and the spread of the blocks beside it.
    """
    device = torch.device(args.device)
    steps = {}
    for name in models:
        start = time.perf_counter()
        steps[name] = make_training_step(name, max_len, args)
        for _ in range(args.warmup):
            steps[name]()
        synchronize(device)
        steps[name] = (steps[name], time.perf_counter() - start)
    blocks: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            step = steps[name][0]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(device)
            blocks[name].append((time.perf_counter() - start) / args.steps * 1e3)
    rows = []
    for name in models:
        ms = statistics.median(blocks[name])
        rows.append(
            {
                "model": name,
                "max_len": max_len,
                "ms_per_step": round(ms, 4),
                "ms_per_step_min": round(min(blocks[name]), 4),
                "ms_per_step_max": round(max(blocks[name]), 4),
                "strings_per_s": round(args.batch / ms * 1e3, 1),
                "setup_s": round(steps[name][1], 3),  # build, first steps, any compilation
            }
        )
    return rows


# (numerator, denominator) of the ratios printed beside the throughput table
PAIRS = [
    *((f"{m}_manual", m) for m in ("rnn", "lstm", "gru")),
    ("lstm_manual_pytorch", "lstm"),
    ("lstm_manual_autograd", "lstm_manual_pytorch"),
]


def ratios(throughput: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ms/step ratios of the ``PAIRS`` measured at the same max_len: hand-written over built-in,
    and a cell's derived backward over its hand-written one."""
    ms = {(r["model"], r["max_len"]): r["ms_per_step"] for r in throughput}
    lengths = sorted({r["max_len"] for r in throughput})
    return [
        {"pair": f"{a}/{b}", "max_len": n, "ratio": round(ms[a, n] / ms[b, n], 3)}
        for n in lengths
        for a, b in PAIRS
        if (a, n) in ms and (b, n) in ms
    ]


def project_env() -> dict[str, str]:
    """The environment of a ``python -m parity_lab`` child: this parity_lab first on the path,
    and the current directory kept, so that a user's own module beside it imports there too."""
    path = [str(CONF.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def default_run_times(seeds: int, overrides: list[str]) -> dict[str, Any]:
    """Wall time of ``python -m parity_lab`` as a subprocess (start-up included), per seed."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            run_dir = Path(tmp) / f"seed{seed}"
            command = [sys.executable, "-m", "parity_lab", f"seed={seed}", *overrides]
            start = time.perf_counter()
            subprocess.run(
                [*command, f"hydra.run.dir={run_dir}"],
                check=True,
                capture_output=True,
                env=project_env(),
            )
            wall = time.perf_counter() - start
            metrics = json.loads((run_dir / "metrics.json").read_text())
            runs.append(
                {
                    "seed": seed,
                    "wall_s": round(wall, 3),
                    "train_s": metrics["train_seconds"],
                    "solved": metrics["solved"],
                    "solved_step": metrics["solved_step"],
                }
            )
    return {
        "command": " ".join(["python -m parity_lab", *overrides]),
        "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_train_s": statistics.median(r["train_s"] for r in runs),
        "solved": sum(r["solved"] for r in runs),
    }


class NotebookRNN(nn.Module):
    """The notebook's fastest system: ``nn.RNN`` over a packed batch, a head on the final state."""

    def __init__(self, hidden_size: int = 8) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.head(h[-1]).squeeze(-1)


def notebook_time_to_solve(seed: int, max_steps: int, eval_every: int) -> dict[str, Any]:
    """Train the notebook's setting until it is right on every held-out string, or ``max_steps``.

    Its own test: 100 fresh strings of lengths 50..100, here fixed by the seed; checked every
    ``eval_every`` steps (the check's time is included, as the notebook evaluated as it went).
    """
    torch.manual_seed(seed)
    model = NotebookRNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    test_bits, test_lengths = sample_bits(key_generator(seed, "notebook_test"), 100, 50, 100)
    test_parity = test_bits.sum(1).remainder(2).float()
    start, solved_step = time.perf_counter(), None
    for step in range(1, max_steps + 1):
        bits, lengths = sample_bits(key_generator(seed, "notebook", step), 10, 1, 20)
        logits = model(bits.float().unsqueeze(-1), lengths)
        loss = loss_fn(logits, bits.sum(1).remainder(2).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0:
            with torch.inference_mode():
                predictions = model(test_bits.float().unsqueeze(-1), test_lengths) > 0
            if bool((predictions.float() == test_parity).all()):
                solved_step = step
                break
    return {
        "seed": seed,
        "train_s": round(time.perf_counter() - start, 3),
        "solved": solved_step is not None,
        "solved_step": solved_step,
    }


def notebook_times(seeds: int, max_steps: int, eval_every: int) -> dict[str, Any]:
    runs = [notebook_time_to_solve(seed, max_steps, eval_every) for seed in range(seeds)]
    return {
        "setting": "packed nn.RNN, hidden 8, batch 10, Adam lr 1e-2, lengths 1..20; solved = "
        f"100/100 strings of lengths 50..100 right (checked every {eval_every} steps), "
        f"cap {max_steps} steps; in-process, start-up excluded",
        "runs": runs,
        "median_train_s": statistics.median(r["train_s"] for r in runs),
        "solved": sum(r["solved"] for r in runs),
    }


def run_breakdown(overrides: list[str]) -> dict[str, Any]:
    """One default run in-process: its time against data generation and evaluation within it.

    Evaluation: wall time inside Lightning's validation and test loops (a callback times them).
    Data: the run's training batches and evaluation sets generated again, timed (each is a pure
    function of its key, so this replays exactly the work the run did).
    """
    import lightning as L

    from parity_lab.train import train

    class EvaluationTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds, self._start = 0.0, 0.0

        def _begin(self, *_: Any) -> None:
            self._start = time.perf_counter()

        def _end(self, *_: Any) -> None:
            self.seconds += time.perf_counter() - self._start

        on_validation_start = on_test_start = _begin
        on_validation_end = on_test_end = _end

    cfg = compose(*overrides)
    timer = EvaluationTimer()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = train(cfg, run_dir=Path(tmp), extra_callbacks=[timer])
        run_s = time.perf_counter() - start

    data = cfg.data
    stream = ParityStream(
        cfg.seed, data.min_len, data.max_len, data.batch_size, data.num_train, data.encoding
    )
    start = time.perf_counter()
    for step in range(metrics["global_step"]):
        stream.batch(step)
    eval_set(cfg.seed, "val", cfg.eval.num_val, data.min_len, data.max_len, data.encoding)
    for n in cfg.eval.lengths:
        eval_set(cfg.seed, f"len_{n}", cfg.eval.num_test, n, n, data.encoding)
    data_s = time.perf_counter() - start
    return {
        "command": f"train(compose({', '.join(map(repr, overrides))}))",
        "global_step": metrics["global_step"],
        "run_s": round(run_s, 3),
        "data_s": round(data_s, 3),
        "eval_s": round(timer.seconds, 3),
        "data_and_eval_share": round((data_s + timer.seconds) / run_s, 3),
    }


def peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This CPU's float32 matmul GFLOP/s on the torch threads set (a large square matmul, the best
    of ``repeats``), in CPU time: time the process waited for other processes does not count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best / 1e9


def weight_flops(model: nn.Module) -> int:
    """FLOPs per string and time step of the weight matrices (one multiply-add per weight):
    the arithmetic a recurrent layer cannot avoid. The head reads only the last position."""
    return 2 * sum(
        p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "head" not in name
    )


def evaluation_seconds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds to evaluate ``--eval-strings`` strings of each length in ``--eval-bits``, with
    each ``--eval-model`` (a model name, then optional ``,key=value`` overrides) and each
    ``--eval-chunk`` (0: the model's own). The settings take turns ``--eval-repeats`` times, so
    that load on a shared machine hits all alike; the median is kept, and beside it the weight
    FLOP/s achieved, against ``peak_gflops``."""
    from hydra.utils import instantiate

    from parity_lab.evaluate import accuracy_at_length, chunk_length

    peak = peak_gflops()
    models = {}
    for setting in args.eval_model:
        name, *overrides = setting.split(",")
        cfg = compose(
            f"model={name}",
            f"model.hidden_size={args.hidden}",
            *overrides,
            *searchpath_override(args.searchpath),
        )
        torch.manual_seed(0)
        model = instantiate(cfg.model).to(args.device).eval()
        accuracy_at_length(model, 64, args.eval_strings, 0, cfg.data.encoding)  # warm-up
        models[setting] = (model, cfg.data.encoding)
    cases = list(itertools.product(models, args.eval_bits, args.eval_chunk))
    times: dict[tuple[str, int, int], list[tuple[float, float, float]]] = {c: [] for c in cases}
    for _ in range(args.eval_repeats):
        for setting, bits, chunk in cases:
            model, encoding = models[setting]
            start, cpu_start = time.perf_counter(), time.process_time()
            accuracy = accuracy_at_length(
                model, bits, args.eval_strings, 0, encoding, chunk_len=chunk or None
            )
            synchronize(torch.device(args.device))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            times[setting, bits, chunk].append((cpu, seconds, accuracy))
    results = []
    for (setting, bits, chunk), runs in times.items():
        model = models[setting][0]
        cpu, seconds, accuracy = sorted(runs)[len(runs) // 2]
        gflops = weight_flops(model) * bits * args.eval_strings / cpu / 1e9
        results.append(
            {
                "model": setting,
                "bits": bits,
                "strings": args.eval_strings,
                "chunk_len": chunk_length(model, chunk or None),
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu, 3),
                "cpu_seconds_all": [round(run[0], 3) for run in runs],
                "weight_gflops": float(f"{gflops:.3g}"),
                "share_of_peak": float(f"{gflops / peak:.3g}"),
                "peak_gflops": round(peak, 1),
                "accuracy_untrained": accuracy,
            }
        )
    return results


def startup_times(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """Median wall seconds of whole processes, and each one's ratio to ``import torch``.

    The commands take turns, ``repeats`` rounds, so a change in the machine's load hits each alike.
    The default run is timed with ``overrides`` and ``predict`` reads the first such run.
    """
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        first_run = Path(tmp) / "run_0"
        commands: dict[str, Callable[[int], list[str]]] = {
            "import torch": lambda _: [python, "-c", "import torch"],
            "import lightning": lambda _: [python, "-c", "import lightning"],
            "default run": lambda i: [
                python,
                "-m",
                "parity_lab",
                *overrides,
                f"hydra.run.dir={Path(tmp) / f'run_{i}'}",
            ],
            "predict 0101": lambda _: [python, "-m", "parity_lab.predict", str(first_run), "0101"],
            "bad value": lambda _: [
                python,
                "-m",
                "parity_lab",
                "model.hidden_size=2.5",
                f"hydra.run.dir={tmp}/bad",
            ],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(repeats):
            for name, command in commands.items():
                start = time.perf_counter()
                done = subprocess.run(command(i), capture_output=True, text=True, env=project_env())
                seconds[name].append(round(time.perf_counter() - start, 3))
                if (done.returncode == 0) == (name == "bad value"):
                    raise RuntimeError(f"{name}: exit status {done.returncode}\n{done.stderr}")
        if (Path(tmp) / "bad").exists():
            raise RuntimeError("bad value: a run directory was left behind")
    torch_s = statistics.median(seconds["import torch"])
    return {
        "overrides": overrides,
        "rows": [
            {
                "command": name,
                "median_s": round(statistics.median(times), 3),
                "ratio_to_import_torch": round(statistics.median(times) / torch_s, 2),
                "seconds": times,
            }
            for name, times in seconds.items()
        ],
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [
        "  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    manual.COMPILE_AFTER = args.compile_after
    results: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": {
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "device_name": torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else "cpu",
        },
    }
    if args.startup:
        results["startup"] = startup_times(args.startup_repeats, args.solve_overrides)
        print(table(results["startup"]["rows"], ["command", "median_s", "ratio_to_import_torch"]))
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwritten to {args.output}")
        return results
    if args.experiment:  # its strings, not the command line's
        data = compose(f"experiment={args.experiment}").data
        args.batch, args.min_len, args.max_len = data.batch_size, data.min_len, [data.max_len]
    throughput = [row for n in args.max_len for row in training_step_ms(args.models, n, args)]
    results["throughput"] = throughput
    results["ratios"] = ratios(throughput)
    columns = ["model", "max_len", "ms_per_step", "ms_per_step_min", "ms_per_step_max"]
    print(table(throughput, [*columns, "strings_per_s", "setup_s"]))
    if results["ratios"]:
        print("\n" + table(results["ratios"], ["pair", "max_len", "ratio"]))

    solve: dict[str, Any] = {}
    solve_overrides = [*searchpath_override(args.searchpath), *args.solve_overrides]
    if args.solve_seeds:
        solve["default"] = default_run_times(args.solve_seeds, solve_overrides)
    if args.notebook_seeds:
        solve["notebook"] = notebook_times(
            args.notebook_seeds, args.notebook_max_steps, args.notebook_eval_every
        )
    results["time_to_solve"] = solve
    if solve:
        rows = [
            {
                "setting": name,
                "median_wall_s": entry.get("median_wall_s", "-"),
                "median_train_s": entry["median_train_s"],
                "solved": f"{entry['solved']}/{len(entry['runs'])}",
                "solved_steps": [r["solved_step"] for r in entry["runs"]],
            }
            for name, entry in solve.items()
        ]
        print(
            "\n"
            + table(rows, ["setting", "median_wall_s", "median_train_s", "solved", "solved_steps"])
        )

    if args.breakdown:
        results["breakdown"] = run_breakdown(solve_overrides)
        print(
            "\n"
            + table([results["breakdown"]], ["run_s", "data_s", "eval_s", "data_and_eval_share"])
        )
    if args.eval_bits:
        results["evaluation"] = evaluation_seconds(args)
        columns = ["model", "bits", "chunk_len", "strings", "seconds", "cpu_seconds"]
        columns += ["weight_gflops"]
        print("\n" + table(results["evaluation"], [*columns, "share_of_peak", "peak_gflops"]))

    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return results


if __name__ == "__main__":
    main()
