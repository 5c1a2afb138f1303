"""Phase 2 of Loo et al. (NeurIPS 2022): a network linearized around a checkpoint theta0.

Training the first-order Taylor model of a network around theta0 trains on a frozen empirical NTK;
comparing it with the network itself separates what the kernel learns from how it moves. The
models, for any flax model f with checkpoint theta0 = (params0, batch_stats0):

  linear              f(x; theta0) + J(x; theta0) (theta - theta0)
  centered            J(x; theta0) (theta - theta0)        (the f(x; theta0) offset removed)
  centered_nonlinear  f(x; theta) - f(x; theta0)           (the nonlinear control for "centered")

J(x; theta0) v is one `jax.jvp` (a forward pass and its tangent), so no Jacobian is ever formed
and the cost is about that of three forward passes. centered_nonlinear runs at HIGHEST matmul
precision: the backend's default (one bfloat16 pass on TPUs, TF32 on GPUs) rounds each weight more
coarsely than the change theta - theta0 it measures.

BatchNorm is "frozen" (default: inference mode on batch_stats0 in both training and inference,
nothing updated, so the model is linear in theta and the kernel is the one of theta0) or "loose"
(training mode uses the statistics of the batch and updates the running averages as the plain
model does; the linear kinds take them from the forward pass at theta0).

`LinearizedModel` has the `init` / `apply` of a flax model and is passed wherever a model goes:
the trainer (`create_train_state`, the train steps), the attacks, the evaluators and the kernel
engine take it unchanged. theta0 is held by the object as constants; theta is
`variables["params"]`, so phase 2 starts at theta = theta0.
"""

import copy
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LINEARIZATIONS = ("linear", "centered", "centered_nonlinear")
BATCH_NORM = ("frozen", "loose")

PyTree = Any


