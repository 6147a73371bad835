"""Checkpoints that real frameworks write (timm, Lightning, Hugging Face shards, DCP), damaged
files, and pickles that try to run code. Every file is written by the real library here."""

from __future__ import annotations

import argparse
import enum
import functools
import io
import os
import pickle
import struct
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune_prep.checkpoint import (
    check_fit,
    fit_prefixes,
    load_into,
    read_checkpoint,
    safe_unpickle,
)
from finetune_prep.errors import FinetunePrepError


def error(path, **kwargs) -> str:
    with pytest.raises(FinetunePrepError) as err:
        read_checkpoint(path, **kwargs)
    return str(err.value)


def shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def fit_and_load(ckpt, model: nn.Module, strict: bool = True) -> nn.Module:
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=strict)
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("nothing should be rebuilt"))
    return model


def same(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return set(got) == set(reference) and all(torch.equal(got[k], v) for k, v in reference.items())


# --------------------------------------------------------------------------- timm, Lightning


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """timm's CheckpointSaver with `args` and a ModelEma, as train.py uses it."""
    timm = pytest.importorskip("timm")
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():  # the EMA must differ from the model, to see which one is taken
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=2, data_dir=Path("/data"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=0.5)
    return folder, model, ema.module


def test_timm_checkpoint_with_args_and_ema_is_read_without_running_it(timm_run):
    import timm

    folder, model, ema = timm_run
    path = folder / "last.pth.tar"
    with pytest.raises(pickle.UnpicklingError):  # what torch's own safe loader says
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert any("ignored non-tensor entries: args (argparse.Namespace, pathlib.PosixPath)" in s
               for s in ckpt.steps), ckpt.steps
    assert any("took nested key 'state_dict_ema'" in s for s in ckpt.steps)
    with torch.device("meta"):
        target = timm.create_model("resnet18", pretrained=False, num_classes=10)
    fit_and_load(ckpt, target)
    assert same(target, ema.state_dict()) and not same(target, model.state_dict())
    msg = error(path, key="model_state")
    assert "args (argparse.Namespace, not loaded)" in msg and "state_dict_ema (dict of" in msg
    plain = read_checkpoint(folder / "model_best.pth.tar", key="state_dict")
    assert all(torch.equal(plain.tensors[k], v) for k, v in model.state_dict().items())


class Mode(enum.Enum):  # an enum in hyper_parameters (module level, so it pickles by name)
    FAST = "fast"


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A Lightning Trainer checkpoint (max_steps=1 on CPU) of a module whose hyper_parameters
    hold a functools.partial, a DictConfig, a path and an enum, with a loss that has state."""
    L = pytest.importorskip("lightning")
    import torchvision
    from omegaconf import OmegaConf

    class Module(L.LightningModule):
        def __init__(self, optimizer, cfg, data_dir, mode):
            super().__init__()
            self.save_hyperparameters()
            self.model = torchvision.models.resnet18(weights=None, num_classes=1)
            self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))

        def training_step(self, batch, index):
            x, y = batch
            return self.loss_fn(self.model(x).squeeze(1), y)

        def configure_optimizers(self):
            return self.hparams.optimizer(self.parameters())

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lightning")
    module = Module(functools.partial(torch.optim.SGD, lr=0.1),
                    OmegaConf.create({"lr": 0.1, "layers": [1, 2]}), Path("/data"), Mode.FAST)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.rand(4))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(folder))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt", module


def test_lightning_checkpoint_with_partial_and_dictconfig_is_read(lightning_ckpt):
    path, module = lightning_ckpt
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path, prefix="model.")
    notes = " ".join(ckpt.steps)
    assert "ignored non-tensor entries: hyper_parameters (" in notes
    assert "functools.partial" in notes and "omegaconf.dictconfig.DictConfig" in notes
    expected = module.model.state_dict()
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in expected.items())


def test_numpy_scalars_and_arrays_in_metadata_are_ignored_unread(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "stats.pt"
    weights = {"w": torch.arange(3.0), "b": torch.ones(1)}
    torch.save({"state_dict": weights, "stats": {"mean": np.array([0.5, 0.25]),
                                                 "best": np.float64(0.9), "n": np.int64(7)}},
               path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    note = next(s for s in ckpt.steps if "ignored non-tensor entries" in s)
    assert "stats (numpy." in note
    assert list(ckpt.tensors) == ["w", "b"] and torch.equal(ckpt.tensors["w"], weights["w"])


# --------------------------------------------------------------------------- malicious pickles


def touch(path: str) -> None:
    """What a payload would run: create the marker file."""
    Path(path).touch()


class Touches:
    """Creating, building or filling one of these creates the marker file."""

    def __new__(cls, *args):
        if args:
            touch(args[0])
        return super().__new__(cls)

    def __setstate__(self, state):
        touch(state["path"])


class TouchingList(list):
    def extend(self, items):
        touch(items[0])


class TouchingDict(dict):
    def __setitem__(self, key, value):
        touch(value)


def _str(text: str) -> bytes:
    """BINUNICODE (protocol 1+)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"


HERE = __name__


def routes(marker: str) -> dict[str, tuple[bytes, str | None]]:
    """Opcode snippets that each push one object, and would create `marker` if run.
    -> (bytes, the dangerous global the file is refused for, or None when it is read)."""
    cmd = f"touch {marker}"
    return {
        "GLOBAL os.system REDUCE": (_global("os", "system") + b"(" + _str(cmd) + b"tR",
                                    "os.system"),
        "GLOBAL posix.system REDUCE": (_global("posix", "system") + b"(" + _str(cmd) + b"tR",
                                       "posix.system"),
        "STACK_GLOBAL subprocess.call": (
            _stack_global("subprocess", "call") + b"(](" + _str("touch") + _str(marker)
            + b"etR", "subprocess.call"),
        "builtins.eval": (_global("builtins", "eval") + b"(" + _str(
            f"__import__('pathlib').Path({marker!r}).touch()") + b"tR", "builtins.eval"),
        "builtins.exec": (_global("builtins", "exec") + b"(" + _str(
            f"import pathlib; pathlib.Path({marker!r}).touch()") + b"tR", "builtins.exec"),
        "REDUCE": (_global(HERE, "touch") + b"(" + _str(marker) + b"tR", None),
        "NEWOBJ": (_global(HERE, "Touches") + b"(" + _str(marker) + b"t\x81", None),
        "NEWOBJ_EX": (_stack_global(HERE, "Touches") + b"(" + _str(marker) + b"t}\x92", None),
        "BUILD": (_global(HERE, "Touches") + b")\x81}(" + _str("path") + _str(marker) + b"ub",
                  None),
        "INST": (b"(" + _str(marker) + b"i" + HERE.encode() + b"\ntouch\n", None),
        "OBJ": (b"(" + _global(HERE, "Touches") + _str(marker) + b"o", None),
        "APPENDS": (_global(HERE, "TouchingList") + b")\x81(" + _str(marker) + b"e", None),
        "SETITEMS": (_global(HERE, "TouchingDict") + b")\x81(" + _str("k") + _str(marker)
                     + b"u", None),
    }


class Raw:
    """Bytes spliced into a pickle as they are (one object's worth of opcodes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def raw_pickle_module() -> types.SimpleNamespace:
    """A pickle module for torch.save that writes `Raw` objects' opcodes verbatim."""

    class Pickler(pickle._Pickler):
        def save(self, obj, save_persistent_id=True):
            if isinstance(obj, Raw):
                self.write(obj.data)
                return
            super().save(obj, save_persistent_id)

    return types.SimpleNamespace(__name__="raw_pickle", Pickler=Pickler, dump=pickle.dump)


def save_with(path: Path, payload, legacy: bool = False) -> Path:
    torch.save(payload, path, pickle_module=raw_pickle_module(),
               _use_new_zipfile_serialization=not legacy)
    return path


def live(snippet: bytes, marker: Path) -> bool:
    """True when the snippet does run code under the ordinary unpickler (so the test means
    something); the marker it made is removed."""
    try:
        pickle.loads(b"\x80\x04" + snippet + b".")
    except Exception:
        pass
    made = marker.exists()
    if made:
        marker.unlink()
    return made


ROUTES = list(routes("m"))
PLACES = ["top level", "inside the state dict", "inside skipped metadata"]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("route", ROUTES)
def test_malicious_route_never_runs(route, place, tmp_path):
    marker = tmp_path / "PWNED"
    snippet, refused_for = routes(str(marker))[route]
    assert live(snippet, marker), "the payload must run code under the ordinary unpickler"
    weights = {"w": torch.arange(4.0), "b": torch.ones(1), "c": torch.zeros(1)}
    if place == "top level":
        payload = {"state_dict": weights, "extra": Raw(snippet)}
    elif place == "inside the state dict":  # an OrderedDict: a global torch allows
        payload = {"state_dict": OrderedDict({**weights, "evil": Raw(snippet)})}
    else:  # BUILD state of a foreign object (an argparse.Namespace), as timm's `args`
        args = _global("argparse", "Namespace") + b")\x81}(" + _str("lr") + snippet + b"ub"
        payload = {"state_dict": weights, "args": Raw(args)}
    path = save_with(tmp_path / "evil.pth", payload)
    if refused_for:
        msg = error(path)
        assert "is not a plain weights file" in msg and refused_for in msg
        assert "Nothing in it was run" in msg
    else:
        ckpt = read_checkpoint(path)
        assert list(ckpt.tensors) == ["w", "b", "c"]
        assert torch.equal(ckpt.tensors["w"], torch.arange(4.0))
    assert not marker.exists()


def test_malicious_legacy_format_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    for route in ("GLOBAL os.system REDUCE", "REDUCE", "BUILD"):
        snippet, refused_for = routes(str(marker))[route]
        path = save_with(tmp_path / "evil.pth", {"w": torch.ones(2), "x": Raw(snippet)},
                         legacy=True)
        if refused_for:
            assert refused_for in error(path)
        else:
            assert list(read_checkpoint(path).tensors) == ["w"]
        assert not marker.exists()


def test_unpickler_never_resolves_a_dangerous_global(tmp_path):
    marker = tmp_path / "PWNED"
    snippet, _ = routes(str(marker))["GLOBAL os.system REDUCE"]
    record = safe_unpickle.Record()
    obj = safe_unpickle.loads(b"\x80\x02]" + _global("os", "system") + b"a" + snippet + b"a.",
                              record)
    assert isinstance(obj[0], safe_unpickle.Global) and obj[0] is not os.system
    assert isinstance(obj[1], safe_unpickle.Foreign) and obj[1].name == "os.system"
    assert obj[1].args == (f"touch {marker}",)
    assert record.dangerous == ["os.system"] and not marker.exists()


def test_allowlisted_function_is_not_called_with_a_record(tmp_path):
    """A tensor rebuild that gets a foreign object as an argument stays a record."""
    data = (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2")
            + b"(" + _global(HERE, "Touches") + b")\x81K\x00)))\x89NtR.")
    obj = safe_unpickle.loads(data)
    assert isinstance(obj, safe_unpickle.Foreign)
    assert obj.name == "torch._utils._rebuild_tensor_v2"


def test_whole_pickled_model_still_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    msg = error(path)
    assert "torch.nn.modules.container.Sequential" in msg and "whole pickled" in msg


def test_plain_pickle_of_another_protocol_is_not_taken_for_a_torch_file(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    assert "is a Python pickle but not a plain torch weights file" in error(path)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, pickle_protocol=4)
    (tmp_path / "p4.pt").write_bytes(buf.getvalue())
    assert torch.equal(read_checkpoint(tmp_path / "p4.pt").tensors["w"], torch.ones(3))


# --------------------------------------------------------------------------- shards, DCP


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def meta_resnet18() -> nn.Module:
    import torchvision

    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None)


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def hf_shards(request, tmp_path_factory, sd):
    """huggingface_hub.save_torch_state_dict output in 6 shards (max_shard_size 10MB)."""
    hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        hub.save_torch_state_dict(sd, str(folder), max_shard_size="10MB",
                                  safe_serialization=request.param == "safetensors")
    index = next(folder.glob("*.index.json"))
    return folder, index


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("via", ["index", "folder"])
def test_sharded_checkpoint_loads_every_tensor(hf_shards, sd, via):
    folder, index = hf_shards
    shards = sorted(p.name for p in folder.iterdir() if "-of-" in p.name)
    assert len(shards) == 6
    ckpt = read_checkpoint(index if via == "index" else folder)
    assert ckpt.path == str(index) and any("index of 6 shards" in s for s in ckpt.steps)
    assert sorted(ckpt.tensors) == sorted(sd)
    assert sorted(ckpt.files) == sorted(str(folder / s) for s in shards)  # each watched
    model = fit_and_load(ckpt, meta_resnet18())
    assert same(model, sd)


