"""The robust dataset of Tsilivis, Su and Kempe (ntk_scale/robust_dataset.py) on a tiny problem:
the optimised images respect their bound and the image range, and they lower the adversarial
objective they optimise, re-attacked from scratch against the refitted predictor, whether the
targets are the originals of the optimised images or held-out training images disjoint from them."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntk_scale.attacks import build_attack
from ntk_scale.base_config import apgd_linf, pgd_linf
from ntk_scale.preemption import Preempted
from ntk_scale.robust_dataset import (adversarial_objective, attack_batch_size, check_robust_data_config,
                                      num_holdout, optimise_dataset, outer_loss, split_targets)

from conftest import notices_from

REGRESSION = ml_collections.ConfigDict(dict(regularizer=1e-3, solver="cholesky"))


def _rbf(x1, x2):
  a, b = x1.reshape(len(x1), -1), x2.reshape(len(x2), -1)
  squared = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a @ b.T
  return jnp.exp(-squared / a.shape[1])


def _section(**overrides) -> ml_collections.ConfigDict:
  attack = ml_collections.ConfigDict(dict(name="pgd", norm="linf", eps=0.1, num_steps=3, step_size=0.05,
                                          restarts=1, random_start=True))
  section = ml_collections.ConfigDict(dict(num_steps=15, learning_rate=0.02, target_batch_size=24,
                                           loss="cross_entropy", data_eps=None, attack=attack))
  section.update(overrides)
  return section


def _full_section(**overrides) -> ml_collections.ConfigDict:
  """Every field check_robust_data_config reads."""
  fields = dict(target_holdout=0.0, network_width=None, checkpoint_every=5,
                eval_attacks=ml_collections.ConfigDict({"pgd": pgd_linf(0.1, 2), "apgd": apgd_linf(0.1, 2)}))
  return _section(**{**fields, **overrides})


def _problem(n=24, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n, 3, 3, 1)), np.arange(n) % 4


@pytest.mark.parametrize("loss,data_eps", [("cross_entropy", 0.05), ("mse", None)])
def test_optimised_set_stays_in_bounds_and_lowers_the_adversarial_objective(loss, data_eps):
  with jax.enable_x64(True):
    x, y = _problem()
    section = _section(loss=loss, data_eps=data_eps)
    robust, record = optimise_dataset(section, _rbf, x, y, 4, REGRESSION, seed=0)
    assert robust.shape == x.shape and len(record["objective"]) == 15
    assert robust.min() >= 0.0 and robust.max() <= 1.0
    change = np.max(np.abs(robust - x))
    assert change == pytest.approx(record["max_pixel_change"]) and change > 0
    if data_eps is not None:
      assert change <= data_eps + 1e-12
    attack = build_attack(section.attack)
    compiled = jax.jit(lambda support: adversarial_objective(  # one program (op by op: seconds)
        _rbf, support, jnp.asarray(y), jnp.asarray(x), jnp.asarray(y), jax.random.key(7),
        attack=attack, num_classes=4, regularizer=1e-3, solver="cholesky", loss=loss))
    objective = lambda support: float(compiled(jnp.asarray(support)))
    before, after = objective(x), objective(robust)
    assert after < 0.9 * before, (before, after)


def test_outer_losses_are_hand_computable():
  with jax.enable_x64(True):
    logits = jnp.asarray([[0.75, -0.25], [0.0, 0.0]], jnp.float64)
    labels = jnp.asarray([0, 1])
    # targets one-hot - 1/2: [0.5, -0.5] and [-0.5, 0.5]; squared errors 0.125 and 0.5, halved.
    assert float(outer_loss(logits, labels, "mse")) == pytest.approx((0.125 + 0.5) / 4)
    expected_ce = (np.log(1 + np.exp(-1.0)) + np.log(2.0)) / 2
    assert float(outer_loss(logits, labels, "cross_entropy")) == pytest.approx(expected_ce)


def test_held_out_targets_are_disjoint_from_the_optimised_set_and_their_objective_falls():
  with jax.enable_x64(True):
    x, y = _problem(n=40)
    optimised, targets = split_targets(0.4, len(x), seed=3)
    assert len(targets) == 16 and len(optimised) == 24
    assert not set(optimised) & set(targets) and set(optimised) | set(targets) == set(range(40))
    section = _section(target_batch_size=16)
    robust, record = optimise_dataset(section, _rbf, x[optimised], y[optimised], 4, REGRESSION, seed=0,
                                      targets=(x[targets], y[targets]))
    assert robust.shape == x[optimised].shape
    assert record["num_optimised"] == 24 and record["num_targets"] == 16
    attack = build_attack(section.attack)
    compiled = jax.jit(lambda support: adversarial_objective(  # one program (op by op: seconds)
        _rbf, support, jnp.asarray(y[optimised]), jnp.asarray(x[targets]),
        jnp.asarray(y[targets]), jax.random.key(7), attack=attack, num_classes=4, regularizer=1e-3,
        solver="cholesky", loss="cross_entropy"))
    objective = lambda support: float(compiled(jnp.asarray(support)))
    before, after = objective(x[optimised]), objective(robust)
    assert after < 0.9 * before, (before, after)


def test_no_holdout_attacks_the_rows_of_the_optimised_images():
  optimised, targets = split_targets(0.0, 10, seed=0)
  np.testing.assert_array_equal(optimised, np.arange(10))
  np.testing.assert_array_equal(targets, np.arange(10))
  assert num_holdout(3, 10) == 3 and num_holdout(3.0, 10) == 3 and num_holdout(0.25, 10) == 2
  assert num_holdout(0.35, 10) == 4 and num_holdout(0.25, 30) == 8  # rounded, not cut: 3.5, 7.5
  assert num_holdout(9, 10) == 9  # one image left to optimise
  with pytest.raises(ValueError, match="target_holdout=10 sets aside 10 of the 10 training images"):
    num_holdout(10, 10)


def test_without_holdout_the_attacked_targets_are_the_unchanged_originals(monkeypatch):
  """The inner PGD attacks the original images of the optimised rows at every step, not the moving
  optimised images (the support the predictor is fitted on)."""
  from ntk_scale import robust_dataset
  attacked, whole = [], robust_dataset.objective_and_gradient

  def recording(kernel_fn, support, support_labels, targets, *args, **kwargs):
    attacked.append(np.asarray(targets))
    return whole(kernel_fn, support, support_labels, targets, *args, **kwargs)

  monkeypatch.setattr(robust_dataset, "objective_and_gradient", recording)
  x, y = _problem(n=12)
  with jax.enable_x64(True):
    robust, _ = optimise_dataset(_section(num_steps=3, target_batch_size=5), _rbf, x, y, 4, REGRESSION,
                                 seed=0)
  assert len(attacked) == 3 and np.max(np.abs(robust - x)) > 0.01
  originals = {row.tobytes() for row in x}
  assert all(row.tobytes() in originals for images in attacked for row in images)


def test_each_step_attacks_its_own_target_batch_with_its_own_key(monkeypatch):
  """Step i draws its target rows and attack key from fold_in(key(seed), i) (split: rows, attack),
  recomputed here by hand: one key for every step attacked the same targets from the same starts
  all run long."""
  from ntk_scale import robust_dataset
  calls = []

  def recording(kernel_fn, support, support_labels, targets, target_labels, key, **kwargs):
    calls.append((np.asarray(targets), np.asarray(target_labels), np.asarray(jax.random.key_data(key))))
    return 0.0, np.zeros_like(support)

  monkeypatch.setattr(robust_dataset, "objective_and_gradient", recording)
  x, y = _problem(n=12)
  optimise_dataset(_section(num_steps=4, target_batch_size=5), _rbf, x, y, 4, REGRESSION, seed=6)
  assert len(calls) == 4
  for i, (targets, target_labels, attack_key) in enumerate(calls):
    batch_key, expected_key = jax.random.split(jax.random.fold_in(jax.random.key(6), i))
    rows = np.asarray(jax.random.choice(batch_key, 12, (5,), replace=False))
    np.testing.assert_array_equal(targets, x[rows])
    np.testing.assert_array_equal(target_labels, y[rows])
    np.testing.assert_array_equal(attack_key, np.asarray(jax.random.key_data(expected_key)))
  assert len({targets.tobytes() for targets, _, _ in calls}) > 1


@pytest.mark.parametrize("value", [-1, 10, 1.5, 0.01, "half", True])
def test_bad_target_holdout_is_named(value):
  with pytest.raises(ValueError, match="config.infinite.robust_data.target_holdout="):
    check_robust_data_config(_full_section(target_holdout=value), num_train=10)


@pytest.mark.parametrize("value", [-1, 2.5, "wide", True])
def test_bad_network_width_is_named(value):
  with pytest.raises(ValueError, match="config.infinite.robust_data.network_width=.* must be an "
                                       "integer >= 1, 0 .no network"):
    check_robust_data_config(_full_section(network_width=value), num_train=30)


# An infinite step size or bound passed `> 0` and reached the optimisation (NaN did not).
@pytest.mark.parametrize("field, value", [("learning_rate", float("nan")), ("learning_rate", float("inf")),
                                          ("learning_rate", 0.0),
                                          ("data_eps", float("inf")),
                                          ("data_eps", float("nan")), ("data_eps", 0.0)])
def test_bad_step_size_or_bound_is_named(field, value):
  with pytest.raises(ValueError, match=rf"config\.infinite\.robust_data\.{field}=.* must be a "
                                       "positive finite number"):
    check_robust_data_config(_full_section(**{field: value}), num_train=30)


def test_target_batch_larger_than_the_held_out_targets_is_named():
  with pytest.raises(ValueError, match="target_batch_size=4 exceeds the 3 target images held out by "
                                       "config.infinite.robust_data.target_holdout=3"):
    check_robust_data_config(_full_section(target_holdout=3, target_batch_size=4), num_train=10)
  # A batch of every target is one.
  check_robust_data_config(_full_section(target_holdout=3, target_batch_size=3), num_train=10)
  check_robust_data_config(_full_section(target_batch_size=30), num_train=30)


@pytest.mark.parametrize("field, value, least", [("num_steps", -1, 0), ("target_batch_size", 0, 1),
                                                 ("checkpoint_every", 0, 1)])
def test_bad_counts_are_named(field, value, least):
  """0 steps is a run that optimises nothing (the original images); a checkpoint every 0 steps
  would divide by zero after the first step's compute."""
  with pytest.raises(ValueError, match=rf"config\.infinite\.robust_data\.{field}={value} must be an "
                                       rf"integer >= {least}"):
    check_robust_data_config(_full_section(**{field: value}), num_train=30)
  check_robust_data_config(_full_section(**{field: least}), num_train=30)


