"""User mistakes that used to surface as internal errors: absurdly nested checkpoints and
absurd head sizes. Each is one FinetunePrepError, and nothing is allocated at its real size
before the plan needs real tensors."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from conftest import run_cli_here
from omegaconf import OmegaConf

import finetune_prep
from finetune_prep.checkpoint import read_checkpoint
from finetune_prep.checkpoint.unwrap import MAX_NESTING
from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.build import build_architecture
from finetune_prep.plan.memory import physical_memory

HUGE = 1_000_000_000_000  # head.num_outputs: 512 * 10**12 float32 weights, about 1.8 PiB


def nested(depth: int, inner: dict) -> dict:
    for _ in range(depth):
        inner = {"state_dict": inner}
    return inner


def save_deep(path, depth: int, inner: dict) -> None:
    """torch.save of a deeply nested dict, as a user with a raised recursion limit gets it."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, depth * 4 + 1000))
    try:
        torch.save(nested(depth, inner), path)
    finally:
        sys.setrecursionlimit(limit)


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "deep1000.pth"
    save_deep(path, 1000, {"w": torch.ones(2)})
    return path


def test_a_checkpoint_nested_1000_deep_is_one_clear_error(deep_ckpt):
    with pytest.raises(FinetunePrepError) as err:
        read_checkpoint(deep_ckpt)
    text = str(err.value)
    assert text.startswith(f"checkpoint.path={deep_ckpt} nests dicts more than {MAX_NESTING}")
    assert "'state_dict.state_dict.state_dict...'" in text
    assert "torch.save(model.state_dict(), path)" in text and "checkpoint.key" in text


def test_nesting_up_to_the_bound_still_unwraps(tmp_path):
    path = tmp_path / "nested.pth"
    save_deep(path, MAX_NESTING, {"w": torch.ones(2)})
    ckpt = read_checkpoint(path)
    assert list(ckpt.tensors) == ["w"]
    assert ckpt.steps[0].startswith("took nested key 'state_dict.state_dict.")
    save_deep(path, MAX_NESTING + 2, {"w": torch.ones(2)})
    with pytest.raises(FinetunePrepError, match="more than 32 levels"):
        read_checkpoint(path)


def test_a_dict_that_holds_itself_is_one_clear_error(tmp_path):
    loop: dict = {"w": torch.ones(2)}
    loop["model"] = loop
    path = tmp_path / "loop.pth"
    torch.save(loop, path)
    with pytest.raises(FinetunePrepError, match="or a dict holds itself"):
        read_checkpoint(path)


