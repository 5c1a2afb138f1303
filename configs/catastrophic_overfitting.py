"""Catastrophic overfitting (CO) of single-step adversarial training on digits with injected features.

Ortiz-Jimenez et al. 2023 ("Catastrophic overfitting can be induced with discriminative non-robust
features") add a low-frequency class pattern of pixel size beta to every image (x + beta * v_y, on
train and test) and find that FGSM training collapses for a range of beta below eps, while
N-FGSM (de Jorge et al. 2022) and GradAlign (Andriushchenko and Flammarion 2020) resist longer.
This file runs that study on scikit-learn's digits (no network): the digits CNN with BatchNorm,
15 epochs of a cyclic learning rate (peak 0.2 at epoch 6), the CO monitor every half epoch (PGD-10 on 256
fixed test images) and PGD-20 on the whole test split at the end. Training metrics are logged
at the monitor's steps (every half epoch; data=cifar10: every 100 steps); the runs keep no
adversarial examples of the final PGD (`save_adversarial` off: a sweep is many runs;
`--config.save_adversarial=True` keeps them).

`get_config(arg)`: comma-separated `key=value` items and flags, e.g. "method=fgsm,beta=0.15,eps=0.25":
  method  fgsm (default) | rs_fgsm (Wong et al. 2020) | n_fgsm | grad_align (FGSM + GradAlign) | pgd
  beta    injected feature size in [0, 1] pixel units (default 0: the plain digits)
  eps     L-inf radius of training, monitor and evaluation attacks (default 0.25)
  lambda  GradAlign's weight (default 1.0; method=grad_align only)
  seed    the run's seed (config.seed; default 0)
  seeds   get_sweep only: K runs per method and beta, seeds 0 .. K-1 (default 1)
  data    digits (default; eps 0.25) | cifar10 (the paper's setting, see _cifar10; eps 8/255;
          needs the tfds dataset and a GPU, not run here)
  flags   perp (remove x's projection on the features first), smoke (3 epochs, narrow CNN), sign
          (the authors' sign-pattern carrier instead of ours, config.data.transform.carrier; the
          default for data=cifar10)

    python main.py --config configs/catastrophic_overfitting.py:method=fgsm,beta=0.15,eps=0.25 \
        --workdir workdirs/co/fgsm_b0.15_e0.25

The run writes <workdir>/catastrophic_overfitting.json (collapsed or not, the step and epoch of
the collapse, the peak robust accuracy) and keeps checkpoints just before and after a collapse;
their epochs are under "checkpoint_epochs", for the kernel job:

    python main.py --config configs/catastrophic_overfitting.py:method=fgsm,beta=0.15,eps=0.25 \
        --config.job=kernel --config.kernel.epoch=<before or after> --workdir workdirs/co/fgsm_b0.15_e0.25

or all of them at once: the kernel at every saved epoch within 1 epoch of the collapse, with kernel
distances, top eigenvalues and the collapse marked on the plots (<workdir>/kernel_evolution/):

    python main.py --config configs/catastrophic_overfitting.py:method=fgsm,beta=0.15,eps=0.25 \
        --config.job=evolution --config.evolution.around_collapse=1 --workdir workdirs/co/fgsm_b0.15_e0.25

The paper's CIFAR-10 setting (`data=cifar10`), one run and the sweep (beta 0 to 8/255 in steps of
2/255, every method; the dry run lists the units without XManager):

    python main.py --config configs/catastrophic_overfitting.py:data=cifar10,method=fgsm,beta=0.03137 \
        --workdir workdirs/co_cifar10/fgsm_b0.03137_e0.03137
    python xm_launch/launch.py --config configs/catastrophic_overfitting.py:data=cifar10 \
        --workdir_root gs://BUCKET/co_cifar10 --executor=vertex --accelerator=h100=1 --dry_run

Expected, from the paper (not run here: no GPU yet): FGSM at eps 8/255 trains robustly on the plain
data (beta 0) and collapses with the injected feature near the authors' default beta = eps;
N-FGSM and GradAlign resist longer.

The summary also says whether the collapse was sustained (`sustained`: robust accuracy stayed
collapsed for config.train.co_monitor.sustain_evals = 3 consecutive measurements, 1.5 epochs here)
and lists the measurements at which it recovered (`recoveries`).

The sweep over methods and beta at one eps (`get_sweep`, one workdir each; `seeds=K` runs each K
times), listed or launched:

    python xm_launch/launch.py --config configs/catastrophic_overfitting.py:eps=0.25,seeds=3 \
        --workdir_root $PWD/workdirs/co --dry_run

Measured (seed 0 unless said, one run each, 2 shared CPU cores, 4-10 minutes a run; robust = PGD-10 accuracy
on the monitor's 256 test images every half epoch; final = clean / PGD-20 accuracy on all 360
test images after 15 epochs; the learning rate peaks at epoch 6):

    eps   method      beta  collapse recorded (epoch: robust, peak before)       final
    0.2   fgsm        0     none (30 epochs)                                     0.992 / 0.653
    0.2   fgsm        0.1   none                                                 0.994 / 0.608
    0.2   fgsm        0.15  none                                                 0.989 / 0.578
    0.2   fgsm        0.2   none                                                 0.972 / 0.533
    0.2   n_fgsm      0.15  none                                                 0.928 / 0.611
    0.25  fgsm        0     none                                                 0.983 / 0.436
    0.25  fgsm        0.1   none                                                 0.986 / 0.258
    0.25  fgsm        0.15  epoch 7.0: 0.06 (0.23 at 6.0), back to 0.18 at 7.5   0.833 / 0.244
    0.25  fgsm        0.2   epoch 12.5: 0.10 (0.32 at 8.0), 0.23 at the end     0.892 / 0.169
    0.25  rs_fgsm     0.15  none (0.31 at 7.0, 0.14-0.28 after)                  0.856 / 0.219
    0.25  n_fgsm      0.15  none (rises steadily to 0.40)                        0.783 / 0.397
    0.25  grad_align  0.15  none (below 0.12 until epoch 11, then up to 0.37)   0.950 / 0.319
    0.3   fgsm        0     none (below 0.1 for 6 epochs, 0.26 at the end)       0.964 / 0.206
  seed 1 (--config.seed=1):
    0.25  fgsm        0     none                                                 0.978 / 0.472
    0.25  fgsm        0.15  epoch 11.5: 0.09 (0.27 at 5.0), 0.10-0.17 after     0.803 / 0.106
    0.25  n_fgsm      0.15  none (rises to 0.41)                                 0.806 / 0.411
    0.25  grad_align  0.15  none (below 0.16 until epoch 8, then 0.30-0.38)      0.983 / 0.303

On digits FGSM does not collapse at eps 0.2 whatever beta; at eps 0.25 the injected feature
(beta 0.15-0.2, between half and all of eps) makes FGSM's robust accuracy drop below half its
peak (beta 0.15: at epoch 7, right after the learning-rate peak, and 11.5 with seed 1; beta 0.2:
at 12.5) and
costs 0.19-0.37 final PGD accuracy against the plain data, where N-FGSM and GradAlign (lambda 1)
record no collapse in either seed and keep 0.40-0.41 and 0.30-0.32. The collapses are partial:
with seed 0 robustness comes back within an epoch, with seed 1 it stays near 0.1-0.17 to the end;
not the complete, permanent CO of CIFAR-10. Across the epoch-7 collapse (fgsm, beta 0.15,
eps 0.25, seed 0) the class-0 eNTK of 500 training images grew:
top eigenvalue 1.04e5 -> 1.36e5 and kernel distance 0.012 between epochs 6.5 and 7, against
1.06e5 -> 1.04e5 and 0.009 over the half epoch before (`--config.job=kernel
--config.kernel.epoch=6.5` and `=7`, the monitor's kept checkpoints).
Seed 1 (fgsm, beta 0.15, eps 0.25) rerun with `sustain_evals` = 3: the collapse at epoch 11.5 (0.086
against a peak of 0.27 at epoch 5) is not sustained, robust accuracy is back above half the peak
(0.14) at 12.5; `--config.evolution.around_collapse=1` took the kernels at epochs 10, 11, 11.5
and 12: kernel velocity 0.014 per epoch over 10 -> 11, 0.118 over 11 -> 11.5 (the collapse) and
0.064 over 11.5 -> 12, and the top eigenvalue 2.98e5, 3.98e5, 3.00e5, 3.31e5.

The figures above are from the VM of 2026-11-22. Rerun on 2026-11-29 on another 2-core VM (AMD
EPYC; ~1.5 minutes a run, GradAlign ~3), the same code (commit ca2b56e, which measured them) gives
other runs: single runs on digits depend on the machine's floating-point rounding, so compare
methods over seeds on one machine (the sweep's `seeds=K`). eps 0.25, final PGD-20 accuracy of
seeds 0-4 (clean accuracy in brackets), this VM:

    beta  method                        PGD-20 per seed                 mean   clean
    0     fgsm (seeds 0-2)              0.411 0.461 0.481               0.451  (0.98)
    0.15  fgsm                          0.211 0.133 0.219 0.125 0.203   0.178  (0.68-0.78)
    0.15  n_fgsm                        0.411 0.411 0.431 0.433 0.436   0.424  (0.77-0.80)
    0.15  grad_align, lambda 1          0.072 0.117 0.300 0.306 0.250   0.209  (0.95-0.98)
    0.15  grad_align, differentiated    0.150 0.075 (seeds 0-1)

The injected feature (beta 0.15, 60% of eps) costs FGSM 0.27 of its final PGD accuracy (0.45 ->
0.18), and its monitor records a collapse in 2 of 5 seeds (epochs 11 and 8; in the others robust
accuracy peaks near epoch 6-9 and falls while the training accuracy falls too, 0.97 -> 0.73, which
the criterion does not count); N-FGSM keeps 0.42 in every seed, no collapse. GradAlign at lambda 1
with grad_x L(x) held constant (config.train.grad_align_clean, the authors' and Ortiz-Jimenez et
al.'s code, the default since 2026-11-29) keeps 0.25-0.31 in three seeds and 0.07-0.12 in two;
differentiated as the paper's formula reads (the 2026-11-22 rows above: both differentiated,
zero-gradient examples counted) it did no better in seeds 0-1 here.
With the authors' sign-pattern carrier (flag `sign`: every pixel moved by beta, less what the clip
to [0, 1] cuts: on digits 61% of the pixels move) at beta 0.15, FGSM's
monitor records a collapse at epoch 6 in both seeds 0-1 while its clean accuracy stays high (final
0.950 / 0.183 and 0.886 / 0.225), N-FGSM none (0.783 / 0.408, 0.764 / 0.406).
"""