@pytest.mark.parametrize("hf_shards", ["safetensors"], indirect=True)
def test_sharded_safetensors_verification_reads_headers_and_loading_reads_each_shard_once(
        hf_shards, sd, monkeypatch):
    import safetensors

    folder, index = hf_shards
    assert index.name == "model.safetensors.index.json"
    real, opened, reads = safetensors.safe_open, [], []

    class Spy:
        def __init__(self, file, framework, device="cpu"):
            opened.append((Path(file).name, device))
            self.inner = real(file, framework=framework, device=device)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, k):
            return self.f.get_slice(k)

        def get_tensor(self, k):
            reads.append(k)
            return self.f.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    ckpt = read_checkpoint(index)
    assert reads == [] and len(opened) == 6 and all(t.is_meta for t in ckpt.tensors.values())
    opened.clear()
    model = fit_and_load(ckpt, meta_resnet18())
    assert sorted(name for name, _ in opened) == sorted({name for name, _ in opened})  # once
    assert len(opened) == 6 and sorted(reads) == sorted(sd) and same(model, sd)


def test_missing_shard_is_named(hf_shards, tmp_path):
    folder = copy_folder(hf_shards[0], tmp_path / "copy")
    victim = sorted(folder.glob("*-00003-of-00006.*"))[0]
    victim.unlink()
    msg = error(folder)
    assert f"shard {victim.name} is missing" in msg


