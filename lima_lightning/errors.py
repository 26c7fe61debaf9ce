"""The one exception type for a user's mistake: the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """Bad input or configuration. The message names the option or file:line, the value and the fix."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the run stops before the optimizer applies it."""


class CheckFailed(Exception):
    """A self-check of the product failed (not the user's doing): one line on stderr, exit status 1."""
