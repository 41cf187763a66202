"""BRECQ: AdaRound at block granularity (Li et al. 2021, arXiv 2102.05426), with QDrop (Wei et al.
2022, arXiv 2203.05740) as an option.

The same soft rounding variables and annealed regularizer as ``adaround``, but one loss per block:
the block's outputs against the float block's, so that the layers of a residual block or transformer
layer compensate each other's rounding. When the config quantizes activations their LSQ step sizes
are learned jointly (``act_lr``). ``qdrop`` > 0 mixes float and quantized values, element by element,
at the block inputs and at every quantized activation (QDrop uses 0.5). Options:
``blockwise.RECIPE_DEFAULTS`` with the defaults below.
"""
from __future__ import annotations

from .blockwise import RECIPE_DEFAULTS, recipe_method

DEFAULTS = {**RECIPE_DEFAULTS, "loss": "block", "rounding": "sigmoid", "optimizer": "adam", "lr": 1e-2,
            "iters": 1000}


optimize_block = recipe_method("brecq", DEFAULTS)