def test_extra_shard_the_index_does_not_list_is_named(hf_shards, tmp_path):
    import json

    folder = copy_folder(hf_shards[0], tmp_path / "copy")
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    last = sorted(set(data["weight_map"].values()))[-1]
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != last}
    index.write_text(json.dumps(data))
    msg = error(index)
    assert f"{last} in {folder} looks like a shard of this checkpoint but the index does not " \
           "list it" in msg


def test_tensor_in_the_wrong_shard_is_named(hf_shards, tmp_path):
    import json

    folder = copy_folder(hf_shards[0], tmp_path / "copy")
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    data["weight_map"]["fc.bias"] = shards[0] if data["weight_map"]["fc.bias"] != shards[0] \
        else shards[1]
    index.write_text(json.dumps(data))
    assert "that it does not hold (e.g. fc.bias)" in error(index)


def test_one_shard_alone_is_refused_with_the_index_named(hf_shards):
    folder, index = hf_shards
    shard = sorted(p for p in folder.iterdir() if "-of-" in p.name)[0]
    msg = error(shard)
    assert "is one shard of a sharded checkpoint" in msg and str(index) in msg


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory, sd):
    """torch.distributed.checkpoint.save of {"model": state dict, "step": 3}, one process."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("dcp") / "step_3"
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        dcp.save({"model": sd, "step": 3}, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_dcp_folder_verifies_from_metadata_and_loads_through_torch(dcp_folder, sd, monkeypatch):
    import torch.distributed.checkpoint as dcp

    def no_data(*args, **kwargs):
        raise AssertionError("verification must not read tensor data")

    with monkeypatch.context() as m:
        m.setattr(dcp.FileSystemReader, "read_data", no_data)
        m.setattr(pickle, "load", no_data)  # torch's own read_metadata would pickle.load
        ckpt = read_checkpoint(dcp_folder)
    assert ckpt.format == "dcp" and any("took nested key 'model'" in s for s in ckpt.steps)
    assert str(dcp_folder / ".metadata") in ckpt.files  # watched for changes too
    assert sorted(ckpt.tensors) == sorted(sd) and all(t.is_meta for t in ckpt.tensors.values())
    assert shapes(ckpt.tensors) == shapes(sd)
    assert same(fit_and_load(ckpt, meta_resnet18()), sd)


def test_dcp_with_lightning_style_prefix_unwraps(tmp_path, sd):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        dcp.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}},
                 checkpoint_id=str(folder), no_dist=True)
    ckpt = read_checkpoint(folder)
    assert any("stripped prefix 'model.'" in s for s in ckpt.steps)
    assert same(fit_and_load(ckpt, meta_resnet18()), sd)


def test_dcp_data_file_alone_is_recognised(dcp_folder):
    shard = next(dcp_folder.glob("*.distcp"))
    msg = error(shard)
    assert "is one data file of a torch.distributed.checkpoint (DCP) folder" in msg
    assert f"checkpoint.path={dcp_folder}" in msg


def test_dcp_missing_or_truncated_data_file(dcp_folder, tmp_path):
    folder = copy_folder(dcp_folder, tmp_path / "copy")
    shard = next(folder.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    msg = error(folder)
    assert f"data file {shard.name} is truncated or corrupt" in msg
    shard.unlink()
    assert f"data file {shard.name} is missing" in error(folder)


def test_dcp_metadata_that_would_run_code_never_runs(dcp_folder, tmp_path):
    folder = copy_folder(dcp_folder, tmp_path / "copy")
    marker = tmp_path / "PWNED"
    snippet, _ = routes(str(marker))["GLOBAL os.system REDUCE"]
    (folder / ".metadata").write_bytes(b"\x80\x02" + snippet + b".")
    assert live(snippet, marker)
    msg = error(folder)
    assert ".metadata was refused because it names os.system" in msg and not marker.exists()
    (folder / ".metadata").write_bytes(b"\x80\x02}q\x00.")  # a dict, not DCP metadata
    assert ".metadata is truncated or corrupt" in error(folder)


# --------------------------------------------------------------------------- damaged files


def rewrite_zip(src: Path, dst: Path, change) -> Path:
    """Copy a torch zip file record by record, passing each record's bytes through `change`."""
    import zipfile

    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info, change(info.filename, old.read(info.filename)))
    return dst


