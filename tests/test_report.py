"""The `report` job on a workdir whose files are written by the project's own writers (metrics,
evaluations, adversarial sets, the CO record, kernel stores, the evolution metrics and plots, phase 2,
the infinite job's results): the page loads in a headless browser with every image decoded, every
link resolves inside report/, and the numbers shown are the workdir's; a workdir with only its
config says so; a rerun picks up new results and drops the files of removed ones."""

import html.parser
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ntk_scale import files, jobs
from ntk_scale.adversarial_sets import save_adversarial_set
from ntk_scale.evaluate import write_evaluation
from ntk_scale.ntk import spectrum_job
from ntk_scale.ntk.evolution import evolution_metrics
from ntk_scale.ntk.evolution_plots import plot_evolution
from ntk_scale.ntk.spectrum import Eigenpairs
from ntk_scale.ntk.store import KernelStore
from ntk_scale.report import fmt, key_value_table, plot_training_curves
from ntk_scale.train.collapse import CO_FILE, CollapseDetector
from ntk_scale.train.writers import JsonlWriter

from test_spectrum import write_store
from test_train import load_config

BROWSER = os.path.join(os.path.dirname(__file__), "headless_browser.py")
NUM_CLASSES = 4


def report_config():
  c = load_config("digits", "smoke")
  c.job = "report"
  return c


def record_experiment(workdir: str) -> None:
  """config.json, as the train job records it: the report job records none of its own."""
  jobs.prepare_workdir(load_config("digits", "smoke"), workdir)


class PageParser(html.parser.HTMLParser):
  """Collects <img src>, <a href>, headings and the page's text."""

  def __init__(self):
    super().__init__()
    self.images, self.links, self.headings, self.text, self._heading = [], [], [], [], None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs["src"])
    elif tag == "a" and not attrs["href"].startswith("#"):
      self.links.append(attrs["href"])
    elif tag in ("h2", "h3", "h4"):
      self._heading = []

  def handle_endtag(self, tag):
    if tag in ("h2", "h3", "h4") and self._heading is not None:
      self.headings.append("".join(self._heading))
      self._heading = None

  def handle_data(self, data):
    self.text.append(data)
    if self._heading is not None:
      self._heading.append(data)


def check_page(index: str) -> PageParser:
  """Every image and link resolves to a file inside report/; every image decodes, not tiny."""
  report = os.path.dirname(os.path.abspath(index))
  parser = PageParser()
  with open(index, encoding="utf-8") as f:
    parser.feed(f.read())
  for ref in parser.images + parser.links:
    path = os.path.realpath(os.path.join(report, ref))
    assert path.startswith(report + os.sep) and os.path.isfile(path), ref
  for src in parser.images:
    with Image.open(os.path.join(report, src)) as image:
      image.load()
      assert image.width >= 100 and image.height >= 100, (src, image.size)
  return parser


