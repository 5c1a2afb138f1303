"""Attacks checked against an analytic worst case, their constraint sets, restarts, device counts,
loop transcriptions of the APGD and Square Attack papers' algorithms, and a trained model."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh

from ntk_scale import attack_steps, attacks, parallel
from ntk_scale import evaluate as evaluate_module
from ntk_scale.base_config import autoattack, base_config, pgd_linf
from ntk_scale.data import Split, load_digits
from ntk_scale.evaluate import Parameterized, evaluate
from ntk_scale.models import build_model


def _tiny_mlp(width=16):
  c = base_config()
  c.model.name, c.model.width, c.model.depth = "mlp", width, 1
  return build_model(c.model, 10)


def _init(model, input_shape, seed=0):
  """Random variables of `model` drawn with numpy (model.init's truncated normal compiles slowly
  on CPU); kernels get variance 1/fan_in."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  out = {}
  for path, leaf in flat.items():
    scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if path[-1] == "kernel" else 0.1
    out[path] = rng.normal(size=leaf.shape).astype(np.float32) * scale
  return flax.traverse_util.unflatten_dict(out)


def _jit_attack(attack, model):
  """attack(variables, images, labels, key) under jit, with the model in inference mode."""
  def run(variables, images, labels, key):
    return attack(lambda x: model.apply(variables, x, train=False), images, labels, key)
  return jax.jit(run)


def _loss(model, variables, images, labels):
  return np.asarray(attack_steps.cross_entropy(model.apply(variables, images, train=False), labels))


def _accuracy(model, variables, images, labels):
  logits = model.apply(variables, images, train=False)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


# --------------------------------------------------------------------------- linear model

def test_linear_model_attacks_reach_the_analytic_worst_case():
  """For logits x W + b with 2 classes, the loss depends on x only through the margin
  m(x) = (w_y - w_other) . x, and decreases in it; inside a box that [0, 1] does not cut, the
  maximiser is x - eps * sign(grad m) = x - eps * sign(w_y - w_other) (L-inf) and
  x - eps * (w_y - w_other) / |w_y - w_other| (L2)."""
  rng = np.random.default_rng(0)
  n, shape = 16, (4, 4, 1)
  w = rng.normal(size=(16, 2)).astype(np.float32)
  b = rng.normal(size=2).astype(np.float32)
  images = jnp.asarray(rng.uniform(0.3, 0.7, size=(n, *shape)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 2, size=n))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w + b
  margin_grad = (w[:, labels] - w[:, 1 - labels]).T.reshape(n, *shape)
  eps = 0.05
  key = jax.random.key(1)

  linf_worst = images - eps * np.sign(margin_grad)
  # One program for the four runs: compiled together, their common parts (the random start of
  # PGD and APGD from one key) are compiled once.
  runs = jax.jit(lambda: {
      "pgd": attacks.pgd(logits_fn, images, labels, key, eps=eps, step_size=eps / 4, num_steps=10),
      "fgsm": attacks.fgsm(logits_fn, images, labels, eps=eps),
      "apgd_ce": attacks.apgd_ce(logits_fn, images, labels, key, eps=eps, num_steps=10),
      "l2": attacks.pgd(logits_fn, images, labels, key, eps=eps, step_size=eps / 4, num_steps=6,
                        norm="l2", random_start=False),
  })()
  for name in ("pgd", "fgsm", "apgd_ce"):
    np.testing.assert_allclose(runs[name], linf_worst, atol=1e-6, rtol=0, err_msg=name)

  # L2 PGD from x itself: every step is along the same direction, so 4 steps of eps/4 land on the
  # sphere. (From a random start the off-direction part only shrinks geometrically.)
  unit = margin_grad / np.linalg.norm(margin_grad.reshape(n, -1), axis=1).reshape(n, 1, 1, 1)
  np.testing.assert_allclose(runs["l2"], images - eps * unit, atol=1e-6, rtol=0)


def _box_free_linear_problem(n=8):
  """A 2-class linear model on 4x4 images in [0.3, 0.7] (no eps below 0.3 reaches the image box):
  (logits_fn, images, labels, d margin / dx per example)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 2)).astype(np.float32)
  images = jnp.asarray(rng.uniform(0.3, 0.7, size=(n, 4, 4, 1)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 2, size=n))
  margin_grad = (w[:, labels] - w[:, 1 - labels]).T.reshape(n, 4, 4, 1)
  return lambda x: x.reshape(x.shape[0], -1) @ w, images, labels, margin_grad


def test_pgd_takes_exactly_num_steps_steps():
  """PGD from x (no random start) inside a box much larger than its path moves each pixel by
  num_steps * step_size along -sign(d margin / dx): a loop one step short stopped at 2 of 3."""
  logits_fn, images, labels, margin_grad = _box_free_linear_problem()
  x_adv = jax.jit(lambda: attacks.pgd(logits_fn, images, labels, jax.random.key(0), eps=0.2,
                                      step_size=0.01, num_steps=3, random_start=False))()
  np.testing.assert_allclose(x_adv, images - 0.03 * np.sign(margin_grad), atol=1e-6, rtol=0)


def test_l2_projection_leaves_points_inside_the_ball_where_they_are():
  """Projection onto the L2 ball moves only the points outside it: L2 PGD from x with k steps of
  eps/4 (k < 4) ends at distance k eps/4, not on the sphere, and project_l2 returns an interior
  point unchanged and scales an exterior one back to radius eps."""
  logits_fn, images, labels, margin_grad = _box_free_linear_problem()
  eps = 0.2
  unit = margin_grad / np.linalg.norm(margin_grad.reshape(8, -1), axis=1).reshape(8, 1, 1, 1)
  runs = jax.jit(lambda: [attacks.pgd(logits_fn, images, labels, jax.random.key(0), eps=eps,
                                      step_size=eps / 4, num_steps=k, norm="l2",
                                      random_start=False) for k in (1, 2)])()
  for k, x_adv in zip((1, 2), runs):
    np.testing.assert_allclose(x_adv, images - k * eps / 4 * unit, atol=1e-6, rtol=0, err_msg=k)
  x = jnp.zeros((2, 3))
  inside_and_out = jnp.array([[0.03, 0.04, 0.0], [0.3, 0.4, 0.0]])  # |.|_2 = 0.05 and 0.5
  np.testing.assert_allclose(attack_steps.project_l2(inside_and_out, x, 0.1),
                             [[0.03, 0.04, 0.0], [0.06, 0.08, 0.0]], atol=1e-7, rtol=0)


def test_l2_random_start_is_uniform_in_the_volume_of_the_ball():
  """A point uniform in the d-ball of radius eps has (r / eps)^d ~ U(0, 1) (the volume fraction
  inside radius r); uniform radii instead crowd the start near x (mean of (r / eps)^d 1/(d + 1)).
  d = 64 and 2000 draws: the mean's standard deviation is 0.0065."""
  n, d, eps = 2000, 64, 0.1
  x = jnp.full((n, 8, 8, 1), 0.5)  # 0.5 +- eps: the image box never clips
  delta = np.asarray(attack_steps.uniform_start(jax.random.key(1), x, eps, "l2") - x, np.float64)
  volume_fraction = (np.linalg.norm(delta.reshape(n, -1), axis=1) / eps) ** d
  assert volume_fraction.max() <= 1 + 1e-4
  assert volume_fraction.mean() == pytest.approx(0.5, abs=0.03)
  assert np.mean(volume_fraction < 0.25) == pytest.approx(0.25, abs=0.04)


# --------------------------------------------------------------------------- constraint sets

_EPS = {"linf": 0.1, "l2": 0.5}
_CONFIGS = [
    dict(name="pgd", norm="linf", step_size=0.03, num_steps=4, restarts=2),
    dict(name="pgd", norm="l2", step_size=0.15, num_steps=4),
    dict(name="fgsm"),
    dict(name="rs_fgsm"),
    dict(name="n_fgsm"),
    dict(name="apgd_ce", norm="linf", num_steps=5),
    dict(name="apgd_ce", norm="l2", num_steps=5),
    dict(name="apgd_dlr", norm="linf", num_steps=5),
    dict(name="apgd_t", norm="l2", num_steps=3, num_targets=2),
    dict(name="square", num_queries=40, restarts=2),
    dict(name="fab_t", num_steps=5, num_targets=2, restarts=2),
    dict(name="fab_t", norm="l2", num_steps=5, num_targets=2),
    dict(name="worst_of", norm="linf", attacks=dict(
        ce=dict(name="apgd_ce", num_steps=4), dlr=dict(name="apgd_dlr", num_steps=4),
        t=dict(name="apgd_t", num_steps=4, num_targets=3))),
]


def _name(fields):
  return fields["name"] + "-" + fields.get("norm", "linf")


def _built(fields):
  """The attack of `fields` with the eps of its norm."""
  eps = _EPS[fields.get("norm", "linf")]
  return attacks.build_attack(ml_collections.ConfigDict(dict(fields, eps=eps)))


@pytest.fixture(scope="module")
def tiny_batch_attacked():
  """Every attack of _CONFIGS on one batch of the tiny MLP (16 images, key 2), on one device, in
  one program: compiled together they take a third less time than one by one (XLA compiles their
  common parts, such as the random starts from one key, once). (model, variables, images,
  labels, {name: x_adv})."""
  model = _tiny_mlp()
  variables = _init(model, (1, 8, 8, 1))
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=16).astype(np.int32)
  built = {_name(fields): _built(fields) for fields in _CONFIGS}
  x_adv = _jit_attack(lambda *args: {name: attack(*args) for name, attack in built.items()}, model)(
      variables, images, labels, jax.random.key(2))
  return model, variables, images, labels, {name: np.asarray(x) for name, x in x_adv.items()}


@pytest.mark.parametrize("fields", _CONFIGS, ids=_name)
def test_every_attack_stays_in_its_ball_and_the_image_box(fields, tiny_batch_attacked):
  norm = fields.get("norm", "linf")
  eps = _EPS[norm]
  model, variables, images, labels, results = tiny_batch_attacked
  x_adv = results[_name(fields)]
  delta = (x_adv - images).reshape(16, -1)
  radius = 3 * eps if fields["name"] == "n_fgsm" else eps
  if norm == "linf":
    assert np.abs(delta).max() <= radius + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= radius + 1e-6
  assert x_adv.min() >= 0 and x_adv.max() <= 1
  # Each attack actually attacks: the mean loss rises.
  assert _loss(model, variables, x_adv, labels).mean() > _loss(model, variables, images, labels).mean()


