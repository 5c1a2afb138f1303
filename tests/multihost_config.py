"""The tiny jobs of tests/test_multihost.py: configs/digits.py:smoke with a 16-wide MLP, one epoch,
and one 2-step PGD evaluation attack (multi-process attacks are exercised; compiles stay short),
FGSM and PGD-2 as the eigen-features' worst_of;
`infinite`: configs/infinite_width.py:smoke shrunk to 40 training and 20 test images, one PGD-2
against kernel regression on the original set (its examples kept), none in robust_data.eval_attacks
(the optimised set is scored clean: attacked, it is one more program for each process to compile,
through the same evaluation), 3 robust-set steps saved every 2 and no finite network."""

import importlib.util
import os

import ml_collections

from ntk_scale.base_config import pgd_linf

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(_CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _infinite():
  c = _load("infinite_width").get_config("smoke")
  s = c.infinite
  s.update(num_train=40, num_test=20, batch_size=8)
  s.attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2)})
  # The robust set is what runs over two processes here; the finite networks (network_width 0:
  # none) are the train job's, tested on their own.
  s.transfer.widths = ()
  s.robust_data.update(num_steps=3, target_batch_size=8, checkpoint_every=2, network_width=0)
  s.robust_data.eval_attacks = ml_collections.ConfigDict()
  c.batch_size, c.eval_batch_size = 16, 8
  return c


def get_config(arg: str = ""):
  if arg == "infinite":
    return _infinite()
  digits = _load("digits")
  c = digits.get_config(",".join(["smoke"] + [v for v in arg.split(",") if v]))
  c.model.name, c.model.width, c.num_epochs = "mlp", 16, 1.0
  c.eval_attacks.pgd = pgd_linf(digits.EPS, num_steps=2)
  del c.eval_attacks["apgd"]
  # The eigen_features cases' attack: a worst_of, evaluated member by member on the examples still
  # robust (evaluate's re-batching over both processes), of two cheap members.
  eps = c.eigen_features.attack.eps
  c.eigen_features.attack = ml_collections.ConfigDict(dict(name="worst_of", eps=eps, attacks=dict(
      fgsm=dict(name="fgsm"), pgd=pgd_linf(eps, num_steps=2))))
  return c
