"""The `report` job: every result in a workdir as PNG plots and one `<workdir>/report/index.html`.

It renders whatever subset of results the workdir holds (a fresh one holds only config.json, and
the page says so): the training curves of each run (`metrics.jsonl` of phase 1, of each phase-2
experiment, of each network the infinite job trains under `transfer/`), the evaluations (clean,
robust and transfer accuracy, per class, phase 2's output components), the saved adversarial sets,
the catastrophic-overfitting record, the kernels in `kernels/` (metadata, and the spectrum of each
complete one small enough for a dense eigendecomposition), the infinite job's `results.json`, and
every PNG and CSV of the result directories `kernel_evolution/`, `eigen_features/` and
`eigen_images/`, whatever their names.

The page is plain HTML (no scripts, no external resources); the PNGs and CSVs it shows are copied
into `report/` and linked by relative paths, so the folder can be moved or archived whole. Each file
is written atomically and index.html last; a rerun rewrites everything from the workdir and deletes
report files whose results are gone. Only process 0 writes.
"""

import csv
import datetime
import html
import io
import json
import os
import re
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ntk_scale import evaluation_records, files
from ntk_scale.adversarial_sets import read_set_meta
from ntk_scale.train.collapse import CO_FILE
from ntk_scale.train.metrics_jsonl import METRICS_FILE, read_jsonl
from ntk_scale.workdir import CONFIG_FILE, PHASE2_DIR, TRANSFER_DIR

REPORT_DIR, INDEX_FILE = "report", "index.html"
# Result directories rendered generically: every PNG embedded, every CSV a table, JSON linked.
RESULT_DIRS = (("kernel_evolution", "Kernel evolution"), ("eigen_features", "Eigen-features"),
               ("eigen_images", "Eigen-images"))