def test_n_fgsm_leaves_the_eps_box_and_rs_fgsm_does_not(tiny_batch_attacked):
  """The one difference between the two: N-FGSM is not projected back to the eps-box (their
  examples of test_every_attack_stays_in_its_ball_and_the_image_box)."""
  _, _, images, _, x_adv = tiny_batch_attacked
  eps = _EPS["linf"]
  assert np.abs(x_adv["rs_fgsm-linf"] - images).max() <= eps + 1e-6
  assert np.abs(x_adv["n_fgsm-linf"] - images).max() > 2 * eps


# --------------------------------------------------------------------------- restarts

@pytest.mark.parametrize("name,norm", [("pgd", "linf"), ("pgd", "l2"), ("apgd_ce", "linf")])
def test_more_restarts_never_weaken_an_example(name, norm):
  model = _tiny_mlp()
  variables = _init(model, (1, 8, 8, 1))
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.uniform(size=(32, 8, 8, 1)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, size=32))
  key = jax.random.key(6)
  built = {restarts: attacks.build_attack(ml_collections.ConfigDict(dict(
      name=name, norm=norm, eps=_EPS[norm], step_size=_EPS[norm] / 4, num_steps=2,
      restarts=restarts))) for restarts in (1, 4)}
  # Both in one program: restart 0, the same in both, is compiled once.
  both = _jit_attack(lambda *args: {r: attack(*args) for r, attack in built.items()}, model)
  losses, fooled = {}, {}
  for restarts, x_adv in both(variables, images, labels, key).items():
    losses[restarts] = _loss(model, variables, x_adv, labels)
    fooled[restarts] = np.asarray(jnp.argmax(model.apply(variables, x_adv, train=False), -1) != labels)
  # "Weaker" orders misclassified before correctly classified, then by loss: an example broken by
  # restart 0 stays broken; otherwise (same kind) its loss does not fall. The tolerance only
  # absorbs float32 rounding between the two runs.
  assert np.all(fooled[4][fooled[1]])
  same = fooled[4] == fooled[1]
  assert np.all(losses[4][same] >= losses[1][same] - 1e-6), (losses[4] - losses[1])[same]
  assert losses[4].mean() > losses[1].mean()  # and the extra restarts find something


@pytest.mark.parametrize("name", ["pgd", "apgd_ce"])
def test_restarts_keep_the_per_example_worst_case(name):
  """Robust accuracy under restarts is the per-example worst case: an example counts as robust only
  if every restart leaves it correctly classified. Here the model is a step in a 1-D input (zero
  gradient, so each restart stays at its uniform start): x < 0.5 gives logits (0.1, 0, 0), correct
  for label 0 with loss 1.03; x >= 0.5 gives (0, 0.1, -10), misclassified with the LOWER loss 0.74.
  From x = 0.5 with eps = 0.5 each restart is misclassified with probability 1/2, so the
  worst-case robust accuracy over R restarts is 2^-R (closed form); keeping the restart of highest
  loss instead gives 1 - 2^-R."""
  loss = lambda logits: float(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits), 0))
  assert loss([0.0, 0.1, -10.0]) < loss([0.1, 0.0, 0.0])  # the misclassified point has lower loss
  logits_fn = lambda x: jnp.where(x[:, :1] < 0.5, jnp.array([0.1, 0.0, 0.0]),
                                  jnp.array([0.0, 0.1, -10.0]))
  n = 400
  images, labels = jnp.full((n, 1), 0.5), jnp.zeros(n, jnp.int32)
  built = {restarts: attacks.build_attack(ml_collections.ConfigDict(dict(
      name=name, eps=0.5, step_size=1e-3, num_steps=1, restarts=restarts))) for restarts in (1, 4)}
  x_adv = jax.jit(lambda k: {r: attack(logits_fn, images, labels, k)  # one program for both
                             for r, attack in built.items()})(jax.random.key(0))
  fooled = {}
  for restarts in (1, 4):
    fooled[restarts] = np.asarray(jnp.argmax(logits_fn(x_adv[restarts]), -1) != labels)
    accuracy = 1 - fooled[restarts].mean()
    # 400 examples: the binomial standard deviation is at most 0.025.
    assert abs(accuracy - 0.5 ** restarts) < 0.075, (restarts, accuracy)
  # Restart 0 is the same run in both: whatever it broke stays broken.
  assert np.all(fooled[4][fooled[1]])


def test_unrolled_pgd_equals_the_rolled_loop():
  model = _tiny_mlp()
  variables = _init(model, (1, 8, 8, 1))
  rng = np.random.default_rng(7)
  images = jnp.asarray(rng.uniform(size=(16, 8, 8, 1)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, size=16))
  built = [attacks.build_attack(ml_collections.ConfigDict(dict(
      name="pgd", eps=0.1, step_size=0.03, num_steps=5, unroll=unroll))) for unroll in (1, 5)]
  # Both loops in one program (their random start is compiled once).
  results = _jit_attack(lambda *args: [attack(*args) for attack in built], model)(
      variables, images, labels, jax.random.key(8))
  np.testing.assert_allclose(np.asarray(results[0]), np.asarray(results[1]), atol=1e-6)


# --------------------------------------------------------------------------- DLR losses, APGD-T, worst_of

def test_square_schedule_halves_the_square_at_autoattacks_query_counts():
  """p_init until query 10 of 10,000, halved after 10, 50, 200, ..., 8000; rescaled to shorter runs
  (query 1 of 100 is query 100 of 10,000: two halvings) as in the authors' code, or fixed whatever
  the run's length, as AutoAttack's standard version runs it (resc_schedule=False)."""
  for num_queries in (1000, 5000, 10000):
    fixed = lambda query: float(attack_steps.square_fraction(0.8, query, num_queries, "fixed"))
    assert [fixed(q) for q in (10, 11, 50, 51, 500, 501)] == pytest.approx(
        [0.8, 0.4, 0.4, 0.2, 0.1, 0.05])
  assert float(attack_steps.square_fraction(0.8, 999, 1000, "fixed")) == pytest.approx(0.8 / 16)
  assert float(attack_steps.square_fraction(0.8, 999, 1000)) == pytest.approx(0.8 / 512)
  assert autoattack(0.1).attacks.square.p_schedule == "fixed"
  expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 2001: 0.8 / 64,
              8000: 0.8 / 256, 8001: 0.8 / 512, 9999: 0.8 / 512}
  for query, p in expected.items():
    assert float(attack_steps.square_fraction(0.8, query, 10000)) == pytest.approx(p), query
  assert float(attack_steps.square_fraction(0.8, 1, 100)) == pytest.approx(0.2)
  # Long runs too: query * 10000 does not fit int32 past query 214,748.
  for query, p in {214_749: 0.8 / 128, 399_999: 0.8 / 512}.items():  # 5,368 and 9,999 of 10,000
    assert float(attack_steps.square_fraction(0.8, jnp.int32(query), 400_000)) == pytest.approx(p), query
  logits = jnp.array([[2.0, 5.0, 1.0], [3.0, -1.0, 0.5]])
  np.testing.assert_allclose(attack_steps.margin_loss(logits, jnp.array([0, 0])), [-3.0, 2.5])


def test_square_breaks_a_model_whose_gradients_are_zero():
  """A linear classifier on inputs quantised to quarters has zero input gradient everywhere:
  PGD from the clean images never moves and leaves every example correct, Square Attack (logits
  only) breaks most of them, within its L-inf ball."""
  rng = np.random.default_rng(11)
  weights = jnp.asarray(rng.normal(size=(64, 10)).astype(np.float32))
  logits_fn = lambda x: (jnp.round(x * 4) / 4).reshape(len(x), -1) @ weights  # d round / dx = 0
  images = jnp.asarray(rng.uniform(size=(32, 8, 8, 1)).astype(np.float32))
  labels = jnp.argmax(logits_fn(images), -1)
  gradient = jax.grad(lambda x: attack_steps.cross_entropy(logits_fn(x), labels).sum())(images)
  assert float(jnp.abs(gradient).max()) == 0
  pgd = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="pgd", eps=0.3, step_size=0.1, num_steps=10, random_start=False)))
  square = attacks.build_attack(ml_collections.ConfigDict(dict(name="square", eps=0.3, num_queries=200)))
  accuracy = lambda x: float(jnp.mean(jnp.argmax(logits_fn(x), -1) == labels))
  assert accuracy(jax.jit(lambda x, y, k: pgd(logits_fn, x, y, k))(images, labels, jax.random.key(0))) == 1.0
  x_adv = jax.jit(lambda x, y, k: square(logits_fn, x, y, k))(images, labels, jax.random.key(0))
  assert accuracy(x_adv) < 0.3
  assert float(jnp.abs(x_adv - images).max()) <= 0.3 + 1e-6 and float(x_adv.min()) >= 0


def _square_transcription(logits_fn, images, labels, key, eps, num_queries, p_init=0.8,
                          schedule="rescaled", restart=0):
  """Square Attack L-inf as Andriushchenko et al.'s reference loops it, example by example, with
  AutoAttack's if-chain schedule (rescaled to num_queries, or "fixed") and window slices; its
  random draws are the attack's own calls for restart `restart`."""
  x = np.asarray(images, np.float64)
  n, h, w, c = x.shape
  margin = lambda z: np.array(attack_steps.margin_loss(logits_fn(jnp.asarray(z, jnp.float32)), labels))
  start_key, loop_key = jax.random.split(jax.random.fold_in(key, restart))  # the restart's key
  stripes = eps * np.asarray(jax.random.rademacher(start_key, (n, 1, w, c), jnp.float32))
  best = np.clip(x + stripes, 0, 1)
  best_margin = margin(best)
  accepted = redrawn = 0
  for i in range(num_queries):
    it = int(i / num_queries * 10000) if schedule == "rescaled" else i
    p = p_init
    for bound, divisor in ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64),
                           (4000, 128), (6000, 256), (8000, 512)):
      if it > bound:
        p = p_init / divisor
    s = min(max(int(round(np.sqrt(p * h * w))), 1), min(h, w) - 1)
    h_key, w_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i), 3)
    # Every place of the square (the reference's randint(0, h - s) stops one short).
    tops = np.asarray(jax.random.randint(h_key, (n, 1), 0, h - s + 1))[:, 0]
    lefts = np.asarray(jax.random.randint(w_key, (n, 1), 0, w - s + 1))[:, 0]
    draws = eps * np.asarray(jax.random.rademacher(sign_key, (attacks.SQUARE_REDRAWS, n, c),
                                                   jnp.float32))
    candidate = best.copy()
    for k in range(n):
      t, l = tops[k], lefts[k]
      window = lambda d: np.clip(x[k, t:t + s, l:l + s, :] + d[k], 0, 1)
      # The reference's while loop: draw again while the window would stay as it is.
      first = next((r for r, d in enumerate(draws)
                    if np.any(np.abs(window(d) - best[k, t:t + s, l:l + s, :]) >= 1e-7)), 0)
      redrawn += first > 0
      candidate[k, t:t + s, l:l + s, :] = window(draws[first])
    new_margin = margin(candidate)
    for k in range(n):
      if best_margin[k] >= 0 and new_margin[k] < best_margin[k]:
        best[k], best_margin[k] = candidate[k], new_margin[k]
        accepted += 1
  return best, accepted, redrawn


