"""A model's head: which module it is, and a fresh one of the right size built by its family.

`head.mode` says what the user means:
- `replace` (default): the head is replaced by a fresh one with `head.num_outputs` outputs, built
  by the builder of its own family (see BUILDERS): a Linear, a 1x1 conv, torchvision's
  FastRCNNPredictor / MaskRCNNPredictor, RetinaNet / FCOS / SSD classification heads, the
  segmentation heads (DeepLabHead, FCNHead, LRASPPHead: their final convs).
- `keep`: the model's own head, whatever its size (`head.num_outputs` is ignored).
- `none`: no head (a backbone); `@head` then selects nothing and rules using it are refused.

The head is never guessed. It is what the architecture declares (torchvision's classifiers,
detection and segmentation models, timm's `get_classifier()`), what `head.module` names, or, for
any other model, its last layer when that layer is a Linear or 1x1 conv outside every
transformer layer. Auxiliary heads are only the ones an architecture declares: inception_v3's
`AuxLogits.fc`, googlenet's `aux1.fc2`/`aux2.fc2` (aux_logits=True) and a segmentation model's
`aux_classifier`. Anything else is a clear error that says how to name the head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.plan.memory import check_memory

HEAD_MODES = ("replace", "keep", "none")
# layers a head is never inside: replacing one of their Linears rewires attention or an MLP
TRANSFORMER_LAYERS: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention,
    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
)


def head_mode(head_cfg: Any) -> str:
    """`head.mode` as a string (an enum's name, or replace when unset), checked."""
    mode = head_cfg.get("mode") if hasattr(head_cfg, "get") else None
    mode = str(getattr(mode, "value", mode) or "replace")
    if mode not in HEAD_MODES:
        raise FinetunePrepError(f"head.mode={mode!r} is not one of {', '.join(HEAD_MODES)}.")
    return mode


def replace_heads(
    model: nn.Module, model_cfg: Any, head_cfg: Any, num_outputs: int | None, meta: bool,
    sized: bool = False,
) -> tuple[str, ...]:
    """Find the head(s) head.mode asks for and, in replace mode, give them `num_outputs`
    outputs (unless the constructor already did: `sized`). Return the head module names,
    main head first."""
    mode = head_mode(head_cfg)
    named = head_cfg.get("module") if hasattr(head_cfg, "get") else None
    if mode == "none":
        if named:
            raise FinetunePrepError(
                f"head.module={named!r} with head.mode=none: a model without a head has no head "
                "module. Set head.mode=replace (or keep) to use it, or head.module=null.")
        return ()
    source = str(getattr(model_cfg.source, "value", model_cfg.source))
    heads = [checked_module(model, named)] if named else main_heads(model, source)
    heads += [a for a in aux_heads(model) if a not in heads]
    if mode == "keep":
        return tuple(heads)
    assert num_outputs is not None
    # the constructor sized the heads it declares (torchvision's num_classes, timm's)
    done = set(main_heads(model, source) + aux_heads(model)) if sized else set()
    modules = dict(model.named_modules())
    for name in (h for h in heads if h not in done):
        new = fresh(modules[name], name, num_outputs, meta=True)
        if not meta:
            check_memory(sum(p.numel() for p in new.parameters()), f"the new head {name}")
            new = fresh(modules[name], name, num_outputs, meta=False)
        set_module(model, name, new)
    return tuple(heads)


def checked_module(model: nn.Module, name: str) -> str:
    """`head.module` if it names a module of the model, else an error with close names."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        options = [n for n, m in modules.items() if builder_for(m) is not None]
        raise FinetunePrepError(
            f"head.module={name!r} is not a module of this model.{did_you_mean(name, options)}"
            f" Modules it could replace: {', '.join(options[-5:]) or 'none'}."
        )
    return name


# ---------------------------------------------------------------------------------------------
# which module is the head


def main_heads(model: nn.Module, source: str) -> list[str]:
    """The head the architecture declares (see the module docstring); an error when there is
    none the tool can know without guessing."""
    for declared in (detection_heads, segmentation_heads):
        names = declared(model)
        if names:
            return names
    if source == "timm" or callable(getattr(model, "get_classifier", None)):
        names = list(timm_head(model))
        if names:
            return names
    if _is_torchvision_classifier(model):
        return [classifier_head(model)]
    last = _last_layer(model)
    if last is not None:
        return [last]
    raise FinetunePrepError(_ask_message(model))


def detection_heads(model: nn.Module) -> list[str]:
    """torchvision detection models: the class predictors (box, mask) or classification head."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    if isinstance(model, GeneralizedRCNN):
        roi = model.roi_heads
        found = ["roi_heads.box_predictor"]
        if getattr(roi, "mask_predictor", None) is not None:
            found.append("roi_heads.mask_predictor")
        return found
    if isinstance(model, (RetinaNet, FCOS, SSD)):
        return ["head.classification_head"]
    return []


def segmentation_heads(model: nn.Module) -> list[str]:
    """torchvision segmentation models: the main classifier's final conv(s) (the auxiliary
    classifier is in aux_heads)."""
    from torchvision.models.segmentation.lraspp import LRASPP

    if isinstance(model, LRASPP):
        return ["classifier.low_classifier", "classifier.high_classifier"]
    if _is_segmentation(model):
        return [f"classifier.{len(model.classifier) - 1}"]
    return []


def aux_heads(model: nn.Module) -> list[str]:
    """Auxiliary classifiers only where the architecture declares them."""
    from torchvision.models import GoogLeNet, Inception3

    if isinstance(model, Inception3) and model.AuxLogits is not None:
        return ["AuxLogits.fc"]
    if isinstance(model, GoogLeNet) and model.aux1 is not None:
        return ["aux1.fc2", "aux2.fc2"]
    if _is_segmentation(model) and model.aux_classifier is not None:
        return [f"aux_classifier.{len(model.aux_classifier) - 1}"]
    return []


def _is_segmentation(model: nn.Module) -> bool:
    from torchvision.models.segmentation._utils import _SimpleSegmentationModel

    return isinstance(model, _SimpleSegmentationModel)


def _is_torchvision_classifier(model: nn.Module) -> bool:
    module = type(model).__module__
    return module.startswith("torchvision.models.") and not module.startswith(
        ("torchvision.models.detection", "torchvision.models.segmentation",
         "torchvision.models.video", "torchvision.models.optical_flow",
         "torchvision.models.quantization"))


def classifier_head(model: nn.Module) -> str:
    """A torchvision classifier's head: its last Linear, or its final 1x1 conv (squeezenet)."""
    modules = list(model.named_modules())
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in modules if isinstance(m, nn.Conv2d)]
    if convs and convs[-1][1].kernel_size == (1, 1):
        return convs[-1][0]
    raise FinetunePrepError(_ask_message(model))


