"""Which trainable variables of a learner the inner loop adapts ("fast") and which it only meta-learns ("slow")."""

from __future__ import annotations

import fnmatch
from typing import Callable, Sequence, Union

import keras

Selector = Union[None, str, Sequence[str], Callable[[keras.Variable], bool]]


def _matches(path: str, pattern: str) -> bool:
    """A glob selects a variable if it matches the variable's path, a prefix of it or one of its layer names."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, pattern) for s in prefixes + parts[:-1])


class Partition:
    """Splits a learner's `trainable_variables` into fast (adapted per task) and slow (meta-learned only).

    `fast` and `slow` each take None, a glob or a list of globs, or a predicate on the Keras variable. Globs are
    matched against variable paths (`"dense_1/kernel"`), their prefixes and their layer names (`"head"`,
    `"block_*"`). A variable is fast if `fast` selects it (None: every variable), `slow` does not, and it does
    not belong to a layer marked `meta_only` (T-Nets' transforms, per-step batch norm, warp layers) or to a
    layer's `slow_weights` (FiLM's projections): those are slow unless `adapt_meta_only=True`, which treats them
    as ordinary layers (e.g. MAML adapting every layer of a warped network, the equal-capacity baseline of
    Warp-MAML).
    ANIL is `Partition(fast="head")`, BOIL is `Partition(slow="head")`.
    """

    def __init__(self, fast: Selector = None, slow: Selector = None, adapt_meta_only: bool = False):
        for name, selector in (("fast", fast), ("slow", slow)):
            is_globs = isinstance(selector, (list, tuple)) and all(isinstance(s, str) for s in selector)
            if not (selector is None or isinstance(selector, str) or callable(selector) or is_globs):
                raise TypeError(
                    f"Partition argument `{name}` must be None, a glob, a list of globs or a predicate on "
                    f"variables; got {selector!r}."
                )
        if not isinstance(adapt_meta_only, bool):
            raise TypeError(f"Partition argument `adapt_meta_only` must be a bool; got {adapt_meta_only!r}.")
        self.fast = fast
        self.slow = slow
        self.adapt_meta_only = adapt_meta_only

    def mask(self, learner: keras.Layer) -> tuple[bool, ...]:
        """One boolean per `learner.trainable_variables`, True where the variable is fast."""
        variables = learner.trainable_variables
        fast = _select(variables, self.fast, "fast", default=True)
        slow = _select(variables, self.slow, "slow", default=False)
        meta_only = set() if self.adapt_meta_only else {id(v) for v in slow_weights(learner)}
        mask = tuple(f and not s and id(v) not in meta_only for f, s, v in zip(fast, slow, variables))
        if not any(mask):
            raise ValueError(
                f"partition selects no fast variable of learner '{learner.name}' (fast={self.fast!r}, "
                f"slow={self.slow!r}); its trainable variables are {[v.path for v in variables]}."
            )
        return mask

    def get_config(self) -> dict:
        if callable(self.fast) or callable(self.slow):
            raise ValueError("A Partition with a predicate cannot be serialised: select variables with globs.")
        return {"fast": self.fast, "slow": self.slow, "adapt_meta_only": self.adapt_meta_only}

    def __repr__(self) -> str:
        return f"Partition(fast={self.fast!r}, slow={self.slow!r}, adapt_meta_only={self.adapt_meta_only!r})"


def _layers(learner: keras.Layer) -> list[keras.Layer]:
    return learner._flatten_layers(include_self=True)  # every nested layer, also in subclassed models


def slow_weights(learner: keras.Layer) -> list[keras.Variable]:
    """The variables no inner loop adapts: those of `meta_only` layers and those layers list in `slow_weights`."""
    return [v for layer in _layers(learner)
            for v in (layer.trainable_variables if getattr(layer, "meta_only", False)
                      else getattr(layer, "slow_weights", ()))]


def context_weights(learner: keras.Layer) -> list[keras.Variable]:
    """Task parameters that start every task from their initial value (e.g. FiLM task embeddings): meta-learners
    give them no meta-gradient."""
    return [v for layer in _layers(learner) for v in getattr(layer, "context_weights", ())]


def _select(variables, selector: Selector, argument: str, default: bool) -> list[bool]:
    if selector is None:
        return [default] * len(variables)
    if callable(selector):
        return [bool(selector(v)) for v in variables]
    selected = [False] * len(variables)
    for pattern in [selector] if isinstance(selector, str) else selector:
        hits = [_matches(v.path, pattern) for v in variables]
        if not any(hits):
            raise ValueError(
                f"Partition `{argument}` pattern {pattern!r} matches no trainable variable; the paths are "
                f"{[v.path for v in variables]}."
            )
        selected = [s or h for s, h in zip(selected, hits)]
    return selected


def split(values: Sequence, mask: Sequence[bool]) -> tuple[list, list]:
    """Splits values aligned with a learner's trainable variables into (fast, slow) lists."""
    return [v for v, m in zip(values, mask) if m], [v for v, m in zip(values, mask) if not m]


def merge(fast: Sequence, slow: Sequence, mask: Sequence[bool]) -> list:
    """Inverse of `split`: interleaves fast and slow values back into the learner's variable order."""
    fast_values, slow_values = iter(fast), iter(slow)
    return [next(fast_values) if m else next(slow_values) for m in mask]