@pytest.mark.parametrize("channels", [3, 1])
def test_square_follows_the_reference_loops(channels):
  """The vectorised attack (windows as masks, one traced side per query, the colour redraws as
  a choice among draws) equals the reference's per-example loops on a linear model, for a run
  long enough to shrink the square; with one channel, draws that would change nothing are
  drawn again often."""
  rng = np.random.default_rng(5)
  weights = jnp.asarray(rng.normal(size=(16 * channels, 10)).astype(np.float32))
  logits_fn = lambda x: x.reshape(len(x), -1) @ weights
  images = jnp.asarray(rng.uniform(size=(6, 4, 4, channels)).astype(np.float32))
  labels = jnp.argmax(logits_fn(images), -1)
  key = jax.random.key(3)
  ours = jax.jit(lambda x, y, k: attacks.square(logits_fn, x, y, k, eps=0.05, num_queries=60))(
      images, labels, key)
  reference, accepted, redrawn = _square_transcription(logits_fn, images, labels, key, 0.05, 60)
  assert accepted >= 10 and redrawn >= (100 if channels == 1 else 10)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-6)


def _pseudo_gaussian_pert_rectangles(x, y):
  """The reference's, line by line."""
  delta = np.zeros([x, y])
  x_c, y_c = x // 2 + 1, y // 2 + 1
  counter2 = [x_c - 1, y_c - 1]
  for counter in range(0, max(x_c, y_c)):
    delta[max(counter2[0], 0):min(counter2[0] + (2 * counter + 1), x),
          max(0, counter2[1]):min(counter2[1] + (2 * counter + 1), y)] += 1.0 / (counter + 1) ** 2
    counter2[0] -= 1
    counter2[1] -= 1
  delta /= np.sqrt(np.sum(delta ** 2, keepdims=True))
  return delta


def _meta_pseudo_gaussian_pert(s, transpose):
  """The reference's, with its coin np.random.rand(1) > 0.5 passed in."""
  delta = np.zeros([s, s])
  delta[:s // 2] = _pseudo_gaussian_pert_rectangles(s // 2, s)
  delta[s // 2:] = _pseudo_gaussian_pert_rectangles(s - s // 2, s) * (-1)
  delta /= np.sqrt(np.sum(delta ** 2, keepdims=True))
  return np.transpose(delta) if transpose else delta


def _square_l2_transcription(logits_fn, images, labels, key, eps, num_queries, p_init=0.8,
                             schedule="rescaled", restart=0):
  """Square Attack L2 as the reference's square_attack_l2 loops it (NCHW, float64), on each
  example as a batch of one, its schedule rescaled to num_queries or "fixed"; its random draws
  are the attack's own calls for restart `restart`."""
  x = np.transpose(np.asarray(images, np.float64), (0, 3, 1, 2))
  n, c, h, w = x.shape
  margin = lambda z: np.array(attack_steps.margin_loss(logits_fn(jnp.asarray(z.transpose(0, 2, 3, 1))),
                                                       labels))
  start_key, loop_key = jax.random.split(jax.random.fold_in(key, restart))  # the restart's key
  flip_key, sign_key = jax.random.split(start_key)
  s = max(h // 5, 1)  # the reference's h // 5; it fails below 5 rows
  num_squares = (h // s) * (w // s)
  flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (n, num_squares)))
  signs = np.asarray(jax.random.rademacher(sign_key, (n, num_squares, c), jnp.float64))
  delta_init = np.zeros(x.shape)
  sp_init = max((h - s * 5) // 2, 0)
  center_h, k = sp_init + 0, 0
  for _ in range(h // s):
    center_w = sp_init + 0
    for _ in range(w // s):
      for e in range(n):  # a square the border cuts keeps its top-left part (the reference fails)
        window = delta_init[e, :, center_h:center_h + s, center_w:center_w + s]
        pert = _meta_pseudo_gaussian_pert(s, flips[e, k])[:window.shape[1], :window.shape[2]]
        window += pert[None] * signs[e, k][:, None, None]
      center_w += s
      k += 1
    center_h += s
  x_best = np.clip(x + delta_init / np.sqrt(np.sum(delta_init ** 2, axis=(1, 2, 3), keepdims=True))
                   * eps, 0, 1)
  margin_min = margin(x_best)
  accepted = 0
  for i_iter in range(num_queries):
    it = int(i_iter / num_queries * 10000) if schedule == "rescaled" else i_iter
    p = p_init
    for bound, divisor in ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64),
                           (4000, 128), (6000, 256), (8000, 512)):
      if it > bound:
        p = p_init / divisor
    s = max(int(round(np.sqrt(p * h * w))), 3)
    if s % 2 == 0:
      s += 1
    s = min(s, min(h, w) - 1)  # ours: the reference's randint(0, h - s) fails above
    row_key, col_key, flip_key, sign_key = jax.random.split(jax.random.fold_in(loop_key, i_iter), 4)
    # Every place of the window (the reference's randint(0, h - s) stops one short).
    tops = np.asarray(jax.random.randint(row_key, (2, n), 0, h - s + 1))
    lefts = np.asarray(jax.random.randint(col_key, (2, n), 0, w - s + 1))
    transposes = np.asarray(jax.random.bernoulli(flip_key, 0.5, (n,)))
    choices = np.asarray(jax.random.rademacher(sign_key, (n, c), jnp.float64))
    x_new = x_best.copy()
    for e in range(n):
      x_curr, x_best_curr = x[e:e + 1], x_best[e:e + 1]
      delta_curr = x_best_curr - x_curr
      center_h, center_w, center_h_2, center_w_2 = tops[0, e], lefts[0, e], tops[1, e], lefts[1, e]
      new_deltas_mask = np.zeros(x_curr.shape)
      new_deltas_mask[:, :, center_h:center_h + s, center_w:center_w + s] = 1.0
      new_deltas_mask_2 = np.zeros(x_curr.shape)
      new_deltas_mask_2[:, :, center_h_2:center_h_2 + s, center_w_2:center_w_2 + s] = 1.0
      curr_norms_window = np.sqrt(
          np.sum(((x_best_curr - x_curr) * new_deltas_mask) ** 2, axis=(2, 3), keepdims=True))
      curr_norms_image = np.sqrt(np.sum((x_best_curr - x_curr) ** 2, axis=(1, 2, 3), keepdims=True))
      mask_2 = np.maximum(new_deltas_mask, new_deltas_mask_2)
      norms_windows = np.sqrt(np.sum((delta_curr * mask_2) ** 2, axis=(2, 3), keepdims=True))
      new_deltas = np.ones([1, c, s, s])
      new_deltas = new_deltas * _meta_pseudo_gaussian_pert(s, transposes[e]).reshape([1, 1, s, s])
      new_deltas *= choices[e].reshape([1, c, 1, 1])
      old_deltas = delta_curr[:, :, center_h:center_h + s, center_w:center_w + s] / (
          1e-10 + curr_norms_window)
      new_deltas += old_deltas
      new_deltas = new_deltas / np.sqrt(np.sum(new_deltas ** 2, axis=(2, 3), keepdims=True)) * (
          np.maximum(eps ** 2 - curr_norms_image ** 2, 0) / c + norms_windows ** 2) ** 0.5
      delta_curr[:, :, center_h_2:center_h_2 + s, center_w_2:center_w_2 + s] = 0.0
      delta_curr[:, :, center_h:center_h + s, center_w:center_w + s] = new_deltas + 0
      x_new[e:e + 1] = np.clip(x_curr + delta_curr / np.sqrt(np.sum(
          delta_curr ** 2, axis=(1, 2, 3), keepdims=True)) * eps, 0, 1)
    new_margin = margin(x_new)
    for e in range(n):
      if margin_min[e] >= 0 and new_margin[e] < margin_min[e]:
        x_best[e], margin_min[e] = x_new[e], new_margin[e]
        accepted += 1
  return np.transpose(x_best, (0, 2, 3, 1)), accepted


def test_square_l2_follows_the_reference_loops():
  """The vectorised L2 attack (two windows as masks of one traced side per query, the bump as a
  closed form) equals the reference's loops in float64 on a linear model. At 12 x 11 x 3 and 60
  queries the window shrinks from the cap 10 (sqrt(0.8 h w) made odd, 11) through 5 (also from
  an even 4) to 3; the starting grid of bumps of side 2 begins at row and column 1, and the
  border cuts its last row of bumps."""
  shape = (12, 11, 3)
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    weights = jnp.asarray(rng.normal(size=(int(np.prod(shape)), 10)))
    logits_fn = lambda x: x.reshape(len(x), -1) @ weights
    images = jnp.asarray(rng.uniform(size=(4, *shape)))
    labels = jnp.argmax(logits_fn(images), -1)
    key = jax.random.key(3)
    ours = jax.jit(lambda x, y, k: attacks.square(logits_fn, x, y, k, eps=0.5, num_queries=60,
                                                  norm="l2"))(images, labels, key)
    reference, accepted = _square_l2_transcription(logits_fn, images, labels, key, 0.5, 60)
  assert accepted >= 10
  np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-9, rtol=0)


@pytest.mark.parametrize("norm,shape,eps", [("linf", (4, 4, 1), 0.05), ("l2", (10, 10, 2), 0.5)])
def test_square_runs_the_configured_p_init_schedule_and_restarts(norm, shape, eps):
  """Square Attack (L-inf and L2) built with p_init 0.3, AutoAttack's fixed schedule and 2
  restarts equals the reference's loops run with them, restart r from fold_in(key, r), per
  example the stronger of the two (misclassified first, then cross-entropy). In these 15 queries
  (p halved after query 10) the squares have side 2 at 4 x 4 (L-inf; rescaled: 1 from query 1 on;
  p_init 0.8: 3) and 5 at 10 x 10 (L2; rescaled: 3 from query 1 on; p_init 0.8: 9)."""
  dtype = np.float64 if norm == "l2" else np.float32
  transcription = _square_transcription if norm == "linf" else _square_l2_transcription
  attack = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="square", norm=norm, eps=eps, num_queries=15, p_init=0.3, p_schedule="fixed", restarts=2)))
  with jax.enable_x64(norm == "l2"):
    rng = np.random.default_rng(7)
    weights = jnp.asarray(rng.normal(size=(int(np.prod(shape)), 10)).astype(dtype))
    logits_fn = lambda x: x.reshape(len(x), -1) @ weights
    images = jnp.asarray(rng.uniform(size=(6, *shape)).astype(dtype))
    labels = jnp.argmax(logits_fn(images), -1)
    key = jax.random.key(4)
    ours = np.asarray(jax.jit(lambda x, y, k: attack(logits_fn, x, y, k))(images, labels, key))
    runs = [transcription(logits_fn, images, labels, key, eps, 15, p_init=0.3, schedule="fixed",
                          restart=r) for r in (0, 1)]
    z = [np.asarray(logits_fn(jnp.asarray(run[0], dtype)), np.float64) for run in runs]
  y = np.asarray(labels)
  strength = [(np.argmax(zr, -1) != y, np.log(np.exp(zr).sum(-1)) - zr[np.arange(len(y)), y])
              for zr in z]
  (fooled0, loss0), (fooled1, loss1) = strength
  second = (fooled1 & ~fooled0) | ((fooled1 == fooled0) & (loss1 > loss0))
  assert runs[0][1] >= 10 and runs[1][1] >= 10  # queries accepted
  assert second.any() and not second.all()  # each restart is the stronger for some example
  np.testing.assert_allclose(ours, np.where(second[:, None, None, None], runs[1][0], runs[0][0]),
                             atol=1e-6 if norm == "linf" else 1e-9, rtol=0)