def test_storage_record_shorter_than_its_tensor_is_corrupt_not_garbage(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"a": torch.arange(16.0), "w": torch.full((16,), 7.0)}, ok)
    short = rewrite_zip(ok, tmp_path / "short.pt",
                        lambda name, data: data[:16] if name.endswith("/data/1") else data)
    garbage = torch.load(short, mmap=True, weights_only=True)["w"]  # what torch alone gives
    assert not torch.equal(garbage, torch.full((16,), 7.0))
    msg = error(short)
    assert "is truncated or corrupt: tensor 'w' needs 64 bytes of storage record data/1, " \
           "which holds 16" in msg
    assert torch.equal(read_checkpoint(ok).tensors["w"], torch.full((16,), 7.0))


def test_corrupt_data_pkl_is_corrupt_not_a_refused_pickle(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(4)}, ok)

    def garble(name, data):
        return data[:2] + b"\xfe\xfd\xfc" + data[5:] if name.endswith("/data.pkl") else data

    msg = error(rewrite_zip(ok, tmp_path / "bad.pt", garble))
    assert "is truncated or corrupt" in msg and "its pickled data does not parse" in msg
    assert "not a plain weights file" not in msg


def test_file_rewritten_after_opening_is_detected_before_loading(tmp_path, sd):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    ckpt = read_checkpoint(path)
    save_file({k: v + 1 for k, v in sd.items() if v.is_floating_point()}, str(path))
    with pytest.raises(FinetunePrepError) as err:
        fit_and_load(ckpt, meta_resnet18(), strict=False)
    assert f"checkpoint.path={path} changed while it was being prepared" in str(err.value)
    assert "must not be rewritten while finetune_prep uses it" in str(err.value)


