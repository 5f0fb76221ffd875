"""Whole-sequence C kernels for the hand-written cells, compiled on first use.

``ManualLSTM`` runs its equations through ``kernels/lstm.c`` when it can: one call runs every
time step of a layer, forward or backward, instead of about ten PyTorch operations per step (on a
CPU, small recurrent models spend most of their time launching operations, not computing). The
Python ``step`` and ``step_backward`` stay the reference: they run whenever the kernel cannot
(float64, GPU, under ``torch.compile``, no C compiler) and the tests hold the two to each other.

The kernel is compiled with the system C compiler (``$CC``, else ``cc``) into
``$PARITY_LAB_CACHE`` (default ``~/.cache/parity_lab``), once per source, hidden size, compiler and
CPU (a fixed hidden size keeps a row's gates in vector registers); a build takes under a second.
``PARITY_LAB_NATIVE=0`` turns the kernels off. When no compiler works, the cells stay in PyTorch
and one warning says so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

KERNELS = Path(__file__).resolve().parent / "kernels"
# -ffast-math lets the compiler call a vectorised exp (glibc's libmvec); the kernels clamp exp's
# argument, so no infinity arises (a vectorised division is a reciprocal estimate, NaN on one).
# Without -march=native (not every compiler has it) the build is retried portable.
FLAGS = [["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], ["-O3", "-ffast-math"]]
# Linked apart from the compile, without -ffast-math: GCC links crtfastmath.o into a -ffast-math
# shared library, whose constructor sets flush-to-zero and denormals-are-zero for the whole
# process on load, so that PyTorch's own float32 results then depended on whether a kernel had
# been loaded (1e-39 * 1 gave 0).
LINK = "-shared"


def enabled() -> bool:
    return os.environ.get("PARITY_LAB_NATIVE", "1") != "0"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parity_lab"
    return Path(os.environ.get("PARITY_LAB_CACHE", default))


def cpu_signature() -> str:
    """The CPU's model and flags: a -march=native build is kept per CPU (shared home directories
    on clusters mix machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(library: Path) -> bool:
    """Whether ``library`` is a whole build: its bytes hash to what its ``.sha256`` file, written
    after it, records. A library cut short (a full disk, a crash, a copy) is mapped by dlopen
    and kills the process with SIGBUS when touched, so it is never loaded unchecked."""
    record = library.with_name(library.name + ".sha256")
    try:
        return record.read_text().strip() == digest(library)
    except OSError:
        return False


def build(name: str, hidden: int) -> Path:
    """Compile ``kernels/<name>.c`` for one hidden size into the cache, or find a verified build
    there; a cached library that fails its check is built again. ``$CC`` may hold arguments
    (``ccache gcc``)."""
    source = KERNELS / f"{name}.c"
    compiler = shlex.split(os.environ.get("CC", "")) or [
        shutil.which("cc") or shutil.which("gcc") or "cc"
    ]
    errors = []
    for flags in FLAGS:
        flags = [*flags, f"-DHIDDEN={hidden}"]
        headers = [header.read_text() for header in sorted(KERNELS.glob("*.h"))]
        recipe = [source.read_text(), *headers, *compiler, *flags, LINK, cpu_signature()]
        key = hashlib.sha256("\0".join(recipe).encode()).hexdigest()[:16]
        library = cache_dir() / f"{name}-h{hidden}-{key}.so"
        if cached(library):
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: parallel jobs never load a half-written library,
        # and one that has mapped the old file keeps it (a rename never truncates it)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built, objects = Path(tmp) / library.name, Path(tmp) / f"{name}.o"
            command = [*compiler, *flags, "-fPIC", "-c", str(source), "-o", str(objects)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                command = [*compiler, LINK, str(objects), "-o", str(built), "-lm"]
                result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                record = Path(tmp) / "sha256"
                record.write_text(digest(built) + "\n")
                os.replace(built, library)
                os.replace(record, library.with_name(library.name + ".sha256"))
                return library
            errors.append(f"{' '.join(command)}: {result.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


Signature = tuple[str, tuple[Any, ...], Any]  # a C function's name, argument types, return type
SIZE, INT, ADDRESS = ctypes.c_long, ctypes.c_int, ctypes.c_void_p


@functools.cache
def kernel(name: str, size: int, purpose: str, signatures: tuple[Signature, ...]) -> Any:
    """``kernels/<name>.c`` built for ``size`` (a ``ctypes.CDLL`` with ``signatures`` set), or
    None, with one warning naming ``purpose`` (what then runs in PyTorch), when it cannot be built
    or ``PARITY_LAB_NATIVE=0``."""
    if not enabled():
        return None
    try:
        library = ctypes.CDLL(str(build(name, size)))
        for function, argtypes, restype in signatures:
            getattr(library, function).argtypes = list(argtypes)
            getattr(library, function).restype = restype
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"parity_lab: could not build the C kernel {name}.c, {purpose} runs in PyTorch "
            f"(slower, same results): {error}",
            stacklevel=2,
        )
        return None
    return library


def load(name: str, hidden: int) -> Any:
    """The LSTM kernel library for one hidden size, or None (with a warning)."""
    head = (SIZE, SIZE)
    return kernel(
        name,
        hidden,
        "the hand-written cells",
        (
            ("lstm_forward", (*head, ADDRESS, SIZE, SIZE) + (ADDRESS,) * 6, None),
            ("lstm_backward", head + (ADDRESS,) * 5 + (SIZE, SIZE) + (ADDRESS,) * 3, None),
        ),
    )


def runs_on_cpu_float32(*tensors: torch.Tensor) -> bool:
    """Whether a kernel could run these tensors: CPU float32, not being traced."""
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and not torch.compiler.is_compiling()
    )


def pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def lstm_applies(x_proj: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the LSTM kernel can run these tensors (CPU float32, not being traced)."""
    return runs_on_cpu_float32(x_proj, *tensors) and load("lstm", x_proj.shape[-1] // 4) is not None


def lstm_inference(
    x_proj: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs (T,B,H) and final (h, c) of one layer from ``x_proj = W_ih x + b_ih`` (T,B,4H)."""
    h, c, _, _ = lstm_forward(x_proj, weight_hh, bias_hh, h0, c0, record=False)
    steps = x_proj.shape[0]
    return h[1:], h[steps].clone(), c[steps % 2].clone()


def lstm_forward(
    x_proj: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    record: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The kernel's forward: ``h`` (T+1,B,H) from ``h[0] = h0``, and ``c``, either every step's
    (T+1,B,H) with the gate activations and ``tanh(c)`` that the backward needs (``record``), or
    only two alternating rows (the last is ``c[T % 2]``) and None, None."""
    steps, batch, gates = x_proj.shape
    hidden = gates // 4
    h = x_proj.new_empty(steps + 1, batch, hidden)
    c = x_proj.new_empty(steps + 1 if record else 2, batch, hidden)
    act = x_proj.new_empty(steps, batch, gates) if record else None
    tanh_c = x_proj.new_empty(steps, batch, hidden) if record else None
    h[0], c[0] = h0, c0
    # the C call reads raw addresses: every tensor it reads must stay referenced until it returns
    weight_hh_t, bias_hh = weight_hh.t().contiguous(), bias_hh.contiguous()
    x_proj = x_proj if x_proj.stride(-1) == 1 else x_proj.contiguous()
    load("lstm", hidden).lstm_forward(
        steps, batch, pointer(x_proj), x_proj.stride(0), x_proj.stride(1), pointer(bias_hh),
        pointer(weight_hh_t), pointer(h), pointer(c), pointer(act), pointer(tanh_c),
    )  # fmt: skip
    return h, c, act, tanh_c


def lstm_training(
    x_proj: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lstm_inference`` with gradients: the kernel's backward runs in autograd's."""
    return FusedLSTM.apply(x_proj, weight_hh, bias_hh, h0, c0)


class FusedLSTM(torch.autograd.Function):
    """``apply(x_proj, weight_hh, bias_hh, h0, c0) -> (outputs, h_T, c_T)`` of one layer through
    the C kernel, from ``x_proj = W_ih x + b_ih`` (T,B,4H)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_proj: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor,
        h0: torch.Tensor,
        c0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, c, act, tanh_c = lstm_forward(x_proj, weight_hh, bias_hh, h0, c0, record=True)
        steps = x_proj.shape[0]
        ctx.save_for_backward(weight_hh, h, c, act, tanh_c)
        return h[1:], h[steps].clone(), c[steps].clone()

    @staticmethod
    def backward(
        ctx: Any,
        grad_outputs: torch.Tensor | None,
        grad_h: torch.Tensor | None,
        grad_c: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        weight_hh, h, c, act, tanh_c = ctx.saved_tensors
        steps, batch, hidden = tanh_c.shape
        grad_h = torch.zeros_like(h[0]) if grad_h is None else grad_h.contiguous().clone()
        grad_c = torch.zeros_like(c[0]) if grad_c is None else grad_c.contiguous().clone()
        grad_pre = torch.empty_like(act)
        if grad_outputs is not None and grad_outputs.stride(-1) != 1:
            grad_outputs = grad_outputs.contiguous()
        strides = (0, 0) if grad_outputs is None else grad_outputs.stride()[:2]
        weight_hh = weight_hh.contiguous()
        load("lstm", hidden).lstm_backward(
            steps, batch, pointer(act), pointer(c), pointer(tanh_c), pointer(weight_hh),
            pointer(grad_outputs), *strides, pointer(grad_h), pointer(grad_c), pointer(grad_pre),
        )  # fmt: skip
        flat = grad_pre.flatten(0, 1)
        grad_weight_hh = flat.t().mm(h[:-1].flatten(0, 1))
        return grad_pre, grad_weight_hh, flat.sum(0), grad_h, grad_c
