"""Learning-rate schedules and optimizers against hand-derived values."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale.base_config import base_config
from ntk_scale.config_numbers import is_finite_number, is_whole_number
from ntk_scale.train.optimizer import build_optimizer, build_schedule, check_optimizer_config, check_warmup


def _opt(**fields):
  opt = base_config().optimizer
  for k, v in fields.items():
    opt[k] = v
  return opt


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


# --------------------------------------------------------------------------- schedules

def test_constant_schedule():
  schedule = build_schedule(_opt(learning_rate=0.05, schedule="constant"), 10, 1000)
  np.testing.assert_allclose(_values(schedule, [0, 1, 500, 999, 5000]), 0.05, rtol=1e-6)


def test_piecewise_schedule_loo_et_al():
  # Loo et al.: lr 0.1, divided by 10 after epochs 100 and 150; 10 steps per epoch here.
  opt = _opt(learning_rate=0.1, schedule="piecewise", decay_epochs=(100, 150), decay_factor=0.1)
  schedule = build_schedule(opt, steps_per_epoch=10, total_steps=2000)
  steps = [0, 999, 1000, 1499, 1500, 1999]
  np.testing.assert_allclose(_values(schedule, steps), [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
                             rtol=1e-5)


def test_piecewise_schedule_fractional_epochs_and_factor():
  # Boundaries at round(2.5 * 4) = 10 steps; factor 0.5.
  opt = _opt(learning_rate=1.0, schedule="piecewise", decay_epochs=(2.5,), decay_factor=0.5)
  schedule = build_schedule(opt, steps_per_epoch=4, total_steps=40)
  np.testing.assert_allclose(_values(schedule, [0, 9, 10, 39]), [1.0, 1.0, 0.5, 0.5], rtol=1e-6)


def test_piecewise_schedule_decays_once_per_epoch_even_when_two_round_to_one_step():
  # Epochs 1.0 and 1.02 at 10 steps per epoch both round to step 10: "x decay_factor after each"
  # gives 1 -> 0.1 -> 0.01 there, i.e. 0.01 from step 10 on (a dict keyed by step kept only 0.1).
  opt = _opt(learning_rate=1.0, schedule="piecewise", decay_epochs=(1.0, 1.02, 3.0), decay_factor=0.1)
  schedule = build_schedule(opt, steps_per_epoch=10, total_steps=40)
  np.testing.assert_allclose(_values(schedule, [9, 10, 29, 30, 39]), [1.0, 0.01, 0.01, 0.001, 0.001],
                             rtol=1e-5)


def test_cosine_schedule_with_warmup():
  lr, spe, total = 0.2, 10, 100
  opt = _opt(learning_rate=lr, schedule="cosine", warmup_epochs=2.0)
  schedule = build_schedule(opt, steps_per_epoch=spe, total_steps=total)
  warmup = 20
  # Linear warm-up from 0.
  np.testing.assert_allclose(_values(schedule, [0, 5, 10]), [0.0, lr * 5 / 20, lr / 2], atol=1e-7)
  # lr right after warm-up, then lr/2 * (1 + cos(pi * t / (total - warmup))).
  for step in (20, 40, 60, 80, 99):
    t = (step - warmup) / (total - warmup)
    np.testing.assert_allclose(float(schedule(step)), lr / 2 * (1 + math.cos(math.pi * t)),
                               rtol=1e-5, atol=1e-7)
  assert float(schedule(warmup)) == pytest.approx(lr, rel=1e-6)
  assert float(schedule(60)) == pytest.approx(lr / 2, rel=1e-5)
  assert abs(float(schedule(total))) < 1e-7
  vals = _values(schedule, range(total + 1))
  assert np.argmax(vals) == warmup
  assert np.all(np.diff(vals[warmup:]) <= 1e-9)  # non-increasing after warm-up


def test_cosine_schedule_without_warmup_starts_at_lr():
  schedule = build_schedule(_opt(learning_rate=0.1, schedule="cosine", warmup_epochs=0.0), 10, 50)
  assert float(schedule(0)) == pytest.approx(0.1, rel=1e-6)
  assert float(schedule(25)) == pytest.approx(0.05, rel=1e-5)
  assert abs(float(schedule(50))) < 1e-7


def test_cyclic_schedule():
  lr, total = 0.2, 100
  opt = _opt(learning_rate=lr, schedule="cyclic", peak_fraction=0.4)
  schedule = build_schedule(opt, steps_per_epoch=10, total_steps=total)
  vals = _values(schedule, range(total + 1))
  assert vals[0] == pytest.approx(0.0, abs=1e-8)
  assert vals[total] == pytest.approx(0.0, abs=1e-7)
  assert np.argmax(vals) == 40 and vals[40] == pytest.approx(lr, rel=1e-6)
  # Linear up to the peak at 40, linear down over the remaining 60 steps.
  np.testing.assert_allclose(vals[:41], lr * np.arange(41) / 40, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(vals[40:], lr * (1 - np.arange(61) / 60), rtol=1e-5, atol=1e-7)


def test_cyclic_schedule_may_peak_at_the_last_step():
  """peak_fraction 1, the upper end of (0, 1]: a linear rise over the whole run."""
  lr, total = 0.2, 50
  opt = _opt(learning_rate=lr, schedule="cyclic", peak_fraction=1.0)
  check_optimizer_config(opt)
  vals = _values(build_schedule(opt, steps_per_epoch=10, total_steps=total), range(total + 1))
  np.testing.assert_allclose(vals, lr * np.arange(total + 1) / total, rtol=1e-5, atol=1e-7)


def test_piecewise_decay_at_epoch_0_applies_from_the_first_step():
  """A decay epoch of 0 (the lower end of >= 0) starts the run at learning_rate * decay_factor."""
  opt = _opt(learning_rate=0.1, schedule="piecewise", decay_epochs=(0.0, 2.0), decay_factor=0.1)
  check_optimizer_config(opt)
  schedule = build_schedule(opt, steps_per_epoch=10, total_steps=40)
  np.testing.assert_allclose(_values(schedule, [0, 1, 19, 20, 39]), [0.01, 0.01, 0.01, 0.001, 0.001],
                             rtol=1e-5)


def test_cosine_warmup_of_one_step():
  """0.1 epoch of 10 steps: a warm-up of 1 step, at 0 on step 0 and at lr on step 1, then
  lr / 2 (1 + cos(pi (t - 1) / 10)) to step 11."""
  lr = 0.2
  schedule = build_schedule(_opt(learning_rate=lr, schedule="cosine", warmup_epochs=0.1), 10, 11)
  t = np.array([0, 1, 3, 6, 9, 11])
  expected = [0.0] + [lr / 2 * (1 + math.cos(math.pi * (s - 1) / 10)) for s in t[1:]]
  np.testing.assert_allclose(_values(schedule, t), expected, rtol=1e-5, atol=1e-7)


def test_schedules_at_fractional_epochs_and_the_last_step():
  # 2.5 epochs of 22 steps: 55 steps, the last is step 54. Cyclic peaks at round(0.4 * 55) = 22 and
  # falls linearly over the 33 steps after: at step 54, lr * (1 - 32 / 33) = lr / 33.
  lr, total = 0.2, 55
  cyclic = build_schedule(_opt(learning_rate=lr, schedule="cyclic", peak_fraction=0.4), 22, total)
  np.testing.assert_allclose(_values(cyclic, [11, 22, 54]), [lr / 2, lr, lr / 33], rtol=1e-5)
  # Cosine after 0.75 epoch of warm-up: round(16.5) = 16 steps (Python rounds half to even, as
  # the checkpoint schedule does), then lr/2 (1 + cos(pi (t - 16) / 39)).
  cosine = build_schedule(_opt(learning_rate=lr, schedule="cosine", warmup_epochs=0.75), 22, total)
  t = np.array([8, 16, 35, 54])
  expected = np.where(t < 16, lr * t / 16, lr / 2 * (1 + np.cos(np.pi * (t - 16) / 39)))
  np.testing.assert_allclose(_values(cosine, t), expected, rtol=1e-5, atol=1e-8)
  # Piecewise at a fractional epoch boundary: 1.3 * 22 = 28.6 -> step 29.
  piecewise = build_schedule(_opt(learning_rate=lr, schedule="piecewise", decay_epochs=(1.3,)), 22, total)
  np.testing.assert_allclose(_values(piecewise, [28, 29, 54]), [lr, lr / 10, lr / 10], rtol=1e-5)


# --------------------------------------------------------------------------- optimizers

def _run(opt, w0, grad_fn, num_steps, steps_per_epoch=10, total_steps=100):
  tx, _ = build_optimizer(opt, steps_per_epoch, total_steps)
  w = jnp.asarray(w0, jnp.float32)
  state = tx.init(w)
  ws = []
  for _ in range(num_steps):
    updates, state = tx.update(grad_fn(w), state, w)
    w = w + updates
    ws.append(float(w))
  return ws


def _torch_sgd(w, grad_fn, lrs, momentum, weight_decay, nesterov=False):
  """torch.optim.SGD's update rule, written out (dampening 0)."""
  buf = None
  ws = []
  for lr in lrs:
    g = grad_fn(w) + weight_decay * w
    buf = g if buf is None else momentum * buf + g
    d = g + momentum * buf if nesterov else buf
    w = w - lr * d
    ws.append(w)
  return ws


