"""The workloads, their flop count and the targets: plain data, without torch, so that
report.py runs wherever the JSON is read."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark setting: an MLP (sizes, activation), its loss, K support and Q query points
    per task, S inner SGD steps at inner_lr, T tasks per meta-batch, the outer optimizer, and the
    order of the meta-gradient. `base` names the workload it derives from ("W1", "W2"); `task`
    and `init` say how the data and the starting weights are drawn. `rates` is how the inner
    rates are held: "scalar" (inner_lr, a number: MAML) or a learned tensor that starts at
    inner_lr and is stepped with the weights ("per-parameter": Meta-SGD, [P]; "per-step",
    [S, 1]; "per-parameter-step", [S, P]); `adapt_layers` the linear layers that move in the
    inner loop (None: all; (-1,): ANIL, the head only)."""
    base: str
    sizes: tuple
    activation: str
    loss: str
    K: int
    Q: int
    S: int
    T: int
    inner_lr: float
    optimizer: str
    outer_lr: float
    task: str
    init: str
    first_order: bool = False
    rates: str = "scalar"
    adapt_layers: Optional[tuple] = None

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)

    @property
    def order(self) -> str:
        return "1st" if self.first_order else "2nd"

    @property
    def hyper(self) -> dict:
        """The keyword arguments of pymaml.functional.maml_loss (inner_lr the number the rates
        start at; adapt_layers only where set)."""
        hyper = dict(sizes=list(self.sizes), inner_lr=self.inner_lr, steps=self.S,
                     activation=self.activation, loss=self.loss, first_order=self.first_order)
        if self.adapt_layers is not None:
            hyper["adapt_layers"] = list(self.adapt_layers)
        return hyper

    @property
    def plain(self) -> bool:
        """MAML as it was: one number for the rate, every layer adapting."""
        return self.rates == "scalar" and self.adapt_layers is None

    def label(self) -> str:
        """The base name and what differs from it, e.g. "W2 S=1", "W2 w=128 T=64"."""
        base = BASES[self.base]
        parts = [self.base]
        if self.sizes != base.sizes:
            parts.append(f"w={self.sizes[1]}" if len(set(self.sizes[1:-1])) == 1
                         else "-".join(map(str, self.sizes)))
        parts += [f"{f}={getattr(self, f)}" for f in ("K", "Q", "S", "T")
                  if getattr(self, f) != getattr(base, f)]
        if self.rates != "scalar":
            parts.append(RATE_LABELS.get(self.rates, f"rates={self.rates}"))
        if self.adapt_layers is not None:
            parts.append("ANIL" if tuple(self.adapt_layers) == (-1,)
                         else "adapt=" + ",".join(map(str, self.adapt_layers)))
        return " ".join(parts)

    def test_id(self) -> str:
        """label() and order without spaces or '=', for pytest -k: "W2-S1-2nd"."""
        return "-".join(self.label().replace("=", "").split() + [self.order])


# W1, the seed: 1-32-32-1 ReLU, L1, K=Q=4, S=5, T=1, SGD (the seed's rates).
W1 = Workload("W1", sizes=(1, 32, 32, 1), activation="relu", loss="l1", K=4, Q=4, S=5, T=1,
              inner_lr=3e-2, optimizer="sgd", outer_lr=1e-2, task="seed-sine", init="seed")
# W2, the MAML paper's sine regression: 1-40-40-1 ReLU, MSE, K=Q=10, S=5, T=25, Adam 1e-3.
W2 = Workload("W2", sizes=(1, 40, 40, 1), activation="relu", loss="mse", K=10, Q=10, S=5, T=25,
              inner_lr=1e-2, optimizer="adam", outer_lr=1e-3, task="sine", init="torch")
# Issue 26's grid: the kernel from W2's 40-wide layers to the MAML paper's Omniglot MLP and
# implicit neural representations (INR) of hundreds of points. Data: Gaussian inputs and
# targets ("gauss"), or Gaussian inputs and uniform int64 class labels [T, K] ("gauss-classes",
# cross-entropy); harness.make_data draws them.
MID = Workload("mid", sizes=(2, 64, 64, 64, 1), activation="relu", loss="mse", K=64, Q=64, S=3,
               T=8, inner_lr=1e-2, optimizer="adam", outer_lr=1e-3, task="gauss", init="torch")
# The MAML paper's Omniglot MLP (784-256-128-64-64, 5-way), 1-shot, 15 queries per class,
# T = 32, its inner rate 0.4; S = 1 (and S = 5 below). Also issue 24's benchmark item.
OMNI = Workload("omni", sizes=(784, 256, 128, 64, 64, 5), activation="relu",
                loss="cross_entropy", K=5, Q=75, S=1, T=32, inner_lr=0.4, optimizer="adam",
                outer_lr=1e-3, task="gauss-classes", init="torch")
