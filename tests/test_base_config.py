"""ntk_scale/base_config.py's attack builders (pgd_linf's step as its fields are overridden,
apgd_linf, AutoAttack's members) and optional fields, and ntk_scale/matmul_precision.py's names for
jax's precision levels, checked against values written out by hand."""

import pytest
from absl import flags
from jax import lax

from ntk_scale.attacks import build_attack
from ntk_scale.base_config import apgd_linf, autoattack, base_config, pgd_linf
from ntk_scale.matmul_precision import check_precision, lax_precision

from main_py_flags import main_py_config

EPS = 8 / 255


def test_an_explicit_pgd_step_gives_way_to_a_single_step_attacks_own_when_renamed():
  """configs/cifar10_resnet18.py gives its PGD attacks an explicit step (2 eps / 20). Overriding
  only the name to rs_fgsm or n_fgsm (README: single-step training) runs them with their own step
  (None: 1.25 eps, eps), not PGD's; renamed back to pgd, the explicit step holds whatever eps is."""
  config = base_config()
  config.train.attack = pgd_linf(EPS, num_steps=20, step_size=2 * EPS / 20)
  attack = config.lock().train.attack  # as main.py's --config.train.attack.* flags set it
  for name in ("rs_fgsm", "n_fgsm"):
    attack.name = name
    assert attack.step_size is None
  attack.name, attack.eps = "pgd", 4 / 255
  assert attack.step_size == 2 * EPS / 20


def test_apgd_linf_is_apgd_ce_with_its_restarts():
  """APGD-CE (the cross-entropy loss; apgd_dlr is the other) under L-inf, restarted as asked."""
  attack = apgd_linf(0.1, num_steps=5, restarts=3)
  assert attack.to_dict() == dict(name="apgd_ce", norm="linf", eps=0.1, num_steps=5, restarts=3)
  build_attack(attack)  # a config the attacks take


# AutoAttack's standard version (Croce and Hein 2020): APGD-CE and APGD-T of 100 iterations, APGD-T
# and FAB-T on the 9 most likely other classes, FAB-T of 100 iterations, Square of 5000 queries.
STANDARD = dict(apgd_ce=dict(name="apgd_ce", num_steps=100),
                apgd_t=dict(name="apgd_t", num_steps=100, num_targets=9),
                fab_t=dict(name="fab_t", num_steps=100, num_targets=9),
                square=dict(name="square", num_queries=5000, p_schedule="fixed"))


@pytest.mark.parametrize("args, expected", [
    ((EPS,), dict(name="worst_of", norm="linf", eps=EPS, attacks=STANDARD)),
    ((0.5, "l2", 7, 3, 4, 50), dict(name="worst_of", norm="l2", eps=0.5, attacks=dict(
        apgd_ce=dict(name="apgd_ce", num_steps=7),
        apgd_t=dict(name="apgd_t", num_steps=7, num_targets=3),
        fab_t=dict(name="fab_t", num_steps=4, num_targets=3),
        square=dict(name="square", num_queries=50, p_schedule="fixed")))),
    # fab_steps 0 and square_queries 0: no FAB-T, no Square (the APGD pair alone)
    ((EPS, "linf", 7, 3, 0, 0), dict(name="worst_of", norm="linf", eps=EPS, attacks=dict(
        apgd_ce=dict(name="apgd_ce", num_steps=7),
        apgd_t=dict(name="apgd_t", num_steps=7, num_targets=3)))),
])
def test_autoattack_members_take_their_own_steps_targets_and_queries(args, expected):
  """Each member reads its own argument: FAB-T its fab_steps (not the APGD pair's num_steps) and the
  shared num_targets, Square its queries; the norm is the whole ensemble's."""
  attack = autoattack(*args)
  assert attack.to_dict() == expected
  build_attack(attack, num_classes=10)


@pytest.fixture
def parse_flags_on_base_config(tmp_path):
  """The config main.py's flags build from base_config() and the given --config.* overrides."""
  (tmp_path / "base.py").write_text("from ntk_scale.base_config import base_config\n\n\n"
                                    "def get_config(arg=''):\n  return base_config()\n")
  command = ["python", "main.py", "--config=base.py", "--workdir=/never"]
  return lambda *overrides: main_py_config([*command, *overrides], str(tmp_path))


@pytest.mark.parametrize("overrides, step", [
    ((), 2.5 * EPS / 10),  # base_config's train.attack: PGD-10 at 8/255
    (("--config.train.attack.eps=0.1", "--config.train.attack.num_steps=4"), 2.5 * 0.1 / 4),
    (("--config.train.attack.name=rs_fgsm",), None),
    (("--config.train.attack.name=n_fgsm", "--config.train.attack.eps=0.1"), None),
    (("--config.train.attack.name=fgsm",), 2.5 * EPS / 10),  # unused by FGSM
    (("--config.train.attack.step_size=0.01", "--config.train.attack.eps=0.2"), 0.01),
    (("--config.train.attack.num_steps=0",), None),  # named where the attack is built
])
def test_the_pgd_step_follows_the_flags_that_override_its_fields(parse_flags_on_base_config,
                                                                 overrides, step):
  """main.py's --config.train.attack.* flags set the fields the step is a reference to: PGD's
  2.5 eps / num_steps follows them, and rs_fgsm and n_fgsm take their own (None)."""
  assert parse_flags_on_base_config(*overrides).train.attack.step_size == step


@pytest.mark.parametrize("field, flag, value, bad", [
    ("data.data_dir", "/data/tfds", "/data/tfds", None),  # any text names a directory
    ("evaluate.epoch", "2.5", 2.5, "newest"),
    ("kernel.epoch", "0", 0.0, "newest"),
    ("kernel.rotate", "False", False, "sometimes"),
    ("eigen_images.epoch", "3", 3.0, "newest"),
])
def test_fields_that_default_to_none_take_an_override_of_their_type(parse_flags_on_base_config,
                                                                    field, flag, value, bad):
  """A plain None field of a locked config refuses every --config.<field>=<value> override (its type
  is unknown): base_config's optional fields are typed references, which take a value of their type
  and refuse another."""
  section, name = field.split(".")
  assert base_config()[section][name] is None
  assert parse_flags_on_base_config(f"--config.{field}={flag}")[section][name] == value
  if bad is not None:
    with pytest.raises(flags.IllegalFlagValueError, match=rf"--config\.{field}={bad}"):
      parse_flags_on_base_config(f"--config.{field}={bad}")


def test_precision_names_map_to_jax_levels_and_default_to_none():
  """A matmul asked for at "high" runs at HIGH (TF32 or three bfloat16 passes), at "highest" at
  HIGHEST; "default" passes no precision of its own (None), leaving the surrounding context's."""
  assert [lax_precision(p) for p in ("highest", "high", "default")] == [
      lax.Precision.HIGHEST, lax.Precision.HIGH, None]


def test_a_precision_checked_without_a_field_name_is_named_precision():
  """The kernel engine checks its precision argument under this name (ntk/engine.py)."""
  with pytest.raises(ValueError, match=r"^precision='fast' is not a matmul precision; expected one "
                                       r"of highest, high, default\.$"):
    check_precision("fast")
  check_precision("high", "config.kernel.precision")
