"""Flax models, chosen by `config.model.name`."""

from typing import Callable

import flax.linen as nn
import ml_collections

from ntk_scale.base_config import base_config
from ntk_scale.config_numbers import is_whole_number
from ntk_scale.models.cnn import SmallCNN
from ntk_scale.models.mlp import MLP
from ntk_scale.models.resnet import ResNet18

_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, int], nn.Module]] = {
    "resnet18": lambda c, n: ResNet18(num_classes=n, width=c.width, batch_norm=c.batch_norm),
    "cnn": lambda c, n: SmallCNN(num_classes=n, width=c.width, batch_norm=c.batch_norm),
    "mlp": lambda c, n: MLP(num_classes=n, width=c.width, depth=c.depth, batch_norm=c.batch_norm),
}
MODEL_NAMES = tuple(sorted(_BUILDERS))


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field of `config.model` that no model can be built from: an
  unknown name, a width below 1, an MLP depth below 0, a batch_norm that is not a bool. Jobs check
  before they record their config: a model that fails to build there would leave a workdir that
  refuses the corrected config as another experiment."""
  if model_config.name not in _BUILDERS:
    raise ValueError(f"config.model.name={model_config.name!r} is not a known model; "
                     f"expected one of {', '.join(MODEL_NAMES)}.")
  minimums = {"width": 1, "depth": 0} if model_config.name == "mlp" else {"width": 1}
  for field, least in minimums.items():
    value = model_config.get(field, least)
    if not is_whole_number(value, least):
      raise ValueError(f"config.model.{field}={value!r} must be an integer >= {least}.")
  if not isinstance(model_config.get("batch_norm", False), bool):
    raise ValueError(f"config.model.batch_norm={model_config.batch_norm!r} must be True or False.")


def build_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model of `config.model`; call it as `model.apply(variables, x, train=...)`.

  Inputs are NHWC float images in [0, 1]; outputs are logits of shape [N, num_classes], float32 or
  wider. `model.clone(dtype="bfloat16")` is its twin that computes in bfloat16 (activations and
  matmul inputs) on the same float32 variables.
  """
  check_model_config(model_config)
  complete = base_config().model  # the defaults of fields a partial model section leaves out
  complete.update(model_config)
  return _BUILDERS[model_config.name](complete, num_classes)
