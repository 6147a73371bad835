"""Shared fixtures: composed configs, models built once per session, checkpoints the tests make."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import finetune_prep
from finetune_prep.model.build import build_architecture
from finetune_prep.model.describe import BuiltModel

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):  # one test worker per core (pyproject's addopts):
    torch.set_num_threads(1)  # a second torch thread in each only contends for the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the processes tests start


def pytest_collection_finish(session: pytest.Session) -> None:
    """The test modules' imports (torch, transformers, timm, ...) live as long as the worker:
    out of the garbage collector's view, each full collection walks only what tests made (as
    the CLI's main() does: app.cli._freeze)."""
    gc.freeze()


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose the packaged config with overrides through the public API, as the CLI would."""

    def _compose(*overrides: str) -> DictConfig:
        return finetune_prep.compose(list(overrides))

    return _compose


@cache
def meta_model(arch: str, num_outputs: int = 1, source: str = "torchvision") -> BuiltModel:
    """A model built on the meta device, once per session (do not mutate it)."""
    cfg = OmegaConf.create({"source": source, "arch": arch})
    return build_architecture(cfg, OmegaConf.create({"num_outputs": num_outputs}), meta=True)


@pytest.fixture(scope="session")
def resnet18_table():
    return meta_model("resnet18").table


@pytest.fixture(scope="session")
def vit_table():
    return meta_model("vit_b_16").table


@pytest.fixture(scope="session")
def resnet18_ckpt(tmp_path_factory) -> Path:
    """A random-init resnet18 with a 1-output head, saved as a plain state_dict."""
    torch.manual_seed(0)
    cfg = OmegaConf.create({"source": "torchvision", "arch": "resnet18"})
    model = build_architecture(cfg, OmegaConf.create({"num_outputs": 1}), meta=False).model
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_binary.pth"
    torch.save(model.state_dict(), path)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300, prelude: str = "") -> subprocess.CompletedProcess:
    """Run `python -m finetune_prep ARGS` as a user would; output captured as text.
    This checkout's package comes first on the path, whatever `cwd` is: an installed
    finetune_prep (another checkout's editable install, say) is not what is under test.
    `prelude`: Python run first in that process (a library setting the test needs)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [full_env.get("PYTHONPATH")])])
    command = (["-c", prelude + "\nimport runpy\nrunpy.run_module('finetune_prep', "
                "run_name='__main__', alter_sys=True)"] if prelude else ["-m", "finetune_prep"])
    with _ctrl_c_live():
        return subprocess.run(
            [sys.executable, *command, *args],
            cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
        )


@contextlib.contextmanager
def _ctrl_c_live() -> Iterator[None]:
    """A shell starts the CLI with Ctrl-C live; a test worker that ignores SIGINT (a library
    run in it may have set that) would hand the ignoring on to the child."""
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_cli_here(*args: str, cwd: Path | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`run_cli` in this process (app.cli.run): the same exit code, output and files without
    a new interpreter's 3 s of imports. For what the CLI says and writes; tests of the
    process itself (signals, pipes, launchers, what a fresh interpreter imports) use run_cli."""
    import io
    import logging

    from finetune_prep.app import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    extra = [p for p in (env or {}).get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = extra
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env or {})
    try:
        os.chdir(cwd or REPO)
        sys.argv = ["finetune_prep"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.run(list(args))
    finally:
        for handler in root.handlers:  # the run's log handlers (its log file among them)
            if handler not in saved_handlers:
                handler.close()
        for name in set(sys.modules) - saved_modules:  # a test's own module files come and go
            if any(str(getattr(sys.modules[name], "__file__", None)).startswith(p)
                   for p in extra):
                del sys.modules[name]
        sys.path[:] = saved_path
        root.handlers[:], root.level = saved_handlers, saved_level
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["finetune_prep", *args], code, out.getvalue(),
                                       err.getvalue())


class TwoBranchNet(torch.nn.Module):
    """A small custom network with a layer its forward never uses (the DDP-breaking bug)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3)
        self.bn = torch.nn.BatchNorm2d(width)
        self.unused = torch.nn.Linear(width, width)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.bn(self.stem(x))).flatten(1))


class PooledNormNet(torch.nn.Module):
    """A small custom network with a BatchNorm1d after pooling: a batch of one cannot run in
    train mode (one value per channel), whatever the input size."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.norm = torch.nn.BatchNorm1d(width)
        self.fc = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.pool(self.stem(x)).flatten(1)))


class DeadUnitNet(torch.nn.Module):
    """A small custom network whose `dead` layer feeds a ReLU that its bias of -1000 keeps shut:
    its weight and bias get a gradient of exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(12, 8)
        self.dead = torch.nn.Linear(8, 8)
        torch.nn.init.constant_(self.dead.bias, -1000.0)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x.flatten(1)))
        return self.fc(torch.cat([h, torch.relu(self.dead(h))], dim=1))


