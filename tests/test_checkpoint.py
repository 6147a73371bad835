"""Checkpoints: reading every format and wrapper, verifying fit, loading onto meta-built models.

All checkpoints are made here from random-init torchvision models (nothing is downloaded).
"""

from __future__ import annotations

import builtins
import itertools
import os
import re
import struct
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from finetune_prep.checkpoint import (
    Checkpoint,
    Fit,
    check_fit,
    group_keys,
    load_into,
    load_tensors,
    read_checkpoint,
)
from finetune_prep.checkpoint import read as ckpt_read  # the module that opens files
from finetune_prep.errors import FinetunePrepError

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    """A random-init resnet18 state dict (1000-class head), the reference values."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def other(sd) -> dict[str, torch.Tensor]:
    """Different values with the same keys and shapes (a decoy beside the wanted weights)."""
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def meta_resnet18(num_classes: int = 1000) -> nn.Module:
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def no_meta(model: nn.Module) -> bool:
    tensors = itertools.chain(model.parameters(), model.buffers())
    return not any(t.is_meta for t in tensors)


WRAPPERS = {  # name -> (file name, what to save, checkpoint.key, checkpoint.prefix, step texts)
    "plain": ("plain.pt", lambda sd, o: sd, None, None, []),
    "lightning": (
        "lightning.ckpt",
        lambda sd, o: {
            "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
            "state_dict": prefixed("model.", sd),
            "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "lr_schedulers": [],
        },
        None, None, ["took nested key 'state_dict'", "stripped prefix 'model.' from all 122 keys"],
    ),
    "model": ("model.pth", lambda sd, o: {"model": sd, "epoch": 9}, None, None,
              ["took nested key 'model'"]),
    "model_state": ("model_state.pth", lambda sd, o: {"model_state": sd, "step": 10}, None, None,
                    ["took nested key 'model_state'"]),
    "module": ("module.bin", lambda sd, o: {"module": sd}, None, None,
               ["took nested key 'module'"]),
    "ema": ("ema.pt", lambda sd, o: {"ema": sd, "decay": 0.999}, None, None,
            ["took nested key 'ema'"]),
    "state_dict_ema": (
        "timm.pth.tar", lambda sd, o: {"state_dict": o, "state_dict_ema": sd, "epoch": 5},
        None, None, ["took nested key 'state_dict_ema'", "also present: state_dict"],
    ),
    "model_ema": ("model_ema.pth", lambda sd, o: {"model": o, "model_ema": sd}, None, None,
                  ["took nested key 'model_ema'"]),
    "dataparallel": ("dp.pt", lambda sd, o: prefixed("module.", sd), None, None,
                     ["stripped prefix 'module.' from all 122 keys (DataParallel/DDP)"]),
    "compiled": ("compiled.pt", lambda sd, o: prefixed("_orig_mod.", sd), None, None,
                 ["stripped prefix '_orig_mod.' from all 122 keys (torch.compile)"]),
    "ddp_compiled": (
        "ddp_compiled.pt", lambda sd, o: prefixed("module._orig_mod.", sd), None, None,
        ["stripped prefix 'module.' from all 122 keys", "stripped prefix '_orig_mod.' from all"],
    ),
    "user_key_dotted": (
        "runs.pt", lambda sd, o: {"runs": {"best": sd, "last": o}, "note": "two runs"},
        "runs.best", None, ["took nested key 'runs.best'"],
    ),
    "user_key_not_ema": (
        "timm_key.pt", lambda sd, o: {"state_dict": sd, "state_dict_ema": o}, "state_dict",
        None, ["took nested key 'state_dict' (checkpoint.key)"],
    ),
    "user_prefix": ("backbone.pt", lambda sd, o: prefixed("backbone.", sd), None, "backbone.",
                    ["stripped prefix 'backbone.' from all 122 keys (checkpoint.prefix)"]),
    "user_prefix_no_dot": ("backbone2.pt", lambda sd, o: prefixed("backbone.", sd), None,
                           "backbone", ["stripped prefix 'backbone.' from all 122 keys"]),
    "legacy_format": ("legacy.pth", "legacy", None, None, []),
    "safetensors": ("weights.safetensors", "safetensors", None, None, []),
    "safetensors_as_bin": ("pytorch_model.bin", "safetensors", None, None, []),
    "safetensors_prefixed": ("prefixed.safetensors", "safetensors:module.", None, None,
                             ["stripped prefix 'module.' from all 122 keys"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd, other) -> dict[str, Path]:
    """Every wrapper and format of WRAPPERS, saved once for the module."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, (file, make, *_rest) in WRAPPERS.items():
        path = folder / file
        if make == "legacy":
            torch.save(sd, path, _use_new_zipfile_serialization=False)
        elif isinstance(make, str):
            prefix = make.partition(":")[2]
            save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(make(sd, other), path)
        out[name] = path
    return out


