"""The exception types the CLI prints as one line, no traceback: a user's mistake (exit 2), or what is unavailable (exit 1)."""


class UserError(Exception):
    """Bad input or configuration. The message names the option or file:line, the value and the fix."""

    exit_status = 2


class Unavailable(UserError):
    """Something outside the input failed (the hub is out of reach, the disk is full): one line, exit status 1."""

    exit_status = 1


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the run stops before the optimizer applies it."""


class CheckFailed(Exception):
    """A self-check of the product failed (not the user's doing): one line on stderr, exit status 1."""
