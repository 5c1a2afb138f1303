"""Every config field with its default; the files in configs/ start from `base_config()`."""

import ml_collections

from ntk_scale.config_numbers import is_whole_number


def parse_variants(arg: str, allowed: tuple[str, ...], file: str) -> set[str]:
  """The comma-separated variants of a config file's `get_config(arg)` (e.g. "adversarial,smoke").

  An unknown variant is an error naming `file`, so a typo never silently runs the default experiment.
  """
  variants = {v for v in arg.split(",") if v}
  unknown = sorted(variants - set(allowed))
  if unknown:
    raise ValueError(f"{file}: unknown variant(s) {unknown}; expected a comma-separated subset of "
                     f"{tuple(allowed)}.")
  return variants


# Attacks that read step_size but default it themselves (attacks.py: rs_fgsm 1.25 * eps, n_fgsm eps).
_OWN_STEP_DEFAULT = ("rs_fgsm", "n_fgsm")


def _pgd_step_for(_, name: str, eps: float, num_steps: int, step: float | None = None) -> float | None:
  """pgd_linf's step_size once `name` is resolved: None (the attack's own default) for rs_fgsm and
  n_fgsm, so overriding only the name never runs them with PGD's step; PGD's otherwise (unused by
  the other attacks). None too, rather than a division by zero, for a num_steps that is not an
  integer >= 1: the config is still serialised (for its record) with it, and build_attack names
  the field where the attack is used."""
  if name in _OWN_STEP_DEFAULT:
    return None
  if step is not None:
    return step
  return pgd_default_step(eps, num_steps)


def pgd_default_step(eps: float, num_steps: int) -> float | None:
  """Madry et al.'s 2.5 * eps / num_steps; None for a num_steps that is not an integer >= 1."""
  if not is_whole_number(num_steps, 1):
    return None
  return 2.5 * eps / num_steps


def pgd_linf(eps: float, num_steps: int, step_size: float | None = None,
             restarts: int = 1) -> ml_collections.ConfigDict:
  """An L-inf PGD attack config; the step size defaults to 2.5 * eps / num_steps (Madry et al.).

  The step is a reference to the config's own name, eps and num_steps, so it follows them when they
  are overridden later (--config.train.attack.eps=...); with name rs_fgsm or n_fgsm it is None, those
  attacks' own default (README: single-step training overrides only train.attack.name). Setting
  step_size itself replaces it.
  """
  name_ref = ml_collections.FieldReference("pgd", field_type=str)
  eps_ref = ml_collections.FieldReference(float(eps), field_type=float)
  steps_ref = ml_collections.FieldReference(num_steps, field_type=int)
  args = [name_ref, eps_ref, steps_ref] + ([] if step_size is None else [float(step_size)])
  step_ref = ml_collections.FieldReference(  # as FieldReference's own cast ops build it
      0.0, field_type=float, op=ml_collections.config_dict._Op(_pgd_step_for, args))
  return ml_collections.ConfigDict(dict(
      name=name_ref, norm="linf", eps=eps_ref, num_steps=steps_ref, restarts=restarts,
      random_start=True, step_size=step_ref))


def apgd_linf(eps: float, num_steps: int, restarts: int = 1) -> ml_collections.ConfigDict:
  """APGD-CE (Croce and Hein, 2020) under L-inf."""
  return ml_collections.ConfigDict(dict(name="apgd_ce", norm="linf", eps=eps, num_steps=num_steps,
                                        restarts=restarts))


