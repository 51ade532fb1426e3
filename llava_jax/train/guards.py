"""Per-step health checks on the host. Public surface: `StopTraining`, `check_step_metrics`."""
from __future__ import annotations


class StopTraining(RuntimeError):
    """Training cannot go on (non-finite steps in a row, inconsistent batches); the message says why."""


def check_step_metrics(metrics: dict, step: int, consecutive_bad: int, max_bad_steps: int) -> int:
    """Returns the updated count of consecutive non-finite steps; raises StopTraining when training must stop."""
    if metrics["image_token_mismatches"] > 0:
        raise StopTraining(f"step {step}: {int(metrics['image_token_mismatches'])} sample(s) in the batch have an "
                           "image-token count that does not match their real images x tokens_per_image")
    consecutive_bad = 0 if metrics["finite"] else consecutive_bad + 1
    if consecutive_bad >= max_bad_steps:
        raise StopTraining(f"step {step}: loss or gradients were not finite for {consecutive_bad} steps in a row "
                           f"(train.max_bad_steps={max_bad_steps}); lower train.learning_rate or check the data")
    return consecutive_bad