def _copy(tree: PyTree) -> PyTree:
  """Own buffers: a train step donates its state, which must never delete theta0."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _wants_batch_stats(mutable: bool | str | Sequence[str]) -> bool:
  if mutable is True:
    return True
  if isinstance(mutable, str):
    return mutable == "batch_stats"
  return "batch_stats" in (mutable or ())


class LinearizedModel:
  """A flax-like model (`init`, `apply`) for the linearization of `model` around theta0.

  A plain object compared by identity, so its bound `apply` can be a TrainState's static
  `apply_fn` and jit caches stay valid for its lifetime.
  """

  def __init__(self, model: nn.Module, params0: PyTree, batch_stats0: PyTree | None,
               kind: str = "linear", batch_norm: str = "frozen"):
    if kind not in LINEARIZATIONS:
      raise ValueError(f"config.phase2.linearization={kind!r} is not a known linearization; "
                       f"expected one of {', '.join(LINEARIZATIONS)}.")
    if batch_norm not in BATCH_NORM:
      raise ValueError(f"config.phase2.batch_norm={batch_norm!r} is not a known BatchNorm mode; "
                       f"expected one of {', '.join(BATCH_NORM)}.")
    self.model = model
    self.kind = kind
    self.batch_norm = batch_norm
    self.params0 = _copy(params0)
    self.batch_stats0 = _copy(batch_stats0 if batch_stats0 is not None else {})

  def clone(self, *, dtype: Any) -> "LinearizedModel":
    """This linearization, around the same theta0 (shared, not copied), of the network computing in
    `dtype` (e.g. bfloat16; as flax's `Module.clone(dtype=...)`): a train step's compute twin."""
    twin = copy.copy(self)
    twin.model = self.model.clone(dtype=dtype)
    return twin

  def __repr__(self) -> str:
    return (f"LinearizedModel({type(self.model).__name__}, kind={self.kind!r}, "
            f"batch_norm={self.batch_norm!r})")

  def init(self, key: jax.Array, x: jax.Array, train: bool = False) -> dict[str, PyTree]:
    """theta0 itself (fresh copies): phase 2 starts from the checkpoint, `key` and `x` are unused."""
    del key, x, train
    return {"params": _copy(self.params0), "batch_stats": _copy(self.batch_stats0)}

  def params0_like(self, params: PyTree) -> PyTree:
    """theta0 in the dtypes of `params`: a kernel asked for in float64 passes float64 params, and
    theta0 must not pull the network back to float32 (float32 to float64 is exact)."""
    return jax.tree.map(lambda p, p0: p0.astype(p.dtype), params, self.params0)

  def batch_stats0_like(self, params: PyTree) -> PyTree:
    """batch_stats0 promoted to the dtype of `params` (float64 for a float64 kernel: BatchNorm's
    rsqrt(var + eps) in float32 would round every example's logits at 1e-7)."""
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return jax.tree.map(lambda b: b.astype(jnp.promote_types(b.dtype, dtype)), self.batch_stats0)

  def network(self, params: PyTree, batch_stats: PyTree, x: jax.Array,
              train: bool) -> tuple[jax.Array, PyTree]:
    """f(x; params) and the running averages after it (unchanged unless `train`)."""
    variables = {"params": params}
    if jax.tree.leaves(batch_stats):
      variables["batch_stats"] = batch_stats
    if not train:
      return self.model.apply(variables, x, train=False), batch_stats
    logits, updates = self.model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", batch_stats)

  def components(self, params: PyTree, batch_stats: PyTree, x: jax.Array,
                 train: bool) -> tuple[jax.Array, jax.Array, PyTree]:
    """(f(x; theta0), J(x; theta0)(params - params0), running averages after the theta0 pass)."""
    params0 = self.params0_like(params)
    delta = jax.tree.map(lambda p, p0: p - p0, params, params0)
    f = lambda p: self.network(p, batch_stats, x, train)
    f0, jvp, new_stats = jax.jvp(f, (params0,), (delta,), has_aux=True)
    return f0, jvp, new_stats

  def apply(self, variables: dict[str, PyTree], x: jax.Array, *, train: bool,
            mutable: bool | str | Sequence[str] = False) -> jax.Array | tuple[jax.Array, dict]:
    """Logits, or (logits, {"batch_stats": ...}) when `mutable` asks for it, as `Module.apply`."""
    params = variables["params"]
    stats = (variables["batch_stats"] if "batch_stats" in variables
             else self.batch_stats0_like(params))
    loose = self.batch_norm == "loose"
    # Frozen: inference mode on batch_stats0 whatever `train` says.
    bn_stats, bn_train = (stats, train) if loose else (self.batch_stats0_like(params), False)
    if self.kind == "centered_nonlinear":
      # Its signal is the change theta - theta0, often below the rounding of theta itself in the
      # matmul inputs of the backend's default precision (one bfloat16 pass on TPUs: 2^-8 of each
      # weight; TF32 on GPUs: 2^-11), which would round f(theta) - f(theta0) to noise: HIGHEST.
      with jax.default_matmul_precision("highest"):
        out, new_stats = self.network(params, bn_stats, x, bn_train)
        out0, _ = self.network(self.params0_like(params), bn_stats, x, bn_train)
      logits = out - out0
    else:
      f0, jvp, new_stats = self.components(params, bn_stats, x, bn_train)
      logits = jvp if self.kind == "centered" else f0 + jvp
    if not mutable:
      return logits
    if not loose:
      new_stats = stats
    if _wants_batch_stats(mutable) and jax.tree.leaves(stats):
      return logits, {"batch_stats": new_stats}
    return logits, {}


def output_components(model: LinearizedModel, params: PyTree, x: jax.Array,
                      batch_stats: PyTree | None = None) -> dict[str, jax.Array]:
  """{"f0": f(x; theta0), "jvp": J(x; theta0)(params - params0)} in inference mode, and for
  centered_nonlinear "output": its own output f(x; params) - f(x; theta0), of which jvp is only the
  first-order term (far from it once params have moved; for linear and centered the output is
  f0 + jvp and jvp).

  Evaluation records them: how much of the prediction is the frozen network and how much the
  learned kernel term. BatchNorm uses batch_stats0 when frozen, else `batch_stats` (default
  batch_stats0), the current running averages.
  """
  if model.batch_norm == "frozen" or batch_stats is None:
    batch_stats = model.batch_stats0
  f0, jvp, _ = model.components(params, batch_stats, x, train=False)
  if model.kind != "centered_nonlinear":
    return {"f0": f0, "jvp": jvp}
  output = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  return {"f0": f0, "jvp": jvp, "output": output}