@pytest.fixture(scope="session")
def resnet18_plan(tmp_path_factory) -> Path:
    """A plan for resnet18 with 10 classes: last stage + head train, head at 10x lr (optim=sgd),
    frozen BatchNorm layers in eval_modules. Written once; do not modify it."""
    from finetune_prep.app.pipeline import run

    cfg = finetune_prep.compose(["freeze=last_stage", "head.num_outputs=10", "optim=sgd",
                                 "verify.backward=false"])
    return run(cfg, tmp_path_factory.mktemp("resnet18_plan"))


@pytest.fixture(scope="session")
def gradual_plan(tmp_path_factory) -> Path:
    """freeze=gradual on resnet18 (5 stages: phases at epochs 1..5), written as the CLI does.
    Written once; do not modify it."""
    from finetune_prep.app.pipeline import run

    out = tmp_path_factory.mktemp("gradual")
    run(finetune_prep.compose(["freeze=gradual", "verify.backward=false",
                               "model.input_size=[3,32,32]"]), out)
    return out / "param_groups.json"


@pytest.fixture(scope="session")
def target_plan(tmp_path_factory) -> Path:
    """A head_only plan for the custom `conftest.TwoBranchNet` (width 4): a `_target_` model.
    Written once; do not modify it."""
    from finetune_prep.app.pipeline import run

    cfg = finetune_prep.compose(["model=custom", "model.target._target_=conftest.TwoBranchNet",
                                 "~model.target.num_classes", "+model.target.width=4",
                                 "model.input_size=[3,16,16]", "freeze=head_only",
                                 "verify.backward=false"])
    return run(cfg, tmp_path_factory.mktemp("target_plan"))


# --------------------------------------------------------------------------- Hugging Face

def tiny_hf_config(kind: str, num_labels: int = 5):
    """A tiny transformers config (hidden size 32, 2 layers) of each kind the tests use."""
    import transformers as tf

    made = {
        "vit": lambda: tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8),
        "convnext": lambda: tf.ConvNextConfig(hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 2, 1],
                                              image_size=32),
        "resnet": lambda: tf.ResNetConfig(hidden_sizes=[8, 16, 32, 32], depths=[1, 1, 2, 1],
                                          embedding_size=8),
        "swin": lambda: tf.SwinConfig(embed_dim=16, depths=[1, 2], num_heads=[1, 2],
                                      image_size=32, patch_size=4, window_size=4),
        "mistral": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=100,
                                            pad_token_id=0),
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100, pad_token_id=0),
    }[kind]()
    made.num_labels = num_labels
    return made


HF_TEXT = ("mistral", "llama")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Callable[[str], Path]:
    """`hf_folder(kind)`: a random-init tiny model saved with save_pretrained, sharded
    (max_shard_size 20KB), made once per session; never downloaded."""
    made: dict[str, Path] = {}

    def _make(kind: str) -> Path:
        if kind not in made:
            import transformers as tf

            torch.manual_seed(0)
            auto = (tf.AutoModelForSequenceClassification if kind in HF_TEXT
                    else tf.AutoModelForImageClassification)
            model = auto.from_config(tiny_hf_config(kind))
            folder = tmp_path_factory.mktemp("hf") / kind
            model.save_pretrained(folder, max_shard_size="20KB")
            made[kind] = folder
        return made[kind]

    return _make


# --------------------------------------------------------------------------- adapters (peft)

# a small torchvision VisionTransformer through model.target (vit_b_16 is 86M parameters)
TINY_VIT = ("model=custom", "model.target._target_=torchvision.models.VisionTransformer",
            "~model.target.num_classes", "+model.target.image_size=32",
            "+model.target.patch_size=8", "+model.target.num_layers=2",
            "+model.target.num_heads=2", "+model.target.hidden_dim=32",
            "+model.target.mlp_dim=64", "model.input_size=[3,32,32]", "head.num_outputs=10")


@pytest.fixture
def tiny_vit_cfg(make_cfg) -> Callable[..., DictConfig]:
    """`tiny_vit_cfg(*overrides)`: the tiny ViT's config with more overrides."""
    return lambda *extra: make_cfg(*TINY_VIT, *extra)

