"""Stages: contiguous blocks of the backbone, in model order, derived from the module tree.

Freeze presets (`@stage[-1]`, `@stages[-2:]`) and layer-wise lr decay index the stages, so a
stage must mean the same thing on every architecture without the user naming modules. Each
stage is a list of module names (or bare parameter names, for parameters a container holds
directly); a name covers its subtree at a dot boundary. Head parameters are in no stage.

The derivation reads only names, module types and parameter counts (never tensor data):

1. Flatten the root into units (its direct parameters and its children), in model order.
   A module that holds a head is opened in place (its non-head parts become units); the
   non-head parts of an auxiliary classifier (inception's AuxLogits, googlenet's aux1/aux2)
   are marked auxiliary.
2. Group the units into stages:
   - units without deep structure only (vgg, alexnet, squeezenet's features): split into
     segments ending at each pooling layer;
   - otherwise: the leading run of shallow units (leaf layers, conv+bn modules, bare
     parameters) is one stem stage; every other module that is not a single layer (a
     block, a transition, a later conv+bn) is a stage of its own; a leaf layer or bare
     parameter after the stem (a final norm, a pre-logits layer) and auxiliary-classifier
     parts join the stage before them.
3. While that gives fewer than 3 stages (a stem plus one trunk, as in vit's `encoder` and
   `encoder.layers` or regnet's `trunk_output`), open the biggest module that has several
   parameterized parts and group again.

timm models with a `group_matcher` use timm's own coarse grouping with head parameters
dropped; a last group of bare leaf layers (convnext's head.norm) joins the stage before it.
timm models without one take the general derivation.

Layer ids are the same concept one level finer: the units that layer-wise lr decay counts
(`derive_layers`). On a timm model with a `group_matcher` they are timm's own fine grouping
(`group_matcher(coarse=False)`, what timm's `param_groups_layer_decay` uses), head included.
Elsewhere each stage is split into its blocks, the rule timm applies and BEiT/MAE describe:

- the first stage (the stem) is layer 0;
- a stage that is a container (Sequential, ModuleList, ModuleDict) of blocks gives one layer
  per block (a ResNet bottleneck, a ConvNeXt/Swin block, an inverted residual), also through
  one wrapper (maxvit's `blocks.i.layers`); any other module with nested layers is one block
  (a ViT encoder layer, an inception module);
- a module of single layers between blocks (a ConvNeXt/Swin downsampling) shares the layer of
  the next block, and one after the last block (a final norm or 1x1 conv) the last one;
- the head comes last, with the head's siblings in its container (convnext's classifier norm,
  vgg's and mobilenet_v3's pre-logits layers), as timm treats them;
- a model without any block (vgg, alexnet, squeezenet) gets one layer per stage.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.model.heads import task_of
from finetune_prep.plan.rules import check_glob
from finetune_prep.plan.table import covers

MIN_STAGES = 3  # fewer than this means "stem + trunk": open the trunk


@dataclass(frozen=True)
class _Tree:
    """Names and sizes read off a model once (parameters in model order, tied weights once)."""

    params: tuple[str, ...]
    numel: Mapping[str, int]  # module or parameter name -> parameters it covers
    depth: Mapping[str, int]  # module name -> deepest dot count of a parameter below it
    modules: Mapping[str, nn.Module]
    head: tuple[str, ...]


@dataclass(frozen=True)
class _Unit:
    """One candidate piece of a stage: a module or a parameter held directly by a container."""

    name: str
    kind: str  # "param", "leaf", "shallow" (conv+bn), "deep", "pool" (marker, no parameters)
    numel: int
    aux: bool = False  # part of an auxiliary classifier


def _read(model: nn.Module, head: Sequence[str]) -> _Tree:
    params = [(n, p.numel()) for n, p in model.named_parameters()]  # shapes only, no data
    numel: dict[str, int] = {}
    depth: dict[str, int] = {}
    for name, count in params:
        parts = name.split(".")
        numel[name] = count
        for i in range(len(parts)):
            prefix = ".".join(parts[:i])
            numel[prefix] = numel.get(prefix, 0) + count
            depth[prefix] = max(depth.get(prefix, 0), len(parts) - i - 1)
    names = tuple(n for n, _ in params)
    return _Tree(names, numel, depth, dict(model.named_modules()), tuple(head))


# ---------------------------------------------------------------------------------------------
# derivation


def derive_stages(model: nn.Module, head: Sequence[str]) -> list[list[str]]:
    """The model's stages: lists of module/parameter names, in model order, heads excluded."""
    towers = open_clip_stages(model, head)
    if towers:
        return towers
    if hasattr(model, "group_matcher"):
        return _timm_stages(model, head)
    body = backbone_body(model)
    if body is not None:
        return _with_backbone(model, head, body)
    return _derive(_read(model, head))


