"""parity_lab: recurrent networks learning parity, under Hydra + Lightning."""

from omegaconf import OmegaConf

from parity_lab.naming import job_dir_name, run_dir_suffix

ENCODING_SIZES = {"bit": 1, "pair": 2}  # data.encoding -> network input size
# model.head: one logit per position, or the published 3-way head over (pad, bit 0, bit 1)
HEADS = ("logit", "tokens")
READOUTS = ("last", "padded_end")  # model.readout: where a string's prediction is read
# model.compile: None (eager) or a torch.compile mode; reduce-overhead replays CUDA graphs.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# data.density: every training bit a fair coin, or each training string's chance of a 1
# uniform in [0, 1] (long runs of 0s and of 1s, the strings that break leaky networks)
DENSITIES = ("fair", "uniform")
SCHEDULES = ("none", "linear", "warmup")  # data.curriculum.schedule (see data.Curriculum)
LR_SHAPES = ("cosine", "linear")  # scheduler.shape: the lr's fall after warm-up (warmup_decay)
# model.eigenvalues of linear_rnn / deltanet: transition values in [0, 1] or in [-1, 1]
EIGENVALUES = ("positive", "signed")
# model.positional of the transformer: how a position is coded (``none``: causal mask only)
POSITIONAL = ("sinusoidal", "learned", "none")


def _input_size(encoding: str) -> int:
    if encoding not in ENCODING_SIZES:
        raise ValueError(f"data.encoding={encoding!r}: allowed values are {list(ENCODING_SIZES)}")
    return ENCODING_SIZES[encoding]


# Model configs read their input size from the data encoding: ${input_size:${data.encoding}}.
OmegaConf.register_new_resolver("input_size", _input_size, replace=True)
# Directory names in conf/config.yaml (hydra.run.dir, hydra.sweep.subdir); see parity_lab.naming.
OmegaConf.register_new_resolver("run_dir_suffix", run_dir_suffix, replace=True)
OmegaConf.register_new_resolver("job_dir_name", job_dir_name, replace=True)