def test_bad_loss_and_attacks_are_named_before_compute():
  """The loss, the inner attack and the evaluation attacks are checked with the rest of the
  section, each error naming its field."""
  with pytest.raises(ValueError, match=r"config\.infinite\.robust_data\.loss='hinge'; expected one of "
                                       r"cross_entropy, mse"):
    check_robust_data_config(_full_section(loss="hinge"), num_train=30)
  section = _full_section()
  section.attack.eps = 0.0
  with pytest.raises(ValueError, match=r"config\.infinite\.robust_data\.attack\.eps=0\.0"):
    check_robust_data_config(section, num_train=30)
  section = _full_section()
  section.eval_attacks.pgd.num_steps = 0
  with pytest.raises(ValueError, match=r"config\.infinite\.robust_data\.eval_attacks\.pgd\.num_steps=0"):
    check_robust_data_config(section, num_train=30)


def test_attack_batch_is_the_given_size_capped_at_the_padded_target_batch():
  """Targets attacked per call: by default the target batch padded to a multiple of the devices
  (5 on 4 devices: 8); a given size (a multiple of the devices) unless that is larger."""
  assert attack_batch_size(24, None, 4) == 24 and attack_batch_size(5, None, 4) == 8
  assert attack_batch_size(24, 8, 4) == 8 and attack_batch_size(5, 16, 4) == 8
  with pytest.raises(ValueError, match="attack batch size=6 must be a positive multiple of the device"):
    attack_batch_size(24, 6, 4)