INR256 = Workload("inr256", sizes=(2, 256, 256, 256, 3), activation="relu", loss="mse", K=256,
                  Q=256, S=3, T=4, inner_lr=1e-2, optimizer="adam", outer_lr=1e-3,
                  task="gauss", init="torch")
INR1024 = INR256.replace(base="inr1024", K=1024, Q=1024, S=2, T=2)
WIDE = Workload("wide", sizes=(1, 512, 512, 1), activation="relu", loss="mse", K=32, Q=32, S=5,
                T=4, inner_lr=1e-2, optimizer="adam", outer_lr=1e-3, task="gauss", init="torch")
BASES = {w.base: w for w in (W1, W2, MID, OMNI, INR256, INR1024, WIDE)}
GRID = [W1, W2, MID, OMNI, OMNI.replace(S=5), INR256, INR1024, WIDE]
# How label() names a workload's learned rates (Meta-SGD's paper learns one per parameter).
RATE_LABELS = {"per-parameter": "Meta-SGD", "per-step": "per-step-rates",
               "per-parameter-step": "per-parameter-step-rates"}
# Issue 14's variants of W2: Meta-SGD (per-parameter rates, learned) and ANIL (the head alone
# adapts).
W2_METASGD = W2.replace(rates="per-parameter")
W2_ANIL = W2.replace(adapt_layers=(-1,))


def meta_iteration_flops(w: Workload) -> int:
    """The floating-point operations of one meta-iteration, counted in the weight matmuls only.

    P_w = sum over layers of n_in * n_out (weights only: biases, activations, losses and the
    optimizer step are ignored). Per task, a forward plus backward pass over N points costs
    ≈ 6·N·P_w (2·N·P_w forward, 4·N·P_w backward: the input gradient and the weight gradient).
    One meta-iteration does, per task: S inner steps on the K support points (S · 6·K·P_w),
    the query pass (6·Q·P_w) and, second order only, S Hessian-vector products of ≈ 2 forward
    + backward passes each (S · 12·K·P_w): T · 6·P_w · (3·S·K + Q) for second order and
    T · 6·P_w · (S·K + Q) for first order. Learned rates and frozen layers (ANIL) count as
    MAML on the same sizes: their GFLOP/s are MAML-equivalent rates."""
    P_w = sum(n_in * n_out for n_in, n_out in zip(w.sizes[:-1], w.sizes[1:]))
    support_passes = w.S * (1 if w.first_order else 3)
    return w.T * 6 * P_w * (support_passes * w.K + w.Q)


# ---- targets: what the fused implementation should reach (the report marks pass / MISS) ----

TIME_TARGETS_S = {  # public fused API, second order, CPU, one thread: seconds per meta-iteration
    W2: 0.60e-3, W2.replace(S=1): 0.15e-3, W2.replace(S=50): 6e-3}
TRAIN_TARGET_S = 20e-6        # W1 end to end in pymaml.train, per iteration
JAX_SPEEDUP_TARGETS = {W1: 2.0, W2: 1.5}  # public API (2nd order) at least this much faster than JAX
LAYER_TARGET = (W1, 1.3)      # W1: public API at most this times the raw op + the step
THREADS_TARGET = 1.7          # two threads vs one, fused, T >= 25
MEMORY_TARGET_MB = 10.0       # fused peak at S=50 within this of S=5, W2
CUDA_TIME_TARGET = (25, 50e-6)       # H100: W2 at T=25 <= 50 us per meta-gradient
CUDA_SPEEDUP_TARGET = (4096, 20.0)   # ... at T=4096 >= 20x faster than torch.func
CUDA_PCT_TARGET = (4096, 25.0)       # ... and >= 25 % of the float32 matmul rate (TF32 off)
# Issue 26, the grid section (second order, one thread unless said; ratios in one run):
# the public API >= GRID_JAX_TARGET x JAX (W2: 2.5, W1: 2) and >= GRID_PEER_TARGET x the
# faster of the autograd loop and torch.func; GRID_PCT_TARGET % of the one-thread matmul
# rate on the wide workloads; two threads >= GRID_THREADS_TARGET x one.
GRID_JAX_TARGET = {"W1": 2.0, "W2": 2.5}   # others: 2.0
GRID_PEER_TARGET = 3.0
GRID_PCT_TARGET = (("omni", "inr256", "inr1024", "wide"), 70.0)
GRID_THREADS_TARGET = 1.8
# Issue 14 (public fused API, one thread, second order, the rates section): a Meta-SGD
# meta-iteration at most this times plain MAML's; plain MAML at least this times ANIL's.
METASGD_TARGET = (W2_METASGD, 1.15)
ANIL_TARGET = (W2_ANIL, 2.0)


