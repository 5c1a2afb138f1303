"""Per-example gradients in which every convolution's weight gradient is one batched matmul.

Under `vmap(jacrev(f))` JAX forms a convolution's per-example weight gradients with the batching
rule of conv_general_dilated: a convolution with one feature group per example. On an H100 that
made the Jacobian rows of 256 examples of ResNet-18 take 87 ms, against 31 ms for one batched
gradient of the same examples. `evaluate_equation` evaluates one equation of a traced program
with each plain convolution given a custom VJP whose weight gradient is patches^T @ cotangent
(`patches` gathers them exactly), which vmap turns into one batched matmul over examples (and
logits). Input gradients and everything else are unchanged; the kernel engine's programs run every
equation through it (factored_layers.FactoredProgram).

The rewrite works on the traced program (jaxpr), so it applies to any model: flax modules,
linearized models, plain functions. Convolutions inside control flow (scan, while, cond) or
custom derivatives, and input-dilated ones keep JAX's own rule; grouped ones are split into plain
ones (`grouped_conv`).
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

_CALLS = ("pjit", "jit", "closed_call", "core_call")


Override = Callable[[int, core.JaxprEqn, list[Any]], list[Any] | None]


def evaluate_program(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
                     override: Override | None = None) -> list[Any]:
  """The outputs of a traced program, every equation by `evaluate_equation`, except where
  `override(number, equation, inputs)` returns the outputs of top-level equation `number` itself."""
  env: dict[core.Var, Any] = {}
  read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for number, eqn in enumerate(jaxpr.eqns):
    inputs = [read(v) for v in eqn.invars]
    outputs = override(number, eqn, inputs) if override else None
    env.update(zip(eqn.outvars, evaluate_equation(eqn, inputs) if outputs is None else outputs))
  return [read(v) for v in jaxpr.outvars]


def evaluate_equation(eqn: core.JaxprEqn, inputs: Sequence[Any]) -> list[Any]:
  """The outputs of one equation of a traced program, its plain convolutions (also those inside
  nested calls) by `patch_matmul_conv`."""
  name = eqn.primitive.name
  if name == "conv_general_dilated" and is_plain_conv(eqn.params):
    return [patch_matmul_conv(*inputs, **_conv_params(eqn.params))]
  if name == "conv_general_dilated" and is_grouped_conv(eqn.params):
    return [grouped_conv(*inputs, eqn.params)]
  if name in _CALLS and "jaxpr" in eqn.params:
    inner = eqn.params["jaxpr"]
    return evaluate_program(inner.jaxpr, inner.consts, inputs)
  return bind_equation(eqn, inputs)


def bind_equation(eqn: core.JaxprEqn, inputs: Sequence[Any]) -> list[Any]:
  """The outputs of one equation as JAX's own primitive computes them."""
  with eqn.ctx.manager:
    outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
  return outputs if eqn.primitive.multiple_results else [outputs]


def is_plain_conv(params: dict) -> bool:
  return (params["feature_group_count"] == 1 and params["batch_group_count"] == 1
          and all(d == 1 for d in params["lhs_dilation"]))


def is_grouped_conv(params: dict) -> bool:
  """A plain convolution but for its feature groups (depthwise, ResNeXt-style)."""
  return (params["feature_group_count"] > 1 and params["batch_group_count"] == 1
          and all(d == 1 for d in params["lhs_dilation"]))


