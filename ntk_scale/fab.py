"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf and L2 (Croce and Hein, ICML 2020),
inside jit.

FAB looks for the smallest perturbation that changes the prediction, not for the highest loss in
an eps-ball: each step linearises the difference of two logits at the current iterate, projects
both the iterate and the clean image onto the hyperplane where that linearisation vanishes (the
step of least L-inf or L2 norm, the attack's, that also keeps the image in [0, 1]), moves to a
convex combination of the two projections biased toward the clean image, overshoots slightly, and
steps back toward the clean image whenever an iterate is misclassified. AutoAttack's standard
versions (L-inf and L2) run its targeted variant (FAB-T: the logit difference toward each of 9
target classes in turn) after APGD-CE and APGD-T because it reasons about the decision boundary
instead of following a loss: where the loss landscape misleads (flat or saturated losses, losses
whose ascent direction points away from the nearest boundary) it still finds points that
loss-based attacks miss, and it reaches them with close to the minimal norm. An example counts as
broken only when the point FAB found lies within eps of it, as in AutoAttack.

`fab_t` transcribes AutoAttack's `FABAttack_PT` with `targeted=True` (fab_base.py,
fab_projections.py) as its standard versions call it, norm 'Linf' or 'L2': n_target_classes 9,
n_restarts 1, n_iter 100, alpha_max 0.1, eta 1.05, beta 0.9; see its docstring for the deviations.
"""

import math

import jax
import jax.numpy as jnp

from ntk_scale.attack_steps import (LogitsFn, check_norm, l2_norm, per_example, ranked_targets,
                                    strongest_of)

# The reference's distance of an example for which no misclassified iterate has been found yet.
_NOT_FOUND = 1e10
# The reference's floor on the norms of the two projection steps (keeps alpha = 0/0 finite).
_NORM_FLOOR = 1e-8
# projection_l2's: coordinates with |w_i| <= _W_FLOOR never move; _FAR stands for "never reaches
# the box" (and caps the distance to the box along w).
_W_FLOOR = 1e-8
_FAR = 1e12


def hyperplane_step_linf(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the step d of least L-inf norm with w . (points + d) = b and points + d in [0, 1]
  (`projection_linf` of AutoAttack's fab_projections.py). points, w: [M, D]; b: [M].

  After orienting the hyperplane so that w . points >= b, a step of L-inf radius lam moves every
  coordinate by min(lam, room_i) toward the edge of the box that lowers w . x (room_i: the distance
  to that edge), which lowers w . x by g(lam) = sum_i |w_i| min(lam, room_i), piecewise linear and
  increasing in lam. The answer is the lam with g(lam) = w . points - b: in closed form when it is
  below every room_i (no coordinate reaches the box), else on the segment between two consecutive
  sorted room_i, found by bisection. When the box cannot reach the hyperplane, the step goes to
  the corner of the box nearest to it (w . x as close to b as the box allows). Coordinates with
  w_i = 0 never move. Vectorised over rows, jittable: one sort per row, ceil(log2 D) bisection
  steps for every row.
  """
  num = points.shape[1]
  flip = jnp.where(jnp.sum(w * points, 1) - b >= 0, 1.0, -1.0).astype(w.dtype)
  w, b = w * flip[:, None], b * flip
  toward_one = w < 0  # lowering w . x raises these coordinates
  moves = w != 0
  corner = jnp.where(moves, jnp.where(toward_one, 1.0, 0.0) - points, 0.0)
  room = jnp.where(toward_one, 1.0 - points, points)
  direction = jnp.where(toward_one, 1.0, -1.0).astype(w.dtype)

  need = b - jnp.sum(w * points, 1)  # the change of w . x the step must make, <= 0
  reach = jnp.sum(w * corner, 1)  # the largest decrease the box allows, <= 0
  order = jnp.argsort(room, 1)[:, ::-1]  # room decreasing
  w_sorted = jnp.take_along_axis(w, order, 1)
  room_sorted = jnp.take_along_axis(room, order, 1)
  # With lam between room_sorted[k + 1] and room_sorted[k]: g(lam) = lam * weight[k] - rest[k],
  # weight[k] the |w| of the k + 1 coordinates not at the box, -rest[k] the decrease of the others.
  weight = jnp.cumsum(jnp.abs(w_sorted), 1)
  rest = jnp.cumsum(-w_sorted * jnp.take_along_axis(corner, order, 1), 1) + reach[:, None]

  def at(values, k):
    return jnp.take_along_axis(values, k[:, None], 1)[:, 0]

  def below(k):  # whether lam < room_sorted[k]: g(room_sorted[k]) > -need
    return need - (at(rest, k) - at(weight, k) * at(room_sorted, k)) > 0

  last = jnp.full(need.shape, num - 1, jnp.int32)
  inside = below(last)  # lam below every room: no coordinate at the box
  reachable = (need - reach > 0) & ~inside

  def bisect(_, bounds):
    low, high = bounds
    middle = (low + high) // 2
    lower = below(middle)
    return jnp.where(lower, middle, low), jnp.where(lower, high, middle)

  low, _ = jax.lax.fori_loop(0, math.ceil(math.log2(num)), bisect,
                             (jnp.zeros_like(last), last))
  lam_inside = jnp.maximum((need - rest[:, -1]) / -weight[:, -1], 0.0)
  lam = jnp.maximum((need - at(rest, low)) / -at(weight, low), 0.0)[:, None]
  step = jnp.where(inside[:, None], direction * lam_inside[:, None],
                   jnp.where(reachable[:, None],
                             jnp.where(toward_one, jnp.minimum(lam, corner),
                                       jnp.maximum(-lam, corner)),
                             corner))
  return jnp.where(moves, step, 0.0)


