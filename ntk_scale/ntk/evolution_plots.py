"""PNG plots of a kernel evolution (the figures of Loo et al. 2022 and Tsilivis & Kempe 2022) from
the dictionary the evolution job writes as metrics.json, so a report can redraw them from disk."""

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from matplotlib import ticker  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from ntk_scale.files import save_figure  # pylint: disable=wrong-import-position

PLOTS = ("distance_to_final.png", "polar.png", "spectra.png")
_SPACES = (("", "whole kernel"), ("_top_k", "top-{k} eigenspace"), ("_bottom_k", "bottom-{k} eigenspace"))


def _column(results: dict[str, Any], key: str) -> np.ndarray:
  return np.array([row[key] for row in results["checkpoints"]], np.float64)


def _spaces(results: dict[str, Any]) -> list[tuple[str, str]]:
  """The (column suffix, label) of the whole kernel and the eigenspaces that were measured: a
  kernel whose top eigenpairs alone were computed has no bottom-k columns (None)."""
  return [(suffix, label.format(k=results["top_k"])) for suffix, label in _SPACES
          if results["checkpoints"][0][f"distance_to_final{suffix}"] is not None]


def _save(fig: plt.Figure, path: str) -> str:
  return save_figure(fig, path, dpi=120)


def plot_distance_to_final(results: dict[str, Any], path: str) -> str:
  """Kernel distance 1 - s(K_t, K_T) against the epoch: how early the kernel settles. The axis is
  symlog (linear up to the first positive epoch, so the initialisation, epoch 0, has a place) when
  the positive epochs span more than a factor of 4 and pass epoch 2; they decide, so that epoch 0
  alone does not make an axis logarithmic. Below epoch 2 (matplotlib's default linear range) a
  symlog axis had no tick between its ends."""
  epochs = _column(results, "epoch")
  positive = epochs[epochs > 0]
  spread = positive.size > 0 and positive.max() > max(4 * positive.min(), 2.0)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for suffix, label in _spaces(results):
    ax.plot(epochs, _column(results, f"distance_to_final{suffix}"), marker="o", label=label)
  ax.set(xlabel=f"epoch (phase {results['phase']})", ylabel="distance to final kernel",
         title="Kernel distance to the final kernel")
  if spread:
    ax.set_xscale("symlog", linthresh=positive.min())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
  if "collapse" in results:  # the catastrophic-overfitting monitor's first collapsed measurement
    ax.axvline(results["collapse"]["epoch"], color="red", linestyle="--", label="robustness collapse")
  ax.legend()
  return _save(fig, path)


def plot_polar(results: dict[str, Any], path: str) -> str:
  """Tsilivis & Kempe's polar plot: angle arccos s(K_t, K_0) against relative movement."""
  fig = plt.figure(figsize=(5, 5))
  ax = fig.add_subplot(projection="polar")
  for suffix, label in _spaces(results):
    ax.plot(_column(results, f"angle{suffix}"), _column(results, f"relative_movement{suffix}"),
            marker="o", label=label)
  ax.set_thetamin(0)
  ax.set_thetamax(90)
  ax.set_title("angle vs relative movement from the first kernel")
  ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # the empty corner
  return _save(fig, path)


def plot_spectra(results: dict[str, Any], path: str) -> str:
  """The largest eigenvalues of each checkpoint's kernel, on a log scale."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  colors = plt.cm.viridis(np.linspace(0, 1, len(results["epochs"])))
  for epoch, values, color in zip(results["epochs"], results["eigenvalues"], colors):
    values = np.asarray(values)
    ax.plot(np.arange(1, len(values) + 1), np.maximum(values, 1e-30), color=color,
            label=f"epoch {epoch:g}")
  ax.set(xlabel="index", ylabel="eigenvalue", xscale="log", yscale="log",
         title="Top eigenvalues of the kernel")
  ax.legend(fontsize="small")
  return _save(fig, path)


def plot_evolution(results: dict[str, Any], directory: str) -> list[str]:
  """Every plot of the evolution into `directory`; their paths."""
  return [plot(results, os.path.join(directory, name)) for plot, name in
          zip((plot_distance_to_final, plot_polar, plot_spectra), PLOTS)]
