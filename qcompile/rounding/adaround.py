"""AdaRound: adaptive rounding by layer-wise reconstruction (Nagel et al. 2020, arXiv 2004.10568).

Each weight gets a soft rounding variable V (rectified sigmoid, initialised at the fractional part of
w / s); each quantized layer's output, computed on the inputs of the already-quantized model, is fit
to the float layer's output on the float inputs (the "asymmetric" reconstruction), plus the annealed
regularizer λ Σ 1 - |2 h(V) - 1|^β (λ = 0.01, β from 20 to 2 after 20 % warm-up); Adam; the codes
round up where h(V) >= 0.5 at the end. All layers of a block train at once, each on its own loss
(their inputs are detached). Options: ``blockwise.RECIPE_DEFAULTS`` with the defaults below.
"""
from __future__ import annotations

from .blockwise import RECIPE_DEFAULTS, recipe_method

DEFAULTS = {**RECIPE_DEFAULTS, "loss": "layer", "rounding": "sigmoid", "optimizer": "adam", "lr": 1e-2,
            "iters": 1000}


optimize_block = recipe_method("adaround", DEFAULTS)
