"""Small real edits of Keras's optimizer source, applied to a copy of the
installed keras package (put first on the workers' import path by
`verify-optimizers check --keras-path`).

Each edit names the (optimizer, backend) pairs whose cells it must change;
an edit that only reassociates an operation must change no math class.
Edits of disjoint optimizers may run `together`, in one copy.
Edits are plain text replacements that must match exactly once, so a Keras
whose source moved makes the test fail loudly instead of passing vacuously.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GENERIC = ("tensorflow", "jax")  # backends that run keras/src/optimizers/*.py as written


@dataclass(frozen=True)
class Edit:
    name: str
    replacements: tuple            # (path inside the keras package, old, new)
    changes: frozenset = field(default_factory=frozenset)  # {(optimizer, backend)}
    # dtypes in which every cell of those pairs must fail; in the others a cell may
    # stay within rounding (a change far below float32's resolution of the weights)
    always: tuple = ("float32", "float64")
    # backends the edit must be seen on: those of `changes`, or for an edit that changes
    # no pair (a reassociation), the backends that run the edited code
    runs_on: tuple = ()
    parts: tuple = ()              # the edits `together` combined into this one

    @property
    def needs(self) -> set:
        return set(self.runs_on) | {b for _, b in self.changes}

    def must_fail_in(self, optimizer, backend) -> tuple:
        """The dtypes in which every cell of (optimizer, backend) must fail."""
        for part in self.parts:
            if (optimizer, backend) in part.changes:
                return part.always
        return self.always


def _pairs(optimizers, backends):
    return frozenset((o, b) for o in optimizers for b in backends)


def together(name, *edits) -> Edit:
    """Edits of disjoint optimizers applied to one copy of Keras: one check run
    (about 30 s, mostly starting the workers) instead of one each.  Each part
    keeps its own pairs and `always`; what no part names must still not move."""
    seen = set()
    for e in edits:
        optimizers = {o for o, _ in e.changes}
        assert optimizers and not optimizers & seen, f"{name}: {e.name} shares an optimizer"
        seen |= optimizers
    return Edit(name, sum((e.replacements for e in edits), ()),
                frozenset().union(*(e.changes for e in edits)),
                parts=sum((e.parts or (e,) for e in edits), ()))


BASE = "src/optimizers/base_optimizer.py"
ADAM = "src/optimizers/adam.py"
TORCH = "src/backend/torch/optimizers/"
TORCH_ADAM = TORCH + "torch_adam.py"
ADAMAX = "src/optimizers/adamax.py"
ADADELTA = "src/optimizers/adadelta.py"
FTRL = "src/optimizers/ftrl.py"
LAMB = "src/optimizers/lamb.py"
ALL = ("tensorflow", "jax", "torch")
# the small baseline's configurations of Adam's update with Keras's defaults (a schedule
# changes the learning rate, a base-optimizer stage what enters the update, not the
# update): an edit of Adam moves them all; AdamW inherits the update but has defaults
# of its own
ADAMS = ["adam", "adam_cosine_decay_restarts", "adam_clipnorm", "adam_ema",
         "adam_accumulation", "adam_loss_scale_factor"]
ADAMWS = ["adamw", "adamw_piecewise_constant"]

# adam_amsgrad is Keras's Adam class (amsgrad=True, beta_2=0.99 given): Adam's update
# step and torch kernel are its code too.
EDITS = [
    # AdamW passes its own beta_2 to Adam.__init__ and adam_amsgrad sets beta_2: only
    # Adam's cells change.
    Edit("changed-default", ((ADAM, "beta_2=0.999,", "beta_2=0.99,"),),
         _pairs(ADAMS, ALL)),
    # The torch backend has its own Adam kernel; AdamW inherits Adam's update.
    Edit("epsilon-inside-sqrt",
         ((ADAM, "ops.add(ops.sqrt(v), self.epsilon)", "ops.sqrt(ops.add(v, self.epsilon))"),),
         _pairs(ADAMS + ADAMWS + ["adam_amsgrad"], GENERIC),
         # for |g| ~ 1 the denominator moves by ~5e-5 relative and the weights by ~5e-7:
         # float32 rounding of the weights; the `tiny` scenario shows it in float32 too
         always=("float64",)),
    Edit("off-by-one-step",
         ((ADAM, "local_step = ops.cast(self.iterations + 1, variable.dtype)",
           "local_step = ops.cast(self.iterations + 2, variable.dtype)"),),
         _pairs(ADAMS + ADAMWS + ["adam_amsgrad"], GENERIC)),
    Edit("torch-only",
         ((TORCH_ADAM, "alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
           "alpha = lr * (1 - beta_2_power) / (1 - beta_1_power)"),),
         _pairs(ADAMS + ADAMWS + ["adam_amsgrad"], ["torch"])),
    # Same math, other rounding: (lr * s) / d -> lr * (s / d), and the moment's
    # m + (g - m)(1 - b1) -> b1 m + (1 - b1) g (the torch kernels' form).
    Edit("reassociated",
         ((ADAM, "alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
           "alpha = lr * (ops.sqrt(1 - beta_2_power) / (1 - beta_1_power))"),
          (ADAM, "self.assign_add(\n            m, ops.multiply(ops.subtract(gradient, m), "
                 "1 - self.beta_1)\n        )",
           "self.assign(\n            m, ops.add(ops.multiply(m, self.beta_1), "
           "ops.multiply(gradient, 1 - self.beta_1))\n        )")),
         runs_on=GENERIC),
]

# --- the optimizers issue 9 added: a constant, two placements, three branches --------
# Torch has its own kernels for Adamax, Adadelta and Adam (amsgrad included); they
# inherit __init__ (the defaults) from the generic class.  Ftrl and Lamb have none:
# their generic file runs on torch as well.

# constant: Adamax's default epsilon (the adamax configuration does not set it).  The
# torch kernel reads the self.epsilon the generic __init__ sets: torch changes too.
# u ~ |g| ~ 1 in `gaussian` and `sparse`: the step moves by ~1e-6 relative, the weights
# by ~1e-8, below float32's resolution; in `tiny` epsilon dominates u and float32 fails.
ADAMAX_DEFAULT_EPSILON = Edit(
    "adamax-default-epsilon", ((ADAMAX, "epsilon=1e-7,", "epsilon=1e-6,"),),
    _pairs(["adamax"], ALL), always=("float64",))
# placement: Adadelta's epsilon outside the square root, sqrt(x + eps) -> sqrt(x) + eps,
# in both kernels.  RMS[dx]_0 = sqrt(1e-6) = 1e-3 becomes 1e-6: the first steps shrink
# a thousandfold, in every dtype.
ADADELTA_EPSILON_OUTSIDE_SQRT = Edit(
    "adadelta-epsilon-outside-sqrt",
    ((ADADELTA, "return ops.sqrt(ops.add(x, self.epsilon))",
      "return ops.add(ops.sqrt(x), self.epsilon)"),
     (TORCH + "torch_adadelta.py",
      "return torch._foreach_sqrt(torch._foreach_add(x, self.epsilon))",
      "return torch._foreach_add(torch._foreach_sqrt(x), self.epsilon)")),
    _pairs(["adadelta"], ALL))
# placement: Lamb's epsilon inside the square root, sqrt(v_hat) + eps -> sqrt(v_hat +
# eps); one file, all three backends.  As for Adam's: ~1e-7 relative for |g| ~ 1 (and
# the trust ratio rescales the step to lr * ||w||): float32 rounding except in `tiny`.
LAMB_EPSILON_INSIDE_SQRT = Edit(
    "lamb-epsilon-inside-sqrt",
    ((LAMB, "ops.add(\n            ops.sqrt(ops.divide(v, (1.0 - beta_2_power))), "
            "self.epsilon\n        )",
      "ops.sqrt(\n            ops.add(ops.divide(v, (1.0 - beta_2_power)), "
      "self.epsilon)\n        )"),),
    _pairs(["lamb"], ALL), always=("float64",))

# branch: FTRL without its L1 threshold: w = 0 where |z| <= l1 is never taken, the other
# branch (sign(z) l1 - z) / quadratic always is.  Every scenario has such entries (in
# `tiny` and `sparse` most z stay far below l1 = 0.1).
FTRL_NO_L1_THRESHOLD = Edit(
    "ftrl-no-l1-threshold",
    ((FTRL, "linear_clipped = ops.clip(\n            linear,\n"
            "            -self.l1_regularization_strength,\n"
            "            self.l1_regularization_strength,\n        )",
      "linear_clipped = ops.multiply(\n            ops.sign(linear), "
      "self.l1_regularization_strength\n        )"),),
    _pairs(["ftrl"], ALL))
# branch: AMSGrad without its running maximum (v_hat = v), in Adam's generic update and
# in the torch kernel; Adam and AdamW (amsgrad=False) must not move.
AMSGRAD_WITHOUT_MAX = Edit(
    "amsgrad-without-max",
    ((ADAM, "self.assign(v_hat, ops.maximum(v_hat, v))", "self.assign(v_hat, v)"),
     (TORCH_ADAM, "torch._foreach_maximum_(v_hat_list, v_list)",
      "torch._foreach_copy_(v_hat_list, v_list)")),
    _pairs(["adam_amsgrad"], ALL))
# branch: Adamax's max(beta_2 u, |g|) takes g, not |g|: for a negative gradient the
# decayed u is kept.  Generic file only: torch's own kernel must not move.
ADAMAX_MAX_WITHOUT_ABS = Edit(
    "adamax-max-without-abs",
    ((ADAMAX, "ops.maximum(ops.multiply(self.beta_2, u), ops.abs(gradient))",
      "ops.maximum(ops.multiply(self.beta_2, u), gradient)"),),
    _pairs(["adamax"], GENERIC))

# schedule: the base optimizer calls its learning-rate schedule with _iterations + 1,
# the rate of the next step (`_get_current_learning_rate`, which every backend's
# update and weight decay read).  Every configuration with a schedule changes, on
# every backend; those with a constant rate must not.  Adagrad's staircase rate
# differs only at its steps 4, 9: in `tiny` the weights then move by ~3e-8, and its
# accumulator does not see the rate, so float32 keeps them within rounding there.
SCHEDULED = ["sgd_momentum_exponential_decay", "adam_cosine_decay_restarts",
             "adamw_piecewise_constant", "rmsprop_polynomial_decay",
             "adagrad_inverse_time_decay", "lion_cosine_decay_warmup"]
SCHEDULE_READ_ONE_ITERATION_LATE = together(
    "schedule-read-one-iteration-late",
    Edit("schedule-late", ((BASE,
                            "return self._learning_rate(self._iterations)",
                            "return self._learning_rate(self._iterations + 1)"),),
         _pairs([o for o in SCHEDULED if o != "adagrad_inverse_time_decay"], ALL)),
    Edit("schedule-late-adagrad", (), _pairs(["adagrad_inverse_time_decay"], ALL),
         always=("float64",)))

# --- the base optimizer's stages (issue 10) ------------------------------------------
# Three code paths run them: TensorFlow and torch run base_optimizer.py's
# _backend_apply_gradients (ops.cond: a micro-step only adds to the accumulators); JAX
# overrides it in backend/jax/optimizer.py (every call runs the whole update, then
# lax.cond keeps the old weights and slots on a micro-step).  _clip_gradients, apply's
# unscaling and the EMA's formula are base_optimizer.py's on every backend.  A check
# run costs 2 to 3 minutes on the loaded 2-core machine (most of it the workers'
# compiles per cell), so these edits join the groups of the other edits' optimizers.
JAX_OPTIMIZER = "src/backend/jax/optimizer.py"

# accumulation: weight decay on every micro-step, not only on the update step.  Generic
# path: decay before the ops.cond instead of inside its update branch (TensorFlow and
# torch; JAX never runs it).  JAX: decay before the old weights are read for lax.cond,
# so a micro-step keeps the decayed weights.  On an update step both do what Keras does
# (decay, then the optimizer's step, which does not read the weights); on the three
# micro-steps before it the weights shrink by lr * wd = 1e-4 relative: every dtype.
DECAY_EVERY_MICRO_STEP = Edit(
    "decay-every-micro-step",
    ((BASE, "                grads = self._clip_gradients(grads)\n"
            "                self._apply_weight_decay(trainable_variables)\n",
      "                grads = self._clip_gradients(grads)\n"),
     (BASE, "            ops.cond(\n                is_update_step,\n",
      "            self._apply_weight_decay(trainable_variables)\n"
      "            ops.cond(\n                is_update_step,\n")),
    _pairs(["adam_accumulation"], ["tensorflow", "torch"]))
DECAY_EVERY_MICRO_STEP_JAX = Edit(
    "decay-every-micro-step-jax",
    ((JAX_OPTIMIZER, "                lambda: list(grads),\n            )\n\n"
                     "            # Apply clipping and weight decay.\n"
                     "            grads = self._clip_gradients(grads)\n"
                     "            self._apply_weight_decay(trainable_variables)\n",
      "                lambda: list(grads),\n            )\n\n"
      "            grads = self._clip_gradients(grads)\n"),
     (JAX_OPTIMIZER, "            current_trainable_vars_value = [\n"
                     "                v.value for v in trainable_variables\n",
      "            self._apply_weight_decay(trainable_variables)\n"
      "            current_trainable_vars_value = [\n"
      "                v.value for v in trainable_variables\n")),
    _pairs(["adam_accumulation"], ["jax"]))
# EMA: JAX's override no longer updates the average; TensorFlow and torch still do.
# The average slot stays at its initial copy of the weights, and every
# ema_overwrite_frequency steps the weights are overwritten with it.
EMA_NOT_UPDATED_ON_JAX = Edit(
    "ema-not-updated-on-jax",
    ((JAX_OPTIMIZER, "        if self.use_ema:\n"
                     "            self._update_model_variables_moving_average(\n"
                     "                self._trainable_variables\n            )\n",
      "        if self.use_ema:\n"),),
    _pairs(["adam_ema"], ["jax"]))
# loss scaling: apply() divides by loss_scale_factor twice (every backend runs it): the
# moments hold g / 128 ** 2 instead of g / 128.
UNSCALED_TWICE = Edit(
    "unscaled-twice",
    ((BASE, "grads = [g if g is None else g / scale for g in grads]",
      "grads = [g if g is None else g / scale / scale for g in grads]"),),
    _pairs(["adam_loss_scale_factor"], ALL))
# clipping: clipnorm over all variables together (the global norm) instead of each
# variable's own norm; _clip_gradients is base_optimizer.py's on every backend.
CLIPNORM_OVER_ALL_VARIABLES = Edit(
    "clipnorm-over-all-variables",
    ((BASE, "            return [\n"
            "                self._clip_by_norm(g) if g is not None else g for g in grads\n"
            "            ]\n",
      "            return clip_by_global_norm(grads, self.clipnorm)\n"),),
    _pairs(["adam_clipnorm", "adam_accumulation"], ALL))

EDITS += [
    together("schedule-late-and-clipnorm-over-all-variables",
             SCHEDULE_READ_ONE_ITERATION_LATE, CLIPNORM_OVER_ALL_VARIABLES),
    together("epsilons-and-base-stages", ADAMAX_DEFAULT_EPSILON,
             ADADELTA_EPSILON_OUTSIDE_SQRT, LAMB_EPSILON_INSIDE_SQRT,
             DECAY_EVERY_MICRO_STEP, EMA_NOT_UPDATED_ON_JAX, UNSCALED_TWICE),
    together("branches-and-jax-micro-step-decay", FTRL_NO_L1_THRESHOLD, AMSGRAD_WITHOUT_MAX,
             ADAMAX_MAX_WITHOUT_ABS, DECAY_EVERY_MICRO_STEP_JAX),
]


def installed_keras() -> Path:
    spec = importlib.util.find_spec("keras")
    return Path(list(spec.submodule_search_locations)[0])


def edited_keras(edit: Edit, root: Path) -> Path:
    """Copy the installed keras under root/site, apply the edit; return root/site."""
    site = root / "site"
    target = site / "keras"
    shutil.copytree(installed_keras(), target)
    for relative, old, new in edit.replacements:
        path = target / relative
        text = path.read_text()
        assert text.count(old) == 1, f"{edit.name}: {old!r} occurs {text.count(old)} times " \
                                     f"in {path}"
        path.write_text(text.replace(old, new))
    return site


# Serialization (what model.save writes) loses half the learning rate: every
# optimizer rebuilt from it computes differently, while the class itself does not.
# A serialized schedule loses half its initial rate (PiecewiseConstantDecay: its values).
SERIALIZED_SCHEDULE = ("            learning_rate = learning_rate_schedule.serialize(\n"
                       "                self._learning_rate\n            )\n")
SAVED_HALF_LEARNING_RATE = Edit(
    "saved-half-learning-rate",
    ((BASE, '"learning_rate": learning_rate,\n',
      '"learning_rate": learning_rate if isinstance(learning_rate, dict) '
      'else learning_rate * 0.5,\n'),
     (BASE, SERIALIZED_SCHEDULE, SERIALIZED_SCHEDULE
      + '            learning_rate["config"] = {k: v * 0.5 if k == "initial_learning_rate" '
        'else [x * 0.5 for x in v] if k == "values" else v '
        'for k, v in learning_rate["config"].items()}\n')))


def written_baseline(root: Path, flags: list) -> Path:
    """A baseline of the selection `flags` written by `check --update-baseline` under
    `root` (its run report beside it), for a check to compare with."""
    from verify import cli

    code = cli.main(["check", "--update-baseline", "--baseline", str(root / "baseline"),
                     "--output", str(root / "run")] + flags)
    assert code == 0
    return root / "baseline"
