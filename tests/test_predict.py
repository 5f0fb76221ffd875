"""``python -m parity_lab.predict``: right parities from a trained run, stdin, clean errors, long
strings in chunks, and weights-only loading that never runs code from the checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity_lab.data import make_batch
from parity_lab.predict import PredictError, load_run, parity_probabilities
from tests.conftest import FAST, ROOT


def predict(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "parity_lab.predict", *args]
    return subprocess.run(
        command, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300
    )


def parity(bits: str) -> int:
    return bits.count("1") % 2


def random_strings(num: int, max_len: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num,), generator=generator).tolist()
    bits = [torch.randint(0, 2, (n,), generator=generator).tolist() for n in lengths]
    return ["".join(map(str, string)) for string in bits]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run that solves lengths 1..20 and generalises to 50 (the default run, shrunk)."""
    torch.set_num_threads(1)  # as the run did (num_threads: 1); the CPU is shared
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    command = [sys.executable, "-m", "parity_lab", *FAST, "eval.lengths=[50]"]
    subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True, capture_output=True
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/acc"] == 1.0 and metrics["test/acc_len_50"] == 1.0  # random strings
    return run_dir


def test_predictions_are_the_parity_on_a_trained_run(trained_run: Path) -> None:
    model, cfg = load_run(trained_run)
    strings = random_strings(300, max_len=50)
    probabilities = parity_probabilities(model, strings, cfg.data.encoding)
    assert [int(p > 0.5) for p in probabilities] == [parity(bits) for bits in strings]


def test_chunks_and_grouping_by_length_change_nothing(trained_run: Path) -> None:
    """Chunked, length-grouped probabilities equal one padded forward pass, in input order."""
    model, cfg = load_run(trained_run)
    strings = random_strings(40, max_len=300, seed=1)
    chunked = parity_probabilities(model, strings, cfg.data.encoding, chunk_len=7)
    lengths = torch.tensor([len(bits) for bits in strings])
    bits = torch.zeros(len(strings), int(lengths.max()), dtype=torch.int64)
    for row, string in enumerate(strings):
        bits[row, : len(string)] = torch.tensor([int(c) for c in string])
    batch = make_batch(bits, lengths, cfg.data.encoding)
    with torch.no_grad():
        final = model.final_logits(model(batch.x, batch.lengths), batch.lengths)
    assert chunked == pytest.approx(torch.sigmoid(final.double()).tolist(), abs=1e-6)


def test_prints_bits_parity_and_probability_per_string(trained_run: Path) -> None:
    strings = ["0110", "1011001", "1", "1" * 101]
    result = predict(str(trained_run), *strings)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [bits for bits, _, _ in lines] == [
        *strings[:3],
        "1" * 20 + "..." + "1" * 20 + " (101 bits)",
    ]
    assert [int(p) for _, p, _ in lines] == [parity(bits) for bits in strings]
    assert all((float(prob) > 0.5) == (p == "1") for _, p, prob in lines)
    from_stdin = predict(str(trained_run), stdin="".join(f"{bits}\n" for bits in strings))
    assert from_stdin.returncode == 0 and from_stdin.stdout == result.stdout


@pytest.mark.parametrize(
    ("args", "stdin", "named"),
    [
        (["0110", "01a1"], None, "'01a1' is not a bit string"),
        (["0110", ""], None, "'' is not a bit string"),
        ([], "0110\n\n1 0\n", "'1 0' is not a bit string"),  # blank lines are skipped
    ],
    ids=["argument", "empty-argument", "stdin-line"],
)
def test_a_string_that_is_not_bits_is_named_before_any_output(
    trained_run: Path, args: list[str], stdin: str | None, named: str
) -> None:
    result = predict(str(trained_run), *args, stdin=stdin)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip() == f"predict: {named}: expected one or more of 0 and 1"


class OpensFileWhenUnpickled:
    """Unpickling it calls ``open(path, "w")``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_checkpoint_is_loaded_as_weights_only(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    marker = tmp_path / "code_ran"
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    torch.save({**checkpoint, "extra": OpensFileWhenUnpickled(marker)}, last)

    with pytest.raises(PredictError, match=f"cannot load {last} as weights only"):
        load_run(run_dir)
    assert not marker.exists()
    torch.load(last, weights_only=False)  # what full unpickling would have done
    assert marker.exists()


def test_missing_run_or_checkpoint_is_a_clean_error(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="config.yaml not found: expected the directory of a"):
        load_run(tmp_path / "nowhere")
    shutil.copytree(trained_run / ".hydra", tmp_path / "unsaved" / ".hydra")
    with pytest.raises(PredictError, match="the run has not saved a checkpoint yet"):
        load_run(tmp_path / "unsaved")
