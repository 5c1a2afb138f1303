"""Model architectures checked against hand-derived shapes, counts and numpy forward passes."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale.base_config import base_config
from ntk_scale.cost_analysis import all_equations
from ntk_scale.models import build_model, check_model_config
from ntk_scale.models.layers import batch_norm
from ntk_scale.models.resnet import BasicBlock


def _model(name, num_classes=10, **fields):
  c = base_config()
  c.model.name = name
  for k, v in fields.items():
    c.model[k] = v
  return build_model(c.model, num_classes)


def _abstract_variables(model, input_shape):
  """Variable shapes without initialising anything (jax.eval_shape)."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))


def _shapes(tree):
  return {"/".join(path): leaf.shape
          for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _num_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _init(model, x, seed=0):
  """Random variables with the shapes `model.init` would give, drawn with numpy.

  `model.init` itself is avoided: compiling jax's truncated-normal initialiser costs seconds per
  distinct kernel shape on CPU. Kernels get variance 1/fan_in, BatchNorm scales and running
  variances are positive, everything else is small noise, so every parameter matters.
  """
  rng = np.random.default_rng(seed)
  abstract = flax.core.unfreeze(_abstract_variables(model, x.shape))
  flat = flax.traverse_util.flatten_dict(abstract)
  out = {}
  for path, leaf in flat.items():
    shape, leafname = leaf.shape, path[-1]
    if leafname == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif leafname in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:  # bias, mean
      value = 0.1 * rng.normal(size=shape)
    out[path] = jnp.asarray(value.astype(leaf.dtype))
  return flax.traverse_util.unflatten_dict(out)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


# --------------------------------------------------------------------------- ResNet-18

def _canonical_cifar_resnet18_params(width=64, num_classes=10, in_channels=3):
  """Hand count for the CIFAR ResNet-18 of He et al. / kuangliu's pytorch-cifar: bias-free convs,
  a BatchNorm (scale + bias) after *every* conv, including each projection shortcut."""
  bn = lambda f: 2 * f
  total = 3 * 3 * in_channels * width + bn(width)  # stem
  c_in = width
  for stage in range(4):
    f = width * 2 ** stage
    for block in range(2):
      total += 3 * 3 * c_in * f + bn(f)  # conv1 + bn1
      total += 3 * 3 * f * f + bn(f)  # conv2 + bn2
      if c_in != f:  # projection shortcut: 1x1 conv + bn
        total += c_in * f + bn(f)
      c_in = f
  return total + c_in * num_classes + num_classes  # dense head


def test_hand_count_is_the_canonical_resnet18_count():
  # Sanity check of the reference itself: 11,173,962 is the well-known CIFAR ResNet-18 count.
  assert _canonical_cifar_resnet18_params() == 11_173_962


def test_resnet18_parameter_count_is_canonical():
  """The CIFAR ResNet-18 (3x3 stem, 10 classes): 11,173,962 parameters, the hand count. A BatchNorm
  shared by the convolutions of a block (as resnet.py once had) left 11,168,330: 5,632 missing."""
  model = _model("resnet18", width=64, batch_norm=True)
  variables = _abstract_variables(model, (1, 32, 32, 3))
  assert _num_params(variables) == 11_173_962


def test_resnet18_every_conv_has_its_own_batchnorm():
  """Each BasicBlock holds one BatchNorm, with its own running statistics, per convolution: 2, or 3
  with a projection shortcut."""
  model = _model("resnet18", width=8, batch_norm=True)
  variables = _abstract_variables(model, (1, 32, 32, 3))
  for stage in range(1, 5):
    for block in (1, 2):
      name = f"stage{stage}_block{block}"
      block_params = variables["params"][name]
      has_shortcut = "shortcut" in block_params
      num_norms = sum(1 for k in block_params if k not in ("conv1", "conv2", "shortcut"))
      num_stats = len(variables["batch_stats"][name])
      assert num_norms == num_stats == (3 if has_shortcut else 2), name


def test_resnet18_conv_structure():
  model = _model("resnet18", width=64, batch_norm=True)
  shapes = _shapes(_abstract_variables(model, (1, 32, 32, 3))["params"])
  # CIFAR stem: one 3x3 conv, no bias (BatchNorm follows), 3 -> 64 channels.
  assert shapes["stem/kernel"] == (3, 3, 3, 64)
  assert "stem/bias" not in shapes
  c_in = 64
  for stage in range(4):
    f = 64 * 2 ** stage
    for block in (1, 2):
      name = f"stage{stage + 1}_block{block}"
      assert shapes[f"{name}/conv1/kernel"] == (3, 3, c_in, f)
      assert shapes[f"{name}/conv2/kernel"] == (3, 3, f, f)
      if c_in != f:
        assert shapes[f"{name}/shortcut/kernel"] == (1, 1, c_in, f)
      else:
        assert f"{name}/shortcut/kernel" not in shapes
      c_in = f
  assert shapes["head/kernel"] == (512, 10)
  assert shapes["head/bias"] == (10,)
  assert not any(k.startswith("stage5") for k in shapes)


def test_resnet18_stem_is_stride_1_and_there_is_no_max_pool():
  # A tiny width keeps this fast; spatial sizes do not depend on the width.
  model = _model("resnet18", width=4, batch_norm=True)
  x = _images((2, 32, 32, 3))
  variables = _init(model, x)
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
  inter = state["intermediates"]
  spatial = lambda name: inter[name]["__call__"][0].shape
  assert spatial("stem") == (2, 32, 32, 4)  # 3x3 stride 1, SAME: 32x32 kept
  # No max-pool between stem and the first stage: stage 1 runs at 32x32; each later stage halves.
  assert spatial("stage1_block1") == (2, 32, 32, 4)
  assert spatial("stage1_block2") == (2, 32, 32, 4)
  assert spatial("stage2_block1") == (2, 16, 16, 8)
  assert spatial("stage3_block1") == (2, 8, 8, 16)
  assert spatial("stage4_block2") == (2, 4, 4, 32)
  assert logits.shape == (2, 10)
  # Global average pool + dense head: logits from the last block's output by hand.
  feat = np.asarray(inter["stage4_block2"]["__call__"][0]).mean(axis=(1, 2))
  head = variables["params"]["head"]
  np.testing.assert_allclose(np.asarray(logits), feat @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             rtol=1e-4, atol=1e-5)


def _numpy_conv(x, kernel, bias, stride, pad):
  """Cross-correlation as PyTorch's Conv2d computes it: zero padding `pad` on every side."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  rows = (x.shape[1] - k) // stride + 1
  cols = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
  for i in range(k):
    for j in range(k):
      window = x[:, i:i + stride * rows:stride, j:j + stride * cols:stride, :]
      out += window @ kernel[i, j]
  return out + bias


@pytest.mark.parametrize("channels, features, strides", [(3, 3, 1), (2, 4, 2), (2, 4, 1)])
def test_basic_block_matches_a_numpy_residual_block(channels, features, strides):
  """He et al.'s block: relu(conv2(relu(conv1(x))) + shortcut(x)), the shortcut the identity or
  a 1x1 convolution (strided, or for a change of channels alone at stride 1); the ReLU after the
  sum keeps every output >= 0 (without it the block passed negative values on to the next)."""
  block = BasicBlock(features, strides, batch_norm=False)
  x = _images((2, 6, 6, channels), seed=8) - 0.5
  variables = _init(block, x, seed=9)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  conv = lambda name, h, stride, pad: _numpy_conv(h, p[name]["kernel"], p[name]["bias"], stride, pad)
  xs = np.asarray(x, np.float64)
  y = conv("conv2", np.maximum(conv("conv1", xs, strides, 1), 0), 1, 1)
  shortcut = conv("shortcut", xs, strides, 0) if "shortcut" in p else xs
  expected = np.maximum(shortcut + y, 0)
  out = np.asarray(block.apply(variables, x, train=False))
  assert out.shape == expected.shape and out.min() >= 0
  assert np.mean(shortcut + y < 0) > 0.1  # the final ReLU has something to cut
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SmallCNN

def test_small_cnn_kernel_shapes():
  model = _model("cnn", width=32)
  shapes = _shapes(_abstract_variables(model, (1, 32, 32, 3))["params"])
  expected = {
      "conv1/kernel": (3, 3, 3, 32), "conv1/bias": (32,),
      "conv2/kernel": (3, 3, 32, 32), "conv2/bias": (32,),
      "conv3/kernel": (3, 3, 32, 64), "conv3/bias": (64,),
      "conv4/kernel": (3, 3, 64, 64), "conv4/bias": (64,),
      "conv5/kernel": (3, 3, 64, 128), "conv5/bias": (128,),
      "conv6/kernel": (3, 3, 128, 128), "conv6/bias": (128,),
      "head/kernel": (128, 10), "head/bias": (10,),
  }
  assert shapes == expected  # exactly these layers, no BatchNorm by default


def test_small_cnn_pool_after_second_conv_and_global_average_pool():
  model = _model("cnn", width=4)
  x = _images((2, 16, 16, 3), seed=1)
  variables = _init(model, x)
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
  inter = state["intermediates"]
  spatial = [inter[f"conv{i}"]["__call__"][0].shape for i in range(1, 7)]
  assert spatial == [(2, 16, 16, 4), (2, 16, 16, 4), (2, 8, 8, 8), (2, 8, 8, 8), (2, 8, 8, 16),
                     (2, 8, 8, 16)]
  # The 2x2 max-pool sits between conv2 and conv3: conv3 applied by hand to maxpool(relu(conv2)).
  conv2 = np.maximum(np.asarray(inter["conv2"]["__call__"][0]), 0)
  pooled = conv2.reshape(2, 8, 2, 8, 2, 4).max(axis=(2, 4))
  p3 = variables["params"]["conv3"]
  conv3 = jax.lax.conv_general_dilated(pooled, p3["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + p3["bias"]
  np.testing.assert_allclose(np.asarray(inter["conv3"]["__call__"][0]), np.asarray(conv3),
                             rtol=1e-4, atol=1e-5)
  # Global average pool of relu(conv6), then the dense head.
  feat = np.maximum(np.asarray(inter["conv6"]["__call__"][0]), 0).mean(axis=(1, 2))
  head = variables["params"]["head"]
  np.testing.assert_allclose(np.asarray(logits), feat @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- MLP

def test_mlp_param_shapes_width_7_depth_3():
  model = _model("mlp", width=7, depth=3)
  shapes = _shapes(_abstract_variables(model, (1, 8, 8, 1))["params"])
  assert shapes == {
      "dense1/kernel": (64, 7), "dense1/bias": (7,),
      "dense2/kernel": (7, 7), "dense2/bias": (7,),
      "dense3/kernel": (7, 7), "dense3/bias": (7,),
      "head/kernel": (7, 10), "head/bias": (10,),
  }


def test_mlp_forward_matches_numpy():
  model = _model("mlp", num_classes=3, width=7, depth=3)
  x = _images((5, 8, 8, 1), seed=2)
  variables = _init(model, x, seed=3)
  p = jax.tree.map(np.asarray, variables["params"])
  h = np.asarray(x).reshape(5, -1)
  for i in (1, 2, 3):
    h = np.maximum(h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"], 0)
  expected = h @ p["head"]["kernel"] + p["head"]["bias"]
  out = model.apply(variables, x, train=True)
  assert out.shape == (5, 3)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- BatchNorm

@pytest.mark.parametrize("name,fields,shape", [
    ("resnet18", {"width": 4}, (6, 16, 16, 3)),
    ("cnn", {"width": 4}, (6, 8, 8, 1)),
    ("mlp", {"width": 8, "depth": 2}, (6, 8, 8, 1)),
])
def test_batch_norm_train_uses_batch_statistics_inference_uses_running_averages(name, fields, shape):
  model = _model(name, batch_norm=True, **fields)
  x = _images(shape, seed=4)
  # The same first example with different companions in the batch.
  y = x.at[1:].set(_images((shape[0] - 1,) + shape[1:], seed=5) * 3.0)
  variables = _init(model, x)
  assert "batch_stats" in variables

  out_x, upd_x = model.apply(variables, x, train=True, mutable=["batch_stats"])
  out_y, _ = model.apply(variables, y, train=True, mutable=["batch_stats"])
  # Training: example 0 is normalised with statistics of the whole batch, so it changes.
  assert np.max(np.abs(np.asarray(out_x[0]) - np.asarray(out_y[0]))) > 1e-3
  # ... and the running statistics move.
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), upd_x["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))

  # Inference (with non-trivial running statistics from the update above): example 0's output
  # does not depend on the rest of the batch, and equals its output in a batch of one.
  trained = {**variables, "batch_stats": upd_x["batch_stats"]}
  ev_x = np.asarray(model.apply(trained, x, train=False))
  ev_y = np.asarray(model.apply(trained, y, train=False))
  ev_0 = np.asarray(model.apply(trained, x[:1], train=False))
  np.testing.assert_allclose(ev_x[0], ev_y[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ev_x[0], ev_0[0], rtol=1e-5, atol=1e-6)
  # Inference does not update anything.
  _, upd_eval = model.apply(trained, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, upd_eval["batch_stats"], trained["batch_stats"])


def test_batch_norm_matches_hand_computed_mlp():
  """One hidden layer with BatchNorm, checked in both modes against a numpy reference
  (biased batch variance, eps 1e-5, running average momentum 0.9)."""
  model = _model("mlp", num_classes=3, width=5, depth=1, batch_norm=True)
  x = _images((6, 8, 8, 1), seed=6)
  variables = _init(model, x, seed=7)  # random scale/bias and running statistics
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  (bn_name,) = [k for k in p if k not in ("dense1", "head")]
  old = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"][bn_name])
  # A bias before BatchNorm is redundant, so the layer may or may not have one.
  h = np.asarray(x, np.float64).reshape(6, -1) @ p["dense1"]["kernel"] + p["dense1"].get("bias", 0.0)
  head = lambda z: np.maximum(z, 0) @ p["head"]["kernel"] + p["head"]["bias"]
  scale, bias, eps = p[bn_name]["scale"], p[bn_name]["bias"], 1e-5

  # Training: batch mean and (biased) batch variance.
  mean, var = h.mean(axis=0), h.var(axis=0)
  expected_train = head((h - mean) / np.sqrt(var + eps) * scale + bias)
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out), expected_train, rtol=1e-4, atol=1e-4)
  new = jax.tree.map(np.asarray, updates["batch_stats"][bn_name])
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4, atol=1e-6)

  # Inference: the running averages, whatever the batch.
  expected_eval = head((h - old["mean"]) / np.sqrt(old["var"] + eps) * scale + bias)
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), expected_eval,
                             rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- build_model

def test_build_model_unknown_name_raises():
  c = base_config()
  c.model.name = "vgg16"
  with pytest.raises(ValueError, match=r"config\.model\.name") as info:
    build_model(c.model, 10)
  assert "vgg16" in str(info.value)


@pytest.mark.parametrize("name, field, value, message", [
    ("mlp", "depth", -2, "config.model.depth=-2 must be an integer >= 0"),  # was a bare linear head
    ("cnn", "width", -4, "config.model.width=-4 must be an integer >= 1"),
    ("resnet18", "width", 0.5, "config.model.width=0.5 must be an integer >= 1"),
    ("mlp", "width", True, "config.model.width=True must be an integer >= 1"),
    ("cnn", "batch_norm", 1, "config.model.batch_norm=1 must be True or False"),
])
def test_a_model_that_cannot_be_built_is_refused_naming_its_field(name, field, value, message):
  config = lambda v: ml_collections.ConfigDict(
      {"name": name, "width": 4, "depth": 2, "batch_norm": False, field: v})
  with pytest.raises(ValueError, match=message):
    check_model_config(config(value))
  check_model_config(config({"depth": 0, "width": 1, "batch_norm": True}[field]))  # the least that builds


@pytest.mark.parametrize("name", ["resnet18", "cnn", "mlp"])
def test_build_model_num_classes_and_batch_norm_flag(name):
  model = _model(name, num_classes=7, width=4, batch_norm=False)
  variables = _abstract_variables(model, (1, 8, 8, 1))
  assert "batch_stats" not in variables
  assert variables["params"]["head"]["bias"].shape == (7,)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 8, 8, 1)), train=False), variables)
  assert out.shape == (3, 7)


def test_a_partial_model_section_is_completed_with_the_base_configs_defaults():
  """A model section naming only some fields (an older record's, say) is checked and built with
  base_config's defaults for the rest: width 32, depth 2, no BatchNorm."""
  section = ml_collections.ConfigDict({"name": "mlp"})
  check_model_config(section)
  shapes = _shapes(_abstract_variables(build_model(section, 3), (1, 4, 4, 1))["params"])
  assert shapes == {"dense1/kernel": (16, 32), "dense1/bias": (32,), "dense2/kernel": (32, 32),
                    "dense2/bias": (32,), "head/kernel": (32, 3), "head/bias": (3,)}
  section = ml_collections.ConfigDict({"name": "cnn", "width": 2})
  check_model_config(section)
  shapes = _shapes(_abstract_variables(build_model(section, 3), (1, 4, 4, 1))["params"])
  assert shapes["conv6/kernel"] == (3, 3, 8, 8) and "conv1/bias" in shapes  # no BatchNorm


@pytest.mark.parametrize("name", ["resnet18", "cnn", "mlp"])
def test_bfloat16_twin_shares_the_variables_and_computes_in_bfloat16(name):
  """model.clone(dtype=bfloat16) (config.train.compute_dtype): the same float32 variables, every
  layer's matmul in bfloat16, float32 logits within bfloat16's rounding of the float32 model's; the
  model itself computes in float32 throughout."""
  model = _model(name, width=4, batch_norm=True)
  twin = model.clone(dtype=jnp.bfloat16)
  x = _images((4, 8, 8, 3))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), _abstract_variables(twin, x.shape)) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), _abstract_variables(model, x.shape))
  variables = _init(model, x)
  products = lambda m: [e for e in all_equations(jax.make_jaxpr(lambda v: m.apply(v, x, train=False))(
      variables).jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert {v.aval.dtype for e in products(model) for v in e.invars} == {jnp.dtype(jnp.float32)}
  assert {v.aval.dtype for e in products(twin) for v in e.invars} == {jnp.dtype(jnp.bfloat16)}
  # Jitted: op by op, each model compiled every primitive of its layers on its own (most of the time).
  full, half = (jax.jit(lambda v, m=m: m.apply(v, x, train=False))(variables) for m in (model, twin))
  assert half.dtype == jnp.float32
  # Activations too: every layer's output (BatchNorm's included; its statistics stay float32) is
  # bfloat16, the logits alone float32.
  _, state = jax.eval_shape(lambda v: twin.apply(v, x, train=False, capture_intermediates=True), variables)
  outputs = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]), sep="/")
  layers = {path: out.dtype for path, (out,) in outputs.items() if path != "__call__"}
  assert any("BatchNorm" in path for path in layers) and outputs["__call__"][0].dtype == jnp.float32
  assert layers == {path: jnp.dtype(jnp.bfloat16) for path in layers}
  assert jnp.max(jnp.abs(half - full)) <= 0.03 * jnp.max(jnp.abs(full))  # 0.004-0.008 measured


