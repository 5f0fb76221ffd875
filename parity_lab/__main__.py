"""``python -m parity_lab [overrides]``: train one run, or a sweep with ``-m``."""

import sys

import hydra
from omegaconf import DictConfig

from parity_lab.config import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from parity_lab.train import train  # heavy imports after Hydra has parsed the command line

    try:
        return float(train(cfg)["val/acc"])
    except ConfigError as error:
        sys.exit(f"config error: {error}")


if __name__ == "__main__":
    main()
