"""FAB-T (ntk_scale/fab.py), L-inf and L2: its hyperplane projections against a linear program
(L-inf) and against the KKT conditions and SLSQP (L2), its loop against a per-example
transcription of AutoAttack's reference, and its distance on a linear model against the closed
form. The shared attack properties (ball and box, devices, config errors) are in
test_attacks.py with the other attacks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq, linprog, minimize

from ntk_scale import fab
from test_attacks import (_init, _jit_attack, _tiny_mlp,  # pylint: disable=wrong-import-order
                          _zero_gradient_step)


# --------------------------------------------------------------------------- the projection

def _least_linf_step(t, w, b):
  """min_d |d|_inf subject to w . (t + d) = b and t + d in [0, 1], as a linear program in
  (d, tau): minimise tau with -tau <= d_i <= tau. Returns tau, or None when infeasible."""
  dim = len(t)
  eye, ones = np.eye(dim), np.ones((dim, 1))
  result = linprog(np.r_[np.zeros(dim), 1.0], A_ub=np.block([[eye, -ones], [-eye, -ones]]),
                   b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t],
                   bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)], method="highs")
  assert result.status in (0, 2), result.message  # solved, or infeasible
  return result.fun if result.status == 0 else None


def _random_hyperplanes(seed: int, w_norm, far: float, tiny: float = 0.0):
  """(t [40, d], w, b) for d = 6, 11, 20: some coordinates of t on the box's faces, some w_i = 0
  (a fraction `tiny` of them 1e-9), b = w . t plus noise of 0.01, 0.2 or `far` times w_norm(w)
  (near: the step stays in the box; far: coordinates hit it or the hyperplane is out of reach);
  the first row already on its hyperplane."""
  rng = np.random.default_rng(seed)
  for dim in (6, 11, 20):
    m = 40
    t = rng.uniform(size=(m, dim))
    t[rng.uniform(size=t.shape) < 0.1] = 0.0
    t[rng.uniform(size=t.shape) < 0.1] = 1.0
    w = rng.normal(size=(m, dim))
    w[rng.uniform(size=w.shape) < 0.15] = 0.0
    if tiny:
      w[rng.uniform(size=w.shape) < tiny] = 1e-9
    scale = rng.choice([0.01, 0.2, far], size=m) * w_norm(w)
    b = np.sum(w * t, 1) + rng.normal(size=m) * scale
    b[0] = w[0] @ t[0]
    yield t, w, b


def test_hyperplane_step_is_the_least_linf_step_a_linear_program_finds():
  """On random instances (d = 6, 11, 20; some w_i = 0, some coordinates on the box's faces; targets
  b near w . t, where the step stays inside the box, and far, where coordinates hit the box or the
  hyperplane is out of reach): where the LP is feasible the step lands on the hyperplane, in the
  box, with the LP's optimal L-inf norm; where it is not, the step goes to the box corner whose
  w . x is nearest to b (the reference's fallback); coordinates with w_i = 0 never move."""
  counts = dict(inside=0, at_box=0, out_of_reach=0)
  with jax.enable_x64(True):
    for t, w, b in _random_hyperplanes(0, lambda w: np.abs(w).sum(1), far=1.0):
      m = len(t)
      step = np.asarray(jax.jit(fab.hyperplane_step_linf)(t, w, b))
      assert step.dtype == np.float64
      for i in range(m):
        x = t[i] + step[i]
        assert x.min() >= -1e-12 and x.max() <= 1 + 1e-12, i
        assert np.all(step[i][w[i] == 0] == 0), i
        optimum = _least_linf_step(t[i], w[i], b[i])
        if optimum is None:
          lowest, highest = np.sum(np.minimum(w[i], 0)), np.sum(np.maximum(w[i], 0))
          np.testing.assert_allclose(w[i] @ x, lowest if b[i] < lowest else highest, atol=1e-10)
          counts["out_of_reach"] += 1
          continue
        np.testing.assert_allclose(w[i] @ x, b[i], atol=1e-10, err_msg=str(i))
        np.testing.assert_allclose(np.abs(step[i]).max(), optimum, atol=1e-10, err_msg=str(i))
        moving = w[i] != 0
        at_box = np.any(np.abs(step[i][moving]) < np.abs(step[i]).max() - 1e-9)
        counts["at_box" if at_box else "inside"] += 1
      np.testing.assert_allclose(step[0], 0.0, atol=1e-12)
  assert min(counts.values()) >= 10, counts  # every branch of the reference exercised


def _least_l2_step(t, w, b):
  """min_d |d|_2 subject to w . (t + d) = b and t + d in [0, 1], from the KKT conditions: d =
  clip(-lam w) to the box, lam >= 0 (after orienting the hyperplane so that w . t >= b) the root
  of w . (t + d) = b (brentq); checked against scipy's generic SLSQP. None when infeasible."""
  sign = 1.0 if w @ t >= b else -1.0
  lowest = np.where(sign * w > 0, 0.0, 1.0) * (w != 0) + t * (w == 0)  # least sign * w . x
  if sign * (w @ lowest - b) > 0:
    return None
  excess = lambda lam: sign * (w @ (t + np.clip(-sign * lam * w, -t, 1 - t)) - b)
  top = max(np.max(np.maximum(t, 1 - t)[w != 0] / np.abs(w[w != 0]), initial=0.0), 1.0)
  lam = 0.0 if excess(0.0) <= 0 else brentq(excess, 0.0, top, xtol=1e-15, rtol=1e-15)
  step = np.clip(-sign * lam * w, -t, 1 - t)
  generic = minimize(lambda d: d @ d, np.zeros(len(t)), jac=lambda d: 2 * d, method="SLSQP",
                     bounds=list(zip(-t, 1 - t)), options=dict(ftol=1e-15, maxiter=500),
                     constraints=[dict(type="eq", fun=lambda d: w @ (t + d) - b, jac=lambda d: w)])
  np.testing.assert_allclose(generic.x, step, atol=1e-7)
  return step


def test_hyperplane_step_l2_is_the_least_l2_step_of_the_kkt_conditions():
  """On random instances as the L-inf test's (d = 6, 11, 20; some w_i = 0, a few below the
  reference's 1e-8 floor; coordinates on the box's faces; b near and far from w . t): the step
  equals the numpy transcription of AutoAttack's projection_l2 and, where the hyperplane is
  reachable, the least-L2 step of the KKT conditions (which SLSQP confirms) with w_i <= 1e-8 taken
  as 0, and where no coordinate reaches the box the closed form (b - w . t) w / |w|^2; where it is
  not reachable, the box corner nearest to it (the reference's fallback). Coordinates with
  |w_i| <= 1e-8 never move."""
  counts = dict(inside=0, at_box=0, out_of_reach=0)
  with jax.enable_x64(True):
    for t, w, b in _random_hyperplanes(1, lambda w: np.sqrt(np.sum(w ** 2, 1)), far=2.0,
                                       tiny=0.05):
      m = len(t)
      step = np.asarray(jax.jit(fab.hyperplane_step_l2)(t, w, b))
      assert step.dtype == np.float64
      for i in range(m):
        np.testing.assert_allclose(step[i], _reference_projection_l2(t[i], w[i], b[i]),
                                   atol=1e-12, err_msg=str(i))
        assert np.all(step[i][np.abs(w[i]) <= 1e-8] == 0), i
        kept = np.where(np.abs(w[i]) > 1e-8, w[i], 0.0)  # the hyperplane the reference reaches
        optimum = _least_l2_step(t[i], kept, b[i] - (w[i] - kept) @ t[i])
        x = t[i] + step[i]
        assert x.min() >= -1e-12 and x.max() <= 1 + 1e-12, i
        if optimum is None:
          sign = 1.0 if w[i] @ t[i] >= b[i] else -1.0
          corner = np.where(sign * kept > 0, 0.0, 1.0)
          np.testing.assert_allclose(x, np.where(kept != 0, corner, t[i]), atol=1e-12)
          counts["out_of_reach"] += 1
          continue
        np.testing.assert_allclose(step[i], optimum, atol=1e-10, err_msg=str(i))
        np.testing.assert_allclose(kept @ x, b[i] - (w[i] - kept) @ t[i], atol=1e-10)
        if np.all((x > 0) & (x < 1) | (kept == 0)):
          closed = (b[i] - w[i] @ t[i]) * kept / (kept @ kept)
          np.testing.assert_allclose(step[i], closed, atol=1e-12, err_msg=str(i))
          counts["inside"] += 1
        else:
          counts["at_box"] += 1
      np.testing.assert_allclose(step[0], 0.0, atol=1e-12)
  assert min(counts.values()) >= 10, counts  # every branch of the reference exercised


def test_hyperplane_step_l2_is_not_pushed_onto_the_box_by_coordinates_below_the_floor():
  """w = 1e-4 on 3 coordinates and 9.9e-9 (below the 1e-8 floor) on 17, the hyperplane at 0.999 of
  the decrease the box allows: by hand, lam = 6987 (w_i^2 min(lam, r_i) sums to 1e-8 (5000 +
  1000 + lam)), so two coordinates reach the box and the third moves 0.6987 of its 0.7 (less
  1.2e-7: the floored w_i^2 count in the sums but never move, as in the reference). Their
  breakpoints (1e12, "never") count as 0 there; at 1e12 they add 1e12 w_i^2 ~ 1e-4 per
  breakpoint, more than the gap, and the bisection ends past every reachable breakpoint, on the
  box (0.7)."""
  t = np.array([0.5, 0.1, 0.3] + [0.5] * 17)
  w = np.array([1e-4, 1e-4, -1e-4] + [9.9e-9] * 17)
  b = w @ t - 0.999 * 1.3e-4
  with jax.enable_x64(True):
    step = np.asarray(jax.jit(fab.hyperplane_step_l2)(t[None], w[None], np.array([b])))[0]
  np.testing.assert_allclose(step, np.r_[-0.5, -0.1, 0.6987, np.zeros(17)], atol=1e-6, rtol=0)
  np.testing.assert_allclose(step, _reference_projection_l2(t, w, b), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- the reference loop

def _reference_projection_linf(t, w, b):
  """AutoAttack's projection_linf (fab_projections.py) for one row, its branches as ifs."""
  dim = len(t)
  if w @ t - b < 0:
    w, b = -w, -b
  a = (w < 0).astype(float)
  d = (a - t) * (w != 0)
  p = a - t * (2 * a - 1)
  ascending = np.argsort(p)
  b = b - w @ t
  b0 = w @ d
  descending = ascending[::-1]
  s = np.cumsum(np.abs(w[descending]))
  sb = np.cumsum(-w[descending] * d[descending]) + b0
  if b - (sb[-1] - s[-1] * p[ascending[0]]) > 0:
    d = (2 * a - 1) * max((b - sb[-1]) / -s[-1], 0.0)
  elif b - b0 > 0:
    lb, ub = 0, dim - 1
    for _ in range(math.ceil(math.log2(dim))):
      middle = (lb + ub) // 2
      if b - (sb[middle] - s[middle] * p[ascending[dim - 1 - middle]]) > 0:
        lb = middle
      else:
        ub = middle
    lmbd = max((b - sb[lb]) / -s[lb], 0.0)
    d = np.minimum(lmbd, d) * a + np.maximum(-lmbd, d) * (1 - a)
  return d * (w != 0)


def _reference_projection_l2(t, w, b):
  """AutoAttack's projection_l2 (fab_projections.py) for one row, its branches as ifs."""
  dim = len(t)
  c = w @ t - b
  if c < 0:
    w, c = -w, -c
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.clip(np.maximum(t / w, (t - 1) / w), -1e12, 1e12)
  r[np.abs(w) < 1e-8] = 1e12
  r[r == -1e12] = 1e12
  indr = np.argsort(r, kind="stable")
  rs = r[indr]
  rs2 = np.r_[rs[1:], 0.0]
  rs[rs == 1e12] = 0
  rs2[rs2 == 1e12] = 0
  w5 = np.sum(w ** 2)
  ws = w5 - np.cumsum(w[indr] ** 2)
  d = -(r * w) * (np.abs(w) > 1e-8)
  s = np.r_[-w5 * rs[0], np.cumsum((-rs2 + rs) * ws) - w5 * rs[0]]
  if s[0] + c < 0:
    d = -c / w5 * w
  elif d @ w + c <= 0:
    lb, ub = 0, dim - 1
    for _ in range(math.ceil(math.log2(dim))):
      middle = (lb + ub) // 2
      if s[middle] + c > 0:
        lb = middle
      else:
        ub = middle
    alpha = 0.0 if ws[lb] == 0 else (s[lb] + c) / ws[lb] + rs[lb]
    d = np.where(alpha > r, d, -alpha * w)
  return d * (np.abs(w) > 1e-8)


# The reference's projection and norm of each attack norm.
_REFERENCE_NORMS = {"linf": (_reference_projection_linf, lambda v: np.abs(v).max()),
                    "l2": (_reference_projection_l2, lambda v: np.sqrt(np.sum(v ** 2)))}


def _numpy_mlp(params, x):
  """Logits of the 1-hidden-layer MLP and their input Jacobian [C, *x.shape], in float64."""
  w1, b1 = (np.asarray(params["dense1"][k], np.float64) for k in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["head"][k], np.float64) for k in ("kernel", "bias"))
  pre = x.reshape(-1) @ w1 + b1
  logits = np.maximum(pre, 0) @ w2 + b2
  jacobian = (w2.T * (pre > 0)) @ w1.T
  return logits, jacobian.reshape(-1, *x.shape)


def _reference_fab_run(model, x0, y, target, start, eps, num_steps, norm="linf", alpha_max=0.1,
                       eta=1.05, beta=0.9):
  """AutoAttack's attack_single_run (fab_base.py), targeted, for one example, then perturb's eps
  check: the result (the closest misclassified iterate if within eps, else x0) and the distance
  in `norm` of the closest misclassified iterate (1e10 if none)."""
  projection, size = _REFERENCE_NORMS[norm]
  logits, _ = model(x0)
  if np.argmax(logits) != y:
    return x0, 1e10
  x1, adv, res = start, x0, 1e10
  for _ in range(num_steps):
    logits, jacobian = model(x1)
    df = logits[target] - logits[y]
    w = (jacobian[target] - jacobian[y]).reshape(-1)
    b = -df + w @ x1.reshape(-1)
    d1 = projection(x1.reshape(-1), w, b).reshape(x1.shape)
    d2 = projection(x0.reshape(-1), w, b).reshape(x1.shape)
    a1, a2 = max(size(d1), 1e-8), max(size(d2), 1e-8)
    alpha = min(max(a1 / (a1 + a2), 0.0), alpha_max)
    x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha, 0.0, 1.0)
    if np.argmax(model(x1)[0]) != y:
      t = size(x1 - x0)
      if t < res:
        adv, res = x1, t
      x1 = x0 + (x1 - x0) * beta
  broken = np.argmax(model(adv)[0]) != y and size(adv - x0) <= eps
  return (adv if broken else x0), res


