"""Layers whose kernel is formed from the Gram matrices of their inputs and output cotangents.

A convolution's (or dense layer's) weight gradient for one example and logit is a sum over output
positions s of outer products: input patch at s times the cotangent of the output at s. Two
examples' weight gradients therefore have the inner product

    <g_i, g_j> = sum_{s,t} (sum_o a_i(s*stride + o*dilation - pad) . a_j(t*stride + o*dilation - pad))
                           * (d_i(s) . d_j(t))

(o over filter offsets, out-of-range inputs zero): the Gram of the layer's input over all pairs of
positions (S_in^2 C_in multiply-adds per pair of examples, shared by every logit), of the
cotangents (S_out^2 C' C_out), and S_out^2 k to combine them, where contracting the weight
gradients costs C' k C_in C_out, and the rows held per example are S_in C_in + C' S_out C_out
numbers instead of C' k C_in C_out. Few positions and many channels win: ResNet-18's 512-channel
convolutions on 4x4 maps (9x fewer multiply-adds per logit), every dense layer on a vector (one
position). neural-tangents' STRUCTURED_DERIVATIVES rests on the same identity.

The layers are found in the traced program: convolutions and dot_generals whose weight is a
parameter array used nowhere else, with no batch dimensions, lhs dilation or feature groups. Their
inputs are recorded while the program runs, and the cotangents are the derivatives of a zero added
to their outputs, so one reverse pass gives both, and the weight's own gradient is never formed.
"""

import collections
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from ntk_scale.ntk.conv_weight_gradients import bind_equation, evaluate_program, is_plain_conv

MODES = ("auto", "all", "none")
# auto factors a layer when the factored multiply-adds per pair of examples, times this, are fewer
# than its weight gradients' contraction: the combination step is elementwise work, slower per
# multiply-add than a matmul.
ELEMENTWISE_OVERHEAD = 2.0


@dataclasses.dataclass(frozen=True)
class FactoredLayer:
  """One layer as the kernel sees it: input [C_in, *in_positions], output cotangent
  [C_out, *out_positions] (a dense layer: one position per row of its input), and how input
  positions feed output positions (filter offsets, strides, low padding, dilation per position
  axis)."""
  equation: int  # among the traced program's top-level equations
  leaf: int  # the weight, among jax.tree.leaves(params)
  in_channels: int
  out_channels: int
  in_positions: tuple[int, ...]
  out_positions: tuple[int, ...]
  filter_shape: tuple[int, ...]
  strides: tuple[int, ...]
  low_padding: tuple[int, ...]
  dilation: tuple[int, ...]
  input_permutation: tuple[int, ...]  # native input -> [C_in, *in_positions] (then a reshape)
  output_permutation: tuple[int, ...]  # native output -> [C_out, *out_positions]
  permuted_output_shape: tuple[int, ...]  # the native output after output_permutation

  @property
  def num_params(self) -> int:
    return math.prod(self.filter_shape) * self.in_channels * self.out_channels

  @property
  def forward_flops(self) -> float:
    """Of the layer's matmul for one example: also what forming its weight gradient would cost."""
    return 2.0 * math.prod(self.out_positions) * self.num_params

  def pair_macs(self, logit_rows: int) -> float:
    """Multiply-adds per pair of examples, factored: input Gram, cotangent Gram, combination."""
    s_in, s_out = math.prod(self.in_positions), math.prod(self.out_positions)
    return (s_in * s_in * self.in_channels
            + s_out * s_out * (logit_rows * self.out_channels + math.prod(self.filter_shape)))

  def row_numbers(self, logit_rows: int) -> float:
    """Numbers held per example: its input and a cotangent per logit row."""
    return (math.prod(self.in_positions) * self.in_channels
            + logit_rows * math.prod(self.out_positions) * self.out_channels)

  def pair_workspace(self) -> float:
    """Numbers per pair of examples while a tile is contracted: both Grams and one product."""
    s_in, s_out = math.prod(self.in_positions), math.prod(self.out_positions)
    return s_in * s_in + 2 * s_out * s_out

  def canonical_input(self, lhs: jax.Array) -> jax.Array:
    return lhs.transpose(self.input_permutation).reshape(self.in_channels, *self.in_positions)

  def native_output(self, canonical: jax.Array) -> jax.Array:
    """The inverse of the output's canonical layout: a [C_out, *out_positions] array as the
    equation's output."""
    return canonical.reshape(self.permuted_output_shape).transpose(
        np.argsort(self.output_permutation))


def trace(fn: Callable, leaves: Sequence[Any], *args: Any) -> core.ClosedJaxpr:
  """The program of `fn(leaves, *args)` (arrays or ShapeDtypeStructs), `leaves` a list of arrays
  (the parameters), its first inputs."""
  return jax.make_jaxpr(fn)(list(leaves), *args)