def test_file_replaced_by_another_is_detected(tmp_path, sd):
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    ckpt = read_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save(sd, other)
    os.replace(other, path)  # same size, another inode: an atomic re-save
    with pytest.raises(FinetunePrepError) as err:
        fit_and_load(ckpt, meta_resnet18())
    assert "replaced by another file" in str(err.value)


TRUNCATE_WHILE_MAPPED = """
import os, sys, torch, torchvision
from finetune_prep.checkpoint import check_fit, load_into, read_checkpoint
from finetune_prep.errors import FinetunePrepError
path = sys.argv[1]
torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
ckpt = read_checkpoint(path)
os.truncate(path, os.path.getsize(path) // 2)  # the file shrinks under the mapping
with torch.device("meta"):
    model = torchvision.models.resnet18(weights=None)
shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
fit = check_fit({k: tuple(v.shape) for k, v in ckpt.tensors.items()}, shapes, strict=True)
try:
    load_into(model, ckpt, fit, rebuild=lambda: None)
    print(sum(float(t.float().sum()) for t in model.state_dict().values()))  # touch every page
except FinetunePrepError as err:
    print(err)
    sys.exit(1)
"""


@pytest.mark.slow
def test_file_truncated_while_mapped_is_a_message_not_sigbus(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_MAPPED, str(tmp_path / "w.pt")],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])  # -7 would be SIGBUS
    assert "changed while it was being prepared (size" in done.stdout


def test_fifo_and_device_are_not_called_empty_files(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    msg = error(fifo)
    assert "is not a regular file but a named pipe (FIFO)" in msg and "empty" not in msg
    msg = error("/dev/null")
    assert "is not a regular file but a character device" in msg and "empty" not in msg


def test_symlink_loop_and_broken_link(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.symlink_to(b)
    b.symlink_to(a)
    msg = error(a)
    assert "is a symbolic link that loops" in msg and "Did you mean" not in msg
    c = tmp_path / "c.pt"
    c.symlink_to(tmp_path / "gone.pt")
    assert "is a broken symbolic link: it points to" in error(c)


def test_protocol_0_and_1_pickles_are_recognised_as_pickles(tmp_path):
    p0 = tmp_path / "p0.pkl"
    p0.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=0))
    assert "is a Python pickle but not a plain torch weights file" in error(p0)
    p1 = tmp_path / "p1.pt"
    torch.save({"w": torch.arange(3.0)}, p1, pickle_protocol=1,
               _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(p1).tensors["w"], torch.arange(3.0))


