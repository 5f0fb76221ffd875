"""The performance paths: the benchmark's output, compiled training, chunked long evaluation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import parity_lab  # noqa: F401  (registers the ${input_size:...} resolver)
from parity_lab import bench
from parity_lab.data import key_generator
from parity_lab.evaluate import accuracy_at_length
from parity_lab.models import ParityRNN, manual

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _bench_leaves_compile_after_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench.main`` sets ``manual.COMPILE_AFTER`` for its process (0: time the compiled
    steady state); restored after each test, so that later tests in the same process do not
    compile their cells at once (an order-dependent failure of a test_hostile test)."""
    monkeypatch.setattr(manual, "COMPILE_AFTER", manual.COMPILE_AFTER)


def build(*overrides: str) -> ParityRNN:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    torch.manual_seed(0)
    return instantiate(cfg.model)


def test_bench_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    shrink = ["trainer.max_steps=3", "eval.num_val=16", "eval.num_test=16", "eval.lengths=[8]"]
    bench.main(
        ["--models", "rnn", "rnn_manual", "--batch", "4", "--max-len", "5", "6", "--hidden", "2"]
        + ["--warmup", "1", "--repeats", "2", "--steps", "2", "--solve-seeds", "1"]
        + ["--solve-overrides", *shrink, "--notebook-seeds", "1", "--notebook-max-steps", "4"]
        + ["--notebook-eval-every", "2", "--eval-bits", "30", "--eval-strings", "4"]
        + ["--eval-chunk", "8", "30"]
        + ["--output", str(output)]
    )
    results = json.loads(output.read_text())
    assert [(r["model"], r["max_len"]) for r in results["throughput"]] == [
        ("rnn", 5),
        ("rnn_manual", 5),
        ("rnn", 6),
        ("rnn_manual", 6),
    ]
    for row in results["throughput"]:
        assert 0 < row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert row["strings_per_s"] > 0 and row["setup_s"] > 0
    assert [(r["pair"], r["max_len"]) for r in results["ratios"]] == [
        ("rnn_manual/rnn", 5),
        ("rnn_manual/rnn", 6),
    ]
    default = results["time_to_solve"]["default"]
    assert default["command"] == "python -m parity_lab " + " ".join(shrink)
    assert [r["seed"] for r in default["runs"]] == [0] and default["median_wall_s"] > 0
    notebook = results["time_to_solve"]["notebook"]["runs"][0]
    assert notebook["solved_step"] is None or notebook["solved_step"] <= 4
    breakdown = results["breakdown"]
    assert breakdown["global_step"] == 3
    assert 0 < breakdown["data_and_eval_share"] < 1
    evaluation = [(r["bits"], r["chunk_len"], r["strings"]) for r in results["evaluation"]]
    assert evaluation == [(30, 8, 4), (30, 30, 4)]
    assert results["evaluation"][0]["weight_gflops"] > 0
    assert results["evaluation"][0]["share_of_peak"] > 0