def test_square_l2_stays_in_its_ball_and_the_image_box():
  """Many pixels at 0 or 1 (the clip cuts most bumps) and an eps the clip keeps from being
  reached: every result within eps in L2 and in [0, 1], and most examples moved."""
  rng = np.random.default_rng(9)
  weights = jnp.asarray(rng.normal(size=(36, 10)).astype(np.float32))
  logits_fn = lambda x: x.reshape(len(x), -1) @ weights
  images = jnp.asarray(rng.choice([0.0, 1.0, 0.5], size=(16, 6, 6, 1)).astype(np.float32))
  labels = jnp.argmax(logits_fn(images), -1)
  run = jax.jit(lambda x, y, k, eps: attacks.square(logits_fn, x, y, k, eps=eps, num_queries=30,
                                                    norm="l2"))  # eps traced: one compile
  for eps in (0.3, 3.0):
    x_adv = np.asarray(run(images, labels, jax.random.key(1), eps))
    norms = np.linalg.norm((x_adv - np.asarray(images)).reshape(16, -1), axis=1)
    assert norms.max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.mean(norms > eps / 10) > 0.5


def test_square_l2_breaks_a_model_whose_gradients_are_zero():
  """As for L-inf: PGD-L2 cannot move on inputs quantised to quarters, Square L2 breaks most
  examples within its L2 ball."""
  rng = np.random.default_rng(11)
  weights = jnp.asarray(rng.normal(size=(64, 10)).astype(np.float32))
  logits_fn = lambda x: (jnp.round(x * 4) / 4).reshape(len(x), -1) @ weights  # d round / dx = 0
  images = jnp.asarray(rng.uniform(size=(32, 8, 8, 1)).astype(np.float32))
  labels = jnp.argmax(logits_fn(images), -1)
  pgd = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="pgd", norm="l2", eps=1.5, step_size=0.5, num_steps=10, random_start=False)))
  square = attacks.build_attack(ml_collections.ConfigDict(dict(name="square", norm="l2", eps=1.5,
                                                               num_queries=200)))
  accuracy = lambda x: float(jnp.mean(jnp.argmax(logits_fn(x), -1) == labels))
  assert accuracy(jax.jit(lambda x, y, k: pgd(logits_fn, x, y, k))(images, labels, jax.random.key(0))) == 1.0
  x_adv = jax.jit(lambda x, y, k: square(logits_fn, x, y, k))(images, labels, jax.random.key(0))
  assert accuracy(x_adv) < 0.3
  norms = np.linalg.norm(np.asarray(x_adv - images).reshape(32, -1), axis=1)
  assert norms.max() <= 1.5 + 1e-6 and float(x_adv.min()) >= 0


def test_dlr_losses_match_their_definition_and_ignore_the_logits_scale():
  logits = jnp.array([[3.0, 1.0, 0.5, -1.0], [3.0, 1.0, 0.5, -1.0]])
  labels = jnp.array([0, 2])
  # label 0: -(3 - 1) / (3 - 0.5); label 2: -(0.5 - 3) / (3 - 0.5)
  np.testing.assert_allclose(attack_steps.dlr_loss(logits, labels), [-0.8, 1.0], rtol=1e-6)
  # toward class 1 from label 0: -(3 - 1) / (3 - (0.5 - 1) / 2); toward 0 from 2: -(0.5 - 3) / 3.25
  np.testing.assert_allclose(attack_steps.targeted_dlr_loss(logits, labels, jnp.array([1, 0])),
                             [-2 / 3.25, 2.5 / 3.25], rtol=1e-6)
  targeted = lambda z, y: attack_steps.targeted_dlr_loss(z, y, jnp.array([3, 1]))
  for loss in (attack_steps.dlr_loss, targeted):
    np.testing.assert_allclose(loss(1e4 * logits - 7.0, labels), loss(logits, labels), rtol=1e-5)
  with pytest.raises(ValueError, match="at least 3 classes; the model has 2"):
    attack_steps.dlr_loss(logits[:, :2], labels * 0)