# --------------------------------------------------------------------------- wrappers, formats


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_every_wrapper_and_format_loads_the_original_values(name, files, sd):
    _, _, key, prefix, texts = WRAPPERS[name]
    ckpt = read_checkpoint(files[name], key=key, prefix=prefix)
    assert sorted(ckpt.tensors) == sorted(sd)  # safetensors headers list keys sorted
    for text in texts:
        assert any(text in step for step in ckpt.steps), (text, ckpt.steps)
    if not texts:
        assert ckpt.steps == []
    model = meta_resnet18()
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True)
    assert fit.loaded == list(sd) and not (fit.missing or fit.unexpected or fit.skipped)
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("nothing should be rebuilt"))
    assert no_meta(model)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_zip_and_legacy_torch_files_load_on_the_cpu_with_their_values(files, sd):
    zipped = read_checkpoint(files["plain"]).tensors["layer1.0.conv1.weight"]
    legacy = read_checkpoint(files["legacy_format"]).tensors["layer1.0.conv1.weight"]
    assert zipped.device.type == "cpu" and legacy.device.type == "cpu"
    assert torch.equal(zipped, sd["layer1.0.conv1.weight"])
    assert torch.equal(legacy, sd["layer1.0.conv1.weight"])


def test_safetensors_names_shapes_and_dtypes_come_from_the_header_only(tmp_path, monkeypatch):
    import safetensors

    data = {"a.weight": torch.randn(3, 4), "a.half": torch.randn(2).to(torch.bfloat16),
            "b.count": torch.tensor(7), "c.mask": torch.tensor([True, False])}
    path = tmp_path / "w.safetensors"
    save_file(data, str(path))
    real, reads = safetensors.safe_open, []

    class Spy:
        """safe_open that records every tensor read."""

        def __init__(self, *args, **kwargs):
            self._f = real(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self._f.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self._f, attr)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    ckpt = read_checkpoint(path)
    assert reads == []
    assert all(t.is_meta for t in ckpt.tensors.values())
    assert {k: (tuple(t.shape), t.dtype) for k, t in ckpt.tensors.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in data.items()}
    got = load_tensors(ckpt, ["a.weight", "b.count"])
    assert reads == ["a.weight", "b.count"]
    assert torch.equal(got["a.weight"], data["a.weight"]) and got["b.count"].item() == 7


def test_a_torch_file_named_safetensors_is_reported_as_such(tmp_path, files):
    path = tmp_path / "misnamed.safetensors"
    path.write_bytes(files["plain"].read_bytes())
    msg = error(path)
    assert "is not a safetensors file: it looks like a torch.save file" in msg
    assert "rename a torch file to .pt" in msg


def test_non_tensor_entries_inside_the_weights_are_ignored_and_logged(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"state_dict": {"w": torch.ones(2), "b": torch.zeros(2), "version": 3}}, path)
    ckpt = read_checkpoint(path)
    assert list(ckpt.tensors) == ["w", "b"]
    assert any("ignored 1 non-tensor entries (version)" in s for s in ckpt.steps)