import math

import ml_collections

from ntk_scale.base_config import base_config, parse_variants, pgd_linf

FILE = "configs/catastrophic_overfitting.py"
METHODS = ("fgsm", "rs_fgsm", "n_fgsm", "grad_align", "pgd")
DEFAULTS = {"method": "fgsm", "beta": "0", "eps": "", "lambda": "1.0", "data": "digits", "seed": "0",
            "seeds": "1"}
DATASETS = {"digits": 0.25, "cifar10": 8 / 255}  # -> the default eps
FLAGS = ("perp", "smoke", "sign")


def _parse(arg: str) -> tuple[dict[str, str], set[str]]:
  """`key=value` items (keys of DEFAULTS) and flags (FLAGS); anything else is an error naming FILE."""
  values, flags = dict(DEFAULTS), []
  for item in (i for i in arg.split(",") if i):
    key, sep, value = item.partition("=")
    if not sep:
      flags.append(item)
    elif key in DEFAULTS:
      values[key] = value
    else:
      raise ValueError(f"{FILE}: unknown key {key!r}; expected {', '.join(DEFAULTS)} or flags {FLAGS}.")
  if values["data"] not in DATASETS:
    raise ValueError(f"{FILE}: data={values['data']!r}; expected one of {', '.join(DATASETS)}.")
  if values["method"] not in METHODS:
    raise ValueError(f"{FILE}: method={values['method']!r}; expected one of {', '.join(METHODS)}.")
  return values, parse_variants(",".join(flags), FLAGS, FILE)