def find_layers(closed: core.ClosedJaxpr, num_leaves: int) -> tuple[FactoredLayer, ...]:
  """Every layer of a `trace`d program whose kernel can be formed from factors."""
  jaxpr = closed.jaxpr
  leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
  uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if not _is_literal(v))
  uses.update(v for v in jaxpr.outvars if not _is_literal(v))
  layers = []
  for number, eqn in enumerate(jaxpr.eqns):
    if len(eqn.invars) != 2 or _is_literal(eqn.invars[1]):
      continue
    rhs = eqn.invars[1]
    if rhs not in leaf_of or uses[rhs] != 1:  # a weight used elsewhere needs its gradient
      continue
    if not jnp.issubdtype(rhs.aval.dtype, jnp.floating):
      continue
    lhs_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if eqn.primitive.name == "conv_general_dilated":
      layer = _conv_layer(number, leaf_of[rhs], eqn.params, lhs_shape, rhs.aval.shape, out_shape)
    elif eqn.primitive.name == "dot_general":
      layer = _dense_layer(number, leaf_of[rhs], eqn.params, lhs_shape, rhs.aval.shape, out_shape)
    else:
      layer = None
    if layer is not None:
      layers.append(layer)
  return tuple(layers)


def _is_literal(v) -> bool:
  return isinstance(v, core.Literal)


def _conv_layer(number, leaf, params, lhs_shape, rhs_shape, out_shape) -> FactoredLayer | None:
  if not is_plain_conv(params) or any(lo < 0 or hi < 0 for lo, hi in params["padding"]):
    return None
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  in_perm = (lhs_spec[1], lhs_spec[0], *lhs_spec[2:])  # [C_in, N, *spatial]: N an unshifted axis
  out_perm = (out_spec[1], out_spec[0], *out_spec[2:])
  return FactoredLayer(
      equation=number, leaf=leaf, in_channels=lhs_shape[lhs_spec[1]],
      out_channels=out_shape[out_spec[1]],
      in_positions=tuple(lhs_shape[d] for d in in_perm[1:]),
      out_positions=tuple(out_shape[d] for d in out_perm[1:]),
      filter_shape=(1, *(rhs_shape[d] for d in rhs_spec[2:])),
      strides=(1, *params["window_strides"]), low_padding=(0, *(lo for lo, _ in params["padding"])),
      dilation=(1, *params["rhs_dilation"]), input_permutation=in_perm, output_permutation=out_perm,
      permuted_output_shape=tuple(out_shape[d] for d in out_perm))


def _dense_layer(number, leaf, params, lhs_shape, rhs_shape, out_shape) -> FactoredLayer | None:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
  if lhs_batch or rhs_batch or not lhs_contract:
    return None
  lhs_free = [d for d in range(len(lhs_shape)) if d not in lhs_contract]
  rhs_free = [d for d in range(len(rhs_shape)) if d not in rhs_contract]
  positions = tuple(lhs_shape[d] for d in lhs_free) or (1,)
  # dot_general's output: the lhs free axes, then the rhs free axes.
  out_perm = tuple(range(len(lhs_free), len(out_shape))) + tuple(range(len(lhs_free)))
  ones = (1,) * len(positions)
  return FactoredLayer(
      equation=number, leaf=leaf, in_channels=math.prod(lhs_shape[d] for d in lhs_contract),
      out_channels=math.prod(rhs_shape[d] for d in rhs_free), in_positions=positions,
      out_positions=positions, filter_shape=ones, strides=ones, low_padding=(0,) * len(positions),
      dilation=ones, input_permutation=(*lhs_contract, *lhs_free), output_permutation=out_perm,
      permuted_output_shape=tuple(out_shape[d] for d in out_perm))


def choose(layers: Sequence[FactoredLayer], logit_rows: int, kind: str,
           mode: str) -> tuple[FactoredLayer, ...]:
  """The layers to factor: none for "full" kernels (their cotangent Gram would keep every pair of
  logits apart: C^2 S_out^2 numbers per pair of examples) or mode "none"; every candidate for
  "all"; for "auto" those whose factored multiply-adds (ELEMENTWISE_OVERHEAD times) are fewer."""
  if mode not in MODES:
    raise ValueError(f"factored_layers={mode!r}; expected one of {', '.join(MODES)}.")
  if mode == "none" or kind == "full":
    return ()
  if mode == "all":
    return tuple(layers)
  return tuple(layer for layer in layers if ELEMENTWISE_OVERHEAD * layer.pair_macs(logit_rows)
               < logit_rows * layer.num_params)


