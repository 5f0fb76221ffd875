"""What a run shows in TensorBoard besides its curves: a short HParams record, the Text tab, and a
logger that keeps the run in one event file.

HParams shows, by default, the first 5 settings TensorBoard lists (those marked as differing
first) and then every metric, each column 10em wide: at 1400 px, 4 columns past the trial's
name. So a run records few settings: in a sweep the swept keys, then the model; in a single run
the model and its command-line overrides. What stays the same across a sweep is in each run's
Text tab (the composed config). Every run declares the same metric list (``metric_tags``), the
main results first, since TensorBoard takes the experiment definition from one run: a metric a
run did not measure is then only blank for that run.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from torch.utils.tensorboard import SummaryWriter

from parity_lab.naming import override_values

MAX_SETTINGS = 12  # a single run with many overrides: the first ones
NOT_SETTINGS = ("resume", "name", "sweep")  # overrides that do not change what is trained
Setting = bool | int | float | str


@dataclass(frozen=True)
class RunOrigin:
    """How Hydra started a run, as its ``.hydra/hydra.yaml`` records it (a resumed run keeps its
    original record): the group choices, the command-line overrides, and which keys were swept
    (those not in ``override_dirname.exclude_keys``, see ``parity_lab.naming``)."""

    choices: dict[str, str]
    overrides: list[str]
    swept: list[str]
    searchpath: list[str] = dataclasses.field(default_factory=list)  # the user's config dirs
    cwd: str = ""  # where the run started: a relative searchpath and the user's module are there

    @classmethod
    def of(cls, run_dir: Path) -> RunOrigin:
        path = run_dir / ".hydra" / "hydra.yaml"
        if not path.is_file():  # train() called directly, without Hydra
            return cls({}, [], [])
        hydra = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
        overrides = [str(o) for o in hydra["overrides"]["task"]]
        excluded = hydra["job"]["config"]["override_dirname"]["exclude_keys"]
        swept = list(override_values(overrides)) if hydra["mode"] == "MULTIRUN" else []
        choices = {k: str(v) for k, v in hydra["runtime"]["choices"].items() if v is not None}
        searchpath = [
            str(o) for o in hydra["overrides"]["hydra"] if str(o).startswith("hydra.searchpath=")
        ]
        swept = [k for k in swept if k not in excluded]
        return cls(choices, overrides, swept, searchpath, str(hydra["runtime"]["cwd"]))

    @property
    def command(self) -> str:
        """The command that reruns this run (one job of a sweep alone); a run of the user's own
        configs reruns from the directory it started in, with their ``hydra.searchpath``."""
        command = shlex.join(["python", "-m", "parity_lab", *self.searchpath, *self.overrides])
        return f"cd {shlex.quote(self.cwd)} && {command}" if self.searchpath else command


def run_settings(cfg: DictConfig, origin: RunOrigin) -> dict[str, Setting]:
    """The run's HParams settings: in a sweep the swept keys, then the model; in a single run the
    model, then the other command-line overrides (what set this run apart when it was started).

    A swept key's value is its text on the command line (``4``, ``0.01``, ``null``, as in the
    job's name): one type across the jobs of a sweep, whichever job TensorBoard takes the
    experiment definition from, shown without TensorBoard's ``4.0000``. A group's value is its
    choice (``model: gru``). Other values are read from the config and keep their type (an int
    stays an int); nulls are left out and lists become text.
    """
    values = override_values(origin.overrides)
    keys = [*origin.swept, "model", *([] if origin.swept else values)]
    settings: dict[str, Setting] = {}
    for key in dict.fromkeys(k for k in keys if k not in NOT_SETTINGS):
        if key in origin.swept:
            value: Any = values[key]
        elif key in origin.choices:
            value = origin.choices[key]
        else:
            value = OmegaConf.select(cfg, key, default=None)
            if OmegaConf.is_list(value):
                value = str(OmegaConf.to_container(value))
        if value is None or OmegaConf.is_config(value):  # a group without Hydra's choice record
            continue
        settings[key] = value
        if len(settings) == MAX_SETTINGS:
            break
    return settings


WHOLE_RUN = "whole_run"  # the scalar group of one value per run; TensorBoard sorts it after val/


def metric_tags(cfg: DictConfig) -> list[str]:
    """The HParams metrics, the same list for every run, the main results first; each is a
    scalar tag whose last value is the run's result (``val/acc_len_<L>`` ends at the value
    ``metrics.json`` calls ``test/acc_len_<L>``; ``whole_run/`` holds one value per run)."""
    return [
        f"{WHOLE_RUN}/solved",
        "val/acc",
        f"{WHOLE_RUN}/solved_step",
        *(f"val/acc_len_{n}" for n in cfg.eval.lengths),
        f"{WHOLE_RUN}/exact_until",
        f"{WHOLE_RUN}/acc_unseen",
        "train/loss",
        f"{WHOLE_RUN}/train_seconds",
    ]


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
    )
    return summary


def _data_type(value: Setting) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    return api_pb2.DATA_TYPE_STRING if isinstance(value, str) else api_pb2.DATA_TYPE_FLOAT64


def hparams_summaries(
    settings: Mapping[str, Setting], swept: Sequence[str], metrics: Sequence[str]
) -> list[Summary]:
    """The experiment definition (swept keys marked as differing, which TensorBoard lists first),
    the run's session with its settings, and the session's end."""
    experiment = api_pb2.Experiment(
        hparam_infos=[
            api_pb2.HParamInfo(name=key, type=_data_type(value), differs=key in swept)
            for key, value in settings.items()
        ],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics],
    )
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in settings.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, str):
            start.hparams[key].string_value = value
        else:
            start.hparams[key].number_value = value
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return [
        _hparams_summary(
            metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
        ),
        _hparams_summary(
            metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
        _hparams_summary(
            metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)
        ),
    ]


def _code(text: str) -> str:
    """Markdown for TensorBoard's Text tab that keeps ``text`` as it is (a fenced block)."""
    return f"```\n{text.strip()}\n```"


def text_entries(summary: str, origin: RunOrigin, cfg: DictConfig) -> dict[str, str]:
    """The Text tab, which sorts by tag: the printed summary first, then the command that reruns
    the run and the composed config."""
    return {
        "result/summary": _code(summary),
        "run/command": _code(origin.command),
        "run/config": _code(OmegaConf.to_yaml(cfg)),
    }


def log_run_record(
    writer: SummaryWriter, cfg: DictConfig, run_dir: Path, printed: str, step: int
) -> None:
    """Write a finished run's HParams session and its Text tab (``printed``: its summary)."""
    origin = RunOrigin.of(run_dir)
    summaries = hparams_summaries(run_settings(cfg, origin), origin.swept, metric_tags(cfg))
    summaries += [text_pb(tag, text) for tag, text in text_entries(printed, origin, cfg).items()]
    for summary in summaries:
        writer.file_writer.add_summary(summary, step)


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, writing one event file per run process and nothing else.

    Lightning finalizes its loggers after ``fit`` and again after ``test``, and a closed writer
    reopens in a new event file, so finalizing here only flushes; ``train`` closes the writer once
    at the end. No ``epoch`` scalar (the x-axis is the step) and no ``hparams.yaml``
    (``.hydra/config.yaml`` records the config).
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def save(self) -> None:
        self.experiment.flush()

    def finalize(self, status: str) -> None:
        self.save()

    def close(self) -> None:
        self.experiment.close()
