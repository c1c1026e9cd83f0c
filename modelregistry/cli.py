"""``metamerge-registry``: the registry's own command (history, promote, rollback, audit, reproduce).

    metamerge-registry history NAME [--json]              every gate decision, oldest first
    metamerge-registry promote NAME VERSION --reason TEXT  forced promotion (logged as forced, with the user)
    metamerge-registry rollback NAME [--reason TEXT]
    metamerge-registry audit NAME VERSION [--json]        exit 1 when the files do not verify
    metamerge-registry reproduce NAME VERSION OUT_DIR [--input REF=PATH ...] [--device cpu|cuda]
                                                          exit 1 when the weights are not bit-identical
each with ``--tracking-uri URI`` (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns.db``).
Also ``python -m modelregistry.cli``. Every failure is one ``error: ...`` line and exit status 2.

A ``sqlite:///`` tracking URI must name an existing database: every command reads a registry that a
registration made, and MLflow would otherwise create an empty one at a mistyped path and report
"no such model" from it.
"""

from __future__ import annotations

import argparse
import json
import sys

from metamerge.errors import MergeError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line MergeError instead of argparse's usage + exit
        raise MergeError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from metamerge import __version__

    parser = _Parser(prog="metamerge-registry", description="model registry commands")
    parser.add_argument("--version", action="version", version=f"metamerge-registry {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                help="history, promote, rollback, audit or reproduce")
    name_help = "the registered model's name (pipeline.registry.model_name)"
    version_help = "a version number, or an alias: champion, challenger"

    def common(p):
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns.db)")
        return p

    p = common(sub.add_parser("history", help="the gate's decision log of a registered model, oldest first"))
    p.add_argument("name", help=name_help)
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")
    p = common(sub.add_parser("promote", help="make VERSION the champion, bypassing the gate (logged as forced)"))
    p.add_argument("name", help=name_help)
    p.add_argument("version", help=version_help)
    p.add_argument("--reason", required=True, help="why (required; recorded in the log with your user name)")
    p = common(sub.add_parser("rollback", help="move the champion back to the previous champion"))
    p.add_argument("name", help=name_help)
    p.add_argument("--reason", default="", help="why (recorded on the version)")
    p = common(sub.add_parser("audit", help="provenance of a version and verification of its files"))
    p.add_argument("name", help=name_help)
    p.add_argument("version", help=version_help)
    p.add_argument("--json", action="store_true", help="print the full audit as JSON")
    p = common(sub.add_parser("reproduce", help="re-run the recorded merge and compare bit for bit"))
    p.add_argument("name", help=name_help)
    p.add_argument("version", help=version_help)
    p.add_argument("out_dir", help="where the reproduced merge goes")
    p.add_argument("--input", action="append", default=[], metavar="REF=PATH",
                   help="where a recorded input lives now (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to merge (default: the device the version was merged on, if available)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _config(args):
    from .config import RegistryConfig, sqlite_path

    config = RegistryConfig(tracking_uri=args.tracking_uri) if args.tracking_uri else RegistryConfig()
    db = sqlite_path(config.tracking_uri)
    if db is not None and not db.is_file():
        given = "--tracking-uri" if args.tracking_uri else "the default tracking URI"
        raise MergeError(f"{given} {config.tracking_uri}: no such database {db} (a mistyped path?); "
                         "registry commands read the store a registration wrote")
    return config


def _resolve_version(client, name: str, version: str) -> str:
    """Accept a number or an alias (``champion``, ``challenger``)."""
    if version.isdigit():
        return version
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, version).version)
    except MlflowException:
        raise MergeError(f"registered model '{name}' has no version or alias '{version}'") from None


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _run(args) -> int:
    from .audit import audit, format_audit, reproduce
    from .history import format_history, read
    from .promotion import promote, rollback

    config = _config(args)
    if args.command == "history":
        decisions = read(config.client(), args.name)
        if not decisions and not _exists(config.client(), args.name):
            raise MergeError(f"no registered model '{args.name}' in {config.tracking_uri}")
        print(json.dumps([d.to_dict() for d in decisions], indent=2, sort_keys=True) if args.json
              else format_history(args.name, decisions))
        return 0
    if args.command == "promote":
        d = promote(args.name, _resolve_version(config.client(), args.name, args.version), args.reason, config)
        print(f"{args.name}: champion is v{d.champion} ({d.reason}; previous: "
              f"{'v' + d.previous_champion if d.previous_champion else 'none'})")
        return 0
    if args.command == "rollback":
        d = rollback(args.name, config, args.reason)
        print(f"{args.name}: champion rolled back from v{d.previous_champion} to v{d.champion}")
        return 0
    if args.command == "audit":
        report = audit(args.name, _resolve_version(config.client(), args.name, args.version), config)
        print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else format_audit(report))
        return 0 if report["verified"] else 1
    if args.command == "reproduce":
        inputs = {}
        for item in args.input:
            ref, sep, path = item.rpartition("=")
            if not sep or not ref:
                raise MergeError(f"--input {item!r}: use REF=PATH")
            inputs[ref] = path
        res = reproduce(args.name, _resolve_version(config.client(), args.name, args.version), args.out_dir,
                        config, inputs=inputs, device=args.device)
        if args.json:
            print(json.dumps(res, indent=2, sort_keys=True))
        else:
            state = "bit-identical" if res["identical"] else "NOT identical"
            print(f"reproduced {args.name} v{res['version']} into {res['out_dir']}: weights {state} "
                  f"({len(res['weights'])} weight files)")
            for f in res["differing"]:
                print(f"  differs: {f}")
            for t in res["differing_tensors"]:
                print(f"  tensor differs: {t['tensor']} (max abs diff {t['max_abs_diff']})")
            if res["likely_cause"]:
                print(f"  likely cause: {res['likely_cause']}")
            for note in res["notes"]:
                print(f"  note: {note}")
        return 0 if res["identical"] else 1
    raise MergeError(f"unknown registry command '{args.command}'")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _run_args(sys.argv[1:] if argv is None else argv))


def _run_args(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except MergeError:
        raise
    except Exception as exc:  # MLflow and storage errors: one line, no traceback
        from mlflow.exceptions import MlflowException

        if isinstance(exc, (MlflowException, OSError)):
            msg = str(getattr(exc, "message", exc)).strip().splitlines()
            raise MergeError(f"{args.command}: {msg[0] if msg else type(exc).__name__}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