def browse(index: str) -> dict:
  """What a headless Chromium (Qt WebEngine) loaded of the page; see tests/headless_browser.py."""
  pytest.importorskip("PyQt6.QtWebEngineWidgets", reason="the browser comes with `pip install -e '.[test]'`")
  out = subprocess.run([sys.executable, BROWSER, index], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def write_metrics(directory: str, steps: int, co: bool) -> list[dict]:
  """metrics.jsonl as the train loop and the CO monitor write it (8 steps an epoch)."""
  os.makedirs(directory, exist_ok=True)
  writer = JsonlWriter(os.path.join(directory, "metrics.jsonl"))
  co_records = []
  for step in range(1, steps + 1):
    if co:
      robust = 0.3 if step < 10 else 0.05  # a collapse at step 10
      values = {"co/robust_accuracy": robust, "co/clean_accuracy": 0.5, "co/train_clean_accuracy": 0.6}
      writer.write_scalars(step, values)
      co_records.append({"step": step, **values})
    writer.write_scalars(step, {"train/loss": 2.0 / step, "train/accuracy": step / steps,
                                "train/learning_rate": 0.1, "train/grad_norm": 1.0, "train/epoch": step / 8})
  writer.write_scalars(steps, {"test/accuracy": 0.75, "test/loss": 0.5})
  return co_records


def per_class(accuracy: float) -> dict:
  return {"accuracy": accuracy, "loss": 1.0 - accuracy,
          "per_class_accuracy": [accuracy - 0.05 * c for c in range(NUM_CLASSES)]}


def write_co_record(workdir: str, records: list[dict]) -> dict:
  """The CO monitor's summary of these records (its detector, its fields)."""
  detector = CollapseDetector(sustain_evals=3)
  for r in records:
    detector.update(r["step"], r["step"] / 8, r["co/robust_accuracy"], r["co/train_clean_accuracy"])
  summary = {"collapsed": detector.collapse is not None, "collapse": detector.collapse,
             "sustained": detector.sustained is not None, "sustained_collapse": detector.sustained,
             "recoveries": detector.recoveries, "peak": detector.peak, "last": detector.previous,
             "checkpoint_epochs": {"before": 9 / 8, "after": 10 / 8}}
  with open(os.path.join(workdir, CO_FILE), "w") as f:
    json.dump(summary, f)
  return summary


def write_adversarial(directory: str, name: str, n: int = 12) -> None:
  rng = np.random.default_rng(0)
  labels = np.arange(n, dtype=np.int32) % NUM_CLASSES
  save_adversarial_set(os.path.join(directory, "adversarial", name), {
      "images": rng.uniform(size=(n, 8, 8, 1)).astype(np.float32), "labels": labels,
      "predictions": (labels + (np.arange(n) % 3 == 0)) % NUM_CLASSES, "clean_predictions": labels},
      {"accuracy": 2 / 3, "clean_accuracy": 1.0, "checkpoint_step": 16, "split": "test",
       "attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "num_steps": 20}})


def random_kernel(seed: int, n: int = 24) -> np.ndarray:
  jacobian = np.random.default_rng(seed).standard_normal((n, 40))
  return jacobian @ jacobian.T


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Phase 1 with CO monitor, two evaluations (one with an AutoAttack's accuracy after each attack)
  and a set; phase 2 with output components; two
  complete kernels and an incomplete one; their evolution; an eigen_features-style directory."""
  path = str(tmp_path_factory.mktemp("report"))
  record_experiment(path)
  co_records = write_metrics(path, 16, co=True)
  write_co_record(path, co_records)
  write_evaluation(path, 8, 1.0, {"clean": per_class(0.5), "pgd": per_class(0.25)})
  pgd_settings = {"step": 16, "seed": 0, "eval_batch_size": 64, "name": "pgd",
                  "attack": {"name": "pgd", "norm": "linf", "eps": 0.1, "num_steps": 7}}
  write_evaluation(path, 16, 2.0, {"clean": per_class(0.8125), "pgd": {
      **per_class(0.375), "settings": pgd_settings}, "autoattack": {
      **per_class(0.3125), "accuracy_after": {"apgd_ce": 0.34375, "apgd_t": 0.3125}}})
  write_adversarial(path, "pgd")
  halfway = os.path.join(path, "adversarial", "halfway")  # a save cut before its meta.json
  os.makedirs(halfway)
  np.save(os.path.join(halfway, "images.npy"), np.zeros((2, 8, 8, 1), np.float32))
  phase2 = os.path.join(path, "phase2", "centered_C_from1")
  write_metrics(phase2, 8, co=False)
  components = {"f0_mean_abs": 2.5, "f0_mean_norm": 7.0, "jvp_mean_abs": 1.25, "jvp_mean_norm": 3.0}
  write_evaluation(phase2, 8, 1.0, {"clean": {**per_class(0.625), "output_components": components}})
  stores = []
  for epoch, seed in ((1.0, 0), (2.0, 1)):
    store = write_store(os.path.join(path, "kernels", f"phase1_epoch{epoch:g}_train24_class0"),
                        random_kernel(seed), tile=10, labels=np.arange(24) % NUM_CLASSES,
                        num_classes=NUM_CLASSES)
    store.update_meta(source={"phase": 1, "epoch": epoch, "step": int(8 * epoch)}, logits="class 0")
    stores.append(store)
  partial = KernelStore.create_or_resume(os.path.join(path, "kernels", "phase1_epoch2_train24_trace"),
                                         {"shape": [24, 24], "tile": 10, "dtype": "float64"}, ("shape",),
                                         np.arange(24), np.zeros(24, int))
  partial.write_tile(0, 0, np.eye(10), mirror=True)  # 1 of 6 tiles
  evolution = evolution_metrics(stores, [1.0, 2.0], top_k=3)
  evolution["phase"] = 1
  evolution_dir = os.path.join(path, "kernel_evolution", "phase1_train24_class0")
  os.makedirs(evolution_dir)
  files.write_csv(os.path.join(evolution_dir, "metrics.csv"), evolution["checkpoints"])
  plot_evolution(evolution, evolution_dir)
  features = os.path.join(path, "eigen_features", "phase1_epoch2_train24_class0")
  os.makedirs(features)
  with open(os.path.join(features, "features.csv"), "w") as f:
    f.write("eigen_index,usefulness,robustness\n0,0.91,0.5\n1,0.42,0.125\n")
  Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(os.path.join(features, "usefulness.png"))
  with open(os.path.join(path, "results.json"), "w") as f:  # the infinite job's record
    json.dump({"kernel_regression": {"clean": 0.96875, "pgd": 0.4375}}, f)
  return path


@pytest.fixture(scope="module")
def index(workdir):
  path = jobs.run(report_config(), workdir)["report"]
  assert path == os.path.join(workdir, "report", "index.html")
  return path


def test_report_shows_every_result_and_resolves_every_image_and_link(workdir, index):
  page = check_page(index)
  text = " ".join(page.text)
  for heading in ("Phase 1", "Phase 2: centered_C_from1", "Kernels", "Kernel evolution", "Eigen-features",
                  "Infinite-width kernels", "Training curves", "Evaluations", "Saved adversarial sets",
                  "Output components of the linearized model (f0(x) and J(theta - theta0); output: "
                  "a centered_nonlinear model's own f(theta) - f(theta0))",
                  "Catastrophic overfitting: collapse at epoch 1.25, sustained", "phase1_train24_class0",
                  "autoattack: robust accuracy after each of its attacks, in the order run",
                  "phase1_epoch2_train24_class0", "Configuration", "Its attacks, as configured"):
    assert heading in page.headings, heading
  report = os.path.join(workdir, "report")
  expected_images = {"training.png", "per_class_accuracy.png", "evaluations.png", "adversarial_pgd.png",
                     "phase2/centered_C_from1/training.png", "kernels/spectra.png",
                     "kernel_evolution/phase1_train24_class0/distance_to_final.png",
                     "kernel_evolution/phase1_train24_class0/polar.png",
                     "kernel_evolution/phase1_train24_class0/spectra.png",
                     "eigen_features/phase1_epoch2_train24_class0/usefulness.png"}
  assert expected_images <= set(page.images)
  for copied in ("kernel_evolution/phase1_train24_class0/polar.png",
                 "eigen_features/phase1_epoch2_train24_class0/usefulness.png"):
    with open(os.path.join(report, copied), "rb") as a, open(os.path.join(workdir, copied), "rb") as b:
      assert a.read() == b.read()
  assert {"config.json", "catastrophic_overfitting.json", "results.json",
          "eigen_features/phase1_epoch2_train24_class0/features.csv"} <= set(page.links)
  # The numbers are the workdir's: newest evaluation per class, output components, kernel
  # spectra against numpy, tile counts, the CSV rows, the infinite job's accuracies.
  for value in (0.8125, 0.8125 - 0.15, 0.375, 2.5, 1.25, 0.96875, 0.4375, 0.91, 0.34375):
    assert fmt(value) in text, value
  for seed in (0, 1):
    values = np.linalg.eigvalsh(random_kernel(seed))
    assert fmt(float(values[-1])) in text and fmt(float(values.sum())) in text
  assert "1 of 6" in text and "6 of 6" in text
  assert "halfway incomplete (no meta.json)" in text
  assert '"num_steps": 7' in text  # the newest evaluation's PGD, as its record says
  assert "No results yet" not in text


def test_report_loads_in_a_headless_browser_with_every_image_decoded(index):
  page = check_page(index)
  browser = browse(index)
  assert browser["loaded"] and browser["title"].startswith("ntk_scale report")
  assert sorted(i["src"] for i in browser["images"]) == sorted(page.images)
  for image in browser["images"]:
    assert image["complete"] and image["width"] >= 100 and image["height"] >= 100, image


def test_workdir_with_only_its_config_says_so(tmp_path):
  workdir = str(tmp_path)
  record_experiment(workdir)
  index = jobs.run(report_config(), workdir)["report"]
  assert sorted(os.listdir(workdir)) == [".writer.lock", "config.json", "report"]  # the record's lock
  page = check_page(index)
  assert "No results yet: the workdir holds only its config.json." in " ".join(page.text)
  assert page.images == [] and page.links == ["config.json"]
  assert sorted(os.listdir(os.path.join(workdir, "report"))) == ["config.json", "index.html"]


def test_rerun_adds_new_results_and_drops_removed_ones(tmp_path):
  workdir = str(tmp_path)
  record_experiment(workdir)
  write_metrics(workdir, 8, co=False)
  index = jobs.run(report_config(), workdir)["report"]
  first = check_page(index)
  assert first.images == ["training.png"] and "Kernels" not in first.headings

  write_evaluation(workdir, 8, 1.0, {"clean": per_class(0.6875)})
  write_store(os.path.join(workdir, "kernels", "k"), random_kernel(2), tile=24)
  features = os.path.join(workdir, "eigen_images", "k")
  os.makedirs(features)
  Image.fromarray(np.zeros((100, 100), np.uint8)).save(os.path.join(features, "top.png"))
  unfinished = os.path.join(workdir, "eigen_features", "k", "groups.partial")  # a killed job's pieces
  os.makedirs(unfinished)
  with open(os.path.join(unfinished, "group_0.json"), "w") as f:
    f.write("{}")
  second = check_page(jobs.run(report_config(), workdir)["report"])
  assert {"Evaluations", "Kernels", "Eigen-images"} <= set(second.headings)
  assert {"per_class_accuracy.png", "kernels/spectra.png", "eigen_images/k/top.png"} <= set(second.images)
  assert not any("partial" in link for link in second.links) and "Eigen-features" not in second.headings
  assert fmt(0.6875) in " ".join(second.text)

  os.remove(os.path.join(features, "top.png"))
  os.rmdir(features)
  third = check_page(jobs.run(report_config(), workdir)["report"])
  assert "Eigen-images" not in third.headings
  assert not os.path.exists(os.path.join(workdir, "report", "eigen_images"))


def test_only_process_zero_writes(tmp_path, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel

  from ntk_scale.report import write_report  # pylint: disable=import-outside-toplevel

  write_metrics(str(tmp_path), 4, co=False)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert write_report(str(tmp_path)) == os.path.join(str(tmp_path), "report", "index.html")
  assert not os.path.exists(os.path.join(str(tmp_path), "report"))


def test_a_kernel_with_a_spectrum_job_result_shows_its_top_eigenpairs(tmp_path):
  """The spectrum job's top k (not a dense eigh of the kernel): its top eigenvalue and trace."""
  workdir = str(tmp_path)
  record_experiment(workdir)
  store = write_store(os.path.join(workdir, "kernels", "big"), random_kernel(3), tile=24)
  values = np.array([7.5, 2.25, 0.625])
  record = {"trace": 11.0, "num_eigenpairs": 3}
  spectrum_job._write_result(os.path.join(store.directory, spectrum_job.SPECTRUM_DIR),  # pylint: disable=protected-access
                             Eigenpairs(values, np.eye(24)[:, :3], np.zeros(3)), record)
  page = check_page(jobs.run(report_config(), workdir)["report"])
  text = " ".join(page.text)
  assert fmt(7.5) in text and fmt(11.0) in text
  assert fmt(float(np.linalg.eigvalsh(random_kernel(3))[-1])) not in text
  assert "kernels/spectra.png" in page.images


def test_results_of_a_jobs_earlier_rules_are_marked(tmp_path):
  """An upgrade audit saw the report show eigen-features a multi-device bug had made wrong, and
  evolution velocities of nominal epochs, as they were, where their jobs make them again."""
  from ntk_scale.ntk.eigen_features_job import JACOBIAN_ROWS, RANK_FLOOR  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path)
  record_experiment(workdir)
  current = {"source": "empirical", "batch_size": 60, "rank_floor": RANK_FLOOR,
             "jacobian_rows": JACOBIAN_ROWS}
  for name, settings in (("old", {**current, "jacobian_rows": None}), ("new", current)):
    features = os.path.join(workdir, "eigen_features", name)
    os.makedirs(features)
    files.write_json(os.path.join(features, "features.json"), {"settings": settings, "groups": []})
  evolution = os.path.join(workdir, "kernel_evolution", "old_run")
  os.makedirs(evolution)
  files.write_json(os.path.join(evolution, "metrics.json"), {"checkpoints": []})  # no settings
  page = check_page(jobs.run(report_config(), workdir)["report"])
  text = " ".join(page.text)
  assert text.count("Made by earlier rules of the eigen_features job") == 1
  assert "Made by earlier rules of the evolution job" in text and "config.job='evolution'" in text


def test_a_kernel_with_a_lost_chunk_or_nan_is_noted_not_drawn(tmp_path):
  """A chunk gone read as zeros: the report drew the spectrum of a kernel that was not computed."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  record_experiment(workdir)
  lost = write_store(os.path.join(workdir, "kernels", "lost"), random_kernel(4), tile=12)
  os.remove(os.path.join(lost.directory, "kernel.zarr", "c", "1", "0"))
  nan = write_store(os.path.join(workdir, "kernels", "nan"), random_kernel(5), tile=12)
  array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(
      nan.directory, "kernel.zarr")}}, open=True).result()
  array[3, 4].write(np.float32(np.nan)).result()
  write_store(os.path.join(workdir, "kernels", "whole"), random_kernel(6), tile=12)
  page = check_page(jobs.run(report_config(), workdir)["report"])
  text = " ".join(page.text)
  assert "No spectrum drawn for kernels with a missing chunk or NaN entries: lost, nan" in text
  assert fmt(float(np.linalg.eigvalsh(random_kernel(6).astype(np.float64))[-1])) in text


def test_names_sort_by_their_numbers_and_infinite_results_hide_their_settings_digest(tmp_path):
  from ntk_scale.report import ReportPage, infinite_parts, natural_key
  names = ["width32", "epoch10", "width8", "epoch2", "epoch2.5"]
  assert sorted(names, key=natural_key) == ["epoch2", "epoch2.5", "epoch10", "width8", "width32"]
  digest = "3f9a0c1d2e4b5a6f"
  with open(tmp_path / "results.json", "w") as f:
    json.dump({"settings": digest, "kernel_regression/clean/accuracy": 0.875}, f)
  html = "\n".join(infinite_parts(ReportPage(str(tmp_path / "report")), str(tmp_path)))
  assert "0.875" in html and digest not in html


def test_cells_show_four_significant_digits_yes_no_and_compact_lists():
  """fmt's documented formats (the tests above compare the page with fmt's own output)."""
  assert [fmt(v) for v in (None, True, False, 0.123456, 7, "x")] == ["", "yes", "no", "0.1235", "7", "x"]
  assert fmt([1, 2.5]) == "1, 2.5" and fmt(list(range(20))) == ", ".join(map(str, range(20)))
  assert fmt(list(range(21))) == json.dumps(list(range(21))) and fmt([True, 1]) == "[true, 1]"
  assert fmt({"a": 1}) == '{"a": 1}'
  # An empty section of a record shows as {} (it would vanish from a flattened record).
  assert "<td class=\"k\">attacks</td><td>{}</td>" in key_value_table({"attacks": {}, "seed": 1})


def test_training_curves_plot_the_training_series_by_epoch_and_mark_the_collapse():
  """The figure itself: a panel per kind of series against the epoch (test/ metrics are not curves),
  a loss spanning more than 100x on a log axis, the collapse a line at its epoch on the accuracies."""
  records = [{"step": s, "train/loss": 100.0 / s ** 2, "train/accuracy": s / 16, "train/epoch": s / 8,
              "co/robust_accuracy": 0.3} for s in range(1, 17)] + [{"step": 16, "test/accuracy": 0.5}]
  fig = plot_training_curves(records, collapse_epoch=1.25)
  loss, accuracy = fig.axes
  assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"] and loss.get_yscale() == "log"
  lines = {line.get_label(): line for line in accuracy.get_lines()}
  assert set(lines) == {"train/accuracy", "co/robust_accuracy", "robustness collapse"}
  np.testing.assert_allclose(lines["train/accuracy"].get_xdata(), np.arange(1, 17) / 8)
  assert list(lines["robustness collapse"].get_xdata()) == [1.25, 1.25]
  assert [line.get_label() for line in loss.get_lines()] == ["train/loss"]


def _rows_of(text: str, name: str) -> list[str]:
  """The cells of the table row whose first cell is `name`."""
  row = re.search(rf"<tr><td class=\"k\">{re.escape(name)}</td>(.*?)</tr>", text)
  assert row, name
  return re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))


def test_results_the_main_workdir_lacks_are_shown_too(tmp_path, monkeypatch):
  """What the fixture's workdir does not hold: a workdir with the infinite job's sets only (no
  training: titled Workdir), phase 2 in its old layout, the infinite job's networks in natural
  order with their final test metrics and CO records, kernels ordered by phase and epoch with
  their own trace, one above the size limit, a long CSV cut at MAX_TABLE_ROWS and JSON linked,
  the optimised training set noted, per-class columns for any evaluation that has them."""
  from ntk_scale import report  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  record_experiment(workdir)
  save_adversarial_set(os.path.join(workdir, "adversarial", "apgd"), {
      "images": np.zeros((3, 8, 8, 1), np.float32), "labels": np.zeros(3, np.int32),
      "predictions": np.ones(3, np.int32), "clean_predictions": np.zeros(3, np.int32)},
      {"accuracy": 0.0, "clean_accuracy": 1.0, "source": "kernel regression", "split": "test",
       "kernel": {"attacks": {"apgd": {"name": "apgd_ce", "norm": "l2", "eps": 0.5, "num_steps": 9}}}})
  write_metrics(os.path.join(workdir, "phase2"), 4, co=False)
  for width in (32, 8):
    network = os.path.join(workdir, "transfer", f"width{width}")
    write_metrics(network, 8, co=False)
    JsonlWriter(os.path.join(network, "metrics.jsonl")).write_scalars(12, {"test/accuracy": 0.4375})
    write_evaluation(network, 8, 1.0, {"clean": per_class(0.5), "transfer": {"accuracy": 0.625, "loss": 1.5}})
    co = {"collapsed": width == 8, "sustained": False, "collapse": {"epoch": 0.5} if width == 8 else None}
    files.write_json(os.path.join(network, CO_FILE), co)
  kernels = {}
  for name, phase, epoch, seed in (("z", 1, 2.0, 7), ("a", 2, 1.0, 8), ("m", 1, 10.0, 9)):
    store = write_store(os.path.join(workdir, "kernels", name), random_kernel(seed, n=12), tile=12)
    store.update_meta(source={"phase": phase, "epoch": epoch})
    kernels[name] = np.linalg.eigvalsh(random_kernel(seed, n=12))
  write_store(os.path.join(workdir, "kernels", "big"), random_kernel(10, n=24), tile=24)
  images = os.path.join(workdir, "eigen_images", "k")
  os.makedirs(images)
  files.write_csv(os.path.join(images, "long.csv"), [{"i": i} for i in range(203)])
  files.write_csv(os.path.join(images, "short.csv"), [{"i": 1}])
  files.write_json(os.path.join(images, "summary.json"), {"rows": 203})
  files.write_json(os.path.join(workdir, "results.json"), {"kernel_regression": {"clean": 0.75}})
  np.savez(os.path.join(workdir, "robust_dataset.npz"), x=np.zeros(4))
  monkeypatch.setattr(report, "MAX_SPECTRUM_SIZE", 20)
  index = jobs.run(report_config(), workdir)["report"]
  page = check_page(index)
  with open(index, encoding="utf-8") as f:
    text = f.read()
  sections = [h for h in page.headings if h in ("Workdir", "Phase 1", "Phase 2", "Kernels",
                                                "Infinite-width job: network width8",
                                                "Infinite-width job: network width32")]
  assert sections == ["Workdir", "Phase 2", "Kernels", "Infinite-width job: network width8",
                      "Infinite-width job: network width32"]
  assert _rows_of(text, "apgd")[:4] == ["apgd_ce", "l2", "0.5", "9"]
  assert "Test metrics at the end of training (step 12)" in page.headings
  assert "Catastrophic overfitting: collapse at epoch 0.5, transient" in page.headings
  assert "Catastrophic overfitting: no collapse recorded" in page.headings
  assert text.count("<th>class 3</th>") == 2 and text.count("<th>loss</th>") == 2  # one per network
  order = [m.group(1) for m in re.finditer(r'<tr><td class="k">(z|a|m|big)</td>', text)]
  assert order == ["big", "z", "m", "a"]  # (phase, epoch, name); big has no source: phase 0
  for name, values in kernels.items():
    assert _rows_of(text, name)[-3:] == [fmt(float(values[-1])), fmt(float(values.sum())), "12"], name
  shown = " ".join(page.text)
  assert "No spectrum drawn for kernels larger than 20 rows (N, or N*C for full kernels) without a " \
         "spectrum job's result: big;" in shown
  long_table = text.split('<table><tr><th class="k">i</th></tr>')[1]
  assert long_table.split("</table>")[0].count("<tr>") == 200  # MAX_TABLE_ROWS of 203
  assert shown.count("more rows in the file") == 1 and "... 3 more rows in the file." in shown
  assert "eigen_images/k/summary.json" in page.links
  assert "The optimised training set: robust_dataset.npz" in shown
  assert text.count('<tr><td class="k">batch_size</td>') == 2  # the summary's and the config's
  # Evaluations without training curves are a trained run still: titled Phase 1.
  evaluated = str(tmp_path / "evaluated")
  record_experiment(evaluated)
  write_evaluation(evaluated, 8, 1.0, {"clean": per_class(0.5)})
  assert "Phase 1" in check_page(jobs.run(report_config(), evaluated)["report"]).headings
