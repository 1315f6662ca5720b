"""The one marker of an error that is the user's to fix.

Every named error of the library (a bad config key, a missing dataset, a corrupt episode or checkpoint,
data that does not fit the config, ...) derives from :class:`WorldflowError` as well as from the builtin
it always was (``ConfigError`` is still a ``ValueError``), so ``except ValueError`` keeps working. The
``worldflow`` command prints such an error as one line, ``worldflow: error: <message>``, and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["WorldflowError", "DataMismatchError", "InputError", "one_line"]


class WorldflowError(Exception):
    """An error caused by input the user can change; its message names the problem and the fix."""


class DataMismatchError(WorldflowError, ValueError):
    """A dataset does not fit the config or the run (frame size, clip length, action space)."""


def one_line(err: BaseException, limit: int = 600) -> str:
    """An error's message on one line, cut at ``limit`` characters (``--debug`` shows the rest)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
            and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text if len(text) <= limit else text[: limit - 30] + " ... (--debug shows all of it)"


class InputError(WorldflowError, ValueError):
    """An argument, file or environment the user supplied is outside what worldflow accepts."""
