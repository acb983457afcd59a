"""``layerzip-kschain train``: fit a Kronecker-sparse chain to one weight matrix."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from layerzip import LayerzipError

from .patterns import PatternError
from .train import TrainConfig, TrainError, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerzip-kschain", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a chain K_L⋯K_1 ≈ W on sampled inputs",
                       description="Fit a Kronecker-sparse chain to a 2-D weight (closed form "
                       "first, then MSE training of the outputs), with atomic checkpoints and "
                       "--resume.")
    d = TrainConfig("")
    t.add_argument("--weight_path", required=True,
                   help=".pt/.pth (loaded with weights_only=True) or .safetensors with a 2-D "
                        "tensor")
    t.add_argument("--weight_key", default=None, help="which tensor, when the file holds several")
    t.add_argument("--rank", type=int, default=d.rank, help="inner rank of the chain")
    t.add_argument("--num_factors", type=int, default=d.num_factors)
    t.add_argument("--patterns", default=None,
                   help='explicit chain as JSON, e.g. "[[1,64,64,64],[64,64,64,1]]"')
    t.add_argument("--impl", choices=["bmm", "triton"], default=d.impl,
                   help="the ks_matmul backend used in training")
    t.add_argument("--bs_last", action="store_true", help="batch-last layout (n × T)")
    t.add_argument("--batch_size", type=int, default=d.batch_size)
    t.add_argument("--num_epochs", type=int, default=d.num_epochs)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight_decay", type=float, default=d.weight_decay)
    t.add_argument("--optimizer", choices=["adam", "sgd", "adamw"], default=d.optimizer)
    t.add_argument("--scheduler", choices=["plateau", "cosine", "step", "none"],
                   default=d.scheduler)
    t.add_argument("--patience", type=int, default=d.patience, help="plateau: epochs to wait")
    t.add_argument("--factor", type=float, default=d.factor, help="plateau: lr multiplier")
    t.add_argument("--step_size", type=int, default=d.step_size, help="step: epochs per decay")
    t.add_argument("--gamma", type=float, default=d.gamma, help="step: lr multiplier")
    t.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm,
                   help="clip the gradient norm (0 = off)")
    t.add_argument("--log_grad_norm", action="store_true")
    t.add_argument("--num_samples", type=int, default=d.num_samples,
                   help="Gaussian inputs drawn (training + validation)")
    t.add_argument("--val_split", type=float, default=d.val_split)
    t.add_argument("--init", choices=["closed_form", "random"], default=d.init)
    t.add_argument("--output_dir", default=d.output_dir)
    t.add_argument("--save_prefix", default=d.save_prefix)
    t.add_argument("--save_interval", type=int, default=d.save_interval,
                   help="write {prefix}_epoch_{N} every N epochs (0 = never)")
    t.add_argument("--device", default=d.device)
    t.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=d.dtype,
                   help="compute dtype of the forward (the factors train in float32)")
    t.add_argument("--log_interval", type=int, default=d.log_interval,
                   help="print the loss every N steps (0 = once per epoch)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--verbose", action="store_true")
    t.add_argument("--resume", action="store_true",
                   help="continue from {prefix}_resume in --output_dir (same settings)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "train":
        build_parser().print_help()
        return 2
    console = Console(stderr=False) if sys.stdout.isatty() else Console(width=120)
    opts = vars(args)
    opts.pop("command")
    if opts["patterns"] is not None:
        try:
            opts["patterns"] = json.loads(opts["patterns"])
        except json.JSONDecodeError as exc:
            console.print(f"[red]error:[/red] --patterns is not JSON ({exc})", soft_wrap=True)
            return 2
    try:
        result = train(TrainConfig(**opts), console=console)
    except (TrainError, PatternError, LayerzipError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    last = result.history[-1]
    console.print(f"done: final val relative error {last['val_rel_error']:.4f}, best val loss "
                  f"{result.best_val:.4g}; records in {args.output_dir}/{args.save_prefix}_*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
