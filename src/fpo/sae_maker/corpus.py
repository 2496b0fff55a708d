"""Offline English text for SAE training: preference rows plus text already on the machine.

Used by ``fpo-make-sae`` (`fpo.sae_maker.cli`) to build the shipped SAEs' corpus; it reads
system documentation folders, which only this tool does.

Sources (all local; nothing touches the network):

- ``preference_texts``: a JSONL preference file (``prompt`` + ``chosen`` / ``rejected``
  strings); each row gives two texts, ``prompt + chosen`` and ``prompt + rejected``, i.e.
  exactly the kind of sequence the policy sees during preference optimisation.
- ``doc_texts``: README / ``*.txt`` / ``*.md`` / ``*.rst`` files under ``/usr/share/doc``
  (gzipped ones too).
- ``man_texts``: roff man pages under ``/usr/share/man`` with the markup stripped.
- ``docstring_texts``: docstrings of the Python standard library modules.

``build_corpus`` interleaves the sources (so a character budget never fills up with one
domain), and ``split_texts`` holds out whole documents for evaluation.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from fpo.errors import UserError

DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man")
_DOC_SUFFIXES = (".txt", ".md", ".rst", ".markdown")
_MIN_CHARS = 80  # shorter snippets are mostly headings or version strings
_MAX_CHARS = 4000  # longer "paragraphs" are tables or data dumps (e.g. a 1.4M-char glyph list)
_MIN_LETTER_FRACTION = 0.7  # letters + spaces; filters code, tables, hex dumps


def _read_text(path: Path) -> str:
    """Read a (possibly gzipped) text file as UTF-8, replacing undecodable bytes."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def is_prose(text: str) -> bool:
    """Length in ``[_MIN_CHARS, _MAX_CHARS]`` and >= 70% letters or spaces."""
    if not _MIN_CHARS <= len(text) <= _MAX_CHARS:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return letters >= _MIN_LETTER_FRACTION * len(text)


def _paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs, whitespace collapsed, that pass `is_prose`."""
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if is_prose(para):
            yield para


def preference_texts(path: str | Path) -> list[str]:
    """``prompt + chosen`` and ``prompt + rejected`` for each row of a JSONL preference file.

    Rows whose fields are not strings are skipped (this is training text, not the dataset
    pipeline; `fpo.data` validates rows). A missing or unreadable file raises `UserError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference file {path} does not exist (--preference-file)")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {line_no}: not valid JSON ({exc})") from exc
            prompt = row.get("prompt")
            for key in ("chosen", "rejected"):
                response = row.get(key)
                if isinstance(prompt, str) and isinstance(response, str) and response:
                    texts.append(prompt + response)
    return texts


def doc_texts(root: Path = DOC_ROOT) -> Iterator[str]:
    """Paragraphs of README / text / markdown files under `root` (sorted, deterministic)."""
    for path in sorted(root.rglob("*")):
        name = path.name.removesuffix(".gz")
        if not path.is_file() or "copyright" in name or "changelog" in name.lower():
            continue
        if name.startswith("README") or name.endswith(_DOC_SUFFIXES):
            yield from _paragraphs(_read_text(path))


_ROFF_ESCAPE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\[,/&:^|%]|\\\(..|\\\*(\(..|.)")


def strip_roff(source: str) -> str:
    """Plain text of a roff man page: drops request lines (``.XX``) and font escapes.

    ``\\-`` becomes ``-``; ``\\(..`` glyph escapes are dropped; paragraph requests
    (``.PP``, ``.SH``, ``.TP``...) become blank lines so `_paragraphs` can split on them.
    """
    lines = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            lines.append("")
            continue
        lines.append(_ROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(lines)


def man_texts(root: Path = MAN_ROOT) -> Iterator[str]:
    """Paragraphs of the English man pages (sections 1, 5, 7, 8) under `root`."""
    for section in ("man1", "man5", "man7", "man8"):
        for path in sorted((root / section).glob("*")):
            if path.is_file():
                yield from _paragraphs(strip_roff(_read_text(path)))


def docstring_texts(root: str | Path | None = None) -> Iterator[str]:
    """Docstring paragraphs of the Python modules under `root` (default: the stdlib)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if path.name.startswith("test") or path.parent.name.startswith(("test", "idlelib")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield from _paragraphs(doc)


def build_corpus(
    sources: dict[str, Iterable[str]], max_chars: int, seed: int = 0
) -> tuple[list[str], dict[str, int]]:
    """Balanced mix of `sources` up to `max_chars` characters, then shuffled (seeded).

    The next text always comes from the source with the fewest characters taken so far,
    so each of ``n`` sources holds about ``1/n`` of the budget; an exhausted source leaves
    its share to the others. Returns the texts and the characters taken per source.
    """
    iterators = {name: iter(texts) for name, texts in sources.items()}
    taken = dict.fromkeys(sources, 0)
    texts: list[str] = []
    while iterators and sum(taken.values()) < max_chars:
        name = min(iterators, key=taken.__getitem__)
        text = next(iterators[name], None)
        if text is None:
            del iterators[name]
            continue
        texts.append(text)
        taken[name] += len(text)
    random.Random(seed).shuffle(texts)
    return texts, taken


def split_texts(texts: list[str], heldout_every: int = 10) -> tuple[list[str], list[str]]:
    """Hold out every `heldout_every`-th text: ``(train, heldout)``, disjoint documents."""
    if heldout_every < 2:
        raise UserError(f"heldout_every must be >= 2, got {heldout_every}")
    heldout = texts[heldout_every - 1 :: heldout_every]
    train = [t for i, t in enumerate(texts) if (i + 1) % heldout_every]
    return train, heldout
