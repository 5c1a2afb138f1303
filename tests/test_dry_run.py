"""`--dry_run`: loops counted as often as they run, hand-derived FLOPs of a tiny MLP, memory per
device from the partitioned program, refusal of plans that do not fit, nothing written."""

import copy
import json
import logging
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app

from ntk_scale import dry_run as dry_run_module
from ntk_scale import cost_analysis, infinite, jobs, parallel
from ntk_scale.base_config import pgd_linf
from ntk_scale.checkpoint import CheckpointNotFoundError, Checkpoints
from ntk_scale.cost_analysis import program_flops
from ntk_scale.data import load_digits
from ntk_scale.data.catalog import SHAPES, dataset_shape
from ntk_scale.dry_run import parse_matmul_rates
from ntk_scale.linearize import LinearizedModel
from ntk_scale.models import build_model
from ntk_scale.ntk import KernelPlanError, fit_plan
from ntk_scale.ntk.eigen_features import feature_groups
from ntk_scale.ntk.job import inference_apply, plan_settings
from ntk_scale.workdir import WorkdirConfigMismatchError, record_or_check

from main_py_flags import main_py_in_process
from test_train import load_config
from conftest import neural_tangents_or_skip, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 64
MATMUL = 2 * N**3


def test_static_loops_count_every_iteration_and_nested_loops_multiply():
  a = jax.ShapeDtypeStruct((N, N), jnp.float32)
  inner = lambda x: jax.lax.fori_loop(0, 5, lambda i, y: y @ x, x)
  outer = lambda x: jax.lax.fori_loop(0, 3, lambda i, y: inner(y), x)
  scanned = lambda x: jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=7)[0]
  # Up to a few FLOPs per iteration of loop-counter arithmetic.
  assert program_flops(inner, a).flops == pytest.approx(5 * MATMUL, abs=100)
  assert program_flops(outer, a).flops == pytest.approx(15 * MATMUL, abs=100)
  assert program_flops(jax.jit(scanned), a).flops == pytest.approx(7 * MATMUL, abs=100)
  assert program_flops(outer, a).unbounded_loops == 0


def test_unrolled_loops_count_each_iteration_once():
  """XLA's count of an unrolled scan already holds `unroll` copies of the body and one per leftover
  iteration (unroll 2 of 8 read as 9 matmuls, 8 of 8 as 15, 7 of 20 as 32)."""
  a = jax.ShapeDtypeStruct((N, N), jnp.float32)
  for length in (8, 20):
    for unroll in (1, 2, 3, 4, 7, 8, 20, 64, True):
      loop = lambda x: jax.lax.fori_loop(0, length, lambda i, y: y @ x, x, unroll=unroll)
      counted = program_flops(loop, a).flops
      assert counted == pytest.approx(length * MATMUL, abs=100), (length, unroll)
  nested = lambda x: jax.lax.fori_loop(
      0, 3, lambda i, y: jax.lax.fori_loop(0, 5, lambda j, z: z @ x, y, unroll=2), x, unroll=3)
  assert program_flops(nested, a).flops == pytest.approx(15 * MATMUL, abs=100)


def test_an_unrolled_attack_step_costs_what_a_rolled_one_does():
  """configs/digits.py unrolls its PGD-7 training attack 7 times (XLA:CPU runs it faster): the
  train step computes the same, and the dry run counts the same (here with a small MLP: how an
  unrolled loop is counted does not depend on the model, and the MLP compiles in a fraction of the
  CNN's time)."""
  c = load_config("digits", "adversarial,smoke")
  c.model.name, c.model.width, c.model.depth = "mlp", 16, 1
  mesh, model = parallel.make_mesh(), build_model(c.model, 10)
  flops = {}
  for unroll in (7, 1):
    c.train.attack.unroll = unroll
    (step,) = dry_run_module._train_programs(  # pylint: disable=protected-access
        c, mesh, c.train, c.optimizer, model, c.num_epochs, 0.0, c.seed, "phase 1",
        "config.num_epochs")
    flops[unroll] = step.flops_per_call
  assert flops[7] == pytest.approx(flops[1], rel=0.01)


def test_loops_of_traced_length_are_reported():
  a = jax.ShapeDtypeStruct((N, N), jnp.float32)
  n = jax.ShapeDtypeStruct((), jnp.int32)
  counted = program_flops(lambda x, n: jax.lax.fori_loop(0, n, lambda i, y: y @ x, x), a, n)
  assert counted.unbounded_loops == 1
  assert counted.flops == pytest.approx(MATMUL, abs=100)  # once, as the report says


def test_flops_are_counted_on_a_backend_that_analyses_no_lowered_program(monkeypatch, caplog):
  """jax's CUDA and TPU plugins (reached through the PJRT C API) analyse no lowered program, and
  jax answers None: on the H200 of 2026-12-04 every count was 0, so kernel plans took each
  example's forward pass at the floor of 2 FLOPs per parameter (ResNet-18: 22 MFLOP, not 1 GFLOP).
  Here the default device answers as such a plugin does; counts are made for the host's CPU, else
  from the compiled program, and are 0 only where that has no analysis either."""
  from jax._src import config as jax_config, xla_bridge  # pylint: disable=import-outside-toplevel
  a = jax.ShapeDtypeStruct((N, N), jnp.float32)
  loop = lambda x: jax.lax.fori_loop(0, 5, lambda i, y: y @ x, x)
  monkeypatch.setattr(xla_bridge, "using_pjrt_c_api",
                      lambda backend=None: jax_config.default_device.value is None)
  assert jax.jit(loop).lower(a).cost_analysis() is None  # the plugin's answer
  cost_analysis._warn_once.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    assert program_flops(loop, a).flops == pytest.approx(5 * MATMUL, abs=100)
    weights = jnp.ones((N, N))  # closed over, as a model's BatchNorm averages often are
    assert program_flops(lambda x: x @ weights, a).flops == pytest.approx(MATMUL, abs=100)
  assert "counted after compilation" not in caplog.text  # counted for the CPU, as lowered
  monkeypatch.setattr(xla_bridge, "using_pjrt_c_api", lambda backend=None: True)  # no CPU either
  with caplog.at_level(logging.WARNING):  # then as compiled, where XLA:GPU's cuDNN calls count 0
    assert program_flops(lambda x: x @ x @ x, a).flops == pytest.approx(2 * MATMUL, abs=100)
  assert "counted after compilation" in caplog.text
  monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: None)
  with caplog.at_level(logging.WARNING):
    assert program_flops(lambda x: x @ x, a).flops == 0
  assert "No cost analysis of programs" in caplog.text


