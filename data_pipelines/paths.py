"""Paths of workdirs and data: `etils.epath.Path` everywhere, so that any of them can be a gs:// bucket.

epath (what orbax and TFDS use) opens local paths with the os module and
gs:// (s3://, ...) URIs through fsspec (gcsfs). What it does not say is here:
whether a path is remote (an object store has no folders to check, no free
space to ask and no append), a path's absolute form (epath's `resolve` would
prefix a URI with the current folder), and how a decoder that only opens local
files by name (libsndfile, FFmpeg) reads a remote object: as a file object.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import IO

import fsspec
from etils import epath

# gcsfs caches the listings it made, without expiry; but a workdir on gs:// is written by other processes (the
# other hosts, a training job beside an evaluation), and a cached listing hides their new checkpoints. Set
# before epath makes its filesystem (fsspec's defaults for `fsspec.filesystem("gcs")`); a value set first wins.
for _protocol in ("gcs", "gs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is a URI of an object store (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` made absolute: a local one resolved as pathlib resolves it (symlinks too), a URI as it is."""
    return epath.Path(path) if is_remote(path) else epath.Path(pathlib.Path(path).resolve())


@contextlib.contextmanager
def readable(path: epath.PathLike) -> Iterator[str | IO[bytes]]:
    """What a decoder opens: a local file's name (libsndfile and FFmpeg read it themselves, fastest), a remote
    object as a binary file object (both decoders read file objects)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with epath.Path(path).open("rb") as f:
        yield f
