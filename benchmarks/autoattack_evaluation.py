"""AutoAttack evaluation of a trained checkpoint, two ways, in one run on one machine:

  in turn      `evaluate.evaluate` with the worst_of attack (what the evaluate job does): the clean
               images, then each member only on the examples every earlier member left correct,
               re-batched, as AutoAttack's own code spends its work;
  inside jit   the peer: the same worst_of called inside the batch's jitted program (every member on
               every example; the per-example worst case kept).

For each it prints the robust accuracy, the examples each member attacked and the wall time of the
timed repeats after a first, compiling call (the median), and their ratio. Both count an example
broken by any member; their random starts differ (re-batched examples sit elsewhere in a batch).

After `make demo`, from the repository root (about 12 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/autoattack_evaluation.py \\
        --config configs/digits.py:adversarial,autoattack --workdir workdirs/digits_adversarial

`--attack` names the entry of config.eval_attacks (default autoattack), `--num_examples` takes the
first examples of the test split only (default: all), `--repeats` the timed calls per way.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ntk_scale import console, data, parallel  # noqa: E402
from ntk_scale.attacks import WorstOf, build_attack  # noqa: E402
from ntk_scale.data import Split  # noqa: E402
from ntk_scale.evaluate import evaluate  # noqa: E402
from ntk_scale.train.phase2 import apply_loaders  # noqa: E402
from ntk_scale.restore import restore_for_inference  # noqa: E402
from ntk_scale.train.state import TrainState  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The workdir's config file (`file.py:arg`).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (its newest phase-1 checkpoint).")
_ATTACK = flags.DEFINE_string("attack", "autoattack", "The worst_of entry of config.eval_attacks.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "First examples of the test split (all).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls per way, after a first compiling call.")
flags.mark_flags_as_required(["config", "workdir"])


def _timed(run) -> tuple[dict, float]:
  result = run()  # compiles
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    result = run()
    times.append(time.perf_counter() - start)
  return result, statistics.median(times)


def main(argv):
  del argv
  config = apply_loaders(_CONFIG.value)
  console.quiet_library_logs()
  if _ATTACK.value not in config.eval_attacks:
    raise app.UsageError(f"--attack={_ATTACK.value!r} is not in config.eval_attacks "
                         f"({', '.join(config.eval_attacks)}).")
  attack = build_attack(config.eval_attacks[_ATTACK.value], prefix=f"config.eval_attacks.{_ATTACK.value}")
  if not isinstance(attack, WorstOf):
    raise app.UsageError(f"--attack={_ATTACK.value!r} is not a worst_of attack.")
  mesh = parallel.make_mesh()
  restored = restore_for_inference(config, _WORKDIR.value, phase=1, epoch=None, mesh=mesh)
  state = TrainState.create(apply_fn=restored.model.apply, tx=optax.identity(), **restored.variables)
  dataset = data.load_dataset(config.data)
  n = _NUM_EXAMPLES.value or len(dataset.test)
  test = Split(dataset.test.images[:n], dataset.test.labels[:n])
  key = jax.random.key(config.seed + 1)
  run = lambda a: evaluate(state, test, config.eval_batch_size, mesh, dataset.num_classes, attack=a,
                           key=key, keep_examples=True)
  in_turn, in_turn_s = _timed(lambda: run(attack))
  inside, inside_s = _timed(lambda: run(lambda *args: attack(*args)))

  clean = np.mean(in_turn["examples"]["clean_predictions"] == test.labels)
  remaining, attacked = clean, []
  for name in attack.names:
    attacked.append(f"{name} {round(remaining * n)}")
    remaining = in_turn["accuracy_after"][name]
  print(f"{_ATTACK.value} on {n} test examples of {config.data.name}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), batch {config.eval_batch_size}; clean {100 * clean:.1f}%")
  print(f"{'way':<12} {'robust':>8} {'seconds':>9} {'speed-up':>9}  examples attacked")
  print(f"{'in turn':<12} {100 * in_turn['accuracy']:7.1f}% {in_turn_s:9.1f} "
        f"{inside_s / in_turn_s:8.2f}x  {', '.join(attacked)}")
  print(f"{'inside jit':<12} {100 * inside['accuracy']:7.1f}% {inside_s:9.1f} {1:8.2f}x  "
        f"every member {n}")
  print("robust after each member (in turn): " + ", ".join(
      f"{k} {100 * v:.1f}%" for k, v in in_turn["accuracy_after"].items()))


if __name__ == "__main__":
  app.run(main)
