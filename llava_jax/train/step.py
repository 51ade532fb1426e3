"""The loss and the ONE jitted train step (vision tower + projector + decoder, gradient accumulation inside).

Public surface: `BATCH_KEYS`, `batch_keys(config)`, `in_place_stacks(config, frozen)`,
`make_train_step(setup) -> step(state, batch)`,
`compile_train_step(setup, batch_spec)`, `abstract_batch(config, mesh)`,
`resolve_batch_layout(config, mesh)`.

Loss = (sum of next-token cross-entropies over supervised tokens of the GLOBAL batch) / (their count), so any
mesh and any number of accumulation micro-batches give the same gradient. A step whose loss or gradient norm is
not finite leaves params and optimizer state untouched and is counted in `state.bad_steps`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax.config import Config, ConfigError
from llava_jax.data.bad_samples import REASONS
from llava_jax.data.images import image_stats, normalize_pixels
from llava_jax.models.llava import LlavaModel, head_params, model_variables
from llava_jax.sharding import BATCH_AXES, LOGICAL_RULES, batch_sharding
from llava_jax.train.loss import cross_entropy_sums, supervised_token_count
from llava_jax.train.optimizer import learning_rate_schedule, merge_params, split_params
from llava_jax.train.state import TrainSetup, TrainState

# Device-side batch: input_ids / loss_mask / segment_ids / positions [B, T], pixel_values uint8 [B, I, H, W, 3]
# (raw RGB; normalised inside the step with data.images.normalize_pixels, zero where image_mask is 0),
# image_mask [B, I], num_samples [B] and bad_samples [B, len(REASONS)] (only summed into the metrics).
# loss_mask[b, t] = 1 iff input_ids[b, t] is a supervised target (predicted at t - 1).
# With model.anyres.enabled: pixel_values [B, I, C, H, W, 3] (C = model.crops_per_image) and image_feature_ids
# [B, T] (models/anyres_features.py: -1 text, -2 image_newline, else the row of the crop-feature table).
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions", "pixel_values", "image_mask", "num_samples",
              "bad_samples")
ANYRES_KEYS = ("image_feature_ids",)


def batch_keys(config: Config) -> tuple[str, ...]:
    """The keys of a device batch for `config`."""
    return BATCH_KEYS + (ANYRES_KEYS if config.model.anyres.enabled else ())


def _image_token_mismatches(batch: dict, config: Config) -> jax.Array:
    """Rows whose image-token count differs from what their images fill: real images x tokens_per_image, or with
    anyres the positions that image_feature_ids give a feature."""
    found = jnp.sum(batch["input_ids"] == config.model.image_token_id, axis=1)
    if config.model.anyres.enabled:
        expected = jnp.sum(batch["image_feature_ids"] != -1, axis=1)
    else:
        expected = jnp.sum(batch["image_mask"], axis=1) * config.model.tokens_per_image
    return jnp.sum(found != expected)


def _batch_counts(batch: dict) -> dict[str, jax.Array]:
    """Counts over the GLOBAL batch, so every process reads the same numbers: real (non-padding) tokens and
    images, samples drawn and the bad records they replaced, by reason."""
    bad = jnp.sum(batch["bad_samples"], axis=0)
    return {"real_tokens": jnp.sum(batch["segment_ids"] != 0), "real_images": jnp.sum(batch["image_mask"]),
            "samples": jnp.sum(batch["num_samples"]),
            **{f"bad_samples/{reason}": bad[k] for k, reason in enumerate(REASONS)}}


def _split_micro_batches(batch: dict, num_micro: int, mesh: Mesh) -> dict:
    """[B, ...] -> [A, B/A, ...]; micro-batch j takes rows j, j+A, ... so every device keeps its own rows."""
    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
    return jax.tree_util.tree_map(split, batch)


# train.loss_vocab_parallel: inside the loss chunks the hidden states are gathered over the batch and the logits
# (so the LM-head kernel and its gradient) are sharded over the vocabulary on the batch axes: a chunk then moves
# [B, chunk, E] of activations instead of gathering the whole [E, V] kernel (FSDP), and never holds it.
VOCAB_PARALLEL_RULES = (("activation_batch", None), ("activation_vocab", BATCH_AXES))
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def vocab_sharded(head: Any, vocab_size: int) -> Any:
    """The LM-head params constrained to be sharded over their vocabulary dim on the batch axes (else whole)."""
    def constrained(leaf):
        dims = [d for d, size in enumerate(leaf.shape) if size == vocab_size][-1:]   # one dim, even if E == V
        return jax.lax.with_sharding_constraint(leaf, P(*[BATCH_AXES if d in dims else None
                                                          for d in range(leaf.ndim)]))
    return jax.tree_util.tree_map(constrained, head)


def uses_vocab_parallel_loss(config: Config, mesh: Mesh) -> bool:
    """train.loss_vocab_parallel on a data / fsdp mesh (tensor parallelism already shards the vocabulary) with
    more than one batch shard, their number dividing the vocabulary."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return (config.train.loss_vocab_parallel and mesh.shape["tensor"] == 1 and shards > 1
            and config.model.decoder.vocab_size % shards == 0)


