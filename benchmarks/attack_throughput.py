"""L-inf PGD attack throughput of `ntk_scale.attacks.pgd` (JAX) against the same attack in PyTorch.

For each model (the small CNN at width 32 and ResNet-18 at width 64, both with BatchNorm in
inference mode, on 32x32x3 inputs with 10 classes) this times one call of an L-inf PGD attack
(eps 8/255, `--steps` signed-gradient steps of 2.5 * eps / steps, the defaults of
`ntk_scale.base_config.pgd_linf`; uniform random start in the eps-box, projection to the box and
clipping to [0, 1] after every step, no restarts) on a random batch, in two frameworks:

  jax    the project's attack (`ntk_scale.attacks.build_attack` -> `pgd`) inside `jax.jit`, on a
         batch sharded with `ntk_scale.parallel.global_batch` over every device jax sees and
         parameters replicated with `ntk_scale.parallel.replicate`;
  torch  a PyTorch peer written here: the same two architectures in torch.nn (eval mode, parameters
         frozen, gradients with respect to the input only) and the same PGD loop, on CUDA when
         torch sees a GPU, else on the CPU; `--torch_compile` wraps the model in torch.compile.

Both frameworks run the same weights (random values, copied from the Flax variables into the torch
modules) on the same images and labels. Each measurement compiles / warms up first, then takes the
median wall time of up to `--repeats` attack calls (each synchronised: block_until_ready, or
torch.cuda.synchronize on a GPU), stopping early once the timed calls pass `--max_seconds` (at
least 2 calls). Throughput is (examples x PGD steps) per second; "vs torch" is the ratio of a
row's throughput to the torch row of the same model.

The torch convolutions pad 3x3 kernels by one pixel on every side, as ntk_scale's models do, so both
frameworks compute the same function. `--check` verifies that: logits and input gradients of the
summed cross-entropy agree between the frameworks for each model.

On CPU (2 cores here) one attack call is slow, so unless --batch_size is given the CNN runs at
batch 64 and ResNet-18 at batch 32 there, and 128 elsewhere; the table prints the batch used.
The default run takes about 2 minutes on this 2-core machine when nothing else runs on it.

Needs torch (`pip install -e '.[bench]'`). Run from the repository root:

    .venv/bin/python benchmarks/attack_throughput.py
    .venv/bin/python benchmarks/attack_throughput.py --models cnn --batch_size 256 --steps 20 --check
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import math
import statistics
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import torch
import torch.nn.functional as F

import ntk_scale.attacks
import ntk_scale.models
import ntk_scale.parallel
import ntk_scale.train.state
from ntk_scale.base_config import base_config, pgd_linf

IMAGE_SHAPE = (32, 32, 3)  # NHWC for jax; the torch peer gets the same images as NCHW
NUM_CLASSES = 10
EPS = 8 / 255
MODELS = {"cnn": 32, "resnet18": 64}  # name -> width; both with batch_norm=True
DEFAULT_BATCH = 128
CPU_BATCH = {"cnn": 64, "resnet18": 32}  # default batch on CPU where it differs from DEFAULT_BATCH
MAX_SECONDS = {"cpu": 12.0}  # timed seconds per measurement before stopping early; elsewhere none
MIN_REPEATS = 2
CHECK_TOLERANCE = 1e-4  # relative to the largest |logit| (at least 1) or |input gradient|
CHECK_GRAD_AGREEMENT = 0.99  # fraction of gradient entries within tolerance (see check_equivalence)

Variables = dict[str, Any]


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass(frozen=True)
class Timing:
  """Untimed warm-up calls, timed calls at most, and when to stop early (after `min_repeats`)."""
  warmup: int
  repeats: int
  max_seconds: float
  min_repeats: int = MIN_REPEATS


@dataclasses.dataclass(frozen=True)
class Measurement:
  seconds: float  # median of the timed calls
  calls: int  # how many were timed
  warmup_seconds: float  # compilation (jax: ahead of time; torch.compile: first call) and warm-up


def measure(run_once: Callable[[], Any], sync: Callable[[Any], Any], timing: Timing,
            compile_seconds: float = 0.0) -> Measurement:
  """Median wall time of calls of `run_once`, each followed by `sync` of its result."""
  start = time.perf_counter()
  for _ in range(timing.warmup):
    sync(run_once())
  warmup_seconds = compile_seconds + time.perf_counter() - start
  times: list[float] = []
  while len(times) < timing.repeats and (len(times) < timing.min_repeats
                                         or sum(times) < timing.max_seconds):
    start = time.perf_counter()
    sync(run_once())
    times.append(time.perf_counter() - start)
  return Measurement(statistics.median(times), len(times), warmup_seconds)


# --------------------------------------------------------------------------- data and weights

@dataclasses.dataclass(frozen=True)
class Batch:
  images: np.ndarray  # [N, 32, 32, 3] float32 in [0, 1]
  labels: np.ndarray  # [N] int32


def random_batch(batch_size: int, seed: int = 0) -> Batch:
  rng = np.random.default_rng(seed)
  return Batch(rng.random((batch_size, *IMAGE_SHAPE), dtype=np.float32),
               rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32))


def build_flax_model(name: str) -> nn.Module:
  config = base_config()
  config.model.name = name
  config.model.width = MODELS[name]
  config.model.batch_norm = True
  return ntk_scale.models.build_model(config.model, NUM_CLASSES)


def random_variables(model: nn.Module, seed: int = 0) -> Variables:
  """Host (numpy) values of the right shapes for every Flax variable, without compiling `init`.

  Kernels are He-normal; BatchNorm scales and running variances uniform in [0.5, 1.5], biases and
  running means normal with std 0.1, so that the weight copy to torch is tested on every field.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False))
  rng = np.random.default_rng(seed)

  def fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, math.sqrt(2.0 / math.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# --------------------------------------------------------------------------- torch models

class Conv(torch.nn.Conv2d):
  """A square convolution without bias (BatchNorm follows every one): 3x3 padded by 1, 1x1 unpadded."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
    super().__init__(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)


# Submodules carry the Flax module names (BatchNorm_<k> numbered in call order within each Flax
# module), so the Flax variable at params/<a>/<b>/kernel is the torch tensor <a>.<b>.weight.

class TorchSmallCNN(torch.nn.Module):
  """ntk_scale.models.cnn.SmallCNN with batch_norm=True: conv 32-32-pool-64-64-128-128-avgpool-dense."""

  def __init__(self, width: int, num_classes: int):
    super().__init__()
    features = (width, width, 2 * width, 2 * width, 4 * width, 4 * width)
    self.layers = [(f"conv{i + 1}", f"BatchNorm_{i}") for i in range(len(features))]
    for (conv, norm), cin, cout in zip(self.layers, (3,) + features, features):
      self.add_module(conv, Conv(cin, cout, 3))
      self.add_module(norm, torch.nn.BatchNorm2d(cout, eps=1e-5))
    self.head = torch.nn.Linear(features[-1], num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, (conv, norm) in enumerate(self.layers):
      x = F.relu(self.get_submodule(norm)(self.get_submodule(conv)(x)))
      if i == 1:
        x = F.max_pool2d(x, 2)
    return self.head(x.mean(dim=(2, 3)))


class TorchBasicBlock(torch.nn.Module):
  """ntk_scale.models.resnet.BasicBlock with batch_norm=True."""

  def __init__(self, in_channels: int, features: int, stride: int):
    super().__init__()
    self.conv1, self.BatchNorm_0 = Conv(in_channels, features, 3, stride), torch.nn.BatchNorm2d(features)
    self.conv2, self.BatchNorm_1 = Conv(features, features, 3), torch.nn.BatchNorm2d(features)
    self.has_shortcut = stride != 1 or in_channels != features
    if self.has_shortcut:
      self.shortcut = Conv(in_channels, features, 1, stride)
      self.BatchNorm_2 = torch.nn.BatchNorm2d(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.BatchNorm_0(self.conv1(x)))
    y = self.BatchNorm_1(self.conv2(y))
    if self.has_shortcut:
      x = self.BatchNorm_2(self.shortcut(x))
    return F.relu(x + y)


class TorchResNet18(torch.nn.Module):
  """ntk_scale.models.resnet.ResNet18 with batch_norm=True: CIFAR stem (3x3 stride 1, no
  max-pool), BasicBlocks [2, 2, 2, 2], global average pool, dense."""

  def __init__(self, width: int, num_classes: int):
    super().__init__()
    self.stem, self.BatchNorm_0 = Conv(3, width, 3), torch.nn.BatchNorm2d(width)
    self.blocks: list[str] = []
    channels = width
    for stage, features in enumerate((width, 2 * width, 4 * width, 8 * width)):
      for block in range(2):
        name = f"stage{stage + 1}_block{block + 1}"
        self.add_module(name, TorchBasicBlock(channels, features, 2 if stage > 0 and block == 0 else 1))
        self.blocks.append(name)
        channels = features
    self.head = torch.nn.Linear(channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.BatchNorm_0(self.stem(x)))
    for name in self.blocks:
      x = self.get_submodule(name)(x)
    return self.head(x.mean(dim=(2, 3)))


TORCH_MODELS: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "cnn": TorchSmallCNN, "resnet18": TorchResNet18}
TORCH_FIELDS = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}


def torch_state_dict(variables: Variables) -> dict[str, torch.Tensor]:
  """Flax variables as a torch state dict: conv kernels HWIO -> OIHW, dense kernels transposed,
  BatchNorm scale/bias/mean/var -> weight/bias/running_mean/running_var."""
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    _, *modules, field = (entry.key for entry in path)  # the collection, params or batch_stats, is implied
    value = np.array(leaf)  # a writable copy, also of a jax array
    if field == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[".".join(modules + [TORCH_FIELDS[field]])] = torch.from_numpy(np.ascontiguousarray(value))
  return state


def build_torch_model(name: str, variables: Variables, device: torch.device) -> torch.nn.Module:
  """The torch peer of model `name` holding `variables`, in eval mode, parameters frozen."""
  model = TORCH_MODELS[name](MODELS[name], NUM_CLASSES)
  missing, unexpected = model.load_state_dict(torch_state_dict(variables), strict=False)
  missing = [key for key in missing if not key.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise RuntimeError(f"{name}: Flax variables do not map onto the torch model; missing {missing}, "
                       f"unexpected {unexpected}.")
  model.requires_grad_(False)
  return model.eval().to(device)


# --------------------------------------------------------------------------- the two attacks

def torch_pgd_linf(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, *, eps: float, step_size: float, num_steps: int) -> torch.Tensor:
  """L-inf PGD as ntk_scale.attacks.pgd (norm "linf", one restart): a uniform start in the eps-box
  clipped to [0, 1], then `num_steps` steps along sign(grad) of the summed cross-entropy, each
  projected to the eps-box and clipped to [0, 1]."""
  x_adv = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp_(0.0, 1.0)
  for _ in range(num_steps):
    x_adv.requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.minimum(torch.maximum(x_adv, images - eps), images + eps).clamp_(0.0, 1.0)
  return x_adv.detach()


@dataclasses.dataclass(frozen=True)
class Result:
  model: str
  framework: str
  device: str
  parameters: int
  batch: int
  steps: int
  measurement: Measurement


def jax_devices_description() -> str:
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


def measure_jax(name: str, model: nn.Module, variables: Variables, batch: Batch,
                attack_config: Any, timing: Timing) -> Result:
  """The project's attack compiled ahead of time, on a sharded batch and replicated variables."""
  attack = ntk_scale.attacks.build_attack(attack_config)
  mesh = ntk_scale.parallel.make_mesh()
  placed = ntk_scale.parallel.global_batch(mesh, {"images": batch.images, "labels": batch.labels},
                                           np.arange(len(batch.labels)))
  replicated = ntk_scale.parallel.replicate(variables, mesh)
  key = jax.random.key(0)

  @jax.jit
  def run(variables: Variables, images: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
    return attack(lambda x: model.apply(variables, x, train=False), images, labels, key)

  start = time.perf_counter()
  compiled = run.lower(replicated, placed["images"], placed["labels"], key).compile()
  compile_seconds = time.perf_counter() - start
  measurement = measure(lambda: compiled(replicated, placed["images"], placed["labels"], key),
                        jax.block_until_ready, timing, compile_seconds)
  return Result(name, "jax", jax_devices_description(),
                ntk_scale.train.state.count_parameters(variables["params"]), len(batch.labels),
                attack_config.num_steps, measurement)


def measure_torch(name: str, variables: Variables, batch: Batch, attack_config: Any,
                  timing: Timing, device: torch.device, compile_model: bool) -> Result:
  """The torch peer on the same weights and data (NCHW), compiled with torch.compile if asked."""
  module = build_torch_model(name, variables, device)
  model = torch.compile(module) if compile_model else module
  images = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).copy()).to(device)
  labels = torch.from_numpy(batch.labels.astype(np.int64)).to(device)
  sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
  torch.manual_seed(0)
  run_once = lambda: torch_pgd_linf(model, images, labels, eps=attack_config.eps,
                                    step_size=attack_config.step_size,
                                    num_steps=attack_config.num_steps)
  framework = "torch.compile" if compile_model else "torch"
  return Result(name, framework, str(device), sum(p.numel() for p in module.parameters()),
                len(batch.labels), attack_config.num_steps, measure(run_once, sync, timing))


