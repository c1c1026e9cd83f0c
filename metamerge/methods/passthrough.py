"""``passthrough``: one model's tensors as they are, or multiplied by a per-tensor ``scale``
(mergekit 0.1.5's ``passthrough`` for a ``models:`` recipe with a single model).

``scale`` is read per tensor like any parameter, so a filter list such as
``[{filter: o_proj, value: 0.0}, {value: 1.0}]`` scales some tensors and leaves the rest; where no
value applies the tensor is passed through unchanged. mergekit takes no ``base_model`` here (it
would be a second input).
"""

from __future__ import annotations

from ..errors import MergeError
from .base import MergeMethod, MergeOutput, Param, TensorJob, register


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "copy one model's tensors, optionally multiplied by a per-tensor scale"
    base_policy = "input"  # a base_model would be one more input, and passthrough takes exactly one
    task_vectors = False
    params = (Param("scale", default=None, per_model=True),)

    @classmethod
    def validate_inputs(cls, recipe, source: str) -> None:
        entries = cls.input_entries(recipe)
        if len(entries) != 1:
            extra = " (base_model counts as an input: remove it)" if recipe.base_model else ""
            raise MergeError(f"{source}: passthrough takes exactly one model, got {len(entries)}{extra}; "
                             "to stack layers of several models use slices")

    def merge(self, job: TensorJob) -> MergeOutput:
        tensor, scale = job.tensors[0], job.params[0]["scale"]
        if scale is None:
            return MergeOutput(tensor, [1.0])
        return MergeOutput(tensor * scale, [scale])