@pytest.mark.parametrize("name, fields, expected", [
    # 3x3 convs 3-4-4-8-8-16-16 without biases, a BatchNorm (scale, bias) after each, dense head.
    ("cnn", {"width": 4}, 9 * (3 * 4 + 4 * 4 + 4 * 8 + 8 * 8 + 8 * 16 + 16 * 16)
     + 2 * (4 + 4 + 8 + 8 + 16 + 16) + 16 * 10 + 10),
    # dense 64-7-7-7 without biases, a BatchNorm after each, dense head.
    ("mlp", {"width": 7, "depth": 3}, 64 * 7 + 7 * 7 + 7 * 7 + 2 * 3 * 7 + 7 * 10 + 10),
])
def test_with_batch_norm_the_layers_before_it_have_no_bias(name, fields, expected):
  """A bias before BatchNorm is cancelled by its mean in training, yet moves the output of the
  running averages and adds directions to the tangent kernel: the layer before a BatchNorm has
  none (ResNet-18's convolutions likewise)."""
  model = _model(name, batch_norm=True, **fields)
  variables = _abstract_variables(model, (1, 8, 8, 3 if name == "cnn" else 1))
  assert _num_params(variables) == expected == {"cnn": 4854, "mlp": 668}[name]
  assert not any(path.endswith("bias") and not path.startswith(("head", "BatchNorm"))
                 for path in _shapes(variables["params"]))


