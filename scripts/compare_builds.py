"""Bitwise comparison of two built trees of pymaml (before and after a change to the ops or
the kernels): the same seeded calls of the public API run in each tree, each tree in a
process of its own (PYTHONPATH=<tree>), and every output is compared bit for bit (NaN, -0
and the dtype included).

    python scripts/compare_builds.py OLD_TREE NEW_TREE [--seeds 40] [--iterations 30]

What runs (CPU, float32 and float64, backend "auto"):
  - pymaml.functional.maml_loss / adapt on random problems (pymaml.testing.random_problem,
    its default bounds and LARGE): the loss, the meta-gradient through backward() (incoming
    gradient 1, 2.5, and a retained graph), the adapted parameters and adapt's
    vector-Jacobian product, no_grad and inference-mode values, the checked path (sizes that
    are not plain ints), and the raw ops pymaml.train calls (maml_loss, reptile);
  - learned rates and frozen layers (pymaml.testing.random_learned_problem: every rate shape,
    adapt_layers choices, a support batch per step): loss, gradients in params and rates,
    adapted parameters, their vector-Jacobian products, no_grad values;
  - pymaml.daml_loss / daml_adapt on random DAML problems, with a scalar rate and with learned
    rates of every shape;
  - pymaml.MAML on an nn.Sequential: plain, learned rates (an nn.Parameter), ANIL's head;
  - pymaml.train: maml, fomaml, reptile, metasgd, anil and daml, SGD and Adam, on the chunked
    fast path and per iteration (optimizer_kwargs={"fused": False}): the losses and the final
    weights.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile

import torch


class _Int(int):
    """An int that is not exactly an int: sends a call down the functional API's checked path
    (its direct route takes plain types only)."""


def _flat_into(model, params, sizes):
    from pymaml import functional as F
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (W, b) in zip(linears, F.unflatten(params, sizes)):
            lin.weight.copy_(W)
            lin.bias.copy_(b)


def _sequential(sizes, activation, dtype):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out, dtype=dtype))
        if i + 2 < len(sizes):
            layers.append(torch.nn.ReLU() if activation == "relu" else torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def maml_calls(out, seeds):
    from pymaml import functional as F
    from pymaml.testing import LARGE, backend_outputs, random_problem
    ops = torch.ops.pymaml
    for dtype in (torch.float32, torch.float64):
        for seed in range(seeds):
            pb = random_problem(seed, dtype, **(LARGE if seed % 3 == 2 else {}))
            key = f"maml/{dtype}/{seed}"
            for name, t in backend_outputs(pb, "auto").items():
                out[f"{key}/{name}"] = t
            for scale in (2.5, None):
                p = pb.params.clone().requires_grad_()
                loss = F.maml_loss(p, *pb.data, **pb.hyper)
                if scale is None:  # a retained graph, then a second backward
                    loss.backward(retain_graph=True)
                    loss.backward()
                else:
                    loss.backward(torch.tensor(scale, dtype=dtype))
                out[f"{key}/grad_x{scale}"] = p.grad
            with torch.no_grad():
                out[f"{key}/no_grad"] = F.maml_loss(pb.params, *pb.data, **pb.hyper)
            with torch.inference_mode():
                out[f"{key}/inference"] = F.maml_loss(pb.params, *pb.data, **pb.hyper)
                out[f"{key}/inference_adapt"] = F.adapt(pb.params, pb.xs, pb.ys, **pb.hyper)
            checked = dict(pb.hyper, sizes=tuple(_Int(n) for n in pb.sizes))
            p = pb.params.clone().requires_grad_()
            loss = F.maml_loss(p, *pb.data, **checked)
            loss.backward()
            out[f"{key}/checked"] = [loss.detach(), p.grad]
            p = pb.params.clone().requires_grad_()
            adapted = F.adapt(p, pb.xs, pb.ys, **checked)
            adapted.sum().backward()
            out[f"{key}/checked_adapt"] = [adapted.detach(), p.grad]
            args = (pb.sizes, pb.inner_lr, pb.steps, pb.activation, pb.loss)
            out[f"{key}/raw_maml_loss"] = list(ops.maml_loss(pb.params, *pb.data, *args,
                                                              pb.first_order, True)[:2])
            out[f"{key}/raw_reptile"] = list(ops.reptile(pb.params, *pb.data, *args))


def learned_calls(out, seeds):
    from pymaml import functional as F
    from pymaml.testing import learned_outputs, random_learned_problem
    for dtype in (torch.float32, torch.float64):
        for seed in range(seeds):
            lp = random_learned_problem(seed, dtype)
            key = f"learned/{dtype}/{seed}"
            for name, t in learned_outputs(lp, "auto").items():
                out[f"{key}/{name}"] = t
            rates = lp.inner_lr(lp.rates.detach()) if isinstance(lp.rates, torch.Tensor) \
                else lp.rates
            with torch.no_grad():
                out[f"{key}/no_grad"] = F.maml_loss(lp.pb.params, *lp.pb.data, inner_lr=rates,
                                                    **lp.hyper())
            # the rates fixed (a tensor that does not require grad), params learned
            p = lp.pb.params.clone().requires_grad_()
            F.maml_loss(p, *lp.pb.data, inner_lr=rates, **lp.hyper()).backward()
            out[f"{key}/fixed_rates_grad"] = p.grad


def daml_problem(seed, dtype):
    """A seeded random DAML problem (as tests/test_daml.py draws them)."""
    import pymaml
    from pymaml import functional as F
    rng = random.Random(seed)
    hidden = [rng.randint(1, 8) for _ in range(rng.randint(1, 3))]
    sizes = [rng.randint(1, 3)] + hidden + [rng.randint(1, 2)]
    loss_sizes = ([pymaml.daml.loss_input_width(sizes)]
                  + [rng.randint(1, 8) for _ in range(rng.randint(0, 2))] + [1])
    T, K, Q = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4)
    steps = rng.randint(1, 4)
    per_step = rng.random() < 0.5
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    hyper = dict(sizes=sizes, loss_sizes=loss_sizes, activation=rng.choice(["relu", "tanh"]),
                 adapt_loss=rng.choice(["l1", "mse"]), inner_lr=10 ** rng.uniform(-2, -0.5),
                 steps=steps)
    loss = rng.choice(["l1", "mse"])
    params = F.init_params(sizes, generator=g, dtype=torch.float64).to(dtype)
    loss_params = F.init_params(loss_sizes, generator=g, dtype=torch.float64).to(dtype)
    data = (rand(T, steps, K, sizes[0]) if per_step else rand(T, K, sizes[0]),
            rand(T, Q, sizes[0]), rand(T, Q, sizes[-1]))
    return hyper, loss, params, loss_params, data


def daml_calls(out, seeds):
    import pymaml
    for dtype in (torch.float32, torch.float64):
        for seed in range(seeds):
            hyper, loss, params, loss_params, data = daml_problem(1000 + seed, dtype)
            key = f"daml/{dtype}/{seed}"
            P, S = params.numel(), hyper["steps"]
            g = torch.Generator().manual_seed(seed)
            shape = [None, (), (P,), (S, 1), (S, P)][seed % 5]
            rates = None if shape is None else (hyper["inner_lr"] * (
                1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64))).to(dtype)
            leaves = [params.clone().requires_grad_(), loss_params.clone().requires_grad_()]
            if rates is not None:
                leaves.append(rates.clone().requires_grad_())
            call = dict(hyper, loss=loss, inner_lr=leaves[2] if rates is not None
                        else hyper["inner_lr"])
            value = pymaml.daml_loss(leaves[0], leaves[1], *data, **call)
            out[f"{key}/loss"] = value.detach()
            out[f"{key}/grads"] = list(torch.autograd.grad(value, leaves))
            p = params.clone().requires_grad_()
            pymaml.daml_loss(p, loss_params, *data, **dict(call, inner_lr=hyper["inner_lr"])
                             ).backward(torch.tensor(3.0, dtype=dtype))
            out[f"{key}/grad_x3"] = p.grad
            with torch.no_grad():
                out[f"{key}/no_grad"] = pymaml.daml_loss(
                    params, loss_params, *data, **dict(call, inner_lr=hyper["inner_lr"]))
                out[f"{key}/adapt"] = pymaml.daml_adapt(params, loss_params, data[0], **hyper)


def module_calls(out, seeds):
    import pymaml
    from pymaml.testing import random_problem
    for dtype in (torch.float32, torch.float64):
        for seed in range(seeds):
            pb = random_problem(500 + seed, dtype)
            P = pb.params.numel()
            for variant in ("plain", "learned", "head"):
                model = _sequential(pb.sizes, pb.activation, dtype)
                _flat_into(model, pb.params, pb.sizes)
                kw = dict(steps=pb.steps, loss=pb.loss, first_order=pb.first_order)
                if variant == "learned":
                    kw["inner_lr"] = torch.nn.Parameter(torch.full((P,), pb.inner_lr, dtype=dtype))
                else:
                    kw["inner_lr"] = pb.inner_lr
                if variant == "head":
                    kw["adapt_layers"] = [-1]
                maml = pymaml.MAML(model, **kw)
                value = maml(*pb.data)
                value.backward()
                key = f"module/{dtype}/{seed}/{variant}"
                out[f"{key}/loss"] = value.detach()
                out[f"{key}/grads"] = [t.grad for t in maml.parameters()]


def train_calls(out, iterations):
    import pymaml
    runs = [dict(algorithm=a) for a in ("maml", "fomaml", "reptile", "metasgd", "anil")]
    runs += [dict(algorithm="maml", meta_batch_size=4, inner_batch=2, inner_steps=3),
             dict(algorithm="maml", learn_inner_lr="per-step"),
             dict(algorithm="anil", learn_inner_lr="per-parameter"),
             dict(algorithm="daml", inner_steps=2, sizes=(1, 8, 8, 1))]
    for i, run in enumerate(runs):
        for optimizer in ("sgd", "adam"):
            for fused in (True, False):
                kw = dict(run, iterations=iterations, optimizer=optimizer, seed=i,
                          progress=False, log_every=0)
                if not fused:
                    kw["optimizer_kwargs"] = {"fused": False}  # the per-iteration path
                result = pymaml.train(**kw)
                key = f"train/{i}-{run['algorithm']}/{optimizer}/fused={fused}"
                out[f"{key}/losses"] = result.losses
                out[f"{key}/weights"] = [t.detach() for t in result.model.state_dict().values()]
                out[f"{key}/fast_iterations"] = result.fast_iterations  # the path taken


def dump(path, seeds, iterations):
    import pymaml
    torch.set_num_threads(1)
    out = {"pymaml_file": pymaml.__file__}
    maml_calls(out, seeds)
    learned_calls(out, seeds)
    daml_calls(out, seeds)
    module_calls(out, max(1, seeds // 4))
    train_calls(out, iterations)
    torch.save(out, path)


def same_bits(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            same_bits(x, y) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor):
        return a == b
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        return dump(args.dump, args.seeds, args.iterations)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tree in enumerate((args.old, args.new)):
            path = os.path.join(tmp, f"{i}.pt")
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            subprocess.run([sys.executable, os.path.abspath(__file__), args.old, args.new,
                            "--dump", path, "--seeds", str(args.seeds),
                            "--iterations", str(args.iterations)],
                           env=env, cwd=os.path.abspath(tree), check=True)
            results.append(torch.load(path, weights_only=False))
    old, new = results
    for tree, res in zip((args.old, args.new), results):
        print(f"{tree}: pymaml from {res.pop('pymaml_file')}")
    assert old.keys() == new.keys(), set(old) ^ set(new)
    differ = [k for k in old if not same_bits(old[k], new[k])]
    groups = {}
    for k in old:
        groups.setdefault(k.split("/")[0], set()).add(k.rsplit("/", 1)[0])
    print("compared:", ", ".join(f"{g}: {len(c)} configurations" for g, c in groups.items()),
          f"({len(old)} outputs)")
    fast = [k for k in new if k.endswith("/fast_iterations")]
    print(f"pymaml.train runs on the chunked fast path: {sum(new[k] > 0 for k in fast)} of "
          f"{len(fast)}")
    for k in differ:
        print("DIFFERS:", k)
    print("bitwise identical" if not differ else f"{len(differ)} outputs differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
