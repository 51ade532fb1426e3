"""The fused clipped AdamW equals optax's chain(clip_by_global_norm, multi_transform(adamw per group))."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llava_jax.train.adamw import clipped_adamw

B1, B2, EPS, DECAY = 0.9, 0.95, 1e-8, 0.1
GROUP_LR = {"vision_tower": 3e-3, "language_model": 1e-3}


def params_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"vision_tower": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=(5,))},
            "language_model": {"embedding": rng.normal(size=(7, 3)), "scale": rng.normal(size=(3,))}}


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("bias", "scale"), params)


def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=2, decay_steps=10)


def optax_reference(max_norm: float):
    per_group = {g: optax.adamw(schedule(lr), b1=B1, b2=B2, eps=EPS, weight_decay=DECAY, mask=decay_mask)
                 for g, lr in GROUP_LR.items()}
    labels = lambda params: {g: jax.tree_util.tree_map(lambda _, g=g: g, params[g]) for g in params}  # noqa: E731
    clip = optax.clip_by_global_norm(max_norm) if max_norm else optax.identity()
    return optax.chain(clip, optax.multi_transform(per_group, labels))


def run(tx, params, grads_per_step, pass_norm: bool):
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, **({"grad_norm": optax.tree.norm(g)} if pass_norm else {})))
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("grad_scale, max_norm", [(0.01, 1.0), (10.0, 1.0), (10.0, 0.0)],
                         ids=["below-threshold", "clipped", "no-clipping"])
def test_fused_update_matches_the_optax_chain(grad_scale, max_norm):
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params_tree(0))
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(x * grad_scale, jnp.float32), params_tree(s))
             for s in range(1, 6)]
    reference = run(optax_reference(max_norm), params, grads, pass_norm=False)
    fused = clipped_adamw({g: schedule(lr) for g, lr in GROUP_LR.items()}, b1=B1, b2=B2, eps=EPS,
                          weight_decay=DECAY, decay_mask=decay_mask, max_norm=max_norm)
    for pass_norm in (True, False):
        got = run(fused, params, grads, pass_norm)
        for (path, ref_leaf), got_leaf in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                                              jax.tree_util.tree_leaves(got)):
            np.testing.assert_allclose(got_leaf, ref_leaf, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(reference))]
    assert all(moved)


def test_one_counter_and_moments_per_trainable_leaf():
    params = params_tree(0)
    state = clipped_adamw({g: schedule(lr) for g, lr in GROUP_LR.items()}, b1=B1, b2=B2, eps=EPS,
                          weight_decay=DECAY, decay_mask=decay_mask, max_norm=1.0).init(params)
    assert state.count.shape == () and state.count.dtype == jnp.int32
    assert jax.tree_util.tree_structure(state.mu) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(state.nu) == jax.tree_util.tree_structure(params)