def test_resnet18_stem_is_conv_batch_norm_relu():
  """The CIFAR stem as He et al.'s: relu(BN(conv3x3(x))) feeds the first block."""
  model = _model("resnet18", width=4, batch_norm=True)
  x = _images((2, 8, 8, 3), seed=10)
  variables = _init(model, x, seed=11)
  _, state = model.apply(variables, x, train=False, capture_intermediates=True)
  inter = state["intermediates"]
  stem = np.asarray(inter["stem"]["__call__"][0], np.float64)
  bn = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  [bn_name] = [k for k in bn["params"] if k.startswith("BatchNorm")]
  p, s = bn["params"][bn_name], bn["batch_stats"][bn_name]
  expected = np.maximum((stem - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"], 0)
  assert np.mean(expected == 0) > 0.1  # the ReLU has something to cut
  block = BasicBlock(4, 1, batch_norm=True)
  block_variables = {c: variables[c]["stage1_block1"] for c in ("params", "batch_stats")}
  np.testing.assert_allclose(
      np.asarray(block.apply(block_variables, jnp.asarray(expected, jnp.float32), train=False)),
      np.asarray(inter["stage1_block1"]["__call__"][0]), rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_are_exact_for_features_far_from_zero():
  """The two-pass variance: features of mean 1000 and spread 0.1 (a ReLU layer's, say) are
  normalised as float64 normalises them; E[x^2] - E[x]^2 in float32 loses the variance to
  cancellation (its error ~0.06 against a variance of 0.01; outputs off by ~70)."""
  rng = np.random.default_rng(12)
  x = (1000.0 + 0.1 * rng.normal(size=(64, 3))).astype(np.float32)
  layer = batch_norm(True, train=True)
  variables = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
               "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  out, updates = layer.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
  xs = x.astype(np.float64)
  np.testing.assert_allclose(np.asarray(out), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5), atol=0.02)
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["var"]), 0.9 + 0.1 * xs.var(0), rtol=1e-4)
