"""The trainability summary, compared with the seed script's logic on the same model."""

from __future__ import annotations

import pytest

from finetune_prep.app.report import plural, share, state, top_level_rows


def seed_grouped(model) -> dict[str, str]:
    """The seed's print_trainable_layers(grouped=True), returning instead of printing."""
    groups: dict[str, list[bool]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(param.requires_grad)
    return {g: "Trainable" if any(p) else "Frozen" for g, p in groups.items()}


@pytest.mark.parametrize("preset", ["head_only", "last_stage", "full", "frozen", "norm_only"])
def test_grouped_rows_agree_with_the_seed_and_split_partial(make_cfg, preset):
    """The rows only need requires_grad: verify=False skips the backward proof (seconds)."""
    from finetune_prep import prepare

    prepared = prepare(make_cfg(f"freeze={preset}"), materialize=False, verify=False)
    trainable = {n: p.requires_grad for n, p in prepared.model.named_parameters()}
    ours = {top: state(t, n) for top, t, n in top_level_rows(prepared.table, trainable)}
    seed = seed_grouped(prepared.model)
    assert list(ours) == list(seed)
    for top in seed:  # the seed calls a half-frozen group Trainable; we call it Partial
        assert (ours[top] != "Frozen") == (seed[top] == "Trainable")
    if preset == "norm_only":
        assert ours["layer1"] == "Partial" and seed["layer1"] == "Trainable"


def test_head_only_summary_has_the_reference_counts(make_cfg):
    from finetune_prep import prepare

    summary = prepare(make_cfg("freeze=head_only"), materialize=False, verify=False).summary
    assert "Total parameters:     11,177,025" in summary
    assert "Trainable parameters: 513 (<0.01%)" in summary
    assert "Model: resnet18 (torchvision), 1 output\n" in summary
    assert "head: lr=0.001 weight_decay=0.05, 1 tensor\n" in summary
    assert "fc                   Trainable            513 / 513" in summary
    assert "layer4               Frozen                 0 / 8,393,728     eval" in summary
    rows = [line.split() for line in summary.splitlines()]
    assert ["0", "conv1+bn1", "Frozen", "0", "/", "9,536"] in rows
    assert ["4", "layer4", "Frozen", "0", "/", "8,393,728"] in rows
    assert ["head", "fc", "Trainable", "513", "/", "513"] in rows


def test_ten_class_head_matches_design_reference(make_cfg):
    from finetune_prep import prepare

    doc = prepare(make_cfg("head.num_outputs=10"), materialize=False, verify=False).document
    assert doc["counts"] == {"total": 11181642, "trainable": 5130, "frozen": 11176512}


def test_detailed_view_lists_every_parameter_with_its_shape(make_cfg):
    from finetune_prep import prepare

    prepared = prepare(make_cfg("report.grouped=false"), materialize=False, verify=False)
    lines = prepared.summary.splitlines()
    assert any(line.split() == ["fc.weight", "Trainable", "1x512"] for line in lines)
    assert any(line.split() == ["conv1.weight", "Frozen", "64x3x7x7"] for line in lines)
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in
            dict(prepared.model.named_parameters())]
    assert len(rows) == len(prepared.table.names)


def test_states():
    assert [state(0, 5), state(5, 5), state(2, 5)] == ["Frozen", "Trainable", "Partial"]


def test_a_share_is_zero_or_whole_only_when_exact():
    assert [share(0, 10), share(10, 10), share(513, 11_177_025)] == ["0%", "100%", "<0.01%"]
    assert [share(1, 3), share(999_999, 1_000_000), share(1, 0)] == ["33.33%", ">99.99%", "0%"]


def test_plural_forms():
    assert [plural(1, "tensor"), plural(2, "output"), plural(1500, "tensor")] == [
        "1 tensor", "2 outputs", "1,500 tensors"]


def _columns(line: str, words: list[str]) -> list[int]:
    return [line.index(w) + len(w) for w in words]


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_stage_table_header_lines_up_with_its_rows(make_cfg, arch):
    """'State' starts where each row's state starts; 'Trainable' ends where its number ends."""
    from finetune_prep import prepare

    prepared = prepare(make_cfg(f"model={arch}", "freeze=last_stage",
                                "verify.backward=false"), materialize=False)
    lines = prepared.summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Stages ("))
    header, rows = lines[start], lines[start + 1: start + 2 + len(prepared.table.stages)]
    state_at = header.index("State")
    number_end = header.index("Trainable") + len("Trainable")
    slash_at = header.index(" / ")
    for row in rows:
        assert row[state_at:].split()[0] in ("Frozen", "Trainable", "Partial"), row
        assert row[state_at - 1] == " " and row[number_end - 1].isdigit(), row
        assert row[number_end] == " " and row.index(" / ") == slash_at, row
    assert rows[-1].startswith("head ") and "Trainable" in rows[-1]


def test_layer_decay_groups_are_summarized_by_first_and_last_layer(make_cfg):
    from finetune_prep import prepare

    prepared = prepare(make_cfg("model=resnet50", "freeze=full", "optim=layer_decay",
                                "verify.backward=false"), materialize=False)
    groups, text = prepared.document["groups"], prepared.summary
    assert len(groups) == 36 and len(prepared.table.names) == 161
    assert "Param groups for torch.optim.AdamW: 36 groups, 161 tensors\n" in text
    assert (f"  layer decay 0.75: 18 of 18 layers train, lr {1e-3 * 0.75 ** 17:g} (layer 0) ... "
            "0.001 (layer 17, head)\n") in text
    decayed = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    assert f"  weight_decay 0.05: {decayed} tensors; weight_decay 0: {161 - decayed} tensors" \
        in text
    assert "layer5:" not in text  # the file lists every group, the summary does not

    partial = prepare(make_cfg("model=resnet50", "freeze=last_stage", "optim=layer_decay",
                               "verify.backward=false"), materialize=False).summary
    assert "layer decay 0.75: 4 of 18 layers train, lr 0.000421875 (layer 14) ... 0.001" in partial