def _last_layer(model: nn.Module) -> str | None:
    """The model's last parameterized layer, when it is a Linear or a 1x1 conv outside every
    transformer layer: for a model the tool does not know, the only head it takes unasked."""
    modules = dict(model.named_modules())
    owners = [n.rpartition(".")[0] for n, _ in model.named_parameters()]
    if not owners:
        return None
    last = owners[-1]
    layer = modules[last]
    is_head = isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))
    parts = last.split(".")
    inside = [".".join(parts[:i]) for i in range(len(parts))]
    if not is_head or any(isinstance(modules[p], TRANSFORMER_LAYERS) for p in inside):
        return None
    return last


def _ask_message(model: nn.Module) -> str:
    modules = [(n, m) for n, m in model.named_modules() if n and builder_for(m) is not None]
    tail = ", ".join(f"{n} ({type(m).__name__})" for n, m in modules[-4:]) or "none"
    return (
        f"cannot tell which module of this {type(model).__name__} is its head, and finetune_prep "
        "never guesses (its last layer is not a Linear or 1x1 conv on its own, or it sits inside "
        "a transformer layer). Say what you mean: head.module=NAME to replace that module "
        f"(last replaceable modules: {tail}), head.mode=keep with head.module=NAME to keep it "
        "as it is, or head.mode=none to plan without a head.")


def timm_head(model: nn.Module) -> tuple[str, ...]:
    """timm's own classifier(s): distilled models return (head, head_dist)."""
    found = model.get_classifier()
    targets = found if isinstance(found, tuple) else (found,)
    targets = tuple(t for t in targets if isinstance(t, nn.Module) and any(
        True for _ in t.parameters()))
    return tuple(n for n, m in model.named_modules() if any(m is t for t in targets))


# ---------------------------------------------------------------------------------------------
# fresh heads, by family


def _linear(old: nn.Linear, n: int) -> nn.Module:
    return nn.Linear(old.in_features, n, bias=old.bias is not None)


def _conv(old: nn.Conv2d, n: int) -> nn.Module:
    return nn.Conv2d(old.in_channels, n, kernel_size=1, bias=old.bias is not None)