def in_place_stacks(config: Config, frozen: tuple[str, ...]) -> tuple[str, ...]:
    """The param groups whose layer stacks accumulate their weight gradients in place (`models/accumulate.py`):
    trainable towers, with gradient accumulation, scanned stacks, full remat and train.accumulate_in_place."""
    m, t = config.model, config.train
    if not (t.accumulate_in_place and t.grad_accum_steps > 1 and m.scan_layers and m.remat == "full"):
        return ()
    return tuple(group for group in ("vision_tower", "language_model") if group not in frozen and not t.lora.enabled)


def make_train_step(setup: TrainSetup) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    config, model, tx, frozen = setup.config, setup.model, setup.tx, setup.frozen
    num_micro = config.train.grad_accum_steps
    schedule = learning_rate_schedule(config.train, config.train.learning_rate)
    pixel_mean, pixel_std = image_stats(config)    # the host-side eval/generate normalisation uses the same

    def head(params, hidden):
        if not vocab_parallel:
            return model.apply({"params": params}, hidden, method=LlavaModel.logits)
        with nn.logical_axis_rules(VOCAB_PARALLEL_RULES + LOGICAL_RULES):
            hidden = nn.with_logical_constraint(hidden, ACTIVATION_AXES)
            return model.apply({"params": vocab_sharded(params, config.model.decoder.vocab_size)}, hidden,
                               method=LlavaModel.logits)

    stacks = in_place_stacks(config, frozen)
    vocab_parallel = uses_vocab_parallel_loss(config, setup.mesh)
    anyres = config.model.anyres.enabled

    dropout = config.train.lora.enabled and config.train.lora.dropout > 0

    def micro_loss(trainable, frozen_params, micro, denominator, accumulators, rng):
        """This micro-batch's CE sum / the global batch's supervised-token count: gradients come out already
        normalised for the whole batch. The layer stacks in `accumulators` return their gradient added to it.
        `rng` drives the LoRA dropout (when there is one)."""
        variables = model_variables(merge_params(trainable, frozen_params))
        image_mask = micro["image_mask"]
        if anyres:                     # every crop of a real image slot (padded crops are computed, never read)
            image_mask = jnp.repeat(image_mask[..., None], config.model.crops_per_image, axis=-1)
        pixels = normalize_pixels(micro["pixel_values"], image_mask, pixel_mean, pixel_std)
        hidden = model.apply(variables, micro["input_ids"], pixels, image_mask=micro["image_mask"],
                             segment_ids=micro["segment_ids"], positions=micro["positions"], return_hidden=True,
                             grad_accumulators=accumulators, image_feature_ids=micro.get("image_feature_ids"),
                             rngs={"dropout": rng} if dropout else None)
        loss_sum, _ = cross_entropy_sums(hidden, head, head_params(variables["params"], config.model),
                                         micro["input_ids"], micro["loss_mask"], config.train.loss_chunk_size)
        return loss_sum / denominator

    grad_fn = jax.value_and_grad(micro_loss)

    def loss_and_grads(trainable, frozen_params, batch, denominator, rng):
        if num_micro == 1:
            return grad_fn(trainable, frozen_params, batch, denominator, None, rng)

        def accumulate(carry, micro_and_rng):
            # the params pass a barrier with the loop-variant micro-batch, so XLA cannot hoist their all-gathers
            # (full unsharded copies) out of the loop, where they would stay live through every micro-batch
            (params, frozen), (micro, micro_rng) = jax.lax.optimization_barrier(
                ((trainable, frozen_params), micro_and_rng))
            loss, grads = grad_fn(params, frozen, micro, denominator,
                                  {group: carry[1][group]["layers"] for group in stacks}, micro_rng)
            summed = jax.tree_util.tree_map(jnp.add, carry, (loss, grads))
            for group in stacks:     # already the running sum (see models/accumulate.py); XLA drops the add above
                summed[1][group] = {**summed[1][group], "layers": grads[group]["layers"]}
            return summed, None

        init = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, trainable))
        micro_rngs = jax.random.split(rng, num_micro)
        (loss, grads), _ = jax.lax.scan(accumulate, init,
                                        (_split_micro_batches(batch, num_micro, setup.mesh), micro_rngs))
        return loss, grads

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        trainable, frozen_params = split_params(state.params, frozen)
        count = supervised_token_count(batch["loss_mask"])
        step_rng = jax.random.fold_in(state.rng, state.step)      # LoRA dropout: a function of seed and step
        loss, grads = loss_and_grads(trainable, frozen_params, batch, jnp.maximum(count, 1.0), step_rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            updates, new_opt_state = tx.update(grads, operands[1], operands[0], grad_norm=grad_norm)
            return optax.apply_updates(operands[0], updates), new_opt_state

        new_trainable, new_opt_state = jax.lax.cond(finite, update, lambda operands: operands,
                                                    (trainable, state.opt_state))
        new_state = state.replace(
            step=state.step + 1,
            bad_steps=state.bad_steps + (~finite).astype(jnp.int32),
            params=merge_params(new_trainable, frozen_params),
            opt_state=new_opt_state)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.optimizer_steps),
            "supervised_tokens": count, "finite": finite.astype(jnp.float32),
            "image_token_mismatches": _image_token_mismatches(batch, config).astype(jnp.float32),
            "bad_steps": new_state.bad_steps, **_batch_counts(batch),
        }
        return new_state, metrics

    return step


