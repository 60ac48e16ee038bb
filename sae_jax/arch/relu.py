"""relu (Anthropic, April 2024; the release): f = relu(x W_enc + b_enc),
loss |x - x_hat|^2 + lambda sum_i f_i |W_dec,i|.

lambda is `train.l1_coefficient`, warmed up linearly over `train.l1_warmup_frac`. Exports as "relu".
"""

from __future__ import annotations

from sae_jax.arch import Recipe, ramp
from sae_jax.loss import sae_loss


def loss(params, spec, x, ctx):
    t = ctx.t
    return sae_loss(
        params,
        spec,
        x,
        l1_coefficient=ramp(t.l1_coefficient, t.l1_warmup_frac, t.steps, ctx.step),
        dead=ctx.dead,
        auxk_k=t.auxk_k,
        auxk_coefficient=t.auxk_coefficient,
        compute_dtype=t.compute_dtype,
    )


RECIPE = Recipe(name="relu", inference="relu", loss=loss)
