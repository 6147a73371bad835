"""Hostile checkpoints (issue 19, checkpoint side): each is refused with one FinetunePrepError
that says what is wrong, quickly and without a large allocation, and never loads garbage.

DCP folders are written by torch.distributed.checkpoint.save itself and tampered with through
torch's own Metadata dataclasses; torch files are written by torch.save; zip bombs by Python's
zipfile; oversized pickle opcodes are the bytes the pickle format defines for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cli_here
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from finetune_prep.checkpoint import dcp as ckpt_dcp
from finetune_prep.checkpoint import integrity, load_tensors, read_checkpoint, shards
from finetune_prep.checkpoint import read as ckpt_read
from finetune_prep.errors import FinetunePrepError


def error(path: Path | str) -> str:
    with pytest.raises(FinetunePrepError) as err:
        read_checkpoint(path)
    return str(err.value)


class Hung(BaseException):
    """Not an OSError (as TimeoutError is): code under test catching those cannot hide a hang."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def expire(*_):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def bounded_memory(limit: int):
    """Fail when Python allocates more than `limit` bytes at once inside the block."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return model.state_dict()


# --------------------------------------------------------------------------- DCP folders


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory) -> Path:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("dcp") / "step_1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": tiny_state(), "step": 1}, checkpoint_id=str(folder), no_dist=True)
    return folder


def tampered(src: Path, dst: Path, edit: Callable) -> Path:
    """A copy of a DCP folder whose Metadata (torch's own dataclasses) `edit` changed."""
    shutil.copytree(src, dst)
    with open(dst / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own file, just written by dcp.save
    edit(meta)
    with open(dst / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    return dst


def set_chunks(fqn: str, *chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> Callable:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def edit(meta):
        meta.state_dict_metadata[fqn].chunks = [
            ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks]
    return edit


def set_size(fqn: str, size: tuple[int, ...]) -> Callable:
    def edit(meta):
        item = meta.state_dict_metadata[fqn]
        meta.state_dict_metadata[fqn] = dataclasses.replace(item, size=torch.Size(size))
    return edit


W = "model.0.weight"  # conv weight, shape (4, 3, 3, 3)

DCP_CASES = {
    "half covered": (set_chunks(W, ((0, 0, 0, 0), (2, 3, 3, 3))),
                     "tensor 'model.0.weight' of this torch.distributed.checkpoint folder is not "
                     "stored whole: its chunks cover 54 of its 108 elements"),
    "gap": (set_chunks(W, ((0, 0, 0, 0), (1, 3, 3, 3)), ((2, 0, 0, 0), (2, 3, 3, 3))),
            "its chunks cover 81 of its 108 elements"),
    "overlap": (set_chunks(W, ((0, 0, 0, 0), (4, 3, 3, 3)), ((2, 0, 0, 0), (2, 3, 3, 3))),
                "its chunks at offsets [0, 0, 0, 0] and [2, 0, 0, 0] overlap"),
    "out of bounds": (set_chunks(W, ((1, 0, 0, 0), (4, 3, 3, 3))),
                      "a chunk (offsets [1, 0, 0, 0], sizes [4, 3, 3, 3]) reaches outside its "
                      "size [4, 3, 3, 3]"),
    "wrong rank": (set_chunks(W, ((0, 0), (4, 27))),
                   "does not have the tensor's 4 dimensions"),
    "no chunks": (set_chunks(W), "its chunks cover 0 of its 108 elements"),
    "chunk without data": (set_chunks(W, ((0, 0, 0, 0), (2, 3, 3, 3)),
                                      ((2, 0, 0, 0), (2, 3, 3, 3))),
                           "its chunk at offsets [2, 0, 0, 0] has no data record"),
    "overflowing size": (set_size(W, (1 << 40, 1 << 40)), "is impossible (1208925819614629174"),
}


@pytest.mark.parametrize("case", DCP_CASES)
def test_dcp_chunks_must_tile_each_tensor_in_bounds(case, dcp_folder, tmp_path):
    edit, expected = DCP_CASES[case]
    folder = tampered(dcp_folder, tmp_path / "dcp", edit)
    msg = error(folder)
    assert msg.startswith(f"checkpoint.path={folder}: ") and expected in msg, msg
    assert "uninitialized memory" in msg and "save the checkpoint again" in msg


def test_dcp_whole_chunks_split_across_ranks_load(dcp_folder, tmp_path):
    """The check accepts what several ranks write: chunks that tile a tensor between them."""
    folder = tampered(dcp_folder, tmp_path / "dcp", lambda meta: None)
    ckpt = read_checkpoint(folder)
    got = load_tensors(ckpt, ckpt.tensors)
    assert all(torch.equal(got[k], v) for k, v in tiny_state().items())
    size = (6, 4)
    assert ckpt_dcp.chunk_problem(size, [((0, 0), (3, 4)), ((3, 0), (3, 4))]) == ""
    assert ckpt_dcp.chunk_problem(size, [((0, 0), (6, 2)), ((0, 2), (6, 2))]) == ""
    many = [((i, 0), (1, 4)) for i in range(5000)]  # above the pairwise bound: one-axis sweep
    assert ckpt_dcp.chunk_problem((5000, 4), many) == ""
    assert "overlap" in ckpt_dcp.chunk_problem((5000, 4), [*many[:-1], ((4998, 0), (1, 4))])


def edit_planner(value) -> Callable:
    def edit(meta):
        meta.planner_data[W] = value
    return edit


PLANNER_CASES = {
    "empty path": (edit_planner(()), "planner_data gives 'model.0.weight' an empty path"),
    "path inside another": (lambda meta: meta.planner_data.update(
        {"step.x": ("step", "x")}), "puts 'step.x' inside 'step'"),
    "path of another name": (edit_planner(("model", "0", "bias")),
                             "planner_data puts 'model.0.weight' at 'model.0.bias'"),
    "not names": (edit_planner((1.5,)), "planner_data entry 'model.0.weight' is not a path"),
    "not a dict": (lambda meta: setattr(meta, "planner_data", ["x"]), "planner_data is list"),
}


@pytest.mark.parametrize("case", PLANNER_CASES)
def test_dcp_planner_paths_are_checked(case, dcp_folder, tmp_path):
    edit, expected = PLANNER_CASES[case]
    folder = tampered(dcp_folder, tmp_path / "dcp", edit)
    msg = error(folder)
    assert "is a torch.distributed.checkpoint folder whose .metadata is truncated or " \
           "corrupt" in msg and expected in msg, msg


def deep_list(depth: int) -> bytes:
    """Pickle opcodes that push one list nested `depth` deep (EMPTY_LIST ... APPEND)."""
    return b"]" * depth + b"a" * (depth - 1)


METADATA_CASES = {
    "negative size": (lambda m: set_size(W, (-4, 3, 3, 3))(m), "not a size: torch.Size([-4"),
    "garbage bytes": (b"\x00\x01garbage" * 10, "is truncated or corrupt"),
    "empty": (b"", "is truncated or corrupt (EOFError"),
    "oversized BINBYTES8": (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 50) + b"x",
                            "oversized pickle item: it declares 1125899906842624 bytes"),
    "deeply nested": (b"\x80\x02" + deep_list(200_000) + b".", "expected torch.distributed"),
    "state_dict_metadata a list": (lambda m: setattr(m, "state_dict_metadata", []),
                                   "no state_dict_metadata"),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_malformed_dcp_metadata_is_one_clear_error(case, dcp_folder, tmp_path):
    change, expected = METADATA_CASES[case]
    if callable(change):
        folder = tampered(dcp_folder, tmp_path / "dcp", change)
    else:
        folder = shutil.copytree(dcp_folder, tmp_path / "dcp")
        (folder / ".metadata").write_bytes(change)
    with deadline(30), bounded_memory(64 << 20):
        msg = error(folder)
    assert msg.startswith(f"checkpoint.path={folder}") and expected in msg, msg


# --------------------------------------------------------------------------- zip bombs


def zip_bomb(path: Path, padding: int, source: Path) -> Path:
    """A torch.save zip whose data.pkl is the real pickle followed by `padding` zero bytes,
    deflated (the unpickler stops at STOP, so the file is otherwise a valid checkpoint)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with out.open(record, "w", force_zip64=True) as f:
                    f.write(data)
                    block = bytes(16 << 20)
                    for _ in range(padding // len(block)):
                        f.write(block)
            else:
                out.writestr(info, data)
    return path


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "tiny.pt"
    torch.save(tiny_state(), path)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory, plain_file) -> Path:
    return zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt", 272 << 20, plain_file)


def test_zip_bomb_is_refused_quickly_with_little_memory(bomb):
    assert bomb.stat().st_size < 1 << 20  # under 1 MB on disk, 272 MiB decompressed
    start = time.perf_counter()
    with bounded_memory(16 << 20):
        msg = error(bomb)
    assert time.perf_counter() - start < 2
    assert f"checkpoint.path={bomb} is refused: its record" in msg
    assert re.search(r"would decompress to 2852\d{5} bytes from \d{6} ", msg)
    assert "(a zip bomb, or a damaged archive)" in msg


def test_zip_with_a_record_twice_is_refused(plain_file, tmp_path):
    """Python's zipfile keeps the last of two same-named records, other readers the first:
    a bomb (or other tensors) could hide behind the one that is checked."""
    path = tmp_path / "twice.pt"
    with zipfile.ZipFile(plain_file) as src, zipfile.ZipFile(path, "w") as out:
        pkl = next(i for i in src.infolist() if i.filename.endswith("/data.pkl"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns "Duplicate name"
            out.writestr(zipfile.ZipInfo(pkl.filename), b"\x80\x02}q\x00.")
            for info in src.infolist():
                out.writestr(info, src.read(info))
    msg = error(path)
    assert msg == (f"checkpoint.path={path} is refused: its zip archive holds two records "
                   f"named {pkl.filename} (torch.save never writes that; readers would disagree "
                   "on which one is meant). Save the weights again.")


def test_small_compressed_data_pkl_is_still_read(plain_file, tmp_path):
    """A re-zipped checkpoint (data.pkl deflated, no padding) is no bomb: torch reads it."""
    path = zip_bomb(tmp_path / "rezipped.pt", 0, plain_file)
    ckpt = read_checkpoint(path)
    assert sorted(ckpt.tensors) == sorted(tiny_state())


# --------------------------------------------------------------------------- FIFO swapped in


def swap_for_fifo(monkeypatch, after: str) -> None:
    """Replace the checkpoint by a FIFO right after `read.<after>` has looked at it."""
    original = getattr(ckpt_read, after)

    def swapped(file, *args, **kwargs):
        result = original(file, *args, **kwargs)
        target = result if after == "_check_path" else file
        os.remove(target)
        os.mkfifo(target)
        return result

    monkeypatch.setattr(ckpt_read, after, swapped)


@pytest.mark.parametrize("after", ["_check_path", "_sniff"])
def test_fifo_swapped_in_after_the_check_is_refused_not_waited_on(after, plain_file, tmp_path,
                                                                  monkeypatch):
    path = tmp_path / "model.pt"
    shutil.copy(plain_file, path)
    swap_for_fifo(monkeypatch, after)
    with deadline(20):
        msg = error(path)
    assert f"checkpoint.path={path} is not a regular file but a named pipe (FIFO)" in msg


def test_dcp_data_file_that_is_a_fifo_is_refused(dcp_folder, tmp_path):
    folder = shutil.copytree(dcp_folder, tmp_path / "dcp")
    data = next(folder.glob("*.distcp"))
    data.unlink()
    os.mkfifo(data)
    with deadline(20):
        msg = error(folder)
    assert msg.startswith(f"checkpoint.path={folder}: data file {data.name} is not a regular "
                          "file but a named pipe (FIFO)"), msg
    assert msg.endswith(f"{integrity.IN_FOLDER}."), msg  # not "give the checkpoint file itself"


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(FinetunePrepError, match="named pipe"):
        integrity.open_regular(str(fifo))
    with pytest.raises(FinetunePrepError, match="a directory"):
        integrity.open_regular(str(tmp_path))


# --------------------------------------------------------------------------- shard indexes


@pytest.fixture
def shard_folder(tmp_path) -> Path:
    from safetensors.torch import save_file

    sd = tiny_state()
    names = sorted(sd)
    folder = tmp_path / "hf"
    folder.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / shard))
    weight_map = {k: s for s, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_deeply_nested_index_is_one_message(name, shard_folder):
    index = shard_folder / name
    (shard_folder / "model.safetensors.index.json").unlink()
    index.write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + ', "weight_map": {}}')
    msg = error(index)
    assert msg == (f"checkpoint.path={index} is not a shard index: it nests 100001 levels deep "
                   f"(an index has 2 or 3, at most {shards.MAX_DEPTH} are read). Download or "
                   "save it again.")
    shard = next(shard_folder.glob("*-00001-of-*"))  # an index beside a shard: skipped
    assert read_checkpoint(shard).format == "safetensors"


def test_huge_index_is_refused_before_it_is_read(shard_folder):
    index = shard_folder / "model.safetensors.index.json"
    with open(index, "r+b") as f:
        f.truncate(shards.MAX_INDEX_BYTES + 1)  # sparse: nothing is written
    with bounded_memory(8 << 20):
        msg = error(index)
    assert f"model.safetensors.index.json is {shards.MAX_INDEX_BYTES + 1} bytes, more than" in msg


def test_real_index_still_reads(shard_folder):
    ckpt = read_checkpoint(shard_folder)
    assert ckpt.format == "safetensors shards" and sorted(ckpt.tensors) == sorted(tiny_state())


# --------------------------------------------------------------------------- pickle opcodes


OPCODES = {  # opcode bytes that declare a huge item, then a few bytes and no more
    "BINBYTES8": b"\x8e" + struct.pack("<Q", 1 << 40),
    "BINUNICODE8": b"\x8d" + struct.pack("<Q", 1 << 40),
    "BYTEARRAY8": b"\x96" + struct.pack("<Q", 1 << 40),
    "LONG4": b"\x8b" + struct.pack("<i", (1 << 31) - 1),
    "BINUNICODE": b"X" + struct.pack("<I", (1 << 32) - 1),
    "FRAME": b"\x95" + struct.pack("<Q", 1 << 40),
}


def torch_zip_with_pickle(path: Path, source: Path, pkl: bytes) -> Path:
    """torch.save's own zip with its data.pkl replaced by `pkl` (stored, as torch stores it)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


@pytest.mark.parametrize("container", ["legacy", "zip"])
@pytest.mark.parametrize("op", OPCODES)
def test_oversized_pickle_opcodes_are_refused_without_allocating(op, container, plain_file,
                                                                 tmp_path):
    pkl = b"\x80\x04" + OPCODES[op] + b"abc" * 100
    path = tmp_path / "model.pt"
    if container == "legacy":
        path.write_bytes(pkl)
    else:
        torch_zip_with_pickle(path, plain_file, pkl)
    with deadline(30), bounded_memory(64 << 20):
        msg = error(path)
    if (op, container) == ("BINUNICODE", "zip"):  # torch's own reader finds the end first
        assert msg.startswith(f"checkpoint.path={path} is truncated or corrupt"), msg
        return
    assert msg.startswith(f"checkpoint.path={path} is refused: oversized pickle item: it "
                          "declares "), msg
    assert "nothing was allocated for it" in msg


def test_deeply_nested_pickle_is_refused(tmp_path):
    path = tmp_path / "deep.pt"
    path.write_bytes(b"\x80\x02" + deep_list(300_000) + b".")
    with deadline(60):
        msg = error(path)
    assert msg.startswith(f"checkpoint.path={path}"), msg


def test_bounded_reader_only_refuses_reads_past_the_end():
    from finetune_prep.checkpoint.safe_unpickle import LARGE_READ, Bounded

    data = io.BytesIO(bytes(3 * LARGE_READ))
    reader = Bounded(data)
    assert len(reader.read(2 * LARGE_READ)) == 2 * LARGE_READ  # large but there: read
    assert reader.read(10) == bytes(10)  # small reads are never checked
    with pytest.raises(pickle.UnpicklingError, match="declares 2097152 bytes but only"):
        reader.read(2 * LARGE_READ)


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    torch.save(tiny_state(), folder / "zip.pt")
    torch.save(tiny_state(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_state().items()}, str(folder / "st.pt"))
    return {name: (folder / f"{name}.pt").read_bytes() for name in ("zip", "legacy", "st")}


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
          derandomize=not os.environ.get("FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["zip", "legacy", "st"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0.05, 1)))
def test_mutated_checkpoint_is_loaded_or_refused_never_crashes(fuzz_sources, tmp_path, kind,
                                                               edits, cut):
    data = bytearray(fuzz_sources[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: max(1, int(cut * len(data)))]
    path = tmp_path / f"mutated.{'safetensors' if kind == 'st' else 'pt'}"
    path.write_bytes(bytes(data))
    with deadline(30):
        try:
            ckpt = read_checkpoint(path)
            for tensor in load_tensors(ckpt, ckpt.tensors).values():
                tensor.float().sum()  # touch every byte of the data
        except FinetunePrepError:
            pass


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")), deadline=None,
          derandomize=not os.environ.get("FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0.05, 1)))
def test_mutated_dcp_metadata_is_loaded_or_refused_never_crashes(dcp_folder, tmp_path_factory,
                                                                 edits, cut):
    folder = shutil.copytree(dcp_folder, tmp_path_factory.mktemp("fuzz") / "dcp")
    data = bytearray((folder / ".metadata").read_bytes())
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: max(1, int(cut * len(data)))]
    (folder / ".metadata").write_bytes(bytes(data))
    with deadline(30):
        try:
            ckpt = read_checkpoint(folder)
            for tensor in load_tensors(ckpt, ckpt.tensors).values():
                tensor.float().sum()
        except FinetunePrepError:
            pass


# --------------------------------------------------------------------------- from the CLI


def assert_one_error(done, run_dir: Path, expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output and not (run_dir / "param_groups.json").exists()


@pytest.mark.slow
def test_cli_refuses_hostile_checkpoints_with_exit_1(dcp_folder, bomb, plain_file, tmp_path):
    half = tampered(dcp_folder, tmp_path / "half", DCP_CASES["half covered"][0])
    opcode = tmp_path / "opcode.pt"
    opcode.write_bytes(b"\x80\x04" + OPCODES["BINBYTES8"] + b"abc")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "model.safetensors.index.json").write_text("[" * 5000 + "]" * 5000)
    cases = {
        half: "its chunks cover 54 of its 108 elements",
        bomb: "(a zip bomb, or a damaged archive)",
        opcode: f"checkpoint.path={opcode}",
        deep: "nests 5000 levels deep",
    }
    for i, (path, expected) in enumerate(cases.items()):
        run_dir = tmp_path / f"run{i}"
        done = run_cli_here(f"checkpoint.path={path}", f"hydra.run.dir={run_dir}")
        assert_one_error(done, run_dir, expected)