def test_model_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"model.w": torch.ones(1), "criterion.weight": torch.ones(1)}, path)
    ckpt = read_checkpoint(path)
    assert list(ckpt.tensors) == ["model.w", "criterion.weight"] and ckpt.steps == []


def test_user_prefix_is_stripped_where_present_and_others_kept(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"backbone.a": torch.ones(1), "backbone.b": torch.ones(1), "head.w": torch.ones(1)},
               path)
    ckpt = read_checkpoint(path, prefix="backbone.")
    assert list(ckpt.tensors) == ["a", "b", "head.w"]
    assert ckpt.steps == ["stripped prefix 'backbone.' from 2 of 3 keys (checkpoint.prefix) "
                          "(1 keys without it kept as they are, outside the model unless it "
                          "has them: head.w)"]
    assert ckpt.outside == ["head.w"]


def test_averaged_model_counter_is_dropped(tmp_path, sd):
    path = tmp_path / "swa.pt"
    torch.save({"n_averaged": torch.tensor(4), **prefixed("module.", sd)}, path)
    ckpt = read_checkpoint(path)
    assert list(ckpt.tensors) == list(sd)
    assert ckpt.steps[0].startswith("dropped 'n_averaged'")


# --------------------------------------------------------------------------- check_fit


@pytest.fixture(scope="module")
def r18() -> dict[str, tuple[int, ...]]:
    return shapes(meta_resnet18().state_dict())


@pytest.fixture(scope="module")
def r18_binary() -> dict[str, tuple[int, ...]]:
    return shapes(meta_resnet18(num_classes=1).state_dict())


def test_exact_fit(r18):
    fit = check_fit(r18, r18, strict=True)
    assert fit == Fit(list(r18), [], [], [], [])


def test_head_size_mismatch_under_strict_names_both_shapes_and_the_fix(r18, r18_binary):
    with pytest.raises(FinetunePrepError) as err:
        check_fit(r18, r18_binary, strict=True, source="checkpoint.path=x.pt")
    msg = str(err.value)
    assert msg.startswith("checkpoint.path=x.pt")
    assert "the checkpoint's head has 1000 outputs, the model's has 1" in msg
    assert "[1000, 512]" in msg and "[1, 512]" in msg
    assert "checkpoint.exclude_head=true" in msg and "checkpoint.strict=false" in msg


def test_head_size_mismatch_without_strict_is_a_skipped_key_with_both_shapes(r18, r18_binary):
    fit = check_fit(r18, r18_binary, strict=False)
    assert fit.skipped == [("fc.weight", (1000, 512), (1, 512)), ("fc.bias", (1000,), (1,))]
    assert len(fit.loaded) == 120 and not fit.missing and not fit.unexpected


def test_exclude_head_leaves_it_out_of_missing_and_skipped(r18, r18_binary):
    fit = check_fit(r18, r18_binary, strict=True, exclude=("fc",))
    assert fit.excluded == ["fc.weight", "fc.bias"]
    assert len(fit.loaded) == 120 and fit.missing == fit.unexpected == fit.skipped == []
    without_head = {k: v for k, v in r18.items() if not k.startswith("fc.")}
    assert check_fit(without_head, r18_binary, strict=True, exclude=["fc"]).missing == []


def test_exclude_respects_the_dot_boundary():
    model = {"fc.weight": (2, 3), "fc2.weight": (4, 3), "fc.sub.bias": (2,)}
    fit = check_fit({"fc2.weight": (4, 3)}, model, strict=True, exclude=("fc",))
    assert fit.excluded == ["fc.weight", "fc.sub.bias"] and fit.loaded == ["fc2.weight"]
    with pytest.raises(FinetunePrepError, match="fc2.weight"):
        check_fit({"x": (1,), "fc.weight": (2, 3)}, model, strict=True, exclude=("fc",))


