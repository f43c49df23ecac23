"""The registry of algorithms: the one place an algorithm's name is decided.

Each entry is an Algorithm (base.py) saying what it adds to the run that every algorithm
shares (one trainer, one run configuration, one checkpoint format, one evaluation entry, one
command line). A seventh algorithm is a module beside these and one line in REGISTRY
(docs/design.md §6.2)."""

from __future__ import annotations

from typing import Dict

from .. import _checks
from .base import Algorithm
from .daml import DAML
from .maml import ANIL, FOMAML, MetaSGD, Reptile

REGISTRY: Dict[str, Algorithm] = {a.name: a for a in (
    Algorithm(), FOMAML(), Reptile(), MetaSGD(), ANIL(), DAML())}
NAMES = tuple(REGISTRY)


def get(name) -> Algorithm:
    """The entry named `name`; ValueError naming the argument otherwise."""
    return REGISTRY[_checks.check_choice("algorithm", name, NAMES)]


def for_model(model) -> Algorithm:
    """The first entry that trains models of `model`'s class (MAML's for a MetaMLP)."""
    for entry in REGISTRY.values():
        if isinstance(model, entry.model_class):
            return entry
    kinds = " or ".join(sorted({e.model_class.__name__ for e in REGISTRY.values()}))
    raise TypeError(f"model must be a pymaml {kinds}, got {type(model).__name__}")


def evaluate(model, task=None, **kwargs):
    """pymaml.evaluate: the model's algorithm's evaluation protocol (the MAML paper's for a
    MetaMLP, pymaml.evaluate_maml; the grid error per phase for a DAMLModel,
    pymaml.evaluate.evaluate_daml). See each for its arguments."""
    return for_model(model).evaluate(model, task, **kwargs)
