"""The one user-facing error type: a message that says what is wrong and how to fix it."""

from hydra.errors import CompactHydraException


class FinetunePrepError(CompactHydraException):
    """A mistake in the user's config, checkpoint or files; the CLI prints it alone and exits 1.

    It is a CompactHydraException so that Hydra, too, prints only the message (not a
    traceback) when it re-raises a failed multirun job at the end of a sweep.
    """
