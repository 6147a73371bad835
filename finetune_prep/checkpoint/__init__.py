"""Read a checkpoint, unwrap it to a flat state dict, check that it fits a model, load it.

One module per step: `read` (path, bytes, formats), `unwrap` (nested keys, prefixes),
`fit` (names and shapes against the model, messages), `load` (materialize into the model).
Formats beside torch.save and safetensors files: `shards` (Hugging Face index + shards),
`dcp` (torch.distributed.checkpoint folders); `safe_unpickle` reads training checkpoints'
metadata without running it; `integrity` checks storage records and files that change.
"""

from finetune_prep.checkpoint import dcp, integrity, safe_unpickle, shards
from finetune_prep.checkpoint.fit import Fit, check_fit, fit_prefixes, group_keys
from finetune_prep.checkpoint.load import load_into, load_tensors
from finetune_prep.checkpoint.read import EXTENSIONS, Checkpoint, read_checkpoint
from finetune_prep.checkpoint.unwrap import ATTRIBUTES, NESTED, WRAPPERS

__all__ = [
    "ATTRIBUTES", "EXTENSIONS", "NESTED", "WRAPPERS", "Checkpoint", "Fit", "check_fit",
    "dcp", "fit_prefixes", "group_keys", "integrity", "load_into", "load_tensors",
    "read_checkpoint", "safe_unpickle", "shards",
]
