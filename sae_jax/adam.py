"""Adam with global-norm clipping as one optax transformation whose update is a single pass per param.

`fused_adam(lr, b1, b2, clip=c)` has the state of, and computes what,
`optax.chain(optax.clip_by_global_norm(c), optax.adam(lr, b1, b2))` does
(`optax.adam` alone when c is 0), so checkpoints written with either restore
into the other. It exists because XLA splits optax's chain into several passes
over each [N, D] array and copies the donated moments; here each moment is
updated in place and the update reads the new moments, all in one loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


class MasksNotOk(optax.GradientTransformationExtraArgs):
    """A transformation whose update takes `ok` ([] bool): where it is false, updates are 0 and the state is kept."""


def masking(tx: optax.GradientTransformation) -> MasksNotOk:
    """tx honouring `ok`: its update, then the old state selected where ok is false.

    `fused_adam` masks in its own pass and is returned as it is; for any other
    transformation the select is a separate pass over the state, since XLA will
    not update the donated state in place when a later select still reads it.
    """
    if isinstance(tx, MasksNotOk):
        return tx
    inner = optax.with_extra_args_support(tx)

    def update(grads, state, params=None, *, ok=True, **extra):
        updates, new_state = inner.update(grads, state, params, **extra)
        zero = lambda u: jnp.where(ok, u, jnp.zeros_like(u))
        return jax.tree.map(zero, updates), jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)

    return MasksNotOk(tx.init, update)


def reference(learning_rate: optax.ScalarOrSchedule, b1: float, b2: float, eps: float = 1e-8, clip: float = 0.0):
    """The optax chain `fused_adam` reproduces: its state layout and, up to rounding, its updates."""
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def fused_adam(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip: float = 0.0
) -> MasksNotOk:
    """`reference(...)` with its update written out as one elementwise pass per param (updates = -lr * m_hat / ...)."""
    ref = reference(learning_rate, b1, b2, eps, clip)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def update(grads, state, params=None, *, ok=True):
        """ok: [] bool; where false the updates are 0 and the state stays as it was (masked in the same pass)."""
        del params
        adam, sched = state[1] if clip > 0 else state
        count = optax.safe_increment(adam.count)
        step_size = -jnp.asarray(schedule(sched.count), jnp.float32)
        # optax computes (g / |g|) * clip; one scalar factor differs by an ulp and lets XLA
        # fuse the clipping into both moment passes instead of writing the clipped gradient out.
        g_norm = optax.tree.norm(grads) if clip > 0 else None
        factor = jnp.where(g_norm < clip, 1.0, clip / g_norm) if clip > 0 else 1.0

        def leaf(g, m, v):
            g = g * jnp.asarray(factor, g.dtype)
            m = jnp.where(ok, (1 - b1) * g + b1 * m, m)
            v = jnp.where(ok, (1 - b2) * g**2 + b2 * v, v)
            u = (m / (1 - b1**count).astype(m.dtype)) / (jnp.sqrt(v / (1 - b2**count).astype(v.dtype)) + eps)
            return jnp.where(ok, step_size.astype(u.dtype) * u, 0.0), m, v

        new = jax.tree.map(leaf, grads, adam.mu, adam.nu)
        is_triple = lambda n: isinstance(n, tuple)
        updates, mu, nu = (jax.tree.map(lambda n, i=i: n[i], new, is_leaf=is_triple) for i in range(3))
        keep = lambda new, old: jnp.where(ok, new, old)
        adam = optax.ScaleByAdamState(count=keep(count, adam.count), mu=mu, nu=nu)
        sched = optax.ScaleByScheduleState(count=keep(optax.safe_increment(sched.count), sched.count))
        return updates, ((state[0], (adam, sched)) if clip > 0 else (adam, sched))

    return MasksNotOk(ref.init, update)
