"""The project's user-facing error types.

Anything a user can cause (bad config, bad data, missing file, impossible layout) raises a
`UserError` with a one-line message that names the thing and the fix. Entry points catch it,
print `error: <message>` and exit with code 2.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""


class ConfigError(UserError):
    """A bad TOML file, unknown key, wrong type or impossible value."""


class DataError(UserError):
    """A missing or malformed data file or tokenizer."""


class CheckpointError(UserError):
    """A missing, partial or mismatched checkpoint."""
