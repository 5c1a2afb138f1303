"""Training: state, optimizer, steps and the phase loop."""

from ntk_scale.train.loop import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]
