"""The README's main command (``make demo``): the whole product on this machine, offline.

``--scenario lora`` (the default, ``make demo``): LoRA adapters of a longer-pretrained base, the
paper's regime, in ``.demo/lora``; ``--scenario skills``: full fine-tunes of a briefly pretrained
base, in ``.demo``. Embedded defaults: Prefect's ephemeral server (home in ``WORKDIR/prefect``),
MLflow on a SQLite file (``WORKDIR/mlflow.db``), models and data built here. A second run reuses
the scenario and every cached step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Each scenario's default work folder (its own scenario, merges, Prefect home and MLflow store).
WORKDIRS = {"lora": ".demo/lora", "skills": ".demo"}
#: The registered model name of each scenario's merges.
MODEL_NAMES = {"lora": "metamerge-demo-lora", "skills": "metamerge-demo"}


def _defaults(workdir: Path) -> str:
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(workdir / "hf"))
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="lora", choices=list(WORKDIRS),
                    help="lora: LoRA adapters of a longer-pretrained base (default); skills: full fine-tunes")
    ap.add_argument("--workdir", help="where everything goes (default: .demo/lora for lora, .demo for skills)")
    ap.add_argument("--size", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or WORKDIRS[args.scenario]).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking = _defaults(workdir)

    from flows.study import study_flow  # after the environment: Prefect reads it on import
    from metamerge.errors import run_cli

    return run_cli(lambda: _run(study_flow, workdir, args, tracking))


def _run(study_flow, workdir: Path, args, tracking: str) -> int:
    result = study_flow(workdir=str(workdir), size=args.size, seed=args.seed, tracking_uri=tracking,
                        scenario=args.scenario, model_name=MODEL_NAMES[args.scenario])
    print(f"Scenario: {args.scenario} ({args.size}, seed {args.seed})\n")
    print(result["table"])
    print(f"\nTable, plots and JSON: {result['dir']}")
    print(f"Merged models: {workdir / 'merges'}")
    print(f"MLflow UI:  {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {tracking}")
    print(f"Prefect UI: PREFECT_HOME={os.environ['PREFECT_HOME']} {Path(sys.executable).with_name('prefect')} "
          "server start   (then open http://127.0.0.1:4200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
