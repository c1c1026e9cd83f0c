"""A merge cut into units, and their results put back together, both in plan order.

The cut (:func:`unit_ranges`) depends on the output layout and ``--unit-size`` only, never on the
worker count; the report's sums (:func:`gather_diagnostics`) are added in plan order whichever
unit or worker computed them. Together they make the output the same on any executor.
"""

from __future__ import annotations

from . import staging
from .checks import Plan
from .diagnostics import Diagnostics
from .io.writer import shard_prefix


def unit_ranges(shards, unit_bytes: int) -> list[staging.UnitRange]:
    """Cut each shard's tensors, in order, into units of about ``unit_bytes`` (never across shards;
    a larger tensor is a unit of its own). Depends on the plan only, never on the worker count."""
    units: list[staging.UnitRange] = []
    for shard in shards:
        base = len(shard_prefix(shard))
        names: list[str] = []
        start = end = base
        for name in shard.names:
            lo, hi = (base + x for x in shard.header[name]["data_offsets"])
            if names and hi - start > unit_bytes:
                units.append(staging.UnitRange(len(units), shard.filename, tuple(names), start, end))
                names, start = [], lo
            names.append(name)
            end = hi
        if names:
            units.append(staging.UnitRange(len(units), shard.filename, tuple(names), start, end))
    return units


def tied_locations(plan: Plan, shards) -> tuple[tuple[str, str, int, int], ...]:
    """Where each tied tensor's target lies in the staged shards: (name, file, start, end)."""
    targets = set(plan.aliases.values())
    out = []
    for shard in shards:
        base = len(shard_prefix(shard))
        for name in shard.names:
            if name in targets:
                lo, hi = shard.header[name]["data_offsets"]
                out.append((name, shard.filename, base + lo, base + hi))
    return tuple(out)


def gather_diagnostics(labels: list[str], plan: Plan, records: list[dict]) -> Diagnostics:
    """The report's per-tensor entries and whole-model sums, added in plan order whichever unit
    computed them (so the sums, and the report, do not depend on the executor)."""
    diag = Diagnostics(labels)
    for rec in records:
        for t in rec["tensors"]:
            if "tied_to" in t:
                diag.tensors[t["name"]] = {**diag.tensors[t["tied_to"]], "tied_to": t["tied_to"]}
            else:
                members = tuple(t["members"]) if t["members"] is not None else None
                diag.add(t["name"], t["gram"], t["coefficients"], members=members)
    return diag
