"""A short, real training loop driven by a param_groups.json written by finetune_prep.

    python -m finetune_prep freeze=last_stage hydra.run.dir=outputs/demo
    python examples/train.py outputs/demo/param_groups.json --steps 5

It rebuilds the model the file was made for (`finetune_prep.build_model`: torchvision, timm or
your `_target_` class, which you name with --target: a plan file never imports a class itself;
random init here, load your own weights where the comment says), turns the file into an
optimizer in one call, checks the setup against the plan, keeps frozen norm layers in eval mode
every step, and prints, as JSON, how far frozen and trainable weights and frozen BatchNorm
statistics moved: frozen ones must not move at all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

import finetune_prep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("param_groups", help="path of a param_groups.json")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps to run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="input size of the random batches (default: the file's)")
    parser.add_argument("--target", metavar="MODULE.CLASS",
                        help="the class of a _target_ model (your choice, imported here)")
    args = parser.parse_args()

    with open(args.param_groups, encoding="utf-8") as f:
        info = json.load(f)["model"]
    input_size = args.input_size or info.get("input_size")
    if not input_size:
        sys.exit(f"{args.param_groups} records no input size (a _target_ model planned without "
                 "model.input_size): pass --input-size C H W.")
    torch.manual_seed(0)
    try:
        model = finetune_prep.build_model(args.param_groups, target=_import(args.target))
    except finetune_prep.FinetunePrepError as err:
        sys.exit(f"error: {err}")
    # Load your checkpoint here, e.g. model.load_state_dict(torch.load(path, weights_only=True)).

    optimizer = finetune_prep.build_optimizer(model, args.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    binary = info["num_outputs"] == 1
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss()
    for step in range(args.steps):
        finetune_prep.train_mode(model, args.param_groups)  # model.train(), frozen BN in eval
        if step == 0:
            finetune_prep.check(model, optimizer, args.param_groups)  # the setup is the plan
        images = torch.randn(args.batch_size, *input_size)
        if binary:
            target = torch.randint(0, 2, (args.batch_size, 1)).float()
        else:
            target = torch.randint(0, info["num_outputs"], (args.batch_size,))
        loss = loss_fn(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print(json.dumps(movement(model, before, stats_before, args.param_groups) | {
        "steps": args.steps}))


def _import(dotted: str | None) -> type | None:
    """The class named on the command line (the user's choice, never the file's)."""
    if dotted is None:
        return None
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def movement(model: torch.nn.Module, before: dict, stats_before: dict, path: str) -> dict:
    """How far frozen and trainable parameters moved, and which frozen norm stats changed."""
    with open(path, encoding="utf-8") as f:
        eval_modules = set(json.load(f)["eval_modules"])
    changes = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "frozen_max_change": max((c for n, c in changes.items() if n not in trainable),
                                 default=0.0),
        "trainable_max_change": max((changes[n] for n in trainable), default=0.0),
        "trainable_unmoved": [n for n in trainable if changes[n] == 0.0],
        "frozen_norm_stats_changed": [
            n for n, b in model.named_buffers()
            if n.rpartition(".")[0] in eval_modules and not torch.equal(b, stats_before[n])],
    }


if __name__ == "__main__":
    main()