def test_catalog_matches_the_loaded_digits_and_the_tfds_features():
  digits = load_digits()
  assert SHAPES["digits"] == (digits.train.images.shape[1:], len(digits.train), len(digits.test))
  tfds = pytest.importorskip("tensorflow_datasets")
  for name, (shape, _, _) in SHAPES.items():
    if name != "digits":
      assert tfds.builder(name, data_dir="/nonexistent").info.features["image"].shape == shape, name


def test_catalog_split_sizes_are_the_tfds_documented_ones():
  """The split sizes on the TFDS catalog pages, written out here: the dry run sizes evaluation and
  kernel programs of a dataset that is not on this machine from them."""
  documented = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000),
                "mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000),
                "svhn_cropped": (73_257, 26_032), "digits": (1_797 - 360, 360)}
  assert set(SHAPES) == set(documented)
  for name, (_, train, test) in SHAPES.items():
    assert (train, test) == documented[name], name


def mlp_config(**fields):
  c = load_config("digits", "smoke")
  c.model.name, c.model.width, c.model.depth = "mlp", 16, 1
  c.num_epochs = 2
  c.batch_size, c.eval_batch_size = 32, 40
  c.eval_attacks = ml_collections.ConfigDict()
  for key, value in fields.items():
    c[key] = value
  return c


def _by_name(plan):
  return {p.name: p for p in plan.programs}


