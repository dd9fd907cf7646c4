"""Things found by name and imported on first use: built-in tables and installed plugins.

A registry (passes, backends) keeps a table of names -> the module that registers the
thing when imported, and adds what installed packages list under an entry-point group
(`[project.entry-points."fxopt.passes"] my-pass = "mypkg.my_pass"`), so neither
`import fxopt` nor a plugin's user imports anything the run does not name.
"""
from __future__ import annotations

import importlib
import importlib.metadata

from ..errors import FxoptError

__all__ = ["entry_point_modules", "import_provider"]


def entry_point_modules(group: str) -> dict[str, str]:
    """{name: module} of the installed packages' entry points in `group` (`module:attr` names its module)."""
    return {ep.name: ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group=group)}


def import_provider(what: str, module: str, error: type[FxoptError]) -> None:
    """Import the module that registers `what` (e.g. "pass 'prune-channels'"); an ImportError
    becomes `error` naming both."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise error(f"{what}: its module {module!r} does not import: {exc}",
                    hint="install what it needs, or choose another") from exc
