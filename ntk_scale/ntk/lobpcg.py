"""LOBPCG for the largest eigenpairs of a symmetric matrix, one matrix product per iteration, in jit.

jax's `lobpcg_standard` multiplies its whole basis [X, P, R] by the matrix every iteration, then X
once more: 4 blocks of products. Here every basis vector is a linear combination of vectors whose
products are known, so each combination is applied to the products too (as Knyazev's original
algorithm and scipy's do) and only the new residual block R is multiplied: a quarter of the
products, which dominate the cost once the kernel has many more rows than the block has columns.

The basis is kept orthonormal as in jax's version (Hetmaniuk and Lehoucq 2006): R is projected
out of [X, P] and orthonormalized (SVQB) before its product, directions lost to rounding replaced
by random ones so that the basis keeps its width, and P is chosen orthogonal to X in the
Rayleigh-Ritz coordinates. The products carried along
drift from the true ones by rounding over the iterations: the spectrum job restarts each round
from exact products and measures its residuals with fresh ones (spectrum_rounds.ShardedKernel).
"""

from typing import Callable

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _unit_columns(u: jax.Array, *images: jax.Array) -> tuple[jax.Array, ...]:
  """`u`'s columns scaled to unit length (zero columns stay zero), and `images` by the same scales."""
  norms = jnp.linalg.norm(u, axis=0)
  scale = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 0)
  return (u * scale,) + tuple(image * scale for image in images)


def _svqb(u: jax.Array) -> jax.Array:
  """Orthonormal columns spanning `u`'s; a direction `u` holds only to rounding becomes a zero column
  (Stathopoulos and Wu 2002: the Gram matrix's eigenvectors, scaled)."""
  (u,) = _unit_columns(u)
  gram = _dot(u.T, u)
  values, vectors = jnp.linalg.eigh(gram)
  keep = values > jnp.finfo(u.dtype).eps * values[-1]
  scale = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, values, 1)), 0)
  return _unit_columns(_dot(u, vectors * scale))[0]


def _project_out(basis: jax.Array, u: jax.Array) -> jax.Array:
  """The part of `u` orthogonal to the orthonormal `basis`, orthonormalized; columns that do not stay
  orthogonal to `basis` after normalizing (they lay in its span) are zeroed."""
  for _ in range(2):
    u = u - _dot(basis, _dot(basis.T, u))
    u = _svqb(_svqb(u))
  for _ in range(2):
    u = u - _dot(basis, _dot(basis.T, u))
  return u * (jnp.linalg.norm(u, axis=0) >= 0.99)


def _fill_lost(old: jax.Array, r: jax.Array, key: jax.Array) -> jax.Array:
  """`r` with its zero columns (directions lost to rounding: near convergence, or where residuals
  are nearly dependent, as a fast-decaying spectrum makes them in float32) replaced by random
  directions orthonormal to `old` and to r's other columns. A zero column would leave the
  Rayleigh-Ritz coordinates of P on a vector the basis does not hold, and P no longer
  orthonormal: float32 solves fell apart within two iterations."""
  lost = jnp.linalg.norm(r, axis=0) == 0

  def fill(r):
    fresh = _project_out(jnp.concatenate([old, r], axis=1), jax.random.normal(key, r.shape, r.dtype))
    return jnp.where(lost, fresh, r)

  return jax.lax.cond(jnp.any(lost), fill, lambda r: r, r)


def _rayleigh_ritz(basis: jax.Array, products: jax.Array, width: int):
  """The top `width` Ritz pairs on the orthonormal `basis` (zero columns allowed, though
  `_fill_lost` leaves none but where even random directions are lost) given its
  `products`, and the search directions P: the basis' combinations orthogonal to the new X that
  span, with it, the previous X (Hetmaniuk and Lehoucq 2006, section 4)."""
  projected = _dot(basis.T, products)
  projected = (projected + projected.T) / 2
  # A zero column's row and column are zero; put its eigenvalue below every real one so that the
  # top `width` pairs never include its unit vector.
  empty = jnp.linalg.norm(basis, axis=0) == 0
  floor = jnp.abs(projected).sum() + 1
  projected = projected - jnp.diag(jnp.where(empty, floor, 0))
  values, coordinates = jnp.linalg.eigh(projected)
  values, coordinates = values[::-1], coordinates[:, ::-1]
  x, ax = _unit_columns(_dot(basis, coordinates[:, :width]), _dot(products, coordinates[:, :width]))
  q, _ = jnp.linalg.qr(coordinates[:width, width:].T)
  directions = _dot(coordinates[:, width:], q)
  p, ap = _unit_columns(_dot(basis, directions), _dot(products, directions))
  return values[:width], x, ax, p, ap


def lobpcg_top(product: Callable[[jax.Array], jax.Array], block: jax.Array, max_iters: int,
               tol: float, converge: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The largest eigenvalues (descending) and unit eigenvectors of the symmetric matrix that
  `product` multiplies, from the starting `block` [n, width], and the iterations run.

  It stops after `max_iters` iterations or once the top `converge` pairs (default: all `width`)
  have residuals ||K x - theta x|| at most tol * theta_1. Traceable: call it inside jit.
  """
  width = block.shape[1]
  converge = width if converge is None else converge
  x = _svqb(_svqb(block))
  ax = product(x)
  theta = jnp.sum(x * ax, axis=0)

  def residuals(x, ax, theta):
    r = ax - x * theta
    return r, jnp.linalg.norm(r, axis=0)

  def done(theta, norms):
    return jnp.all(norms[:converge] <= tol * jnp.abs(theta[0]))

  def step(i, x, ax, p, ap, theta):
    r, _ = residuals(x, ax, theta)
    old = x if p is None else jnp.concatenate([x, p], axis=1)
    r = _fill_lost(old, _project_out(old, r), jax.random.fold_in(jax.random.key(0), i))
    ar = product(r)
    basis = jnp.concatenate([old, r], axis=1)
    products = jnp.concatenate([ax if p is None else jnp.concatenate([ax, ap], axis=1), ar], axis=1)
    theta, x, ax, p, ap = _rayleigh_ritz(basis, products, width)
    return x, ax, p, ap, theta

  # The first iteration has no P: its basis is [X, R].
  x, ax, p, ap, theta = step(0, x, ax, None, None, theta)

  def cond(state):
    i, x, ax, _, _, theta = state
    return jnp.logical_and(i < max_iters, jnp.logical_not(done(theta, residuals(x, ax, theta)[1])))

  def body(state):
    i, x, ax, p, ap, theta = state
    return (i + 1,) + step(i, x, ax, p, ap, theta)

  i, x, ax, _, _, theta = jax.lax.while_loop(cond, body, (jnp.asarray(1), x, ax, p, ap, theta))
  return theta, x, i
