"""Every mistake ends in one clear message, a non-zero exit and no half-written output.

Each message is tested once, in-process (`prepare`, `run`, `load_param_groups`), which is fast.
A few CLI contract tests per kind of error (marked slow: each is a subprocess) check what the
user sees: exit 1, the message, one [ERROR] line, no traceback, no param_groups.json and no temp
file. Failures that cannot be staged for real (an unreadable file as root, a full disk) are
simulated in-process.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO, run_cli, run_cli_here
from safetensors.torch import save_file

from finetune_prep import atomic, prepare
from finetune_prep.checkpoint import integrity  # where every checkpoint file is opened
from finetune_prep.config import CONF_DIR
from finetune_prep.errors import FinetunePrepError
from finetune_prep.train.apply import load_param_groups

FAST = "verify.backward=false"

# --------------------------------------------------------------------------- helpers


def leftovers(run_dir: Path) -> list[str]:
    """Output files a failed run must not leave: the plan, or any temp file."""
    if not run_dir.exists():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name == "param_groups.json" or p.name.endswith(".tmp"))


def assert_user_error(done, run_dir: Path, *texts: str) -> str:
    """Exit 1, each text in the output, one ERROR line, no traceback, no partial output."""
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    for text in texts:
        assert text in output, f"{text!r} not in:\n{output}"
    assert "Traceback" not in output
    assert output.count("[ERROR]") == 1, output  # one message, said once
    assert leftovers(run_dir) == []
    return output


def cli(run_dir: Path, *args: str, env: dict | None = None):
    return run_cli_here(*args, FAST, f"hydra.run.dir={run_dir}", env=env)


def function_error(fn, *args, **kwargs) -> str:
    with pytest.raises(FinetunePrepError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --------------------------------------------------------------------------- files


class RunsCode:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory, resnet18_ckpt) -> dict[str, Path]:
    """Every kind of bad checkpoint, made here from random-init models (nothing downloaded)."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    out: dict[str, Path] = {"good": resnet18_ckpt}
    out["missing"] = root / "nowhere.pth"
    (root / "a_folder").mkdir()
    out["folder"] = root / "a_folder"
    out["empty"] = root / "empty.pth"
    out["empty"].touch()
    data = resnet18_ckpt.read_bytes()
    out["truncated"] = root / "cut.pth"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["text"] = root / "notes.pth"
    out["text"].write_text("epoch,loss\n1,0.5\n")
    out["jpeg"] = root / "photo.jpg"
    out["jpeg"].write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    good_st = root / "good.safetensors"
    save_file({"fc.weight": torch.ones(1, 512), "fc.bias": torch.ones(1)}, str(good_st))
    st = good_st.read_bytes()
    n = struct.unpack("<Q", st[:8])[0]
    out["safetensors"] = root / "bad.safetensors"
    out["safetensors"].write_bytes(st[:8] + b"{" + b"#" * (n - 1) + st[8 + n:])
    out["resnet50"] = root / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), out["resnet50"])
    out["imagenet_head"] = root / "resnet18_1000.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), out["imagenet_head"])
    out["wrapped"] = root / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": torch.load(resnet18_ckpt, weights_only=True)},
               out["wrapped"])
    return out


# --------------------------------------------------------------------------- checkpoints


