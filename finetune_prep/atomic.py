"""All-or-nothing file writes (temp file, fsync, rename), free of torch so any module can use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune_prep.errors import FinetunePrepError


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file, fsync and rename: all or nothing.

    An OSError (folder not writable, disk full, `path` is a folder) becomes a FinetunePrepError
    naming the path and the reason; any previous file at `path` is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise FinetunePrepError(
                f"cannot write {path}: {err.strerror or err}. Nothing was written and an "
                "earlier file of that name is unchanged. Free disk space or make the folder "
                "writable, or choose another output folder with hydra.run.dir=DIR."
            ) from err
        raise