# Scalar quadratic f(w) = a/2 (w - b)^2, gradient a (w - b).
A, B = 3.0, 0.5
grad = lambda w: A * (w - B)


def test_sgd_momentum_weight_decay_matches_pytorch_by_hand():
  opt = _opt(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.01, schedule="constant")
  ws = _run(opt, 2.0, grad, 2)
  # Hand computation, w0 = 2:
  # step 1: g' = 3 * 1.5 + 0.01 * 2 = 4.52; buf = 4.52; w1 = 2 - 0.452 = 1.548
  # step 2: g' = 3 * 1.048 + 0.01 * 1.548 = 3.15948; buf = 0.9 * 4.52 + 3.15948 = 7.22748;
  #         w2 = 1.548 - 0.722748 = 0.825252
  np.testing.assert_allclose(ws, [1.548, 0.825252], rtol=1e-6)
  np.testing.assert_allclose(ws, _torch_sgd(2.0, grad, [0.1, 0.1], 0.9, 0.01), rtol=1e-6)


def test_sgd_with_piecewise_schedule_uses_lr_of_each_step():
  # Boundary after 1 step (0.1 epoch x 10 steps): lr 0.1 for update 1, 0.01 for updates 2 and 3.
  opt = _opt(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.01, schedule="piecewise",
             decay_epochs=(0.1,), decay_factor=0.1)
  ws = _run(opt, 2.0, grad, 3)
  np.testing.assert_allclose(ws, _torch_sgd(2.0, grad, [0.1, 0.01, 0.01], 0.9, 0.01), rtol=1e-5)


