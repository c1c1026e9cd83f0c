"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5 computes it.

An entry of a task vector *contributes* when ``|tau_t| > epsilon``. Per entry, with ``c`` the number
of fine-tunes contributing there:

- ``ram``: an entry only one fine-tune contributes (``c == 1``) is kept whole; a shared one
  (``c > 1``) is averaged over its contributors; entries nobody contributes stay at the base.
- ``ramplus_tl`` (tensor-local RAM+): as ``ram``, but fine-tune t's unique entries are scaled by
  ``lambda_t = 1 + r * clamp(rho_t, 0, alpha)``, with ``rho_t`` = (t's shared contributing entries) /
  (t's unique contributing entries, at least ``epsilon``) in this tensor.

No per-model parameter (no ``weight``), as in mergekit. The report's coefficients are
``ramplus_tl``'s ``lambda_t`` (the scale of t's unique entries); ``ram`` has none per model (each
entry gets 1 or 1/c). Every operation is mergekit's, in its order,
so float32 tensors match.
"""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeOutput, Param, TensorJob, register


def contributions(deltas: list[torch.Tensor], epsilon: float):
    """Flattened task vectors ``[models, entries]``, where each contributes (``|tau| > epsilon``),
    how many contribute per entry, and the shared (count > 1) and unique (count == 1) entries."""
    flat = torch.stack(deltas, dim=0).view(len(deltas), -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return flat, nonzero, counts, counts > 1, counts == 1


class _RAM(MergeMethod):
    boost_unique = False

    def merge(self, job: TensorJob) -> MergeOutput:
        assert job.deltas is not None and job.base is not None
        g = job.globals
        flat, nonzero, counts, overlap, unique = contributions(job.deltas, g["epsilon"])
        kept = flat * nonzero
        if self.boost_unique:
            shared_n = (nonzero & overlap).sum(dim=1)
            unique_n = (nonzero & unique).sum(dim=1)
            rho = shared_n / unique_n.clamp(min=g["epsilon"])
            scale = 1 + g["r"] * rho.clamp(min=0, max=g["alpha"])
            solo = kept * unique * scale.unsqueeze(-1)
            coeffs = [float(x) for x in scale]
        else:
            solo = kept * unique
            coeffs = None  # per entry (1 or 1/c): no single coefficient per model
        merged = (solo + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
        return MergeOutput(job.base + merged.reshape_as(job.base), coeffs)


@register
class RAM(_RAM):
    name = "ram"
    summary = "keep entries only one task vector changes (|tau| > epsilon), average the shared ones"
    params = (Param("epsilon", default=1e-5),)


@register
class RAMPlusTL(_RAM):
    name = "ramplus_tl"
    summary = "RAM with each model's unique entries scaled by 1 + r * clamp(shared/unique, 0, alpha), per tensor"
    boost_unique = True
    params = (
        Param("r", default=0.1),
        Param("alpha", default=0.2),
        Param("epsilon", default=1e-5),
    )