def _linear_ten_class_problem(scale):
  """A linear model with 10 classes on 16-pixel images, logits multiplied by `scale`."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, 10)).astype(np.float32)
  images = jnp.asarray(rng.uniform(0.2, 0.8, size=(64, 4, 4, 1)).astype(np.float32))
  logits_fn = lambda x: scale * (x.reshape(x.shape[0], -1) @ w)
  labels = jnp.argmax(logits_fn(images), -1)  # every example clean-correct
  return logits_fn, images, labels


def test_dlr_attacks_see_through_a_saturated_softmax():
  """Logits scaled by 1e4 leave the predictions unchanged, but the cross-entropy of a confident
  example and its gradient underflow to 0 in float32: APGD-CE stops breaking such examples (the
  gradient masking a linearized model or kernel predictor with large outputs shows), while the
  DLR attacks, invariant to the scale, break as many as APGD-CE does on the unscaled model."""
  eps, key = 0.05, jax.random.key(4)
  problems = {scale: _linear_ten_class_problem(scale) for scale in (1.0, 1e4)}
  built = {name: attacks.build_attack(ml_collections.ConfigDict(dict(name=name, eps=eps, num_steps=20)))
           for name in ("apgd_ce", "apgd_dlr", "apgd_t")}
  # The six runs in one program: their common parts (the random start from one key) compile once.
  x_adv = jax.jit(lambda: {(name, scale): attack(*problem, key) for name, attack in built.items()
                           for scale, problem in problems.items()})()
  robust = {}
  for (name, scale), x in x_adv.items():
    logits_fn, _, labels = problems[scale]
    robust[name, scale] = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == labels))
  assert robust["apgd_ce", 1.0] < 0.8, robust  # eps breaks examples when nothing saturates
  assert robust["apgd_ce", 1e4] > robust["apgd_ce", 1.0] + 0.15, robust  # masked
  for name in ("apgd_dlr", "apgd_t"):
    assert robust[name, 1e4] <= robust["apgd_ce", 1.0] + 0.02, robust
    assert robust[name, 1e4] == pytest.approx(robust[name, 1.0], abs=0.02), robust


def test_ranked_targets_are_the_other_classes_by_decreasing_clean_logit():
  """Column i of ranked_targets is the class of the (i + 1)-th highest logit among those other
  than the true one (a numpy argsort without it), whether the true class has the largest, the
  smallest or a middle logit; the true class comes last, never among the num_targets first."""
  rng = np.random.default_rng(0)
  n, c = 12, 10
  logits = rng.normal(size=(n, c)).astype(np.float32)
  order = np.argsort(-logits, 1)
  labels = order[np.arange(n), [0] * 4 + [c - 1] * 4 + [1, 4, 6, 8]]
  reference = np.array([[k for k in order[i] if k != labels[i]] for i in range(n)])
  for num_targets in (1, 4, c - 1):
    ranked = np.asarray(attack_steps.ranked_targets(jnp.asarray(logits), jnp.asarray(labels),
                                                    num_targets, 2, "test"))
    np.testing.assert_array_equal(ranked[:, :num_targets], reference[:, :num_targets])
    np.testing.assert_array_equal(ranked[:, -1], labels)


def test_ranked_targets_refuse_a_target_count_outside_the_other_classes():
  """A targeted attack has C - 1 classes to aim at: num_targets = C would make the true class (last
  in the ranking) a target, and 0 would attack nothing; both are refused naming the range."""
  logits, labels = jnp.zeros((2, 10)), jnp.array([0, 3])
  for num_targets in (0, 10):
    with pytest.raises(ValueError, match=rf"num_targets={num_targets} must lie in \[1, 9\]"):
      attack_steps.ranked_targets(logits, labels, num_targets, 2, "test")


def test_square_acceptance_takes_strict_margin_improvements_of_correct_examples_only():
  """Square Attack's acceptance (Andriushchenko et al.'s `loss_new < loss_min` on examples not yet
  misclassified), on a model whose margin is 1 - 2 x[0] (pixel 1 ignored): a candidate that leaves
  the margin equal is not taken (example 0), one that lowers it is (example 1), and an example
  already misclassified keeps its point even when the candidate lowers its margin further (2).
  At margin 0 (a tie the argmax gives the true class: still correct) an example goes on (3)."""
  logits_fn = lambda x: jnp.stack([1 - x[:, 0, 0, 0], x[:, 0, 0, 0]], -1)
  labels = jnp.zeros(4, jnp.int32)
  x_best = jnp.array([[0.2, 0.0], [0.2, 0.0], [0.7, 0.0], [0.5, 0.0]]).reshape(4, 2, 1, 1)
  candidate = jnp.array([[0.2, 0.9], [0.3, 0.0], [0.9, 0.0], [0.6, 0.0]]).reshape(4, 2, 1, 1)
  margin = attack_steps.margin_loss(logits_fn(x_best), labels)
  np.testing.assert_allclose(margin, [0.6, 0.6, -0.4, 0.0], rtol=1e-6)
  assert int(jnp.argmax(logits_fn(x_best[3:]), -1)[0]) == 0
  kept, new_margin = attack_steps.keep_lower_margin(logits_fn, labels, candidate, x_best, margin)
  np.testing.assert_array_equal(kept, jnp.stack([x_best[0], candidate[1], x_best[2], candidate[3]]))
  np.testing.assert_allclose(new_margin, [0.6, 0.4, -0.4, -0.2], rtol=1e-6)


def test_apgd_t_toward_one_target_breaks_what_the_highest_other_class_allows():
  """AutoAttack's rule: APGD-T's first target is the class of highest clean logit after the true
  one. On the linear 10-class model, APGD-T with num_targets=1 leaves correct the examples that
  the best L-inf step toward that class, eps sign(w_t - w_y) (the box does not bind), leaves
  correct (4 of 64), one example either way; a first 'target' that was the true class itself
  would leave nearly all of them correct."""
  eps = 0.05
  logits_fn, images, labels = _linear_ten_class_problem(1.0)
  w = np.asarray(logits_fn(jnp.eye(16).reshape(16, 4, 4, 1)))  # [16, 10]
  x, y = np.asarray(images).reshape(64, -1), np.asarray(labels)
  top_other = np.argmax(np.where(np.arange(10) == y[:, None], -np.inf, x @ w), 1)
  stepped = x + eps * np.sign(w[:, top_other] - w[:, y]).T
  assert stepped.min() >= 0 and stepped.max() <= 1
  expected = np.mean(np.argmax(stepped @ w, 1) == y)
  assert expected < 0.2
  x_adv = jax.jit(lambda: attacks.apgd_t(logits_fn, images, labels, jax.random.key(4), eps=eps,
                                         num_steps=20, num_targets=1))()
  robust = float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == labels))
  assert robust == pytest.approx(expected, abs=1.5 / 64)


def test_worst_of_counts_an_example_broken_by_any_of_its_attacks(digits_model):
  """worst_of(apgd_ce, apgd_t) on the trained digits MLP: an example is robust only if both of
  its attacks (run alone with the same keys) leave it correct; APGD-T is at least as strong as
  APGD-CE, as Croce and Hein find."""
  model, variables, images, labels = digits_model
  eps, key = 0.1, jax.random.key(11)
  members = dict(ce=dict(name="apgd_ce", num_steps=10), t=dict(name="apgd_t", num_steps=10,
                                                                num_targets=3))
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(name="worst_of", eps=eps,
                                                              attacks=members)))
  alone = {m: attacks.build_attack(ml_collections.ConfigDict(dict(fields, eps=eps)))
           for m, fields in members.items()}

  def all_three(logits_fn, images, labels, key):
    """worst_of and each member alone with its key, in one program (compiled once: XLA merges
    the members' computations that worst_of repeats)."""
    x_adv = {m: attack(logits_fn, images, labels, jax.random.fold_in(key, i))
             for i, (m, attack) in enumerate(alone.items())}
    return dict(x_adv, worst_of=worst(logits_fn, images, labels, key))

  correct = {}
  for name, x_adv in _jit_attack(all_three, model)(variables, images, labels, key).items():
    correct[name] = np.asarray(jnp.argmax(model.apply(variables, x_adv, train=False), -1) == labels)
  assert correct["ce"].mean() < _accuracy(model, variables, images, labels)
  assert correct["t"].mean() <= correct["ce"].mean() + 0.02, {k: v.mean() for k, v in correct.items()}
  # The same computations fused differently may round differently: allow one example to differ.
  assert np.sum(correct["worst_of"] != (correct["ce"] & correct["t"])) <= 1


def _parameterized(model, variables, mesh):
  return Parameterized(_inference_apply(model), parallel.replicate(variables, mesh))


@functools.cache
def _inference_apply(model):
  """One apply function per model: evaluate() compiles once per function."""
  return lambda variables, x: model.apply(variables, x, train=False)


def test_evaluate_runs_worst_of_members_in_turn_on_the_examples_still_robust(digits_model, monkeypatch):
  """evaluate() under worst_of(fgsm, pgd) (both deterministic: no random start) counts the examples
  that the clean model, FGSM and PGD each leave correct, as worst_of inside jit does, but FGSM
  attacks only the clean-correct examples and PGD only those FGSM left correct. The loss is that
  of the images kept, and an example left correct keeps the one of highest cross-entropy of its
  clean image and the members' results (not its clean image)."""
  model, variables, images, labels = digits_model
  split = Split(np.asarray(images), np.asarray(labels))
  mesh = parallel.make_mesh()
  members = dict(fgsm=dict(name="fgsm"),
                 pgd=dict(name="pgd", step_size=0.02, num_steps=5, random_start=False))
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(name="worst_of", eps=0.08,
                                                              attacks=members)))
  evaluated_sizes = []
  real_batches = evaluate_module.eval_batches
  monkeypatch.setattr(evaluate_module, "eval_batches",
                      lambda part, *a: evaluated_sizes.append(len(part)) or real_batches(part, *a))
  run = lambda attack, keep: evaluate(_parameterized(model, variables, mesh), split, 64, mesh, 10,
                                      attack=attack, key=jax.random.key(3), keep_examples=keep)
  in_turn = run(worst, True)
  sizes, evaluated_sizes[:] = list(evaluated_sizes), []
  correct, alone = {}, {}
  for name, attack in [("clean", None), *attacks.build_attacks(ml_collections.ConfigDict(
      {k: dict(v, eps=0.08) for k, v in members.items()}), "m").items()]:
    examples = run(attack, True)["examples"]
    correct[name] = examples["predictions"] == split.labels
    alone[name] = examples["images"]
  after_fgsm = correct["clean"] & correct["fgsm"]
  expected = after_fgsm & correct["pgd"]
  assert sizes == [len(split), correct["clean"].sum(), after_fgsm.sum()]
  assert 0.2 < expected.mean() < after_fgsm.mean() < correct["clean"].mean()
  # The same programs compiled apart may round differently: allow one example to differ.
  in_turn_correct = in_turn["examples"]["predictions"] == split.labels
  assert np.sum(in_turn_correct != expected) <= 1
  assert in_turn["accuracy"] == pytest.approx(in_turn_correct.mean())
  assert in_turn["accuracy_after"]["fgsm"] == pytest.approx(after_fgsm.mean(), abs=1.5 / len(split))
  assert in_turn["accuracy_after"]["pgd"] == in_turn["accuracy"]
  # Inside jit (every member on every example) the count is the same.
  inside_jit = run(lambda *args: worst(*args), False)
  assert inside_jit["accuracy"] == pytest.approx(in_turn["accuracy"], abs=1.5 / len(split))
  per_class = [np.mean(in_turn_correct[split.labels == c]) for c in range(10)]
  np.testing.assert_allclose(in_turn["per_class_accuracy"], per_class)
  # The loss reported is the mean cross-entropy of the images kept, computed here anew.
  kept = in_turn["examples"]["images"]
  kept_loss = _loss(model, variables, kept, labels)
  assert in_turn["loss"] == pytest.approx(kept_loss.mean(), rel=1e-5)
  # An example every member left correct keeps the highest of the three cross-entropies (clean,
  # FGSM's, PGD's; each member's result on it does not depend on the others), and where both
  # members moved it, an attacked image, not its clean one.
  robust = in_turn_correct & expected
  candidates = np.stack([_loss(model, variables, alone[k], labels) for k in ("clean", *members)])
  assert robust.sum() >= 0.2 * len(split)
  np.testing.assert_allclose(kept_loss[robust], candidates.max(0)[robust], rtol=1e-4, atol=1e-6)
  moved = np.all([np.any(alone[k] != split.images, axis=(1, 2, 3)) for k in members], axis=0)
  assert np.sum(robust & moved) >= 0.2 * len(split)
  assert not np.any(np.all(kept == split.images, axis=(1, 2, 3))[robust & moved])


def test_worst_of_runs_its_members_in_the_order_of_their_names():
  """Not in the order written: a ConfigDict, which every config is, sorts its keys (documented in
  base_config.autoattack and the README, which said "in this order")."""
  members = dict(pgd=dict(name="pgd", step_size=0.02, num_steps=2), fgsm=dict(name="fgsm"))
  config = ml_collections.ConfigDict(dict(name="worst_of", eps=0.1, attacks=members))
  assert attacks.build_attack(config).names == ("fgsm", "pgd")


def test_worst_of_in_turn_on_four_devices_equals_one(digits_model):
  """The re-batched members (random starts, Square's windows) give the examples of one device."""
  model, variables, images, labels = digits_model
  split = Split(np.asarray(images[:100]), np.asarray(labels[:100]))
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(name="worst_of", eps=0.1, attacks=dict(
      ce=dict(name="apgd_ce", num_steps=3), square=dict(name="square", num_queries=10)))))
  results = {}
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,), axis_types=(AxisType.Auto,))
  for mesh in (one, parallel.make_mesh()):
    results[mesh.devices.size] = evaluate(_parameterized(model, variables, mesh), split, 32, mesh, 10,
                                          attack=worst, key=jax.random.key(5), keep_examples=True)
  assert results[1]["accuracy_after"] == results[4]["accuracy_after"]
  clean = np.mean(results[1]["examples"]["clean_predictions"] == split.labels)
  assert results[1]["accuracy_after"]["ce"] < clean  # APGD-CE broke some
  for k in ("predictions", "clean_predictions"):
    np.testing.assert_array_equal(results[4]["examples"][k], results[1]["examples"][k])
  np.testing.assert_allclose(results[4]["examples"]["images"], results[1]["examples"]["images"],
                             atol=1e-5, rtol=0)
  assert not np.allclose(results[1]["examples"]["images"], split.images)


