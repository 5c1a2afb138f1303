"""Per-example Jacobians with convolution weight gradients as patch matmuls equal JAX's own, in
float64, across strides, padding, dilation, layouts and spatial ranks; the rewrite is used; its
patches are lax's."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from ntk_scale.ntk.conv_weight_gradients import _patches, evaluate_program

from test_kernel_regression import all_highest


def _two_convs(p, e):
  h = lax.conv_general_dilated(e[None], p["w"], (2, 1), "SAME", rhs_dilation=(1, 2),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.jit(jnp.tanh)(h)  # a nested jit: its body is rewritten too
  h = lax.conv_general_dilated(h, p["w2"], (1, 1), ((1, 0), (2, 1)),
                               dimension_numbers=("NHWC", "OIHW", "NCHW"))
  return jnp.sum(h ** 2, (2, 3))[0]


def _one_d(p, e):
  return lax.conv_general_dilated(e[None], p, (2,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))[0].sum(0)


def _jacobians(f, params, x):
  theta, unravel = ravel_pytree(params)
  g = lambda flat, e: f(unravel(flat), e)
  per_example = lambda fn: jax.vmap(jax.jacrev(fn), (None, 0))
  closed = jax.make_jaxpr(g)(theta, x[0])
  rewritten = lambda flat, e: evaluate_program(closed.jaxpr, closed.consts, [flat, e])[0]
  # Jitted, as the engine runs the rewrite: op by op, each of their hundreds of primitives compiled
  # on its own (most of this file's time).
  return (jax.jit(per_example(g))(theta, x), jax.jit(per_example(rewritten))(theta, x),
          str(jax.make_jaxpr(per_example(g))(theta, x)),
          str(jax.make_jaxpr(per_example(rewritten))(theta, x)))


def test_matches_jax_rule_in_float64():
  with jax.enable_x64(True):
    _check_cases()


def _check_cases():
  rng = np.random.default_rng(0)
  cases = [
      (_two_convs, {"w": rng.normal(size=(3, 2, 3, 5)), "w2": rng.normal(size=(4, 5, 5, 2))},
       rng.normal(size=(7, 9, 8, 3))),
      (_one_d, rng.normal(size=(3, 2, 4)), rng.normal(size=(7, 9, 2))),
  ]
  for f, params, x in cases:
    reference, rewritten, reference_jaxpr, jaxpr = _jacobians(f, params, x)
    assert reference.dtype == jnp.float64
    np.testing.assert_allclose(rewritten, reference, rtol=1e-12, atol=1e-12 * np.abs(reference).max())
    # JAX's rule groups a convolution by example (7 groups); the rewrite does not.
    assert "group_count=7" not in jaxpr
    assert "group_count=7" in reference_jaxpr or f is _one_d
    assert "dot_general" in jaxpr  # the weight gradient is a (batched) matmul of patches


def test_patches_are_lax_patches_bit_for_bit():
  """Both jitted, as the engine's programs run them (op by op, each slice compiled on its own)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 9, 7)), jnp.float32)
  for filter_shape, strides, padding, dilation in (((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
                                                   ((3, 2), (2, 2), ((1, 0), (0, 1)), (1, 1)),
                                                   ((2, 3), (1, 2), ((2, 2), (1, 1)), (2, 1)),
                                                   ((1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1))):
    expected = jax.jit(lambda x: lax.conv_general_dilated_patches(
        x, filter_shape, strides, padding, rhs_dilation=dilation, precision=lax.Precision.HIGHEST))(x)
    patches = jax.jit(lambda x: _patches(x, filter_shape, strides, padding, dilation))(x)
    np.testing.assert_array_equal(patches, expected)


def _transposed(p, e):
  """A transposed convolution (input dilation 2), as a decoder's upsampling layer is."""
  h = lax.conv_general_dilated(e[None], p, (1, 1), ((1, 1), (2, 1)), lhs_dilation=(2, 2),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.tanh(h), (1, 2))[0]


def _conv_in_nested_jit(p, e):
  conv = jax.jit(lambda w, v: lax.conv_general_dilated(v, w, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return jnp.sum(conv(p, e[None]) ** 2, (1, 2))[0]


def test_input_dilated_convolutions_keep_jaxs_rule_and_nested_ones_are_rewritten():
  """An input-dilated convolution, which `patch_matmul_conv` cannot express, must keep JAX's own
  rule (rewritten, it would lose its dilation); a convolution inside a nested jit
  (a jitted layer) is rewritten like a top-level one. Both against JAX's own float64 Jacobians."""
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    for f, params in ((_transposed, rng.normal(size=(3, 2, 3, 4))),
                      (_conv_in_nested_jit, rng.normal(size=(3, 3, 3, 4)))):
      reference, rewritten, _, jaxpr = _jacobians(f, params, rng.normal(size=(5, 4, 5, 3)))
      np.testing.assert_allclose(rewritten, reference, rtol=1e-12,
                                 atol=1e-12 * np.abs(reference).max())
      if f is _conv_in_nested_jit:
        assert "group_count=5" not in jaxpr and "dot_general" in jaxpr


def test_weight_gradients_keep_the_convolutions_precision():
  """A convolution that asks for HIGHEST (as the kernel engine's float32 models do on GPUs, where
  the default is TF32) has its weight gradient's patch matmul at HIGHEST too. Read from the traced
  per-example Jacobian program (on this CPU the precision changes nothing)."""
  highest = lax.Precision.HIGHEST
  f = lambda p, e: jnp.sum(lax.conv_general_dilated(
      e[None], p, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=highest) ** 2, (1, 2))[0]
  rng = np.random.default_rng(3)
  params = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  x = rng.normal(size=(3, 5, 5, 2)).astype(np.float32)
  closed = jax.make_jaxpr(f)(params, x[0])
  rewritten = lambda p, e: evaluate_program(closed.jaxpr, closed.consts, [p, e])[0]
  assert all_highest(jax.vmap(jax.jacrev(rewritten), (None, 0)), params, x)
