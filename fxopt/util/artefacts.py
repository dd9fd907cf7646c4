"""Artefacts of several files, written and read as one unit.

Every folder fxopt writes (a saved model, a pruned model, an fpga or xla export) is
made the same way:

1. `check_destination(path, kind)` before any work: the path is new, an empty
   folder, or an earlier artefact of the same kind (recognised by its manifest);
   anything else holds the user's files and is refused, never replaced. Its parent
   must be writable.
2. `writing(path, kind)` yields a staging folder beside `path` to fill. On success
   it writes `manifest.json` (kind, and every file's relative name, size and
   sha256) and switches the staging folder in with one atomic rename: Linux's
   renameat2(RENAME_EXCHANGE) swaps it with an earlier artefact, so at every moment
   `path` holds either the whole old artefact or the whole new one. The old one is
   then removed. A staging folder an interrupted write left behind (recognised by
   its marker file) is removed by the next write to the same path.
3. `check_manifest(path, kind)` in every loader, before anything is read: the
   manifest's kind, every listed file present with its size and hash, every name
   inside the folder. Loaders open files only through the mapping it returns.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile

from ..errors import FxoptError
from .files import umask

__all__ = ["MANIFEST", "check_destination", "check_manifest", "check_writable", "describe_file", "is_artefact",
           "writing"]

MANIFEST = "manifest.json"
_MARKER = ".fxopt-staging"          # in every staging folder: only these are ever cleaned up
_STAGING = ".{name}.fxopt-staging-"
_NEW = ".{name}.fxopt-new-"


def check_destination(path, kind: str) -> str:
    """`path` as a str, if an artefact of `kind` may be written there; else FxoptError.
    Call it before the work that produces the artefact."""
    try:
        folder = os.fspath(path)
    except TypeError:
        raise FxoptError(f"an artefact path must be a path, got {type(path).__name__}",
                         hint="e.g. 'artefacts/model'") from None
    absolute = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FxoptError(f"cannot write {kind} to {folder!r}: it is a file", where=folder,
                         hint="give a new folder path")
    cwd = os.getcwd()
    if absolute == cwd or cwd.startswith(absolute.rstrip(os.sep) + os.sep):
        raise FxoptError(f"cannot write {kind} to {folder!r}: it is the current folder (or holds it)",
                         where=folder, hint="give a new subfolder, e.g. 'export'")
    if os.path.isdir(folder) and os.listdir(folder) and not is_artefact(folder, kind):
        raise FxoptError(f"cannot write {kind} to {folder!r}: it holds files fxopt did not write there",
                         where=folder, hint="give a new or empty folder (nothing in this one is touched)")
    check_writable(folder, kind)
    return folder


def check_writable(path, what: str) -> None:
    """`path` can be created or replaced: its nearest existing folder is writable, and no
    folder on the way is a file. Call it before the work whose result goes there."""
    folder = os.fspath(path)
    existing = os.path.dirname(os.path.abspath(folder))
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise FxoptError(f"cannot write {what} to {folder!r}: {existing!r} is a file", where=folder,
                             hint="give a path whose folders are folders")
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FxoptError(f"cannot write {what} to {folder!r}: {existing!r} is not writable", where=folder,
                         hint="give a path in a writable place")


def is_artefact(path, kind: str) -> bool:
    """True if `path` holds a manifest of `kind` (its files are not checked)."""
    try:
        with open(os.path.join(os.fspath(path), MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == kind


@contextlib.contextmanager
def writing(path, kind: str):
    """Yield a staging folder to fill; on success it becomes `path` with its manifest (see
    the module docstring); on any error it is removed and `path` is left as it was."""
    folder = check_destination(path, kind)
    absolute = os.path.abspath(folder)
    parent, name = os.path.dirname(absolute), os.path.basename(absolute)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_staging(parent, name)
    staging = _new_staging(parent, name)
    try:
        yield staging
        _write_manifest(staging, kind)
        _usual_permissions(staging)
        _fsync_tree(staging)
        _switch_in(staging, absolute)
        with contextlib.suppress(OSError):   # marked until switched in: a crash before leaves it to clean-up
            os.unlink(os.path.join(absolute, _MARKER))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_manifest(path, kind: str) -> dict[str, str]:
    """{relative name: full path} of the artefact at `path`, after checking its manifest
    (kind, names inside the folder, sizes, sha256); else FxoptError naming the file."""
    folder = os.fspath(path)
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FxoptError(f"{folder!r} holds no {MANIFEST}: it is not a {kind} artefact fxopt wrote, "
                         "or it is incomplete", where=folder, hint=f"give the folder fxopt wrote the {kind} to")
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise FxoptError(f"{manifest_path!r} cannot be read: {exc}", where=manifest_path,
                         hint="write the artefact again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        said = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise FxoptError(f"{folder!r} is not a {kind} artefact (its manifest says {said!r})", where=manifest_path,
                         hint="load it with the function that matches how it was written")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise FxoptError(f"{manifest_path!r} has no 'files' table", where=manifest_path,
                         hint="write the artefact again")
    files = {name: inside(folder, name, manifest_path) for name in listed}   # every name first
    for name, expected in listed.items():
        full = files[name]
        if not os.path.isfile(full) or os.path.islink(full) or describe_file(full) != expected:
            raise FxoptError(f"{full!r} does not match {MANIFEST} (missing, truncated or changed)",
                             where=full, hint="the artefact is damaged or was edited; write it again")
    return files


def inside(folder: str, name, source: str) -> str:
    """The path of `name` in `folder`, if `name` is a relative path that stays inside it
    (no absolute path, no `..`, no link leading out); else FxoptError naming `source`."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise FxoptError(f"{source!r} names a path outside its folder: {name!r}", where=source,
                         hint="the artefact was tampered with; write it again")
    full = os.path.join(folder, *name.split("/"))
    root = os.path.realpath(folder)
    if not os.path.realpath(full).startswith(root + os.sep):
        raise FxoptError(f"{source!r} names a path that leads outside its folder: {name!r}", where=source,
                         hint="the artefact was tampered with; write it again")
    return full


