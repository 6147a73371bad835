"""The Lightning callback (its full Trainer.fit runs are in test_integrations_recipes.py): it
finds the planned model inside a LightningModule and says how to name it when it cannot."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import finetune_prep
from finetune_prep.errors import FinetunePrepError
from finetune_prep.train.lightning import FinetunePrepCallback


class Wrapper(L.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 2)  # a module outside the plan
        self.net = net


def test_finds_the_planned_model_inside_the_module(resnet18_plan):
    net = finetune_prep.build_model(resnet18_plan)
    callback = FinetunePrepCallback(resnet18_plan)
    assert callback.model(Wrapper(net)) is net
    assert callback.model(Wrapper(torch.compile(net, backend="eager"))) is net
    assert FinetunePrepCallback(resnet18_plan, module="net").model(Wrapper(net)) is net


def test_setup_sets_requires_grad_and_holds_eval_modules(resnet18_plan):
    net = finetune_prep.build_model(resnet18_plan)
    module = Wrapper(net)
    callback = FinetunePrepCallback(resnet18_plan)
    callback.setup(None, module, "fit")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n, _ in net.named_parameters() if n.startswith(("layer4.", "fc."))}
    module.train()  # what Lightning does when fitting starts
    callback.on_train_start(None, module)
    assert not net.bn1.training and net.layer4[1].bn2.training and module.head.training


def test_a_module_without_the_planned_model_says_how_to_name_it(resnet18_plan):
    with pytest.raises(FinetunePrepError) as err:
        FinetunePrepCallback(resnet18_plan).model(Wrapper(torch.nn.Linear(3, 3)))
    assert "no submodule of Wrapper has exactly the 62 parameters of" in str(err.value)
    assert "FinetunePrepCallback(path, module='net')" in str(err.value)


class Planned(Wrapper):
    def configure_optimizers(self):
        return None  # the callback builds the plan's optimizer


def test_an_optimizer_beyond_torch_optim_only_when_the_callback_allows_it(resnet18_plan,
                                                                          tmp_path):
    import json

    import timm.optim

    doc = json.loads(resnet18_plan.read_text())
    doc["optimizer"] = {"_target_": "timm.optim.Lamb", "weight_decay": 0.02}
    path = tmp_path / "lamb.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FinetunePrepError, match="'timm.optim.Lamb' is not in torch.optim, and "
                                                "the caller did not allow it"):
        FinetunePrepCallback(path)  # refused when made, not when fitting starts
    net = finetune_prep.build_model(path)
    module = Planned(net)
    callback = FinetunePrepCallback(path, optimizers=[timm.optim.Lamb])
    callback.setup(None, module, "fit")
    optimizer = module.configure_optimizers()
    assert type(optimizer) is timm.optim.Lamb and optimizer.defaults["weight_decay"] == 0.02
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in net.named_parameters() if n.startswith(("layer4.", "fc."))}
    callback.on_train_start(None, module)  # frozen BN back in eval
    finetune_prep.check(net, optimizer, path)
    callback.teardown(None, module, "fit")
    assert module.configure_optimizers() is None  # the module's own method is back