def _zero_gradient_step(x):
  """A step in the first input: x < 0.5 gives logits (0.1, 0, 0) (class 0), x >= 0.5 gives
  (0, 0.1, -10) (class 1); zero input gradient, so PGD stays at its random start."""
  x = x.reshape(len(x), -1)[:, :1]
  return jnp.where(x < 0.5, jnp.array([0.1, 0.0, 0.0]), jnp.array([0.0, 0.1, -10.0]))


def _pgd_start_fooled(key, n, x=0.49, eps=0.5):
  """Whether PGD (one restart: its start from fold_in(key, 0)) on the zero-gradient step from x
  lands at x' >= 0.5: its uniform L-inf start drawn by hand, [n] bool."""
  u = jax.random.uniform(jax.random.fold_in(key, 0), (n, 1, 1, 1), jnp.float32, -eps, eps)
  return np.asarray(jnp.clip(jnp.float32(x) + u, 0.0, 1.0) >= 0.5).reshape(n)


_ONE_STEP_PGD = dict(name="pgd", step_size=1e-3, num_steps=1)


def test_worst_of_gives_each_member_its_own_key():
  """worst_of's i-th member runs with fold_in(key, i): two identical PGD members then start from
  independent points and break an example each with probability 1/2 on the zero-gradient step,
  robust accuracy 1/4 (the same key for both gave 1/2); exactly the examples either start,
  drawn by hand, breaks."""
  n, key = 400, jax.random.key(0)
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="worst_of", eps=0.5, attacks=dict(a=_ONE_STEP_PGD, b=_ONE_STEP_PGD))))
  x_adv = jax.jit(lambda k: worst(_zero_gradient_step, jnp.full((n, 1, 1, 1), 0.49),
                                  jnp.zeros(n, jnp.int32), k))(key)
  fooled = np.asarray(jnp.argmax(_zero_gradient_step(x_adv), -1) != 0)
  assert 1 - fooled.mean() == pytest.approx(0.25, abs=0.075)  # binomial sd 0.022
  expected = _pgd_start_fooled(jax.random.fold_in(key, 0), n) | _pgd_start_fooled(
      jax.random.fold_in(key, 1), n)
  np.testing.assert_array_equal(fooled, expected)


def test_apgd_t_runs_each_target_class_from_its_own_key():
  """APGD-T's r-th target runs from the start drawn with fold_in(key, r): on a 4-class
  zero-gradient step (class 1 from x >= 0.5) every run stays at its uniform start, so from x =
  0.49 with eps = 0.5 and 2 targets an example is broken exactly where either start, drawn here
  by hand, lies at 0.5 or above: about 3/4 of them (one start for both, or one target: 1/2)."""
  n, key = 400, jax.random.key(7)
  step = lambda x: jnp.concatenate([_zero_gradient_step(x), jnp.zeros((len(x), 1))], -1)
  x_adv = jax.jit(lambda k: attacks.apgd_t(step, jnp.full((n, 1, 1, 1), 0.49), jnp.zeros(n, jnp.int32),
                                           k, eps=0.5, num_steps=2, num_targets=2))(key)
  fooled = np.asarray(jnp.argmax(step(x_adv), -1) != 0)
  starts = [jnp.float32(0.49) + jax.random.uniform(jax.random.fold_in(key, r), (n, 1, 1, 1),
                                                   jnp.float32, -0.5, 0.5) for r in (0, 1)]
  expected = np.asarray((starts[0] >= 0.5) | (starts[1] >= 0.5)).reshape(n)
  assert expected.mean() == pytest.approx(0.74, abs=0.075)  # binomial sd 0.022
  np.testing.assert_array_equal(fooled, expected)


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,), axis_types=(AxisType.Auto,))


def test_evaluate_attacks_each_batch_with_its_own_key():
  """evaluate() attacks batch i with fold_in(key, i): four batches of identical images get
  different random starts (one key for all repeated batch 0's result four times), each the
  start drawn by hand from its batch's key."""
  n, batch_size, key = 400, 100, jax.random.key(1)
  split = Split(np.full((n, 1, 1, 1), 0.49, np.float32), np.zeros(n, np.int32))
  pgd = attacks.build_attack(ml_collections.ConfigDict(dict(_ONE_STEP_PGD, eps=0.5)))
  result = evaluate(_zero_gradient_step, split, batch_size, _one_device_mesh(), 3, attack=pgd,
                    key=key, keep_examples=True)
  predictions = result["examples"]["predictions"]
  expected = np.concatenate([_pgd_start_fooled(jax.random.fold_in(key, i), batch_size)
                             for i in range(n // batch_size)])
  np.testing.assert_array_equal(predictions, expected.astype(predictions.dtype))
  per_batch = predictions.reshape(-1, batch_size)
  assert not all(np.array_equal(per_batch[0], b) for b in per_batch[1:])
  assert result["accuracy"] == pytest.approx(np.mean(~expected))


def test_evaluation_attacks_draw_from_keys_of_their_names():
  """An evaluation attack's key comes from its name, not its place in config.eval_attacks: the same
  name gives the same key whatever else is listed, and two names give two keys (two attacks of
  one config under two names draw independently)."""
  key = jax.random.key(1)
  data = lambda name: np.asarray(jax.random.key_data(evaluate_module.attack_key_of(key, name)))
  np.testing.assert_array_equal(data("pgd"), data("pgd"))
  assert len({data(name).tobytes() for name in ("pgd", "apgd", "autoattack", "fab_t")}) == 4
  assert not np.array_equal(data("pgd"), np.asarray(jax.random.key_data(key)))


def test_evaluate_in_turn_attacks_each_member_batch_with_its_own_key():
  """Under worst_of, evaluate() runs member i on the examples still robust, re-batched, batch b
  with key fold_in(fold_in(key, i), b): recomputed here by hand (padded batches draw a full
  batch's starts). One key per member for all its batches repeated one batch's starts."""
  n, batch_size, key = 400, 100, jax.random.key(2)
  split = Split(np.full((n, 1, 1, 1), 0.49, np.float32), np.zeros(n, np.int32))
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="worst_of", eps=0.5, attacks=dict(a=_ONE_STEP_PGD, b=_ONE_STEP_PGD))))
  result = evaluate(_zero_gradient_step, split, batch_size, _one_device_mesh(), 3, attack=worst,
                    key=key, keep_examples=True)
  fooled = np.zeros(n, bool)
  for i in range(2):
    rows = np.flatnonzero(~fooled)
    member_key = jax.random.fold_in(key, i)
    for b, start in enumerate(range(0, len(rows), batch_size)):
      chunk = rows[start:start + batch_size]
      fooled[chunk] = _pgd_start_fooled(jax.random.fold_in(member_key, b), batch_size)[:len(chunk)]
    if i == 0:
      after_a = 1 - fooled.mean()
  assert result["accuracy_after"]["a"] == pytest.approx(after_a)
  np.testing.assert_array_equal(result["examples"]["predictions"], fooled.astype(int))
  assert result["accuracy"] == pytest.approx(0.25, abs=0.075)


# --------------------------------------------------------------------------- devices

@pytest.mark.parametrize("fields", [f for f in _CONFIGS if f.get("norm", "linf") == "linf" and
                                    f["name"] in ("pgd", "worst_of", "square", "fab_t")],
                         ids=lambda f: f["name"])
def test_four_devices_give_the_examples_of_one(fields, tiny_batch_attacked):
  """Random starts and restarts (pgd), APGD-CE, -DLR and -T (worst_of), Square's windows and
  FAB-T's targets and random restarts on the batch of
  test_every_attack_stays_in_its_ball_and_the_image_box sharded over 4 devices give its examples
  on one device."""
  assert jax.device_count() == 4
  model, variables, images, labels, results = tiny_batch_attacked
  mesh = parallel.make_mesh()
  batch = parallel.global_batch(mesh, {"images": images, "labels": labels}, np.arange(16))
  x_adv = _jit_attack(_built(fields), model)(parallel.replicate(variables, mesh), batch["images"],
                                             batch["labels"], jax.random.key(2))
  assert x_adv.sharding.num_devices == 4
  one = results[_name(fields)]
  assert not np.allclose(one, images)
  np.testing.assert_allclose(np.asarray(x_adv), one, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- APGD against a reference

def _numpy_mlp_loss_and_grad(params, x, y):
  """Cross-entropy, its input gradient and whether the example is misclassified, for the
  1-hidden-layer MLP, by hand in float64."""
  w1, b1 = (np.asarray(params["dense1"][k], np.float64) for k in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["head"][k], np.float64) for k in ("kernel", "bias"))
  pre = x.reshape(1, -1) @ w1 + b1
  logits = np.maximum(pre, 0) @ w2 + b2
  logits -= logits.max()
  log_probs = logits - np.log(np.exp(logits).sum())
  dlogits = np.exp(log_probs)
  dlogits[0, y] -= 1
  grad = (((dlogits @ w2.T) * (pre > 0)) @ w1.T).reshape(x.shape)
  return -log_probs[0, y], grad, bool(np.argmax(logits[0]) != y)


