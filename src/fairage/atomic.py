"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new
one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary name keeps ``path``'s suffix (or ``suffix``) so libraries that
    infer the format from the extension (matplotlib, numpy) behave. On an exception
    the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix or path.suffix}")
    except OSError as err:
        raise _naming(err, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the result the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        # a write to an open file (full disk) names no file, and the temporary name means nothing
        # to the caller: name the target
        if isinstance(err, OSError) and (err.filename is None or str(tmp_path) in (err.filename, err.filename2)):
            raise _naming(err, path) from None
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` about the file the caller asked for, not the temporary file it never sees."""
    return type(err)(err.errno, err.strerror or str(err), str(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class _WriteRecorder:
    """A binary file's ``write``/``flush`` that remembers the OSError a write raised.

    ``torch.save`` writes through a C++ zip writer that turns a failed Python write (a full
    disk) into ``RuntimeError: ... unexpected pos``; the recorded error says what happened.
    """

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as err:
            self.error = err
            raise


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically; a full disk is an OSError naming ``path`` (nothing half-written)."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            err = recorder.error
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from None
