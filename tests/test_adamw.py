"""The fused clipped AdamW equals optax's chain(clip_by_global_norm, multi_transform(adamw per group)); its bfloat16
moments (stochastically rounded) track float32 ones."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llava_jax.train.adamw import clipped_adamw, rounding_noise, stochastic_round_bfloat16

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


def regression_problem(seed: int = 0):
    """A small noisy linear regression (two param groups) and its mini-batch loss."""
    rng = np.random.default_rng(seed)
    inputs = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    targets = inputs @ jnp.asarray(rng.normal(size=(16, 4)), jnp.float32) + 0.1 * jnp.asarray(
        rng.normal(size=(256, 4)), jnp.float32)

    def loss(params, rows):
        prediction = inputs[rows] @ params["language_model"]["kernel"] + params["vision_tower"]["bias"]
        return jnp.mean((prediction - targets[rows]) ** 2)

    params = {"language_model": {"kernel": jnp.zeros((16, 4))}, "vision_tower": {"bias": jnp.zeros((4,))}}
    return params, loss


def train_regression(moment_dtype: str, steps: int):
    """(params, optimizer state, losses) after `steps` clipped AdamW steps on `regression_problem`."""
    params, loss = regression_problem()
    tx = clipped_adamw({g: optax.constant_schedule(3e-2) for g in params}, b1=B1, b2=0.999, eps=EPS,
                       weight_decay=DECAY, decay_mask=decay_mask, max_norm=1.0, moment_dtype=moment_dtype)

    @jax.jit
    def step(params, state, key):
        value, grads = jax.value_and_grad(loss)(params, jax.random.randint(key, (32,), 0, 256))
        updates, state = tx.update(grads, state, params, grad_norm=optax.tree.norm(grads))
        return optax.apply_updates(params, updates), state, value

    state, losses = tx.init(params), []
    for i in range(steps):
        params, state, value = step(params, state, jax.random.PRNGKey(i))
        losses.append(float(value))
    return params, state, losses


def test_bfloat16_moments_are_stored_as_bfloat16():
    _, state, _ = train_regression("bfloat16", steps=2)
    assert state.count.dtype == jnp.int32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((state.mu, state.nu))} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_moments_stay_close_to_float32_over_50_steps():
    params32, _, losses32 = train_regression("float32", steps=50)
    params16, _, losses16 = train_regression("bfloat16", steps=50)
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    assert np.max(np.abs(flat(params16) - flat(params32))) <= 0.01 * np.max(np.abs(flat(params32)))   # measured 0.3 %
    assert abs(losses16[-1] - losses32[-1]) <= 0.005 * losses32[-1]                                  # measured 0.1 %
    assert losses32[-1] < 0.05 * losses32[0]   # it did train (12.2 -> 0.33)


def test_float32_moments_trace_no_bfloat16_and_no_rounding_noise():
    """The float32 path is the update as it was before bfloat16 storage existed: nothing of it is traced."""
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params_tree(0))
    tx = clipped_adamw({g: schedule(lr) for g, lr in GROUP_LR.items()}, b1=B1, b2=B2, eps=EPS,
                       weight_decay=DECAY, decay_mask=decay_mask, max_norm=1.0)
    jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, tx.init(params), params))
    assert "bf16" not in jaxpr and "uint32" not in jaxpr


def test_bfloat16_second_moments_still_decay_at_b2_0999():
    """Round-to-nearest would keep nu * 0.999 == nu in bfloat16 forever; stochastic rounding decays it on average."""
    params = {"language_model": {"kernel": jnp.zeros((100, 100))}}
    tx = clipped_adamw({"language_model": optax.constant_schedule(1e-3)}, b1=B1, b2=0.999, eps=EPS,
                       weight_decay=0.0, decay_mask=decay_mask, max_norm=0.0, moment_dtype="bfloat16")
    state = tx.init(params)._replace(nu={"language_model": {"kernel": jnp.ones((100, 100), jnp.bfloat16)}})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, 1000, lambda _, s: tx.update(zeros, s, params)[1], s))(state)
    nu = np.asarray(state.nu["language_model"]["kernel"], np.float32)
    assert abs(nu.mean() / 0.999 ** 1000 - 1) < 0.02


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = jnp.full((100_000,), 1.001, jnp.float32)           # between bfloat16 neighbours 1.0 and 1.0078125
    rounded = np.asarray(stochastic_round_bfloat16(x, rounding_noise(x.shape, jnp.uint32(7))), np.float32)
    assert set(np.unique(rounded)) <= {1.0, 1.0078125}
    assert abs(rounded.mean() - 1.001) < 1e-4


def test_the_config_key_is_checked():
    from llava_jax.config import load_config
    assert load_config(None, ["train.optimizer_state_dtype=bfloat16"]).train.optimizer_state_dtype == "bfloat16"
    with pytest.raises(ValueError, match="train.optimizer_state_dtype"):
        load_config(None, ["train.optimizer_state_dtype=float16"])