# --------------------------------------------------------------------------- check

def check_equivalence(name: str, model: nn.Module, variables: Variables, batch_size: int = 16) -> str:
  """Compares the Flax model and its torch peer (CPU, float32) on the same random images: logits,
  and input gradients of the summed cross-entropy. Raises SystemExit when they disagree.

  Gradients are compared entry by entry: a ReLU input within float32 rounding of 0 can fall on the
  other side of the kink in one framework, which changes the gradient near that pixel only, so a
  few entries may differ where the functions agree (float64 removes those; the mapping is exact).
  """
  batch = random_batch(batch_size, seed=1)

  def loss(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model.apply(variables, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).sum(), logits

  jax_grad, jax_logits = (np.asarray(a) for a in jax.jit(jax.grad(loss, has_aux=True))(batch.images))
  torch_model = build_torch_model(name, variables, torch.device("cpu"))
  x = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  torch_logits = torch_model(x)
  F.cross_entropy(torch_logits, torch.from_numpy(batch.labels.astype(np.int64)),
                  reduction="sum").backward()
  logits_scale, grad_scale = max(1.0, np.abs(jax_logits).max()), np.abs(jax_grad).max()
  logits_diff = np.abs(jax_logits - torch_logits.detach().numpy()).max()
  grad_diff = np.abs(jax_grad - x.grad.numpy().transpose(0, 2, 3, 1))
  grad_agree = np.mean(grad_diff <= CHECK_TOLERANCE * grad_scale)
  ok = logits_diff <= CHECK_TOLERANCE * logits_scale and grad_agree >= CHECK_GRAD_AGREEMENT
  report = (f"check {name}: {'ok' if ok else 'MISMATCH'}: logits max |jax - torch| {logits_diff:.1e} "
            f"(max |logit| {np.abs(jax_logits).max():.2f}); input gradients: {grad_agree:.2%} of "
            f"entries within {CHECK_TOLERANCE:g} x max |grad| ({grad_scale:.1e}), max |jax - torch| "
            f"{grad_diff.max():.1e}")
  if not ok:
    raise SystemExit(report)
  return report


# --------------------------------------------------------------------------- report

def format_table(results: list[Result]) -> str:
  torch_rate = {r.model: r.batch * r.steps / r.measurement.seconds
                for r in results if r.framework == "torch"}
  header = ("model", "framework", "device", "parameters", "batch", "steps", "calls", "warm-up s",
            "ms/attack", "examples*steps/s", "vs torch")
  lines = [header]
  for r in results:
    rate = r.batch * r.steps / r.measurement.seconds
    ratio = f"{rate / torch_rate[r.model]:.2f}" if r.model in torch_rate else "-"
    lines.append((r.model, r.framework, r.device, f"{r.parameters:,}", str(r.batch), str(r.steps),
                  str(r.measurement.calls), f"{r.measurement.warmup_seconds:.1f}",
                  f"{r.measurement.seconds * 1e3:,.1f}", f"{rate:,.0f}", ratio))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  fmt = lambda line: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths)))
  return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def versions(torch_device: torch.device) -> str:
  jax_devices = jax.devices()
  torch_line = f"torch {torch.__version__} on {torch_device}"
  if torch_device.type == "cuda":
    torch_line += (f" ({torch.cuda.get_device_name(torch_device)}; cudnn.allow_tf32="
                   f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32})")
  else:
    torch_line += f" ({torch.get_num_threads()} threads)"
  return "\n".join([
      f"jax {jax.__version__} (jaxlib {jaxlib.__version__}), flax {flax.__version__}, numpy {np.__version__}",
      f"jax devices: {jax.device_count()} x {jax_devices[0].device_kind} ({jax.default_backend()}), "
      f"default matmul precision {jax.config.jax_default_matmul_precision or 'default'}",
      torch_line,
      f"cpu cores: {os.cpu_count()}"])


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
  parser.add_argument("--batch_size", type=int, default=None,
                      help=f"global batch over all jax devices (default {DEFAULT_BATCH}; on CPU "
                           f"{', '.join(f'{k} {v}' for k, v in CPU_BATCH.items())})")
  parser.add_argument("--steps", type=int, default=10, help="PGD steps per attack call")
  parser.add_argument("--unroll", type=int, default=1,
                      help="iterations per unrolled body of the JAX attack loop (= --steps unrolls "
                           "fully; XLA:CPU runs unrolled convolution gradients 2-3x faster)")
  parser.add_argument("--repeats", type=int, default=5, help="timed attack calls at most")
  parser.add_argument("--max_seconds", type=float, default=None,
                      help=f"stop timing a measurement once its timed calls add up to this, after at "
                           f"least {MIN_REPEATS} (default: {MAX_SECONDS['cpu']:g} on CPU, unlimited elsewhere)")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed calls before timing (after jax's ahead-of-time compilation)")
  parser.add_argument("--torch_compile", action="store_true",
                      help="also time the torch peer under torch.compile (slow to compile on CPU)")
  parser.add_argument("--check", action="store_true",
                      help="first compare logits and input gradients of both frameworks per model")
  return parser.parse_args()


def batch_size_for(name: str, requested: int | None, on_cpu: bool) -> int:
  if requested is not None:
    return requested
  return CPU_BATCH.get(name, DEFAULT_BATCH) if on_cpu else DEFAULT_BATCH


def main() -> None:
  start = time.perf_counter()
  args = parse_args()
  backend = jax.default_backend()
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  on_cpu = backend == "cpu" or torch_device.type == "cpu"
  if torch_device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  timing = Timing(warmup=args.warmup, repeats=args.repeats,
                  max_seconds=args.max_seconds or (MAX_SECONDS["cpu"] if on_cpu else float("inf")))
  batches = {name: batch_size_for(name, args.batch_size, on_cpu) for name in args.models}
  try:
    for name, batch_size in batches.items():
      ntk_scale.parallel.check_batch_size(batch_size, jax.device_count(), f"batch size of {name}")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
      raise ValueError("--steps and --repeats must be at least 1, --warmup at least 0.")
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  attack_config = pgd_linf(EPS, args.steps)
  attack_config.unroll = args.unroll
  print(versions(torch_device))
  print(f"attack: L-inf PGD, eps {attack_config.eps:.5f} (8/255), step {attack_config.step_size:.5f}, "
        f"{attack_config.num_steps} steps (jax loop unroll {args.unroll}), random start, 1 restart; "
        f"BatchNorm in inference mode")
  print(f"batch: {', '.join(f'{name} {size}' for name, size in batches.items())}"
        f"{'' if args.batch_size else ' (the defaults' + (' on CPU' if on_cpu else '') + ')'}")
  print(f"timing: compile, {timing.warmup} warm-up call(s), then median of up to {timing.repeats} "
        f"calls (at least {timing.min_repeats}, stopping once they pass {timing.max_seconds:g} s)\n",
        flush=True)

  results: list[Result] = []
  for name in args.models:
    model = build_flax_model(name)
    variables = random_variables(model)
    if args.check:
      print(check_equivalence(name, model, variables), flush=True)
    batch = random_batch(batches[name])
    results.append(measure_jax(name, model, variables, batch, attack_config, timing))
    results.append(measure_torch(name, variables, batch, attack_config, timing, torch_device, False))
    if args.torch_compile:
      results.append(measure_torch(name, variables, batch, attack_config, timing, torch_device, True))
    print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)

  print("\n" + format_table(results))
  print("ms/attack: median wall time of one attack call over the timed calls (column 'calls'); "
        "warm-up s: compilation plus warm-up calls.\nexamples*steps/s: batch x PGD steps / "
        "(ms/attack); vs torch: that throughput over the torch row's of the same model.")
  print(f"total run time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
