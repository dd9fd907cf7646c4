"""An offline English training corpus for MiniLM: sentences from text that ships with
installed packages, never from the evaluation sentences.

Sources (read from this machine's installation; nothing is downloaded or cached):
- the dataset descriptions bundled with scikit-learn (`sklearn/datasets/descr/*.rst`);
- the docstrings of the Python standard library's top-level modules (`<stdlib>/*.py`);
- the package descriptions in installed distributions' metadata (`*.dist-info/METADATA`).

Each text is split into sentences and kept only when it reads as plain English prose:
5 to 40 words, starting with a capital letter and ending with a full stop, made of
letters and ordinary punctuation (no code: no brackets, underscores, `=`, `>>>`,
backticks, slashes), at most one word with a digit. Sentences are deduplicated and
every sentence of benchmarks/data/sentences.txt (the evaluation set) is excluded.
Building it reads a few hundred files and takes about a second.
"""
from __future__ import annotations

import importlib.util
import re
import sysconfig
from pathlib import Path

from .minilm import sentences as evaluation_sentences

__all__ = ["corpus", "sources"]

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
_CODE = re.compile(r"[()\[\]{}_=<>`/\\|#*@$%^~&]|\.\.|::|>>>|https?:|www\.")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,;:]?$")


def _site_packages() -> Path | None:
    spec = importlib.util.find_spec("sklearn") or importlib.util.find_spec("torch")
    return Path(spec.origin).parent.parent if spec and spec.origin else None


def sources() -> dict[str, list[Path]]:
    """{source name: the files it reads}, in a fixed order."""
    site = _site_packages()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {"sklearn dataset descriptions": sorted(site.glob("sklearn/datasets/descr/*.rst")) if site else [],
             "stdlib module docstrings": sorted(stdlib.glob("*.py")),
             "package metadata": sorted(site.glob("*.dist-info/METADATA")) if site else []}
    return found


def _texts(name: str, path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if name == "stdlib module docstrings":
        return _DOCSTRING.findall(text)
    if name == "package metadata":
        head, _, body = text.partition("\n\n")      # the headers, then the long description
        return [body]
    return [text]


def _clean(sentence: str) -> str | None:
    """The sentence on one line if it reads as plain prose, else None."""
    s = " ".join(sentence.split())
    words = s.split(" ")
    if not 5 <= len(words) <= 40 or not s[0].isupper() or not s.endswith("."):
        return None
    if _CODE.search(s) or s.count('"') % 2:
        return None
    plain = sum(bool(_WORD.match(w.rstrip("."))) for w in words)
    digits = sum(any(c.isdigit() for c in w) for w in words)
    if plain < len(words) - 1 or digits > 1 or sum(w.isupper() and len(w) > 1 for w in words) > 2:
        return None
    return s


def corpus(limit: int | None = None) -> list[str]:
    """Clean English sentences from the installed packages' text, deduplicated, in a fixed
    order, none of them an evaluation sentence; the first `limit` when given."""
    excluded = {" ".join(s.split()).lower() for s in evaluation_sentences()}
    seen, out = set(), []
    for name, paths in sources().items():
        for path in paths:
            for text in _texts(name, path):
                for piece in _SPLIT.split(" ".join(text.split())):
                    s = _clean(piece)
                    if s is None or s.lower() in seen or s.lower() in excluded:
                        continue
                    seen.add(s.lower())
                    out.append(s)
    return out[:limit] if limit is not None else out


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    text = corpus()
    print(f"{len(text)} sentences in {time.perf_counter() - start:.2f} s; per source:")
    for source, paths in sources().items():
        print(f"  {source}: {len(paths)} files")
    for s in text[::max(1, len(text) // 15)]:
        print("  ", s)