def test_wrong_architecture_does_not_look_made_for_this_model(r18):
    with torch.device("meta"):
        r50 = shapes(torchvision.models.resnet50(weights=None).state_dict())
    with pytest.raises(FinetunePrepError) as err:
        check_fit(r50, r18, strict=True, source="checkpoint.path=r50.pt")
    msg = str(err.value)
    assert "this checkpoint does not look like it was made for this model" in msg
    assert "layer1.0.conv1.weight: checkpoint [64, 64, 1, 1], model [64, 64, 3, 3]" in msg
    assert "model.arch" in msg and len(msg.splitlines()) <= 3
    fit = check_fit(r50, r18, strict=False)  # not strict: load what fits, report the rest
    assert (len(fit.loaded), len(fit.skipped), len(fit.unexpected)) == (98, 24, 198)


def test_missing_and_unexpected_keys_are_grouped_by_prefix(r18):
    ckpt = {k: v for k, v in r18.items() if not k.startswith("layer4.1.")}
    ckpt["aux.0.weight"] = ckpt["aux.1.weight"] = (3,)
    with pytest.raises(FinetunePrepError) as err:
        check_fit(ckpt, r18, strict=True, source="checkpoint.path=x.pt")
    msg = str(err.value)
    assert "checkpoint.path=x.pt does not fit the model (checkpoint.strict=true): 110 keys fit, " \
           "12 missing, 2 unexpected, 0 with a different shape." in msg
    assert "  layer4.1.{conv1,conv2}.weight" in msg
    assert ("  layer4.1.{bn1,bn2}.{weight,bias,running_mean,running_var,num_batches_tracked}"
            in msg)
    assert "  aux.{0,1}.weight" in msg and "checkpoint.strict=false" in msg
    assert len(msg.splitlines()) < 12


def test_no_key_matches_shows_examples_and_suggests_the_prefix(r18):
    with pytest.raises(FinetunePrepError) as err:
        check_fit({"encoder." + k: v for k, v in r18.items()}, r18, strict=False)
    msg = str(err.value)
    assert "no checkpoint key matches the model" in msg
    assert "encoder.conv1.weight, encoder.bn1.weight, encoder.bn1.bias" in msg
    assert "conv1.weight, bn1.weight, bn1.bias" in msg
    assert "checkpoint.prefix=encoder." in msg
    with pytest.raises(FinetunePrepError, match="checkpoint.key or checkpoint.prefix"):
        check_fit({"foo": (1,), "bar.baz": (2,)}, r18, strict=True)


def test_nothing_to_load_is_an_error_even_without_strict(r18_binary):
    only_head = {"fc.weight": (1000, 512), "fc.bias": (1000,)}
    with pytest.raises(FinetunePrepError, match="nothing would be loaded"):
        check_fit(only_head, r18_binary, strict=False)


def test_old_checkpoints_without_num_batches_tracked_pass_strict(r18):
    old = {k: v for k, v in r18.items() if not k.endswith("num_batches_tracked")}
    fit = check_fit(old, r18, strict=True)
    assert len(fit.missing) == 20 and all(k.endswith("num_batches_tracked") for k in fit.missing)


# --------------------------------------------------------------------------- group_keys


def test_group_keys_compacts_exactly():
    keys = ["layer4.0.bn2.running_mean", "layer4.0.bn2.running_var", "layer4.1.bn2.running_mean",
            "layer4.1.bn2.running_var", "layer4.1.conv1.weight", "layer4.1.bn1.weight", "fc.bias"]
    assert group_keys(keys) == ["layer4.{0,1}.bn2.{running_mean,running_var}",
                                "layer4.1.{conv1,bn1}.weight", "fc.bias"]