def describe_file(path: str) -> dict:
    """{"size", "sha256"} of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _write_manifest(staging: str, kind: str) -> None:
    files = {}
    for root, dirs, names in os.walk(staging):
        dirs.sort()
        for name in sorted(set(names) - {_MARKER} if root == staging else names):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, staging).replace(os.sep, "/")
            files[relative] = describe_file(full)
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({"format": kind, "files": files}, fh, indent=1)


def _switch_in(staging: str, target: str) -> None:
    """Make `staging` the folder at `target` with one rename (an exchange with an earlier
    artefact there), then remove the earlier one."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    open(os.path.join(target, _MARKER), "wb").close()   # the old one, once out of the way, is clean-up's
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)   # it now holds the earlier artefact
        return
    old = os.path.join(os.path.dirname(target), _STAGING.format(name=os.path.basename(target)) + f"{os.getpid()}-old")
    os.rename(target, old)      # no atomic exchange on this system: a brief moment without `target`
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _new_staging(parent: str, name: str) -> str:
    """An empty staging folder that holds the marker from the moment it has its name (made
    under a `new` name first: a crash there leaves at most a marker in an empty folder)."""
    fresh = tempfile.mkdtemp(prefix=_NEW.format(name=name), dir=parent)
    open(os.path.join(fresh, _MARKER), "wb").close()
    staging = os.path.join(parent, _STAGING.format(name=name) + os.path.basename(fresh)[len(_NEW.format(name=name)):])
    os.rename(fresh, staging)
    return staging


def _remove_stale_staging(parent: str, name: str) -> None:
    """What an interrupted write to this path left: staging folders (each holds the marker)
    and `new` folders holding nothing but the marker."""
    for entry in os.listdir(parent):
        full = os.path.join(parent, entry)
        if not os.path.isdir(full) or os.path.islink(full):
            continue
        if entry.startswith(_STAGING.format(name=name)) and os.path.isfile(os.path.join(full, _MARKER)):
            shutil.rmtree(full, ignore_errors=True)
        elif entry.startswith(_NEW.format(name=name)) and set(os.listdir(full)) <= {_MARKER}:
            shutil.rmtree(full, ignore_errors=True)


def _usual_permissions(folder: str) -> None:
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _fsync_tree(folder: str) -> None:
    """Flush every file to disk before the switch: a crash after it finds them whole."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
