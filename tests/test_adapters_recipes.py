"""docs/adapters.md's recipes, run exactly as written (read from the file) on a real LoRA plan
of a small timm ViT: after training only the adapters and the head moved, and the folder the
plain loop saves resumes into a new plan (adapter.resume)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

import finetune_prep
from finetune_prep.app.pipeline import prepare
from finetune_prep.model import adapters

pytestmark = pytest.mark.slow

# a timm ViT made small through its own kwargs, so build_model(PLAN) needs no target=
SMALL_VIT = ("model.source=timm", "model.arch=vit_tiny_patch16_224",
             "+model.kwargs.img_size=32", "+model.kwargs.patch_size=8", "+model.kwargs.depth=2",
             "+model.kwargs.embed_dim=32", "+model.kwargs.num_heads=2",
             "model.input_size=[3,32,32]", "head.num_outputs=10")

PROLOGUE = '''\
import sys, torch
PLAN, OUT = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
_gen = torch.Generator().manual_seed(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
    torch.randn(4, 3, 32, 32, generator=_gen), torch.randint(0, 10, (4,), generator=_gen)),
    batch_size=2)
'''

EPILOGUE = '''
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, OUT)
'''


def recipe(name: str) -> str:
    """The python block after `<!-- recipe: NAME -->` in docs/adapters.md."""
    text = (REPO / "docs" / "adapters.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/adapters.md has no recipe {name!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """LoRA on the attention projections, the head trained in full, LoRA+ groups."""
    cfg = finetune_prep.compose([*SMALL_VIT, "adapter=lora", "optim=loraplus"])
    return prepare(cfg, materialize=False).save(tmp_path_factory.mktemp("plan"))


def run(name: str, plan: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    script = tmp_path / "train.py"
    script.write_text(PROLOGUE + recipe(name) + EPILOGUE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run([sys.executable, str(script), str(plan), str(tmp_path / "state.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return torch.load(tmp_path / "state.pt", weights_only=True)


def assert_only_adapters_and_head_moved(plan: Path, final: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    initial = dict(finetune_prep.build_model(plan).named_parameters())  # the recipe's start
    loaded = finetune_prep.load_plan(plan)
    changed = {n.removeprefix(adapters.PREFIX) for n, t in initial.items()
               if not torch.equal(t, final[n])}
    assert changed == set(loaded.trainable), sorted(changed ^ set(loaded.trainable))
    assert any(".lora_B." in n for n in changed)
    assert "head.modules_to_save.default.weight" in changed
    assert not any(".base_layer." in n or "original_module" in n for n in changed)


@pytest.mark.parametrize("name", ["loop", "lightning"])
def test_recipe_trains_only_the_adapters_and_the_head(name, plan, tmp_path):
    assert_only_adapters_and_head_moved(plan, run(name, plan, tmp_path))


def test_the_saved_adapter_folder_resumes(plan, tmp_path):
    final = run("loop", plan, tmp_path)
    folder = tmp_path / "adapter"
    assert (folder / "adapter_config.json").is_file()
    cfg = finetune_prep.compose([*SMALL_VIT, "adapter=lora", f"adapter.resume={folder}"])
    resumed = prepare(cfg)
    ours = dict(resumed.model.named_parameters())
    for name in resumed.document["adapter"]["params"]:
        assert torch.equal(ours[adapters.PREFIX + name], final[adapters.PREFIX + name]), name
    head = adapters.PREFIX + "head.modules_to_save.default.weight"
    assert torch.equal(ours[head], final[head])  # modules_to_save travels with the adapters
