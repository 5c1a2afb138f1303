"""What a job's process imports before it starts: TensorFlow (through clu's TensorBoard writers)
and scikit-learn (the digits) take seconds, on every host of a job, so they are imported only by
the jobs that use them (a phase opening its writers, the digits being loaded)."""

import subprocess
import sys

HEAVY = ("tensorflow", "sklearn", "clu.metric_writers", "clu.periodic_actions")


def test_the_jobs_import_neither_tensorflow_nor_sklearn_until_they_use_them():
  program = ("import sys; import ntk_scale.jobs, ntk_scale.dry_run; "
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
