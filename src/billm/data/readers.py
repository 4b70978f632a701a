"""Readers for local text files: raw text, line files, JSON lines (optionally gzipped).

Pure file-to-strings functions; they know nothing about dataset names or tokenizers.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

from billm.errors import DataError

logger = logging.getLogger(__name__)

#: Suffixes read as JSON lines (one object a line).
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
#: Suffixes read as plain text.
TEXT_SUFFIXES = (".txt", ".raw", ".text")


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Return True if the file name of ``path`` ends with one of ``suffixes`` (case-insensitive)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _open_text(path: Path):
    """Open ``path`` for reading UTF-8 text, transparently un-gzipping ``*.gz`` files."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_text(path: Path) -> str:
    """Return the whole text of a file, as is."""
    with _open_text(path) as f:
        return f.read()


def read_wikitext_rows(path: Path) -> list[str]:
    """Return the rows of an original WikiText ``wiki.*.raw`` file as Hugging Face builds them.

    The HF ``wikitext`` loader yields every line with its newline kept, except that a line with
    only whitespace becomes ``""``. ``"\\n\\n".join`` of these rows is the GPTQ evaluation text.
    """
    with _open_text(path) as f:
        return [line if line.strip() else "" for line in f]


def read_sentence_lines(path: Path) -> list[str]:
    """Return the lines of a one-sentence-a-line file (PTB ``ptb.*.txt``), each stripped."""
    with _open_text(path) as f:
        return [line.strip() for line in f]


def read_jsonl_field(path: Path, fields: tuple[str, ...] = ("text",)) -> list[str]:
    """Return one string per JSON line of ``path``: the first of ``fields`` present in the object.

    Raises:
        DataError: a line is not a JSON object, or has none of ``fields``.
    """
    return read_jsonl_column(path, fields)[1]


def read_jsonl_column(path: Path, fields: tuple[str, ...] = ("text",)) -> tuple[str | None, list[str]]:
    """Return ``(field, rows)``: as :func:`read_jsonl_field`, plus the field found (None if no rows)."""
    rows: list[str] = []
    field: str | None = None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if field is None or field not in obj:
                field = next((k for k in fields if k in obj), None)
                if field is None:
                    raise DataError(
                        f"{path}:{lineno}: no field {' or '.join(repr(k) for k in fields)} "
                        f"(keys: {sorted(obj)[:10]})"
                    )
            value = obj[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is not a string")
            rows.append(value)
    logger.debug("read %d rows (field %r) from %s", len(rows), field, path)
    return field, rows
