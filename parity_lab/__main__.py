"""``python -m parity_lab [overrides]``: train one run, or a sweep with ``-m``."""

import logging
import math
import re
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from parity_lab.config import ConfigError, resumable_run, resume_config
from parity_lab.naming import directory_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """One run; in a sweep a failed job records ``error.txt`` in its directory and the sweep goes
    on, so one bad job never costs the others their results."""
    from parity_lab.module import NonFiniteLossError  # heavy imports after Hydra parsed argv
    from parity_lab.train import train

    # Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated torch API.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning's INFO banners (hardware, tips) print twice under Hydra's logging and say nothing
    # the run's own summary does not; warnings still show.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        if cfg.resume is not None:
            cfg = resume_config(cfg.resume)
        return float(train(cfg, run_dir)["val/acc"])
    except Exception as error:
        if isinstance(error, ConfigError) and not in_sweep:
            sys.exit(f"config error: {error}")
        (run_dir / "error.txt").write_text(traceback.format_exc())
        if in_sweep:
            print(f"job {hydra_cfg.job.num} failed: {error} ({run_dir})", file=sys.stderr)
            return math.nan
        if isinstance(error, NonFiniteLossError):
            sys.exit(f"training stopped: {error}")
        raise


def resume_in_place(argv: list[str]) -> list[str]:
    """For ``resume=RUN_DIR``, point Hydra at RUN_DIR itself and keep the run's own ``.hydra/``.

    Checked before Hydra starts, since Hydra would create a missing run directory.
    """
    resumes = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("resume=")]
    if not resumes or resumes[-1] == "null" or {"-m", "--multirun"} & set(argv):
        return argv
    run_dir = unquoted(resumes[-1])
    resumable_run(run_dir)
    others = [
        arg
        for arg in argv[1:]
        if "=" in arg and not arg.startswith(("-", "resume=", "hydra.", "hydra/"))
    ]
    if others:
        raise ConfigError(
            f"resume={run_dir!r} continues the run with its own config "
            f"({run_dir}/.hydra/config.yaml): drop the overrides {others}"
        )
    path = hydra_value(run_dir)
    kept = [arg for arg in argv if not arg.startswith("resume=")]
    return [*kept, f"resume={path}", f"hydra.run.dir={path}", "hydra.output_subdir=null"]


def unquoted(value: str) -> str:
    """A ``resume=`` value as typed: taken literally, or read by Hydra's grammar if quoted."""
    if value[:1] not in ("'", '"'):
        return value
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return str(OverridesParser.create().parse_override(f"resume={value}").value())


def hydra_value(text: str) -> str:
    """``text`` as one value of Hydra's override grammar: quoted when it holds characters the
    grammar reads otherwise, such as the ``=`` and ``,`` of a sweep job's directory name."""
    if re.fullmatch(r"[A-Za-z0-9_./+-]*", text):
        return text
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


if __name__ == "__main__":
    try:
        sys.argv = directory_overrides(resume_in_place(sys.argv))
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    main()