# ---- DAML (issue 15): the base network with its learned inner loss ----

@dataclasses.dataclass(frozen=True)
class DAMLWorkload:
    """One DAML benchmark setting: the base MLP (sizes, activation) and the adaptation-loss MLP
    (loss_sizes: loss_sizes[0] = n_out + the hidden widths; ReLU hidden layers, linear
    output) whose inner loss (adapt_loss, "l1" | "mse") reads K unlabeled source inputs per
    inner step (a fresh batch at each of the S steps at inner_lr: x_source [T, S, K, n_in]);
    the outer loss `loss` on Q labeled target points; T tasks per meta-batch; the outer
    optimizer steps both networks' weights. Always second order (DAML's loss network gets its
    gradient through the second-order terms only). `task` and `init` say how the data and the
    starting weights are drawn (pymaml.tasks, pymaml.daml_model.init_weights)."""
    base: str
    sizes: tuple
    loss_sizes: tuple
    activation: str
    loss: str
    adapt_loss: str
    K: int
    Q: int
    S: int
    T: int
    inner_lr: float
    optimizer: str
    outer_lr: float
    task: str
    init: str

    def replace(self, **changes) -> "DAMLWorkload":
        return dataclasses.replace(self, **changes)

    order = "2nd"
    first_order = False

    @property
    def hyper(self) -> dict:
        """The keyword arguments of pymaml.functional.daml_loss (but backend)."""
        return dict(sizes=list(self.sizes), loss_sizes=list(self.loss_sizes),
                    inner_lr=self.inner_lr, steps=self.S, activation=self.activation,
                    loss=self.loss, adapt_loss=self.adapt_loss)

    def label(self) -> str:
        """The base name and what differs from it, e.g. "D1 T=25"."""
        base = DAML_BASES[self.base]
        parts = [self.base]
        for f in ("sizes", "loss_sizes"):
            if getattr(self, f) != getattr(base, f):
                parts.append(f"{f}=" + "-".join(map(str, getattr(self, f))))
        parts += [f"{f}={getattr(self, f)}" for f in ("K", "Q", "S", "T")
                  if getattr(self, f) != getattr(base, f)]
        return " ".join(parts)

    def test_id(self) -> str:
        """label() and order without spaces or '=', for pytest -k: "D1-T25-2nd"."""
        return "-".join(self.label().replace("=", "").split() + [self.order])


# D1, the seed's DAML experiment (the published continuation of the seed): base 1-32-32-1 ReLU,
# loss network 65-32-32-1, L1 inner loss, L1 outer loss on 4 target points, 5 inner steps at
# 0.03 on one fresh source input each, one task, SGD 0.01 on both networks.
D1 = DAMLWorkload("D1", sizes=(1, 32, 32, 1), loss_sizes=(65, 32, 32, 1), activation="relu",
                  loss="l1", adapt_loss="l1", K=1, Q=4, S=5, T=1, inner_lr=3e-2, optimizer="sgd",
                  outer_lr=1e-2, task="daml-sine", init="seed")
DAML_BASES = {"D1": D1}


def daml_meta_iteration_flops(w: DAMLWorkload) -> int:
    """The floating-point operations of one DAML meta-iteration, counted in the weight matmuls
    only, as meta_iteration_flops counts MAML's (an estimate; a lower bound).

    P_w: the base network's weights, P_l: the loss network's. The inner gradient at one source
    point is a forward and backward pass of the base network (6·P_w) and a forward pass and an
    input-gradient pass of the loss network (4·P_l: its weights do not move in the inner loop);
    second order triples that per step, as for MAML (the step, then its Hessian-vector product
    of ≈ 2 passes); the query pass is 6·Q·P_w: T · (3·S·K·(6·P_w + 4·P_l) + 6·Q·P_w). The loss
    network's own weight gradients in the meta-gradient are not counted."""
    def weights(sizes):
        return sum(n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    P_w, P_l = weights(w.sizes), weights(w.loss_sizes)
    return w.T * (3 * w.S * w.K * (6 * P_w + 4 * P_l) + 6 * w.Q * P_w)


# Issue 15: the public fused API's DAML meta-iteration at least this much faster than the
# reference's (backend="reference": the autograd loop), on D1, one thread.
DAML_SPEEDUP_TARGET = (D1, 30.0)
