"""The default demo: the small CNN (with BatchNorm) on scikit-learn's handwritten digits.

The digits ship inside scikit-learn, so this runs with no network. Benign training (mode C):

    python main.py --config configs/digits.py --workdir workdirs/digits

Adversarial training (mode A, L-inf PGD-7 at eps 0.1 on [0, 1] pixels):

    python main.py --config configs/digits.py:adversarial --workdir workdirs/digits_adversarial

Phase 2 (Loo et al.): benign phase 1, then the centered linearization around the epoch-3
checkpoint trained for 5 epochs (SGD lr 0.01, momentum 0.9), evaluated under
<workdir>/phase2/centered_C_from3/:

    python main.py --config configs/digits.py:phase2 --workdir workdirs/digits_phase2

or phase 2 alone on the workdir of a phase-1 run (here the benign run above), adversarial against
the linearized model:

    python main.py --config configs/digits.py:phase2 --config.job=phase2 \
        --config.phase2.mode=A --workdir workdirs/digits

(into <workdir>/phase2/centered_A_from3/). Each phase-2 experiment lives in
<workdir>/phase2/<config.phase2.name>/ with its config.json; the default name is made of
linearization, batch_norm, mode and from_epoch, so experiments differing in other fields (e.g. the
optimizer) need `--config.phase2.name=...`. `--config.loaders=CA` sets both modes at once, as Loo
et al.'s `--loaders`. Evaluate phase 2's epoch-2 checkpoint again (results in its directory):

    python main.py --config configs/digits.py:phase2 --config.job=evaluate \
        --config.evaluate.phase=2 --config.evaluate.epoch=2 --workdir workdirs/digits_phase2

All runs evaluate clean accuracy and robust accuracy under L-inf PGD-20 and APGD-CE-20 at eps 0.1 on
the 360 test images, and save the adversarial examples under <workdir>/adversarial/.
Measured (2 CPU cores of an AMD EPYC VM, 15 epochs, 2026-12-01): benign 99.7% clean, 54.2% PGD-20,
51.9% APGD-CE-20 (about 30 s); adversarial 99.7% clean, 90.8% PGD-20, 90.6% APGD-CE-20 (about 1
minute). Other CPUs round differently: see the README.
The empirical NTK of the newest checkpoint for logit 0 on 500 class-balanced training images (Loo et
al.'s per-logit kernels), streamed to <workdir>/kernels/phase1_epoch15_train500_class0/ (`make demo`
runs it on both workdirs; about 10 s each on 2 CPU cores, one 500 x 500 tile):

    python main.py --config configs/digits.py --config.job=kernel --workdir workdirs/digits

`--config.kernel.logits=trace` (sum over the 10 logits, ~10x the cost), `=full` ([500, 500, 10, 10]),
`--config.kernel.phase=2` for a phase-2 model, `--config.kernel.epoch=0.5` for an earlier checkpoint
(`=0`: the initialisation).

`:autoattack` (e.g. `:adversarial,autoattack` with `--config.job=evaluate`) also evaluates APGD-CE +
APGD-T (9 targets) + FAB-T (9 targets) + Square (1000 queries), AutoAttack's standard version with
20-step APGD and FAB, per example the worst case, each attack on the examples still robust: 90.3%
for the adversarial model (all from APGD-CE), 52.8% benign (APGD-CE 54.2%, then APGD-T; 3m11s
beside a test run and 2m44s on 2 CPU cores). Every attack on every example, before: 90.0% and
52.5% (53.1% without FAB-T and with Square before its colour redraws; FAB-T alone 90.8% and 56.1%).
`:autoattack_l2` runs the same four attacks in L2 at eps 0.5 (`EPS_L2`): 80.6% for the adversarial
(L-inf-trained) model, 51.9% benign (clean 99.4% / 99.7%; 2m52s and 4m27s on 2 CPU cores, the
second beside other jobs).

Add `smoke` (e.g. `:smoke` or `:adversarial,smoke`) for a narrower CNN trained for 3 epochs in
seconds, for smoke tests. Training metrics are logged every 50 steps (of the 22 in an epoch of 64
digits), every 10 in `smoke`.
"""

import ml_collections

from ntk_scale.base_config import (apgd_linf, autoattack, base_config, parse_variants,
                                   pgd_linf)

EPS = 0.1
EPS_L2 = 0.5  # `:autoattack_l2`; an 8x8 image's L-inf ball of 0.1 reaches 0.8 in L2 at its corners
VARIANTS = ("adversarial", "autoattack", "autoattack_l2", "phase2", "smoke")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variants = parse_variants(arg, VARIANTS, "configs/digits.py")
  c = base_config()
  c.data.name = "digits"
  c.model.name = "cnn"
  c.model.width = 32
  c.model.batch_norm = True
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 5e-4
  c.batch_size = 64
  c.num_epochs = 15.0
  c.log_every_steps = 50
  c.eval_attacks.pgd = pgd_linf(EPS, num_steps=20)
  c.eval_attacks.apgd = apgd_linf(EPS, num_steps=20)
  c.train.attack = pgd_linf(EPS, num_steps=7)  # used by modes A and F (also via loaders)
  c.train.attack.unroll = 7  # an unrolled attack loop trains 2x faster on XLA:CPU
  if "adversarial" in variants:
    c.train.mode = "A"
  if "autoattack" in variants:  # also APGD-CE + APGD-T + FAB-T + Square, per example the worst case
    c.eval_attacks.autoattack = autoattack(EPS, num_steps=20, fab_steps=20, square_queries=1000)
  if "autoattack_l2" in variants:  # the same four attacks in L2
    c.eval_attacks.autoattack_l2 = autoattack(EPS_L2, "l2", num_steps=20, fab_steps=20,
                                              square_queries=1000)
  c.phase2.attack = pgd_linf(EPS, num_steps=7)  # phase-2 mode A
  c.phase2.attack.unroll = 7
  if "phase2" in variants:
    c.phase2.num_epochs = 5.0
    c.phase2.from_epoch = 3.0
  c.kernel.logits = "0"  # per logit, as Loo et al.; 500 class-balanced training images (the default)
  if "smoke" in variants:
    c.model.width = 16
    c.num_epochs = 3.0
    c.log_every_steps = 10
  return c
