"""The param_groups.json format: the only code that reads, validates and writes it.

`format` reads and writes the file, `validate` says what is wrong with a document, and
`allowlist` is the trust boundary: the only names a plan file can make this process look up.
"""

from finetune_prep.paramfile.format import FORMAT, READABLE, at_phase, dumps, read
from finetune_prep.paramfile.validate import GROUP_KEYS, UNITS, content_problems

__all__ = ["FORMAT", "GROUP_KEYS", "READABLE", "UNITS", "at_phase", "content_problems", "dumps",
           "read"]