def _reference_apgd(loss_and_grad, x, x0, eps, num_steps, rho=0.75):
  """Algorithm 1 of Croce and Hein (2020), L-inf, one example, written as a plain loop.

  Returns the reported point and how often the step size was halved. The reported point is a
  misclassified iterate if there was one (AutoAttack's x_best_adv; of several, here the one of
  highest loss), else the best point x_max: the strongest iterate in the order
  (misclassified, loss), compared as Python tuples.
  """
  project = lambda z: np.clip(np.clip(z, x - eps, x + eps), 0, 1)
  checkpoints, p_prev, p = [0], 0.0, 0.22
  while np.ceil(round(p * num_steps, 9)) <= num_steps:
    w = int(np.ceil(round(p * num_steps, 9)))
    if w > checkpoints[-1]:
      checkpoints.append(w)
    p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
  eta, halvings = 2 * eps, 0
  x_cur, x_prev = x0, x0
  f_cur, g, fooled = loss_and_grad(x0)
  x_max, f_max, g_max = x_cur, f_cur, g
  x_out, key_out = x0, (fooled, f_cur)
  increases, f_max_at_check, halved_at_check = 0, f_max, True  # AutoAttack's first-check rule
  for k in range(num_steps):
    alpha = 1.0 if k == 0 else 0.75
    z = project(x_cur + eta * np.sign(g))
    x_new = project(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
    f_new, g_new, fooled = loss_and_grad(x_new)
    if (fooled, f_new) > key_out:
      x_out, key_out = x_new, (fooled, f_new)
    increases += f_new > f_cur
    if f_new > f_max:
      x_max, f_max, g_max = x_new, f_new, g_new
    x_prev, x_cur, f_cur, g = x_cur, x_new, f_new, g_new
    if k + 1 in checkpoints:
      j = checkpoints.index(k + 1)
      halve = (increases < rho * (checkpoints[j] - checkpoints[j - 1])
               or (not halved_at_check and f_max_at_check >= f_max))
      if halve:
        eta, halvings = eta / 2, halvings + 1
        x_cur, f_cur, g = x_max, f_max, g_max
      increases, f_max_at_check, halved_at_check = 0, f_max, halve
  return x_out, halvings


def test_apgd_follows_the_published_algorithm():
  """APGD-CE on a small MLP equals a numpy loop transcription of the paper's Algorithm 1 from the
  same random start (the documented fold_in(key, 0) uniform draw in the eps-box).

  Both run in float64: in float32 a near-tie in a loss comparison or a tiny gradient entry can
  take the two programs down different (equally valid) paths within 20 steps.
  """
  model = _tiny_mlp()
  rng = np.random.default_rng(11)
  labels = rng.integers(0, 10, size=16)
  eps, num_steps = 0.1, 20
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: v.astype(np.float64), _init(model, (1, 8, 8, 1), seed=4))
    images = rng.uniform(size=(16, 8, 8, 1))
    key = jax.random.key(12)
    # The start drawn in the attack's program (compiled once with the attack's own draw).
    x_adv, starts = (np.asarray(a) for a in _jit_attack(lambda f, x, y, k: (
        attacks.apgd_ce(f, x, y, k, eps=eps, num_steps=num_steps),
        jnp.clip(x + jax.random.uniform(jax.random.fold_in(k, 0), x.shape, jnp.float64, -eps, eps),
                 0, 1)), model)(variables, images, labels, key))
  assert x_adv.dtype == np.float64
  total_halvings = 0
  for i in range(len(labels)):
    expected, halvings = _reference_apgd(
        lambda z: _numpy_mlp_loss_and_grad(variables["params"], z, labels[i]),
        images[i], starts[i], eps, num_steps)
    np.testing.assert_allclose(x_adv[i], expected, atol=1e-9, rtol=0, err_msg=f"example {i}")
    total_halvings += halvings
  assert total_halvings > 0  # the step-size rule was exercised


def test_apgd_counts_an_example_broken_by_any_iterate():
  """Robust accuracy under APGD counts an example as broken if any iterate misclassified it (as
  AutoAttack's x_best_adv), even when a later, correctly classified iterate has a higher loss.

  1-D input t, label 0, logits (0, 0.1 - 0.2 t, -3 + 2.99 t eight times): the loss increases with
  t, class 1 wins for t < 0.5 and class 0 for t > 0.5. From x = 0.4 with eps = 0.3 the iterates
  climb to 0.7 (correct, highest loss), so an example is broken exactly when its uniform start
  (the documented fold_in(key, 0) draw) lies below 0.5: probability 2/3."""
  logits_fn = lambda x: jnp.concatenate([0 * x, 0.1 - 0.2 * x] + [-3 + 2.99 * x] * 8, -1)
  grid = jnp.linspace(0, 1, 21)[:, None]
  losses = np.asarray(attack_steps.cross_entropy(logits_fn(grid), jnp.zeros(21, jnp.int32)))
  assert np.all(np.diff(losses) > 0)
  np.testing.assert_array_equal(np.argmax(logits_fn(grid), -1) == 0, np.asarray(grid[:, 0]) >= 0.5)

  n, eps, key = 300, 0.3, jax.random.key(0)
  images, labels = jnp.full((n, 1), 0.4), jnp.zeros(n, jnp.int32)
  x_adv, draws = jax.jit(lambda k: (  # the start drawn in the attack's program: compiled once
      attacks.apgd_ce(logits_fn, images, labels, k, eps=eps, num_steps=5),
      jax.random.uniform(jax.random.fold_in(k, 0), (n, 1), jnp.float32, -eps, eps)))(key)
  starts = np.clip(0.4 + np.asarray(draws), 0, 1)
  fooled = np.asarray(jnp.argmax(logits_fn(x_adv), -1) != labels)
  np.testing.assert_array_equal(fooled, starts[:, 0] < 0.5)
  assert abs(fooled.mean() - 2 / 3) < 0.1  # 300 draws: standard deviation 0.027


def test_an_example_misclassified_clean_counts_broken_under_every_attack():
  """The model of the test above gets x = 0.4 wrong; an attack's random start or climb reaches
  t > 0.5, where it is right. The evaluation keeps such an example's clean image (AutoAttack's
  rule), so robust accuracy never exceeds clean accuracy."""
  logits_fn = lambda x: jnp.concatenate([0 * x, 0.1 - 0.2 * x] + [-3 + 2.99 * x] * 8, -1)
  model = lambda x: logits_fn(x.reshape(len(x), 1))
  split = Split(np.full((40, 1, 1, 1), 0.4, np.float32), np.zeros(40, np.int32))
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  assert evaluate(model, split, 40, mesh, 10)["accuracy"] == 0.0
  for config in (dict(name="pgd", eps=0.3, step_size=0.1, num_steps=3), dict(name="apgd_ce", eps=0.3, num_steps=3),
                 dict(name="square", eps=0.3, num_queries=3)):
    attack = attacks.build_attack(ml_collections.ConfigDict(config))
    result = evaluate(model, split, 40, mesh, 10, attack=attack, key=jax.random.key(1), keep_examples=True)
    assert result["accuracy"] == 0.0, config["name"]
    np.testing.assert_array_equal(result["examples"]["images"], split.images)


def test_apgd_checkpoints_follow_the_paper_schedule():
  """w_j = ceil(p_j * N) for p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce and Hein)."""
  is_checkpoint, period = attacks._apgd_checkpoints(100)
  np.testing.assert_array_equal(np.flatnonzero(is_checkpoint) + 1, [22, 41, 57, 70, 80, 87, 93, 99])
  np.testing.assert_array_equal(period[is_checkpoint], [22, 19, 16, 13, 10, 7, 6, 6])
  # Short runs: p_j N rounds several p_j up to one step, which is one checkpoint, its period from
  # the checkpoint before (N = 5: ceil of 1.1, 2.05, 2.85, 3.5, 4, 4.35, 4.65, 4.95).
  for n, steps, periods in ((5, [2, 3, 4, 5], [2, 1, 1, 1]),
                            (10, [3, 5, 6, 7, 8, 9, 10], [3, 2, 1, 1, 1, 1, 1])):
    is_checkpoint, period = attacks._apgd_checkpoints(n)
    np.testing.assert_array_equal(np.flatnonzero(is_checkpoint) + 1, steps)
    np.testing.assert_array_equal(period[is_checkpoint], periods)


# --------------------------------------------------------------------------- a trained model

@pytest.fixture(scope="module")
def digits_model():
  """A 1-hidden-layer MLP trained full-batch with Adam on the digits train split (~1 s)."""
  data = load_digits()
  model = _tiny_mlp(width=32)
  params = _init(model, (1, 8, 8, 1))["params"]
  tx = optax.adam(1e-2)
  x, y = jnp.asarray(data.train.images), jnp.asarray(data.train.labels)

  @jax.jit
  def train(params):
    def step(_, carry):
      params, opt_state = carry
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, x, train=False), y).mean())(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, 60, step, (params, tx.init(params)))[0]

  variables = {"params": train(params)}
  return model, variables, jnp.asarray(data.test.images), jnp.asarray(data.test.labels)


def test_pgd_lowers_the_accuracy_of_a_trained_model(digits_model):
  model, variables, images, labels = digits_model
  clean = _accuracy(model, variables, images, labels)
  x_adv = _jit_attack(lambda f, x, y, k: attacks.pgd(f, x, y, k, eps=0.3, step_size=0.075,
                                                     num_steps=10), model)(
      variables, images, labels, jax.random.key(9))
  robust = _accuracy(model, variables, x_adv, labels)
  assert clean > 0.8
  assert robust <= clean and robust < clean - 0.5, (clean, robust)


