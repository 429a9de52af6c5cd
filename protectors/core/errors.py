"""User-facing errors shared by every layer of the suite.

Anything raised as a :class:`BenchError` is bad input (config, data, artifact, key): the CLI prints its message on
one line and exits with status 2, without a traceback.
"""


import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` (or ``'x' or 'y'``) for the closest choices, or ``""`` when none is close."""
    hint = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""


class BenchError(Exception):
    """Bad input that the user can fix; the message names the file or field."""


class ConfigError(BenchError):
    """A malformed config or invalid parameter."""


class DataError(BenchError):
    """A dataset that is missing or unreadable."""


class ArtifactError(BenchError):
    """A protected artifact that is missing, truncated, tampered with or unreadable."""


class KeyMaterialError(BenchError):
    """A key that is missing, malformed, or wrong for an artifact."""


class UnknownNameError(ConfigError):
    """A registry lookup for a name that is not registered."""


class NotApplicable(BenchError):
    """This plugin, mode or target does not apply here (a protector's mode with no ONNX deployment, an attack that
    needs what the run does not grant); the message says why and is shown in the table's row instead of a number."""
