"""MAML's variants, each an entry of the registry: what it changes of MAML (base.Algorithm)."""

from __future__ import annotations

from .. import _rates
from .base import Algorithm


class FOMAML(Algorithm):
    name = "fomaml"
    summary = "first-order MAML"
    first_order = True
    op_algorithm = "fomaml"


class Reptile(Algorithm):
    name = "reptile"
    summary = "outer update toward the mean adapted weights; inner loop on support and query"
    op_algorithm = "reptile"
    reptile_update = True

    def inner_points(self, family):
        shots, queries = getattr(family, "shots", None), getattr(family, "queries", None)
        return shots and queries and shots + queries

    def inner_rule(self, learn_inner_lr, adapt_layers, sizes):
        learn_inner_lr, adapt_layers = super().inner_rule(learn_inner_lr, adapt_layers, sizes)
        if learn_inner_lr is not None:
            raise ValueError("learn_inner_lr: Reptile cannot learn inner rates (its outer "
                             "update is no gradient of the rates); use algorithm='maml', "
                             "'fomaml' or 'metasgd'")
        return learn_inner_lr, adapt_layers


class MetaSGD(Algorithm):
    name = "metasgd"
    summary = "MAML learning one inner rate per parameter (learn_inner_lr='per-parameter')"

    def inner_rule(self, learn_inner_lr, adapt_layers, sizes):
        _rates.check_mode("learn_inner_lr", learn_inner_lr)
        if learn_inner_lr not in (None, "per-parameter"):
            raise ValueError(f"algorithm='metasgd' learns one inner rate per parameter; "
                             f"learn_inner_lr={learn_inner_lr!r} asks for another kind: use "
                             f"algorithm='maml' with it")
        return super().inner_rule("per-parameter", adapt_layers, sizes)


class ANIL(Algorithm):
    name = "anil"
    summary = "MAML adapting the head only (adapt_layers=[-1])"

    def inner_rule(self, learn_inner_lr, adapt_layers, sizes):
        learn_inner_lr, adapt_layers = super().inner_rule(learn_inner_lr, adapt_layers, sizes)
        head = (len(sizes) - 2,)
        if adapt_layers not in (None, head):
            raise ValueError(f"algorithm='anil' adapts the head only; adapt_layers="
                             f"{list(adapt_layers)} asks for other layers: use algorithm='maml' "
                             "with them")
        return learn_inner_lr, head
