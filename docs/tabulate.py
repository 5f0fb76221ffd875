"""The README's result tables: ``python docs/tabulate.py SWEEP_DIR`` prints one markdown row per
configuration of a sweep, its seeds aggregated (success rate, mean accuracy, median solved step).

Reads each job's ``metrics.json`` and ``.hydra/overrides.yaml``; jobs without ``metrics.json``
(unfinished) are counted and named below the table. ``python -m parity_lab.report`` is the
framework's general sweep summary; this prints exactly the columns the README quotes.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

IGNORED = ("seed=", "trainer.enable_progress_bar=", "hydra.")


def job_number(job: Path) -> int:
    return int(job.name.split("_", 1)[0])


def main(sweep: Path) -> None:
    groups: dict[str, list[tuple[str, dict]]] = {}
    unfinished = []
    for job in sorted((p for p in sweep.iterdir() if p.is_dir()), key=job_number):
        overrides = list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        if not (job / "metrics.json").is_file():
            unfinished.append(job.name)
            continue
        key = " ".join(o for o in overrides if not o.startswith(IGNORED)) or "(defaults)"
        seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), "0")
        groups.setdefault(key, []).append((seed, json.loads((job / "metrics.json").read_text())))
    print(
        "| configuration | seeds | solved | mean val/acc | mean test acc (longest) "
        "| median solved step | mean acc beyond training | exact up to |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, runs in groups.items():
        metrics = [m for _, m in runs]
        steps = [m["solved_step"] for m in metrics if m["solved_step"] is not None]
        lengths = [k for k in metrics[0] if k.startswith("test/acc_len_")]
        longest = max(lengths, key=lambda k: int(k.rsplit("_", 1)[1])) if lengths else None
        test = (
            f"{statistics.mean(m[longest] for m in metrics):.3f} ({longest[9:]})"
            if longest
            else "-"
        )
        unseen = (
            f"{statistics.mean(m['test/acc_unseen'] for m in metrics):.3f}"
            if "test/acc_unseen" in metrics[0]
            else "-"
        )
        exact = (
            ", ".join(str(m["test/exact_until"]) for m in metrics)
            if "test/exact_until" in metrics[0]
            else "-"
        )
        print(
            f"| {key} | {','.join(s for s, _ in runs)} | {sum(m['solved'] for m in metrics)}/"
            f"{len(metrics)} | {statistics.mean(m['val/acc'] for m in metrics):.3f} | {test} | "
            f"{statistics.median(steps) if steps else '-'} | {unseen} | {exact} |"
        )
    if unfinished:
        print(f"\nunfinished jobs (no metrics.json): {', '.join(unfinished)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