def test_apgd_is_at_least_as_strong_as_pgd(digits_model):
  model, variables, images, labels = digits_model
  eps, steps, key = 0.1, 10, jax.random.key(10)
  # Both in one program: their random start from one key is compiled once.
  x_adv = _jit_attack(lambda f, x, y, k: {
      "pgd": attacks.pgd(f, x, y, k, eps=eps, step_size=eps / 4, num_steps=steps),
      "apgd_ce": attacks.apgd_ce(f, x, y, k, eps=eps, num_steps=steps)}, model)(
          variables, images, labels, key)
  accuracy = {name: _accuracy(model, variables, x, labels) for name, x in x_adv.items()}
  assert accuracy["pgd"] < _accuracy(model, variables, images, labels)  # eps is not trivial
  assert accuracy["apgd_ce"] <= accuracy["pgd"] + 0.02, accuracy


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("fields,field", [
    (dict(name="cw"), "config.name"),
    (dict(name="pgd", eps=0.0), "config.eps"),
    (dict(name="fgsm", eps=-0.1), "config.eps"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=0), "config.num_steps"),
    (dict(name="apgd_ce", eps=0.1, num_steps=0), "config.num_steps"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=5, norm="l3"), "config.norm"),
    (dict(name="rs_fgsm", eps=0.1, norm="l2"), "config.norm"),
    (dict(name="pgd", eps=0.1, num_steps=5), "config.step_size"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=5, restarts=0), "config.restarts"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=5, restarts=2, random_start=False),
     "config.restarts"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=5, unroll=0), "config.unroll"),
    (dict(name="apgd_t", eps=0.1, num_steps=5, restarts=2), "config.num_targets"),
    (dict(name="apgd_t", eps=0.1, num_steps=5, num_targets=0), "config.num_targets"),
    (dict(name="apgd_dlr", eps=0.1, num_steps=5, rho=1.5), "config.rho"),
    (dict(name="worst_of", eps=0.1), "config.attacks"),
    (dict(name="square", eps=0.1), "config.num_queries"),
    (dict(name="square", eps=0.1, num_queries=10, p_init=1.5), "config.p_init"),
    (dict(name="square", eps=0.1, num_queries=10, norm="l3"), "config.norm"),
    (dict(name="fab_t", eps=0.1), "config.num_steps"),
    (dict(name="fab_t", eps=0.1, num_steps=5, num_targets=0), "config.num_targets"),
    (dict(name="fab_t", eps=0.1, num_steps=5, restarts=0), "config.restarts"),
    (dict(name="fab_t", eps=0.1, num_steps=5, alpha_max=1.5), "config.alpha_max"),
    (dict(name="fab_t", eps=0.1, num_steps=5, eta=0.9), "config.eta"),
    (dict(name="fab_t", eps=0.1, num_steps=5, beta=1.0), "config.beta"),
    (dict(name="fab_t", eps=0.1, num_steps=5, norm="l3"), "config.norm"),
    (dict(name="worst_of", eps=0.1, attacks=dict(a=dict(name="pgd", eps=0.2, step_size=0.1,
                                                          num_steps=2))), "config.attacks.a.eps"),
    (dict(name="worst_of", eps=0.1, attacks=dict(a=dict(name="apgd_ce", num_steps=0))),
     "config.attacks.a.num_steps"),
    (dict(name="worst_of", eps=0.1, attacks=dict(a=dict(name="worst_of"))), "config.attacks.a.name"),
    (dict(name="pgd", eps=0.1, step_size=0.01, num_steps=5, restart=5), "config.restart is not a field"),
    (dict(name="fgsm", eps=float("inf")), "config.eps=inf must be a positive finite number"),  # NaN images
    (dict(name="pgd", eps=8, step_size=2, num_steps=10), "config.eps=8: an L-inf length of 1 or "
                                                        "more spans every"),
    (dict(name="pgd", eps=0.1, step_size=1.5, num_steps=10), "config.step_size=1.5: an L-inf length"),
    (dict(name="n_fgsm", eps=0.1, noise=2.0), "config.noise=2.0: an L-inf length"),
    (dict(name="fgsm", eps=0.1, step_size=0.05), "config.step_size=0.05: fgsm steps eps"),
    (dict(name="square", eps=0.1, num_queries=10, p_schedule="autoattack"), "config.p_schedule"),
    (dict(name="n_fgsm", eps=0.1, noise=float("inf")), "config.noise=inf"),
    (dict(name="worst_of", eps=0.1, attacks=dict(a=dict(name="square", num_queries=5, p_int=0.1))),
     "config.attacks.a.p_int is not a field"),
])
def test_build_attack_errors_name_the_field(fields, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    attacks.build_attack(ml_collections.ConfigDict(fields))


def test_l2_lengths_may_exceed_one_and_fgsm_keeps_the_step_of_a_renamed_pgd_config():
  attacks.build_attack(ml_collections.ConfigDict(dict(name="pgd", norm="l2", eps=3.0, step_size=1.5,
                                                      num_steps=5)))
  renamed = pgd_linf(0.1, num_steps=10)  # --config.train.attack.name=fgsm on a PGD config
  renamed.name = "fgsm"
  attacks.build_attack(renamed)
  renamed.step_size = 0.05  # then a step fgsm would ignore: refused
  with pytest.raises(ValueError, match="step_size=0.05: fgsm steps eps"):
    attacks.build_attack(renamed)


def test_build_attack_errors_use_the_given_prefix():
  with pytest.raises(ValueError, match=r"config\.attack\.eps"):
    attacks.build_attack(ml_collections.ConfigDict(dict(name="pgd", eps=0.0)), prefix="config.attack")


def test_pgd_default_step_size_follows_overridden_eps_and_num_steps(monkeypatch):
  """pgd_linf's default step, 2.5 * eps / num_steps, is the one the built attack runs with and the
  records hold after eps or num_steps is overridden (as --config.train.attack.eps=... sets it); it
  was computed once and went stale. A step size set explicitly stays."""
  from test_train import load_config  # pylint: disable=import-outside-toplevel

  used = []
  monkeypatch.setattr(attacks, "pgd", lambda *args, **kwargs: used.append(kwargs["step_size"]))
  run = lambda config: attacks.build_attack(config)(None, None, None, None)
  c = load_config("digits", "adversarial")
  attack = c.train.attack  # pgd_linf(0.1, num_steps=7)
  run(attack)
  attack.eps = 0.2
  run(attack)
  attack.num_steps = 4
  run(attack)
  assert used == pytest.approx([2.5 * 0.1 / 7, 2.5 * 0.2 / 7, 2.5 * 0.2 / 4])
  assert attack.to_dict()["step_size"] == pytest.approx(2.5 * 0.2 / 4)  # as evaluation records it
  assert c.eval_attacks.pgd.step_size == pytest.approx(2.5 * 0.1 / 20)  # other attacks untouched
  attack.step_size = 0.01
  attack.eps = 0.3
  run(attack)
  run(pgd_linf(0.1, num_steps=10, step_size=0.05))
  assert used[3:] == [0.01, 0.05]


def test_build_attack_passes_every_field_and_the_documented_defaults(monkeypatch):
  """Each field of a config reaches its attack, and an unset one takes its documented default
  (AutoAttack's: FAB-T alpha_max 0.1, eta 1.05, beta 0.9, 9 targets, 1 restart; APGD rho 0.75;
  Square p_init 0.8, with the authors' rescaled schedule); a worst_of's norm reaches its members
  (an L2 eps of 3 would be refused as an L-inf length)."""
  calls = []
  for name in ("fab_t", "apgd", "apgd_t", "square", "pgd"):
    monkeypatch.setattr(attacks, name, lambda *args, _name=name, **kwargs: calls.append((_name, kwargs)))
  run = lambda **fields: attacks.build_attack(ml_collections.ConfigDict(fields))(None, None, None, None)
  run(name="fab_t", eps=0.1, num_steps=3)
  run(name="fab_t", eps=0.5, norm="l2", num_steps=3, num_targets=2, restarts=3, alpha_max=0.3,
      eta=1.2, beta=0.5)
  run(name="apgd_ce", eps=0.1, num_steps=3)
  run(name="apgd_dlr", eps=0.1, num_steps=3, rho=0.6, restarts=2)
  run(name="apgd_t", eps=0.1, num_steps=3)
  run(name="apgd_t", eps=0.1, num_steps=3, rho=0.6, num_targets=4)
  run(name="square", eps=0.1, num_queries=7)
  run(name="square", eps=0.5, norm="l2", num_queries=7, p_init=0.3, p_schedule="fixed", restarts=2)
  run(name="square", eps=0.1, num_queries=7, p_init=1.0)  # a first square may cover the image
  worst = attacks.build_attack(ml_collections.ConfigDict(dict(
      name="worst_of", norm="l2", eps=3.0,
      attacks=dict(p=dict(name="pgd", step_size=0.5, num_steps=2)))))
  worst.members[0](None, None, None, None)
  assert calls == [
      ("fab_t", dict(eps=0.1, num_steps=3, num_targets=9, restarts=1, alpha_max=0.1, eta=1.05,
                     beta=0.9, norm="linf")),
      ("fab_t", dict(eps=0.5, num_steps=3, num_targets=2, restarts=3, alpha_max=0.3, eta=1.2,
                     beta=0.5, norm="l2")),
      ("apgd", dict(eps=0.1, num_steps=3, norm="linf", restarts=1, rho=0.75, loss="ce")),
      ("apgd", dict(eps=0.1, num_steps=3, norm="linf", restarts=2, rho=0.6, loss="dlr")),
      ("apgd_t", dict(eps=0.1, num_steps=3, norm="linf", num_targets=9, rho=0.75)),
      ("apgd_t", dict(eps=0.1, num_steps=3, norm="linf", num_targets=4, rho=0.6)),
      ("square", dict(eps=0.1, num_queries=7, p_init=0.8, restarts=1, norm="linf",
                      schedule="rescaled")),
      ("square", dict(eps=0.5, num_queries=7, p_init=0.3, restarts=2, norm="l2", schedule="fixed")),
      ("square", dict(eps=0.1, num_queries=7, p_init=1.0, restarts=1, norm="linf",
                      schedule="rescaled")),
      ("pgd", dict(eps=3.0, step_size=0.5, num_steps=2, norm="l2", random_start=True, restarts=1,
                   unroll=1)),
  ]


def test_more_targets_than_the_dataset_has_other_classes_are_refused_before_compute():
  """num_targets of apgd_t and fab_t (also inside worst_of) against the dataset's classes, where
  the job's checks build its attacks, not when an attack is first traced (after an epoch)."""
  from ntk_scale.train.experiment import check_common_config  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel

  targets = lambda name, n: ml_collections.ConfigDict(dict(name=name, eps=0.1, num_steps=2, num_targets=n))
  for name in ("apgd_t", "fab_t"):
    attacks.build_attack(targets(name, 4), num_classes=5)
    with pytest.raises(ValueError, match=r"config\.num_targets=5 must be at most 4"):
      attacks.build_attack(targets(name, 5), num_classes=5)
  c = load_config("digits", "smoke")
  c.eval_attacks.aa = ml_collections.ConfigDict(dict(name="worst_of", eps=0.1, attacks=dict(
      apgd_t=dict(name="apgd_t", num_steps=2, num_targets=10))))
  with pytest.raises(ValueError, match=r"config\.eval_attacks\.aa\.attacks\.apgd_t\.num_targets=10 "
                                       r"must be at most 9"):
    check_common_config(c, 4)


@pytest.mark.parametrize("config", ["digits", "cifar10_resnet18"])
@pytest.mark.parametrize("variant,norm", [("autoattack", "linf"), ("autoattack_l2", "l2")])
def test_the_autoattack_variant_builds_apgd_ce_apgd_t_fab_t_and_square(config, variant, norm):
  """AutoAttack's standard version, L-inf or L2; FAB-T takes as many steps and targets as the APGD
  attacks."""
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  c = load_config(config, f"adversarial,{variant}")
  built = attacks.build_attacks(c.eval_attacks, "config.eval_attacks")
  assert set(built) == {"pgd", "apgd", variant}
  assert c.eval_attacks[variant].norm == norm
  members = c.eval_attacks[variant].attacks
  assert sorted(m.name for m in members.values()) == ["apgd_ce", "apgd_t", "fab_t", "square"]
  assert members.square.num_queries == (1000 if config == "digits" else 5000)
  assert members.fab_t.num_steps == members.apgd_t.num_steps == (20 if config == "digits" else 100)
  assert members.fab_t.num_targets == members.apgd_t.num_targets == 9
