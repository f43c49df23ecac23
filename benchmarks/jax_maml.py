"""MAML in JAX: the peer the benchmark suite times pymaml's public API against.

The whole meta-step in one compiled function, as a JAX user writes it: jit of the meta-loss's
value_and_grad (inner SGD steps by jax.grad, second order unless first_order, tasks by vmap)
followed by the optax update of the outer optimizer. Optional: needs jax, jaxlib and optax
(`pip install jax jaxlib optax`); callers skip when `available()` is False.

One thread: XLA's CPU thread pool is sized when jax is first imported, so `import_jax()` sets
the flags first (call it before anything else imports jax)."""

from __future__ import annotations

import os
from typing import Callable, Sequence, Tuple

_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def import_jax():
    """(jax, jax.numpy, optax), XLA on one CPU thread; None when they are not installed."""
    if "jax" not in os.sys.modules:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _ONE_THREAD).strip()
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    return jax, jnp, optax


def available() -> bool:
    return import_jax() is not None


def _meta_loss(sizes, activation, loss, inner_lr, steps, first_order) -> Callable:
    """meta_loss(params [P], xs, ys, xq, yq [T, K, n]): the mean adapted query loss."""
    jax, jnp, _ = import_jax()
    act = jax.nn.relu if activation == "relu" else jnp.tanh

    def net(flat, x):
        h, off = x, 0
        for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            W = flat[off:off + n_out * n_in].reshape(n_out, n_in)
            off += n_out * n_in
            b = flat[off:off + n_out]
            off += n_out
            h = h @ W.T + b
            if l + 2 < len(sizes):
                h = act(h)
        return h

    def task_loss(flat, x, y):
        out = net(flat, x)
        if loss == "cross_entropy":  # y: int class labels [K] (issue 26's omni rows)
            log_p = jax.nn.log_softmax(out, axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))
        diff = out - y
        return jnp.mean(diff * diff) if loss == "mse" else jnp.mean(jnp.abs(diff))

    def adapted_query_loss(flat, xs, ys, xq, yq):
        for _ in range(steps):
            g = jax.grad(task_loss)(flat, xs, ys)
            flat = flat - inner_lr * (jax.lax.stop_gradient(g) if first_order else g)
        return task_loss(flat, xq, yq)

    def meta_loss(flat, xs, ys, xq, yq):
        per_task = jax.vmap(adapted_query_loss, in_axes=(None, 0, 0, 0, 0))
        return jnp.mean(per_task(flat, xs, ys, xq, yq))

    return meta_loss


def make_step(sizes: Sequence[int], *, activation: str, loss: str, inner_lr: float, steps: int,
              first_order: bool, optimizer: str, outer_lr: float
              ) -> Tuple[Callable, Callable]:
    """(step, init): step(params, opt_state, xs, ys, xq, yq) -> (params, opt_state, meta-loss),
    jitted; init(params) -> opt_state. params is pymaml's flat [P] layout, data [T, K, n]."""
    jax, _, optax = import_jax()
    meta_loss = _meta_loss(sizes, activation, loss, inner_lr, steps, first_order)
    opt = optax.sgd(outer_lr) if optimizer == "sgd" else optax.adam(outer_lr)

    @jax.jit
    def step(flat, opt_state, xs, ys, xq, yq):
        value, grad = jax.value_and_grad(meta_loss)(flat, xs, ys, xq, yq)
        updates, opt_state = opt.update(grad, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, value

    return step, opt.init


def meta_gradient(sizes, params, data, *, activation, loss, inner_lr, steps, first_order):
    """(meta-loss, meta-gradient) as numpy values for params [P] and data, for the check
    against pymaml before timing."""
    jax, jnp, _ = import_jax()
    meta_loss = _meta_loss(sizes, activation, loss, inner_lr, steps, first_order)
    value, grad = jax.jit(jax.value_and_grad(meta_loss))(jnp.asarray(params),
                                                          *(jnp.asarray(t) for t in data))
    return jax.device_get(value), jax.device_get(grad)