def hyperplane_step_l2(points: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Per row, the step d of least L2 norm with w . (points + d) = b and points + d in [0, 1]
  (`projection_l2` of AutoAttack's fab_projections.py). points, w: [M, D]; b: [M].

  The least-L2 step onto a hyperplane within a box is d_i = clip(-lam w_i) to the box, for the one
  lam >= 0 that reaches the hyperplane (after orienting it so that w . points >= b): every
  coordinate moves along -w until it reaches the box, coordinate i at lam = r_i (its distance to
  that edge over |w_i|), which lowers w . x by h(lam) = sum_i w_i^2 min(lam, r_i), piecewise
  linear and increasing in lam. The answer is the lam with h(lam) = w . points - b: in closed form
  when it is below every r_i (the step is the unconstrained (b - w . points) w / |w|^2), else on
  the segment between two consecutive sorted r_i, found by bisection. When the box cannot reach
  the hyperplane, the step goes to the corner of the box nearest to it (every moving coordinate
  at its edge). Coordinates with |w_i| <= 1e-8 never move (the reference's floor; w . (points + d)
  then misses b by their share). Vectorised over rows, jittable: one sort per row,
  ceil(log2 D) bisection steps for every row.
  """
  num = points.shape[1]
  excess = jnp.sum(w * points, 1) - b
  flip = jnp.where(excess >= 0, 1.0, -1.0).astype(w.dtype)
  w, excess = w * flip[:, None], excess * flip  # the step must lower w . x by excess >= 0
  moves = jnp.abs(w) > _W_FLOOR
  safe_w = jnp.where(moves, w, 1.0)
  reach_at = jnp.clip(jnp.maximum(points / safe_w, (points - 1) / safe_w), -_FAR, _FAR)
  reach_at = jnp.where(moves & (reach_at != -_FAR), reach_at, _FAR)  # r_i
  to_box = jnp.where(moves, -reach_at * w, 0.0)  # every coordinate at its edge

  order = jnp.argsort(reach_at, 1)
  sorted_at = jnp.take_along_axis(reach_at, order, 1)
  next_at = jnp.pad(sorted_at[:, 1:], ((0, 0), (0, 1)))
  sorted_at = jnp.where(sorted_at == _FAR, 0.0, sorted_at)
  next_at = jnp.where(next_at == _FAR, 0.0, next_at)
  total = jnp.sum(w ** 2, 1, keepdims=True)
  # weight[k]: the w_i^2 of the coordinates that still move past sorted_at[k]; lowered[k] =
  # -h(sorted_at[k]), the change of w . x when lam reaches the k-th sorted r_i.
  weight = total - jnp.cumsum(jnp.take_along_axis(w ** 2, order, 1), 1)
  first = -total * sorted_at[:, :1]
  lowered = jnp.concatenate([first, jnp.cumsum((sorted_at - next_at) * weight, 1) + first], 1)

  def at(values, k):
    return jnp.take_along_axis(values, k[:, None], 1)[:, 0]

  inside = lowered[:, 0] + excess < 0  # lam below every r_i: no coordinate at the box
  out_of_reach = jnp.sum(to_box * w, 1) + excess > 0

  def bisect(_, bounds):
    low, high = bounds
    middle = (low + high) // 2
    short = at(lowered, middle) + excess > 0  # lam beyond sorted_at[middle]
    return jnp.where(short, middle, low), jnp.where(short, high, middle)

  low, _ = jax.lax.fori_loop(0, math.ceil(math.log2(num)), bisect,
                             (jnp.zeros(excess.shape, jnp.int32),
                              jnp.full(excess.shape, num - 1, jnp.int32)))
  low_weight = at(weight, low)
  lam = jnp.where(low_weight == 0, 0.0,
                  (at(lowered, low) + excess) / jnp.where(low_weight == 0, 1.0, low_weight)
                  + at(sorted_at, low))[:, None]
  between = jnp.where(lam > reach_at, to_box, -lam * w)
  step = jnp.where(inside[:, None], -(excess[:, None] / total) * w,
                   jnp.where(out_of_reach[:, None], to_box, between))
  return jnp.where(moves, step, 0.0)


def _linf(x: jax.Array) -> jax.Array:
  """Per-example L-inf norm over all non-batch axes, [N]."""
  return jnp.max(jnp.abs(x.reshape(x.shape[0], -1)), 1)


def _compute_dtype(images: jax.Array) -> jnp.dtype:
  """float32 for bfloat16 and float16 images, else their dtype: in those the floors
  (_NORM_FLOOR, _W_FLOOR) round to 0 and, in float16, _NOT_FOUND and _FAR to inf."""
  return jnp.promote_types(images.dtype, jnp.float32)


def _l2(x: jax.Array) -> jax.Array:
  """Per-example L2 norm over all non-batch axes, [N] (`attack_steps.l2_norm`, flattened)."""
  return l2_norm(x).reshape(x.shape[0])


def _fab_run(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, targets: jax.Array,
             start: jax.Array, num_steps: int, alpha_max: float, eta: float, beta: float,
             norm: str = "linf") -> jax.Array:
  """One run of FAB toward `targets` from `start` (AutoAttack's `attack_single_run`, targeted):
  per example the misclassified iterate closest to the clean image in `norm` (the clean image
  where none was found). The iterates are in the images' dtype, each rounded to it before the
  model judges it; the projections, alpha and distances in `_compute_dtype` (float32 at least)."""
  step_onto, size = ((hyperplane_step_linf, _linf) if norm == "linf"
                     else (hyperplane_step_l2, _l2))
  n = images.shape[0]
  compute = _compute_dtype(images)
  clean = images.astype(compute)
  flat = lambda x: x.reshape(n, -1)
  pick = lambda logits, classes: jnp.take_along_axis(logits, classes[:, None], 1)[:, 0]

  def difference(x):  # z_t - z_y, negative while the target has not overtaken the true class
    logits = logits_fn(x)
    diff = pick(logits, targets) - pick(logits, labels)
    return diff.sum(), diff

  def body(_, state):
    x, found, distance = state
    grad, diff = jax.grad(difference, has_aux=True)(x)
    x_c, w = x.astype(compute), flat(grad).astype(compute)
    b = jnp.sum(w * flat(x_c), 1) - diff.astype(compute)  # the linearisation vanishes on w . z = b
    step_x = step_onto(flat(x_c), w, b).reshape(x.shape)
    step_clean = step_onto(flat(clean), w, b).reshape(x.shape)
    norm_x = jnp.maximum(size(step_x), _NORM_FLOOR)
    norm_clean = jnp.maximum(size(step_clean), _NORM_FLOOR)
    alpha = per_example(jnp.clip(norm_x / (norm_x + norm_clean), 0.0, alpha_max), x)
    x = jnp.clip((x_c + eta * step_x) * (1 - alpha) + (clean + eta * step_clean) * alpha,
                 0.0, 1.0).astype(images.dtype)
    fooled = jnp.argmax(logits_fn(x), -1) != labels
    current = size(x.astype(compute) - clean)
    closer = fooled & (current < distance)
    found = jnp.where(per_example(closer, x), x, found)
    distance = jnp.where(closer, current, distance)
    back = (clean + (x.astype(compute) - clean) * beta).astype(images.dtype)
    x = jnp.where(per_example(fooled, x), back, x)
    return x, found, distance

  state = (start, images, jnp.full((n,), _NOT_FOUND, compute))
  return jax.lax.fori_loop(0, num_steps, body, state)[1]


def fab_t(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *,
          eps: float, num_steps: int = 100, num_targets: int = 9, restarts: int = 1,
          alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
          norm: str = "linf") -> jax.Array:
  """FAB-T, L-inf or L2 (`norm`; AutoAttack's third attack): FAB toward each of the
  `num_targets` classes the clean logits rank highest after the true one, `restarts` runs each;
  per example a misclassified point within eps (in `norm`) of the clean image if a run found one,
  else the clean image.

  A run starts at the clean image (restart 0, AutoAttack's only one) or, for restarts 1, 2, ..., at
  x_0 + u / |u| * eps / 2 with the global batch shape, clipped to [0, 1]: L-inf u uniform in
  [-1, 1] and |u| = max|u|, L2 u standard normal and |u| its L2 norm (the reference's draws).
  Each of `num_steps` steps: w = grad(z_t - z_y) at the iterate x, the hyperplane
  w . z = w . x - (z_t - z_y); d_x, d_0 the least-`norm` steps from x and from the clean image x_0
  onto it within [0, 1] (`hyperplane_step_linf`, `hyperplane_step_l2`);
  alpha = min(|d_x| / (|d_x| + |d_0|), alpha_max), |.| in `norm`;
  x <- clip((x + eta d_x)(1 - alpha) + (x_0 + eta d_0) alpha, 0, 1); if x is misclassified it is
  kept when closer to x_0 than the closest so far, and x <- x_0 + beta (x - x_0). The run's result
  is its closest misclassified iterate if that lies within eps of x_0 (and the model classified
  x_0 correctly), else x_0.

  Run r (key fold_in(key, r)) is the (r % restarts)-th restart toward the (r // restarts)-th
  target. Deviations from AutoAttack's FABAttack_PT (targeted):
  - Every run attacks every example (results masked afterwards), where the reference runs each
    target only on the examples still robust and keeps the first target that breaks one; here
    per example the strongest result over all runs (`stronger`: misclassified first, then
    cross-entropy). The set of broken examples is the same (examples do not interact with the
    model in inference mode); which adversarial point is returned can differ (of several runs
    that break an example, the strongest is often farther from x_0 than the first). With
    BatchNorm in train mode examples interact, and the reference's batches (the examples still
    robust) differ from these.
  - The random start of restarts 1, 2, ... uses jax.random draws of the global batch shape (the
    reference's torch draws depend on which examples are still being attacked), and |u| is
    floored at 1e-12; with AutoAttack's restarts = 1 no random draw is made and the key is unused.
  - L2: the projection sorts with a stable sort (torch.sort is not stable); the ties it orders
    differently change only the rounding of its sums.
  - The targets are ranked on the clean logits with the true class excluded (as `apgd_t`); the
    reference ranks them including it, which differs only for examples the model misclassifies,
    and those FAB does not attack.
  - The iterates, random starts (drawn in float32 or wider) and results are in the images'
    dtype, each iterate rounded to it before the model judges it, so a returned point is
    misclassified and within eps as returned; the projections, alpha and distances in float32,
    or float64 for float64 images (the reference casts everything to float32).
  """
  check_norm(norm)
  size = _linf if norm == "linf" else _l2
  compute = _compute_dtype(images)
  clean = images.astype(compute)
  logits = logits_fn(images)
  ranked = ranked_targets(logits, labels, num_targets, 2, "FAB-T")
  correct = jnp.argmax(logits, -1) == labels

  def run(r):
    targets = jax.lax.dynamic_index_in_dim(ranked, r // restarts, axis=1, keepdims=False)
    start = images
    if restarts > 1:
      if norm == "linf":
        u = jax.random.uniform(jax.random.fold_in(key, r), images.shape, compute, -1.0, 1.0)
      else:
        u = jax.random.normal(jax.random.fold_in(key, r), images.shape, compute)
      scattered = clean + eps * u / per_example(jnp.maximum(size(u), 1e-12), u) * 0.5
      start = jnp.where(r % restarts == 0, images,
                        jnp.clip(scattered, 0.0, 1.0).astype(images.dtype))
    found = _fab_run(logits_fn, images, labels, targets, start, num_steps, alpha_max, eta, beta,
                     norm)
    broken = (correct & (jnp.argmax(logits_fn(found), -1) != labels)
              & (size(found.astype(compute) - clean) <= eps))
    return jnp.where(per_example(broken, images), found, images)

  return strongest_of(run, num_targets * restarts, logits_fn, labels)
