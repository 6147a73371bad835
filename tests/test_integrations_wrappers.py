"""Names map through DataParallel, DDP, torch.compile, AveragedModel (and FSDP in the slow
recipes): the param-file API works on a wrapped model, and DDP built in the wrong order is a
clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import finetune_prep
from finetune_prep.errors import FinetunePrepError
from finetune_prep.train import wrappers


def fresh(plan) -> torch.nn.Module:
    torch.manual_seed(0)
    return finetune_prep.build_model(plan)


WRAPS = {
    "DataParallel": torch.nn.DataParallel,
    "compile": lambda m: torch.compile(m, backend="eager"),
    "AveragedModel": AveragedModel,
    "DataParallel(compile)": lambda m: torch.nn.DataParallel(torch.compile(m, backend="eager")),
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_names_map_to_the_bare_models_tensors_and_modules(wrap, resnet18_plan):
    model = fresh(resnet18_plan)
    wrapped = WRAPS[wrap](model)
    inner = wrappers.bare_model(wrapped)
    assert list(wrappers.named_parameters(wrapped)) == [n for n, _ in inner.named_parameters()]
    params = wrappers.named_parameters(wrapped)
    assert all(params[n] is p for n, p in inner.named_parameters())
    assert wrappers.named_modules(wrapped)["layer1.0.bn1"] is inner.layer1[0].bn1
    assert wrappers.named_modules(wrapped)[""] is inner


def test_averaged_model_holds_a_copy_and_its_counter(resnet18_plan):
    averaged = AveragedModel(fresh(resnet18_plan))
    assert "n_averaged" in wrappers.named_buffers(averaged)
    assert "layer4.1.bn2.running_mean" in wrappers.named_buffers(averaged)
    assert wrappers.wrapper_names(averaged) == ["AveragedModel"]


def test_a_module_named_module_is_not_a_wrapper():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(2, 2)

    wrapped = torch.nn.DataParallel(Net())
    assert list(wrappers.named_parameters(wrapped)) == ["module.weight", "module.bias"]


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_param_file_api_on_a_wrapped_model(wrap, resnet18_plan):
    wrapped = WRAPS[wrap](fresh(resnet18_plan))
    optimizer = finetune_prep.build_optimizer(wrapped, resnet18_plan)
    inner = wrappers.bare_model(wrapped)
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in inner.named_parameters()
                         if n.startswith(("layer4.", "fc."))}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in inner.parameters() if p.requires_grad}
    finetune_prep.train_mode(wrapped, resnet18_plan)  # was a bare KeyError: 'bn1'
    assert wrapped.training and not inner.bn1.training and inner.layer4[1].bn2.training
    finetune_prep.check(wrapped, optimizer, resnet18_plan)


@pytest.fixture
def gloo(tmp_path):
    """A one-process gloo group, so DDP can be built in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_in_the_right_order_trains_the_plan(gloo, resnet18_plan):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = fresh(resnet18_plan)
    finetune_prep.load_param_groups(model, resnet18_plan)
    ddp = DDP(model)
    optimizer = finetune_prep.build_optimizer(ddp, resnet18_plan)
    finetune_prep.train_mode(ddp, resnet18_plan)
    finetune_prep.check(ddp, optimizer, resnet18_plan)
    before = copy.deepcopy(model.state_dict())
    for _ in range(2):  # a reducer error would come on the second step
        finetune_prep.train_mode(ddp, resnet18_plan)
        loss = ddp(torch.randn(2, 3, 32, 32)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(before["layer3.1.conv2.weight"], model.layer3[1].conv2.weight)
    assert torch.equal(before["bn1.running_mean"], model.bn1.running_mean)
    assert not torch.equal(before["fc.weight"], model.fc.weight)


def test_ddp_built_before_the_file_is_a_clear_error(gloo, resnet18_plan):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(fresh(resnet18_plan))
    with pytest.raises(FinetunePrepError) as err:
        finetune_prep.build_optimizer(ddp, resnet18_plan)
    text = str(err.value)
    assert "wrapped in DistributedDataParallel, which fixed the trainable parameters" in text
    assert "requires_grad differs from" in text and "on 45 parameters: conv1.weight" in text
    assert ("`finetune_prep.load_param_groups(model, path)`, then `DistributedDataParallel(model)`"
            in text)
    assert all(p.requires_grad for p in ddp.parameters())  # nothing was changed


# --------------------------------------------------------------------------- DeepSpeed


@pytest.fixture
def deepspeed_cpu(monkeypatch):
    """DeepSpeed on CPU in this one process: its gloo group on a free port, and the shared-memory
    all-reduce op (a C++ build, only useful across ranks) left unbuilt."""
    import socket

    import torch.distributed as dist

    deepspeed = pytest.importorskip("deepspeed")
    ops = pytest.importorskip("deepspeed.ops")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(ops.__compatible_ops__, "deepspeed_shm_comm", False)
    from deepspeed.comm import comm
    from deepspeed.utils import groups

    monkeypatch.setattr(comm, "cdb", None)  # restored after the test: the next one starts anew
    for name, value in vars(groups).copy().items():
        if name.startswith("_") and name.isupper():
            monkeypatch.setattr(groups, name, value)
    yield deepspeed
    if dist.is_initialized():
        dist.destroy_process_group()


def ds_engine(deepspeed, plan, stage: int):
    model = fresh(plan)
    finetune_prep.load_param_groups(model, plan)
    optimizer = finetune_prep.build_optimizer(model, plan)
    config = {"train_batch_size": 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                              dist_init_required=True)
    return model, engine, zero


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_engine_and_zero_optimizer_pass_check_and_train_the_plan(
        deepspeed_cpu, resnet18_plan, stage):
    model, engine, zero = ds_engine(deepspeed_cpu, resnet18_plan, stage)
    assert wrappers.wrapper_names(engine) == ["DeepSpeedEngine"]
    finetune_prep.train_mode(engine, resnet18_plan)
    assert not model.bn1.training and model.fc.training
    finetune_prep.check(engine, zero, resnet18_plan)
    before = copy.deepcopy(model.state_dict()) if stage < 3 else None
    for _ in range(2):
        finetune_prep.train_mode(engine, resnet18_plan)
        loss = engine(torch.randn(2, 3, 32, 32)).sum()
        engine.backward(loss)
        engine.step()
    finetune_prep.check(engine, zero, resnet18_plan)
    if before is not None:
        assert torch.equal(before["layer3.1.conv2.weight"], model.layer3[1].conv2.weight)
        assert torch.equal(before["bn1.running_mean"], model.bn1.running_mean)
        assert not torch.equal(before["fc.weight"], model.fc.weight)
    model.conv1.weight.requires_grad_(True)  # unfrozen behind the optimizer's back
    with pytest.raises(FinetunePrepError) as err:
        finetune_prep.check(engine, zero, resnet18_plan)
    assert "frozen in the plan but requires_grad=True" in str(err.value)
    assert "conv1.weight" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_checkpoints_are_read_or_explained(deepspeed_cpu, resnet18_plan, stage,
                                                     tmp_path):
    """What engine.save_checkpoint writes: the run's root names the step's model file (ZeRO
    1/2) or says how to consolidate the rank shards (ZeRO-3), never a generic refusal."""
    from finetune_prep.checkpoint import read_checkpoint

    model, engine, _ = ds_engine(deepspeed_cpu, resnet18_plan, stage)
    engine.save_checkpoint(str(tmp_path / "run"))
    with pytest.raises(FinetunePrepError) as err:
        read_checkpoint(tmp_path / "run")
    text = str(err.value)
    step = tmp_path / "run" / "global_step0"
    if stage == 3:
        assert "ZeRO rank shards" in text and "zero_to_fp32.py" in text
        shard = next(step.glob("zero_pp_rank_0_*model_states.pt"))
        with pytest.raises(FinetunePrepError, match="one rank's shard of a DeepSpeed ZeRO"):
            read_checkpoint(shard)
    else:
        states = step / "mp_rank_00_model_states.pt"
        assert "DeepSpeed run" in text and f"checkpoint.path={states}" in text
        ckpt = read_checkpoint(states)
        assert set(ckpt.tensors) == set(model.state_dict())
