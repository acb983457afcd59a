"""Training a chain to match a dense weight: y = K_L ⋯ K_1 x against y = W x on sampled inputs.

Every epoch ends with a resume record (factors, optimizer, scheduler, history) written
atomically through layerzip.save_record; data order is a pure function of (seed, epoch), so a run
killed at any point and continued with ``resume=True`` ends bit-for-bit where an uninterrupted
run with the same seed ends.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import layerzip
from layerzip import CheckpointError

from .chain import random_factors
from .fit import closed_form
from .module import OP
from .patterns import Pattern, best_chain, check_chain

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Test hook: exit the process (as a kill would) right after this epoch's records are written.
EXIT_AFTER_EPOCH_ENV = "LAYERZIP_KSCHAIN_EXIT_AFTER_EPOCH"


@dataclass
class TrainConfig:
    weight_path: str
    rank: int = 1
    num_factors: int = 2
    patterns: list | None = None
    impl: str = "bmm"
    bs_last: bool = False
    batch_size: int = 256
    num_epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "none"
    patience: int = 3
    factor: float = 0.5
    step_size: int = 10
    gamma: float = 0.5
    max_grad_norm: float = 0.0
    log_grad_norm: bool = False
    num_samples: int = 4096
    val_split: float = 0.1
    init: str = "closed_form"
    output_dir: str = "kschain-out"
    save_prefix: str = "kschain"
    save_interval: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    log_interval: int = 0
    verbose: bool = False
    resume: bool = False
    seed: int = 0
    weight_key: str | None = None

    # settings that must match between a run and its resumption
    RESUME_KEYS = ("weight_path", "weight_key", "rank", "num_factors", "patterns", "impl",
                   "bs_last", "batch_size", "num_epochs", "lr", "weight_decay", "optimizer",
                   "scheduler", "patience", "factor", "step_size", "gamma", "max_grad_norm",
                   "num_samples", "val_split", "init", "dtype", "seed")


@dataclass
class TrainResult:
    factors: list[Tensor]
    patterns: list[Pattern]
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    stats: dict = field(default_factory=dict)


class TrainError(ValueError):
    """Bad training input: the message names the option and the fix."""


def load_weight(path: str | os.PathLike, key: str | None = None) -> Tensor:
    """A 2-D tensor from .pt/.pth (torch.load with weights_only=True: never unpickles code) or
    .safetensors; a file holding several tensors needs ``key``."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--weight_path {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 — any unpickling refusal is reported the same way
            raise TrainError(f"--weight_path {str(path)!r} could not be loaded with "
                             f"weights_only=True ({type(exc).__name__}: {exc}); save a plain "
                             f"tensor or a dict of tensors") from None
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        raise TrainError(f"--weight_path {str(path)!r}: expected a .pt, .pth or .safetensors "
                         f"file")
    if isinstance(obj, dict):
        matrices = {k: v for k, v in obj.items() if isinstance(v, Tensor) and v.dim() == 2}
        if key is not None:
            if key not in obj:
                raise TrainError(f"--weight_key {key!r} is not in {str(path)!r}; it holds "
                                 f"{sorted(obj)}")
            obj = obj[key]
        elif len(matrices) == 1:
            obj = next(iter(matrices.values()))
        else:
            raise TrainError(f"{str(path)!r} holds {len(matrices)} 2-D tensors "
                             f"({sorted(matrices)[:8]}): pick one with --weight_key")
    if not isinstance(obj, Tensor) or obj.dim() != 2 or not obj.is_floating_point():
        shape = tuple(obj.shape) if isinstance(obj, Tensor) else type(obj).__name__
        raise TrainError(f"{str(path)!r} must hold a 2-D floating-point tensor (out × in); "
                         f"got {shape}")
    return obj.detach().float()


