"""User mistakes that used to surface as internal errors: absurdly nested checkpoints and
absurd head sizes. Each is one FinetunePrepError, and nothing is allocated at its real size
before the plan needs real tensors."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf

import finetune_prep
from finetune_prep.checkpoint import read_checkpoint
from finetune_prep.checkpoint.unwrap import MAX_NESTING
from finetune_prep.errors import FinetunePrepError
from finetune_prep.models import build_model, physical_memory

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
    built = build_model(cfg, OmegaConf.create({"num_outputs": HUGE}), meta=True)
    head = built.table.head[0]
    assert built.table.shapes[f"{head}.weight"] == (HUGE, 512)
    assert all(p.is_meta for p in built.model.parameters())


def test_a_huge_head_on_the_cpu_is_refused_with_its_size():
    ram = physical_memory()
    assert ram is not None  # Linux and macOS say
    cfg = OmegaConf.create({"source": "torchvision", "arch": "resnet18"})
    with pytest.raises(FinetunePrepError) as err:
        build_model(cfg, OmegaConf.create({"num_outputs": HUGE}), meta=False)
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
    done = run_cli(f"checkpoint.path={deep_ckpt}", f"hydra.run.dir={run_dir}")
    assert_one_error(done, run_dir, f"nests dicts more than {MAX_NESTING} levels deep")
    run_dir = tmp_path / "head"
    done = run_cli(f"head.num_outputs={HUGE}", "verify.backward=true", f"hydra.run.dir={run_dir}")
    assert_one_error(done, run_dir, "has 513,000,011,176,512 parameters: 1.8 PiB as float32")
