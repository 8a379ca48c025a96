"""Writing files safely: in one step, with the user's permissions, checked before long work.

Every file minunet writes (networks, checkpoints, predictions, figures, JSON results) goes
through :func:`atomic_write`: the bytes go to a temporary file next to the target, which is
flushed to disk and then renamed over the target. A crash or a full disk therefore never
leaves a half-written file, and an existing file is replaced only by a complete one. The
temporary file is created with mode ``0o666`` minus the umask, as ``open()`` would create
the target itself.

:func:`check_writable` answers, before hours of training, whether the file could be written
at all, naming the user's path rather than a temporary one.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def _reserve_temporary(path: Path, what: str) -> Path:
    """Create (and close) a new empty file next to ``path``, with mode 0o666 minus the
    umask, creating missing folders; ``OSError`` naming ``what`` and ``path`` if that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(exc.errno, f"{what} {path}: cannot create its folder: "
                                   f"{exc.strerror}") from None
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue
        except OSError as exc:
            raise type(exc)(exc.errno, f"{what} {path} is not writable: "
                                       f"{exc.strerror}") from None


def atomic_write(path, write) -> None:
    """Call ``write(stream)`` with a binary file open on a temporary file next to ``path``,
    then move the result onto ``path`` in one step. Missing parent folders are created.

    ``write`` must write everything through ``stream`` (NumPy, Pillow, tifffile, matplotlib
    and ``json`` all take a file object). Errors name ``path``, never the temporary file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; give a file name")
    temporary = _reserve_temporary(path, "output")
    try:
        # opened by name, not from a descriptor: some writers (tifffile) want the file's name
        with open(temporary, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path, payload, *, indent: int = 2) -> None:
    """``payload`` as indented JSON (with a final newline) at ``path``, atomically."""
    text = json.dumps(payload, indent=indent) + "\n"
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def check_writable(path, what: str = "output") -> None:
    """Raise ``OSError`` naming ``path`` unless something can be written there: its folder
    (which is created if missing) must accept a new file.

    Call it before long work whose result goes to ``path``; ``what`` names the path in the
    message (e.g. ``"--out"``).
    """
    _reserve_temporary(Path(path), what).unlink()
