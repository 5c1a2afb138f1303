"""Square Attack, L2 (Andriushchenko et al., ECCV 2020), inside jit: attacks.square, norm="l2".

Random search on the logits only, like the L-inf version, but a query does not paint a square a
flat colour: it moves L2 mass between two windows of the same side. The first window gets the
old perturbation there (per channel, scaled to unit norm) plus a "meta pseudo-Gaussian" bump of
random sign per channel; the second window is emptied; the mass they had, plus whatever the ball
has left, goes to the first, and the whole perturbation is rescaled to L2 norm eps before the
clip to [0, 1]. The start is a grid of such bumps. This transcribes `square_attack_l2` of the
authors' reference (max-andr/square-attack, attack.py); `square_l2` says where it differs.

The bump of side s (the reference's meta_pseudo_gaussian_pert) is two stacked rectangles, the top
s // 2 rows and the bottom s - s // 2, of opposite sign, each a pseudo-Gaussian normalised to unit
norm, the pair normalised again, transposed with probability 1/2. A rectangle's pixel at
Chebyshev distance d from its centre pixel is the sum of 1/(k+1)^2 over the centred squares of
half-side k >= d that the reference's loop adds up, H(K) - H(d) with H(k) = sum_{m<=k} 1/m^2 and
K = max(height, width) // 2 + 1: a closed form that takes a traced side, and with the norms of the
rectangles tabulated per side (`_tables`), a bump is one elementwise expression over the image.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale.attack_steps import (TINY, LogitsFn, best_of_restarts, keep_lower_margin, l2_norm,
                                    margin_loss, square_fraction)

# The reference's guard on a window's old perturbation norm (old / (1e-10 + norm)).
_WINDOW_GUARD = 1e-10


def _rectangle(height: int, width: int, harmonic: np.ndarray) -> np.ndarray:
  """The reference's pseudo_gaussian_pert_rectangles(height, width) before its normalisation."""
  rows = np.abs(np.arange(height) - height // 2)[:, None]
  cols = np.abs(np.arange(width) - width // 2)[None, :]
  return harmonic[max(height, width) // 2 + 1] - harmonic[np.maximum(rows, cols)]


def _tables(size: int) -> tuple[np.ndarray, np.ndarray]:
  """H(k) for k <= size + 1, and [size + 1, 2]: per side s, the factors that scale the top and
  the bottom rectangle of the bump of side s (each to unit norm, the pair to unit norm: 1/sqrt(2)
  when both have rows, as for s >= 2)."""
  harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size + 2) ** 2)])
  scales = np.zeros((size + 1, 2))
  for side in range(1, size + 1):
    halves = [_rectangle(side // 2, side, harmonic), _rectangle(side - side // 2, side, harmonic)]
    filled = sum(half.size > 0 for half in halves)
    for j, half in enumerate(halves):
      if half.size:
        scales[side, j] = 1.0 / (np.linalg.norm(half) * np.sqrt(filled))
  return harmonic, scales


def _meta_pseudo_gaussian(rows: jax.Array, cols: jax.Array, side: jax.Array | int, flip: jax.Array,
                          tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The reference's meta_pseudo_gaussian_pert(side), transposed where `flip`, at the offsets
  (`rows`, `cols`) from its window's corner (broadcast together); 0 outside the window. The
  side may be traced: no slice depends on it."""
  harmonic, scales = tables
  inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
  across, along = jnp.where(flip, cols, rows), jnp.where(flip, rows, cols)
  half = side // 2
  top = across < half
  height = jnp.where(top, half, side - half)
  local = jnp.where(top, across, across - half)
  distance = jnp.maximum(jnp.abs(local - height // 2), jnp.abs(along - side // 2))
  value = harmonic[side // 2 + 1] - harmonic[jnp.clip(distance, 0, len(harmonic) - 1)]
  value = value * jnp.where(top, scales[side, 0], -scales[side, 1])
  return jnp.where(inside, value, 0.0)


def _initial_squares(h: int, w: int) -> tuple[int, np.ndarray, np.ndarray]:
  """The side of the starting bumps and their corners (rows, cols), row by row: the reference's
  grid, side h // 5 from row and column (h - 5 * side) // 2 on, h // side by w // side of them
  (corners past the image add nothing; a bump the border cuts keeps its top-left part). Side 1
  and offset 0 at least (the reference divides by zero below 5 rows)."""
  side = max(h // 5, 1)
  offset = max((h - 5 * side) // 2, 0)
  starts = lambda length: offset + side * np.arange(length // side)
  rows, cols = np.meshgrid(starts(h), starts(w), indexing="ij")
  return side, rows.ravel(), cols.ravel()


def square_l2(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
              eps: float, num_queries: int, p_init: float = 0.8, restarts: int = 1,
              schedule: str = "rescaled") -> jax.Array:
  """Square Attack, L2: the reference's square_attack_l2 (start, then num_queries queries), run
  on every example as on a batch of one.

  Where it differs from the reference: (1) the reference draws one pair of windows and one
  transposition of the bump per query, and one transposition per starting bump, for its whole
  batch (signs per example and channel); here every example draws its own, so an example's
  result does not depend on the rest of the batch (each sees the reference's distribution);
  the random numbers are jax.random's, not NumPy's. (2) As in `attacks.square`, a window may take
  every place in the image (the reference's randint(0, h - s) stops one short), and its side,
  max(round(sqrt(p h w)), 3) made odd, is capped at min(h, w) - 1 (uncapped, the reference's
  randint fails). (3) Images under 5 rows get starting bumps of side 1 (h // 5 is 0 there), and
  a bump the border cuts keeps its top-left part (where the reference's slice assignment fails).
  (4) An example stops once misclassified (margin < 0, as in `attacks.square`; the reference
  stops at margin <= 0). AutoAttack's L2 Square (autoattack/square.py) also draws one window pair
  and transposition per query for the batch, caps the side at min(h, w), and keeps every
  misclassified candidate even where it does not lower the margin.
  """
  n, h, w, c = images.shape
  side_limit = max(min(h, w) - 1, 1)
  first_side, first_rows, first_cols = _initial_squares(h, w)
  harmonic, scales = _tables(max(side_limit, first_side))
  tables = (jnp.asarray(harmonic, images.dtype), jnp.asarray(scales, images.dtype))
  # Per pixel, the starting bump that covers it and the offsets from that bump's corner (a pixel
  # no bump covers gets some bump whose window its offsets fall outside).
  rows, cols = np.arange(h), np.arange(w)
  bump_row = np.minimum((rows[:, None] - first_rows[0]) // first_side, h // first_side - 1)
  bump_col = np.minimum((cols[None, :] - first_cols[0]) // first_side, w // first_side - 1)
  which = np.clip(bump_row * (w // first_side) + bump_col, 0, len(first_rows) - 1)  # [h, w]
  offset_rows = rows[:, None] - first_rows[which]
  offset_cols = cols[None, :] - first_cols[which]
  per_channel = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))

  def attack_once(key):
    start_key, loop_key = jax.random.split(key)
    flip_key, sign_key = jax.random.split(start_key)
    flips = jax.random.bernoulli(flip_key, 0.5, (n, len(first_rows)))
    signs = jax.random.rademacher(sign_key, (n, len(first_rows), c), images.dtype)
    bumps = _meta_pseudo_gaussian(offset_rows, offset_cols, first_side, flips[:, which], tables)
    delta = bumps[..., None] * signs[:, which]
    x_best = jnp.clip(images + delta / jnp.maximum(l2_norm(delta), TINY) * eps, 0.0, 1.0)
    margin = margin_loss(logits_fn(x_best), labels)

    def query(i, carry):
      x_best, margin = carry
      row_key, col_key, flip_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i), 4)
      side = jnp.round(jnp.sqrt(square_fraction(p_init, i, num_queries, schedule) * h * w)).astype(jnp.int32)
      side = jnp.maximum(side, 3)
      side = jnp.minimum(side + (side % 2 == 0), side_limit)
      tops = jax.random.randint(row_key, (2, n), 0, h - side + 1)  # the two windows
      lefts = jax.random.randint(col_key, (2, n), 0, w - side + 1)
      flip = jax.random.bernoulli(flip_key, 0.5, (n,))
      sign = jax.random.rademacher(sign_key, (n, c), images.dtype)
      in_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + side)  # [2, n, h]
      in_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + side)  # [2, n, w]
      windows = in_rows[..., :, None, None] & in_cols[..., None, :, None]  # [2, n, h, w, 1]
      first, both = windows[0], windows[0] | windows[1]
      bump = _meta_pseudo_gaussian(rows[:, None] - tops[0][:, None, None],
                                   cols - lefts[0][:, None, None], side, flip[:, None, None],
                                   tables)
      delta = x_best - images
      old = jnp.where(first, delta, 0.0)
      # The mass the two windows hold, per channel, plus an equal share of what the ball has left.
      mass = (jnp.maximum(eps ** 2 - l2_norm(delta) ** 2, 0.0) / c
              + jnp.square(per_channel(jnp.where(both, delta, 0.0))))
      new = bump[..., None] * sign[:, None, None, :] + old / (_WINDOW_GUARD + per_channel(old))
      new = new / jnp.maximum(per_channel(new), TINY) * jnp.sqrt(mass)
      delta = jnp.where(first, new, jnp.where(both, 0.0, delta))
      candidate = jnp.clip(images + delta / jnp.maximum(l2_norm(delta), TINY) * eps, 0.0, 1.0)
      return keep_lower_margin(logits_fn, labels, candidate, x_best, margin)

    x_best, _ = jax.lax.fori_loop(0, num_queries, query, (x_best, margin))
    return x_best

  return best_of_restarts(attack_once, logits_fn, labels, key, restarts)