def _patterns_for(cfg: TrainConfig, m: int, n: int) -> tuple[list[Pattern], int, int]:
    if cfg.patterns:
        pats = check_chain(cfg.patterns)
        if pats[0].cols < n or pats[-1].rows < m:
            raise TrainError(f"--patterns map {pats[0].cols} → {pats[-1].rows}, smaller than "
                             f"the weight's {n} → {m}")
        return pats, pats[-1].rows, pats[0].cols
    choice = best_chain(m, n, cfg.num_factors, cfg.rank)
    return list(choice.patterns), choice.out_padded, choice.in_padded


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise TrainError(f"--optimizer {cfg.optimizer!r}: choose adam, adamw or sgd")


def _scheduler(cfg: TrainConfig, opt):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=cfg.patience,
                                                          factor=cfg.factor)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.num_epochs, 1))
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "none":
        return None
    raise TrainError(f"--scheduler {cfg.scheduler!r}: choose plateau, cosine, step or none")


def validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype {cfg.dtype!r}: choose {', '.join(DTYPES)}")
    if cfg.init not in ("closed_form", "random"):
        problems.append(f"--init {cfg.init!r}: choose closed_form or random")
    if cfg.impl not in ("bmm", "triton"):
        problems.append(f"--impl {cfg.impl!r}: choose bmm or triton")
    for name in ("batch_size", "num_samples", "rank", "num_factors"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.num_epochs < 0:
        problems.append(f"--num_epochs must be ≥ 0, got {cfg.num_epochs}")
    if not 0 < cfg.val_split < 1:
        problems.append(f"--val_split must be in (0, 1), got {cfg.val_split}")
    elif int(cfg.num_samples * cfg.val_split) < 1 or \
            cfg.num_samples - int(cfg.num_samples * cfg.val_split) < 1:
        problems.append(f"--num_samples {cfg.num_samples} with --val_split {cfg.val_split} "
                        f"leaves an empty training or validation set")
    if cfg.lr <= 0:
        problems.append(f"--lr must be > 0, got {cfg.lr}")
    if problems:
        raise TrainError("; ".join(problems))


def _state_tensors(factors, opt) -> tuple[dict[str, Tensor], dict]:
    """Factors and the optimizer state as safetensors entries + JSON (no pickle)."""
    tensors = {f"factors.{i}": f.detach() for i, f in enumerate(factors)}
    sd = opt.state_dict()
    scalars: dict = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars}


