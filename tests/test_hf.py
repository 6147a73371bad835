"""model.source=hf: tiny transformers models saved with save_pretrained (sharded), planned and
loaded as from_pretrained would; the model id from a local Hugging Face cache; errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finetune_prep.app.pipeline import prepare
from finetune_prep.app.sweep import stage_counts
from finetune_prep.errors import FinetunePrepError

transformers = pytest.importorskip("transformers")


def _plan(make_cfg, folder: Path, *overrides: str, materialize: bool = False):
    return prepare(make_cfg("model=hf_folder", f"model.arch={folder}", *overrides),
                   materialize=materialize, verify=False)


def test_vit_folder_is_planned_from_its_sharded_weights(make_cfg, hf_folder):
    folder = hf_folder("vit")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1  # really sharded
    p = _plan(make_cfg, folder, "head.num_outputs=3")
    doc = p.document
    assert doc["model"]["source"] == "hf" and doc["model"]["head"] == "classifier"
    assert p.table.stages == (("vit.embeddings",), ("vit.layers.0",),
                              ("vit.layers.1", "vit.layernorm"))
    src = doc["checkpoint"]["sources"][0]
    assert src["from"] == "model.arch" and src["format"] == "safetensors shards"
    assert src["path"].endswith("model.safetensors.index.json")
    # every tensor but the 5-label head loads; the head is left fresh, as transformers does
    assert src["excluded"] == ["classifier.weight", "classifier.bias"]
    assert src["loaded"] == len(p.model.state_dict()) - 2
    assert any("ignore_mismatched_sizes" in s for s in src["unwrapped"])
    assert any("renamed" in s for s in src["unwrapped"])  # legacy names on disk
    assert doc["counts"]["trainable"] == 32 * 3 + 3  # head_only: the fresh head
    assert next(p.model.parameters()).is_meta


def test_materialized_weights_equal_from_pretrained(make_cfg, hf_folder):
    folder = hf_folder("vit")
    ours = _plan(make_cfg, folder, "head.num_outputs=5", materialize=True).model
    theirs = transformers.AutoModelForImageClassification.from_pretrained(folder)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)  # the head loads when it fits


def test_mismatched_head_is_fresh_and_the_backbone_loaded(make_cfg, hf_folder):
    folder = hf_folder("vit")
    ours = _plan(make_cfg, folder, "head.num_outputs=3", materialize=True).model
    theirs = transformers.AutoModelForImageClassification.from_pretrained(
        folder, num_labels=3, ignore_mismatched_sizes=True)
    ref = theirs.state_dict()
    backbone = [k for k in ref if not k.startswith("classifier.")]
    assert all(torch.equal(ours.state_dict()[k], ref[k]) for k in backbone)
    assert ours.classifier.weight.shape == (3, 32)
    assert ours(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)


@pytest.mark.parametrize(("kind", "stages", "n_layers"), [
    ("convnext", ["convnext.embeddings", *[f"convnext.encoder.stages.{i}" for i in range(4)]], 7),
    ("resnet", ["resnet.embedder", *[f"resnet.encoder.stages.{i}" for i in range(4)]], 7),
    ("swin", ["swin.embeddings", "swin.encoder.layers.0", "swin.encoder.layers.1"], 5),
])
def test_stages_come_from_the_models_own_layer_list(make_cfg, hf_folder, kind, stages,
                                                    n_layers):
    p = _plan(make_cfg, hf_folder(kind), "head.num_outputs=3", "optim=layer_decay",
              "freeze=full")
    assert [s[0] for s in p.table.stages] == stages
    ids = p.table.layer_ids()
    assert len(set(ids.values())) == n_layers  # stem, each block (1+1+2+1, 1+2), head
    assert max(ids.values()) == ids[p.table.head_params()[0]]
    groups = p.document["groups"]
    lrs = {g["lr"] for g in groups}
    assert max(lrs) == pytest.approx(1e-3)
    assert min(lrs) == pytest.approx(1e-3 * 0.75 ** (n_layers - 1))
    assert p.document["checkpoint"]["sources"][0]["missing"] == []


def test_convnext_downsampling_shares_the_next_blocks_layer(make_cfg, hf_folder):
    ids = _plan(make_cfg, hf_folder("convnext"), "head.num_outputs=3").table.layer_ids()
    down = ids["convnext.encoder.stages.1.downsampling_layer.1.weight"]
    assert down == ids["convnext.encoder.stages.1.layers.0.dwconv.weight"]
    assert ids["convnext.encoder.stages.2.layers.0.dwconv.weight"] + 1 == \
        ids["convnext.encoder.stages.2.layers.1.dwconv.weight"]


@pytest.mark.parametrize("kind", ["mistral", "llama"])
def test_sequence_classification_with_presets_and_aliases(make_cfg, hf_folder, kind):
    folder = hf_folder(kind)
    base = ("model.hf_class=AutoModelForSequenceClassification", "head.num_outputs=5")
    p = _plan(make_cfg, folder, *base, "freeze=last_stage")
    assert p.table.head == ("score",)
    assert p.table.stages == (("model.embed_tokens",), ("model.layers.0",),
                              ("model.layers.1", "model.norm"))
    trainable = {n for g in p.param_groups for n in g["params"]}
    assert trainable == {n for n in p.table.names
                         if n.startswith(("model.layers.1.", "model.norm", "score"))}
    src = p.document["checkpoint"]["sources"][0]
    assert src["excluded"] == [] and src["missing"] == []  # the 5-label head fits: loaded
    norm = _plan(make_cfg, folder, *base, "freeze=norm_only")
    tuned = {n for g in norm.param_groups for n in g["params"]}
    assert tuned == {n for n in norm.table.names if "norm" in n or n.startswith("score")}
    rules = "freeze.rules=[{freeze: '@all'},{unfreeze: '@stage[1]'},{unfreeze: '@head'}]"
    one = _plan(make_cfg, folder, *base, rules)
    assert {n for g in one.param_groups for n in g["params"]} == {
        n for n in one.table.names if n.startswith(("model.layers.0.", "score"))}


def test_sequence_classifier_materializes_and_classifies(make_cfg, hf_folder):
    p = _plan(make_cfg, hf_folder("llama"), "model.hf_class=AutoModelForSequenceClassification",
              "head.num_outputs=5", materialize=True)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(hf_folder("llama"))
    ids = torch.randint(1, 100, (2, 6))
    assert torch.allclose(p.model.eval()(ids).logits, ref.eval()(ids).logits)


def test_the_summary_groups_by_the_base_models_modules_and_stages(make_cfg, hf_folder):
    summary = _plan(make_cfg, hf_folder("vit"), "head.num_outputs=3").summary
    rows = [line.split()[0] for line in summary.split("\n\n")[1].splitlines()[1:]]
    assert rows == ["vit.embeddings", "vit.layers", "vit.layernorm", "classifier"]
    assert "2 vit.layers.1+vit.layernorm" in summary


def test_sweep_stage_counts_read_an_hf_plan(make_cfg, hf_folder):
    p = _plan(make_cfg, hf_folder("vit"), "head.num_outputs=3", "freeze=last_stage")
    sizes = {n: p.table.numel(n) for n in p.table.names}
    counts = stage_counts(p.document, sizes)
    assert counts["vit.embeddings"][0] == 0
    assert counts["vit.layers.1+vit.layernorm"][0] == counts["vit.layers.1+vit.layernorm"][1]
    assert counts["head"] == [99, 99]


def test_checkpoint_path_overrides_the_folder_and_takes_a_base_model(make_cfg, hf_folder,
                                                                      tmp_path):
    """A ViTModel (no head, no `vit.` prefix) given as checkpoint.path loads into the
    classifier as from_pretrained does it (the base-model prefix is added)."""
    torch.manual_seed(1)
    from conftest import tiny_hf_config

    base = transformers.ViTModel(tiny_hf_config("vit"), add_pooling_layer=False)
    base.save_pretrained(tmp_path / "base")
    p = _plan(make_cfg, hf_folder("vit"), f"checkpoint.path={tmp_path / 'base'}",
              "checkpoint.exclude_head=true", materialize=True)
    src = p.document["checkpoint"]["sources"]
    assert [s["from"] for s in src] == ["checkpoint.path"]
    ref = base.state_dict()
    assert all(torch.equal(p.model.state_dict()[f"vit.{k}"], v) for k, v in ref.items()
               if not k.startswith("layers"))  # the new names; its layers were renamed too
    assert torch.equal(p.model.vit.layers[1].mlp.fc1.weight, base.layers[1].mlp.fc1.weight)


def test_a_config_only_folder_is_random_init(make_cfg, hf_folder, tmp_path):
    shutil.copy(hf_folder("vit") / "config.json", tmp_path / "config.json")
    doc = _plan(make_cfg, tmp_path, "head.num_outputs=3").document
    assert doc["checkpoint"]["sources"] == []


def test_a_model_id_is_found_in_the_local_cache_only(make_cfg, hf_folder, tmp_path,
                                                      monkeypatch):
    """A cache laid out as huggingface_hub does (refs/main -> snapshots/<commit>), checked by
    huggingface_hub's own scan_cache_dir; then an id not in it names where it looked."""
    from huggingface_hub import scan_cache_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--vit"
    shutil.copytree(hf_folder("vit"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    assert [r.repo_id for r in scan_cache_dir(tmp_path / "hub").repos] == ["tiny/vit"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    p = _plan(make_cfg, Path("tiny/vit"), "head.num_outputs=3")
    assert p.document["checkpoint"]["sources"][0]["path"].startswith(str(repo / "snapshots"))
    with pytest.raises(FinetunePrepError, match=r"tiny/other not found: looked for .* and the "
                       r"Hugging Face cache .*hub, and finetune_prep never downloads"):
        _plan(make_cfg, Path("tiny/other"), "head.num_outputs=3")


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.arch=/nonexistent/model",), r"not found: there is no folder /nonexistent/model"),
    (("model.hf_class=AutoModelForSeqClassification",),
     r"not a transformers model class\. Did you mean: AutoModelForSequenceClassification"),
    (("+model.kwargs.hidden_sise=8",), r"model\.kwargs \(hidden_sise\) are not fields of "
                                       r"ViTConfig"),
    (("model.hf_class=BertForSequenceClassification",),
     r"BertForSequenceClassification cannot build a 'vit' model.*AutoModelForImageClassification"),
])
def test_errors_say_what_is_wrong(make_cfg, hf_folder, overrides, message):
    with pytest.raises(FinetunePrepError, match=message):
        prepare(make_cfg("model=hf_folder", f"model.arch={hf_folder('vit')}", *overrides),
                materialize=False, verify=False)


def test_a_text_model_needs_its_class_and_the_error_names_it(make_cfg, hf_folder):
    with pytest.raises(FinetunePrepError, match=r"cannot build a 'mistral' model.*"
                       r"model\.hf_class=AutoModelForSequenceClassification"):
        _plan(make_cfg, hf_folder("mistral"))


def test_a_folder_without_config_json_is_refused(make_cfg, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FinetunePrepError, match="folder without config.json"):
        _plan(make_cfg, tmp_path)


def test_model_kwargs_override_the_config(make_cfg, hf_folder):
    """qkv_bias=false drops the q/k/v biases: the folder's weights then hold keys the model
    lacks, an error unless checkpoint.strict=false lists them."""
    with pytest.raises(FinetunePrepError, match="checkpoint.strict=false"):
        _plan(make_cfg, hf_folder("vit"), "+model.kwargs.qkv_bias=false")
    p = _plan(make_cfg, hf_folder("vit"), "+model.kwargs.qkv_bias=false",
              "checkpoint.strict=false")
    assert "vit.layers.0.attention.q_proj.bias" not in p.table.names
    unexpected = p.document["checkpoint"]["sources"][0]["unexpected"]
    assert "vit.layers.0.attention.q_proj.bias" in unexpected and len(unexpected) == 6


def test_memory_estimate_has_fp32_and_bf16(make_cfg, hf_folder):
    p = _plan(make_cfg, hf_folder("vit"), "head.num_outputs=3")
    memory, total = p.document["memory"], p.document["counts"]["total"]
    trained = p.document["counts"]["trainable"]
    assert memory["full_finetune_bytes"] == total * 4 * 4
    assert memory["bf16"]["full_finetune_bytes"] == total * 4 * 2
    assert memory["bf16"]["plan_bytes"] == (total + trained * 3) * 2
    assert "bf16" in p.summary


# ------------------------------------------------------------------ billion-parameter plans

def _bench():
    """benchmarks/bench_hf_7b.py as a module (its sparse checkpoint writer and measurements)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_hf_7b.py"
    spec = importlib.util.spec_from_file_location("bench_hf_7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_MISTRAL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                "num_labels": 2, "pad_token_id": 0}


def test_a_sparse_checkpoint_is_a_real_one_that_takes_no_disk(tmp_path):
    """The benchmark's hole-punched shards: transformers itself loads them (as zeros)."""
    info = _bench().make_folder(tmp_path / "sparse", config=TINY_MISTRAL, shard_bytes=20_000)
    assert info["shards"] == 3
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "sparse", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert all(not p.any() for p in model.parameters())
    big = _bench().write_sparse_shard(tmp_path / "big.safetensors", {"w": (2**16, 2**14)},
                                      "fp32")
    assert big == 4 * 2**30 and (tmp_path / "big.safetensors").stat().st_blocks * 512 < 2**20


def test_every_shard_is_checked(make_cfg, tmp_path):
    folder = tmp_path / "sparse"
    _bench().make_folder(folder, config=TINY_MISTRAL, shard_bytes=20_000)
    ok = prepare(make_cfg("model=hf_folder", f"model.arch={folder}",
                          "model.hf_class=AutoModelForSequenceClassification"),
                 materialize=False, verify=False).document["checkpoint"]
    assert ok["format"] == "safetensors shards" and "read the index of 3 shards" in ok["unwrapped"]
    second = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    os.truncate(second, second.stat().st_size - 8)
    with pytest.raises(FinetunePrepError, match=f"{second.name} has a corrupt safetensors"):
        prepare(make_cfg("model=hf_folder", f"model.arch={folder}",
                         "model.hf_class=AutoModelForSequenceClassification"),
                materialize=False, verify=False)


@pytest.mark.slow
def test_a_7b_plan_costs_its_imports_and_little_memory(tmp_path):
    """Mistral-7B-shaped, 8 bf16 shards (13 GiB apparent, sparse): the CLI plans it within the
    import floor + 300 MiB of RSS (the eager way needs 28 GB for its fp32 weights alone)."""
    bench = _bench()
    info = bench.make_folder(tmp_path / "m7b")
    assert info["params"] >= 7_000_000_000 and info["shards"] == 8
    assert info["apparent_bytes"] > 13 * 2**30 and info["disk_bytes"] < 16 * 2**20
    floor_s, floor_mib = bench.measure([sys.executable, "-c", bench.FLOOR])
    plan_s, plan_mib = bench.measure(bench.plan_command(tmp_path / "m7b", tmp_path / "run"))
    doc = json.loads((tmp_path / "run" / "param_groups.json").read_text())
    assert doc["counts"]["total"] >= 7_000_000_000
    src = doc["checkpoint"]["sources"][0]
    assert src["format"] == "safetensors shards" and "read the index of 8 shards" in \
        src["unwrapped"] and src["loaded"] == 290 and src["excluded"] == ["score.weight"]
    assert doc["memory"]["bf16"]["full_finetune_bytes"] == doc["counts"]["total"] * 8
    assert plan_mib <= floor_mib + 300, (plan_mib, floor_mib)
    assert plan_s <= floor_s + 10, (plan_s, floor_s)  # the 1 s bound: see the benchmark


@pytest.mark.slow
def test_cli_plans_an_hf_folder_and_sweeps_it(hf_folder, tmp_path):
    """`python -m finetune_prep model=hf_folder model.arch=FOLDER` as a user runs it: the plan
    files, the summary on the console; a multirun over presets gives the sweep summary + PNG."""
    import csv

    from conftest import run_cli_here

    folder = hf_folder("convnext")
    done = run_cli_here("model=hf_folder", f"model.arch={folder}", "head.num_outputs=3",
                        "freeze=last_stage", "optim=layer_decay",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "run" / "param_groups.json").read_text())
    assert doc["model"]["source"] == "hf" and doc["model"]["arch"] == str(folder)
    assert doc["checkpoint"]["sources"][0]["from"] == "model.arch"
    assert doc["verified"]["ok"] is True
    trained = {n for g in doc["groups"] for n in g["params"]}
    assert trained and all(n.startswith(("convnext.encoder.stages.3.", "convnext.layernorm.",
                                         "classifier.")) for n in trained)
    assert "convnext.encoder     Partial" in done.stdout
    assert "in bf16 (weights, grads and optimizer state)" in done.stdout
    sweep = tmp_path / "sweep"
    done = run_cli_here("-m", "model=hf_folder", f"model.arch={folder}", "head.num_outputs=3",
                        "freeze=head_only,last_stage,full", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    with open(sweep / "sweep_summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["COMPLETED"] * 3
    assert [float(r["trainable_pct"]) for r in rows][2] == 100.0
    assert float(rows[0]["trainable_pct"]) < float(rows[1]["trainable_pct"]) < 100.0
    assert (sweep / "sweep_summary.png").stat().st_size > 10_000


def test_the_proof_runs_a_text_model_on_token_ids(make_cfg, hf_folder):
    cfg = make_cfg("model=hf_folder", f"model.arch={hf_folder('mistral')}",
                   "model.hf_class=AutoModelForSequenceClassification", "freeze=last_stage")
    verified = prepare(cfg, materialize=False, verify=True).document["verified"]
    assert verified["ok"] is True and verified["input"] == [2, 16]
    no_pad = make_cfg("model=hf_folder", f"model.arch={hf_folder('mistral')}",
                      "model.hf_class=AutoModelForSequenceClassification",
                      "+model.kwargs.pad_token_id=null")
    with pytest.raises(FinetunePrepError, match="needs a pad_token_id"):
        prepare(no_pad, materialize=False, verify=True)
    single = make_cfg("model=hf_folder", f"model.arch={hf_folder('mistral')}",
                      "model.hf_class=AutoModelForSequenceClassification",
                      "+model.kwargs.pad_token_id=null", "verify.batch_size=1")
    assert prepare(single, materialize=False, verify=True).document["verified"]["ok"] is True


def test_a_pytorch_model_bin_folder_loads_too(make_cfg, hf_folder, tmp_path):
    """Older transformers wrote pytorch_model.bin (a torch.save'd state dict, legacy names)."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(hf_folder("vit").glob("model-*.safetensors")):
        state.update(load_file(shard))
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_folder("vit") / "config.json", tmp_path / "config.json")
    p = _plan(make_cfg, tmp_path, "head.num_outputs=5", materialize=True)
    src = p.document["checkpoint"]["sources"][0]
    assert src["format"] == "torch" and src["loaded"] == len(state)
    ref = transformers.AutoModelForImageClassification.from_pretrained(hf_folder("vit"))
    assert all(torch.equal(p.model.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_model_stages_override_an_hf_models_own(make_cfg, hf_folder):
    p = _plan(make_cfg, hf_folder("vit"), "head.num_outputs=3",
              "model.stages=[vit.embeddings,[vit.layers.0,vit.layers.1,vit.layernorm]]",
              "freeze=last_stage")
    assert p.table.stages == (("vit.embeddings",),
                              ("vit.layers.0", "vit.layers.1", "vit.layernorm"))
    assert p.document["counts"]["trainable"] == 99 + 8_544 + 8_608


def test_tokens_and_position_embeddings_get_no_weight_decay(make_cfg, hf_folder):
    p = _plan(make_cfg, hf_folder("vit"), "head.num_outputs=3", "freeze=full")
    decay = {n: g["weight_decay"] for g in p.param_groups for n in g["params"]}
    assert p.table.no_weight_decay == {"vit.embeddings.cls_token",
                                       "vit.embeddings.position_embeddings"}
    assert decay["vit.embeddings.cls_token"] == 0.0
    assert decay["vit.embeddings.position_embeddings"] == 0.0
    assert decay["vit.embeddings.patch_embeddings.projection.weight"] == 0.05


def test_an_edited_config_json_is_built_again(make_cfg, hf_folder, tmp_path):
    """The process cache of meta models keys an HF model on its config.json as it is now."""
    shutil.copy(hf_folder("vit") / "config.json", tmp_path / "config.json")
    before = _plan(make_cfg, tmp_path, "head.num_outputs=3").document["counts"]["total"]
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    after = _plan(make_cfg, tmp_path, "head.num_outputs=3").document["counts"]["total"]
    assert before - after == 8_544  # one encoder layer fewer


def test_build_model_rebuilds_an_hf_text_classifier_from_the_file(make_cfg, hf_folder, tmp_path):
    import finetune_prep
    from finetune_prep.app.pipeline import run

    cfg = make_cfg("model=hf_folder", f"model.arch={hf_folder('llama')}", "head.num_outputs=5",
                   "model.hf_class=AutoModelForSequenceClassification", "verify.backward=false")
    path = run(cfg, tmp_path)
    assert json.loads(path.read_text())["model"]["hf_class"] == \
        "AutoModelForSequenceClassification"
    model = finetune_prep.build_model(path)  # the right class, not the image default
    assert type(model).__name__ == "LlamaForSequenceClassification"
    optimizer = finetune_prep.build_optimizer(model, path)
    finetune_prep.train_mode(model, path)
    finetune_prep.check(model, optimizer, path)