def autoattack(eps: float, norm: str = "linf", num_steps: int = 100, num_targets: int = 9,
               fab_steps: int = 100, square_queries: int = 5000) -> ml_collections.ConfigDict:
  """AutoAttack's standard version in `norm` ("linf" or "l2"): APGD-CE, APGD-T (num_steps each,
  num_targets target classes), FAB-T (fab_steps, the same targets; 0: none) and Square Attack
  (square_queries, the square's size on AutoAttack's fixed schedule; 0: none), per example the
  worst case (`worst_of`). The APGD pair breaks nearly
  every example the whole ensemble breaks (Croce and Hein 2020); FAB-T, which searches for the
  nearest point of the decision boundary rather than following a loss, and Square, which reads
  only the logits, are there for models whose losses or gradients mislead. Evaluation runs them
  in this order (a worst_of's members run in the order of their names, which ml_collections
  sorts; AutoAttack's order is also theirs), each on the examples still robust, as AutoAttack
  does, and records the robust accuracy after each ("accuracy_after")."""
  members = dict(apgd_ce=dict(name="apgd_ce", num_steps=num_steps),
                 apgd_t=dict(name="apgd_t", num_steps=num_steps, num_targets=num_targets))
  if fab_steps:
    members["fab_t"] = dict(name="fab_t", num_steps=fab_steps, num_targets=num_targets)
  if square_queries:
    members["square"] = dict(name="square", num_queries=square_queries, p_schedule="fixed")
  return ml_collections.ConfigDict(dict(name="worst_of", norm=norm, eps=eps, attacks=members))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train"
  c.seed = 0  # initialisation, data order and augmentation all derive from it

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | cifar10 | cifar100 | mnist | fashion_mnist | svhn_cropped
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
  c.data.download = True  # tfds may download when the dataset is not prepared
  c.data.augment = "none"  # none | crop_flip
  # Applied to train and test splits where the data is loaded (ntk_scale/data/feature_injection.py):
  # inject: x + beta * v_y, a low-frequency DCT pattern per class (Ortiz-Jimenez et al. 2023);
  # low_pass: keep the cutoff x cutoff lowest DCT frequencies.
  c.data.transform = ml_collections.ConfigDict()
  c.data.transform.name = "none"  # none | inject | low_pass
  c.data.transform.beta = 0.0  # inject: largest pixel change of the pattern ([0, 1] pixel units)
  c.data.transform.num_frequencies = 10  # inject: classes draw distinct frequencies among these lowest
  c.data.transform.remove_projection = False  # inject: remove x's component on the class directions first
  c.data.transform.seed = 0  # inject: which frequency and sign each class gets
  # inject: "dct" (orthonormal cosine patterns, as above) | "sign" (Ortiz-Jimenez et al.'s own: the
  # sign of 5 low DCT frequencies, classes 5-9 their negatives; 10 classes)
  c.data.transform.carrier = "dct"
  c.data.transform.cutoff = 4  # low_pass: DCT frequencies kept per axis

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"  # resnet18 | cnn | mlp
  c.model.width = 32
  c.model.depth = 2  # mlp only
  c.model.batch_norm = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # sgd | adam
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"  # constant | piecewise | cosine | cyclic
  c.optimizer.decay_epochs = ()  # piecewise: multiply by decay_factor after each
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0  # cosine
  c.optimizer.peak_fraction = 0.4  # cyclic

  c.batch_size = 128  # global, over all devices
  c.eval_batch_size = 512
  # The precision of evaluations' float32 matmuls (clean, attacks, transfer, the CO monitor's):
  # default (the backend's: TF32 on GPUs, one bfloat16 pass on TPUs) | high | highest. Recorded with
  # each result.
  c.eval_matmul_precision = "default"
  c.num_epochs = 10.0
  c.log_every_steps = 50
  # Steps traced with jax.profiler (after the first 2 of a run: compilation), for TensorBoard's
  # profile plugin: each phase's train steps, into the phase directory's plugins/profile/, and the
  # kernel job's tile steps, into the kernel's; 0: none.
  c.profile_steps = 0
  # Compiled programs kept in <workdir>/compilation_cache/, so that a resumed job (or a later job on
  # the workdir) loads them instead of compiling (ntk_scale/compilation_cache.py). When the
  # environment sets JAX_COMPILATION_CACHE_DIR, that directory is the cache instead.
  c.compilation_cache = True

  c.train = ml_collections.ConfigDict()
  c.train.mode = "C"  # C: benign | A: adversarial | F: benign, then adversarial from flip_epoch
  c.train.flip_epoch = 0.0  # F only
  c.train.benign_step_first = False  # A/F: Loo et al.'s code, a benign then an adversarial update per batch
  c.train.attack_batch_norm = "inference"  # BatchNorm during the attack: inference | train
  c.train.attack = pgd_linf(eps=8 / 255, num_steps=10)  # A/F only
  # The dtype phase 1's train steps compute in, attack included: float32 | bfloat16 (activations and
  # matmul inputs; parameters, optimizer state and BatchNorm statistics stay float32, and every
  # evaluation, kernel and phase 2 computes in float32). bfloat16 halves activation memory and
  # traffic on GPUs and TPUs.
  c.train.compute_dtype = "float32"
  # The precision of those steps' float32 matmuls and convolutions: default (the backend's: TF32 on
  # GPUs, one bfloat16 pass on TPUs) | high (TF32; three bfloat16 passes on TPUs) | highest (float32).
  c.train.matmul_precision = "default"
  # Single-step methods (A/F): train.attack.name fgsm | rs_fgsm (Wong et al. 2020) | n_fgsm (de Jorge
  # et al. 2022); overriding the name alone gives the paper's step (step_size None: 1.25 eps, eps),
  # num_steps unused, restarts must stay 1 (see pgd_linf, build_attack). GradAlign's weight
  # (Andriushchenko and Flammarion 2020; 0: off, A/F only), its noise uniform in the train.attack
  # eps-box.
  c.train.grad_align = 0.0
  # GradAlign's grad_x L(x): "constant" (the authors' code detaches it) | "differentiated" (the
  # paper's formula: both gradients differentiated; see configs/catastrophic_overfitting.py).
  c.train.grad_align_clean = "constant"
  # Catastrophic-overfitting monitor (ntk_scale/train/co_monitor.py): every `every_steps` batch steps
  # (0: off) and at every checkpoint, accuracy under `attack` on `num_examples` fixed test images and
  # clean accuracy on as many fixed training images, to metrics.jsonl as co/*. A collapse is robust
  # accuracy below `collapse_fraction` of its running maximum (once that reached `min_peak`) while
  # clean training accuracy fell by at most `max_train_drop`; the first one is recorded in
  # <workdir>/catastrophic_overfitting.json, with checkpoints just before and after it if
  # `keep_checkpoints`.
  c.train.co_monitor = ml_collections.ConfigDict()
  c.train.co_monitor.every_steps = 0
  c.train.co_monitor.num_examples = 256
  c.train.co_monitor.attack = pgd_linf(eps=8 / 255, num_steps=10)
  c.train.co_monitor.collapse_fraction = 0.5
  c.train.co_monitor.min_peak = 0.2
  c.train.co_monitor.max_train_drop = 0.05
  c.train.co_monitor.sustain_evals = 3  # consecutive collapsed measurements: a sustained collapse
  c.train.co_monitor.keep_checkpoints = True

  # Evaluated on the test split at the end of training: name -> attack (see ntk_scale/attacks.py).
  c.eval_attacks = ml_collections.ConfigDict()
  c.save_adversarial = True  # keep each eval attack's examples under <workdir>/adversarial/<name>/

  # The `evaluate` job (config.job="evaluate"): which checkpoint, and saved sets to test transfer on.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.phase = 1  # 1: the network's checkpoints | 2: phase 2's (config.phase2.name), linearized
  c.evaluate.epoch = ml_collections.FieldReference(None, field_type=float)  # of that phase; None: newest
  c.evaluate.transfer_sets = ()  # directories written as <workdir>/adversarial/<name>/

  # Phase 2 (Loo et al.): from the phase-1 checkpoint at `from_epoch` (theta0; 0: the initialisation,
  # the NTK-at-initialisation baseline), train only the model linearized around it (see
  # ntk_scale/linearize.py), under <workdir>/phase2/<name>/.
  c.phase2 = ml_collections.ConfigDict()
  # Several phase-2 experiments share one phase 1, each in its own directory. "": named after
  # linearization, batch_norm, mode and from_epoch, e.g. centered_C_from3 (ntk_scale/workdir.py).
  c.phase2.name = ""
  c.phase2.num_epochs = 0.0  # 0: no phase 2
  c.phase2.from_epoch = 1.0  # a saved phase-1 epoch, fractional ones (0.5, ...) and 0 included
  c.phase2.linearization = "centered"  # linear | centered | centered_nonlinear (Loo et al.: --centering)
  c.phase2.batch_norm = "frozen"  # frozen | loose
  c.phase2.mode = "C"  # C: benign | A: adversarial, the attack run against the linearized model
  c.phase2.benign_step_first = False  # A: a benign then an adversarial update per batch
  c.phase2.attack = pgd_linf(eps=8 / 255, num_steps=10)  # A only; BatchNorm as train.attack_batch_norm
  c.phase2.checkpoint_every_epochs = 1.0
  # As train.compute_dtype, for phase 2's steps: float32 | bfloat16 (linear and centered only: the
  # centered_nonlinear form subtracts two nearly equal bfloat16 outputs).
  c.phase2.compute_dtype = "float32"
  # As train.matmul_precision, for phase 2's steps (centered_nonlinear always computes at highest).
  c.phase2.matmul_precision = "default"
  c.phase2.optimizer = ml_collections.ConfigDict()  # Loo et al.: SGD, lr 0.01, momentum 0.9
  c.phase2.optimizer.name = "sgd"
  c.phase2.optimizer.learning_rate = 0.01
  c.phase2.optimizer.momentum = 0.9
  c.phase2.optimizer.nesterov = False
  c.phase2.optimizer.weight_decay = 0.0
  c.phase2.optimizer.schedule = "constant"
  c.phase2.optimizer.decay_epochs = ()
  c.phase2.optimizer.decay_factor = 0.1
  c.phase2.optimizer.warmup_epochs = 0.0
  c.phase2.optimizer.peak_fraction = 0.4
  # Two letters, Loo et al.'s `--loaders`: phase-1 mode (C, A, F) then phase-2 mode (C, A), e.g.
  # "AC". When set it overrides config.train.mode and config.phase2.mode.
  c.loaders = ""

  # Phase 1 also saves its initialisation, before the first update, as epoch 0 (step 0), always.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1.0
  # Loo et al. also saved these early fractional epochs, where the kernel moves fastest.
  c.checkpoint.fractional_epochs = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)

  # The `kernel` job (config.job="kernel"): the empirical NTK of one checkpoint on a subset,
  # written to <workdir>/kernels/<name>/ tile by tile (see ntk_scale/ntk/).
  c.kernel = ml_collections.ConfigDict()
  # "": phase1_epoch<epoch>_<split><N>[of<classes>]_<logits> (phase2_<phase2 name>_epoch...)
  c.kernel.name = ""
  c.kernel.phase = 1  # 1: the network's checkpoint | 2: phase 2's linearized model
  c.kernel.epoch = ml_collections.FieldReference(None, field_type=float)  # None: newest; 0: initialisation
  c.kernel.split = "train"  # train | test
  c.kernel.num_examples = 500  # class-balanced (Loo et al.: 500); 0: every example of the split
  c.kernel.classes = ()  # only these classes (e.g. (0,) for a per-class kernel); (): all
  c.kernel.subset_seed = 0
  c.kernel.logits = "trace"  # trace (sum over logits) | full ([N, N, C, C]) | a class index, "0"
  c.kernel.method = "auto"  # auto | jacobian | ntvp (NTK-vector products, no Jacobian stored)
  c.kernel.dtype = "float32"  # float32 | float64
  c.kernel.precision = "highest"  # matmul precision: highest | high | default
  c.kernel.tile_size = 0  # examples per tile side; 0: the largest that fits the memory budget
  c.kernel.band = 0  # row tiles per resident band (ntk_scale/ntk/plan.py); 0: from the budget
  c.kernel.logit_chunk = 0  # a trace kernel's logits formed at a time (a divisor of C); 0: from the budget
  c.kernel.memory_budget_gb = 0.0  # per device; 0: 80% of the device memory XLA may use (CPU: half of host memory)
  # True: one block per device, the column rows passed round the devices (no row formed twice);
  # False: never; None: when the planner finds it faster, its transfers weighed at the measured
  # ring bandwidth (ntk_scale/ntk/plan.py, engine.fit_plan).
  c.kernel.rotate = ml_collections.FieldReference(None, field_type=bool)
  # auto | all | none: layers whose kernel is formed from the Grams of their inputs and output
  # cotangents instead of their weight gradients (ntk_scale/ntk/factored_layers.py; trace and
  # per-logit kernels): auto where that needs fewer multiply-adds (dense layers, convolutions on
  # small maps such as ResNet-18's last stage), all where possible, none.
  c.kernel.factored_layers = "auto"

  # The `spectrum` job (config.job="spectrum"; ntk_scale/ntk/spectrum_job.py): the top eigenpairs of
  # config.kernel's kernel (computed first if needed), to <workdir>/kernels/<name>/spectrum/.
  c.spectrum = ml_collections.ConfigDict()
  c.spectrum.num_eigenpairs = 100  # the largest k eigenvalues and their unit eigenvectors
  # auto | dense (every pair, one eigendecomposition) | sharded (LOBPCG, the kernel's rows split
  # over the devices) | streamed (LOBPCG on the host, the kernel read from disk at each product).
  c.spectrum.method = "auto"
  c.spectrum.dtype = "float32"  # float32 | float64 (for tails far below the top eigenvalue)
  c.spectrum.tol = 0.0  # largest ||K v - lambda v|| / lambda_max; 0: 1e-5 in float32, 1e-10 in float64
  c.spectrum.oversample = 10  # extra vectors in LOBPCG's block: they speed up the k-th pair
  # LOBPCG iterations between saved rounds (where a killed job resumes). Each round runs whole, so
  # short rounds waste less once converged (kernel spectra decay fast: digits and random kernels with
  # eigenvalues ~ i^-1 converge to 1e-5 in 5-10 iterations) but save the block more often.
  c.spectrum.round_iters = 10
  c.spectrum.max_iters = 400
  c.spectrum.seed = 0  # of the starting block
  c.spectrum.precision = "highest"  # matmul precision: highest | high | default
  c.spectrum.memory_budget_gb = 0.0  # per device; 0: as config.kernel.memory_budget_gb's default
  c.spectrum.max_block_mb = 0.0  # streamed: host memory per panel read; 0: 256 MB

  # The `evolution` job (config.job="evolution"): the kernel of one subset at several checkpoints
  # and how it moves between them, to <workdir>/kernel_evolution/<name>/ (ntk_scale/ntk/evolution.py).
  # The subset and kernel settings are config.kernel's (split, num_examples, classes, subset_seed,
  # logits, dtype, ...); each kernel is the kernel job's, in <workdir>/kernels/, computed once.
  c.evolution = ml_collections.ConfigDict()
  c.evolution.name = ""  # "": phase1_<split><N>[of<classes>]_<logits>[_collapse] (phase2_<phase2 name>_...)
  c.evolution.phase = 1  # 1: the network's checkpoints | 2: phase 2's (config.phase2.name)
  c.evolution.epochs = ()  # epochs of that phase, fractional ones and 0 included; (): every saved one
  c.evolution.top_k = 10  # size of the top and bottom eigenspaces, and of the spectral mass
  c.evolution.eigenspace_of = "final"  # final | initial: whose eigenvectors restrict the kernels
  c.evolution.num_eigenvalues = 100  # largest eigenvalues kept per checkpoint (spectra plot)
  # dense: every eigenpair of each kernel (float64, on the host, the kernel in memory) | top: the
  # `spectrum` job's top max(num_eigenvalues, top_k) eigenpairs (config.spectrum's method and
  # settings; any size; no bottom-k eigenspace) | auto: dense up to 8192 rows (N, or N*C if full)
  c.evolution.eigensolver = "auto"
  # > 0: the saved phase-1 epochs within this many epochs of the collapse recorded by the CO monitor
  # (<workdir>/catastrophic_overfitting.json), instead of `epochs`.
  c.evolution.around_collapse = 0.0

  # The `eigen_features` job (ntk_scale/ntk/eigen_features_job.py): usefulness and robustness of each
  # eigen-feature of config.kernel's kernel (one class or the trace), to <workdir>/eigen_features/.
  c.eigen_features = ml_collections.ConfigDict()
  c.eigen_features.source = "empirical"  # empirical (the kernel job's, of a checkpoint) | infinite
  c.eigen_features.num_single = 10  # top eigen-indices taken one by one; then doubling groups
  c.eigen_features.num_test = 0  # first test images evaluated; 0: the whole test split
  c.eigen_features.batch_size = 120
  c.eigen_features.attack = pgd_linf(eps=8 / 255, num_steps=10)  # against each feature's predictor
  # auto | dense | top (ntk_scale/ntk/kernel_eigenpairs.py): every eigenpair up to 8192 kernel rows,
  # above it the spectrum job's top max(config.spectrum.num_eigenpairs, num_single): groups stop at
  # the k-th eigenvalue, and the last row is the top-k predictor ("top<k>"), not kernel regression.
  c.eigen_features.eigensolver = "auto"

  # The `eigen_images` job (ntk_scale/ntk/eigen_images_job.py; Loo et al. 2022): for the top
  # eigenvectors u of a class kernel K_c and its dual weights (K_c + lambda I)^{-1} y_c, the images x
  # maximising +-cos(grad_theta f_c(x), J_c(X)^T u), to <workdir>/eigen_images/<kernel name>/.
  c.eigen_images = ml_collections.ConfigDict()
  c.eigen_images.logit = ""  # the class c, e.g. "3"; "": config.kernel.logits (which must be a class)
  # The checkpoint's epoch; None: config.kernel.epoch.
  c.eigen_images.epoch = ml_collections.FieldReference(None, field_type=float)
  c.eigen_images.num_eigenvectors = 4  # the top ones, largest eigenvalue first
  c.eigen_images.steps = 300  # Adam steps on the pixels, from a grey image (digits: converged by 300)
  c.eigen_images.learning_rate = 0.05
  c.eigen_images.regularizer = 1e-3  # dual weights' ridge, relative to the mean kernel diagonal
  # auto | dense | top: every eigenpair of the kernel read whole up to 8192 rows, else the spectrum
  # job's top max(config.spectrum.num_eigenpairs, num_eigenvectors) (kernel_eigenpairs.py)
  c.eigen_images.eigensolver = "auto"
  # dense mode's dual-weights solver: cholesky | eigh | lstsq (ntk_scale/kernel_regression.py); top
  # mode's dual weights are CG on the kernel on disk, preconditioned by its top eigenpairs:
  c.eigen_images.solver = "cholesky"
  c.eigen_images.cg_tol = 1e-6  # top mode: CG stops at ||y - (K + lambda I) x|| <= cg_tol ||y||
  c.eigen_images.cg_max_iters = 500  # top mode: each iteration is one pass over the kernel
  return c
