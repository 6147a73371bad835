"""The one user-facing error type: a message that says what is wrong and how to fix it."""


class FinetunePrepError(Exception):
    """A mistake in the user's config, checkpoint or files; the CLI prints it alone and exits 1."""