def test_sgd_nesterov_matches_pytorch():
  opt = _opt(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
  ws = _run(opt, 2.0, grad, 3)
  np.testing.assert_allclose(ws, _torch_sgd(2.0, grad, [0.1] * 3, 0.9, 0.01, nesterov=True),
                             rtol=1e-5)
  # Step 1 by hand: g' = 4.52, buf = 4.52, d = 4.52 + 0.9 * 4.52 = 8.588, w1 = 2 - 0.8588.
  assert ws[0] == pytest.approx(1.1412, rel=1e-6)


def test_plain_sgd_without_momentum_or_weight_decay():
  opt = _opt(name="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0)
  ws = _run(opt, 2.0, grad, 2)
  # w1 = 2 - 0.1 * 4.5 = 1.55; w2 = 1.55 - 0.1 * 3.15 = 1.235
  np.testing.assert_allclose(ws, [1.55, 1.235], rtol=1e-6)


def test_weight_decay_reaches_every_parameter_batch_norm_and_biases_included():
  # "L2 weight decay added to the gradient as in PyTorch's SGD": every parameter the optimizer is
  # given (PyTorch's default param group), so with zero gradients and no momentum each one moves
  # by -lr * wd * w.
  opt = _opt(name="sgd", learning_rate=0.5, momentum=0.0, weight_decay=0.1)
  params = {"conv": {"kernel": jnp.array([2.0, -4.0]), "bias": jnp.array([1.0])},
            "batch_norm": {"scale": jnp.array([3.0]), "bias": jnp.array([-2.0])}}
  tx, _ = build_optimizer(opt, 10, 100)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  expected = {"conv": {"kernel": np.array([-0.1, 0.2]), "bias": np.array([-0.05])},
              "batch_norm": {"scale": np.array([-0.15]), "bias": np.array([0.1])}}
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_adam_first_step_and_l2_weight_decay():
  # Adam's first step is lr * g / (|g| + eps) (bias-corrected moments); the L2 term is added to g.
  opt = _opt(name="adam", learning_rate=0.01, weight_decay=0.0)
  assert _run(opt, 2.0, lambda w: jnp.float32(-4.0) + 0 * w, 1)[0] == pytest.approx(2.01, rel=1e-6)
  # L2 weight decay 10 at w = 2 turns g = -4 into g' = -4 + 10 * 2 = 16 > 0: the step reverses.
  opt = _opt(name="adam", learning_rate=0.01, weight_decay=10.0)
  flipped = _run(opt, 2.0, lambda w: jnp.float32(-4.0) + 0 * w, 1)[0]
  assert flipped == pytest.approx(1.99, rel=1e-6)


def test_adam_reads_momentum_as_its_b1():
  """Adam ignored config.optimizer.momentum: it is Adam's first-moment decay b1 (0.9 by default, as
  optax's and PyTorch's). By hand, with b2 = 0.999 and eps = 1e-8, from g1 = 4.5 then g2 below."""
  opt = _opt(name="adam", learning_rate=0.1, momentum=0.5, weight_decay=0.0, schedule="constant")
  ws = _run(opt, 2.0, grad, 2)
  b1, b2, g1 = 0.5, 0.999, grad(2.0)
  w1 = 2.0 - 0.1 * np.sign(g1)  # the first step is lr * g / |g| whatever b1
  g2 = float(grad(w1))
  m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1 ** 2)
  v = (b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2) / (1 - b2 ** 2)
  np.testing.assert_allclose(ws, [w1, w1 - 0.1 * m / (np.sqrt(v) + 1e-8)], rtol=1e-6)
  assert _run(_opt(name="adam", learning_rate=0.1, weight_decay=0.0, schedule="constant"),
              2.0, grad, 2)[1] != pytest.approx(ws[1], rel=1e-5)  # the default b1 0.9 differs


def test_adam_refuses_nesterov():
  with pytest.raises(ValueError, match=r"config\.optimizer\.nesterov=True is SGD's; "
                                       r"config\.optimizer\.name='adam' has no Nesterov variant"):
    check_optimizer_config(_opt(name="adam", nesterov=True))


# --------------------------------------------------------------------------- config checks

@pytest.mark.parametrize("field,value,pattern", [
    ("name", "rmsprop", r"config\.optimizer\.name"),
    ("schedule", "linear", r"config\.optimizer\.schedule"),
    ("learning_rate", 0.0, r"config\.optimizer\.learning_rate"),
    ("learning_rate", -0.1, r"config\.optimizer\.learning_rate"),
    # Each of these ran: cosine with warm-up -1 epoch (10 steps) started at 0.098, not 0.1; cyclic
    # peaking at 1.5 x the run ended at 0.066, its peak never reached.
    ("warmup_epochs", -1.0, r"config\.optimizer\.warmup_epochs=-1\.0 must be a finite number >= 0"),
    ("peak_fraction", 1.5, r"config\.optimizer\.peak_fraction=1\.5 must lie in \(0, 1\]"),
    ("peak_fraction", 0.0, r"config\.optimizer\.peak_fraction=0\.0 must lie in \(0, 1\]"),
    ("decay_epochs", (-1.0,), r"config\.optimizer\.decay_epochs=\(-1\.0,\) must be finite epochs >= 0"),
    ("decay_factor", 0.0, r"config\.optimizer\.decay_factor=0\.0 must be a positive finite number"),
    # Each of these passed the checks: a NaN or inf learning rate reached training, an
    # infinite decay epoch or warm-up raised a bare OverflowError in the schedule, a negative
    # momentum or weight decay trained without error.
    ("learning_rate", float("nan"), r"config\.optimizer\.learning_rate=nan must be a positive finite"),
    ("learning_rate", float("inf"), r"config\.optimizer\.learning_rate=inf must be a positive finite"),
    ("decay_epochs", (float("inf"),), r"config\.optimizer\.decay_epochs=\(inf,\) must be finite"),
    ("warmup_epochs", float("inf"), r"config\.optimizer\.warmup_epochs=inf must be a finite"),
    ("momentum", -0.5, r"config\.optimizer\.momentum=-0\.5 must lie in \[0, 1\)"),
    ("momentum", float("nan"), r"config\.optimizer\.momentum=nan must lie in \[0, 1\)"),
    ("weight_decay", -1e-4, r"config\.optimizer\.weight_decay=-0\.0001 must be a finite number >= 0"),
    ("weight_decay", float("inf"), r"config\.optimizer\.weight_decay=inf must be a finite number"),
    # Momentum 1 never forgets a gradient: SGD's velocity (and Adam's b1 average) stops decaying.
    ("momentum", 1.0, r"config\.optimizer\.momentum=1\.0 must lie in \[0, 1\)"),
])
def test_check_optimizer_config_names_the_bad_field(field, value, pattern):
  schedule = {"warmup_epochs": "cosine", "peak_fraction": "cyclic", "decay_epochs": "piecewise",
              "decay_factor": "piecewise"}.get(field)
  opt = _opt(**{field: value}, **({"schedule": schedule} if schedule and field != "schedule" else {}))
  with pytest.raises(ValueError, match=pattern) as info:
    check_optimizer_config(opt)
  assert str(value) in str(info.value)
  with pytest.raises(ValueError, match=pattern):
    build_optimizer(opt, 10, 100)


# 10 steps per epoch, a run of 10 steps: a warm-up of round(0.95 * 10) = 10 steps (half to even)
# never peaked nor decayed, as one past the run's end; 9 steps peak once, at the last.
@pytest.mark.parametrize("warmup_epochs, steps", [(5.0, 50), (1.0, 10), (0.95, 10)])
def test_cosine_warmup_as_long_as_the_run_is_refused(warmup_epochs, steps):
  opt = _opt(schedule="cosine", warmup_epochs=warmup_epochs)
  with pytest.raises(ValueError, match=rf"config\.phase2\.optimizer\.warmup_epochs={warmup_epochs} is "
                                       rf"{steps} steps, not fewer than the 10 steps of the run"):
    build_optimizer(opt, 10, 10, prefix="config.phase2.optimizer")
  with pytest.raises(ValueError, match=rf"config\.optimizer\.warmup_epochs={warmup_epochs}"):
    check_warmup(opt, 10, 10)
  check_warmup(_opt(schedule="cosine", warmup_epochs=0.9), 10, 10)
  check_warmup(_opt(schedule="cyclic", warmup_epochs=warmup_epochs), 10, 10)  # cosine's field only


def test_check_optimizer_config_accepts_every_valid_combination():
  for name in ("sgd", "adam"):
    for schedule in ("constant", "piecewise", "cosine", "cyclic"):
      check_optimizer_config(_opt(name=name, schedule=schedule))


def test_numpy_floats_are_numbers_and_their_nan_is_not_finite():
  """A config built from a dict (a sweep's values computed with numpy) keeps np.float32 values:
  numbers like any other, and a numpy NaN or infinity is refused like Python's."""
  assert is_finite_number(np.float32(0.1)) and is_finite_number(np.float16(2))
  assert not is_finite_number(np.float32("nan")) and not is_finite_number(np.float32("inf"))
  assert not is_finite_number(np.bool_(True)) and not is_finite_number(True)
  fields = {"name": "sgd", "schedule": "cosine", "momentum": np.float32(0.9),
            "weight_decay": np.float32(5e-4), "warmup_epochs": np.float32(1.0)}
  check_optimizer_config(ml_collections.ConfigDict({**fields, "learning_rate": np.float32(0.1)}))
  with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rate=nan must be a positive"):
    check_optimizer_config(ml_collections.ConfigDict({**fields, "learning_rate": np.float32("nan")}))


def test_numpy_integers_are_whole_and_finite_numbers_and_bools_are_neither():
  """A sweep's values computed with numpy keep np.int64 / np.int32: whole numbers (at least
  `least`, when given; any sign without it, each field's check naming its own bounds) and finite
  numbers like Python's ints. A bool, Python's or numpy's, is neither; a float is not whole."""
  for value in (np.int64(3), np.int32(3), 3):
    assert is_whole_number(value) and is_whole_number(value, 3) and not is_whole_number(value, 4)
    assert is_finite_number(value)
  assert is_whole_number(-3) and is_whole_number(np.int64(-3)) and not is_whole_number(-3, 0)
  for value in (True, np.bool_(True), 3.0, np.float32(3), "3", None):
    assert not is_whole_number(value), value
  assert not is_finite_number(np.bool_(False)) and not is_finite_number("3")


def test_two_updates_a_batch_take_the_learning_rate_of_their_batch_step():
  """Loo et al.'s benign-then-adversarial updates: two optimizer updates a batch, the schedule on
  batch steps (decay after batch step 1 of 10 an epoch): updates 1-2 at 0.1, 3-4 at 0.01. On the
  update count it decayed after update 1."""
  opt = _opt(name="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.0, schedule="piecewise",
             decay_epochs=(0.1,), decay_factor=0.1)
  tx, _ = build_optimizer(opt, 10, 100, batch_step_of_update=lambda count: count // 2)
  w, lrs = jnp.asarray(2.0, jnp.float32), []
  state = tx.init(w)
  for _ in range(4):
    updates, state = tx.update(jnp.asarray(1.0, jnp.float32), state, w)  # gradient 1: update = -lr
    lrs.append(-float(updates))
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01], rtol=1e-6)
