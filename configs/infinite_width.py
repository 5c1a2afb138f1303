"""Infinite-width kernels: kernel regression, training-free adversarial examples and their transfer
to finite networks, and a robust training set optimised through kernel regression (the `infinite`
job, ntk_scale/infinite_job.py).

Digits (embedded, no network; a few minutes on 2 CPU cores): the analytic NTK of a depth-2 ReLU
fully connected network (W_std 1.5, b_std 0.1) on all 1,437 training images, float64, ridge 1e-4
(relative to the mean diagonal); FGSM and PGD-20 at eps 0.1 against kernel regression; their
transfer to the digits CNN at widths 8, 32, 128 trained 3 epochs; 20 signed-gradient steps (0.01)
on the training images within 0.3 of the originals, each against PGD-5 at eps 0.1, evaluated with
kernel regression under PGD-20 and APGD-CE-20:

    python main.py --config configs/infinite_width.py:digits --workdir workdirs/infinite_digits

Measured (2 CPU cores, about 6 minutes): kernel regression 99.2% clean, 87.8% FGSM, 88.3% PGD-20;
the kernel's adversarial examples fool the CNN at width 8 / 32 / 128 (clean 96.4 / 99.2 / 99.2%) with
transfer rates (PGD) of 73.8 / 50.0 / 52.4% (FGSM 68.2 / 50.0 / 52.3%), accuracy under them 67.5 /
85.3 / 85.8%; on the optimised training set (largest pixel change 0.2) kernel regression has 98.3%
clean, 84.7% PGD-20 and 85.0% APGD-CE-20, and the width-128 CNN trained on it (3 epochs) 97.8% clean,
67.2% PGD-20, 66.1% APGD-CE-20: on digits this optimisation did not raise kernel robustness.

`digits,conv` or `digits,myrtle` use the CNN-VEC or Myrtle-5 kernel instead (slower: the Myrtle
kernel propagates the full spatial covariance); `smoke` shrinks everything for a quick check.

CIFAR-10 (the papers' settings; needs tfds' cifar10 and a GPU, not run here): Myrtle-5 NTK on a
class-balanced 5,000-image training subset, eps 8/255, PGD-20, transfer to the CNN at widths 64-1024,
robust data optimised with PGD-10 at eps 8/255 within 16/255 of the originals:

    python main.py --config configs/infinite_width.py:cifar10 --workdir workdirs/infinite_cifar10
"""

import ml_collections

from ntk_scale.base_config import apgd_linf, base_config, parse_variants, pgd_linf

VARIANTS = ("digits", "cifar10", "conv", "myrtle", "smoke")


def _fgsm(eps: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="fgsm", norm="linf", eps=eps))


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, VARIANTS, "configs/infinite_width.py")
  c = base_config()
  c.job = "infinite"
  c.data.name = "cifar10" if "cifar10" in variants else "digits"
  c.model.name = "cnn"
  c.model.batch_norm = True
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 5e-4
  c.batch_size = 64

  eps = 8 / 255 if "cifar10" in variants else 0.1
  s = c.infinite = ml_collections.ConfigDict()
  s.architecture = "fc"  # fc | conv | myrtle
  s.depth = 2  # hidden layers (fc), convolutions (conv), or Myrtle depth 5 | 7 | 10
  s.w_std = 1.5
  s.b_std = 0.1
  s.kernel = "ntk"  # ntk | nngp
  s.dtype = "float64"
  s.batch_size = 256  # images per kernel block (nt.batch)
  s.num_train = 0  # class-balanced training subset; 0: the whole split
  s.regression = ml_collections.ConfigDict(dict(regularizer=1e-4, solver="cholesky"))
  s.attacks = ml_collections.ConfigDict({"fgsm": _fgsm(eps), "pgd": pgd_linf(eps, num_steps=20)})
  s.transfer = ml_collections.ConfigDict(dict(widths=(8, 32, 128), num_epochs=3.0))
  s.robust_data = ml_collections.ConfigDict(dict(
      num_steps=20, step_size=0.01, data_eps=0.3, attack=pgd_linf(eps, num_steps=5),
      eval_attacks=ml_collections.ConfigDict({"pgd": pgd_linf(eps, num_steps=20),
                                              "apgd": apgd_linf(eps, num_steps=20)})))
  if "conv" in variants:
    s.architecture, s.depth = "conv", 2
  if "myrtle" in variants or "cifar10" in variants:
    s.architecture, s.depth, s.batch_size = "myrtle", 5, 32
  if "cifar10" in variants:
    s.num_train = 5000
    s.transfer.widths = (64, 256, 1024)
    s.transfer.num_epochs = 10.0
    s.robust_data.update(num_steps=100, step_size=1 / 255, data_eps=16 / 255,
                         attack=pgd_linf(eps, num_steps=10))
    c.batch_size = 128
  if "smoke" in variants:
    s.num_train = 200
    s.transfer.widths = (8,)
    s.transfer.num_epochs = 1.0
    s.robust_data.num_steps = 2
  return c