CHECKPOINT_CASES = {
    "missing": ([], ["nowhere.pth does not exist (looked for"]),
    "folder": ([], ["a_folder is a directory: give the weights file inside it"]),
    "empty": ([], ["is an empty file (0 bytes)", "save or copy it again"]),
    "truncated": ([], ["cut.pth is truncated or corrupt", "fetch or save it again"]),
    "text": ([], ["is not a checkpoint: it looks like a text file (it starts with 'epoch,loss')",
                  "reads torch.save files (.pt/.pth/.bin/.ckpt) and .safetensors files"]),
    "jpeg": ([], ["photo.jpg is not a checkpoint: it looks like a JPEG image", "check the path"]),
    "safetensors": ([], ["bad.safetensors has a corrupt safetensors header",
                         "download or save it again"]),
    "resnet50": ([], ["this checkpoint does not look like it was made for this model",
                      "198 unexpected", "layer1.0.conv3.weight",
                      "Check that model.arch (and model.source) match"]),
    "imagenet_head": ([], ["does not fit the model (checkpoint.strict=true)",
                           "fc.weight: checkpoint [1000, 512], model [1, 512]",
                           "fc.bias: checkpoint [1000], model [1]",
                           "set checkpoint.exclude_head=true", "checkpoint.strict=false"]),
    "wrapped": (["checkpoint.key=nope"],
                ["checkpoint.key=nope not found in",
                 "its top-level keys are: epoch (int), state_dict (dict of 122 tensors)",
                 "Set checkpoint.key to one of them"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_message(case, files, make_cfg):
    extra, texts = CHECKPOINT_CASES[case]
    cfg = make_cfg(f"checkpoint.path={files[case]}", FAST, *extra)
    msg = function_error(prepare, cfg, materialize=False)
    for text in [str(files[case]), *texts]:  # names the file
        assert text in msg, f"{text!r} not in:\n{msg}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "imagenet_head"])  # a read and a fit error
def test_bad_checkpoint_on_the_cli_is_one_message_exit_1_and_no_file(case, files, tmp_path):
    extra, texts = CHECKPOINT_CASES[case]
    run_dir = tmp_path / "run"
    done = cli(run_dir, f"checkpoint.path={files[case]}", *extra)
    assert_user_error(done, run_dir, str(files[case]), *texts)


def test_unreadable_checkpoint_says_permission_denied(make_cfg, files, monkeypatch, tmp_path):
    path = tmp_path / "locked.pth"
    path.write_bytes(files["good"].read_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the refusal

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(integrity, "open_regular", refuse)  # every checkpoint open
    msg = function_error(prepare, make_cfg(f"checkpoint.path={path}"), materialize=False)
    assert f"checkpoint.path={path} cannot be read (permission denied)" in msg
    assert "make it readable (chmod +r)" in msg


def test_checkpoint_that_would_run_code_is_refused_and_never_runs(make_cfg, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.bias": torch.ones(1)}, "extra": RunsCode(marker)}, evil)
    msg = function_error(prepare, make_cfg(f"checkpoint.path={evil}", FAST), materialize=False)
    for text in [f"checkpoint.path={evil} is not a plain weights file",
                 "unpickling it would run code or reference non-tensor globals",
                 "Nothing in it was run: finetune_prep never imports or calls",
                 "torch.save(model.state_dict(), path)"]:
        assert text in msg, f"{text!r} not in:\n{msg}"
    assert not marker.exists()


# --------------------------------------------------------------------------- config


CONFIG_CASES = {
    "unknown_arch": (["model.arch=resnet181"],
                     ["model.arch='resnet181' is not a torchvision classification, detection or "
                      "segmentation model",
                      "Did you mean: resnet18"]),
    "pattern_typo": (["freeze.rules=[{freeze: '*'}, {unfreeze: laye4}]"],
                     ["freeze.rules[1] {unfreeze: laye4}: 'laye4' matches no parameter",
                      "Did you mean: layer4", "Top-level modules: conv1, bn1"]),
    "stage_out_of_range": (["freeze.rules=[{freeze: '*'}, {unfreeze: '@stage[9]'}]"],
                           ["@stage[9]: this model has 5 stages",
                            "the index must be in -5..4", "4: layer4"]),
    "empty_rule": (["freeze.rules=[{}]"],
                   ["freeze.rules[0] is empty; write {freeze: PATTERN} or {unfreeze: PATTERN}"]),
    "bad_regex": (["freeze.rules=[{freeze: 're:layer[4'}]"],
                  ["'re:layer[4' is not a valid regular expression",
                   "unterminated character set", "fix it, or use a glob"]),
    "zero_outputs": (["head.num_outputs=0"],
                     ["head.num_outputs=0: a head needs at least one output",
                      "Set head.num_outputs to the number of classes"]),
    "head_not_linear": (["head.module=bn1"],
                        ["head.module='bn1' is a BatchNorm2d, which finetune_prep cannot "
                         "rebuild with a new size", "head.mode=keep",
                         "leave head.module=null"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistake_message(case, make_cfg):
    args, texts = CONFIG_CASES[case]
    msg = function_error(prepare, make_cfg(*args, FAST), materialize=False)
    for text in texts:
        assert text in msg, f"{text!r} not in:\n{msg}"


@pytest.mark.slow
def test_config_mistake_on_the_cli_is_one_message_exit_1_and_no_file(tmp_path):
    args, texts = CONFIG_CASES["unknown_arch"]  # the pattern typo is in test_cli.py
    run_dir = tmp_path / "run"
    assert_user_error(cli(run_dir, *args), run_dir, *texts)


HYDRA_CASES = {
    "unknown_preset": (["freeze=nope"],
                       ["Could not find 'freeze/nope'", "Available options in 'freeze':",
                        *sorted(p.stem for p in (CONF_DIR / "freeze").glob("*.yaml"))]),
    "misspelt_key": (["model.archh=x"], ["Key 'archh' not in 'ModelConfig'"]),
    "wrong_type": (["head.num_outputs=abc"],
                   ["Value 'abc' of type 'str' could not be converted to Integer",
                    "full_key: head.num_outputs"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HYDRA_CASES))
def test_hydra_config_error_is_hydras_message_exit_1_no_traceback(case, tmp_path):
    args, texts = HYDRA_CASES[case]
    run_dir = tmp_path / "run"
    done = cli(run_dir, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    for text in texts:
        assert text in done.stderr, f"{text!r} not in:\n{done.stderr}"
    assert "Traceback" not in output
    assert "HYDRA_FULL_ERROR=1" in done.stderr
    assert leftovers(run_dir) == []


def test_rule_with_both_freeze_and_unfreeze(make_cfg):
    msg = function_error(prepare, make_cfg("freeze.rules=[{freeze: '*', unfreeze: fc}]"),
                         materialize=False)
    assert "freeze.rules[0] has keys freeze, unfreeze" in msg
    assert "write two rules in the order they should apply" in msg


def test_alias_typo_suggests_the_alias(make_cfg):
    msg = function_error(prepare, make_cfg("freeze.rules=[{freeze: '@nrom'}]"),
                         materialize=False)
    assert "'@nrom' is not an alias" in msg and "Did you mean: @norm?" in msg


# --------------------------------------------------------------------------- output


def test_output_path_taken_by_a_folder_is_a_clear_message(make_cfg, tmp_path):
    from finetune_prep.app.pipeline import run

    run_dir = tmp_path / "run"
    (run_dir / "param_groups.json").mkdir(parents=True)
    msg = function_error(run, make_cfg(FAST), run_dir)
    assert f"cannot write {run_dir / 'param_groups.json'}: Is a directory" in msg
    assert "choose another output folder with hydra.run.dir=DIR" in msg
    assert (run_dir / "param_groups.json").is_dir()
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))
    assert not (run_dir / "trainability.txt").exists()  # nothing of the failed plan is left


def test_unwritable_folder_at_function_level(make_cfg, monkeypatch, tmp_path):
    from finetune_prep.app.pipeline import run

    def refuse(*args, **kwargs):  # root writes anywhere: simulate the refusal
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(atomic, "_write_temp", refuse)
    msg = function_error(run, make_cfg(FAST), tmp_path)
    assert f"cannot write {tmp_path / 'param_groups.json'}: Permission denied" in msg
    assert "make the folder writable" in msg
    assert list(tmp_path.iterdir()) == []


def test_disk_full_at_function_level_keeps_the_old_file(make_cfg, monkeypatch, tmp_path):
    from finetune_prep.app.pipeline import run

    good = run(make_cfg(FAST), tmp_path).read_bytes()
    summary = (tmp_path / "trainability.txt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    msg = function_error(run, make_cfg(FAST, "freeze=full"), tmp_path)
    assert "param_groups.json: No space left on device" in msg
    assert (tmp_path / "param_groups.json").read_bytes() == good
    assert (tmp_path / "trainability.txt").read_bytes() == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["param_groups.json", "trainability.txt"]


FULL_DISK = """\
import errno, os, runpy, sys
def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = full
sys.argv = ["finetune_prep", *sys.argv[1:]]
runpy.run_module("finetune_prep", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_rerun_after_a_failure_never_replaces_the_good_file(tmp_path):
    import subprocess

    run_dir = tmp_path / "run"
    assert cli(run_dir).returncode == 0
    good = (run_dir / "param_groups.json").read_bytes()
    json.loads(good)
    summary = (run_dir / "trainability.txt").read_bytes()

    # a config mistake: fails before anything is written
    done = cli(run_dir, "freeze=full", "freeze.rules=[{freeze: layr4}]")
    assert done.returncode == 1 and "'layr4' matches no parameter" in done.stdout
    # the disk fills up while the new plan is written
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full = subprocess.run([sys.executable, "-c", FULL_DISK, "freeze=full", FAST,
                           f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = full.stdout + full.stderr
    assert full.returncode == 1, output
    assert f"cannot write {run_dir / 'param_groups.json'}: No space left on device" in output
    assert "Free disk space" in output and "Traceback" not in output
    assert output.count("[ERROR]") == 1, output

    assert (run_dir / "param_groups.json").read_bytes() == good
    assert (run_dir / "trainability.txt").read_bytes() == summary
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


# --------------------------------------------------------------------------- load_param_groups


@pytest.fixture
def plan(make_cfg, tmp_path) -> Path:
    from finetune_prep.app.pipeline import run

    return run(make_cfg(FAST, "freeze=last_stage"), tmp_path)


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None, num_classes=1)


def test_param_file_of_another_format_version(plan, resnet18):
    doc = json.loads(plan.read_text())
    doc["format"] = "finetune_prep/param_groups@3"
    plan.write_text(json.dumps(doc))
    msg = function_error(load_param_groups, resnet18, plan)
    assert "has format 'finetune_prep/param_groups@3'" in msg
    assert "this finetune_prep reads finetune_prep/param_groups@1 and " \
        "finetune_prep/param_groups@2" in msg
    assert "prepare the file again" in msg


def test_param_file_edited_into_invalid_json(plan, resnet18):
    plan.write_text(plan.read_text().replace('"groups": [', '"groups": [,', 1))
    msg = function_error(load_param_groups, resnet18, plan)
    assert f"{plan} is not valid JSON" in msg and "Run finetune_prep again" in msg


def test_param_file_for_another_model_lists_the_differences(plan):
    with torch.device("meta"):
        resnet34 = torchvision.models.resnet34(weights=None, num_classes=1)
    msg = function_error(load_param_groups, resnet34, plan)
    assert f"{plan} was made for another model (resnet18, 1 outputs)" in msg
    assert "parameters of the model not in the file: layer1.2.conv1.weight" in msg
    assert "Prepare the file for this model" in msg
    assert all(p.requires_grad for p in resnet34.parameters())  # untouched


# --------------------------------------------------------------------------- tracebacks and exit 2


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("freeze.rules=[{freeze: layr4}]", FAST, f"hydra.run.dir={run_dir}",
                   env={"HYDRA_FULL_ERROR": "1"})  # what the interpreter prints: a subprocess
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "FinetunePrepError" in done.stderr and "'layr4' matches no parameter" in done.stderr
    assert leftovers(run_dir) == []


BROKEN_NET = """\
import torch


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        raise RuntimeError("broken forward")
"""


@pytest.mark.slow
def test_internal_error_exits_2_and_asks_for_a_report(tmp_path):
    (tmp_path / "brokennet.py").write_text(BROKEN_NET)
    run_dir = tmp_path / "run"
    done = run_cli("model.source=target", "+model.target={_target_: brokennet.Broken}",
                   "model.input_size=[4]", "verify.backward=true", "freeze=full",
                   f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "internal error (please report it with this log)" in output
    assert "RuntimeError: broken forward" in (run_dir / "finetune_prep.log").read_text()
    assert leftovers(run_dir) == []
