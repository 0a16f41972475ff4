"""User-facing errors.

Every mistake a user can make (a wrong name, a missing earlier stage, a broken
input file, ...) raises one subclass of :class:`MobsegError`. The CLI prints
``str(error)`` as one plain line and exits with status 1; a traceback is shown
only with ``--debug``. Programming errors are *not* MobsegErrors and surface as
ordinary exceptions.

Each subclass stands for one kind of mistake, so callers (and tests) can catch
exactly what they expect.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MobsegError(Exception):
    """Base class of all errors caused by the user's input or environment.

    Args:
        message: What is wrong, in one sentence.
        hint: What to do about it (optional); appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class UnknownNameError(MobsegError, ValueError):
    """A name (organ, method, preset, ...) that mobseg does not know."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.choices = sorted(choices)
        close = difflib.get_close_matches(name, self.choices, n=3, cutoff=0.5)
        if not close:
            close = [c for c in self.choices if name.lower() in c.lower()][:3]
        hint = (
            f"Did you mean {', '.join(repr(c) for c in close)}?"
            if close
            else (
                f"Choose one of: {', '.join(self.choices[:12])}"
                + (", ..." if len(self.choices) > 12 else ".")
            )
        )
        super().__init__(f"Unknown {kind} {name!r}.", hint)


class ConfigurationError(MobsegError, ValueError):
    """Options that are invalid alone or together (e.g. ``--noise global`` for mob)."""


class InvalidInputError(MobsegError):
    """An input file or folder is missing, corrupt or inconsistent.

    Args:
        message: What is wrong.
        case: The case id the file belongs to, when known.
        path: The offending file, when known.
        hint: What to do about it.
    """

    def __init__(
        self,
        message: str,
        case: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.case = case
        self.path = str(path) if path is not None else None
        where = []
        if case is not None:
            where.append(f"case {case}")
        if path is not None:
            where.append(str(path))
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message, hint)


class MissingStageError(MobsegError):
    """An earlier stage that this one needs has not finished.

    Args:
        key: Manifest key of the missing stage (``prepare/pancreas``).
        command: The command that produces it (``mobseg prepare --organ pancreas``).
    """

    def __init__(self, key: str, command: str, detail: str | None = None) -> None:
        self.key = key
        self.command = command
        msg = f"Stage {key!r} has not finished" + (f" ({detail})" if detail else "") + "."
        super().__init__(msg, f"Run `{command}` first.")


class DownloadError(MobsegError):
    """A download failed, or its file does not match the published size or checksum."""


class StorageError(MobsegError):
    """A file cannot be written, verified or locked: the disk is full, the folder is
    read-only, or a path that must be a folder is a file (or lies below one)."""


class BusyError(MobsegError):
    """Another process is running the same stage (it holds the stage's lock)."""


class ManifestError(MobsegError):
    """The manifest file is unreadable or from an incompatible mobseg version."""


class NotImplementedYetError(MobsegError):
    """A command whose stage is not built yet (never pretend it ran)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not implemented yet.")