def abstract_batch(config: Config, mesh: Mesh, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs (with the batch sharding) of one global batch."""
    b = config.train.batch_size if batch_size is None else batch_size
    t, i, v = config.data.max_length, config.data.max_images, config.model.vision
    crops = (config.model.crops_per_image,) if config.model.anyres.enabled else ()
    sharding = batch_sharding(mesh)
    shapes = {
        "input_ids": ((b, t), jnp.int32), "loss_mask": ((b, t), jnp.float32), "segment_ids": ((b, t), jnp.int32),
        "positions": ((b, t), jnp.int32), "image_mask": ((b, i), jnp.int32),
        "pixel_values": ((b, i, *crops, v.image_size, v.image_size, v.num_channels), jnp.uint8),
        "num_samples": ((b,), jnp.int32), "bad_samples": ((b, len(REASONS)), jnp.int32),
    }
    if config.model.anyres.enabled:
        shapes["image_feature_ids"] = ((b, t), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def resolve_batch_layout(config: Config, mesh: Mesh) -> None:
    """Derives train.grad_accum_steps from train.micro_batch_size (rows per data-parallel replica, Megatron's
    meaning) and checks that every accumulation micro-batch splits evenly over data x fsdp."""
    t = config.train
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.micro_batch_size is not None:
        rows = t.micro_batch_size * replicas
        if t.batch_size % rows:
            raise ConfigError(f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size="
                             f"{t.micro_batch_size} x data-parallel replicas {replicas}")
        if t.grad_accum_steps not in (1, t.batch_size // rows):
            raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} contradicts train.micro_batch_size="
                             f"{t.micro_batch_size} (which implies {t.batch_size // rows}); set only one")
        t.grad_accum_steps = t.batch_size // rows
    micro = t.batch_size // t.grad_accum_steps
    if micro % replicas:
        raise ConfigError(f"train.batch_size: {t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} = {micro} "
                         f"rows per micro-batch is not divisible by mesh data x fsdp = {replicas}")


def jit_train_step(setup: TrainSetup) -> Any:
    """The train step jitted with explicit in/out shardings and the state donated."""
    metrics_sharding = NamedSharding(setup.mesh, P())
    batch_shardings = {k: batch_sharding(setup.mesh) for k in batch_keys(setup.config)}
    return jax.jit(make_train_step(setup), in_shardings=(setup.state_shardings, batch_shardings),
                   out_shardings=(setup.state_shardings, metrics_sharding), donate_argnums=(0,))


def compile_train_step(setup: TrainSetup, batch_spec: dict | None = None):
    """AOT-compiles the train step for the configured batch (never recompiles; wrong inputs raise)."""
    resolve_batch_layout(setup.config, setup.mesh)
    batch_spec = batch_spec or abstract_batch(setup.config, setup.mesh)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return jit_train_step(setup).lower(setup.abstract_state, batch_spec).compile()