def _given(arg: str, key: str) -> bool:
  """Whether `arg` sets `key`, even to its default."""
  return any(item.partition("=")[0] == key for item in arg.split(",") if "=" in item)


def _number(values: dict[str, str], key: str) -> float:
  try:
    number = float(values[key])
  except ValueError:
    raise ValueError(f"{FILE}: {key}={values[key]!r} is not a number.") from None
  if not math.isfinite(number):
    raise ValueError(f"{FILE}: {key}={values[key]!r} must be a finite number.")
  return number


def _count(values: dict[str, str], key: str, least: int) -> int:
  if not values[key].isdigit() or int(values[key]) < least:
    raise ValueError(f"{FILE}: {key}={values[key]!r} must be an integer >= {least}.")
  return int(values[key])


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  values, flags = _parse(arg)
  method, beta = values["method"], _number(values, "beta")
  if method != "grad_align" and _given(arg, "lambda"):  # it would be ignored
    raise ValueError(f"{FILE}: lambda={values['lambda']} is GradAlign's weight; it needs "
                     f"method=grad_align, not method={method}.")
  if not beta >= 0:  # below 0 the transform would be "none": the plain data, whatever the workdir says
    raise ValueError(f"{FILE}: beta={values['beta']} must be >= 0 (the injected feature's pixel size).")
  eps = _number(values, "eps") if values["eps"] else DATASETS[values["data"]]
  if values["seeds"] != DEFAULTS["seeds"]:
    raise ValueError(f"{FILE}: seeds={values['seeds']} makes a sweep (get_sweep, "
                     f"xm_launch/launch.py); one run takes seed=<s>.")
  c = base_config()
  c.seed = _count(values, "seed", 0)
  c.data.name = "digits"
  c.data.transform.name = "inject" if beta > 0 or "perp" in flags else "none"
  c.data.transform.beta = beta
  c.data.transform.remove_projection = "perp" in flags
  c.data.transform.carrier = "sign" if "sign" in flags or values["data"] == "cifar10" else "dct"
  c.model.name, c.model.width, c.model.batch_norm = "cnn", 32, True
  c.optimizer.learning_rate = 0.2
  c.optimizer.schedule = "cyclic"
  c.optimizer.weight_decay = 5e-4
  c.batch_size = 64
  c.num_epochs = 15.0
  c.log_every_steps = 11
  c.train.mode = "A"
  if method == "pgd":
    c.train.attack = pgd_linf(eps, num_steps=10)
    c.train.attack.unroll = 10
  else:  # with the fields it reads as None, the paper's default; to override, in pixel units of [0, 1]
    # images: --config.train.attack.noise=0.5 (the paper's noise is 2 * eps, its k = 2)
    # restarts (and random_start) too, at the only value a single-step attack takes, as pgd_linf's: an
    # override reaches build_attack's check and its message, not the locked config's AttributeError.
    c.train.attack = ml_collections.ConfigDict(dict(name="fgsm" if method == "grad_align" else method,
                                                    eps=eps, restarts=1))
    if method in ("rs_fgsm", "n_fgsm"):
      c.train.attack.random_start = True
      c.train.attack.step_size = ml_collections.FieldReference(None, field_type=float)
    if method == "n_fgsm":
      c.train.attack.noise = ml_collections.FieldReference(None, field_type=float)
  c.train.grad_align = _number(values, "lambda") if method == "grad_align" else 0.0
  c.train.co_monitor.every_steps = 11  # half an epoch of the 22 steps of 64 digits
  c.train.co_monitor.num_examples = 256
  c.train.co_monitor.attack = pgd_linf(eps, num_steps=10)
  c.train.co_monitor.attack.unroll = 10
  c.eval_attacks.pgd = pgd_linf(eps, num_steps=20)
  c.save_adversarial = False
  c.kernel.logits = "0"
  if values["data"] == "cifar10":
    _cifar10(c, eps)
  if "smoke" in flags:
    c.model.width = 16
    c.num_epochs = 3.0
  return c


