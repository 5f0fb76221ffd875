"""``python -m parity_lab.predict RUN_DIR [BITS ...]``: a trained run's parity of each bit string.

Prints one line per string, ``bits<TAB>parity<TAB>probability``: ``probability`` is the model's
probability that the string's parity is 1, and ``parity`` is 1 exactly when it exceeds 0.5. A
string over 64 bits is echoed as its first and last 20 bits and its length. Any argument that is
not a bit string (the empty one ``''`` too) is refused in one line before any output.
Strings come from the command line, or from stdin (one per line) when none are given. The model
is rebuilt from ``RUN_DIR/.hydra/config.yaml``, only from the project's own model classes, and
its weights are read from ``RUN_DIR/checkpoints/last.ckpt`` with ``torch.load(weights_only=True)``,
which never runs code stored in the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from parity_lab.cli import Parser, add_trust_argument
from parity_lab.run_files import (
    RunFileError,
    check_checkpoint_archive,
    first_line,
    read_run_config,
    trust,
)

if TYPE_CHECKING:  # torch loads only once the arguments are read: --help answers at once
    import torch
    from omegaconf import DictConfig

    from parity_lab.models import ParityRNN

BIT_STRING = re.compile("[01]+")


class PredictError(ValueError):
    """Bad input to ``predict``: the message says which and why."""


def check_bit_strings(strings: list[str]) -> None:
    for bits in strings:
        if not BIT_STRING.fullmatch(bits):
            shown = bits if len(bits) <= 40 else bits[:40] + "..."
            raise PredictError(f"{shown!r} is not a bit string: expected one or more of 0 and 1")


def shown(bits: str, limit: int = 64) -> str:
    """``bits`` as echoed: whole up to ``limit`` bits, else its first and last 20 and its length
    (a string of 10^6 bits would print a 1 MB line)."""
    return bits if len(bits) <= limit else f"{bits[:20]}...{bits[-20:]} ({len(bits)} bits)"


def check_readable(model: ParityRNN, strings: list[str]) -> None:
    """Refuse strings longer than the model reads (a Transformer's ``model.max_len``)."""
    longest = max(map(len, strings), default=0)
    if model.max_len is not None and longest > model.max_len:
        raise PredictError(
            f"a string of {longest} bits is longer than model.max_len={model.max_len}, "
            "the longest this run's model reads"
        )


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what its state dict holds."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def non_finite_weight(state_dict: dict[str, torch.Tensor]) -> str | None:
    import torch

    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in state_dict.items():
        floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        if floating and not torch.isfinite(tensor).all():
            return name
    return None


def load_run(run_dir: Path) -> tuple[ParityRNN, DictConfig]:
    """The run's model with the weights of its last checkpoint, and the run's config.

    The config is resolved once, checked like a training config, and built as those plain
    values, only from the classes the project's ``conf/`` files name: a run directory is data,
    and any other ``_target_`` in it is refused unbuilt. The checkpoint's sizes are checked in
    its archive before any tensor is read, and weights that are not finite are refused.
    """
    import torch
    from hydra.utils import instantiate

    from parity_lab.config import ConfigError, validate

    config_path = run_dir / ".hydra" / "config.yaml"
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    if not config_path.is_file():
        raise PredictError(f"{config_path} not found: expected the directory of a run")
    if not checkpoint_path.is_file():
        raise PredictError(f"{checkpoint_path} not found: the run has not saved a checkpoint yet")
    try:
        cfg = read_run_config(config_path)
        validate(cfg, for_training=False)
    except RunFileError as error:
        raise PredictError(str(error)) from None
    except ConfigError as error:
        raise PredictError(f"{config_path}: config error: {error}") from None
    except Exception as error:
        raise PredictError(f"{config_path}: not a run config ({first_line(error)})") from None
    try:
        model: ParityRNN = instantiate(cfg.model)
    except Exception as error:
        raise PredictError(f"{config_path}: cannot build its model ({first_line(error)})") from None
    try:
        check_checkpoint_archive(checkpoint_path, tensor_bytes(model))
    except RunFileError as error:
        raise PredictError(f"cannot load {error}") from None
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        state_dict = checkpoint["state_dict"]
    except Exception as error:  # the weights-only unpickler refuses anything but plain data
        raise PredictError(
            f"cannot load {checkpoint_path} as weights only: {first_line(error)}"
        ) from None
    try:
        weights = {
            name.removeprefix("model."): tensor
            for name, tensor in state_dict.items()
            if name.startswith("model.")
        }
        model.load_state_dict(weights)
    except Exception as error:
        raise PredictError(
            f"{checkpoint_path} does not fit the model of {config_path}: {first_line(error)}"
        ) from None
    if (name := non_finite_weight(weights)) is not None:
        raise PredictError(
            f"{checkpoint_path}: weight {name} is not finite (NaN or infinity): a broken model "
            "cannot answer"
        )
    return model.eval(), cfg


def parity_probabilities(
    model: ParityRNN, strings: list[str], encoding: str, chunk_len: int | None = None
) -> list[float]:
    """Probability that each string's parity is 1, read at its last bit.

    Strings of equal length run as one batch, ``chunk_len`` bits at a time with the recurrent
    state carried across, so memory does not grow with the string length.
    """
    import torch

    from parity_lab.data import encode
    from parity_lab.evaluate import chunk_length

    chunk_len = chunk_length(model, chunk_len)
    with torch.no_grad():
        by_length: dict[int, list[int]] = {}
        for index, bits in enumerate(strings):
            by_length.setdefault(len(bits), []).append(index)
        probabilities = [0.0] * len(strings)
        for indices in by_length.values():
            rows = [bytearray(strings[i], "ascii") for i in indices]
            bits = torch.stack([torch.frombuffer(r, dtype=torch.uint8) for r in rows]).long()
            bits -= ord("0")
            state, last_logits = None, None
            for chunk in bits.split(chunk_len, dim=1):
                lengths = torch.full((len(indices),), chunk.shape[1])
                logits, state = model.run(encode(chunk, lengths, encoding), state)
                last_logits = logits[:, -1]
            for i, probability in zip(indices, torch.sigmoid(last_logits.double()), strict=True):
                probabilities[i] = probability.item()
        return probabilities


def stdin_strings() -> list[str]:
    """The strings on stdin, one a line; blank lines are skipped."""
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PredictError(
            f"stdin is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}): "
            "expected bit strings, one a line"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def make_parser() -> Parser:
    """The command line's parser: nothing heavy imported."""
    parser = Parser(prog="python -m parity_lab.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a trained run (outputs/runs/...)"
    )
    parser.add_argument(
        "bits", nargs="*", metavar="BITS", help="bit strings; read from stdin when none given"
    )
    add_trust_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, read before torch loads (this module imports it lazily)."""
    return make_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trust(args.trust)
    try:
        strings = args.bits or stdin_strings()
        check_bit_strings(strings)
        model, cfg = load_run(args.run_dir)
        check_readable(model, strings)
    except PredictError as error:
        sys.exit(f"predict: {error}")
    import torch

    torch.set_num_threads(cfg.num_threads)
    probabilities = parity_probabilities(model, strings, cfg.data.encoding)
    try:
        for bits, probability in zip(strings, probabilities, strict=True):
            print(f"{shown(bits)}\t{int(probability > 0.5)}\t{probability:.6f}")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (``| head -1``): stop quietly, as the docs of
        # Python's signal module advise, so the exit-time flush does not complain either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