def _fast_rcnn(old: nn.Module, n: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(old.cls_score.in_features, n)


def _mask_rcnn(old: nn.Module, n: int) -> nn.Module:
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    conv = old.conv5_mask
    return MaskRCNNPredictor(conv.in_channels, conv.out_channels, n)


def _norm_of(old: nn.Module) -> Callable[..., nn.Module] | None:
    """The norm-layer factory a detection head was built with (GroupNorm's group count)."""
    norms = [m for m in old.conv.modules() if isinstance(m, nn.GroupNorm)]
    return partial(nn.GroupNorm, norms[0].num_groups) if norms else None


def _retinanet(old: nn.Module, n: int) -> nn.Module:
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    return RetinaNetClassificationHead(old.cls_logits.in_channels, old.num_anchors, n,
                                       norm_layer=_norm_of(old))


def _fcos(old: nn.Module, n: int) -> nn.Module:
    from torchvision.models.detection.fcos import FCOSClassificationHead

    convs = sum(isinstance(m, nn.Conv2d) for m in old.conv)
    return FCOSClassificationHead(old.cls_logits.in_channels, old.num_anchors, n,
                                  num_convs=convs, norm_layer=_norm_of(old))


def _ssd(old: nn.Module, n: int) -> nn.Module:
    from torchvision.models.detection.ssd import SSDClassificationHead

    convs = list(old.module_list)
    return SSDClassificationHead([c.in_channels for c in convs],
                                 [c.out_channels // old.num_columns for c in convs], n)


def _final_conv(old: nn.Module, n: int) -> nn.Module:
    """A segmentation head (DeepLabHead, FCNHead: nn.Sequential) with its last conv -> n."""
    new = copy.deepcopy(old)
    last = len(new) - 1
    new[last] = _conv(new[last], n)
    return new


def _lraspp(old: nn.Module, n: int) -> nn.Module:
    new = copy.deepcopy(old)
    new.low_classifier = _conv(old.low_classifier, n)
    new.high_classifier = _conv(old.high_classifier, n)
    return new


def _builders() -> list[tuple[type[nn.Module], Callable[[Any, int], nn.Module], str]]:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.fcos import FCOSClassificationHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead
    from torchvision.models.detection.ssd import SSDClassificationHead
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead
    from torchvision.models.segmentation.lraspp import LRASPPHead

    return [
        (FastRCNNPredictor, _fast_rcnn, "FastRCNNPredictor (cls_score N, bbox_pred 4N)"),
        (MaskRCNNPredictor, _mask_rcnn, "MaskRCNNPredictor (N mask logits)"),
        (RetinaNetClassificationHead, _retinanet, "RetinaNetClassificationHead"),
        (FCOSClassificationHead, _fcos, "FCOSClassificationHead"),
        (SSDClassificationHead, _ssd, "SSDClassificationHead"),
        (DeepLabHead, _final_conv, "DeepLabHead (its last conv)"),
        (FCNHead, _final_conv, "FCNHead (its last conv)"),
        (LRASPPHead, _lraspp, "LRASPPHead (low and high classifiers)"),
        (nn.Linear, _linear, "nn.Linear"),
    ]


def builder_for(module: nn.Module) -> Callable[[Any, int], nn.Module] | None:
    """The family builder of a head module (exact type first), or None."""
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d:
        return _conv if module.kernel_size == (1, 1) else None
    for cls, build, _ in _builders():
        if type(module) is cls:
            return build
    for cls, build, _ in _builders():
        if isinstance(module, cls):
            return build
    return None


def buildable() -> list[str]:
    """What replace mode can build, for messages."""
    return [label for _, _, label in _builders()] + ["nn.Conv2d with a 1x1 kernel"]


def fresh(old: nn.Module, name: str, num_outputs: int, meta: bool) -> nn.Module:
    """A new head of `old`'s family with `num_outputs` outputs, built on meta or the CPU."""
    build = builder_for(old)
    if build is None:
        raise FinetunePrepError(
            f"head.module={name!r} is a {type(old).__name__}, which finetune_prep cannot rebuild "
            f"with a new size. It can replace: {', '.join(buildable())}. Name one of those with "
            "head.module=..., keep this head as it is with head.mode=keep, or leave "
            "head.module=null for the head the architecture declares.")
    with torch.device("meta") if meta else nullcontext():
        return build(old, num_outputs)


def fresh_head(old: nn.Module, num_outputs: int, device: str | None = None) -> nn.Module:
    """A new Linear or 1x1 conv head (kept for the Hugging Face builder)."""
    return fresh(old, "head", num_outputs, meta=device == "meta")


def own_outputs(model: nn.Module, heads: Sequence[str]) -> int | None:
    """How many outputs (classes) the main head has, when its family says."""
    if not heads:
        return None
    head = model.get_submodule(heads[0])
    for attr in ("num_classes", "out_features", "out_channels"):
        if isinstance(getattr(head, attr, None), int):
            return int(getattr(head, attr))
    if hasattr(head, "cls_score"):
        return int(head.cls_score.out_features)
    if hasattr(head, "mask_fcn_logits"):
        return int(head.mask_fcn_logits.out_channels)
    return None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def task_of(model: nn.Module) -> str:
    """What the proof must feed the model: detection (images and targets in train mode),
    segmentation (a dict of outputs), else classification (a tensor batch)."""
    if detection_heads(model):
        return "detection"
    from torchvision.models.segmentation.lraspp import LRASPP

    if _is_segmentation(model) or isinstance(model, LRASPP):
        return "segmentation"
    return "classification"
