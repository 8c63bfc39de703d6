"""A full disk while writing: one line that names the path and the cause, never a half-written result.

Checkpoints, metrics and evaluation outputs are written to the workdir. When
the storage under it is full (ENOSPC), over quota (EDQUOT) or the process hits
its file-size limit (EFBIG), the run stops with `StorageFullError`, which the
CLI prints as one line. Nothing already written is lost: orbax writes each
checkpoint to a temporary folder and renames it only once complete, so the
previous checkpoint stays the newest readable one, and running the same
command again once space is freed resumes from it exactly.

Errors reach us in two shapes: OSError from Python file writes (errno set),
and errors of orbax's storage layer (TensorStore), which carry the system's
message in their text; both are recognised here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# The messages of those errno values, as storage libraries that only keep the text report them.
FULL_MESSAGES = tuple(os.strerror(code) for code in FULL_ERRNOS)


class StorageFullError(OSError):
    """Writing `path` failed for lack of space; the message is the one line a user sees."""


def full_cause(error: BaseException) -> str | None:
    """The storage-full cause ("No space left on device", ...) of `error` or of what it wraps, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return os.strerror(error.errno)
        text = str(error)
        for message in FULL_MESSAGES:
            if message.lower() in text.lower():
                return message
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turns a storage-full error raised inside into StorageFullError naming `what` and `path`."""
    try:
        yield
    except StorageFullError:
        raise
    except Exception as e:
        if (cause := full_cause(e)) is None:
            raise
        raise StorageFullError(
            f"writing {what} to {path}: {cause}. Nothing written before is lost: free space and run "
            "the same command again to resume from the newest checkpoint"
        ) from e
