"""Writing one file so that a failure never leaves half a file: write to a temp name in
the target's folder, flush it to disk, then rename over the target (atomic on one
file system). Artefacts of several files: fxopt.util.artefacts."""
from __future__ import annotations

import contextlib
import os
import tempfile


_SUFFIX = ".fxopt-tmp"


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path, data: str | bytes) -> str:
    """Write `data` (text as UTF-8, or bytes) to `path` via a temp file and a rename;
    on any error the temp file is removed and `path` is left as it was. The file gets
    the usual permissions (mkstemp's are owner-only). A temp file a killed write to the
    same path left behind is removed first."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    for entry in os.listdir(folder):   # mkstemp's names: the prefix, 8 characters, the suffix
        if entry.startswith(prefix) and entry.endswith(_SUFFIX) and len(entry) == len(prefix) + 8 + len(_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=_SUFFIX, dir=folder)
    os.chmod(tmp, 0o666 & ~umask())
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w",
                       **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