class FactoredProgram:
  """A `trace`d program `fn(leaves, x)` evaluated equation by equation with the chosen layers'
  weights fixed: a zero (their cotangent's handle) added to each one's output and its input
  recorded. Every other plain convolution is evaluated with its weight gradient as a matmul of
  patches (conv_weight_gradients.py)."""

  def __init__(self, closed: core.ClosedJaxpr, layers: Sequence[FactoredLayer]):
    self.closed = closed
    self.layers = tuple(layers)
    self._by_equation = {layer.equation: k for k, layer in enumerate(self.layers)}

  def zero_perturbations(self, dtype) -> tuple[jax.Array, ...]:
    return tuple(jnp.zeros((layer.out_channels, *layer.out_positions), dtype)
                 for layer in self.layers)

  def __call__(self, leaves: Sequence[Any], x: jax.Array,
               perturbations: Sequence[jax.Array]) -> tuple[Any, tuple[jax.Array, ...]]:
    """(fn's output, each chosen layer's input as [C_in, *in_positions])."""
    inputs: list[jax.Array | None] = [None] * len(self.layers)

    def factored(number: int, eqn: core.JaxprEqn, args: list[Any]) -> list[Any] | None:
      k = self._by_equation.get(number)
      if k is None:
        return None
      layer = self.layers[k]
      (out,) = bind_equation(eqn, args)
      inputs[k] = layer.canonical_input(args[0])
      return [out + layer.native_output(perturbations[k]).astype(out.dtype)]

    (out,) = evaluate_program(self.closed.jaxpr, self.closed.consts, [*leaves, x], factored)
    return out, tuple(inputs)


def factored_gram(a1: jax.Array, d1: jax.Array, a2: jax.Array, d2: jax.Array,
                  layer: FactoredLayer, precision: lax.Precision) -> jax.Array:
  """The layer's share of a tile, [T1, T2], summed over logit rows: a [T, C_in, *in_positions],
  d [T, C', C_out, *out_positions] for the tile's rows (1) and columns (2)."""
  t1, t2 = a1.shape[0], a2.shape[0]
  s_in, s_out = math.prod(layer.in_positions), math.prod(layer.out_positions)
  inputs = lax.dot_general(a1.reshape(t1, layer.in_channels, s_in),
                           a2.reshape(t2, layer.in_channels, s_in),
                           (((1,), (1,)), ((), ())), precision=precision)  # [T1, S_in, T2, S_in]
  cotangents = lax.dot_general(d1.reshape(t1, -1, s_out), d2.reshape(t2, -1, s_out),
                               (((1,), (1,)), ((), ())), precision=precision)  # [T1, S_out, T2, S_out]
  inputs = inputs.reshape(t1, *layer.in_positions, t2, *layer.in_positions)
  cotangents = cotangents.reshape(t1, *layer.out_positions, t2, *layer.out_positions)
  rank = len(layer.in_positions)
  axes = tuple(range(1, 1 + rank)) + tuple(range(2 + rank, 2 + 2 * rank))
  total = jnp.zeros((t1, t2), inputs.dtype)
  for offset in np.ndindex(*layer.filter_shape):
    ranges = [_valid_outputs(layer, d, o) for d, o in enumerate(offset)]
    if any(first >= last for first, _, last in ranges):
      continue  # this offset reads only padding
    # Input pairs (s * stride + o * dilation - pad, t * stride + ...) for the output pairs (s, t).
    start = [0] + [u for _, u, _ in ranges]
    limit = [t1] + [u + (last - first - 1) * layer.strides[d] + 1
                    for d, (first, u, last) in enumerate(ranges)]
    strides = [1] + list(layer.strides)
    input_pairs = lax.slice(inputs, start + [0] + start[1:], limit + [t2] + limit[1:],
                            strides + strides)
    out_start = [0] + [first for first, _, _ in ranges]
    out_limit = [t1] + [last for _, _, last in ranges]
    output_pairs = lax.slice(cotangents, out_start + [0] + out_start[1:],
                             out_limit + [t2] + out_limit[1:])
    total = total + jnp.sum(input_pairs * output_pairs, axis=axes)
  return total


def _valid_outputs(layer: FactoredLayer, axis: int, offset: int) -> tuple[int, int, int]:
  """Along one position axis, for one filter offset: (first output position, the input position it
  reads, one past the last output position) of the outputs that read a real input."""
  stride, shift = layer.strides[axis], offset * layer.dilation[axis] - layer.low_padding[axis]
  size_in, size_out = layer.in_positions[axis], layer.out_positions[axis]
  first = 0
  while first * stride + shift < 0:
    first += 1
  last = size_out
  while last > first and (last - 1) * stride + shift >= size_in:
    last -= 1
  return first, first * stride + shift, last