def test_dicts_shared_under_several_keys_are_searched_once(tmp_path):
    """Two keys per level pointing at one dict: 2**24 paths, 24 dicts (pickle keeps sharing)."""
    inner: dict = {"step": 3}
    for _ in range(24):
        inner = {"state_dict": inner, "model": inner}
    path = tmp_path / "shared.pth"
    torch.save(inner, path)
    start = time.perf_counter()
    with pytest.raises(FinetunePrepError, match="holds no tensors"):
        read_checkpoint(path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("source, arch", [("torchvision", "resnet18"), ("timm", "resnet18")])
def test_a_huge_head_plans_on_meta_without_allocating(source, arch):
    cfg = OmegaConf.create({"source": source, "arch": arch})
    built = build_architecture(cfg, OmegaConf.create({"num_outputs": HUGE}), meta=True)
    head = built.table.head[0]
    assert built.table.shapes[f"{head}.weight"] == (HUGE, 512)
    assert all(p.is_meta for p in built.model.parameters())


def test_a_huge_head_on_the_cpu_is_refused_with_its_size():
    ram = physical_memory()
    assert ram is not None  # Linux and macOS say
    cfg = OmegaConf.create({"source": "torchvision", "arch": "resnet18"})
    with pytest.raises(FinetunePrepError) as err:
        build_architecture(cfg, OmegaConf.create({"num_outputs": HUGE}), meta=False)
    text = str(err.value)
    assert text.startswith(f"the new head fc has {513 * HUGE:,} parameters: 1.8 PiB as float32")
    assert "more than this machine's" in text and "head.num_outputs" in text


def test_prepare_refuses_real_tensors_it_cannot_hold_but_plans_on_meta():
    cfg = finetune_prep.compose([f"head.num_outputs={HUGE}"])
    with pytest.raises(FinetunePrepError, match=r"resnet18 with head.num_outputs=1,000,000,000,000 "
                                                r"has 513,000,011,176,512 parameters"):
        finetune_prep.prepare(cfg)
    planned = finetune_prep.prepare(cfg, materialize=False)
    assert planned.document["counts"]["total"] == 513_000_011_176_512
    assert planned.document["verified"]["backward"] is False


def assert_one_error(done, run_dir, expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output
    assert not (run_dir / "param_groups.json").exists()
    assert not (run_dir / "trainability.txt").exists()


@pytest.mark.slow
def test_cli_nested_checkpoint_and_huge_head_are_exit_1_with_one_message(tmp_path, deep_ckpt):
    run_dir = tmp_path / "deep"
    done = run_cli_here(f"checkpoint.path={deep_ckpt}", f"hydra.run.dir={run_dir}")
    assert_one_error(done, run_dir, f"nests dicts more than {MAX_NESTING} levels deep")
    run_dir = tmp_path / "head"
    done = run_cli_here(f"head.num_outputs={HUGE}", "verify.backward=true",
                        f"hydra.run.dir={run_dir}")
    assert_one_error(done, run_dir, "the one-step proof needs about 11.4 PiB (models 1.8 PiB")


# --------------------------------------------------------------------------- issue 19, part D
# Every numeric and list field of the schema is bounded at validation time; the products the
# groups end up with too; patterns, input sizes and batches that used to raise deep inside torch
# are one message naming the key and how to fix it.

BAD_VALUES = [
    # stage patterns with a zero slice step, and globs that look like slices
    (["freeze.rules=[{freeze:'@stages[::0]'}]"], r"@stages\[::0\]: a slice step of 0"),
    (["freeze.rules=[{unfreeze:'@stages[1:3:0]'}]"], "a slice step of 0"),
    (["optim.groups=[{match:'@stages[::0]',lr_mult:2}]"], r"optim.groups\[0\]: .*step of 0"),
    (["optim.no_decay=['@stages[::0]']"], "a slice step of 0"),
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:'@stages[::0]'}]}]"], "step of 0"),
    (["freeze.rules=[{freeze:'layer[1:3:0]'}]"], r"\[1:3:0\] is a glob character class"),
    (["model.stages=[[conv1,bn1],'layer[1:3]']"], r"model.stages\[1\]: .*not a slice"),
    # head sizes
    (["head.num_outputs=100000000000000000000"], "at most 1,000,000,000,000"),
    (["head.num_outputs=-1"], "head.num_outputs=-1: a head needs at least one output"),
    (["head.num_outputs=0"], "head.num_outputs=0: a head needs at least one output"),
    # learning rates: subnormal, underflowing, overflowing, and their products
    (["optim.lr=1e-320"], "optim.lr=1e-320: must be a finite number > 0 that float32"),
    (["optim.lr=5e-324"], "optim.lr=5e-324"),
    (["optim.lr=1e-39"], "smallest normal float32"),
    (["optim.lr=1e308"], r"optim.lr=1e\+308"),
    (["optim.lr=-0.001"], "optim.lr=-0.001"),
    (["optim.lr=10", "optim.groups=[{match:fc,lr_mult:1e38}]"], r"gets lr 1e\+39"),
    (["optim.groups=[{match:fc,lr_mult:1e308}]"], r"lr_mult=1e\+308: must be a finite number > 0"),
    (["optim.lr=1e-30", "optim.groups=[{match:fc,lr_mult:1e-10}]"], "gets lr 1e-40"),
    (["optim=layer_decay", "optim.layer_decay=1e-30", "freeze=full"], "group 'layer0'.*gets lr"),
    (["optim.groups=[{match:fc,lr_mult:0}]"], "freeze it instead"),
    (["optim.groups=[{match:fc,lr_mult:-1}]"], r"lr_mult=-1"),
    (["optim.groups=[{match:fc,wd_mult:-1}]"], r"wd_mult=-1"),
    (["optim.groups=[{match:fc,wd_mult:inf}]"], r"wd_mult=inf"),
    (["optim.layer_decay=0"], r"in \(0, 1\]"),
    (["optim.layer_decay=-inf"], "optim.layer_decay=-inf"),
    # weight decay: overflowing, or wiping the weights every step
    (["optim.weight_decay=1e39"], r"optim.weight_decay=1e\+39"),
    (["optim.weight_decay=10", "optim.groups=[{match:fc,wd_mult:1e38}]"],
     r"weight_decay 1e\+39"),
    (["optim.weight_decay=1000", "freeze=full"], "zeroes or flips them"),
    (["optim=sgd", "optim.weight_decay=200"], "zeroes or flips them"),
    # the schedule's numbers
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:layer4}],lr_mult:1e308}]"],
     r"lr_mult=1e\+308"),
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:layer4}],lr:1e-320}]"], r"\.lr=1e-320"),
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:layer4}],lr_mult:0}]"], "freeze it"),
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:layer4}],weight_decay:-1}]"],
     "weight_decay=-1"),
    (["freeze.schedule=[{at:{epoch:1},rules:[{unfreeze:layer4}],lr:10,weight_decay:0.5}]"],
     "zeroes or flips"),
    (["freeze.schedule=[{at:{epoch:100000000000000000000},rules:[{unfreeze:layer4}]}]"],
     r"at.epoch=100000000000000000000: must be a whole number >= 1"),
    (["freeze.schedule=[{at:{epoch:1},each_stage:true,every:0}]"], "every=0"),
    (["freeze.schedule=[{at:{epoch:1},each_stage:true,every:4503599627370496}]"],
     "past 9,007,199,254,740,992"),
    # input sizes and batches
    (["model.input_size=[-1,2,2]"], r"model.input_size=\[-1, 2, 2\]: give \[C, H, W\]"),
    (["model.input_size=[0,224,224]"], r"model.input_size=\[0, 224, 224\]"),
    (["model.input_size=[3,224]"], r"model.input_size=\[3, 224\]: give \[C, H, W\]"),
    (["model.input_size=[3,224,224,1]"], r"model.input_size=\[3, 224, 224, 1\]"),
    (["model.input_size=[3,1000000000,1000000000]"], "every size >= 1 and <= 1,048,576"),
    (["model.input_size=[3,1000000,1000000]"], "elements per sample"),
    (["verify.batch_size=0"], "verify.batch_size=0: the proof needs a batch of at least 1"),
    (["verify.batch_size=-3"], "verify.batch_size=-3"),
    (["verify.batch_size=1000000000"], "at most 4,096"),
    (["verify.seed=-1"], "verify.seed=-1: must be a whole number >= 0"),
    (["verify.seed=18446744073709551616"], "verify.seed=18446744073709551616"),
    (["verify.max_params=-1"], "verify.max_params=-1"),
    # what only the model can tell: an input it cannot take, a proof too big for this machine
    (["model=vit_b_16", "model.input_size=[3,1,1]", "verify.backward=true"],
     r"model.input_size=\[3, 1, 1\]: vit_b_16 cannot take a batch of shape \[2, 3, 1, 1\] "
     r"\(AssertionError: Wrong image height!.*Its own input size is \[3, 224, 224\]"),
    (["model=vit_b_16", "model.input_size=[3,32,32]", "verify.backward=true"],
     r"model.input_size=\[3, 32, 32\]: vit_b_16 cannot take"),
    (["model.input_size=[3,20000,20000]", "verify.batch_size=4096"],
     r"the one-step proof needs about .*activations .*more than this machine's"),
    # arguments a builder rejects, whatever exception type it raises
    (["+optim.optimizer.betas=[0.9]"], "rejects its arguments"),
    (["+model.kwargs.groups=0"], r"model.kwargs \(groups\) rejected by resnet18: ValueError"),
    (["model=vit_b_16", "+model.kwargs.image_size=7"], "rejected by vit_b_16: AssertionError"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES,
                         ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_one_clear_error_in_process(overrides, message):
    cfg = finetune_prep.compose(overrides)
    with pytest.raises(FinetunePrepError, match=message):
        finetune_prep.prepare(cfg, materialize=False)


def test_a_batch_of_one_a_model_cannot_run_in_train_mode_names_verify_batch_size():
    cfg = {"model": {"source": "target", "target": {"_target_": "conftest.PooledNormNet"},
                     "input_size": [3, 8, 8]},
           "freeze": {"rules": []}, "verify": {"backward": True, "batch_size": 1}}
    with pytest.raises(FinetunePrepError, match=r"verify.batch_size=1: .*ValueError: Expected "
                                                r"more than 1 value per channel.*batch_size=2"):
        finetune_prep.prepare(cfg, materialize=False)
    cfg["verify"]["batch_size"] = 2
    assert finetune_prep.prepare(cfg, materialize=False).document["verified"]["ok"] is True


CLI_BAD = [
    (["freeze.rules=[{freeze:'@stages[::0]'}]"], "a slice step of 0"),
    (["head.num_outputs=100000000000000000000"], "head.num_outputs=100000000000000000000"),
    (["optim.lr=1e-320"], "optim.lr=1e-320"),
    (["verify.seed=-1"], "verify.seed=-1"),
    (["model=vit_b_16", "model.input_size=[3,1,1]", "verify.backward=true"],
     "vit_b_16 cannot take a batch of shape [2, 3, 1, 1]"),
    (["model.input_size=[3,20000,20000]"], "the one-step proof needs about"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), CLI_BAD, ids=[" ".join(o) for o, _ in CLI_BAD])
def test_cli_bad_values_exit_1_with_one_error_line_and_write_nothing(tmp_path, overrides,
                                                                      message):
    run_dir = tmp_path / "run"
    done = run_cli_here(*overrides, f"hydra.run.dir={run_dir}")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output
    assert not (run_dir / "param_groups.json").exists()
    assert not (run_dir / "trainability.txt").exists()