def _cifar10(c: ml_collections.ConfigDict, eps: float) -> None:
  """Ortiz-Jimenez et al.'s CIFAR-10 setting (gortizji/co_features): 30 epochs of a cyclic learning
  rate peaking at 0.2 halfway, batch 128, no augmentation (their loaders have none; a crop or flip
  after injection would move the class features), their sign-pattern carrier, PGD-50 at step 2/255
  with 10 restarts at the end; the monitor every half epoch on 1024 test images; eps, beta in
  [0, 1] pixel units (8/255 = 0.0314). Ours is the CIFAR ResNet-18 without input normalisation
  where theirs is a PreActResNet-18 with it. Needs the tfds dataset and, in practice, a GPU (not
  run here)."""
  c.data.name = "cifar10"
  c.data.augment = "none"
  c.optimizer.peak_fraction = 0.5
  c.model.name, c.model.width, c.model.batch_norm = "resnet18", 64, True
  c.batch_size, c.eval_batch_size = 128, 1024  # theirs (batch_size_test), divides 8-1024 devices
  c.num_epochs = 30.0
  c.log_every_steps = 100
  c.train.co_monitor.every_steps = 195  # half an epoch of 390 steps
  c.train.co_monitor.num_examples = 1024
  c.eval_attacks.pgd = pgd_linf(eps, num_steps=50, step_size=2 / 255, restarts=10)


