"""A short, real training loop driven by a param_groups.json written by finetune_prep.

    python -m finetune_prep freeze=last_stage hydra.run.dir=outputs/demo
    python examples/train.py outputs/demo/param_groups.json --steps 5

It builds the architecture the file names (torchvision, random init here; load your own
weights where the comment says), turns the file into an optimizer in one call, keeps frozen
BatchNorm layers in eval mode every step, and prints, as JSON, how far frozen and trainable
weights moved: frozen ones must not move at all.
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision

import finetune_prep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("param_groups", help="path of a param_groups.json")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps to run")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    with open(args.param_groups, encoding="utf-8") as f:
        document = json.load(f)
    info, eval_modules = document["model"], set(document["eval_modules"])
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        info["arch"], weights=None, num_classes=info["num_outputs"]
    )
    # Load your checkpoint here, e.g. model.load_state_dict(torch.load(path, weights_only=True)).

    optimizer = finetune_prep.build_optimizer(model, args.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    binary = info["num_outputs"] == 1
    loss_fn = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss()
    for step in range(args.steps):
        finetune_prep.train_mode(model, args.param_groups)  # model.train(), frozen BN in eval
        images = torch.randn(args.batch_size, 3, 224, 224)
        if binary:
            target = torch.randint(0, 2, (args.batch_size, 1)).float()
        else:
            target = torch.randint(0, info["num_outputs"], (args.batch_size,))
        loss = loss_fn(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    def moved(keep: bool) -> float:
        return max((float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                    if p.requires_grad == keep), default=0.0)

    frozen_stats = [n for n, b in model.named_buffers()
                    if n.rpartition(".")[0] in eval_modules and not torch.equal(b, stats_before[n])]
    print(json.dumps({"steps": args.steps, "frozen_max_change": moved(False),
                      "trainable_max_change": moved(True),
                      "frozen_norm_stats_changed": frozen_stats}))


if __name__ == "__main__":
    main()