# open_clip's lock() groups of each tower: (prefix, the tower's transformer, first group,
# what joins the last block, the projection)
OPEN_CLIP_TOWERS = (
    ("visual.", ("conv1", "class_embedding", "positional_embedding", "ln_pre"), ("ln_post",),
     ("proj",)),
    ("", ("token_embedding", "positional_embedding"), ("ln_final",), ("text_projection",)),
    ("text.", ("token_embedding", "positional_embedding"), ("ln_final",), ("text_projection",)),
)


def open_clip_stages(model: nn.Module, head: Sequence[str]) -> list[list[str]]:
    """An open_clip model's towers as its own lock()/lock_text_tower() group them: the
    embeddings, each residual block, the last block with its final norm, the projection
    (image tower first). [] for other models or towers without transformer blocks."""
    if not type(model).__module__.startswith("open_clip"):
        return []
    tree = _read(model, head)
    stages: list[list[str]] = []
    for prefix, first, last, proj in OPEN_CLIP_TOWERS:
        blocks = f"{prefix}transformer.resblocks"
        if blocks not in tree.modules:
            continue
        names = [f"{blocks}.{i}" for i in range(len(tree.modules[blocks]))]
        groups = [[prefix + n for n in first], *[[b] for b in names[:-1]],
                  [names[-1], *(prefix + n for n in last)], [prefix + n for n in proj]]
        stages += [kept for g in groups if (kept := [n for n in g if tree.numel.get(n, 0)
                                                     and not any(covers(h, n) for h in head)])]
    return stages


def _mobilenet_stages(body: nn.Module) -> list[list[str]]:
    """A mobilenet body's stages as torchvision's mobilenet_backbone counts trainable_layers:
    from the first block, each block marked `_is_cn` (a resolution change), and the last
    block; [] for other bodies."""
    blocks = [n for n, _ in body.named_children()]
    marked = [i for i, (_, b) in enumerate(body.named_children()) if getattr(b, "_is_cn", False)]
    if not marked:
        return []
    starts = [0, *marked, len(blocks) - 1]
    ends = [*starts[1:], len(blocks)]
    return [blocks[a:b] for a, b in zip(starts, ends, strict=True) if b > a]


def backbone_body(model: nn.Module) -> str | None:
    """The feature extractor of a torchvision detection or segmentation model: `backbone.body`
    (an FPN backbone) or `backbone`; None for other models."""
    if task_of(model) == "classification":
        return None
    modules = dict(model.named_modules())
    return next((n for n in ("backbone.body", "backbone") if n in modules), None)


def _with_backbone(model: nn.Module, head: Sequence[str], body: str) -> list[list[str]]:
    """Stages of the backbone body as for a classifier (resnet: stem, layer1..layer4, the
    stages torchvision's trainable_backbone_layers counts), then each other part (fpn, rpn,
    roi_heads' box/mask heads, a segmentation classifier's layers) in model order."""
    module = model.get_submodule(body)
    inner = _mobilenet_stages(module) or _derive(_read(module, ()))
    stages = [[f"{body}.{n}" for n in stage] for stage in inner]
    tree = _read(model, (*head, body))  # the body is skipped like a head, its parents opened
    rest = _group(_open(tree, "", aux=False)) if tree.numel.get("", 0) else []
    return stages + [[u.name for u in stage] for stage in rest]


def _derive(tree: _Tree) -> list[list[str]]:
    units = _open(tree, "", aux=False)
    stages = _group(units)
    while len(stages) < MIN_STAGES:
        openable = [u for u in units if u.kind in ("shallow", "deep") and _parts(tree, u) >= 2]
        if not openable:
            break
        biggest = max(openable, key=lambda u: u.numel)
        at = units.index(biggest)
        units[at : at + 1] = _open(tree, biggest.name, biggest.aux)
        stages = _group(units)
    return [[u.name for u in stage] for stage in stages]


def _children(tree: _Tree, name: str) -> list[str]:
    prefix = f"{name}." if name else ""
    module = tree.modules[name]
    direct = [prefix + p for p, _ in module.named_parameters(recurse=False)]
    direct = [n for n in direct if n in tree.numel]  # tied copies are listed once, elsewhere
    return direct + [prefix + c for c, _ in module.named_children()]


def _parts(tree: _Tree, unit: _Unit) -> int:
    """How many direct parameters and children with parameters a module has."""
    return sum(tree.numel.get(c, 0) > 0 for c in _children(tree, unit.name))


def _open(tree: _Tree, name: str, aux: bool) -> list[_Unit]:
    """Units for the parts of module `name`; modules holding a head are opened in turn."""
    units: list[_Unit] = []
    for child in _children(tree, name):
        if child in tree.head:
            continue
        inner = [h for h in tree.head if covers(child, h)]
        if inner:
            units += _open(tree, child, aux or tree.head[0] not in inner)
        elif unit := _unit(tree, child, aux):
            units.append(unit)
    return units