def test_bench_times_an_experiments_own_training_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--experiment state_tracking`` times the published protocol's step: its strings (batch
    256 of 2..39 bits, whatever --batch and --max-len say) through ``training_step``, the loss
    at the answer, and the optimizer ``configure_optimizers`` builds (AdamW)."""
    from parity_lab.module import ParityModule

    seen: list[tuple[int, int]] = []
    step = ParityModule.training_step

    def spy(self: ParityModule, batch, index: int):  # noqa: ANN001, ANN202
        seen.append((len(batch.x), int(batch.lengths.min()), int(batch.lengths.max())))
        return step(self, batch, index)

    monkeypatch.setattr(ParityModule, "training_step", spy)
    output = tmp_path / "bench.json"
    bench.main(
        ["--experiment", "state_tracking", "--models", "mamba_signed", "--batch", "4"]
        + ["--max-len", "5", "--warmup", "1", "--repeats", "1", "--steps", "1"]
        + ["--solve-seeds", "0", "--notebook-seeds", "0", "--no-breakdown"]
        + ["--output", str(output)]
    )
    (row,) = json.loads(output.read_text())["throughput"]
    assert (row["model"], row["max_len"]) == ("mamba_signed", 39)
    assert len(seen) == 2 and all(rows == 256 for rows, _, _ in seen)
    assert min(low for _, low, _ in seen) >= 2 and max(high for _, _, high in seen) <= 39


def test_ratios_pair_twins_and_the_derived_backward() -> None:
    rows = [
        {"model": m, "max_len": n, "ms_per_step": ms}
        for m, n, ms in [
            ("lstm", 20, 2.0),
            ("lstm_manual", 20, 1.0),
            ("lstm_manual_pytorch", 20, 4.0),
            ("lstm_manual_autograd", 20, 5.0),
            ("lstm", 50, 3.0),
        ]
    ]
    assert bench.ratios(rows) == [
        {"pair": "lstm_manual/lstm", "max_len": 20, "ratio": 0.5},
        {"pair": "lstm_manual_pytorch/lstm", "max_len": 20, "ratio": 2.0},
        {"pair": "lstm_manual_autograd/lstm_manual_pytorch", "max_len": 20, "ratio": 1.25},
    ]


def test_weight_flops_count_one_multiply_add_per_weight() -> None:
    model = build("model=lstm", "model.hidden_size=16")  # W_ih 64x1, W_hh 64x16; head excluded
    assert bench.weight_flops(model) == 2 * (64 * 1 + 64 * 16)


def test_bench_variants_are_lstm_manual_without_kernel_and_without_backward() -> None:
    from parity_lab.models.manual import ManualRecurrent

    assert bench.AutogradLSTM.step_backward is ManualRecurrent.step_backward
    assert bench.PyTorchLSTM(1, 2).native_layer(None, None, None, ()) is None
    for name in bench.VARIANTS:
        assert name in bench.DEFAULT_MODELS


@pytest.mark.parametrize("model", ["lstm_manual", "gru"])
def test_compiled_training_forward_equals_eager(model: str, monkeypatch) -> None:
    """model.compile traces the training forward (the manual cells' loop as plain ops, the
    backward derived by the compiler); logits and gradients equal eager. On CPU the compiler
    backend is swapped for aot_eager: the same tracing, without the ~30 s of code generation."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = build(f"model={model}", "model.hidden_size=3")
    compiled = build(f"model={model}", "model.hidden_size=3", "model.compile=default")
    assert compiled._compiled_run is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    x, lengths = torch.randint(0, 2, (4, 6, 1)).float(), torch.full((4,), 6)
    logits_eager, logits_compiled = eager(x, lengths), compiled(x, lengths)
    torch.testing.assert_close(logits_compiled, logits_eager, atol=1e-5, rtol=0)
    logits_eager.square().sum().backward()
    logits_compiled.square().sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_steps_equal_eager() -> None:
    eager = build("model=lstm_manual").cuda()
    graphed = build("model=lstm_manual", "model.compile=reduce-overhead").cuda()
    graphed.load_state_dict(eager.state_dict())
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (eager, graphed)]
    for step in range(4):  # static shapes: every batch (128, 20)
        g = key_generator(0, "cuda", step)
        x = torch.randint(0, 2, (128, 20, 1), generator=g).float().cuda()
        lengths = torch.full((128,), 20, device="cuda")
        for model, optimizer in zip((eager, graphed), optimizers, strict=True):
            optimizer.zero_grad()
            model(x, lengths)[:, -1].square().mean().backward()
            optimizer.step()
    for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_chunked_evaluation_equals_one_pass() -> None:
    """Chunks carry the state across: the accuracy is the one-pass accuracy on the same strings."""
    model = build("model=lstm").eval()
    generator = key_generator(3, "long", 50)  # the strings accuracy_at_length draws, chunk by chunk
    bits = torch.cat(
        [torch.randint(0, 2, (64, n), generator=generator) for n in (7,) * 7 + (1,)], 1
    )
    with torch.no_grad():
        logits = model(bits.float().unsqueeze(-1), torch.full((64,), 50))[:, -1]
    expected = ((logits > 0).long() == bits.sum(1) % 2).float().mean().item()
    assert accuracy_at_length(model, 50, 64, seed=3, chunk_len=7) == expected


def test_unknown_compile_mode_is_a_config_error() -> None:
    from parity_lab.config import ConfigError, validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model.compile=fastest"])
    with pytest.raises(ConfigError, match="model.compile='fastest'"):
        validate(cfg)


def test_bench_startup_times_whole_processes_against_import_torch(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    shrink = ["trainer.max_steps=2", "eval.num_val=8", "eval.num_test=8", "eval.lengths=[4]"]
    bench.main(
        [
            "--startup",
            "--startup-repeats",
            "1",
            "--solve-overrides",
            *shrink,
            "--output",
            str(output),
        ]
    )
    rows = {row["command"]: row for row in json.loads(output.read_text())["startup"]["rows"]}
    assert set(rows) == {
        "import torch",
        "import lightning",
        "default run",
        "predict 0101",
        "bad value",
    }
    assert rows["import torch"]["ratio_to_import_torch"] == 1.0
    for row in rows.values():
        assert row["median_s"] > 0 and len(row["seconds"]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-len", "0"], "argument --max-len: '0' is not an integer >= 1"),
        (["--batch", "x"], "argument --batch: 'x' is not an integer >= 1"),
        (["--min-len", "30", "--max-len", "50", "20"], "--min-len 30 is longer than --max-len 20"),
    ],
)
def test_bench_refuses_bad_sizes_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, the usage not repeated
    assert line.endswith(f"{message} (see --help)")


def test_bench_refuses_an_unknown_experiment_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--experiment", "published"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--experiment 'published': not an experiment; they are [" in line
    assert "'state_tracking'" in line and line.endswith("] (see --help)")