def test_train_job_counts_match_the_dataset_and_the_mlp_by_hand():
  c = mlp_config()
  c.eval_attacks = ml_collections.ConfigDict({"fgsm": {"name": "fgsm", "eps": 0.1}})
  plan = jobs.dry_run(c)
  programs = _by_name(plan)
  digits = load_digits()
  steps = len(digits.train) // c.batch_size * c.num_epochs
  assert programs["phase 1 benign step"].calls == steps
  clean = programs["phase 1 clean evaluation"]
  assert clean.calls == -(-len(digits.test) // c.eval_batch_size)
  # One forward pass (its logits give the clean predictions too) of 64 -> 16 -> 10 on 40 images,
  # 2 FLOPs per multiply-add; XLA adds the bias, ReLU and loss arithmetic on top (a few percent).
  matmuls = 2 * c.eval_batch_size * (64 * 16 + 16 * 10)
  assert matmuls <= clean.flops_per_call <= 1.15 * matmuls
  # Under FGSM: the clean forward pass (whose predictions also choose the examples to attack), FGSM's
  # forward and input gradient (backward through both layers: one forward's matmuls), and the forward
  # pass on the attacked images. A second clean forward pass would add one more (5x).
  assert 4 * matmuls <= programs["phase 1 evaluation under fgsm"].flops_per_call <= 4.6 * matmuls
  # A train step: forward, and backward with respect to both layers' weights and the hidden
  # activations (the input gradient is not needed): 3x the forward matmuls, except the first
  # layer's input gradient.
  step = 2 * c.batch_size * (64 * 16 * 2 + 16 * 10 * 3)
  assert step <= programs["phase 1 benign step"].flops_per_call <= 1.2 * step
  assert plan.num_devices == 4
  assert plan.flops == sum(p.calls * p.flops_per_call for p in plan.programs)


def test_each_program_is_timed_at_the_rate_of_its_matmuls(monkeypatch):
  """Training and evaluation run at the backend's default precision (TF32 on GPUs, one bfloat16
  pass on TPUs: rates several times HIGHEST's), phase 1 in config.train.compute_dtype; a bound
  from HIGHEST's rate would overstate their time there. Here each kind gets its own fake rate."""
  fake = {("highest", "float32"): 1e9, ("default", "float32"): 2e9, ("default", "bfloat16"): 4e9}
  monkeypatch.setattr(dry_run_module, "matmul_rate",
                      lambda precision, dtype="float32": fake[precision, dtype])
  c = mlp_config()
  c.train.compute_dtype = "bfloat16"
  plan = jobs.dry_run(c)
  programs = _by_name(plan)
  step, clean = programs["phase 1 benign step"], programs["phase 1 clean evaluation"]
  assert (step.matmul, clean.matmul) == (("bfloat16", "default"), ("float32", "default"))
  assert plan.seconds(step) == pytest.approx(step.flops / 4 / 4e9)
  assert plan.seconds(clean) == pytest.approx(clean.flops / 4 / 2e9)
  assert "measured matmul rate bfloat16 at DEFAULT 4 GFLOP/s, float32 at DEFAULT 2 GFLOP/s" in plan.describe()
  c = mlp_config(job="kernel")
  c.kernel.num_examples = 40
  plan = jobs.dry_run(c)
  (kernel,) = plan.programs
  assert plan.seconds(kernel) == pytest.approx(kernel.device_flops_per_call / 1e9)


def test_a_float64_spectrum_is_timed_at_the_float64_rate(monkeypatch):
  """The LOBPCG rounds run in config.spectrum.dtype at config.spectrum.precision, the kernel in
  config.kernel's: each is timed at its own rate, float64's measured with x64 on (off, the probe's
  float64 matrices would be float32 and time float32's rate)."""
  fake = {("highest", "float32"): 1e9, ("default", "float64"): 2.5e8}

  def rate(precision, dtype="float32"):
    assert jnp.zeros((), dtype).dtype == np.dtype(dtype), f"{dtype} probed without x64"
    return fake[precision, dtype]

  monkeypatch.setattr(dry_run_module, "matmul_rate", rate)
  c = mlp_config(job="spectrum")
  c.kernel.num_examples, c.kernel.tile_size = 100, 30
  c.spectrum.method, c.spectrum.num_eigenpairs, c.spectrum.oversample = "sharded", 10, 5
  c.spectrum.dtype, c.spectrum.precision = "float64", "default"
  plan = jobs.dry_run(c)
  kernel, rounds = plan.programs
  assert (kernel.matmul, rounds.matmul) == (("float32", "highest"), ("float64", "default"))
  assert plan.seconds(rounds) == pytest.approx(rounds.flops / 4 / 2.5e8)
  assert plan.seconds(kernel) == pytest.approx(kernel.device_flops_per_call / 1e9)
  assert ("measured matmul rate float32 at HIGHEST 1 GFLOP/s, float64 at DEFAULT 0.25 GFLOP/s"
          in plan.describe())
  c.job, c.kernel.dtype = "kernel", "float64"  # and a float64 kernel at float64's rate
  fake["highest", "float64"] = 5e8
  (kernel,) = jobs.dry_run(c).programs
  assert kernel.matmul == ("float64", "highest")


def test_the_dry_run_refuses_what_the_jobs_refuse_before_compute():
  """jobs.check_config (the seed, for every job), the eigen_features job's batch size over the
  devices (whatever the kernel's source), phase 2's checkpoint interval and, for every job that
  reads phase 2, its name: refused by the dry run as by the job, before anything is computed."""
  for job in ("kernel", "spectrum", "evolution", "eigen_features", "eigen_images", "report"):
    with pytest.raises(ValueError, match=r"config\.seed=-1 "):
      jobs.dry_run(mlp_config(job=job, seed=-1))
  for c in (mlp_config(), load_config("infinite_width", "smoke")):
    c.job, c.kernel.num_examples, c.eigen_features.batch_size = "eigen_features", 100, 7
    c.eigen_features.source = "empirical" if c.get("infinite") is None else "infinite"
    with pytest.raises(ValueError, match=r"config\.eigen_features\.batch_size=7 must be a positive "
                                         r"multiple of the device count \(4 devices\)"):
      jobs.dry_run(c)
  c = mlp_config(job="phase2")
  c.phase2.num_epochs, c.phase2.checkpoint_every_epochs = 1.0, 1e-6
  with pytest.raises(ValueError, match=r"config\.phase2\.checkpoint_every_epochs=1e-06 .* 0 steps"):
    jobs.dry_run(c)
  c = mlp_config(job="evaluate")
  c.evaluate.phase, c.phase2.name = 2, "a/b"
  with pytest.raises(ValueError, match=r"config\.phase2\.name='a/b' must be a directory name"):
    jobs.dry_run(c)
  c.job, c.kernel.phase, c.kernel.num_examples = "kernel", 2, 100
  with pytest.raises(ValueError, match=r"config\.phase2\.name='a/b'"):
    jobs.dry_run(c)
  c.kernel.phase = 1  # phase 1's kernel reads no phase 2
  jobs.dry_run(c)


def test_attack_steps_are_counted_and_memory_is_per_device():
  costs, plans = [], []
  for steps in (2, 3, 4):
    c = mlp_config()
    c.eval_attacks.pgd = load_config("digits", "adversarial").train.attack
    c.eval_attacks.pgd.num_steps = steps
    plans.append(_by_name(jobs.dry_run(c)))
    costs.append(plans[-1]["phase 1 evaluation under pgd"].flops_per_call)
  assert costs[2] - costs[1] == pytest.approx(costs[1] - costs[0], rel=1e-6)
  per_step = costs[1] - costs[0]  # a forward and an input gradient of 40 images
  assert per_step >= 2 * 40 * (64 * 16 + 16 * 10) * 2

  # A worst_of is planned member by member, as evaluate runs it: each row is that attack alone.
  pgd = load_config("digits", "adversarial").train.attack.to_dict()
  c = mlp_config()
  c.eval_attacks.worst = ml_collections.ConfigDict(dict(
      name="worst_of", eps=pgd["eps"], attacks=dict(fgsm=dict(name="fgsm"),
                                                    pgd=dict(pgd, num_steps=2, eps=None))))
  programs = _by_name(jobs.dry_run(c))
  assert "phase 1 evaluation under worst" not in programs
  member = programs["phase 1 evaluation under worst: pgd, at most every example"]
  assert member.flops_per_call == costs[0]
  assert 0 < programs["phase 1 evaluation under worst: fgsm, at most every example"].flops_per_call < costs[0]

  step = plans[0]["phase 1 benign step"]  # the train step of mlp_config(), whatever it evaluates
  params = 64 * 16 + 16 + 16 * 10 + 10
  batch_per_device = (32 // 4) * (64 + 1) * 4
  # The replicated state (parameters and the optimizer's momentum) is whole on every device; the
  # batch is split four ways.
  assert params * 4 + batch_per_device <= step.bytes_per_device < 4 * (3 * params * 4 + 32 * 65 * 4)


def test_plans_that_do_not_fit_are_refused_naming_the_setting(monkeypatch):
  """Refused as soon as the program that does not fit is compiled, not after every program of the
  job (a ResNet's attacks compile for minutes)."""
  monkeypatch.setattr(dry_run_module, "device_budget_bytes", lambda device: 1000.0)
  compiled, program = [], dry_run_module._program
  monkeypatch.setattr(dry_run_module, "_program",
                      lambda name, *args, **kwargs: compiled.append(name) or program(name, *args, **kwargs))
  with pytest.raises(dry_run_module.PlanDoesNotFit,
                     match=r"phase 1 benign step needs .* budget is 9.31e-07 GiB; lower config.batch_size"):
    jobs.dry_run(mlp_config())
  assert compiled == ["phase 1 benign step"]
  monkeypatch.undo()
  c = mlp_config(job="kernel")
  c.kernel.memory_budget_gb = 1e-9
  with pytest.raises(KernelPlanError, match="config.kernel.memory_budget_gb"):
    jobs.dry_run(c)


def test_kernel_plan_is_the_engine_plan():
  c = mlp_config(job="kernel")
  c.kernel.num_examples, c.kernel.tile_size = 100, 30
  plan = jobs.dry_run(c)
  (kernel,) = plan.programs
  # 4 row blocks, upper triangle; the MLP's two dense layers kept as factors (factored_layers.py).
  assert kernel.name.startswith("kernel: method jacobian, tile 30, 2 layers factored (1,184 "
                                "parameters), 10 tiles")
  assert kernel.calls == 1
  # Its time is the busiest device's through the lockstep steps: 10 tiles do not split evenly
  # over 4 devices.
  assert kernel.device_flops_per_call > kernel.flops_per_call / plan.num_devices == kernel.flops / 4
  assert kernel.matmul == ("float32", "highest")  # config.kernel.precision
  assert plan.seconds(kernel) == pytest.approx(kernel.device_flops_per_call / plan.matmul_rates[kernel.matmul])
  c.job, c.evolution.epochs = "evolution", (1.0, 2.0)
  evolution = jobs.dry_run(c)
  assert evolution.programs[0].calls == 2
  assert evolution.seconds(evolution.programs[0]) == pytest.approx(
      2 * kernel.device_flops_per_call / evolution.matmul_rates[kernel.matmul])
  assert len(evolution.programs) == 1 and "every eigenpair of each 100-row kernel" in evolution.notes[-1]
  # The spectrum job's LOBPCG rounds for each checkpoint's top eigenpairs (num_eigenvalues here).
  c.evolution.eigensolver, c.evolution.num_eigenvalues, c.evolution.top_k = "top", 5, 3
  c.spectrum.round_iters = 20
  _, rounds = jobs.dry_run(c).programs
  assert rounds.name == "spectrum: top 5 of 100 rows, LOBPCG round"
  assert rounds.calls == 2 * 20  # 2 checkpoints, at most 400 / 20 rounds each
  # An epoch the config's schedule does not save is refused, as the job refuses it.
  c.evolution.epochs = (0.3, 2.0)
  with pytest.raises(ValueError, match=r"config.evolution.epochs includes 0.3, which phase 1 did not "
                                       r"save; saved epochs: \[0.0, "):
    jobs.dry_run(c)


def test_phase2_jobs_are_planned_with_the_linearized_model():
  """A kernel of config.kernel.phase=2 (and of config.evolution.phase=2) is the engine's plan for
  phase 2's linearized model, not the network's; an evaluation of config.evaluate.phase=2 likewise
  evaluates the linearized model (the network's forward pass and a Jacobian-vector product:
  about twice its FLOPs)."""
  c = mlp_config(job="kernel")
  c.kernel.num_examples, c.kernel.tile_size = 100, 30
  (network,) = jobs.dry_run(c).programs
  c.kernel.phase = 2
  (linearized,) = jobs.dry_run(c).programs
  model = build_model(c.model, 10)
  theta0 = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  linearized_model = LinearizedModel(model, theta0["params"], theta0["batch_stats"], c.phase2.linearization,
                                     c.phase2.batch_norm)
  engine = fit_plan(inference_apply(linearized_model), theta0["params"], np.zeros((100, 8, 8, 1), np.float32), None, c.kernel.logits,
                    precision="highest", **plan_settings(c.kernel), model_state=theta0["batch_stats"])
  assert linearized.name == f"kernel: {engine.layout()}, 10 tiles" and "factored" not in linearized.name
  assert linearized.flops_per_call == engine.flops > 2 * network.flops_per_call
  c.kernel.phase, c.job, c.evolution.epochs, c.evolution.phase = 1, "evolution", (1.0, 2.0), 2
  assert jobs.dry_run(c).programs[0].flops_per_call == engine.flops
  c = mlp_config(job="evaluate")
  (plain,) = jobs.dry_run(c).programs
  c.evaluate.phase = 2
  plan = jobs.dry_run(c)
  (phase2,) = plan.programs
  assert phase2.name == "evaluate phase 2 clean evaluation"
  assert 1.8 * plain.flops_per_call < phase2.flops_per_call < 4 * plain.flops_per_call
  assert "evaluate: phase 2's output components" in plan.notes[0]
  c.job, c.phase2.num_epochs = "phase2", 1.0  # phase 2's own final evaluation measures them too
  assert any("phase2: phase 2's output components" in n for n in jobs.dry_run(c).notes)
  c.job = "evaluate"
  c.evaluate.transfer_sets = ("a/adversarial/pgd", "b/adversarial/pgd")
  assert any("then 2 saved set(s) of config.evaluate.transfer_sets" in n for n in jobs.dry_run(c).notes)
  c.evaluate.transfer_sets = ("a/pgd", "a/pgd")
  with pytest.raises(ValueError, match=r"config\.evaluate\.transfer_sets lists one set more than once"):
    jobs.dry_run(c)
  c.evaluate.transfer_sets = (2024,)  # what --config.evaluate.transfer_sets=(2024,) parses to
  with pytest.raises(ValueError, match=r"config\.evaluate\.transfer_sets holds 2024; expected the "):
    jobs.dry_run(c)
  c.evaluate.phase = 3
  with pytest.raises(ValueError, match=r"config\.evaluate\.phase=3; expected 1"):
    jobs.dry_run(c)


def test_a_class_subset_is_sized_from_the_digits_labels():
  """Every example of the listed classes (num_examples=0): the embedded digits' own count, as the
  kernel job selects it, not an even share of the split."""
  c = mlp_config(job="evolution")
  c.kernel.num_examples, c.kernel.classes, c.evolution.epochs = 0, (8,), (1.0, 2.0)
  count = int(np.sum(load_digits().train.labels == 8))
  assert f"each {count}-row kernel" in jobs.dry_run(c).notes[-1]


def test_the_report_job_is_planned_as_nothing_to_compute():
  """Without programs there is no rate to print (it read "measured matmul rate  per device") and no
  time to bound ("at least 0 s"): the description says so plainly."""
  plan = jobs.dry_run(mlp_config(job="report"))
  assert plan.programs == [] and plan.flops == 0 and "report/index.html" in plan.notes[0]
  description = plan.describe()
  assert "no device programs: nothing to compile, count or time" in description
  assert "matmul rate" not in description and "at least" not in description
  given = jobs.dry_run(mlp_config(job="report"), matmul_flops_per_s=5e13).describe()
  assert "matmul rate" not in given and "no device programs" in given


def test_kernel_subsets_are_refused_as_the_kernel_job_refuses_them():
  """Before any compile: with the digits' own labels (class 8 has 139 train images), and for a
  dataset not on this machine from the catalog's split size (its counts per class unknown); the
  infinite job's subset too."""
  c = mlp_config(job="kernel")
  c.kernel.num_examples = 25
  with pytest.raises(ValueError, match=r"config\.kernel\.num_examples=25 .* a multiple of 10"):
    jobs.dry_run(c)
  c.kernel.num_examples = 1400
  with pytest.raises(ValueError, match=r"takes 140 train examples of each class, but class 8 has 139"):
    jobs.dry_run(c)
  c.kernel.num_examples, c.kernel.classes = 20, (3, 3)
  with pytest.raises(ValueError, match=r"config\.kernel\.classes=\(3, 3\) lists class\(es\) \[3\]"):
    jobs.dry_run(c)
  c.data.name, c.kernel.classes, c.kernel.num_examples = "cifar10", (), 50_010
  with pytest.raises(ValueError, match=r"num_examples=50010 .* in \[10, 50000\]"):
    jobs.dry_run(c)
  c = mlp_config(job="spectrum")  # k against a subset only the labels size (the whole classes 0, 1)
  c.kernel.num_examples, c.kernel.classes, c.spectrum.num_eigenpairs = 0, (0, 1), 400
  n = int(np.isin(load_digits().train.labels, (0, 1)).sum())
  with pytest.raises(ValueError, match=rf"num_eigenpairs=400 is more than the kernel's {n} rows"):
    jobs.dry_run(c)
  c = load_config("infinite_width", "smoke")  # the infinite job's subset, likewise
  c.infinite.num_train = 1400
  with pytest.raises(ValueError, match=r"config\.infinite\.num_train=1400 takes 140 training"):
    jobs.dry_run(c)


def test_eigen_jobs_plan_their_kernel_and_for_large_kernels_the_spectrum_rounds():
  """eigen_features / eigen_images: the kernel job's plan, then either a dense decomposition (a
  note) or, with eigensolver top (auto above DENSE_MAX_ROWS), the spectrum job's LOBPCG rounds for
  max(config.spectrum.num_eigenpairs, what the job needs) eigenpairs; settings checked first."""
  c = mlp_config(job="eigen_features")
  c.kernel.num_examples, c.kernel.logits, c.kernel.tile_size = 100, "0", 30
  plan = jobs.dry_run(c)
  kernel, directions, clean, attacked = plan.programs
  assert kernel.name.startswith("kernel: method jacobian, tile 30, 2 layers factored (1,184 "
                                "parameters), 10 tiles")
  assert "every eigenpair of the 100-row kernel" in plan.notes[0]
  # The parameter directions J(X)^T A (A: every group of a rank-100 kernel and their sum, 10
  # classes) on 4 devices: at least their contraction's multiply-adds, 25 images per device.
  params = 64 * 16 + 16 + 16 * 10 + 10
  rows = len(feature_groups(np.ones(100), c.eigen_features.num_single)) + 1
  assert directions.name == (f"eigen_features: parameter directions ({rows - 1} groups at most), "
                             "25 images per device")
  assert directions.calls == 1 and directions.flops_per_call >= 2 * 100 * rows * 10 * params
  # Each group's predictor on the 360 test images in batches of 120, clean and under PGD-10:
  # per image at least the contraction of its Jacobian row with the 10 directions.
  assert clean.name.endswith(f"({rows - 1} groups and all at most), clean")
  assert clean.calls == attacked.calls == rows * 3
  assert clean.flops_per_call >= 2 * 120 * 10 * params
  assert attacked.name.endswith("under pgd") and attacked.flops_per_call > 10 * clean.flops_per_call
  c.eigen_features.eigensolver, c.spectrum.num_eigenpairs, c.eigen_features.num_single = "top", 5, 8
  plan = jobs.dry_run(c)
  assert [p.name for p in plan.programs][1:3] == [
      "spectrum: top 8 of 100 rows, LOBPCG round",
      "eigen_features: parameter directions (8 groups at most), 25 images per device"]
  assert plan.programs[3].calls == 9 * 3
  # A trace kernel's directions are 10x larger: 9 x 10 x 10 x 1210 floats (4.4 MB, twice while
  # summed) do not fit 4 MiB; the job refuses the same before computing its kernel.
  c.kernel.logits, c.kernel.memory_budget_gb = "trace", 4 / 1024
  with pytest.raises(ValueError, match=r"parameter directions.*GiB \(config.kernel.memory_budget_gb\)"
                     r".*config.kernel.logits"):
    jobs.dry_run(c)
  # A target's budget (--dry_run_device_memory_gb) under them: the refusal names the flag that set it.
  c.kernel.memory_budget_gb = 0.0
  with pytest.raises(ValueError, match=r"parameter directions.*GiB \(--dry_run_device_memory_gb\)"):
    jobs.dry_run(c, device_memory_bytes=4 * 2**20 / 0.8)
  c = mlp_config(job="eigen_images")
  c.kernel.num_examples, c.kernel.tile_size = 100, 30
  c.eigen_images.logit, c.eigen_images.eigensolver, c.spectrum.num_eigenpairs = "3", "top", 6
  plan = jobs.dry_run(c)
  assert [p.name for p in plan.programs][1] == "spectrum: top 6 of 100 rows, LOBPCG round"
  assert "the dual weights by CG, at most 500 passes" in plan.notes[-1]
  c.eigen_images.cg_max_iters = 0
  with pytest.raises(ValueError, match="config.eigen_images.cg_max_iters=0"):
    jobs.dry_run(c)
  c = mlp_config(job="eigen_features")
  c.eigen_features.eigensolver = "lanczos"
  with pytest.raises(ValueError, match="config.eigen_features.eigensolver='lanczos'"):
    jobs.dry_run(c)


def test_a_plan_for_target_devices_uses_their_memory_and_rate():
  """--dry_run_device_memory_gb / --dry_run_tflops: the kernel's tiles follow the target's budget
  (80% of its memory), the time its rate; a budget the tile plan cannot meet is refused."""
  c = mlp_config(job="kernel")
  c.kernel.num_examples, c.kernel.logits, c.kernel.method = 200, "full", "jacobian"
  roomy = jobs.dry_run(c, device_memory_bytes=4 * 2**30, matmul_flops_per_s=1e12)
  tight = jobs.dry_run(c, device_memory_bytes=0.01 * 2**30, matmul_flops_per_s=1e12)
  assert roomy.budget_bytes == pytest.approx(0.8 * 4 * 2**30)
  assert tight.budget_bytes == pytest.approx(0.8 * 0.01 * 2**30)
  (big,), (small,) = roomy.programs, tight.programs
  tile = lambda p: int(re.search(r"tile (\d+)", p.name).group(1))
  assert tile(small) < tile(big)
  assert small.bytes_per_device <= tight.budget_bytes < big.bytes_per_device <= roomy.budget_bytes
  assert roomy.seconds(big) == pytest.approx(big.device_flops_per_call / 1e12)
  assert "devices of 4 GiB (compiled for cpu)" in roomy.describe()
  assert "given matmul rate float32 at HIGHEST 1000 GFLOP/s per device" in roomy.describe()
  # The budget is the flag's, not config.kernel.memory_budget_gb's: the refusal names the flag.
  with pytest.raises(KernelPlanError, match="but --dry_run_device_memory_gb allows") as refused:
    jobs.dry_run(c, device_memory_bytes=2**16)
  assert "memory_budget_gb" not in str(refused.value)
  with pytest.raises(ValueError, match="must be positive"):
    jobs.dry_run(c, device_memory_bytes=-1.0)


def test_target_rates_are_given_by_kind_of_matmul():
  """One rate for every program misstated half of a job: training runs at DEFAULT (TF32 on an
  H100, ~495 TFLOP/s), the kernel engine at HIGHEST (~67). --dry_run_tflops takes a rate per
  dtype:precision, with or without one for every other kind; anything else is refused by name."""
  assert parse_matmul_rates("50, float32:default=495,bfloat16:default=990") == (
      5e13, {("float32", "default"): 4.95e14, ("bfloat16", "default"): 9.9e14})
  assert parse_matmul_rates("float64:highest=1") == (None, {("float64", "highest"): 1e12})
  for bad in ("fast", "float32:turbo=5", "tf32:default=5", "float16:default=5", "float32:default=-1", "0",
              "nan"):
    with pytest.raises(ValueError, match=r"--dry_run_tflops=.* is not a rate; give TFLOP/s"):
      parse_matmul_rates(bad)
  c = mlp_config()  # training at DEFAULT, its evaluation at config.eval_matmul_precision
  c.eval_matmul_precision = "highest"
  plan = jobs.dry_run(c, matmul_flops_per_s=1e12, matmul_rates={("float32", "default"): 4e12})
  assert plan.matmul_rates == {("float32", "default"): 4e12, ("float32", "highest"): 1e12}
  step = _by_name(plan)["phase 1 benign step"]
  assert plan.seconds(step) == pytest.approx(step.calls * step.flops_per_call / 4 / 4e12)
  assert ("given matmul rate float32 at DEFAULT 4000 GFLOP/s, float32 at HIGHEST 1000 GFLOP/s"
          in plan.describe())
  mixed = jobs.dry_run(c, matmul_rates={("float32", "default"): 4e12}).describe()
  assert re.search(r"given and measured matmul rate float32 at DEFAULT 4000 GFLOP/s \(given\), "
                   r"float32 at HIGHEST [\d.]+ GFLOP/s \(measured\)", mixed)


def test_a_plan_for_tpus_refuses_what_the_job_refuses_there():
  """float64 kernels run on CPUs and GPUs, and TPUs have no float64 arithmetic: the kernel job
  refuses them there before compute, and a dry run for TPUs (--dry_run_platform=tpu) from a
  machine of another platform now does too, where it planned them."""
  c = mlp_config(job="kernel")
  c.kernel.num_examples, c.kernel.logits, c.kernel.dtype = 40, "0", "float64"
  assert "float64" in str(jobs.dry_run(c, platform="gpu").programs[0].matmul)
  with pytest.raises(ValueError, match=r"config\.kernel\.dtype='float64' cannot run on TPUs"):
    jobs.dry_run(c, device_memory_bytes=32 * 2**30, platform="tpu")
  c.kernel.dtype = "float32"
  planned = jobs.dry_run(c, device_memory_bytes=32 * 2**30, platform="tpu").describe()
  assert "on 4 tpu devices of 32 GiB (compiled for cpu)" in planned


def test_a_plan_for_an_unknown_platform_is_refused():
  """"TPU" is not "tpu": planned for it, the float64 check (devices_compute) would not have
  recognised TPUs and the plan would pass what the job refuses there."""
  c = mlp_config(job="kernel")
  c.kernel.num_examples, c.kernel.logits, c.kernel.dtype = 40, "0", "float64"
  for platform in ("TPU", "cuda"):
    with pytest.raises(ValueError, match=rf"platform '{platform}'; expected one of cpu, gpu, tpu\."):
      jobs.dry_run(c, platform=platform)
    with pytest.raises(ValueError, match=rf"platform '{platform}'; expected one of cpu, gpu, tpu\."):
      with parallel.planned_for(platform):
        pass


def test_spectrum_plan_is_the_kernel_and_the_compiled_round():
  """A full kernel of 100 examples x 10 logits: 1000 rows, split over 4 devices; a round of 20
  iterations multiplies the kernel by the starting block of k + oversample vectors, one such block
  per iteration, then by the k kept for the Ritz pairs."""
  c = mlp_config(job="spectrum")
  c.kernel.num_examples, c.kernel.logits, c.kernel.tile_size = 100, "full", 30
  c.spectrum.num_eigenpairs, c.spectrum.oversample, c.spectrum.max_iters = 20, 10, 100
  c.spectrum.round_iters = 20
  plan = jobs.dry_run(c)
  kernel, rounds = plan.programs
  assert kernel.name.startswith("kernel:") and rounds.name == "spectrum: top 20 of 1000 rows, LOBPCG round"
  assert rounds.calls == 5 and rounds.flops_per_call == 2 * 1000**2 * ((20 + 1) * 30 + 20)
  assert 1000**2 * 4 / 4 < rounds.bytes_per_device < 4 * 1000**2 * 4 / 4  # a quarter of the rows each
  # A budget under a quarter of the matrix: method auto streams from disk, method sharded is refused.
  programs, notes = dry_run_module._spectrum(c, parallel.make_mesh(), 1.5e5)  # pylint: disable=protected-access
  assert programs == [] and "streams the kernel from disk on the host" in notes[0]
  c.spectrum.method = "sharded"
  with pytest.raises(dry_run_module.PlanDoesNotFit, match="config.spectrum.memory_budget_gb"):
    dry_run_module._spectrum(c, parallel.make_mesh(), 1.5e5)  # pylint: disable=protected-access
  # A target's budget (--dry_run_device_memory_gb): the refusal names the flag that set it.
  with pytest.raises(dry_run_module.PlanDoesNotFit, match=r"budget \(--dry_run_device_memory_gb\)"):
    jobs.dry_run(c, device_memory_bytes=1.5e5 / 0.8)


def test_infinite_job_plans_its_tiles_and_each_attack_once_per_model(monkeypatch):
  """The infinite job: the training kernel's tile program (one tile per device per step; its FLOPs
  are those of the kernel function on one tile pair), the optimised set's kernel, and kernel
  regression clean and under each distinct attack, counted once per model it attacks (the
  original set's model runs both lists, PGD-2, in both, once; the optimised set's model the
  evaluation list), the robust set's programs once per outer step; a tile that does not fit is
  refused naming config.infinite.batch_size. The eigen_features job on an analytic kernel plans
  the same tile program."""


  neural_tangents_or_skip(infinite.FEATURE)
  c = load_config("infinite_width", "smoke")
  s = c.infinite
  s.update(num_train=100, depth=1, batch_size=16)
  s.attacks = ml_collections.ConfigDict({"pgd": pgd_linf(0.1, num_steps=2),
                                         "pgd1": pgd_linf(0.1, num_steps=1)})
  s.robust_data.eval_attacks = ml_collections.ConfigDict({"pgd2": pgd_linf(0.1, num_steps=2),
                                                          "pgd3": pgd_linf(0.1, num_steps=3)})
  plan = jobs.dry_run(c)
  names = [p.name for p in plan.programs]
  assert names[:2] == ["training kernel: 100 x 100 in tiles of 16, 28 tiles",
                       "optimised set's kernel: 100 x 100 in tiles of 16, 28 tiles"]
  kernel = plan.programs[0]
  assert kernel.calls == 7  # 28 tiles, 4 at a time
  block = jax.ShapeDtypeStruct((16, 8, 8, 1), np.float64)
  with jax.enable_x64(True):
    per_tile = program_flops(jax.jit(infinite.kernel_function(s, 10)), block, block).flops
  assert kernel.device_flops_per_call == pytest.approx(per_tile, rel=1e-3)
  assert kernel.flops_per_call == pytest.approx(4 * per_tile, rel=1e-3)
  calls = -(-360 // c.eval_batch_size)
  by_name = _by_name(plan)
  assert by_name["kernel regression (100 images), clean (2 model(s))"].calls == 2 * calls
  assert by_name["kernel regression under pgd (2 model(s))"].calls == 2 * calls
  assert by_name["kernel regression under pgd1 (1 model(s))"].calls == calls
  assert by_name["kernel regression under pgd3 (2 model(s))"].calls == 2 * calls
  # The robust set's 2 outer steps: the Gram in the same tiles, the 50 targets in one attack batch
  # (padded to 52 for 4 devices), the Gram's pullback in the same tiles (a VJP: dearer than the tile).
  gram, targets, pullback = plan.programs[6:]
  assert gram.name == "robust set, each step: Gram: 100 x 100 in tiles of 16, 28 tiles"
  assert gram.calls == 14 and gram.device_flops_per_call == kernel.device_flops_per_call
  assert targets.name == "robust set, each step: pgd and outer gradient, 52 targets"
  assert targets.calls == 2 and targets.flops_per_call > 0
  assert pullback.calls == 14 and pullback.device_flops_per_call > kernel.device_flops_per_call
  assert len(names) == 9 and "solved on the host" in plan.notes[0]
  # The tile is the first program that cannot fit 4 KiB: refused without planning the attacks and
  # the robust set again (their programs, planned above, would only be compiled once more).
  tiles_only = copy.deepcopy(c)
  tiles_only.infinite.attacks = ml_collections.ConfigDict()
  tiles_only.infinite.robust_data.eval_attacks = ml_collections.ConfigDict()
  tiles_only.infinite.robust_data.num_steps = 0
  with pytest.raises(dry_run_module.PlanDoesNotFit,
                     match=r"^training kernel: 100 x 100 in tiles of 16, 28 tiles needs .* lower "
                           r"config\.infinite\.batch_size or use more devices"):
    jobs.dry_run(tiles_only, device_memory_bytes=2**12)
  c.job, c.eigen_features.source, c.kernel.num_examples = "eigen_features", "infinite", 100
  (analytic,) = jobs.dry_run(c).programs
  assert analytic.name == "analytic kernel: 100 x 100 in tiles of 16, 28 tiles" and analytic.calls == 7


def test_bad_job_and_dataset_are_named():
  with pytest.raises(ValueError, match="config.job='reprot'"):
    jobs.dry_run(mlp_config(job="reprot"))
  c = mlp_config()
  c.data.name = "imagenet"
  with pytest.raises(ValueError, match="config.data.name='imagenet'"):
    dataset_shape(c.data)


def test_main_dry_run_prints_the_table_and_writes_nothing(tmp_path):
  workdir = tmp_path / "never_created"
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/digits.py:smoke", "--workdir", str(workdir),
       "--dry_run", "--config.model.name=mlp", "--config.model.width=4",
       "--dry_run_device_memory_gb=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "dry run of job 'train' on 2 devices of 2 GiB (compiled for cpu)" in out.stdout
  assert "phase 1 benign step" in out.stdout and "total" in out.stdout
  assert f"note: {workdir} holds no experiment yet: the job records this one there" in out.stdout
  assert not workdir.exists()


def test_main_passes_the_target_devices_and_the_workdir_to_the_plan(monkeypatch, capsys):
  """main.py's --dry_run_* flags reach jobs.dry_run as the plan takes them: GiB as bytes, the rates
  in FLOP/s (every program's, then per dtype:precision), the platform and the workdir whose record
  the plan reads; only the plan is printed, by process 0 alone, and no job runs. A rate it cannot
  read is a usage error (absl prints it with the usage), and without the flags the plan is for
  these devices."""
  planned = []
  monkeypatch.setattr(jobs, "dry_run", lambda *args: planned.append(args) or types.SimpleNamespace(
      describe=lambda: "the plan"))
  monkeypatch.setattr(jobs, "run", lambda config, workdir: pytest.fail("the job ran"))
  targets = ("--dry_run_device_memory_gb=1.5", "--dry_run_tflops=50,float32:default=495",
             "--dry_run_platform=tpu")
  for given in (targets, ()):
    with main_py_in_process("--config=configs/digits.py:smoke", "--workdir=/w", "--dry_run",
                            *given) as (main, argv):
      main.main(main.parse_flags(argv))
      config = main._CONFIG.value
      expected = ((config, 1.5 * 2**30, 5e13, {("float32", "default"): 4.95e14}, "tpu", "/w") if given
                  else (config, None, None, {}, None, "/w"))
      assert planned.pop() == expected
      assert capsys.readouterr().out == "the plan\n"
      with monkeypatch.context() as patched:  # every process plans; process 0 alone prints
        patched.setattr(main.jax, "process_index", lambda: 1)
        main.main(["main.py"])
      assert planned.pop() == expected
      assert capsys.readouterr().out == ""
  with main_py_in_process("--config=configs/digits.py:smoke", "--workdir=/w", "--dry_run",
                          "--dry_run_tflops=fast") as (main, argv):
    with pytest.raises(app.UsageError, match=r"--dry_run_tflops='fast': 'fast' is not a rate"):
      main.main(main.parse_flags(argv))


def test_the_dry_run_says_what_the_workdir_holds_and_refuses_what_the_job_would(tmp_path):
  """Before a pod is booked: whether the job resumes (from which checkpoint), starts, or would be
  refused (another experiment's config.json) or stop (a reader without a trained experiment)."""
  config = jobs.check_config(mlp_config(), 1)
  note = lambda c: dry_run_module.workdir_note(jobs.check_config(c, 1), str(tmp_path))
  assert note(config).endswith("holds no experiment yet: the job records this one there")
  assert "the kernel job reads a trained one's checkpoints" in note(mlp_config(job="kernel"))
  with pytest.raises(CheckpointNotFoundError, match="nothing to report"):
    note(mlp_config(job="report"))
  assert os.listdir(tmp_path) == []  # the dry run writes nothing
  record_or_check(str(tmp_path / "config.json"), json.loads(config.to_json()))
  assert note(config).endswith("holds this experiment (config.json); no checkpoint yet, so "
                               "training starts from step 0")
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  for step in (0, 7):
    checkpoints.save(step, {"w": np.zeros(3, np.float32)}, step / 14)
  checkpoints.close()
  assert note(config).endswith("training resumes from its checkpoint of step 7")
  assert note(mlp_config(job="kernel")).endswith("the job reads what it needs there")
  with pytest.raises(WorkdirConfigMismatchError, match="seed: 0 -> 3"):
    note(mlp_config(seed=3))
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is a file"):
    dry_run_module.workdir_note(config, str(tmp_path / "file"))


def test_a_dry_run_given_a_workdir_notes_first_what_it_holds(tmp_path):
  """jobs.dry_run(..., workdir=...): the plan's first note says what the workdir holds (here nothing:
  the job would record this experiment), ahead of the job's own notes; without a workdir no such
  note. The note is how a dry run before booking a pod tells a fresh start from a resume."""
  config = mlp_config()
  plain = jobs.dry_run(config)
  with_workdir = jobs.dry_run(config, workdir=str(tmp_path))
  assert with_workdir.notes[0].endswith("holds no experiment yet: the job records this one there")
  assert with_workdir.notes[1:] == plain.notes
  assert not any("holds" in n for n in plain.notes)
  assert os.listdir(tmp_path) == []


def test_adversarial_modes_plan_the_steps_each_kind_of_step_takes():
  """Mode F: benign steps up to the flip, adversarial after it (here one: the last step); mode A:
  every step adversarial, in phase 1 and in phase 2 (config.phase2.mode), whose linearized model's
  output components the train job's note names. 1,437 digits in batches of 32: 44 steps per epoch."""
  c = mlp_config()
  c.train.attack.num_steps, c.train.attack.unroll = 1, 1
  c.train.mode, c.train.flip_epoch = "F", 87 / 44  # step 87 of 88
  programs = _by_name(jobs.dry_run(c))
  assert programs["phase 1 benign step"].calls == 87
  assert programs["phase 1 adversarial step (pgd)"].calls == 1
  c.train.mode, c.train.flip_epoch = "A", 0.0
  c.phase2.num_epochs, c.phase2.mode = 1.0, "A"
  c.phase2.attack.num_steps, c.phase2.attack.unroll = 1, 1
  plan = jobs.dry_run(c)
  programs = _by_name(plan)
  assert "phase 1 benign step" not in programs and "phase 2 benign step" not in programs
  assert programs["phase 1 adversarial step (pgd)"].calls == 88
  assert programs["phase 2 adversarial step (pgd)"].calls == 44
  assert any(n.startswith("train: phase 2's output components") for n in plan.notes)


def test_a_last_partial_evaluation_batch_is_counted():
  """360 test digits in batches of 32: 11 whole batches and one of 8 (padded), 12 calls."""
  c = mlp_config()
  c.eval_batch_size = 32
  assert _by_name(jobs.dry_run(c))["phase 1 clean evaluation"].calls == 12


def test_spectrum_rounds_round_up_to_cover_max_iters():
  """max_iters 90 in rounds of 20 iterations: 4 whole rounds and a fifth of 10 iterations."""
  c = mlp_config(job="spectrum")
  c.kernel.num_examples, c.kernel.logits = 100, "full"
  c.spectrum.num_eigenpairs, c.spectrum.oversample = 20, 10
  c.spectrum.max_iters, c.spectrum.round_iters = 90, 20
  (rounds,), notes = dry_run_module._spectrum(c, parallel.make_mesh(), 2**30)  # pylint: disable=protected-access
  assert rounds.calls == 5 and "at most 5 rounds (90 iterations)" in notes[0]


def test_a_program_over_the_budget_by_one_byte_is_refused(monkeypatch):
  c = mlp_config()
  step = _by_name(jobs.dry_run(c))["phase 1 benign step"]
  needed = step.bytes_per_device
  monkeypatch.setattr(dry_run_module, "device_budget_bytes", lambda device: needed - 1)
  with pytest.raises(dry_run_module.PlanDoesNotFit, match=r"^phase 1 benign step needs"):
    jobs.dry_run(c)
  monkeypatch.setattr(dry_run_module, "device_budget_bytes", lambda device: needed)
  assert _by_name(jobs.dry_run(c))["phase 1 benign step"].bytes_per_device == needed


def test_a_target_of_zero_memory_or_rate_is_refused():
  """0 bytes would fall back to this machine's budget (0 is no budget), and a rate of 0 FLOP/s
  would divide by zero: both are refused, as negative ones are."""
  c = mlp_config(job="report")
  with pytest.raises(ValueError, match=r"memory \(0\.0 bytes\) must be positive"):
    jobs.dry_run(c, device_memory_bytes=0.0)
  with pytest.raises(ValueError, match=r"matmul rate \(0\.0\) must be positive"):
    jobs.dry_run(c, matmul_flops_per_s=0.0)
  with pytest.raises(ValueError, match=r"matmul rate \(0\.0\) must be positive"):
    jobs.dry_run(c, matmul_rates={("float32", "default"): 0.0})


def test_a_class_subset_of_a_dataset_not_read_here_is_its_share_rounded_up():
  """SVHN's 73,257 training and 26,032 test images over 10 classes: at most 7,326 and 2,604 of one
  class (num_examples=0: every example of it), so no subset the data could supply is refused."""
  c = mlp_config(job="kernel")
  c.data.name, c.kernel.num_examples, c.kernel.classes = "svhn_cropped", 0, (3,)
  assert dry_run_module._kernel_examples(c) == 7326  # pylint: disable=protected-access
  c.kernel.split = "test"
  assert dry_run_module._kernel_examples(c) == 2604  # pylint: disable=protected-access


def test_a_workdir_with_only_the_initial_checkpoint_resumes_from_step_0(tmp_path):
  config = jobs.check_config(mlp_config(), 1)
  record_or_check(str(tmp_path / "config.json"), json.loads(config.to_json()))
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  checkpoints.save(0, {"w": np.zeros(3, np.float32)}, 0.0)
  checkpoints.close()
  assert dry_run_module.workdir_note(config, str(tmp_path)).endswith(
      "training resumes from its checkpoint of step 0")


def test_infinite_job_scores_num_test_images_and_a_held_out_subsets_model_too():
  """config.infinite.num_test images are scored (not the whole split), and with held-out targets
  (target_holdout=20 of 100) a third model, the original subset's, runs the clean evaluation and
  the evaluation attacks, which the original set's and the optimised set's models run as well."""


  neural_tangents_or_skip(infinite.FEATURE)
  c = load_config("infinite_width", "smoke")
  s = c.infinite
  s.update(num_train=100, num_test=100, depth=1, batch_size=16)
  s.attacks = ml_collections.ConfigDict()
  s.robust_data.eval_attacks = ml_collections.ConfigDict({"pgd1": pgd_linf(0.1, num_steps=1)})
  s.robust_data.num_steps, s.robust_data.target_holdout, s.robust_data.target_batch_size = 0, 20, 20
  c.eval_batch_size = 40
  by_name = _by_name(jobs.dry_run(c))
  assert by_name["optimised set's kernel: 80 x 80 in tiles of 16, 15 tiles"].calls == 4  # 15 tiles, 4 at a time
  calls = 3  # 100 test images in batches of 40
  assert by_name["kernel regression (100 images), clean (3 model(s))"].calls == 3 * calls
  assert by_name["kernel regression under pgd1 (3 model(s))"].calls == 3 * calls


def test_a_monitor_every_step_is_noted_as_not_counted():
  c = mlp_config()
  c.train.co_monitor.every_steps = 1
  assert ("the catastrophic-overfitting monitor's evaluations are not counted"
          in jobs.dry_run(c).notes)