def _unit(tree: _Tree, name: str, aux: bool) -> _Unit | None:
    count = tree.numel.get(name, 0)
    if name not in tree.modules:
        return _Unit(name, "param", count, aux)
    if count == 0:
        is_pool = "pool" in type(tree.modules[name]).__name__.lower()
        return _Unit(name, "pool", 0, aux) if is_pool else None
    kinds = ("leaf", "shallow", "deep")  # parameters held directly, by children, deeper
    return _Unit(name, kinds[min(tree.depth[name], 2)], count, aux)


def _group(units: Sequence[_Unit]) -> list[list[_Unit]]:
    """Stages from units; see the module docstring for the rules."""
    if not any(u.kind == "deep" for u in units):
        return _split_at_pools(units)
    units = [u for u in units if u.kind != "pool"]
    n_stem = next(i for i, u in enumerate(units) if u.kind == "deep" or u.aux)
    stages = [list(units[:n_stem])] if n_stem else []
    for unit in units[n_stem:]:
        if stages and (unit.aux or unit.kind in ("leaf", "param")):
            stages[-1].append(unit)  # a final norm, a pre-logits layer, an aux classifier
        else:
            stages.append([unit])
    return stages


def _split_at_pools(units: Sequence[_Unit]) -> list[list[_Unit]]:
    """A plain layer sequence (vgg, alexnet): segments ending at each pooling layer."""
    stages: list[list[_Unit]] = [[]]
    for unit in units:
        if unit.kind == "pool":
            stages.append([])
        else:
            stages[-1].append(unit)
    return [s for s in stages if s]


# ---------------------------------------------------------------------------------------------
# layer ids


def derive_layers(
    model: nn.Module, head: Sequence[str], stages: Sequence[Sequence[str]]
) -> dict[str, int]:
    """Every parameter's layer id (0 = stem ... last = head), block by block; see the module
    docstring. Parameters outside every stage and the head get 0."""
    if hasattr(model, "group_matcher"):
        try:
            from timm.models import group_parameters

            return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        except (ImportError, NotImplementedError):
            pass
    tree = _read(model, head)
    units = _layer_units(tree, stages)
    if not any(is_block for is_block, _ in units[1:]):
        units = [(True, list(stage)) for stage in stages]  # no blocks: a layer per stage
    entry_layer = _number(units)
    layers = {n: _innermost(entry_layer, n) for n in tree.params}
    head_id = max(layers.values(), default=-1) + 1
    for h in head:
        scope = h.rpartition(".")[0] or h  # the head's container, or the head at the root
        layers.update({n: head_id for n in tree.params if covers(scope, n)})
    order = {old: new for new, old in enumerate(sorted(set(layers.values())))}
    return {n: order[i] for n, i in layers.items()}  # no gaps: every id holds parameters


def _innermost(ids: Mapping[str, int], name: str) -> int:
    """The id of the closest entry that covers parameter `name` (0 if none does)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if (scope := ".".join(parts[:end])) in ids:
            return ids[scope]
    return 0


def _layer_units(tree: _Tree, stages: Sequence[Sequence[str]]) -> list[tuple[bool, list[str]]]:
    """(is a block, names) in model order; the stem stage is one unit."""
    units: list[tuple[bool, list[str]]] = [(True, list(stages[0]))] if stages else []
    for stage in stages[1:]:
        for entry in stage:
            blocks = _blocks(tree, entry)
            if blocks:
                units += [(True, [b]) for b in blocks]
            else:
                units.append((tree.depth.get(entry, 0) >= 2, [entry]))
    return units


def _blocks(tree: _Tree, name: str) -> list[str]:
    """The blocks of a container of blocks (through one wrapper module), else []."""
    module = tree.modules.get(name)
    if module is None:
        return []
    kids = [c for c in _children(tree, name) if tree.numel.get(c, 0)]
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return kids if kids and all(tree.depth.get(c, 0) >= 1 for c in kids) else []
    if len(kids) == 1 and kids[0] in tree.modules:
        inner = _blocks(tree, kids[0])
        return inner if all(tree.depth.get(c, 0) >= 2 for c in inner) else []
    return []


def _number(units: Sequence[tuple[bool, list[str]]]) -> dict[str, int]:
    """Entry -> layer id: each block a new layer; single layers before a block join it, after
    the last block they join the last."""
    ids: dict[str, int] = {}
    layer, pending = -1, []
    for is_block, names in units:
        pending += names
        if is_block:
            layer += 1
            ids.update(dict.fromkeys(pending, layer))
            pending = []
    ids.update(dict.fromkeys(pending, max(layer, 0)))
    return ids


# ---------------------------------------------------------------------------------------------
# timm


def _timm_stages(model: nn.Module, head: Sequence[str]) -> list[list[str]]:
    """timm's own coarse grouping (the one its layer decay uses), heads dropped."""
    tree = _read(model, head)
    try:
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (ImportError, NotImplementedError):  # no timm, or a model without a matcher
        return _derive(tree)
    order = {n: i for i, n in enumerate(tree.params)}
    stages = []
    for _, names in sorted(groups.items()):
        kept = {n for n in names if not any(covers(h, n) for h in head)}
        if kept:
            stages.append(_collapse(tree, "", kept))
    stages.sort(key=lambda s: min(order[n] for n in tree.params if any(covers(x, n) for x in s)))
    if len(stages) > 1 and all(tree.depth.get(n, 0) == 0 for n in stages[-1]):
        last = stages.pop()  # a final norm left unmatched (convnext's head.norm) joins
        stages[-1] += last
    return stages


