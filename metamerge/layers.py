"""Where a tensor sits in the layer stack, read from its name (``model.layers.3.mlp...`` -> 3).

One pattern for every reader: gradient parameters interpolate over it, the reports group
coefficients by it.
"""

from __future__ import annotations

import re

# Llama/Mistral ``layers``, GPT-2 ``h``, and the ``blocks``/``block``/``layer`` of other families.
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The layer number in ``tensor_name``, or ``None`` outside the stack (embeddings, final norm, head)."""
    m = LAYER.search(tensor_name)
    return int(m.group(1)) if m else None