# --------------------------------------------------------------------------- dtype, extra state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_cast_is_logged_and_recorded(dtype, make_cfg, resnet18_ckpt,
                                                               tmp_path, caplog):
    import logging

    from finetune_prep import prepare

    full = torch.load(resnet18_ckpt, weights_only=True)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    n_float = sum(v.is_floating_point() for v in full.values())
    name = str(dtype).removeprefix("torch.")
    with caplog.at_level(logging.INFO, logger="finetune_prep"):
        prepared = prepare(make_cfg(f"checkpoint.path={path}", "verify.backward=false"))
    block = prepared.document["checkpoint"]
    assert block["dtypes"] == {name: n_float, "int64": len(full) - n_float}
    assert block["cast"] == {f"{name} -> float32": n_float}
    assert any(f"{n_float} {name} tensors (cast to the model's dtype" in s
               for s in block["unwrapped"])
    assert f"cast {n_float} tensors {name} -> float32" in caplog.text
    state = prepared.model.state_dict()
    assert state["fc.weight"].dtype == torch.float32
    assert torch.equal(state["fc.weight"], half["fc.weight"].float())


def test_float32_checkpoint_records_no_cast(make_cfg, resnet18_ckpt):
    from finetune_prep import prepare

    block = prepare(make_cfg(f"checkpoint.path={resnet18_ckpt}", "verify.backward=false"),
                    materialize=False).document["checkpoint"]
    assert block["cast"] == {} and set(block["dtypes"]) == {"float32", "int64"}


@pytest.mark.parametrize("prefix", [None, "model."])
def test_lightning_extra_state_is_outside_the_model_and_strict_load_passes(
        prefix, lightning_ckpt, make_cfg):
    from finetune_prep import prepare

    path, module = lightning_ckpt
    overrides = [f"checkpoint.path={path}", "verify.backward=false"]
    if prefix:
        overrides.append(f"checkpoint.prefix={prefix}")
    prepared = prepare(make_cfg(*overrides))  # checkpoint.strict=true by default
    block = prepared.document["checkpoint"]
    assert block["outside"] == ["loss_fn.pos_weight"] and block["unexpected"] == []
    assert block["loaded"] == len(module.model.state_dict())
    assert any("outside the model unless it has them: loss_fn.pos_weight" in s
               for s in block["unwrapped"])
    state = prepared.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in module.model.state_dict().items())


def test_keys_outside_the_prefix_that_the_model_has_are_loaded(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"backbone.weight": torch.ones(2, 2), "backbone.bias": torch.ones(2),
                "extra": torch.ones(1)}, path)
    ckpt = read_checkpoint(path, prefix="backbone.")
    fit = check_fit(shapes(ckpt.tensors), {"weight": (2, 2), "bias": (2,)}, strict=True,
                    outside=ckpt.outside)
    assert fit.outside == ["extra"] and fit.unexpected == []
    with pytest.raises(FinetunePrepError, match="1 unexpected"):
        check_fit(shapes(ckpt.tensors), {"weight": (2, 2), "bias": (2,)}, strict=True)


def test_prepare_loads_a_dcp_folder_and_records_its_format(dcp_folder, sd, make_cfg):
    from finetune_prep import prepare

    prepared = prepare(make_cfg(f"checkpoint.path={dcp_folder}", "head.num_outputs=1000",
                                "verify.backward=false"))
    assert prepared.document["checkpoint"]["format"] == "dcp"
    assert prepared.document["checkpoint"]["loaded"] == len(sd)
    state = prepared.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items())