def _restore_optimizer(opt, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["state_scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def compression_stats(m: int, n: int, patterns, dtype: torch.dtype) -> dict:
    ks = sum(p.nnz for p in patterns)
    size = torch.empty(0, dtype=dtype).element_size()
    return {"dense_params": m * n, "ks_params": ks, "compression_ratio": m * n / ks,
            "bytes_dense": m * n * size, "bytes_ks": ks * size,
            "bytes_saved": (m * n - ks) * size, "dtype": str(dtype).replace("torch.", "")}


def train(cfg: TrainConfig, console=None) -> TrainResult:
    """Run (or resume) a training run; write its records into ``cfg.output_dir``."""
    validate(cfg)
    w = load_weight(cfg.weight_path, cfg.weight_key)
    m, n = w.shape
    pats, mp, np_ = _patterns_for(cfg, m, n)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    kernel = layerzip.get_backend(OP, cfg.impl)
    w_pad = F.pad(w, (0, np_ - n, 0, mp - m)).to(device)
    out = Path(cfg.output_dir)
    prefix = out / cfg.save_prefix
    stats = compression_stats(m, n, pats, dtype)

    # data: a pure function of the seed; the validation rows are never trained on
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.num_samples, np_, generator=g)
    if np_ > n:
        x[:, n:] = 0  # padded columns carry no input
    y = x @ w_pad.cpu().t()
    n_val = int(cfg.num_samples * cfg.val_split)
    x_tr, y_tr, x_val, y_val = (t.to(device) for t in (x[n_val:], y[n_val:], x[:n_val],
                                                         y[:n_val]))

    if cfg.init == "closed_form":
        init = closed_form(w_pad.cpu().double(), pats)
    else:
        init = random_factors(pats, scale_to=float(w.norm()), generator=g, dtype=torch.float64)
    # float32 master factors; the forward runs in cfg.dtype
    factors = [f.float().to(device).requires_grad_(True) for f in init]
    opt = _optimizer(cfg, factors)
    sched = _scheduler(cfg, opt)
    history: list[dict] = []
    best_val = math.inf
    start_epoch = 1

    if cfg.resume:
        try:
            tensors, meta = layerzip.load_record(f"{prefix}_resume", device=device)
        except CheckpointError as exc:
            raise TrainError(f"--resume: no usable resume record in {str(out)!r} ({exc})") \
                from None
        saved = meta["config"]
        changed = [f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in TrainConfig.RESUME_KEYS
                   if saved.get(k) != _jsonable(getattr(cfg, k))]
        if changed:
            raise TrainError("--resume with different settings than the saved run: "
                             + "; ".join(changed))
        with torch.no_grad():
            for i, f in enumerate(factors):
                f.copy_(tensors[f"factors.{i}"])
        _restore_optimizer(opt, tensors, meta["optimizer"])
        if sched is not None:
            sched.load_state_dict(meta["scheduler"])
        history, best_val = meta["history"], meta["best_val"]
        start_epoch = meta["epoch"] + 1

    def forward(xb: Tensor) -> Tensor:
        fs = [f.to(dtype) for f in factors]
        if cfg.bs_last:
            return kernel(xb.to(dtype).t().contiguous(), fs, pats, True).t().float()
        return kernel(xb.to(dtype), fs, pats, False).float()

    @torch.no_grad()
    def evaluate(xs: Tensor, ys: Tensor) -> tuple[float, float]:
        err = sq = 0.0
        for i in range(0, xs.shape[0], 4096):
            d = forward(xs[i:i + 4096]) - ys[i:i + 4096]
            err += float(d.double().square().sum())
            sq += float(ys[i:i + 4096].double().square().sum())
        return err / ys.numel(), math.sqrt(err / max(sq, 1e-300))

    def record(kind: str, epoch: int, entry: dict) -> None:
        meta = {"kind": kind, "epoch": epoch, "patterns": [p.as_list() for p in pats],
                "impl": cfg.impl, "bs_last": cfg.bs_last, "out_features": m, "in_features": n,
                "padded": [mp, np_], **entry, "compression": stats}
        layerzip.save_record(f"{prefix}_{kind}", {f"factors.{i}": f.detach().cpu()
                                                  for i, f in enumerate(factors)}, meta)

    if not history:
        val_loss, val_rel = evaluate(x_val, y_val)
        history.append({"epoch": 0, "train_loss": None, "val_loss": val_loss,
                        "val_rel_error": val_rel, "lr": opt.param_groups[0]["lr"],
                        "grad_norm": None})
    if console is not None:
        console.print(f"weight {m}×{n} → chain {[str(p) for p in pats]}"
                      + (f" (padded to {mp}×{np_})" if (mp, np_) != (m, n) else ""))
        console.print(f"dense {stats['dense_params']:,} params vs KS {stats['ks_params']:,}: "
                      f"{stats['compression_ratio']:.2f}× smaller, "
                      f"{stats['bytes_saved'] / 2**20:.2f} MiB saved in {stats['dtype']}")
        console.print(f"epoch 0 ({cfg.init} init): val loss {history[0]['val_loss']:.4g}, "
                      f"relative error {history[0]['val_rel_error']:.4f}")

    steps_per_epoch = math.ceil(x_tr.shape[0] / cfg.batch_size)
    for epoch in range(start_epoch, cfg.num_epochs + 1):
        order = torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(
            cfg.seed * 100_003 + epoch)).to(device)
        total, grad_norm = 0.0, None
        progress = _progress(console, f"epoch {epoch}/{cfg.num_epochs}", steps_per_epoch)
        with progress:
            task = progress.add_task("train", total=steps_per_epoch)
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                loss = F.mse_loss(forward(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(factors, cfg.max_grad_norm))
                elif cfg.log_grad_norm:
                    grad_norm = float(torch.linalg.vector_norm(
                        torch.stack([f.grad.norm() for f in factors])))
                opt.step()
                total += loss.item() * idx.numel()
                progress.advance(task)
                if cfg.log_interval and console is not None and (step + 1) % cfg.log_interval == 0:
                    console.print(f"  step {step + 1}/{steps_per_epoch}: loss {loss.item():.4g}"
                                  + (f", grad norm {grad_norm:.3g}" if grad_norm is not None
                                     and cfg.log_grad_norm else ""))
        val_loss, val_rel = evaluate(x_val, y_val)
        lr = opt.param_groups[0]["lr"]
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        entry = {"epoch": epoch, "train_loss": total / x_tr.shape[0], "val_loss": val_loss,
                 "val_rel_error": val_rel, "lr": lr, "grad_norm": grad_norm}
        history.append(entry)
        if console is not None:
            console.print(f"epoch {epoch}: train {entry['train_loss']:.4g}, val {val_loss:.4g} "
                          f"(relative error {val_rel:.4f}), lr {lr:.3g}"
                          + (f", grad norm {grad_norm:.3g}" if grad_norm is not None and
                             (cfg.log_grad_norm or cfg.verbose) else ""))
        if val_loss < best_val:
            best_val = val_loss
            record("best", epoch, {"val_loss": val_loss, "val_rel_error": val_rel, "lr": lr,
                                   "grad_norm": grad_norm})
        if cfg.save_interval and epoch % cfg.save_interval == 0:
            record(f"epoch_{epoch}", epoch, {"val_loss": val_loss, "val_rel_error": val_rel,
                                             "lr": lr, "grad_norm": grad_norm})
        tensors, opt_meta = _state_tensors(factors, opt)
        layerzip.save_record(f"{prefix}_resume", tensors, {
            "epoch": epoch, "config": {k: _jsonable(getattr(cfg, k))
                                       for k in TrainConfig.RESUME_KEYS},
            "optimizer": opt_meta, "scheduler": sched.state_dict() if sched else None,
            "history": history, "best_val": best_val})
        layerzip.write_atomic(f"{prefix}_training_log.json", _dumps(
            {"config": asdict(cfg), "patterns": [p.as_list() for p in pats],
             "compression": stats, "history": history, "best_val_loss": best_val}))
        if os.environ.get(EXIT_AFTER_EPOCH_ENV) == str(epoch):
            os._exit(75)  # noqa: SLF001 — simulates a kill, skipping every cleanup

    last = history[-1]
    record("final", last["epoch"], {"val_loss": last["val_loss"],
                                    "val_rel_error": last["val_rel_error"], "lr": last["lr"],
                                    "grad_norm": last["grad_norm"]})
    layerzip.write_atomic(f"{prefix}_training_log.json", _dumps(
        {"config": asdict(cfg), "patterns": [p.as_list() for p in pats], "compression": stats,
         "history": history, "best_val_loss": best_val}))
    return TrainResult([f.detach() for f in factors], pats, history, best_val, stats)


def _jsonable(v):
    return [list(x) for x in v] if isinstance(v, (list, tuple)) and v and \
        isinstance(v[0], (list, tuple)) else v


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


def _progress(console, description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=console is None)


def load_trained(prefix: str | os.PathLike, *, bias: Tensor | None = None,
                 backend: str = "auto"):
    """A KSChainLinear from a ``{prefix}_best`` / ``_final`` / ``_epoch_N`` record."""
    from .module import KSChainLinear

    tensors, meta = layerzip.load_record(prefix)
    module = KSChainLinear(meta["out_features"], meta["in_features"], meta["patterns"],
                           bias=bias is not None, backend=backend)
    with torch.no_grad():
        for i, f in enumerate(module.factors):
            f.copy_(tensors[f"factors.{i}"])
        if bias is not None:
            module.bias.copy_(bias)
    return module