def test_the_tiled_gradient_over_devices_equals_the_one_call_objective_gradient():
  """objective_and_gradient (Gram and its pullback in tiles of 5 of 12 images, targets over 4
  devices) against jax.value_and_grad of adversarial_objective in one call, float64 (that one is
  checked against numpy in test_infinite_references); two target batches of 4 on 4 devices equal
  them on 1 device. 7 targets in batches of 4 or 12 pad the last batch, whose padding (copies of
  the last target) must not count: PGD without a random start, so every batching is one call's."""
  from ntk_scale import parallel
  from ntk_scale.robust_dataset import objective_and_gradient
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  x, y = _problem(n=12)
  targets, target_labels = _problem(n=8, seed=1)
  attack = build_attack(_section().attack)
  key = jax.random.key(5)
  loss = "mse"
  with jax.enable_x64(True):
    value, gradient = jax.jit(jax.value_and_grad(lambda s: adversarial_objective(  # compiled whole
        _rbf, s, jnp.asarray(y), jnp.asarray(targets), jnp.asarray(target_labels),
        jax.random.fold_in(key, 0), attack=attack, num_classes=4, regularizer=1e-3,
        solver="cholesky", loss=loss)))(jnp.asarray(x))
    run = lambda batch_size, mesh: objective_and_gradient(
        _rbf, x, y, targets, target_labels, key, attack=attack, num_classes=4,
        regression=REGRESSION, loss=loss, tile=5, batch_size=batch_size, mesh=mesh)
    tiled_value, tiled_gradient = run(8, parallel.make_mesh())
    assert tiled_value == pytest.approx(float(value), rel=1e-12)
    np.testing.assert_allclose(tiled_gradient, np.asarray(gradient), rtol=1e-9, atol=1e-12)
    (four_value, four), (one_value, on_one) = run(4, parallel.make_mesh()), run(4, one)
    assert four_value == pytest.approx(one_value, rel=1e-12)
    np.testing.assert_allclose(four, on_one, rtol=1e-10, atol=1e-13)
    # Batch b of 4 is attacked with fold_in(key, b) (random-start PGD): the mean of the two one-call
    # objectives (one key for both batches repeated batch 0's starts).
    per_batch = jax.jit(lambda t, l, k: adversarial_objective(
        _rbf, jnp.asarray(x), jnp.asarray(y), t, l, k, attack=attack, num_classes=4,
        regularizer=1e-3, solver="cholesky", loss=loss))
    rows = lambda b: slice(4 * b, 4 * b + 4)
    halves = [float(per_batch(jnp.asarray(targets[rows(b)]), jnp.asarray(target_labels[rows(b)]),
                              jax.random.fold_in(key, b))) for b in (0, 1)]
    assert four_value == pytest.approx(np.mean(halves), rel=1e-12)
    no_start = _section().attack
    no_start.random_start = False
    attack = build_attack(no_start)
    seven, seven_labels = targets[:7], target_labels[:7]
    value, gradient = jax.jit(jax.value_and_grad(lambda s: adversarial_objective(
        _rbf, s, jnp.asarray(y), jnp.asarray(seven), jnp.asarray(seven_labels), key,
        attack=attack, num_classes=4, regularizer=1e-3, solver="cholesky",
        loss=loss)))(jnp.asarray(x))
    for batch_size in (4, 12):  # 4 + 3 padded to 4, or 7 padded to 12
      padded_value, padded_gradient = objective_and_gradient(
          _rbf, x, y, seven, seven_labels, key, attack=attack, num_classes=4, regression=REGRESSION,
          loss=loss, tile=5, batch_size=batch_size, mesh=parallel.make_mesh())
      assert padded_value == pytest.approx(float(value), rel=1e-12), batch_size
      np.testing.assert_allclose(padded_gradient, np.asarray(gradient), rtol=1e-9, atol=1e-12)


