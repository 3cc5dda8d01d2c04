"""Errors that reach the user as one line.

Every error a user can cause (bad model folder, bad input line, bad sampling value, a
request that can never fit) is a SeesawError subclass whose message is a complete, single
sentence. The CLI prints `seesaw-mc: error: <message>` and exits non-zero; the API raises it.
ConfigError and InputError are ValueErrors so that API users can catch the usual type.
"""


class SeesawError(Exception):
    """Base class: str(err) is the whole one-line message."""

    exit_code = 1


class ConfigError(SeesawError, ValueError):
    """Invalid engine option, layout or sampling value."""

    exit_code = 2


class InputError(SeesawError, ValueError):
    """A bad request or input-file line (the message names the line)."""

    exit_code = 2


class ModelError(SeesawError):
    """Missing, corrupt or unsupported model folder."""

    exit_code = 3


class CapacityError(SeesawError, ValueError):
    """A request that can never fit the KV cache or the model's context."""

    exit_code = 2


class RankFailure(SeesawError):
    """Another rank died or hung: this one stops; --resume finishes the job."""

    exit_code = 4