SWEEP_METHODS = ("fgsm", "n_fgsm", "grad_align")
# Injected feature sizes of the sweep, by dataset: on digits up to 0.8 of eps 0.25; on CIFAR-10
# 0 to 8/255 in steps of 2/255 (the authors' default is beta = eps = 8/255).
SWEEP_BETAS = {"digits": ("0", "0.1", "0.15", "0.2"),
               "cifar10": tuple(f"{k / 255:.4g}" for k in (0, 2, 4, 6, 8))}


def get_sweep(arg: str = "") -> list[dict[str, str]]:
  """Methods x beta (SWEEP_METHODS, SWEEP_BETAS) x `seeds`, everything else of `arg` kept (eps,
  data, flags); one work unit and workdir each, named like <method>_b<beta>_e<eps> (with seeds=K > 1,
  _s<seed> appended: single runs on digits differ from machine to machine, compare over seeds):

    python xm_launch/launch.py --config configs/catastrophic_overfitting.py:eps=0.25,seeds=3 \\
        --workdir_root $PWD/workdirs/co
  """
  values, flags = _parse(arg)
  eps = values["eps"] or f"{DATASETS[values['data']]:.4g}"
  seeds = _count(values, "seeds", 1)
  seed_list = range(seeds) if seeds > 1 else [_count(values, "seed", 0)]
  sweep_keys = ("method", "beta", "seed", "seeds", "lambda")  # lambda: grad_align units only
  kept = [f"{k}={v}" for k, v in values.items() if k not in sweep_keys and v != DEFAULTS[k]]
  weight = [f"lambda={values['lambda']}"] if values["lambda"] != DEFAULTS["lambda"] else []
  units = []
  for method in SWEEP_METHODS:
    for beta in SWEEP_BETAS[values["data"]]:
      for seed in seed_list:
        items = ([f"method={method}", f"beta={beta}", f"seed={seed}"] + kept
                 + (weight if method == "grad_align" else []) + sorted(flags))
        units.append({"name": f"{method}_b{beta}_e{eps}" + (f"_s{seed}" if seeds > 1 else ""),
                      "arg": ",".join(items)})
  return units