@pytest.mark.parametrize("norm,eps", [("linf", 0.04), ("l2", 0.3)])
def test_fab_t_follows_autoattacks_reference_loop(norm, eps):
  """FAB-T on a small MLP equals AutoAttack's algorithm written as a loop per example (its
  projection transcribed separately, with its if-branches), 3 targets x 2 restarts of 10 steps,
  restart 1 from the documented eps / 2 random start; per example the strongest run (misclassified
  first, then cross-entropy). float64, as the APGD test: float32 near-ties can branch apart."""
  model = _tiny_mlp()
  rng = np.random.default_rng(3)
  n, num_steps, num_targets, restarts = 16, 10, 3, 2
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: v.astype(np.float64), _init(model, (1, 8, 8, 1), seed=6))
    images = rng.uniform(size=(n, 8, 8, 1))
    logits = np.asarray(model.apply(variables, images, train=False))
    labels = np.argmax(logits, -1)
    labels[:2] = (labels[:2] + 1) % 10  # two examples the model already misclassifies
    key = jax.random.key(5)
    x_adv = np.asarray(_jit_attack(lambda f, x, y, k: fab.fab_t(
        f, x, y, k, eps=eps, num_steps=num_steps, num_targets=num_targets, restarts=restarts,
        norm=norm), model)(variables, images, labels, key))
    draw = ((lambda k: jax.random.uniform(k, images.shape, jnp.float64, -1.0, 1.0))
            if norm == "linf" else (lambda k: jax.random.normal(k, images.shape, jnp.float64)))
    draws = [np.asarray(draw(jax.random.fold_in(key, r))) for r in range(num_targets * restarts)]
  assert x_adv.dtype == np.float64
  numpy_model = lambda x: _numpy_mlp(variables["params"], x)
  cross_entropy = lambda z, y: np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
  found, breaking, picked = [], [], []  # per run its distance; per example runs that broke it
  for i in range(n):
    ranked = [c for c in np.argsort(-logits[i], kind="stable") if c != labels[i]]
    best, best_key = None, None
    breaking.append([])
    for r in range(num_targets * restarts):
      u = draws[r][i]
      start = images[i] if r % restarts == 0 else np.clip(
          images[i] + eps * u / _REFERENCE_NORMS[norm][1](u) * 0.5, 0, 1)
      result, distance = _reference_fab_run(numpy_model, images[i], labels[i],
                                            ranked[r // restarts], start, eps, num_steps, norm)
      found.append(distance)
      z = numpy_model(result)[0]
      key_r = (bool(np.argmax(z) != labels[i]), cross_entropy(z, labels[i]))
      if best is None or key_r > best_key:
        best, best_key, pick = result, key_r, r
      if key_r[0]:
        breaking[i].append(r)
    picked.append(pick)
    np.testing.assert_allclose(x_adv[i], best, atol=1e-9, rtol=0, err_msg=f"example {i}")
  found = np.array(found)
  # Non-trivial: runs found points within eps and beyond it, random starts broke examples, and
  # for some example the strongest run is not the first that broke it (AutoAttack's pick).
  assert np.sum(found <= eps) >= 5 and np.sum((found > eps) & (found < 1e10)) >= 5, found
  assert any(r % restarts for runs in breaking for r in runs), breaking
  assert any(runs and runs[0] != pick for runs, pick in zip(breaking, picked)), (breaking, picked)
  np.testing.assert_array_equal(x_adv[:2], images[:2])  # misclassified: left alone


# --------------------------------------------------------------------------- a linear model

def _two_class_linear_problem(norm="linf"):
  """Logits x W + bias, 10 classes of which 8 carry bias -100 (never predicted in [0, 1]^64):
  between the two others the smallest perturbation that misclassifies x is |m| / |w_y - w_t|_1 in
  L-inf and |m| / |w_y - w_t|_2 in L2 (the dual norms), m the margin z_y - z_t, while the box does
  not bind. The images lie in [0.35, 0.65], the boundary through the middle of them: no coordinate
  of a smallest perturbation moves by 0.07 (L-inf: every distance is below 0.035)."""
  rng = np.random.default_rng(0)
  n, dim = 32, 64
  w = rng.normal(size=(dim, 10)).astype(np.float32)
  images = rng.uniform(0.35, 0.65, size=(n, 8, 8, 1)).astype(np.float32)
  raw = images.reshape(n, -1) @ w
  bias = np.r_[0.0, np.median(raw[:, 0] - raw[:, 1]), np.full(8, -100.0)].astype(np.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w + bias
  logits = np.asarray(logits_fn(images))
  labels = np.argmax(logits, -1)
  other = 1 - labels
  margin = logits[np.arange(n), labels] - logits[np.arange(n), other]
  normal = w[:, labels] - w[:, other]
  if norm == "linf":
    distance = margin / np.abs(normal).sum(0)
    assert distance.max() < 0.035
  else:
    distance = margin / np.linalg.norm(normal, axis=0)
    assert np.max(distance * np.abs(normal).max(0) / np.linalg.norm(normal, axis=0)) < 0.07
  assert np.all(labels < 2) and distance.min() > 0
  return logits_fn, images, labels, other, distance


@pytest.mark.parametrize("norm,eps", [("linf", 0.015), ("l2", 0.08)])
def test_fab_t_reaches_the_closed_form_distance_on_a_linear_model(norm, eps):
  """Toward the one reachable class and with eps far above the distances, FAB-T's point lies
  within 1% above the closed-form minimal distance in `norm` after 20 steps (the eta / beta steps
  settle at ~0.5% above within 10), on the target's side of the boundary. With all 9 targets and
  eps near the middle of the distances (the unreachable targets give nothing within eps), an
  example is broken when 1.01 times its distance is below eps and left clean when its distance is
  above. Labelled with the other class, every example (misclassified clean: not attacked, as in
  AutoAttack) keeps its clean image, though FAB toward the classes of bias -100 finds points
  within eps that the model misclassifies too."""
  logits_fn, images, labels, other, distance = _two_class_linear_problem(norm)
  n = len(labels)
  size = ((lambda d: np.abs(d).reshape(n, -1).max(1)) if norm == "linf"
          else (lambda d: np.linalg.norm(d.reshape(n, -1), axis=1)))
  attack = lambda eps, targets: fab.fab_t(logits_fn, images, labels, jax.random.key(0), eps=eps,
                                          num_targets=targets, norm=norm, num_steps=20)
  # The runs in one program (one compile, their common part once).
  wrong = lambda: fab.fab_t(logits_fn, images, other, jax.random.key(0), norm=norm, num_steps=20,
                            eps=1.0 if norm == "linf" else 8.0)  # eps: the box's diameter
  x_adv, x_all, x_wrong = (np.asarray(x) for x in jax.jit(
      lambda eps: (attack(1.0, 1), attack(eps, 9), wrong()))(eps))
  found = size(x_adv - images)
  assert np.all(found >= distance * (1 - 1e-4)) and np.all(found <= 1.01 * distance), found / distance
  z = np.asarray(logits_fn(x_adv))
  assert np.all(z[np.arange(n), other] > z[np.arange(n), labels])

  broken = np.argmax(np.asarray(logits_fn(x_all)), -1) != labels
  above, below = 1.01 * distance < eps, distance > eps
  assert above.sum() >= 8 and below.sum() >= 8, distance
  assert np.all(broken[above]) and not np.any(broken[below])
  np.testing.assert_array_equal(x_all[~broken], images[~broken])
  assert size(x_all - images).max() <= eps + 1e-7
  np.testing.assert_array_equal(x_wrong, images)


# --------------------------------------------------------------------------- what a run returns

def test_fab_t_returns_the_clean_image_not_a_random_start_when_no_iterate_is_misclassified():
  """A run's result is its closest misclassified iterate, else the clean image: a random start is
  no iterate. On the zero-gradient step (class 1 from x >= 0.5) from x = 0.49 with eps = 0.021,
  restart 1 starts at 0.49 +- 0.0105, misclassified at 0.5005; w = 0 makes both projection steps
  0 and alpha = alpha_max = 0.1, so the first iterate is 0.9 * 0.5005 + 0.1 * 0.49 = 0.49945 and
  every later one nearer 0.49: none is misclassified, and every example keeps its clean image."""
  n, key = 64, jax.random.key(3)
  images, labels = jnp.full((n, 1, 1, 1), 0.49), jnp.zeros(n, jnp.int32)
  x_adv = jax.jit(lambda k: fab.fab_t(_zero_gradient_step, images, labels, k, eps=0.021,
                                      num_steps=3, num_targets=1, restarts=2))(key)
  u = jax.random.uniform(jax.random.fold_in(key, 1), images.shape, jnp.float32, -1.0, 1.0)
  starts = np.float32(0.49) + np.float32(0.021 * 0.5) * np.sign(np.asarray(u))
  assert 10 < np.sum(starts >= 0.5) < n - 10  # restart 1 starts where the model is wrong
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(images))


def test_fab_t_refuses_a_norm_it_does_not_implement():
  """Called directly (not through build_attack, which checks the config), an unknown norm is
  refused before any compute rather than run as L2."""
  images = jnp.full((2, 1, 1, 1), 0.5)
  with pytest.raises(ValueError, match="norm='l1' is not supported; expected one of linf, l2"):
    fab.fab_t(_zero_gradient_step, images, jnp.zeros(2, jnp.int32), jax.random.key(0), eps=0.1,
              num_targets=1, norm="l1")


# --------------------------------------------------------------------------- low precision

# One low precision per norm (each a compile of six FAB-T loops): the dtype handling (iterates in
# the images' dtype, distances in float32) is the same code for both norms. bfloat16 goes with L2,
# where distances computed in it instead of float32 overshoot eps.
@pytest.mark.parametrize("norm,eps,dtype", [("linf", 0.015, jnp.float16), ("l2", 0.08, jnp.bfloat16)])
def test_fab_t_keeps_bfloat16_and_float16_images_in_their_dtype_ball_and_box(norm, eps, dtype):
  """float16 (L-inf) and bfloat16 (L2) images, under a model with float32 logits and one computing
  in the images' dtype: FAB-T returns finite images of their dtype in [0, 1] and within eps, an
  example either left clean or misclassified as returned. Toward the one reachable class with
  eps = 1 it breaks most examples (float32 logits on bfloat16 iterates once made the loop's carry
  change dtype; L2 distances computed in bfloat16, not float32, overshot eps)."""
  logits_fn, images, labels, _, _ = _two_class_linear_problem(norm)
  n = len(labels)
  size = ((lambda d: np.abs(d).reshape(n, -1).max(1)) if norm == "linf"
          else (lambda d: np.linalg.norm(d.reshape(n, -1), axis=1)))
  models = {"float32": logits_fn, "own": lambda x: logits_fn(x).astype(x.dtype)}

  def attack_all():
    out = {}
    x0 = jnp.asarray(images).astype(dtype)
    for name, model in models.items():
      for eps_, targets, restarts in ((eps, 9, 2), (1.0, 1, 1)):
        out[dtype.__name__, name, eps_] = fab.fab_t(
            model, x0, labels, jax.random.key(0), eps=eps_, num_targets=targets,
            restarts=restarts, norm=norm, num_steps=20)
    return out

  for (dtype_name, name, eps_), x_adv in jax.jit(attack_all)().items():
    where = f"{dtype_name} {name} eps={eps_}"
    assert x_adv.dtype == jnp.dtype(dtype), where
    x0 = np.asarray(jnp.asarray(images).astype(dtype)).astype(np.float64)
    x = np.asarray(x_adv).astype(np.float64)
    assert np.all(np.isfinite(x)) and x.min() >= 0 and x.max() <= 1, where
    assert size(x - x0).max() <= eps_ + 1e-6, where
    broken = np.asarray(jnp.argmax(models[name](x_adv), -1)) != labels
    np.testing.assert_array_equal(x[~broken], x0[~broken], err_msg=where)
    assert broken.mean() >= (0.75 if eps_ == 1.0 else 0.25), where
