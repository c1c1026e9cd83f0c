"""The paper's own checks, gathered while merging: norms, coefficients and cosine similarity.

Per tensor: ``||tau_t||``, the coefficient each model got, and the pairwise cosine similarity of
the task vectors. For the whole model the squared norms and dot products are summed (float64)
over tensors, which gives the whole-model cosine matrix: MetaGPT's orthogonality assumption.
"""

from __future__ import annotations

import math

import torch

from .reduce import dot_blocks


def gram_blocks(taus: list[torch.Tensor]) -> list[list[list[float]]]:
    """The block sums of every pairwise product (upper triangle mirrored): a tensor merged in
    chunks extends these lists chunk by chunk and gets the same Gram matrix from :func:`fsum_gram`."""
    flat = [t.reshape(-1) for t in taus]
    n = len(flat)
    g: list[list[list[float]]] = [[[] for _ in range(n)] for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            g[i][j] = dot_blocks(flat[i], flat[j])
            g[j][i] = g[i][j]
    return g


def fsum_gram(blocks: list[list[list[float]]]) -> list[list[float]]:
    return [[math.fsum(b) for b in row] for row in blocks]


def gram(taus: list[torch.Tensor]) -> list[list[float]]:
    """Pairwise dot products <tau_i, tau_j> in float64, the same on any thread count."""
    return fsum_gram(gram_blocks(taus))


def cosine_from_gram(g: list[list[float]]) -> list[list[float | None]]:
    """Cosine similarity from a Gram matrix; None where a vector is zero."""
    n = len(g)
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            d = math.sqrt(g[i][i] * g[j][j])
            out[i][j] = (g[i][j] / d) if d > 0 else None
    return out


class Diagnostics:
    """Accumulates the merge report one tensor at a time."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.tensors: dict[str, dict] = {}
        self.has_task_vectors = False  # True once a tensor brought task vectors (a method with a base)
        n = len(labels)
        self._model_gram = [[0.0] * n for _ in range(n)]

    def add(self, name: str, g: list[list[float]] | None, coefficients: list[float] | None,
            *, counted: bool = True, members: tuple[int, ...] | None = None) -> None:
        """Record one tensor from the Gram matrix of its task vectors (None without a base);
        ``counted=False`` for a tied alias already counted once. ``members``: which of ``labels``
        this tensor's entries are, when not all of them in order (a slices recipe); the tensor's
        entry then names them under ``models``."""
        idx = list(members) if members is not None else list(range(len(self.labels)))
        entry: dict = {"coefficients": coefficients}
        if members is not None:
            entry["models"] = [self.labels[i] for i in idx]
        if g is not None:
            self.has_task_vectors = True
            entry["norms"] = [math.sqrt(max(g[i][i], 0.0)) for i in range(len(g))]
            entry["cosine"] = cosine_from_gram(g)
            if counted:
                for i, row in enumerate(g):
                    for j, v in enumerate(row):
                        self._model_gram[idx[i]][idx[j]] += v
        self.tensors[name] = entry

    def model_summary(self) -> dict:
        g = self._model_gram
        return {
            "sqnorms": {lab: g[i][i] for i, lab in enumerate(self.labels)},
            "norms": {lab: math.sqrt(max(g[i][i], 0.0)) for i, lab in enumerate(self.labels)},
            "cosine": cosine_from_gram(g),
        }