def _collapse(tree: _Tree, name: str, keep: set[str]) -> list[str]:
    """The fewest module/parameter names under `name` that cover exactly the names in `keep`."""
    names: list[str] = []
    for child in _children(tree, name):
        under = [n for n in tree.params if covers(child, n)]
        if under and all(n in keep for n in under):
            names.append(child)
        elif any(n in keep for n in under):
            names += _collapse(tree, child, keep)
    return names


# ---------------------------------------------------------------------------------------------
# override from the config


def override_stages(
    model: nn.Module, spec: Sequence[str | Sequence[str]], head: Sequence[str]
) -> tuple[tuple[str, ...], ...]:
    """Check a user's `model.stages` list and resolve its globs to module/parameter names."""
    tree = _read(model, head)
    known = _known_names(tree)
    taken: dict[str, int] = {}
    stages = []
    for i, item in enumerate(spec):
        where = f"model.stages[{i}]"
        names = _resolve_stage(item, known, where)
        covered = [n for n in tree.params if any(covers(x, n) for x in names)]
        _check_stage(tree, names, covered, taken, where)
        taken.update(dict.fromkeys(covered, i))
        stages.append(tuple(names))
    return tuple(stages)


def _known_names(tree: _Tree) -> list[str]:
    """Module names and parameter names, in model order."""
    names = []
    for name, module in tree.modules.items():
        prefix = f"{name}." if name else ""
        names += [name] if name else []
        names += [prefix + p for p, _ in module.named_parameters(recurse=False)
                  if prefix + p in tree.numel]
    return names


def _resolve_stage(item: Any, known: Sequence[str], where: str) -> list[str]:
    items = [item] if isinstance(item, str) else list(item) if _is_list(item) else None
    if not items or not all(isinstance(x, str) and x for x in items):
        raise FinetunePrepError(
            f"{where} is {item!r}; a stage is a module/parameter name, a glob, or a list of them,"
            " e.g. model.stages: [[conv1, bn1], layer1, layer2]."
        )
    names: list[str] = []
    for pattern in items:
        names += [n for n in _resolve_name(pattern, known, where) if n not in names]
    return [n for n in names if not any(covers(m, n) and m != n for m in names)]


def _is_list(item: Any) -> bool:
    return isinstance(item, Sequence) or type(item).__name__ == "ListConfig"


def _resolve_name(pattern: str, known: Sequence[str], where: str) -> list[str]:
    try:
        check_glob(pattern)
    except FinetunePrepError as err:
        raise FinetunePrepError(f"{where}: {err}") from None
    if any(c in pattern for c in "*?["):
        found = [n for n in known if fnmatch.fnmatchcase(n, pattern)]
    else:
        found = [pattern] if pattern in known else []
    if not found:
        hint = did_you_mean(pattern, known)
        tops = ", ".join(dict.fromkeys(n.split(".")[0] for n in known))
        raise FinetunePrepError(
            f"{where}: {pattern!r} is not a module or parameter name of this model.{hint}"
            f" Top-level modules: {tops}."
        )
    return found


def _check_stage(
    tree: _Tree, names: list[str], covered: list[str], taken: Mapping[str, int], where: str
) -> None:
    label = "+".join(names)
    if not covered:
        raise FinetunePrepError(
            f"{where} ({label}) holds no parameter (e.g. an activation or pooling layer); "
            "a stage must cover at least one parameter."
        )
    in_head = [n for n in covered if any(covers(h, n) for h in tree.head)]
    if in_head:
        raise FinetunePrepError(
            f"{where} ({label}) covers head parameter(s) {', '.join(in_head[:3])}; the head "
            f"({', '.join(tree.head)}) is never part of a stage. Name backbone modules only."
        )
    shared = [n for n in covered if n in taken]
    if shared:
        raise FinetunePrepError(
            f"{where} ({label}) overlaps model.stages[{taken[shared[0]]}]: both cover "
            f"{', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''}. Stages must not overlap."
        )
