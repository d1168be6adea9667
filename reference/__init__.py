"""Reference update rules, in pure numpy (this package never imports keras).

Families: `article` (shared/article.md as written), `textbook` (each
optimizer as its paper states it) and `keras` (what Keras 3 computes).  `get_rule(family, class_name)` returns a `reference.rule.Rule`.
"""

from reference import article, keras3, textbook  # noqa: F401  (registers the rules)
from reference.arithmetic import PRECISIONS, Arithmetic, Precision, Tracked
from reference.rule import REGISTRY, Rule, StateSpec, Unsupported

FAMILIES = ("article", "textbook", "keras")


def get_rule(family: str, class_name: str) -> Rule:
    try:
        return REGISTRY[(family, class_name)]
    except KeyError:
        raise Unsupported(f"no {family} rule for {class_name}") from None


__all__ = ["FAMILIES", "PRECISIONS", "Arithmetic", "Precision", "Rule", "StateSpec",
           "Tracked", "Unsupported", "get_rule"]