def test_group_keys_compresses_runs_and_caps_the_lines():
    blocks = [f"blocks.{i}.attn.qkv.weight" for i in range(12)]
    assert group_keys(blocks) == ["blocks.{0..11}.attn.qkv.weight"]
    assert group_keys(["a.1.w", "a.2.w", "a.5.w"]) == ["a.{1,2,5}.w"]
    layers = [f"encoder.layers.encoder_layer_{i}.ln_{j}.weight" for i in range(32) for j in (1, 2)]
    assert group_keys(layers) == ["encoder.layers.encoder_layer_{0..31}.{ln_1,ln_2}.weight"]
    many = [f"m{i}.w{i}" for i in range(20)]
    assert group_keys(many, limit=3) == ["m0.w0", "m1.w1", "m2.w2", "... and 17 more keys"]
    assert group_keys([]) == []


def expand(pattern: str) -> set[str]:
    """The keys a group_keys line stands for."""
    parts = []
    for part in re.split(r"\.(?![^{]*\})", pattern):  # dots outside braces
        stem, brace, body = part.partition("{")
        options = body[:-1].split(",") if brace else [""]
        flat = []
        for o in options:
            a, sep, b = o.partition("..")
            flat += [stem + str(i) for i in range(int(a), int(b) + 1)] if sep else [stem + o]
        parts.append(flat)
    return {".".join(p) for p in itertools.product(*parts)}


PARTS = ["a", "bn1", "bn2", "bn10", "0", "1", "2", "3", "01", "w"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PARTS), min_size=1, max_size=4).map(".".join),
                max_size=40))
def test_group_keys_stands_for_exactly_its_input(keys):
    lines = group_keys(keys, limit=10_000)
    expanded = [expand(line) for line in lines]
    assert set().union(*expanded) == set(keys)
    assert sum(map(len, expanded)) == len(set(keys))  # no key in two lines


def test_group_keys_keeps_a_whole_model_short(r18):
    assert len(group_keys(r18)) <= 8


# --------------------------------------------------------------------------- load_into


def test_meta_model_gets_the_backbone_and_a_fresh_random_head(files, sd):
    ckpt = read_checkpoint(files["lightning"])
    model = meta_resnet18(num_classes=10)
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True,
                    exclude=("fc",))
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("a Linear head needs no rebuild"))
    assert no_meta(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], sd[k]) for k in fit.loaded)
    head = model.fc.weight
    assert head.shape == (10, 512) and head.requires_grad
    assert torch.isfinite(head).all() and head.std() > 0 and head.abs().max() <= 1 / 512**0.5
    assert not torch.equal(model.fc.bias, torch.zeros(10))


def test_skipped_norm_layer_is_reset_to_its_defaults(sd, tmp_path):
    path = tmp_path / "nobn.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4.1.bn2.")}, path)
    ckpt = read_checkpoint(path)
    model = meta_resnet18()
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=False)
    assert len(fit.missing) == 5
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("BatchNorm resets itself"))
    bn = model.layer4[1].bn2
    assert no_meta(model) and torch.equal(bn.weight, torch.ones(512))
    assert torch.equal(bn.running_var, torch.ones(512)) and bn.num_batches_tracked.item() == 0


