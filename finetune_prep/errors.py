"""The one user-facing error type, and the one "Did you mean" hint that its messages share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from hydra.errors import CompactHydraException


class FinetunePrepError(CompactHydraException):
    """A mistake in the user's config, checkpoint or files; the CLI prints it alone and exits 1.

    It is a CompactHydraException so that Hydra, too, prints only the message (not a
    traceback) when it re-raises a failed multirun job at the end of a sweep.
    """


def did_you_mean(word: str, options: Iterable[str], n: int = 5, cutoff: float = 0.6) -> str:
    """' Did you mean: a, b?' naming the options closest to `word`, or '' if none is close."""
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def listing(what: str, names: list[str], limit: int = 8) -> str:
    """'3 what: a, b, c' naming at most `limit` of `names` ('' when there are none)."""
    if not names:
        return ""
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {what}: {', '.join(names[:limit])}{more}"
