"""The experiment configs (configs/*.py): which fields each get_config(arg) variant changes and that
variants combine; the settings each docstring states (its commands, the papers' choices, the
measured runs' epochs and kernel) against what get_config builds, with split sizes from the data
catalog; the digits CNN that the CO study and the infinite job's transfer reuse; and the argument
errors. In-process, nothing trained: the whole file takes a few seconds."""

import ast
import itertools
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from ntk_scale.data.catalog import SHAPES
from ntk_scale.models import build_model
from ntk_scale.ntk.job import kernel_name
from ntk_scale.train.experiment import check_train_config

from test_train import REPO, load_config

CIFAR, CO, INF = "cifar10_resnet18", "catastrophic_overfitting", "infinite_width"
ABSENT = "<absent>"


def _docstring(name: str, function: str = "") -> str:
  """The docstring of configs/<name>.py (or of its `function`), whitespace collapsed: its sentences
  wrap anywhere."""
  with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
    tree = ast.parse(f.read())
  if function:
    (tree,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
  return " ".join(ast.get_docstring(tree).split())


def _stated(name: str, pattern: str, function: str = "") -> tuple[str, ...]:
  """The groups of `pattern` in that docstring, which must state it."""
  match = re.search(pattern, _docstring(name, function))
  assert match, f"configs/{name}.py's docstring no longer says {pattern!r}"
  return match.groups()


def _changes(name: str, arg: str, base: str = "") -> dict:
  """The fields get_config(arg) sets otherwise than get_config(base): field -> its value (ABSENT
  where the variant removes it)."""
  before, after = (traverse_util.flatten_dict(load_config(name, a).to_dict(), sep=".")
                   for a in (base, arg))
  return {k: after.get(k, ABSENT) for k in before.keys() | after.keys()
          if before.get(k, ABSENT) != after.get(k, ABSENT)}


def _steps_per_epoch(config) -> int:
  """Whole batches in the catalog's training split (the trainer drops the partial one)."""
  return SHAPES[config.data.name][1] // config.batch_size


def _number(text: str) -> int:
  return int(text.replace(",", ""))


# Each variant's fields ("x.*": at least one field under x), and no other field.
_ATTACKS = ("train.attack.*", "phase2.attack.*", "eval_attacks.pgd.*", "eval_attacks.apgd.*")
_INFINITE_CIFAR10 = ("data.name", "batch_size", "eval_batch_size", "infinite.architecture",
                     "infinite.depth", "infinite.batch_size", "infinite.num_train",
                     "infinite.transfer.widths", "infinite.transfer.num_epochs",
                     "infinite.robust_data.num_steps", "infinite.robust_data.target_batch_size",
                     "infinite.robust_data.checkpoint_every", "infinite.attacks.*",
                     "infinite.robust_data.attack.*", "infinite.robust_data.eval_attacks.*")
VARIANT_FIELDS = [
    ("digits", "adversarial", ("train.mode",)),
    ("digits", "autoattack", ("eval_attacks.autoattack.*",)),
    ("digits", "autoattack_l2", ("eval_attacks.autoattack_l2.*",)),
    ("digits", "phase2", ("phase2.num_epochs", "phase2.from_epoch")),
    ("digits", "smoke", ("model.width", "num_epochs", "log_every_steps")),
    ("mnist_cnn", "smoke", ("model.width", "num_epochs", "log_every_steps")),
    (CIFAR, "adversarial", ("train.mode",)),
    (CIFAR, "autoattack", ("eval_attacks.autoattack.*",)),
    (CIFAR, "autoattack_l2", ("eval_attacks.autoattack_l2.*",)),
    (CIFAR, "phase2", ("phase2.num_epochs", "phase2.from_epoch")),
    (CIFAR, "smoke", ("model.width", "batch_size", "eval_batch_size", "num_epochs",
                      "log_every_steps", *_ATTACKS)),
    (INF, "conv", ("infinite.architecture",)),
    (INF, "myrtle", ("infinite.architecture", "infinite.depth", "infinite.batch_size")),
    (INF, "square", ("infinite.robust_data.eval_attacks.square.*",)),
    (INF, "smoke", ("infinite.num_train", "infinite.transfer.widths",
                    "infinite.transfer.num_epochs", "infinite.robust_data.num_steps",
                    "infinite.robust_data.target_batch_size")),
    (INF, "cifar10", _INFINITE_CIFAR10),
    (CO, "smoke", ("model.width", "num_epochs")),
]


@pytest.mark.parametrize("name, variant, fields", VARIANT_FIELDS,
                         ids=[f"{n}:{v}" for n, v, _ in VARIANT_FIELDS])
def test_each_variant_changes_its_own_fields_and_only_those(name, variant, fields):
  """A variant that stopped setting a field (or set one it should not) runs another experiment
  under the same name; infinite_width's variants are relative to its default, `digits`."""
  base = "digits" if name == INF else ""
  changed = _changes(name, f"{base},{variant}" if base else variant, base)
  exact = {f for f in fields if not f.endswith(".*")}
  prefixes = tuple(f[:-1] for f in fields if f.endswith(".*"))
  assert exact <= set(changed), f"{variant} no longer sets {sorted(exact - set(changed))}"
  for prefix in prefixes:
    assert any(k.startswith(prefix) for k in changed), f"{variant} no longer sets {prefix}*"
  stray = [k for k in changed if k not in exact and not k.startswith(prefixes)]
  assert not stray, f"{variant} also sets {sorted(stray)}"


@pytest.mark.parametrize("name, variants", [
    ("digits", ("adversarial", "autoattack", "autoattack_l2", "phase2", "smoke")),
    (CIFAR, ("adversarial", "autoattack", "phase2", "smoke")),
    (INF, ("conv", "smoke"))])
def test_variants_combine_in_any_order_as_the_union_of_their_changes(name, variants):
  """`:adversarial,smoke` is adversarial training shrunk as `:smoke` shrinks the benign one."""
  for first, second in itertools.combinations(variants, 2):
    together = _changes(name, f"{first},{second}")
    assert together == {**_changes(name, first), **_changes(name, second)}, (first, second)
    assert _changes(name, f"{second},{first}") == together


@pytest.mark.parametrize("name, arg, unknown", [(INF, "digits,myrtel", "myrtel"),
                                                (CO, "method=pgd,smok", "smok")])
def test_an_unknown_variant_or_flag_names_its_config_file(name, arg, unknown):
  message = rf"configs/{name}\.py: unknown variant\(s\) \['{unknown}'\]"
  with pytest.raises(ValueError, match=message):
    load_config(name, arg)


# --------------------------------------------------------------------------- configs/digits.py

def test_the_digits_demo_trains_and_evaluates_as_its_docstring_says():
  assert _stated("digits", r"^The default demo: the (small CNN) \((with BatchNorm)\)")
  c = load_config("digits")
  assert (c.model.name, c.model.batch_norm, c.data.name) == ("cnn", True, "digits")
  assert c.train.mode == "C" and "Benign training (mode C)" in _docstring("digits")
  steps, eps = _stated("digits", r"Adversarial training \(mode A, L-inf PGD-(\d+) at eps ([\d.]+)")
  adversarial = load_config("digits", "adversarial")
  attack = adversarial.train.attack
  assert (adversarial.train.mode, attack.name, attack.norm) == ("A", "pgd", "linf")
  assert (attack.num_steps, attack.eps) == (int(steps), float(eps))
  pgd, apgd, eps, images = _stated(
      "digits", r"under L-inf PGD-(\d+) and APGD-CE-(\d+) at eps ([\d.]+) on the (\d+) test images")
  assert int(images) == SHAPES["digits"][2]
  assert (c.eval_attacks.pgd.name, c.eval_attacks.pgd.num_steps) == ("pgd", int(pgd))
  assert (c.eval_attacks.apgd.name, c.eval_attacks.apgd.num_steps) == ("apgd_ce", int(apgd))
  for attack in c.eval_attacks.values():
    assert (attack.eps, attack.norm) == (float(eps), "linf")
  (epochs,) = _stated("digits", r"Measured \([^)]*, (\d+) epochs,")
  assert c.num_epochs == float(epochs)


def test_the_digits_kernel_command_writes_the_directory_its_docstring_names():
  """The newest checkpoint's kernel (epoch num_epochs) of Loo et al.'s 500 class-balanced images,
  logit 0: the directory is named from the config."""
  (directory,) = _stated("digits", r"streamed to <workdir>/kernels/(\w+)/")
  c = load_config("digits")
  assert kernel_name(c, c.num_epochs, c.kernel.num_examples) == directory


def test_the_digits_phase2_and_smoke_variants_are_their_docstrings():
  from_epoch, epochs, lr, momentum = _stated(
      "digits", r"then the centered linearization around the epoch-(\d+) checkpoint trained for "
                r"(\d+) epochs \(SGD lr ([\d.]+), momentum ([\d.]+)\)")
  p = load_config("digits", "phase2").phase2
  assert (p.linearization, p.from_epoch, p.num_epochs) == (
      "centered", float(from_epoch), float(epochs))
  assert (p.optimizer.name, p.optimizer.learning_rate, p.optimizer.momentum) == (
      "sgd", float(lr), float(momentum))
  (epochs,) = _stated("digits", r"`smoke` .* for a narrower CNN trained for (\d+) epochs")
  c, smoke = load_config("digits"), load_config("digits", "adversarial,smoke")
  assert smoke.num_epochs == float(epochs) and smoke.model.width < c.model.width
  assert smoke.train.mode == "A"
  every, steps, batch, smoke_every = _stated(
      "digits", r"logged every (\d+) steps \(of the (\d+) in an epoch of (\d+) digits\), every (\d+) "
                r"in `smoke`")
  assert (c.log_every_steps, smoke.log_every_steps) == (int(every), int(smoke_every))
  assert c.batch_size == int(batch)
  assert _steps_per_epoch(c) == int(steps)


def test_the_digits_autoattack_variants_are_linf_at_the_evaluation_eps_and_l2_at_the_stated_one():
  (l2_eps,) = _stated("digits",
                      r"`:autoattack_l2` runs the same four attacks in L2 at eps ([\d.]+)")
  attacks = load_config("digits", "autoattack,autoattack_l2").eval_attacks
  assert (attacks.autoattack.norm, attacks.autoattack.eps) == ("linf", attacks.pgd.eps)
  assert (attacks.autoattack_l2.norm, attacks.autoattack_l2.eps) == ("l2", float(l2_eps))


@pytest.mark.parametrize("name, arg", [("digits", ""), ("digits", "smoke"), (CIFAR, ""),
                                       (CIFAR, "smoke")])
def test_phase2s_attack_is_the_phase1_attack(name, arg):
  """Phase 2's mode A attacks the linearized model as phase 1's mode A attacks the network
  (configs/cifar10_resnet18.py: phase 2's `attack` defaults to the phase-1 attack), smoke
  included."""
  c = load_config(name, arg)
  assert c.phase2.attack.to_dict() == c.train.attack.to_dict()


# --------------------------------------------------------------------------- configs/mnist_cnn.py

def test_the_mnist_cnn_is_the_architecture_its_docstring_draws():
  """`conv 32-32-pool-64-64-128-128`: the channels of the CNN the config builds; 10 epochs, and
  `:smoke`'s width-8 CNN trained one epoch."""
  (layers,) = _stated("mnist_cnn", r"^The small CNN \(conv ([\w-]+)-avgpool-dense\) on MNIST")
  c, smoke = load_config("mnist_cnn"), load_config("mnist_cnn", "smoke")
  assert c.data.name == "mnist"
  model = build_model(c.model, 10)
  images = jnp.zeros((1, *SHAPES["mnist"][0]))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
  channels = [params[f"conv{i}"]["kernel"].shape[-1] for i in range(1, 7)]
  assert channels == [int(n) for n in layers.split("-") if n != "pool"]
  (epochs,) = _stated("mnist_cnn", r"after (\d+) epochs")
  assert c.num_epochs == float(epochs)
  width, smoke_every = _stated("mnist_cnn",
                               r"`:smoke` runs one epoch of a width-(\d+) CNN, logged every (\d+) steps")
  assert (smoke.num_epochs, smoke.model.width, smoke.log_every_steps) == (1.0, int(width), int(smoke_every))


def test_the_mnist_cnn_trains_with_the_recipe_its_docstring_states():
  lr, momentum, decay, schedule, batch, eval_batch, every = _stated(
      "mnist_cnn", r"The CNN has BatchNorm; SGD at lr ([\d.]+) with momentum ([\d.]+) and weight decay "
                   r"([\de.-]+) on a (\w+) schedule, batches of (\d+), evaluation batches of (\d+), "
                   r"training metrics logged every (\d+) steps")
  c = load_config("mnist_cnn")
  o = c.optimizer
  assert c.model.batch_norm is True and o.name == "sgd"
  assert (o.learning_rate, o.momentum, o.weight_decay, o.schedule) == (
      float(lr), float(momentum), float(decay), schedule)
  assert (c.batch_size, c.eval_batch_size, c.log_every_steps) == (int(batch), int(eval_batch), int(every))


# ---------------------------------------------------------------------- configs/cifar10_resnet18.py

def test_the_cifar10_config_is_loo_et_al_s_recipe_as_its_docstring_states():
  c = load_config(CIFAR)
  lr, momentum, batch, factor, first, second, epochs = _stated(
      CIFAR, r"SGD with learning rate ([\d.]+) and momentum ([\d.]+), batch (\d+), learning rate "
             r"x([\d.]+) after epochs (\d+) and (\d+) \((\d+) epochs\)")
  o = c.optimizer
  assert (o.name, o.learning_rate, o.momentum) == ("sgd", float(lr), float(momentum))
  assert (o.schedule, o.decay_factor, tuple(o.decay_epochs)) == (
      "piecewise", float(factor), (int(first), int(second)))
  assert (c.batch_size, c.num_epochs) == (int(batch), float(epochs))
  assert (c.data.name, c.model.name) == ("cifar10", "resnet18")
  (decay,) = _stated(
      CIFAR, r"Random crop \(pad 4\) and horizontal flip, and weight decay ([\d.e-]+),")
  assert (c.data.augment, o.weight_decay) == ("crop_flip", float(decay))


def test_the_cifar10_attacks_are_loo_et_al_s():
  eps, train_steps, divisor, pgd_steps, apgd_steps = _stated(
      CIFAR, r"L-inf eps (\d+)/255; training uses PGD-(\d+) with step 2\*eps/(\d+) and a random "
             r"start; the test split is evaluated under PGD-(\d+) \(same step size\) and "
             r"APGD-CE-(\d+)")
  eps, step = int(eps) / 255, 2 * int(eps) / 255 / int(divisor)
  c = load_config(CIFAR, "adversarial")
  t, pgd, apgd = c.train.attack, c.eval_attacks.pgd, c.eval_attacks.apgd
  assert (c.train.mode, t.name, t.norm, t.random_start) == ("A", "pgd", "linf", True)
  assert (t.eps, t.num_steps, t.step_size) == pytest.approx((eps, int(train_steps), step))
  assert (pgd.name, pgd.num_steps) == ("pgd", int(pgd_steps))
  assert (pgd.eps, pgd.step_size) == pytest.approx((eps, step))
  assert (apgd.name, apgd.num_steps, apgd.eps) == ("apgd_ce", int(apgd_steps), pytest.approx(eps))
  (l2_eps,) = _stated(CIFAR, r"`:autoattack_l2` the same four attacks in L2 at eps ([\d.]+)")
  attacks = load_config(CIFAR, "autoattack,autoattack_l2").eval_attacks
  assert (attacks.autoattack.norm, attacks.autoattack.eps) == ("linf", pytest.approx(eps))
  assert (attacks.autoattack_l2.norm, attacks.autoattack_l2.eps) == ("l2", float(l2_eps))


def test_the_cifar10_phase2_variant_is_the_overrides_its_docstring_gives():
  (flags,) = _stated(CIFAR, r"`:phase2` is `([^`]+)`")
  c = load_config(CIFAR)
  for flag in flags.split():
    path, _, value = flag.removeprefix("--config.").partition("=")
    *sections, field = path.split(".")
    section = c
    for s in sections:
      section = section[s]
    section[field] = ast.literal_eval(value)
  assert c.to_dict() == load_config(CIFAR, "phase2").to_dict()


def test_the_cifar10_smoke_variant_is_8_steps_of_a_width_4_resnet_at_batch_8_with_2_step_attacks():
  """Its steps at the catalog's CIFAR-10 train size, as the trainer counts them."""
  steps, width, batch, attack_steps = _stated(
      CIFAR, r"`:smoke` \(with or without `adversarial`\) runs (\d+) steps of a width-(\d+) "
             r"ResNet-18 at batch (\d+) with (\d+)-step attacks on the real dataset")
  c = load_config(CIFAR, "adversarial,smoke")
  assert (c.model.width, c.batch_size, c.eval_batch_size) == (int(width), int(batch), int(batch))
  assert round(c.num_epochs * _steps_per_epoch(c)) == int(steps)
  for attack in (c.train.attack, c.phase2.attack, c.eval_attacks.pgd, c.eval_attacks.apgd):
    assert attack.num_steps == int(attack_steps)


@pytest.mark.parametrize("arg", ["", "adversarial", "phase2"])
def test_every_cifar10_batch_divides_over_8_16_and_32_devices(arg):
  """The eval batch was 500, which no multiple of 8 devices divides: the train job refused it."""
  for devices in (8, 16, 32):
    check_train_config(load_config(CIFAR, arg), devices)


# -------------------------------------------------------------- configs/catastrophic_overfitting.py

def test_the_co_study_is_its_docstrings_schedule_monitor_and_evaluation():
  """The monitor's "half epoch" is computed from the catalog's 1,437 training digits, the peak's
  epoch from the cyclic schedule's peak fraction."""
  epochs, peak, peak_epoch, monitor_steps, monitor_images, final_steps = _stated(
      CO, r"(\d+) epochs of a cyclic learning rate \(peak ([\d.]+) at epoch (\d+)\), the CO "
          r"monitor every half epoch \(PGD-(\d+) on (\d+) fixed test images\) and PGD-(\d+) on the "
          r"whole test split")
  c = load_config(CO)
  o, m = c.optimizer, c.train.co_monitor
  assert (c.num_epochs, o.schedule, o.learning_rate) == (float(epochs), "cyclic", float(peak))
  assert o.peak_fraction * c.num_epochs == pytest.approx(float(peak_epoch))
  assert m.every_steps == _steps_per_epoch(c) // 2
  assert (m.attack.name, m.attack.num_steps) == ("pgd", int(monitor_steps))
  assert m.num_examples == int(monitor_images)
  assert (c.eval_attacks.pgd.name, c.eval_attacks.pgd.num_steps) == ("pgd", int(final_steps))
  (cifar_every,) = _stated(CO, r"Training metrics are logged at the monitor's steps \(every half "
                               r"epoch; data=cifar10: every (\d+) steps\); the runs keep no adversarial")
  assert c.log_every_steps == m.every_steps
  assert load_config(CO, "data=cifar10").log_every_steps == int(cifar_every)
  assert c.save_adversarial is False and load_config(CO, "data=cifar10").save_adversarial is False


def test_the_co_studys_defaults_are_its_docstrings():
  (eps,) = _stated(
      CO, r"eps L-inf radius of training, monitor and evaluation attacks \(default ([\d.]+)\)")
  (weight,) = _stated(CO, r"lambda GradAlign's weight \(default ([\d.]+);")
  c = load_config(CO)
  assert (c.train.mode, c.train.attack.name, c.train.grad_align, c.seed) == ("A", "fgsm", 0.0, 0)
  transform = c.data.transform
  assert (c.data.name, transform.name, transform.carrier) == ("digits", "none", "dct")
  for attack in (c.train.attack, c.train.co_monitor.attack, c.eval_attacks.pgd):
    assert attack.eps == float(eps)
  assert load_config(CO, "method=grad_align").train.grad_align == float(weight)


@pytest.mark.parametrize("method, attack, random_start, grad_align", [
    ("fgsm", "fgsm", None, False), ("rs_fgsm", "rs_fgsm", True, False),
    ("n_fgsm", "n_fgsm", True, False), ("grad_align", "fgsm", None, True),
    ("pgd", "pgd", True, False)])
def test_each_co_method_trains_with_its_attack(method, attack, random_start, grad_align):
  """grad_align is FGSM plus GradAlign's term; RS-FGSM and N-FGSM start from noise; FGSM has no
  random start field (a single step from the clean point)."""
  c = load_config(CO, f"method={method}")
  assert (c.train.attack.name, c.train.attack.get("random_start")) == (attack, random_start)
  assert (c.train.grad_align > 0) == grad_align


def test_the_co_flags_do_what_the_docstring_says():
  """`perp` removes x's projection on the features even at beta 0 (the transform runs); `sign` is
  the authors' carrier, data=cifar10's default; `smoke` 3 epochs of a narrower CNN."""
  perp = load_config(CO, "perp").data.transform
  assert (perp.name, perp.remove_projection, perp.beta) == ("inject", True, 0.0)
  assert load_config(CO, "beta=0.1").data.transform.name == "inject"
  assert load_config(CO, "sign").data.transform.carrier == "sign"
  assert load_config(CO, "data=cifar10").data.transform.carrier == "sign"
  (epochs,) = _stated(CO, r"smoke \((\d+) epochs, narrow CNN\)")
  smoke, c = load_config(CO, "smoke"), load_config(CO)
  assert smoke.num_epochs == float(epochs) and smoke.model.width < c.model.width


def test_the_co_studys_cifar10_setting_is_ortiz_jimenez_et_al_s():
  epochs, peak, batch, final_steps, step, restarts, monitor_images = _stated(
      CO, r"(\d+) epochs of a cyclic learning rate peaking at ([\d.]+) halfway, batch (\d+), no "
          r"augmentation .* PGD-(\d+) at step (\d+)/255 with (\d+) restarts at the end; the "
          r"monitor every half epoch on (\d+) test images", function="_cifar10")
  (eps,) = _stated(CO, r"cifar10 \(the paper's setting, see _cifar10; eps (\d+)/255")
  c = load_config(CO, "data=cifar10")
  o, m, final = c.optimizer, c.train.co_monitor, c.eval_attacks.pgd
  assert (c.data.name, c.data.augment) == ("cifar10", "none")
  assert (c.num_epochs, c.batch_size) == (float(epochs), int(batch))
  assert (o.schedule, o.learning_rate, o.peak_fraction) == ("cyclic", float(peak), 0.5)
  assert (final.num_steps, final.restarts) == (int(final_steps), int(restarts))
  assert final.step_size == pytest.approx(int(step) / 255)
  assert (m.every_steps, m.num_examples) == (_steps_per_epoch(c) // 2, int(monitor_images))
  for attack in (c.train.attack, m.attack, final):
    assert attack.eps == pytest.approx(int(eps) / 255)


# ------------------------------------------------------------------------ configs/infinite_width.py

def test_the_infinite_jobs_digits_setting_is_its_docstrings():
  depth, w_std, b_std, images, ridge, pgd_steps, eps, *widths, epochs = _stated(
      INF, r"the analytic NTK of a depth-(\d+) ReLU fully connected network \(W_std ([\d.]+), "
           r"b_std ([\d.]+)\) on all ([\d,]+) training images, float64, ridge ([\d.e-]+) "
           r"\(relative to the mean diagonal\); FGSM and PGD-(\d+) at eps ([\d.]+) against kernel "
           r"regression; their transfer to the digits CNN at widths (\d+), (\d+), (\d+) trained "
           r"(\d+) epochs")
  c = load_config(INF, "digits")
  s = c.infinite
  assert (c.data.name, s.architecture, s.kernel, s.dtype) == ("digits", "fc", "ntk", "float64")
  assert (s.depth, s.w_std, s.b_std) == (int(depth), float(w_std), float(b_std))
  assert s.num_train == 0 and _number(images) == SHAPES["digits"][1]  # 0: all of them
  assert s.regression.regularizer == float(ridge)
  assert sorted(s.attacks) == ["apgd_t", "fgsm", "pgd"]
  assert s.attacks.pgd.num_steps == int(pgd_steps)
  assert {a.eps for a in s.attacks.values()} == {float(eps)}
  assert tuple(s.transfer.widths) == tuple(int(w) for w in widths)
  assert s.transfer.num_epochs == float(epochs)
  apgd_t_steps, targets = _stated(INF, r"APGD-T-(\d+) \((\d+) targets")
  for apgd_t in (s.attacks.apgd_t, s.robust_data.eval_attacks.apgd_t):
    assert (apgd_t.num_steps, apgd_t.num_targets) == (int(apgd_t_steps), int(targets))


def test_the_infinite_jobs_robust_dataset_is_its_docstrings_choices():
  attack_steps, targets = _stated(
      INF, r"at PGD-(\d+) examples \(test eps\) of (\d+) target points per step")
  (lr,) = _stated(INF, r"squared-error outer loss \(.*?\), Adam at ([\d.]+),")
  (steps,) = _stated(INF, r"(\d+) outer steps on digits")
  pgd_steps, apgd_steps = _stated(INF, r"compared with the original set under PGD-(\d+) and "
                                       r"APGD-CE-(\d+) at eps")
  s = load_config(INF, "digits").infinite
  r = s.robust_data
  assert (r.loss, r.learning_rate) == ("mse", float(lr))
  assert (r.num_steps, r.target_batch_size) == (int(steps), int(targets))
  assert (r.attack.name, r.attack.num_steps) == ("pgd", int(attack_steps))
  assert r.attack.eps == s.attacks.pgd.eps
  assert (r.data_eps, r.target_holdout) == (None, 0.0)  # unbounded; the originals as targets
  assert sorted(r.eval_attacks) == ["apgd", "apgd_t", "pgd"]
  assert (r.eval_attacks.pgd.name, r.eval_attacks.pgd.num_steps) == ("pgd", int(pgd_steps))
  assert (r.eval_attacks.apgd.name, r.eval_attacks.apgd.num_steps) == ("apgd_ce", int(apgd_steps))


def test_the_infinite_jobs_cifar10_setting_is_its_docstrings():
  depth, images, eps, pgd_steps, narrowest, widest, steps, targets, attack_steps, attack_eps = (
      _stated(INF, r"Myrtle-(\d+) NTK on a class-balanced ([\d,]+)-image training subset, eps "
                   r"(\d+)/255 \(the papers' CIFAR-10 eps\), PGD-(\d+), transfer to the CNN at "
                   r"widths (\d+)-(\d+), the robust dataset with ([\d,]+) Adam steps of (\d+) "
                   r"targets against PGD-(\d+) at eps (\d+)/255"))
  c = load_config(INF, "cifar10")
  s, r = c.infinite, c.infinite.robust_data
  assert (c.data.name, s.architecture, s.depth) == ("cifar10", "myrtle", int(depth))
  assert s.num_train == _number(images) and s.attacks.pgd.num_steps == int(pgd_steps)
  assert (min(s.transfer.widths), max(s.transfer.widths)) == (int(narrowest), int(widest))
  assert (r.num_steps, r.target_batch_size) == (_number(steps), int(targets))
  assert r.attack.num_steps == int(attack_steps)
  assert r.attack.eps == pytest.approx(int(attack_eps) / 255)
  for attack in (*s.attacks.values(), *r.eval_attacks.values()):
    assert attack.eps == pytest.approx(int(eps) / 255)
  (eval_batch,) = _stated(INF, r"so `eval_batch_size` is (\d+)")
  (tile,) = _stated(INF, r"hence `batch_size` (\d+)")
  (every,) = _stated(INF, r"\(`checkpoint_every` (\d+)\)")
  assert (c.eval_batch_size, s.batch_size) == (int(eval_batch), int(tile))
  assert r.checkpoint_every == int(every)


def test_the_infinite_jobs_conv_and_myrtle_variants_are_the_kernels_its_docstring_names():
  (depth,) = _stated(
      INF, r"`digits,conv` or `digits,myrtle` use the CNN-VEC or Myrtle-(\d+) kernel")
  assert load_config(INF, "digits,conv").infinite.architecture == "conv"
  myrtle = load_config(INF, "digits,myrtle").infinite
  assert (myrtle.architecture, myrtle.depth) == ("myrtle", int(depth))


def test_the_infinite_jobs_smoke_variant_shrinks_every_size():
  s, smoke = (load_config(INF, arg).infinite for arg in ("digits", "digits,smoke"))
  assert 0 < smoke.num_train < SHAPES["digits"][1]  # a subset (0 would be all of it)
  assert set(smoke.transfer.widths) < set(s.transfer.widths)
  assert smoke.transfer.num_epochs < s.transfer.num_epochs
  assert smoke.robust_data.num_steps < s.robust_data.num_steps
  assert smoke.robust_data.target_batch_size < s.robust_data.target_batch_size


# --------------------------------------------------------------------------- shared: the digits CNN

def test_the_co_study_and_the_infinite_jobs_transfer_train_the_digits_demos_cnn():
  """Both docstrings say "the digits CNN": configs/digits.py's model, and for the infinite job's
  transfer networks its training too (optimizer and batch), at the transfer's widths."""
  digits, co, infinite = load_config("digits"), load_config(CO), load_config(INF, "digits")
  assert "the digits CNN with BatchNorm" in _docstring(CO)
  assert co.model.to_dict() == digits.model.to_dict()
  assert "their transfer to the digits CNN" in _docstring(INF)
  assert (infinite.model.name, infinite.model.batch_norm) == (
      digits.model.name, digits.model.batch_norm)
  assert infinite.optimizer.to_dict() == digits.optimizer.to_dict()
  assert infinite.batch_size == digits.batch_size
  assert digits.model.width in infinite.infinite.transfer.widths