class Net(nn.Module):
    """A backbone plus tensors no leaf module owns, and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.full((3,), 2.0))
        self.register_buffer("pos", torch.arange(3.0))
        self.register_buffer("mask", torch.ones(2), persistent=False)


def test_tensors_without_a_reset_come_from_one_rebuild(tmp_path):
    path = tmp_path / "net.pt"
    source = Net()
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("backbone.")}, path)
    with torch.device("meta"):
        model = Net()
    calls = []

    def rebuild() -> nn.Module:
        calls.append(1)
        return Net()

    ckpt = read_checkpoint(path)
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=False)
    assert fit.missing == ["scale", "pos"]
    load_into(model, ckpt, fit, rebuild)
    assert calls == [1] and no_meta(model)
    assert torch.equal(model.backbone.weight, source.backbone.weight)
    assert torch.equal(model.scale, torch.full((3,), 2.0)) and isinstance(model.scale, nn.Parameter)
    assert torch.equal(model.pos, torch.arange(3.0)) and torch.equal(model.mask, torch.ones(2))


class HalfReset(nn.Module):
    """A leaf whose reset_parameters forgets its buffer: the buffer must come from rebuild()."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3))
        self.register_buffer("table", torch.arange(4.0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def test_a_reset_that_leaves_tensors_unset_falls_back_to_rebuild(tmp_path):
    path = tmp_path / "lin.pt"
    torch.save({"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}, path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), HalfReset())
    calls = []

    def rebuild() -> nn.Module:
        calls.append(1)
        return nn.Sequential(nn.Linear(2, 2), HalfReset())

    ckpt = read_checkpoint(path)
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=False)
    load_into(model, ckpt, fit, rebuild)
    assert calls == [1] and no_meta(model)
    assert torch.equal(model[1].table, torch.arange(4.0)) and torch.equal(model[1].weight,
                                                                          torch.ones(3))


def test_missing_num_batches_tracked_is_zeroed_without_a_rebuild(tmp_path, sd):
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    model = meta_resnet18()
    ckpt = read_checkpoint(path)
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True)
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("no rebuild for a counter"))
    assert no_meta(model) and model.bn1.num_batches_tracked.item() == 0
    assert torch.equal(model.bn1.running_var, sd["bn1.running_var"])


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_stay_tied(tmp_path):
    path = tmp_path / "tied.safetensors"
    source = Tied()
    save_file({"emb.weight": source.emb.weight.detach().clone()}, str(path))
    with torch.device("meta"):
        model = Tied()
    ckpt = read_checkpoint(path)
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=False)
    assert fit.loaded == ["emb.weight"] and fit.missing == ["out.weight"]
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("tied weight was loaded"))
    assert model.out.weight is model.emb.weight and no_meta(model)
    assert torch.equal(model.emb.weight, source.emb.weight)
    assert len(list(model.parameters())) == 1


def test_cpu_model_is_loaded_in_place(files, sd):
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    before = model.conv1.weight
    ckpt = read_checkpoint(files["safetensors"])
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True, exclude=["fc"])
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("no rebuild on CPU"))
    assert model.conv1.weight is before and torch.equal(before, sd["conv1.weight"])


def test_half_precision_checkpoint_is_cast_to_the_model_dtype(tmp_path, sd):
    path = tmp_path / "half.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
              str(path))
    model = meta_resnet18()
    ckpt = read_checkpoint(path)
    assert ckpt.tensors["conv1.weight"].dtype == torch.float16
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True)
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("nothing to rebuild"))
    assert model.conv1.weight.dtype == torch.float32
    assert torch.equal(model.conv1.weight, sd["conv1.weight"].half().float())


# --------------------------------------------------------------------------- errors


def error(path, **kwargs) -> str:
    with pytest.raises(FinetunePrepError) as err:
        read_checkpoint(path, **kwargs)
    return str(err.value)


def test_missing_path(tmp_path):
    (tmp_path / "resnet18.pth").write_bytes(b"x")
    msg = error(tmp_path / "resnet18.pt")
    assert f"checkpoint.path={tmp_path / 'resnet18.pt'} does not exist" in msg
    assert "Did you mean: resnet18.pth?" in msg
    assert "does not exist either" in error(tmp_path / "nowhere" / "w.pt")


def test_directory_lists_the_weight_files_in_it(tmp_path):
    (tmp_path / "best.safetensors").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    msg = error(tmp_path)
    assert "is a directory" in msg and "best.safetensors" in msg and "config.json" not in msg


def test_unreadable_file(tmp_path, monkeypatch, files):
    path = tmp_path / "locked.pt"
    path.write_bytes(files["plain"].read_bytes()[:64])
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the refusal

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(ckpt_read.integrity, "open_regular", refuse)
    msg = error(path)
    assert "cannot be read (permission denied)" in msg and "chmod" in msg


