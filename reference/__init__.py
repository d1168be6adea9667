"""Reference update rules, in pure numpy (this package never imports keras).

Each optimizer is a space of named pieces (reference/optimizers/); the
families `article` (shared/article.md as written), `textbook` (each optimizer
as its paper states it) and `keras` (what Keras 3 computes) are named points
of it.  `get_rule(family, class_name)` returns a `reference.rule.Rule`;
`SPACES[class_name]` is the variant space `explain` searches.
"""

from reference import multi, user_rule
from reference.arithmetic import PRECISIONS, Arithmetic, Precision, Tracked
from reference.optimizer import name_of, register_variants
from reference.optimizers import OPTIMIZERS, loss_scale
from reference.rule import REGISTRY, Rule, StateSpec, Unsupported

FAMILIES = ("article", "textbook", "keras")
# The families that state what a class's own source computes: Keras's, and a user's rule
# for their own class (reference/user_rule.py).  A mismatch of one of them is a verified
# change (exit 1); the other families' mismatches are findings.
JUDGED = ("keras", user_rule.FAMILY)

for _optimizer in OPTIMIZERS.values():
    for _family in _optimizer.points:
        REGISTRY[(_family, _optimizer.class_name)] = _optimizer.rule(_family)

# a wrapper around another optimizer's rule: the keras family only, no variant space
REGISTRY[("keras", loss_scale.CLASS_NAME)] = loss_scale.KERAS

# MultiOptimizer composes the keras rules of its inner optimizers; no paper or
# article states it
REGISTRY[("keras", multi.CLASS_NAME)] = multi.rule("keras")

# every Keras class the keras family states
CLASSES = tuple(sorted(c for f, c in REGISTRY if f == "keras"))

SPACES = {name: optimizer.space() for name, optimizer in OPTIMIZERS.items()}


def get_rule(family: str, class_name: str) -> Rule:
    try:
        return REGISTRY[(family, class_name)]
    except KeyError:
        raise Unsupported(f"the {family} family does not state {class_name}") from None


__all__ = ["CLASSES", "FAMILIES", "JUDGED", "OPTIMIZERS", "PRECISIONS", "SPACES", "Arithmetic",
           "Precision", "Rule", "StateSpec", "Tracked", "Unsupported", "get_rule", "name_of",
           "register_variants"]