def test_a_killed_or_preempted_optimisation_resumes_and_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch):
  """Saves every 2 of 5 steps; killed in step 4, the rerun redoes steps 3-5 only; preempted in step
  3, it saves step 3 and the rerun does steps 4-5 only (a notice in its last step, 5, finishes it:
  nothing is left to resume); both end with the images and objective record of a run never
  stopped."""
  from ntk_scale import robust_dataset
  x, y = _problem(n=12)
  section = _section(num_steps=5, target_batch_size=8, checkpoint_every=2)
  run = lambda directory: optimise_dataset(section, _rbf, x, y, 4, REGRESSION, seed=0, tile=5,
                                           checkpoint_dir=str(directory))
  whole = robust_dataset.objective_and_gradient
  calls = []

  def counted(*args, **kwargs):
    calls.append(1)
    return whole(*args, **kwargs)

  def dies_in_step_four(*args, **kwargs):
    calls.append(1)
    if len(calls) == 4:
      raise KeyboardInterrupt
    return whole(*args, **kwargs)

  with jax.enable_x64(True):
    uninterrupted, record = run(tmp_path / "uninterrupted")
    monkeypatch.setattr(robust_dataset, "objective_and_gradient", dies_in_step_four)
    with pytest.raises(KeyboardInterrupt):
      run(tmp_path / "killed")
    calls.clear()
    resumed, resumed_record = run(tmp_path / "killed")
    assert len(calls) == 3
    monkeypatch.setattr(robust_dataset, "objective_and_gradient", counted)
    with monkeypatch.context() as patch:
      patch.setattr(robust_dataset, "preemption_notices", notices_from(3))
      with pytest.raises(Preempted, match="step 3 of 5 of the robust set's optimisation") as stopped:
        run(tmp_path / "preempted")
    assert stopped.value.step == 3
    calls.clear()
    with monkeypatch.context() as patch:
      patch.setattr(robust_dataset, "preemption_notices", notices_from(2))  # in step 5
      after_preemption, after_preemption_record = run(tmp_path / "preempted")
    assert len(calls) == 2
  np.testing.assert_array_equal(resumed, uninterrupted)
  assert resumed_record == record and len(record["objective"]) == 5
  np.testing.assert_array_equal(after_preemption, uninterrupted)
  assert after_preemption_record == record
