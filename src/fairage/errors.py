"""Errors that the CLI turns into one clear message and exit code 2.

Library code raises these for anything the *user* can fix (bad files, bad config,
bad arguments). Programming errors stay ordinary exceptions.
"""


class FairageError(Exception):
    """A user-fixable problem. The message names the file, row or key involved."""


class DataError(FairageError):
    """Missing, corrupt or inconsistent dataset files or prediction files."""


class ConfigError(FairageError):
    """An invalid experiment config, preset or override."""