def test_the_metadata_path_still_validates_sparse_indices(tmp_path):
    import argparse

    bad = torch.sparse_coo_tensor(torch.tensor([[0, 10**6]]), torch.tensor([1.0, 2.0]), (4,),
                                  check_invariants=False)
    path = tmp_path / "sparse.pt"
    torch.save({"state_dict": {"w": bad}, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(FinetunePrepError, match="size is 4 but found index 1000000"):
        read_checkpoint(path)


def test_a_deeply_nested_short_record_is_still_caught(tmp_path):
    import zipfile

    inner = {"a": torch.arange(16.0), "w": torch.full((16,), 7.0)}
    for i in range(22):
        inner = {"model": inner} if i % 2 else {"state_dict": inner}
    ok, short = tmp_path / "ok.pt", tmp_path / "short.pt"
    torch.save(inner, ok)
    with zipfile.ZipFile(ok) as old, zipfile.ZipFile(short, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            new.writestr(info, data[:16] if info.filename.endswith("/data/1") else data)
    with pytest.raises(FinetunePrepError, match=r"is truncated or corrupt: tensor '.*\.w' needs"):
        read_checkpoint(short)


# --------------------------------------------------------------------------- prefixes and names


class Owned(nn.Module):
    """A model whose only child is named like a wrapper attribute (ultralytics' `model`)."""

    def __init__(self, attr: str) -> None:
        super().__init__()
        layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
        setattr(self, attr, layers)


def load_own(model: nn.Module, path: Path) -> nn.Module:
    """Read `path` as the tool does (prefixes fitted to the model) and load it strictly."""
    target = shapes(model.state_dict())
    ckpt = fit_prefixes(read_checkpoint(path), target)
    return fit_and_load(ckpt, model)


@pytest.mark.parametrize("attr", ["model", "net", "network", "module", "_orig_mod"])
def test_the_models_own_state_dict_loads_when_its_child_is_named_like_a_wrapper(attr, tmp_path):
    torch.manual_seed(0)
    saved = Owned(attr)
    torch.save(saved.state_dict(), tmp_path / "own.pt")
    loaded = load_own(Owned(attr), tmp_path / "own.pt")
    assert same(loaded, saved.state_dict())


@pytest.mark.parametrize("attr", ["model", "net"])
def test_a_wrapped_save_of_such_a_model_still_strips_only_the_wrapper(attr, tmp_path):
    torch.manual_seed(0)
    saved = Owned(attr)
    wrapped = nn.DataParallel(saved)  # keys `module.<attr>.`: the wrapper goes, the name stays
    torch.save(wrapped.state_dict(), tmp_path / "dp.pt")
    ckpt = fit_prefixes(read_checkpoint(tmp_path / "dp.pt"), shapes(saved.state_dict()))
    assert set(ckpt.tensors) == set(saved.state_dict())
    assert any("put prefix" in s for s in ckpt.steps)
    assert same(fit_and_load(ckpt, Owned(attr)), saved.state_dict())


def test_a_lightning_style_model_prefix_is_still_stripped_for_a_bare_model(tmp_path):
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    torch.save({f"model.{k}": v for k, v in bare.state_dict().items()}, tmp_path / "m.pt")
    ckpt = fit_prefixes(read_checkpoint(tmp_path / "m.pt"), shapes(bare.state_dict()))
    assert set(ckpt.tensors) == set(bare.state_dict())
    assert not any("put prefix" in s for s in ckpt.steps)


NAMES = ["model", "net", "module", "_orig_mod", "network", "body", "0", "1", "head"]


def trees(depth: int):
    """Small nested module trees: a leaf layer, or a container of named children."""
    from hypothesis import strategies as st

    leaf = st.sampled_from(["linear", "bn", "conv"])
    if depth == 0:
        return leaf
    children = st.dictionaries(st.sampled_from(NAMES), trees(depth - 1), min_size=1, max_size=3)
    return st.one_of(leaf, children)


def build_tree(spec) -> nn.Module:
    if spec == "linear":
        return nn.Linear(2, 3)
    if spec == "bn":
        return nn.BatchNorm1d(3)
    if spec == "conv":
        return nn.Conv2d(1, 2, 1)
    module = nn.Module()
    for name, child in spec.items():
        module.add_module(name, build_tree(child))
    return module


def test_any_models_own_state_dict_fits_it_exactly(tmp_path):
    """Property: for random nested module trees, model.state_dict() saved and read back fits
    the same model exactly (no key missing, unexpected or renamed)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(spec=trees(3))
    def prop(spec):
        torch.manual_seed(0)
        model = build_tree(spec)
        sd = model.state_dict()
        hypothesis.assume(len(sd) > 0)
        path = tmp_path / "tree.pt"
        torch.save(sd, path)
        ckpt = fit_prefixes(read_checkpoint(path), shapes(sd))
        fit = check_fit(shapes(ckpt.tensors), shapes(sd), strict=True)
        assert sorted(fit.loaded) == sorted(sd) and not fit.unexpected and not fit.missing

    prop()


# --------------------------------------------------------------------------- FrozenBatchNorm2d


def test_batchnorm_checkpoint_loads_into_the_frozen_batchnorm_model(tmp_path):
    """torchvision's FrozenBatchNorm2d drops `num_batches_tracked` when loading: so does the fit."""
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    trained = resnet18(weights=None, num_classes=5)
    torch.save(trained.state_dict(), tmp_path / "bn.pt")
    frozen = resnet18(weights=None, num_classes=5, norm_layer=FrozenBatchNorm2d)
    frozen.load_state_dict(trained.state_dict())  # torchvision itself accepts it
    model = resnet18(weights=None, num_classes=5, norm_layer=FrozenBatchNorm2d)
    ckpt = read_checkpoint(tmp_path / "bn.pt")
    fit = check_fit(shapes(ckpt.tensors), shapes(model.state_dict()), strict=True)
    assert len(fit.dropped) == 20 and not fit.unexpected and not fit.outside
    load_into(model, ckpt, fit, rebuild=lambda: pytest.fail("nothing should be rebuilt"))
    assert same(model, frozen.state_dict())


def test_fasterrcnn_backbone_checkpoint_loads_into_its_frozen_batchnorm_backbone(tmp_path):
    """A detector built as torchvision builds it for pretrained backbones (FrozenBatchNorm2d)
    takes an ImageNet-trained BatchNorm resnet50 state dict for its backbone body."""
    import dataclasses

    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = resnet50(weights=None)  # BatchNorm2d with counters, as ImageNet training saves it
    torch.save(body.state_dict(), tmp_path / "r50.pt")
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    detector = FasterRCNN(backbone, num_classes=3)
    ckpt = read_checkpoint(tmp_path / "r50.pt")
    moved = {f"backbone.body.{k}": t for k, t in ckpt.tensors.items() if not k.startswith("fc.")}
    ckpt = dataclasses.replace(ckpt, tensors=moved)
    fit = check_fit(shapes(moved), shapes(detector.state_dict()), strict=False)
    assert not fit.unexpected and len(fit.dropped) == 53
    assert len(fit.loaded) == sum(k.startswith("backbone.body.") for k in detector.state_dict())
    load_into(detector, ckpt, fit, rebuild=lambda: pytest.fail("nothing should be rebuilt"))
    got = detector.backbone.body.state_dict()
    assert all(torch.equal(got[k], v) for k, v in body.state_dict().items() if k in got)


# --------------------------------------------------------------------------- what trainers write


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_torch_export_program_says_how_to_get_a_state_dict(tmp_path):
    program = torch.export.export(tiny(), (torch.randn(1, 4),))
    torch.export.save(program, tmp_path / "model.pt2")
    message = error(tmp_path / "model.pt2")
    assert "torch.export program" in message and "ep.state_dict" in message
    assert "corrupt" not in message


def test_optimizer_state_file_is_named_as_such(tmp_path):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    message = error(tmp_path / "optimizer.pt")
    assert "optimizer's state" in message and "model.state_dict()" in message


def test_accelerate_folder_with_several_models_asks_which(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(nn.Linear(2, 2), nn.Linear(3, 3))
    accelerator.save_state(str(tmp_path / "state"))
    message = error(tmp_path / "state")
    assert "2 models" in message and "model_1.safetensors" in message
    assert "Which one" in message
    one = read_checkpoint(tmp_path / "state" / "model_1.safetensors")
    assert shapes(one.tensors) == {"weight": (3, 3), "bias": (3,)}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """transformers' Trainer, a tiny BERT classifier, 2 steps saved at every step."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("trainer")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=8, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(i % 2)} for i in range(4)]
    args = transformers.TrainingArguments(
        str(folder), max_steps=2, save_steps=1, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    return folder


def test_trainer_output_root_names_the_latest_steps_model_file(trainer_run):
    message = error(trainer_run)
    latest = trainer_run / "checkpoint-2" / "model.safetensors"
    assert "Hugging Face Trainer" in message and f"checkpoint.path={latest}" in message
    assert read_checkpoint(trainer_run / "checkpoint-2").tensors  # a step folder is read


def test_a_latest_file_that_is_a_fifo_is_refused_not_waited_on(trainer_run):
    import signal

    os.mkfifo(trainer_run / "latest")  # DeepSpeed's tag file, planted as a named pipe
    signal.alarm(20)  # a blocking open would hang here: SIGALRM ends the test instead
    try:
        message = error(trainer_run)
    finally:
        signal.alarm(0)
    assert "its latest file is not a regular file but a named pipe (FIFO)" in message
    assert "copy the folder again" in message and "checkpoint file itself" not in message


class UltraNet(nn.Module):
    """Shaped like ultralytics' models: one child named `model`, every key starts with it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_prepare_loads_the_models_own_state_dict_when_its_child_is_named_model(tmp_path, caplog):
    import logging

    from finetune_prep.app.pipeline import prepare

    caplog.set_level(logging.INFO, logger="finetune_prep")
    torch.manual_seed(1)
    own = UltraNet()
    torch.save(own.state_dict(), tmp_path / "own.pt")
    cfg = {"model": {"source": "target", "input_size": [3, 16, 16],
                     "target": {"_target_": "test_checkpoint_formats.UltraNet"}},
           "head": {"num_outputs": 10},
           "checkpoint": {"path": str(tmp_path / "own.pt"), "strict": True},
           "verify": {"backward": False}}
    prepared = prepare(cfg)
    got = prepared.model.state_dict()
    assert set(got) == set(own.state_dict())
    assert all(torch.equal(got[k], v) for k, v in own.state_dict().items())
    assert "put prefix 'model.' back on every key" in caplog.text
