"""Flax models, chosen by `config.model.name`."""

from typing import Any, Callable

import flax.linen as nn
import ml_collections

from ntk_scale.models.cnn import SmallCNN
from ntk_scale.models.mlp import MLP
from ntk_scale.models.resnet import ResNet18

_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, int, Any], nn.Module]] = {
    "resnet18": lambda c, n, dtype: ResNet18(num_classes=n, width=c.get("width", 64),
                                             batch_norm=c.get("batch_norm", True), dtype=dtype),
    "cnn": lambda c, n, dtype: SmallCNN(num_classes=n, width=c.get("width", 32),
                                        batch_norm=c.get("batch_norm", False), dtype=dtype),
    "mlp": lambda c, n, dtype: MLP(num_classes=n, width=c.get("width", 512), depth=c.get("depth", 2),
                                   batch_norm=c.get("batch_norm", False), dtype=dtype),
}
MODEL_NAMES = tuple(sorted(_BUILDERS))


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `config.model.name` when it is not a known model."""
  if model_config.name not in _BUILDERS:
    raise ValueError(f"config.model.name={model_config.name!r} is not a known model; "
                     f"expected one of {', '.join(MODEL_NAMES)}.")


def build_model(model_config: ml_collections.ConfigDict, num_classes: int,
                compute_dtype: Any = None) -> nn.Module:
  """The model of `config.model`; call it as `model.apply(variables, x, train=...)`.

  Inputs are NHWC float images in [0, 1]; outputs are logits of shape [N, num_classes], float32 or
  wider. `compute_dtype` (e.g. "bfloat16") is that of its activations and of its layers' matmul
  inputs; None: that of the inputs and parameters. Parameters are float32 whatever it is, so a
  model and its bfloat16 twin share their variables.
  """
  check_model_config(model_config)
  return _BUILDERS[model_config.name](model_config, num_classes, compute_dtype)