def grouped_conv(lhs: jax.Array, rhs: jax.Array, params: dict) -> jax.Array:
  """A convolution of G feature groups as G plain ones (`patch_matmul_conv`), outputs joined: the
  same numbers. JAX's own rule for their per-example weight gradients, a convolution with G x the
  examples as groups, fails inside shard_map (jax 0.10.2: NotImplementedError, no message), where
  the kernel engine's programs run."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  groups = params["feature_group_count"]
  lhs_parts = jnp.split(lhs, groups, axis=lhs_spec[1])
  rhs_parts = jnp.split(rhs, groups, axis=rhs_spec[0])  # output features, group-major
  return jnp.concatenate([patch_matmul_conv(l, r, **_conv_params(params))
                          for l, r in zip(lhs_parts, rhs_parts)], axis=out_spec[1])


def _conv_params(params: dict) -> dict:
  keep = ("window_strides", "padding", "rhs_dilation", "dimension_numbers", "precision",
          "preferred_element_type")
  return {k: params[k] for k in keep}


def _conv(lhs, rhs, *, window_strides, padding, rhs_dilation, dimension_numbers, precision,
          preferred_element_type):
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, rhs_dilation=rhs_dilation,
                                  dimension_numbers=dimension_numbers, precision=precision,
                                  preferred_element_type=preferred_element_type)


def patch_matmul_conv(lhs: jax.Array, rhs: jax.Array, **params) -> jax.Array:
  """lax.conv_general_dilated(lhs, rhs, **params), whose rhs gradient is a matmul of patches."""
  return _patch_matmul_conv(lhs, rhs, tuple(sorted(params.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_matmul_conv(lhs, rhs, params):
  return _conv(lhs, rhs, **dict(params))


def _forward(lhs, rhs, params):
  return _patch_matmul_conv(lhs, rhs, params), (lhs, rhs)


def _backward(params, residuals, cotangent):
  lhs, rhs = residuals
  params = dict(params)
  (d_lhs,) = jax.linear_transpose(lambda l: _conv(l, rhs, **params), lhs)(cotangent)
  return d_lhs, _weight_gradient(lhs, cotangent, rhs.shape, params).astype(rhs.dtype)


_patch_matmul_conv.defvjp(_forward, _backward)


def _weight_gradient(lhs, cotangent, rhs_shape, params) -> jax.Array:
  """sum over batch and output positions of patch (Cin x filter) times cotangent (Cout)."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  spatial = len(lhs_spec) - 2
  filter_shape = [rhs_shape[d] for d in rhs_spec[2:]]
  lhs_nc = jnp.transpose(lhs, lhs_spec)  # [N, Cin, *spatial]
  patches = _patches(lhs_nc, filter_shape, params["window_strides"], params["padding"],
                     params["rhs_dilation"])
  cotangent_nc = jnp.transpose(cotangent, out_spec)  # [N, Cout, *out_spatial]
  batch_and_space = [0] + list(range(2, 2 + spatial))
  gradient = lax.dot_general(patches, cotangent_nc, ((batch_and_space, batch_and_space), ((), ())),
                             precision=params["precision"],
                             preferred_element_type=params["preferred_element_type"])
  gradient = gradient.reshape(rhs_shape[rhs_spec[1]], *filter_shape, rhs_shape[rhs_spec[0]])
  gradient = jnp.moveaxis(gradient, -1, 0)  # (Cout, Cin, *filter): the order of rhs_spec
  return jnp.transpose(gradient, np.argsort(rhs_spec))


def _patches(lhs_nc: jax.Array, filter_shape: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> jax.Array:
  """The patches a convolution multiplies, [N, Cin * prod(filter), *out_spatial] (Cin-major, the
  filter's positions row-major: `lax.conv_general_dilated_patches`' layout, bit for bit), as one
  strided slice of the padded input per filter position. conv_general_dilated_patches computes
  them by a depthwise convolution with one-hot filters: the same numbers, from 1.2x (ResNet-18) to
  2x (a width-8 CNN) slower for the whole Jacobian on CPU."""
  spatial = len(filter_shape)
  padded = lax.pad(lhs_nc, jnp.zeros((), lhs_nc.dtype),
                   [(0, 0, 0), (0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding])
  out = [(padded.shape[2 + d] - (filter_shape[d] - 1) * dilation[d] - 1) // strides[d] + 1
         for d in range(spatial)]
  slices = []
  for position in np.ndindex(*filter_shape):
    start = [0, 0] + [p * dilation[d] for d, p in enumerate(position)]
    limit = list(padded.shape[:2]) + [start[2 + d] + (out[d] - 1) * strides[d] + 1
                                      for d in range(spatial)]
    slices.append(lax.slice(padded, start, limit, [1, 1, *strides]))
  stacked = jnp.stack(slices, axis=2)  # [N, Cin, prod(filter), *out_spatial]
  return stacked.reshape(stacked.shape[0], -1, *out)
