"""``watch_flow``: merge again when a watched model has a new revision or a new fine-tune appears.

The check is stateless: it pins every input (plus what the watch list adds) and looks for the merge
those exact revisions would produce. If it exists, nothing changed and nothing runs; otherwise
``merge_flow`` runs as a subflow with the updated set. Run it on a schedule (``prefect.yaml``) or::

    python -m flows.watch_flow params/demo.yaml
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger

import pipeline_env  # noqa: F401  (environment defaults before Prefect loads)
from flows.merge_flow import StepStates, merge_flow, run_from_command_line
from pipeline import keys, steps, store
from pipeline.params import load_params
from pipeline.watch import watched_additions
from tasks.download import download


@flow(name="metamerge-watch")
def watch_flow(recipe: str | dict[str, Any] = "params/demo.yaml") -> dict[str, Any]:
    """Returns ``changed`` (bool), ``added`` (the fine-tunes the watch list adds to the recipe's),
    ``model_dir`` (the merge of the current inputs) and the ``merge`` result (``None`` when nothing
    changed)."""
    logger = get_run_logger()
    params = load_params(recipe)
    added = watched_additions(params)
    current = params.with_models(added) if added else params
    run = StepStates()
    refs = keys.input_refs(current)
    pins = dict(zip(refs, run.gather([run.submit(f"download[{r}]", download, r) for r in refs])))

    out = store.merge_dir(current, pins)
    if steps.existing_merge(current, pins, out) is not None:
        logger.info(f"nothing changed: {len(refs)} watched input(s) at the revisions of {out}; no merge")
        return {"changed": False, "added": [], "model_dir": str(out), "merge": None, "steps": run.states}
    what = f"new fine-tune(s) {', '.join(a['model'] for a in added)}" if added else "new revision(s)"
    logger.info(f"change detected ({what}): merging {len(keys.fine_tunes(current))} model(s)")
    result = merge_flow(current.to_dict())
    return {"changed": True, "added": [a["model"] for a in added], "model_dir": result["model_dir"],
            "merge": result, "steps": run.states}


def main(argv: list[str] | None = None) -> int:
    def run(path: str) -> str:
        result = watch_flow(path)
        return ("merged: " if result["changed"] else "up to date: ") + result["model_dir"]

    return run_from_command_line("flows.watch_flow", argv, run)


if __name__ == "__main__":
    sys.exit(main())
