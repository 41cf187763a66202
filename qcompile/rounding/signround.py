"""SignRound: signed gradient descent of rounding offsets and clip ranges (Cheng et al. 2023,
arXiv 2309.05516; the method of Intel's auto-round).

Per weight an additive rounding offset V in [-0.5, 0.5] (codes round(w / s + V), straight-through),
per group/channel clip ratios α, β in [0.5, 1] on the min and max (scale and zero point recomputed
from them), trained on the block output MSE against the float block with inputs from the
already-quantized blocks, by signed gradient descent (p -= lr · sign(grad)) with lr = 1 / iters
decayed linearly to 0, 200 steps, one calibration batch a step; the variables of the step with the
lowest loss are kept. Options: ``blockwise.RECIPE_DEFAULTS`` with the defaults below.
"""
from __future__ import annotations

from .blockwise import RECIPE_DEFAULTS, recipe_method

DEFAULTS = {**RECIPE_DEFAULTS, "loss": "block", "rounding": "offset", "learn": "clip", "optimizer": "signsgd",
            "lr": None, "schedule": "linear", "iters": 200, "keep_best": True}


optimize_block = recipe_method("signround", DEFAULTS)
