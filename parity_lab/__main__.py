"""``python -m parity_lab [overrides]``: train one run, or a sweep with ``-m``."""

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from parity_lab.config import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from parity_lab.train import train  # heavy imports after Hydra has parsed the command line

    # Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated torch API.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning's INFO banners (hardware, tips) print twice under Hydra's logging and say nothing
    # the run's own summary does not; warnings still show.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        return float(train(cfg)["val/acc"])
    except ConfigError as error:
        sys.exit(f"config error: {error}")


if __name__ == "__main__":
    main()
