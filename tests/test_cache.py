"""The process cache: same config reuses the meta model and checkpoint; changes do not."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from finetune_prep import checkpoint
from finetune_prep.app import cache
from finetune_prep.app import pipeline as runner
from finetune_prep.app.pipeline import prepare
from finetune_prep.config import validate
from finetune_prep.model.build import build_architecture


@pytest.fixture
def counted(monkeypatch):
    """Empty caches, and counts of meta builds and checkpoint reads."""
    cache.clear()
    calls = {"build": 0, "read": 0}
    build, read = build_architecture, checkpoint.read_checkpoint

    def counting_build(*args, **kwargs):
        calls["build"] += kwargs.get("meta", args[2] if len(args) > 2 else False)
        return build(*args, **kwargs)

    def counting_read(*args, **kwargs):
        calls["read"] += 1
        return read(*args, **kwargs)

    monkeypatch.setattr(cache, "build_architecture", counting_build)
    monkeypatch.setattr(checkpoint, "read_checkpoint", counting_read)  # the cache's reads
    monkeypatch.setattr(runner, "read_checkpoint", counting_read)  # uncached reads
    yield calls
    cache.clear()


def _plan(make_cfg, *overrides):
    return prepare(make_cfg(*overrides), materialize=False, verify=False)


def test_same_model_and_checkpoint_are_reused_across_freeze_presets(counted, make_cfg,
                                                                     resnet18_ckpt):
    args = (f"checkpoint.path={resnet18_ckpt}",)
    first = _plan(make_cfg, *args, "freeze=full")
    second = _plan(make_cfg, *args, "freeze=head_only")
    third = _plan(make_cfg, *args, "freeze=full")
    # the first job's model was its own (a single run copies nothing); the second built the
    # master that later jobs copy
    assert counted == {"build": 2, "read": 1}
    assert len({id(first.model), id(second.model), id(third.model)}) == 3
    # the second job's requires_grad did not leak into the first or third job's model
    assert all(p.requires_grad for p in first.model.parameters())
    assert all(p.requires_grad for p in third.model.parameters())
    assert not second.model.conv1.weight.requires_grad
    assert first.document["counts"]["trainable"] == first.document["counts"]["total"]


def test_a_single_call_copies_no_model(counted, make_cfg, monkeypatch):
    copied, deepcopy = [], copy.deepcopy

    def counting_deepcopy(x, *args, **kwargs):
        if isinstance(x, torch.nn.Module):
            copied.append(x)
        return deepcopy(x, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    cfg = make_cfg("freeze=head_only")
    done = prepare(cfg, materialize=False, verify=False)
    assert copied == [] and counted["build"] == 1
    typed = validate(cfg)
    assert cache.meta_table(typed.model, typed.head) is done.table  # the sweep's row: no build
    assert counted["build"] == 1


def test_different_head_builds_again(counted, make_cfg):
    a = _plan(make_cfg, "head.num_outputs=1")
    b = _plan(make_cfg, "head.num_outputs=7")
    assert counted["build"] == 2
    assert a.model.fc.out_features == 1 and b.model.fc.out_features == 7


def test_rewritten_checkpoint_is_read_again(counted, make_cfg, tmp_path, resnet18_ckpt):
    path = tmp_path / "ckpt.pth"
    state = torch.load(resnet18_ckpt, weights_only=True)
    torch.save(state, path)
    ok = _plan(make_cfg, f"checkpoint.path={path}")
    assert ok.document["checkpoint"]["loaded"] == len(state)
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks
    redone = _plan(make_cfg, f"checkpoint.path={path}", "checkpoint.strict=false")
    assert counted["read"] == 2
    assert redone.document["checkpoint"]["missing"] == ["fc.weight", "fc.bias"]


def test_cached_equals_uncached(counted, make_cfg, resnet18_ckpt):
    args = (f"checkpoint.path={resnet18_ckpt}", "freeze=last_stage")
    cold = _plan(make_cfg, *args)
    warm = _plan(make_cfg, *args)
    warmer = _plan(make_cfg, *args)  # a copy of the master
    assert counted == {"build": 2, "read": 1}
    for doc in (cold.document, warm.document, warmer.document):
        doc.pop("provenance")
    assert warm.document == cold.document == warmer.document
    assert warm.summary == cold.summary == warmer.summary


def test_materialized_models_never_share_weights(counted, make_cfg, resnet18_ckpt):
    cfg = make_cfg(f"checkpoint.path={resnet18_ckpt}", "freeze=full")
    first = prepare(cfg, verify=False)
    with torch.no_grad():
        first.model.conv1.weight.add_(1.0)  # training in place
    second = prepare(cfg, verify=False)
    third = prepare(cfg, verify=False)
    assert counted["build"] == 2  # the meta model is reused from the third call on ...
    assert counted["read"] == 3  # ... but weights are read afresh
    assert not second.model.conv1.weight.is_meta
    expected = torch.load(resnet18_ckpt, weights_only=True)["conv1.weight"]
    assert torch.equal(second.model.conv1.weight, expected)
    assert second.model.conv1.weight.data_ptr() != first.model.conv1.weight.data_ptr()
    assert torch.equal(third.model.conv1.weight, expected)
    assert third.model.conv1.weight.data_ptr() != second.model.conv1.weight.data_ptr()


def test_a_rewritten_shard_is_read_again(counted, tmp_path):
    """The cache key is the index's stat; a shard rewritten beside it must not be served."""
    import json

    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    index = tmp_path / "model.safetensors.index.json"
    first = cache.read_checkpoint(index)
    assert cache.read_checkpoint(index) is first and counted["read"] == 1
    index_stat = index.stat()
    save_file({"w": torch.ones(3)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    assert index.stat() == index_stat  # the cache key alone cannot see the change
    again = cache.read_checkpoint(index)
    assert again is not first and tuple(again.tensors["w"].shape) == (3,)
    assert counted["read"] == 2
