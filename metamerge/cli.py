"""``metamerge``: the command line of the merge core (``metamerge merge``).

The model registry has its own command (``metamerge-registry``), so this one needs nothing but the
core. Every failure is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import MergeError, run_cli

# mergekit-yaml flags that change nothing here, accepted so that a mergekit command line runs as is:
# what each means in metamerge, said once on stderr.
MERGEKIT_FLAGS = {
    "--copy-tokenizer": "the tokenizer is always copied (recipe tokenizer_source: base by default)",
    "--lazy-unpickle": "tensors are always streamed from safetensors; pickles need --allow-pickle",
    "--cuda": "same as --device cuda",
}


PRESTART_BYTES = 1_000_000_000  # inputs above this are worth worker processes: start them early


def _merge(args) -> int:
    from .executors import ExecutorConfig, prestart
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    executor = ExecutorConfig(kind="dask" if args.dask else "local", n_workers=args.workers, address=args.dask,
                              threads_per_worker=args.threads_per_worker)
    if not args.dry_run and args.device != "cuda" and not args.cuda and \
            _local_input_bytes(recipe.referenced_models()) > PRESTART_BYTES:
        prestart(executor)  # the workers' fork server imports torch while this process does

    from .engine import MergeOptions, merge
    from .io import parse_size

    for flag in MERGEKIT_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            print(f"note: {flag} (mergekit): {MERGEKIT_FLAGS[flag]}", file=sys.stderr)
    if args.cuda:
        args.device = "cuda"

    options = MergeOptions(device=args.device, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                           max_shard_size=args.max_shard_size, progress=not args.no_progress, wait=args.wait,
                           executor=executor, use_cache=not args.no_cache, unit_bytes=parse_size(args.unit_size))
    with open(args.recipe, encoding="utf-8") as fh:
        text = fh.read()
    if args.as_adapter:
        return _merge_adapter(recipe, args, options, text)
    if args.rank is not None:
        raise MergeError("--rank applies to --as-adapter only (the rank of the adapter written)")
    result = merge(recipe, args.out_dir, options, recipe_text=text, dry_run=args.dry_run)
    plan = result.plan
    if args.dry_run:  # the plan and its cost as JSON on stdout, the cost in words on stderr
        from .estimate import estimate_recipe

        cost = estimate_recipe(recipe, options)
        print(json.dumps({"ok": True, "method": recipe.merge_method, "tensors": len(plan.names),
                          "output_bytes": plan.total_bytes, "tied": plan.aliases,
                          "vocab_rows_shared": plan.shared_rows, "estimate": cost.to_dict()}, indent=2))
        print("\n".join(cost.lines()), file=sys.stderr)
        return 0
    print(f"wrote {result.out_dir} ({len(plan.names)} tensors, {plan.total_bytes / 1e6:.1f} MB)")
    assert result.report is not None  # a merge that wrote OUT_DIR has a report
    for ref, c in result.report.coefficients.items():
        print(f"  {ref}: {c:.6f}")
    return 0


def _merge_adapter(recipe, args, options, text: str) -> int:
    from .adapter_out import merge_to_adapter

    result = merge_to_adapter(recipe, args.out_dir, options, recipe_text=text, dry_run=args.dry_run, rank=args.rank)
    if args.dry_run:
        print(json.dumps({"ok": True, "method": recipe.merge_method, "as_adapter": True,
                          "modules": result.modules}, indent=2))
        return 0
    how = "exact" if result.truncation_error is None else \
        f"APPROXIMATE: rank truncated, relative error {result.truncation_error:.3e} of the truncated updates"
    print(f"wrote {result.out_dir} (LoRA adapter: {result.modules} modules, rank up to {result.rank}, {how})")
    for ref, c in result.coefficients.items():
        print(f"  {ref}: {c:.6f}")
    return 0


def _local_input_bytes(refs: list[str]) -> int:
    """The safetensors bytes of the recipe's local folders (a stat each): whether the merge is large
    enough for worker processes, before anything heavy is imported."""
    from pathlib import Path

    total = 0
    for ref in refs:
        for part in ref.split("@")[0].split("+"):
            folder = Path(part).expanduser()
            if folder.is_dir():
                total += sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file())
    return total


def _methods(args) -> int:
    from .methods.catalog import methods_table

    print(methods_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="metamerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"metamerge {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="merge or methods")
    m = sub.add_parser("merge", help="merge the models of a recipe (mergekit YAML) into OUT_DIR")
    m.add_argument("recipe", help="the recipe: mergekit's YAML format (merge_method, base_model, models, ...)")
    m.add_argument("out_dir", help="where the merged model goes (written whole or not at all)")
    m.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"],
                   help="where tensors are merged (default auto: cuda when there is one)")
    m.add_argument("--dry-run", action="store_true", help="validate and plan; read no tensor, write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (atomically)")
    m.add_argument("--wait", action="store_true", help="if another merge is writing OUT_DIR, wait for it "
                   "(default: fail at once)")
    m.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt checkpoints (pickle can run code)")
    m.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB or 500MB (default 5GB)")
    m.add_argument("--as-adapter", action="store_true", help="write one PEFT LoRA adapter equal to the merge "
                   "(linear, task_arithmetic, metagpt over LoRA adapters only; exact, ranks concatenated)")
    m.add_argument("--rank", type=int, default=None, metavar="K", help="with --as-adapter: keep at most rank K per "
                   "module (truncated SVD: approximate, the error is reported)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    m.add_argument("--workers", "-j", type=int, default=None, metavar="N",
                   help="merge on N local worker processes (default: the number of cores; 1 = this process)")
    m.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run the units on a running Dask cluster, e.g. tcp://10.0.0.5:8786 (inputs and OUT_DIR "
                   "on storage every worker sees)")
    m.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                   help="torch threads per worker (default: cores / workers); the bytes do not depend on it")
    m.add_argument("--unit-size", default="256MB", metavar="SIZE",
                   help="output bytes per merge unit (default 256MB): smaller spreads a small model over more "
                   "workers and resumes closer to where a merge was killed")
    m.add_argument("--no-cache", action="store_true", help="neither read nor write METAMERGE_CACHE_DIR "
                   "(input file hashes, norms per fine-tune)")
    for flag, meaning in MERGEKIT_FLAGS.items():
        m.add_argument(flag, action="store_true", help=f"accepted for mergekit compatibility: {meaning}")
    m.set_defaults(func=_merge)
    ls = sub.add_parser("methods", help="list the merge methods and their parameters (a markdown table)")
    ls.set_defaults(func=_methods)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Recipe warnings as one line each, like errors: ``warning: <message>``."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