@pytest.mark.parametrize("name", ["plain", "legacy_format"])
def test_truncated_torch_file(name, files, tmp_path):
    data = files[name].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    msg = error(path)
    assert "is truncated or corrupt" in msg and "save it again" in msg


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "data.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    assert "is a zip archive but not a torch checkpoint" in error(tmp_path / "data.pt")


@pytest.mark.parametrize(("content", "looks"), [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200), "looks like a JPEG image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "looks like a PNG image"),
    (b"epoch,loss\n1,0.5\n", "looks like a text file (it starts with 'epoch,loss')"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 46830571\n",
     "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "an HTML page"),
    (bytes(range(1, 200)) * 2, "its first bytes match no known format"),
])
def test_not_a_checkpoint_says_what_it_looks_like(content, looks, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    msg = error(path)
    assert "is not a checkpoint" in msg and looks in msg and ".safetensors" in msg


def test_plain_pickle_that_is_not_a_torch_file(tmp_path):
    import pickle

    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    assert "is a Python pickle but not a plain torch weights file" in error(path)


def test_corrupt_safetensors_header(files, tmp_path):
    data = files["safetensors"].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"{" + b"#" * (n - 1) + data[8 + n:])
    msg = error(bad)
    assert "has a corrupt safetensors header" in msg and "download or save it again" in msg
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + n + 100])
    assert "corrupt safetensors header" in error(cut)
    jpeg = tmp_path / "photo.safetensors"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    assert "is not a safetensors file: it looks like a JPEG image" in error(jpeg)


class RunsCode:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, how: str, marker: Path) -> None:
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(how, legacy, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.ones(2)}, "extra": RunsCode(how, marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    msg = error(path)
    assert not marker.exists()
    assert "is not a plain weights file" in msg
    assert "unpickling it would run code or reference non-tensor globals" in msg
    assert re.search(r"torch says: '.*(system|open)", msg)
    assert "Nothing in it was run: finetune_prep never imports or calls" in msg
    assert "Traceback" not in msg and len(msg) < 700


def test_whole_pickled_model_is_refused_with_the_state_dict_fix(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    msg = error(path)
    assert "torch.nn.modules.container.Sequential" in msg
    assert "whole pickled model" in msg and "torch.save(model.state_dict(), path)" in msg


def test_key_not_found_lists_the_top_level_keys(files):
    msg = error(files["lightning"], key="model_state_dict")
    assert "checkpoint.key=model_state_dict not found" in msg
    assert "its top-level keys are: epoch (int), global_step (int)" in msg
    assert "state_dict (dict of 122 tensors)" in msg
    msg = error(files["user_key_dotted"], key="runs.bset")
    assert "under 'runs' the keys are: best (dict of 122 tensors), last (dict of 122" in msg


def test_key_that_holds_no_dict(files):
    msg = error(files["lightning"], key="epoch")
    assert "checkpoint.key=epoch holds an int, not a dict of tensors" in msg


def test_no_tensors_anywhere_lists_keys_and_where_weights_hide(tmp_path, sd):
    path = tmp_path / "hidden.pt"
    torch.save({"epoch": 1, "nets": {"student": sd, "lr": 0.1}}, path)
    msg = error(path)
    assert "holds no tensors: its top-level keys are: epoch (int), nets (dict of 2 entries)" in msg
    assert "nets.student (122 tensors)" in msg and "checkpoint.key" in msg
    assert list(read_checkpoint(path, key="nets.student").tensors) == list(sd)
    path2 = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path2)
    assert "holds a tensor [3], not a dict of named tensors" in error(path2)


def test_user_prefix_that_matches_nothing(files):
    msg = error(files["plain"], prefix="backbone.")
    assert "checkpoint.prefix=backbone. matches no key" in msg
    assert "conv1.weight, bn1.weight, bn1.bias" in msg


def test_checkpoint_dataclass_shape(files):
    ckpt = read_checkpoint(str(files["plain"]))
    assert isinstance(ckpt, Checkpoint) and ckpt.path == str(files["plain"])
    assert isinstance(ckpt.steps, list)
