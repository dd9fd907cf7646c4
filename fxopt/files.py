"""Writing files so that a failure never leaves half a file: write to a temp name in
the target's folder, then rename over the target (atomic on one file system)."""
from __future__ import annotations

import os
import tempfile


def write_atomically(path, data: str | bytes) -> str:
    """Write `data` (text as UTF-8, or bytes) to `path` via a temp file and a rename;
    on any error the temp file is removed and `path` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fxopt-", suffix=".tmp", dir=folder)
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