MAX_SPECTRUM_SIZE = 4096  # a dense float64 eigh of up to 4096 x 4096 takes seconds and 128 MiB
MAX_TABLE_ROWS = 200
NUM_EXAMPLES_SHOWN = 10  # adversarial images drawn per saved set
_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right;font-size:90%}th{background:#f0f0f0}td.k,th.k{text-align:left}
img{max-width:100%;margin:4px;border:1px solid #eee}h2{border-bottom:2px solid #444}
.note{color:#555}"""


# ------------------------------------------------------------------------------------------ HTML
def fmt(value: Any) -> str:
  """A table cell: 4 significant digits for floats, yes/no for booleans, compact lists."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and len(value) <= 20:
      return ", ".join(fmt(v) for v in value)
    return json.dumps(value)
  if isinstance(value, dict):
    return json.dumps(value)
  return str(value)


def table(header: list[str], rows: Iterable[list[Any]], key_columns: int = 1) -> str:
  """An HTML table; the first `key_columns` columns are labels (left-aligned)."""
  cls = lambda i: ' class="k"' if i < key_columns else ""
  head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header))
  body = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(fmt(v))}</td>" for i, v in enumerate(r))
                 + "</tr>\n" for r in rows)
  return f"<table><tr>{head}</tr>\n{body}</table>"


def key_value_table(record: dict) -> str:
  """Every field of `record` by its dotted name, lists as values; an empty section shows as {}
  (a record that has none says so)."""
  flat = traverse_util.flatten_dict(record, keep_empty_nodes=True, sep=".")
  return table(["field", "value"],
               [(k, {} if v is traverse_util.empty_node else v) for k, v in flat.items()])


def paragraph(text: str, cls: str = "") -> str:
  return f"<p{f' class={cls!r}' if cls else ''}>{html.escape(text)}</p>"


def _anchor(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


# ------------------------------------------------------------------------------------------ page
class ReportPage:
  """The sections of index.html and the files written beside it in the report folder."""

  def __init__(self, directory: str):
    self.directory = directory
    self.files: set[str] = set()  # relative paths written by this run
    self.sections: list[tuple[str, str]] = []  # (title, html)

  def add_section(self, title: str, parts: list[str]) -> None:
    if parts:
      self.sections.append((title, "\n".join(parts)))

  def _target(self, relative: str) -> str:
    self.files.add(relative)
    path = os.path.join(self.directory, relative)
    files.make_dirs(os.path.dirname(path))
    return path

  def save_figure(self, fig, relative: str, alt: str) -> str:
    """Saves a matplotlib figure as report/<relative> (atomically); returns its <img>."""
    files.save_figure(fig, self._target(relative), dpi=100)
    return self.image(relative, alt)

  def copy(self, source: str, relative: str) -> str:
    """Copies a workdir file into the report (atomically); returns its relative path."""
    files.copy_file(source, self._target(relative))
    return relative

  def image(self, relative: str, alt: str) -> str:
    return f'<img src="{html.escape(relative)}" alt="{html.escape(alt)}">'

  def link(self, relative: str, text: str) -> str:
    return f'<a href="{html.escape(relative)}">{html.escape(text)}</a>'

  def write(self, workdir: str, config: dict | None, empty: bool) -> str:
    """Writes index.html (atomically, last), then deletes files of earlier runs not written now;
    `empty`: the workdir holds no results, which the page says."""
    title = f"ntk_scale report: {_display_path(workdir).rstrip('/').rsplit('/', 1)[-1]}"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    toc = "".join(f'<li><a href="#{_anchor(t)}">{html.escape(t)}</a></li>' for t, _ in self.sections)
    head = [f"<h1>{html.escape(title)}</h1>",
            paragraph(f"Workdir {_display_path(workdir)}; generated {stamp}. Rerun the report job "
                      f"to refresh it.", "note")]
    if config is not None:
      summary = {k: config.get(k) for k in ("job", "seed", "num_epochs", "batch_size")}
      fields = traverse_util.flatten_dict(config, sep=".")
      summary.update({k: fields.get(k) for k in ("data.name", "model.name", "train.mode")})
      head.append(table(["field", "value"], [(k, v) for k, v in summary.items() if v is not None]))
    if empty:
      head.append(paragraph(f"No results yet: the workdir holds only its {CONFIG_FILE}. Run a job on "
                            f"it (train, kernel, evolution, infinite, ...), then rerun the report."))
    head.append(f"<ul>{toc}</ul>")
    body = [f'<h2 id="{_anchor(t)}">{html.escape(t)}</h2>\n{h}' for t, h in self.sections]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(head + body) + "\n</body></html>\n")
    path = self._target(INDEX_FILE)
    files.write_text(path, page)
    self._remove_stale()
    return path

  def _remove_stale(self) -> None:
    for root, _, names in reversed(list(files.walk(self.directory))):  # bottom-up
      for name in names:
        if os.path.relpath(os.path.join(root, name), self.directory) not in self.files:
          files.remove(os.path.join(root, name))
      if root != self.directory and not files.list_dir(root):
        files.remove_tree(root)


def _display_path(workdir: str) -> str:
  """The workdir as the page names it: absolute if local, the URI if in cloud storage."""
  return workdir if files.is_cloud(workdir) else os.path.abspath(workdir)


def _pyplot():
  """matplotlib's pyplot on the Agg backend (imported only by the report: jobs need no plotting)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def natural_key(name: str) -> list:
  """Sorts width8 before width32 and epoch2 before epoch10."""
  return [(0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
          for t in re.findall(r"\d+(?:\.\d+)?|\D+", name)]


def _subdirectories(path: str) -> list[str]:
  return sorted((d for d in files.list_dir(path) if files.is_dir(os.path.join(path, d))),
                key=natural_key)


# ------------------------------------------------------------------------------------------ runs
RUN_FILES = (METRICS_FILE, "evaluations", "adversarial", CO_FILE)
_CURVE_PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k.endswith("loss")),
    ("accuracy", lambda k: k.endswith("accuracy")),
    ("learning rate", lambda k: k == "train/learning_rate"),
    ("gradient norm", lambda k: k == "train/grad_norm"),
)


def find_runs(workdir: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(title, directory) of every directory holding a run's metrics, evaluations or sets: phase 1
  and phase 2, and the networks the infinite job trained."""
  has_run = lambda d: any(files.exists(os.path.join(d, f)) for f in RUN_FILES)
  trained = any(files.exists(os.path.join(workdir, f)) for f in (METRICS_FILE, "evaluations"))
  runs = [("Phase 1" if trained else "Workdir", workdir)] if has_run(workdir) else []
  phase2 = os.path.join(workdir, PHASE2_DIR)
  if has_run(phase2):  # the layout before phase2/<name>/
    runs.append(("Phase 2", phase2))
  runs += [(f"Phase 2: {n}", os.path.join(phase2, n)) for n in _subdirectories(phase2)
           if has_run(os.path.join(phase2, n))]
  transfer = os.path.join(workdir, TRANSFER_DIR)  # the infinite job's finite networks
  return runs, [(f"Infinite-width job: network {n}", os.path.join(transfer, n))
                for n in _subdirectories(transfer) if has_run(os.path.join(transfer, n))]


def plot_training_curves(records: list[dict], collapse_epoch: float | None = None):
  """Loss, accuracies (the CO monitor's robust accuracy included), learning rate and gradient norm
  against the epoch (the step when no record carries train/epoch); None without curves."""
  plt = _pyplot()
  timed = [r for r in records if "train/epoch" in r and r["step"] > 0]
  per_step = timed[-1]["train/epoch"] / timed[-1]["step"] if timed else None
  x_of = (lambda s: s * per_step) if per_step else (lambda s: s)
  series: dict[str, tuple[list, list]] = {}
  for r in records:
    for k, v in r.items():
      if k != "step" and not k.startswith("test/") and isinstance(v, (int, float)):
        xs, ys = series.setdefault(k, ([], []))
        xs.append(x_of(r["step"]))
        ys.append(v)
  panels = [(name, [k for k in sorted(series) if match(k)]) for name, match in _CURVE_PANELS]
  panels = [(name, keys) for name, keys in panels if keys]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.3), squeeze=False)
  for ax, (name, keys) in zip(axes[0], panels):
    for k in keys:
      ax.plot(*series[k], label=k, marker="." if len(series[k][0]) < 40 else None)
    ax.set(xlabel="epoch" if per_step else "step", ylabel=name, title=name)
    values = np.concatenate([series[k][1] for k in keys])
    if name == "loss" and values.min() > 0 and values.max() / values.min() > 100:
      ax.set_yscale("log")
    if collapse_epoch is not None and per_step and name == "accuracy":
      ax.axvline(collapse_epoch, color="red", linestyle="--", label="robustness collapse")
    ax.legend(fontsize="x-small")
  return fig


def evaluation_parts(page: ReportPage, evaluations: list[dict], prefix: str) -> list[str]:
  """Accuracy of every evaluated checkpoint; the newest one per class, with output components."""
  plt = _pyplot()
  names = list(dict.fromkeys(n for e in evaluations for n in e["results"]))
  parts = ["<h3>Evaluations</h3>", table(
      ["epoch", "step"] + [f"{n} accuracy" for n in names],
      [[e["epoch"], e["step"]] + [e["results"].get(n, {}).get("accuracy") for n in names]
       for e in evaluations], key_columns=0)]
  newest = evaluations[-1]
  results = newest["results"]
  num_classes = max((len(r.get("per_class_accuracy", [])) for r in results.values()), default=0)
  extra = sorted({k for r in results.values() for k, v in r.items()
                  if isinstance(v, (int, float)) and k not in ("accuracy", "loss")})
  parts.append(f"<h4>Checkpoint at epoch {fmt(newest['epoch'])} (step {newest['step']}), per class</h4>")
  parts.append(table(["evaluation", "accuracy", "loss"] + extra + [f"class {c}" for c in range(num_classes)],
                     [[n, r.get("accuracy"), r.get("loss")] + [r.get(k) for k in extra]
                      + list(r.get("per_class_accuracy", [None] * num_classes)) for n, r in results.items()]))
  configured = [(n, r["settings"]) for n, r in results.items() if "settings" in r]
  if configured:  # older records do not hold their attacks' settings
    parts.append("<h4>Its attacks, as configured</h4>")
    parts.append(table(["evaluation", "attack", "batch size", "seed"],
                       [[n, s.get("attack"), s.get("eval_batch_size"), s.get("seed")]
                        for n, s in configured]))
  for n, r in results.items():  # a worst_of (AutoAttack), run member by member
    if r.get("accuracy_after"):
      parts.append(f"<h4>{html.escape(n)}: robust accuracy after each of its attacks, in the order "
                   f"run</h4>")
      parts.append(table(list(r["accuracy_after"]), [list(r["accuracy_after"].values())],
                         key_columns=0))
  components = {n: r["output_components"] for n, r in results.items() if "output_components" in r}
  if components:
    keys = list(dict.fromkeys(k for c in components.values() for k in c))
    parts.append("<h4>Output components of the linearized model (f0(x) and J(theta - theta0); "
                 "output: a centered_nonlinear model's own f(theta) - f(theta0))</h4>")
    parts.append(table(["evaluation"] + keys, [[n] + [c.get(k) for k in keys] for n, c in components.items()]))
  if num_classes:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * num_classes + 2), 3.2))
    with_classes = [(n, r["per_class_accuracy"]) for n, r in results.items() if "per_class_accuracy" in r]
    width = 0.8 / len(with_classes)
    for i, (n, per_class) in enumerate(with_classes):
      ax.bar(np.arange(len(per_class)) + (i - (len(with_classes) - 1) / 2) * width, per_class, width, label=n)
    ax.set(xlabel="class", ylabel="accuracy", xticks=range(num_classes), ylim=(0, 1.05),
           title=f"per-class accuracy, epoch {fmt(newest['epoch'])}")
    ax.legend(fontsize="x-small")
    parts.append(page.save_figure(fig, f"{prefix}per_class_accuracy.png", "per-class accuracy"))
  if len(evaluations) > 1:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n in names:
      points = [(e["epoch"], e["results"][n]["accuracy"]) for e in evaluations if n in e["results"]]
      ax.plot(*zip(*points), marker="o", label=n)
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy of the evaluated checkpoints")
    ax.legend(fontsize="x-small")
    parts.append(page.save_figure(fig, f"{prefix}evaluations.png", "accuracy of the evaluated checkpoints"))
  return parts


def adversarial_parts(page: ReportPage, directory: str, prefix: str) -> list[str]:
  """The saved adversarial sets (meta.json) and the first images of each with label -> prediction."""
  plt = _pyplot()
  root = os.path.join(directory, "adversarial")
  rows, images = [], []
  for name in _subdirectories(root):
    meta = read_set_meta(os.path.join(root, name))
    if meta is None:  # meta.json is written last: an interrupted save, said as a kernel's tiles are
      rows.append([name, "incomplete (no meta.json)", *[None] * 7])
      continue
    # A network's sets record their attack; the infinite job's, the kernel config with every attack.
    attack = meta.get("attack") or meta.get("kernel", {}).get("attacks", {}).get(name, {})
    source = (f"step {meta['checkpoint_step']}" if "checkpoint_step" in meta else meta.get("source"))
    rows.append([name, attack.get("name"), attack.get("norm"), attack.get("eps"), attack.get("num_steps"),
                 source, meta.get("split"), meta.get("clean_accuracy"), meta.get("accuracy")])
    try:  # memory-mapped: only the shown images are read
      arrays = {k: files.load_array(os.path.join(root, name, f"{k}.npy"), memory_map=True)
                for k in ("images", "labels", "predictions")}
    except (OSError, ValueError):
      continue
    shown = min(NUM_EXAMPLES_SHOWN, len(arrays["images"]))
    if shown == 0:
      continue
    fig, axes = plt.subplots(1, shown, figsize=(1.2 * shown, 1.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
      image = np.clip(np.asarray(arrays["images"][i], np.float32), 0, 1)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{int(arrays['labels'][i])}->{int(arrays['predictions'][i])}", fontsize=8,
                   color="black" if arrays["labels"][i] == arrays["predictions"][i] else "red")
      ax.axis("off")
    fig.suptitle(f"{name}: label -> prediction", fontsize=9)
    images.append(page.save_figure(fig, f"{prefix}adversarial_{name}.png", f"adversarial set {name}"))
  if not rows:
    return []
  return ["<h3>Saved adversarial sets</h3>",
          table(["set", "attack", "norm", "eps", "steps", "attacked model", "split", "clean accuracy",
                 "accuracy"], rows)] + images


def run_parts(page: ReportPage, directory: str, prefix: str) -> list[str]:
  """Training curves, final test metrics, evaluations, adversarial sets and the CO record of a run."""
  parts = []
  co_path = os.path.join(directory, CO_FILE)
  co = files.read_json(co_path) if files.exists(co_path) else None
  collapse = (co or {}).get("collapse") or {}
  metrics_path = os.path.join(directory, METRICS_FILE)
  if files.exists(metrics_path):
    records = read_jsonl(metrics_path)
    fig = plot_training_curves(records, collapse.get("epoch"))
    if fig is not None:
      parts += ["<h3>Training curves</h3>", page.save_figure(fig, f"{prefix}training.png", "training curves")]
    tests = [r for r in records if any(k.startswith("test/") for k in r)]
    if tests:
      final = tests[-1]
      parts += [f"<h3>Test metrics at the end of training (step {final['step']})</h3>",
                table(["metric", "value"], [(k, v) for k, v in final.items() if k.startswith("test/")])]
  evaluations = evaluation_records.read_records(directory)
  if evaluations:
    parts += evaluation_parts(page, evaluations, prefix)
  parts += adversarial_parts(page, directory, prefix)
  if co is not None:
    verdict = ("no collapse recorded" if not co.get("collapsed") else
               f"collapse at epoch {fmt(collapse.get('epoch'))}, "
               f"{'sustained' if co.get('sustained') else 'transient'}")
    parts += [f"<h3>Catastrophic overfitting: {html.escape(verdict)}</h3>", key_value_table(co),
              page.link(page.copy(co_path, f"{prefix}{CO_FILE}"), CO_FILE)]
  return parts


# ------------------------------------------------------------------------------------------ kernels
def kernel_row(name: str, meta: dict, tiles_done: int) -> list[Any]:
  shape = meta.get("shape", [])
  n, tile = (shape[0] if shape else 0), int(meta.get("tile", 0) or 0)
  blocks = -(-n // tile) if tile else 0
  source = meta.get("source", {})
  return [name, " x ".join(map(str, shape)), meta.get("logits"), meta.get("data"), meta.get("split"),
          source.get("phase"), source.get("epoch"), meta.get("dtype"), meta.get("method"), tile,
          f"{tiles_done} of {blocks * (blocks + 1) // 2}", bool(meta.get("complete")), meta.get("seconds")]


def kernel_parts(page: ReportPage, workdir: str) -> list[str]:
  """The kernels' metadata, and the spectrum of each complete one: the spectrum job's where it ran
  (its top k), else a dense eigh's where the kernel is small enough."""
  from ntk_scale.ntk.job import KERNELS_DIR  # pylint: disable=import-outside-toplevel
  from ntk_scale.ntk.spectrum import NonFiniteKernelError, eigenvalues  # pylint: disable=import-outside-toplevel
  from ntk_scale.ntk.store import META_FILE, TILES_DIR, KernelStore, KernelStoreDamagedError  # pylint: disable=import-outside-toplevel
  from ntk_scale.ntk.spectrum_job import RESULT_FILE, SPECTRUM_DIR, load_spectrum  # pylint: disable=import-outside-toplevel

  root = os.path.join(workdir, KERNELS_DIR)
  kernels = {name: files.read_json(os.path.join(root, name, META_FILE)) for name in _subdirectories(root)
             if files.exists(os.path.join(root, name, META_FILE))}
  order = lambda name: (kernels[name].get("source", {}).get("phase", 0),
                        kernels[name].get("source", {}).get("epoch", 0), name)
  rows, spectra, traces, too_big, damaged = [], {}, {}, [], []
  for name in sorted(kernels, key=order):
    directory, meta = os.path.join(root, name), kernels[name]
    tiles = os.path.join(directory, TILES_DIR)
    done = len(files.list_dir(tiles))
    rows.append(kernel_row(name, meta, done))
    size = int(np.prod(meta.get("shape", [0])[::2]))  # N, or N*C for a full kernel
    solved = os.path.join(directory, SPECTRUM_DIR)
    if meta.get("complete") and files.exists(os.path.join(solved, RESULT_FILE)):
      pairs, record = load_spectrum(solved)  # the spectrum job's: a dense one holds every eigenvalue
      spectra[name], traces[name] = pairs.values, record["trace"]
    elif meta.get("complete") and size > MAX_SPECTRUM_SIZE:
      too_big.append(name)
    elif meta.get("complete") and size > 0:
      try:
        spectra[name] = eigenvalues(KernelStore.open(directory).read())
      except (KernelStoreDamagedError, NonFiniteKernelError):
        damaged.append(name)
        continue
      traces[name] = spectra[name].sum()
  if not rows:
    return []
  header = ["kernel", "shape", "logits", "data", "split", "phase", "epoch", "dtype", "method", "tile",
            "tiles done", "complete", "seconds", "top eigenvalue", "trace", "eigenvalues drawn"]
  rows = [r + ([spectra[r[0]][0], traces[r[0]], len(spectra[r[0]])] if r[0] in spectra else [None] * 3)
          for r in rows]
  parts = [table(header, rows)]
  if too_big:
    parts.append(paragraph(f"No spectrum drawn for kernels larger than {MAX_SPECTRUM_SIZE} rows (N, or "
                           f"N*C for full kernels) without a spectrum job's result: {', '.join(too_big)}; "
                           f"their top eigenpairs: --config.job=spectrum.", "note"))
  if damaged:
    parts.append(paragraph(f"No spectrum drawn for kernels with a missing chunk or NaN entries: "
                           f"{', '.join(damaged)}; --config.job=kernel computes lost tiles again.",
                           "note"))
  if spectra:
    parts.append(page.save_figure(plot_spectra(spectra), "kernels/spectra.png", "kernel spectra"))
  return parts


def plot_spectra(spectra: dict[str, np.ndarray]):
  """Every kernel's eigenvalues, largest first, on log-log axes (one line per kernel)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5 if len(spectra) > 1 else 5, 3.8))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(spectra)))
  for color, (name, values) in zip(colors, spectra.items()):
    positive = values[values > 0]
    ax.loglog(np.arange(1, len(positive) + 1), positive, color=color, label=name)
  ax.set(xlabel="index", ylabel="eigenvalue", title="kernel spectra")
  ax.legend(fontsize="xx-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
  return fig


# ------------------------------------------------------------------------------------------ generic
def csv_table(path: str) -> str:
  """A CSV file as an HTML table, numbers formatted, the first MAX_TABLE_ROWS rows."""
  rows = list(csv.reader(io.StringIO(files.read_text(path), newline="")))
  if not rows:
    return ""

  def cell(text: str) -> Any:
    try:
      return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
      return text

  body = [[cell(c) for c in r] for r in rows[1:MAX_TABLE_ROWS + 1]]
  more = len(rows) - 1 - len(body)
  return table(rows[0], body) + (paragraph(f"... {more} more rows in the file.", "note") if more > 0 else "")


def _earlier_rules_check(name: str) -> tuple[str, str, Callable[[dict[str, Any]], bool]] | None:
  """For a RESULT_DIRS entry whose job remakes records of its earlier rules: the job, the record's
  file name and the job's test of a record (imported here: the report loads no job it does not
  need)."""
  if name == "eigen_features":
    from ntk_scale.ntk import eigen_features_job  # pylint: disable=import-outside-toplevel
    return "eigen_features", "features.json", eigen_features_job.of_earlier_rules
  if name == "kernel_evolution":
    from ntk_scale.ntk import evolution  # pylint: disable=import-outside-toplevel
    return "evolution", evolution.METRICS_JSON, evolution.of_earlier_rules
  return None


def result_directory_parts(page: ReportPage, top: str, prefix: str) -> list[str]:
  """Every PNG (embedded), CSV (a table and a link) and JSON (a link) under `top`, by directory,
  less a job's progress (`*.partial/`: an unfinished job's pieces, not its results). A result its
  job would make again (of the job's earlier rules: an earlier version's, perhaps wrong) says so."""
  check = _earlier_rules_check(os.path.basename(top))
  parts = []
  for root, dirs, names in files.walk(top):  # top-down, each level in natural order
    # files.walk leaves temporaries out
    dirs[:] = sorted((d for d in dirs if not d.endswith(".partial")), key=natural_key)
    names = sorted(names, key=natural_key)
    shown = [n for n in names if n.endswith((".png", ".csv", ".json"))]
    if not shown:
      continue
    relative = os.path.relpath(root, top)
    target = prefix if relative == "." else f"{prefix}{relative}/"
    parts.append(f"<h3>{html.escape(relative if relative != '.' else os.path.basename(top))}</h3>")
    if check is not None and check[1] in names and check[2](files.read_json(os.path.join(root, check[1]))):
      parts.append(paragraph(f"Made by earlier rules of the {check[0]} job (an earlier version of "
                             f"ntk_scale): its figures may be wrong; config.job='{check[0]}' makes "
                             f"it again.", "note"))
    links = [page.link(page.copy(os.path.join(root, n), target + n), n) for n in shown
             if not n.endswith(".png")]
    parts.append(f"<p>Files: {', '.join(links)}</p>" if links else "")
    parts += [csv_table(os.path.join(root, n)) for n in shown if n.endswith(".csv")]
    parts += [page.image(page.copy(os.path.join(root, n), target + n), n) for n in shown if n.endswith(".png")]
  return parts


def infinite_parts(page: ReportPage, workdir: str) -> list[str]:
  """The infinite job's results.json (every accuracy), flattened."""
  from ntk_scale.infinite_job import RESULTS_FILE, ROBUST_DATASET_FILE  # pylint: disable=import-outside-toplevel

  path = os.path.join(workdir, RESULTS_FILE)
  if not files.exists(path):
    return []
  results = {k: v for k, v in files.read_json(path).items() if k != "settings"}  # a digest, for reruns
  parts = [key_value_table(results), page.link(page.copy(path, RESULTS_FILE), RESULTS_FILE)]
  dataset = os.path.join(workdir, ROBUST_DATASET_FILE)
  if files.exists(dataset):
    parts.append(paragraph(f"The optimised training set: {ROBUST_DATASET_FILE} "
                           f"({files.size(dataset) / 2**20:.1f} MiB) in the workdir.", "note"))
  return parts


# ------------------------------------------------------------------------------------------ job
def write_report(workdir: str) -> str:
  """Renders every result in `workdir` into `<workdir>/report/`; returns index.html's path."""
  page = ReportPage(os.path.join(workdir, REPORT_DIR))
  index = os.path.join(page.directory, INDEX_FILE)
  if jax.process_index() != 0:
    return index
  config_path = os.path.join(workdir, CONFIG_FILE)
  config = files.read_json(config_path) if files.exists(config_path) else None
  runs, networks = find_runs(workdir)

  def add_runs(found: list[tuple[str, str]]) -> None:
    for title, directory in found:
      relative = os.path.relpath(directory, workdir)
      page.add_section(title, run_parts(page, directory, "" if relative == "." else f"{relative}/"))

  add_runs(runs)
  page.add_section("Kernels", kernel_parts(page, workdir))
  for name, title in RESULT_DIRS:
    page.add_section(title, result_directory_parts(page, os.path.join(workdir, name), f"{name}/"))
  page.add_section("Infinite-width kernels", infinite_parts(page, workdir))
  add_runs(networks)
  empty = not page.sections
  if config is not None:
    link = page.link(page.copy(config_path, CONFIG_FILE), CONFIG_FILE)
    page.add_section("Configuration", [f"<details><summary>every field ({link})</summary>"
                                       f"{key_value_table(config)}</details>"])
  return page.write(workdir, config, empty)


def report_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The `report` job: `<workdir>/report/index.html` from every result the workdir holds."""
  del config  # the report reads the workdir only
  return {"report": write_report(workdir)}
