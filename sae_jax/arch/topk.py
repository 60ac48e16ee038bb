"""topk (Gao et al. 2024, OpenAI): the k largest pre-activations of each token, ReLU'd; loss |x - x_hat|^2 + alpha AuxK.

AuxK: the `train.auxk_k` most active dead latents reconstruct the residual x - x_hat; `sae.auxk_normalize`
divides it by the residual's variance as OpenAI does. Decoder rows unit-norm only when `sae.unit_norm_decoder`
is true (OpenAI's choice); unset keeps this trainer's earlier topk runs (free rows). Exports as "topk".
"""

from __future__ import annotations

from sae_jax.arch import Recipe
from sae_jax.loss import sae_loss


def loss(params, spec, x, ctx):
    t = ctx.t
    return sae_loss(
        params,
        spec,
        x,
        l1_coefficient=0.0,
        dead=ctx.dead,
        auxk_k=t.auxk_k,
        auxk_coefficient=t.auxk_coefficient,
        compute_dtype=t.compute_dtype,
        auxk_normalize=ctx.s.auxk_normalize,
    )


RECIPE = Recipe(name="topk", inference="topk", loss=loss, needs_k=True)
