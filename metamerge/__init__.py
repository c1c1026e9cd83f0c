"""metamerge: the merge core.

Recipes, pinned model references, streaming safetensors I/O, checks, merge methods, norms,
diagnostics, the engine, its report and model card, and the ``metamerge merge`` command. It knows
nothing of the layers built on top of it, not even their names: they import the core, never the
other way round, and ``metamerge merge`` runs it alone.
"""

__version__ = "0.1.0"
