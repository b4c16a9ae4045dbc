"""The one error type for failures a user can fix."""


class CtxdiffError(Exception):
    """A failure the user can fix; the CLI prints the message alone and exits 1."""

    exit_code = 1


class UsageError(CtxdiffError):
    """Bad command-line usage or configuration (a bad flag, recipe key or `--set`); exit 2."""

    exit_code = 2
