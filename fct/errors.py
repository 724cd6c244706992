"""User-facing errors: one clear line and exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config key, missing file, wrong dimensions).

    Entry scripts catch it, print ``error: <message>`` and exit with code 2.
    """

    exit_code = 2


class ConfigError(UserError):
    """A configuration file or override is invalid."""


class RunError(Exception):
    """A run that cannot go on (e.g. a non-finite loss). Reported in one line, exit code 1;
    the last good checkpoint is left intact."""

    exit_code = 1
