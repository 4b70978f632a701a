"""Where text comes from: dataset names, local folders and files, Hugging Face ``datasets``.

Everything here returns a :class:`Corpus`: the split's rows (or documents) in order, plus how the
GPTQ protocol joins them. Names resolve to local files first (``data_dir`` or ``$BILLM_DATA_DIR``),
then to Hugging Face ``datasets``; ``pydoc`` is the language reference shipped with CPython.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from billm.data.readers import (
    JSONL_SUFFIXES,
    has_suffix,
    read_jsonl_column,
    read_jsonl_field,
    read_sentence_lines,
    read_text,
    read_wikitext_rows,
)
from billm.errors import DataError

logger = logging.getLogger(__name__)

#: Dataset names understood everywhere a text source is asked for.
DATASETS = ("wikitext2", "ptb", "c4", "pydoc")

#: Environment variable naming a folder of local copies of the datasets.
DATA_DIR_ENV = "BILLM_DATA_DIR"

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}
# File-name spelling of a split in the original WikiText / PTB releases.
_SHORT_SPLIT = {"train": "train", "validation": "valid", "test": "test"}

#: GPTQ evaluates C4 on the first 1100 validation documents, cut to 256 x seqlen tokens.
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256

# Sub-folders of a data dir where each dataset may live (the data dir itself is tried last).
_LOCAL_SUBDIRS = {
    "wikitext2": ("wikitext-2-raw", "wikitext2", "wikitext-2-raw-v1"),
    "ptb": ("ptb", "penn_treebank", "ptb_text_only"),
    "c4": ("c4",),
}

# Hugging Face coordinates (used only when no local copy is found).
_HF_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_LAYOUT_HELP = (
    "Point --data-dir (or the BILLM_DATA_DIR environment variable) at a folder holding "
    "wikitext-2-raw/wiki.{train,valid,test}.raw or wikitext-2-raw/{train,validation,test}.jsonl; "
    "ptb/ptb.{train,valid,test}.txt or ptb/{train,validation,test}.jsonl (field 'sentence'); "
    "c4/c4-train.00000-of-01024*.jsonl and c4/c4-validation*.jsonl (field 'text'); "
    "or pass a path to a .txt/.raw/.jsonl file instead of a name."
)


@dataclass(frozen=True)
class Corpus:
    """One split of a text source, as the GPTQ protocol uses it.

    Attributes:
        parts: rows, sentences or documents, in dataset order.
        joiner: the string that joins ``parts`` into the split's text.
        documents: True when ``parts`` are independent documents (C4, JSON lines files):
            calibration then samples a window inside one document, as GPTQ does for C4.
        origin: where the text was read from, for logs and error messages.
        eval_windows: if set, evaluation tokens are cut to ``eval_windows * seqlen`` (C4: 256).
    """

    parts: tuple[str, ...]
    joiner: str
    documents: bool
    origin: str
    eval_windows: int | None = None

    def text(self) -> str:
        """Return the split's text: ``joiner.join(parts)``."""
        return self.joiner.join(self.parts)


def normalize_split(split: str) -> str:
    """Return the canonical split name (``train``, ``validation``, ``test``); ``valid`` is accepted."""
    canonical = _SPLIT_ALIASES.get(str(split).strip().lower())
    if canonical is None:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} (or 'valid')")
    return canonical


def paragraph_cut(text: str, fraction: float) -> int:
    """Return the index of the first paragraph break (``"\\n\\n"``) at or after ``fraction`` of ``text``.

    Falls back to the last break before that point, then to the plain character index.
    """
    target = int(len(text) * fraction)
    cut = text.find("\n\n", target)
    if cut < 0:
        cut = text.rfind("\n\n", 0, target)
    return cut if cut > 0 else target


def pydoc_corpus(split: str) -> Corpus:
    """Return a split of CPython's ``pydoc_data.topics`` text (the language reference).

    The topics are joined with ``"\\n\\n"`` in key order; ``train`` is the first 90 % of the
    characters and ``validation``/``test`` (the same text) the last 10 %, cut at a paragraph break.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some minimal Python builds strip pydoc_data
        raise DataError("this Python has no pydoc_data.topics module; use another source") from exc
    text = "\n\n".join(str(topics[key]) for key in sorted(topics))
    cut = paragraph_cut(text, 0.9)
    part = text[:cut] if split == "train" else text[cut:].lstrip("\n")
    return Corpus((part,), "", False, f"pydoc_data.topics ({split})")


# ---------------------------------------------------------------------------------------------
# Local layouts. Each reader returns a Corpus or None, and records the paths it looked at.


def _wikitext_in(folder: Path, split: str, tried: list[str]) -> Corpus | None:
    raw = folder / f"wiki.{_SHORT_SPLIT[split]}.raw"
    rows_file = folder / f"{split}.jsonl"
    tried += [str(raw), str(rows_file)]
    if raw.is_file():
        return Corpus(tuple(read_wikitext_rows(raw)), "\n\n", False, str(raw))
    if rows_file.is_file():
        return Corpus(tuple(read_jsonl_field(rows_file, ("text",))), "\n\n", False, str(rows_file))
    return None


def _ptb_in(folder: Path, split: str, tried: list[str]) -> Corpus | None:
    txt = folder / f"ptb.{_SHORT_SPLIT[split]}.txt"
    rows_file = folder / f"{split}.jsonl"
    tried += [str(txt), str(rows_file)]
    if txt.is_file():
        return Corpus(tuple(read_sentence_lines(txt)), " ", False, str(txt))
    if rows_file.is_file():
        sentences = read_jsonl_field(rows_file, ("sentence", "text"))
        return Corpus(tuple(sentences), " ", False, str(rows_file))
    return None


def _c4_files(folder: Path, split: str) -> list[Path]:
    """Return the sorted C4 JSON-lines shards of ``split`` in ``folder`` (``c4-<split>*``)."""
    return sorted(p for p in folder.glob(f"c4-{split}*") if p.is_file() and has_suffix(p, JSONL_SUFFIXES))


def _c4_in(folder: Path, split: str, tried: list[str]) -> Corpus | None:
    split = "validation" if split == "test" else split  # C4 has no public test split
    tried.append(str(folder / f"c4-{split}*.jsonl"))
    files = _c4_files(folder, split)
    if not files:
        return None
    docs: list[str] = []
    for f in files:
        docs += read_jsonl_field(f, ("text",))
    origin = str(files[0]) if len(files) == 1 else f"{len(files)} files in {folder}"
    return _c4_corpus(docs, split, origin)


def _c4_corpus(docs: list[str], split: str, origin: str) -> Corpus:
    if split == "validation":
        return Corpus(tuple(docs[:C4_EVAL_DOCUMENTS]), " ", True, origin, C4_EVAL_WINDOWS)
    return Corpus(tuple(docs), " ", True, origin)


_LAYOUTS = {"wikitext2": _wikitext_in, "ptb": _ptb_in, "c4": _c4_in}


def _data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """Return the folder of local dataset copies: ``data_dir``, else ``$BILLM_DATA_DIR``, else None."""
    if data_dir is not None:
        root, what = Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        root, what = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        return None
    if not root.is_dir():
        raise DataError(f"{what} {str(root)!r} is not a folder")
    return root


def _load_local_named(name: str, split: str, root: Path, tried: list[str]) -> Corpus | None:
    folders = [root / sub for sub in _LOCAL_SUBDIRS[name]] + [root]
    for folder in folders:
        if folder.is_dir():
            corpus = _LAYOUTS[name](folder, split, tried)
            if corpus is not None:
                return corpus
    return None


HUB_HOST = "huggingface.co"


def hub_offline() -> bool:
    """True when the Hugging Face hub cannot be used: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set
    (``datasets`` then reads its local cache only), or its host name does not resolve (no network:
    one DNS look-up, instead of a minute of retries from the hub client)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False  # the user chose cache-only mode; datasets handles it without retries
    import socket

    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        return True
    return False


def _load_hf(name: str, split: str) -> Corpus:
    """Load a named split from Hugging Face ``datasets`` (network or its local cache)."""
    if hub_offline():
        raise ConnectionError(f"offline: {HUB_HOST} cannot be resolved (set HF_DATASETS_OFFLINE=1 to read the "
                              "datasets cache)")
    import datasets  # heavy import, only when needed

    if name == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Corpus(tuple(ds["text"]), "\n\n", False, f"hf:wikitext/wikitext-2-raw-v1[{split}]")
    if name == "ptb":
        ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
        return Corpus(tuple(ds["sentence"]), " ", False, f"hf:ptb_text_only/penn_treebank[{split}]")
    split = "validation" if split == "test" else split
    ds = datasets.load_dataset("allenai/c4", data_files={split: _HF_C4_FILES[split]}, split=split)
    if split == "validation":
        ds = ds.select(range(min(C4_EVAL_DOCUMENTS, len(ds))))
    return _c4_corpus(list(ds["text"]), split, f"hf:allenai/c4/{_HF_C4_FILES[split]}")


def _hf_names(name: str) -> str:
    return {
        "wikitext2": "wikitext (wikitext-2-raw-v1)",
        "ptb": "ptb_text_only (penn_treebank)",
        "c4": "allenai/c4 (en/c4-train.00000-of-01024.json.gz, en/c4-validation.00000-of-00008.json.gz)",
    }[name]


def load_named(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Corpus:
    """Return a split of a named dataset: local copy first, then Hugging Face ``datasets``.

    Raises:
        DataError: no local copy and ``datasets`` failed (offline, unknown dataset, ...); the
            message lists every path tried and how to point ``--data-dir`` at local files.
    """
    if name == "pydoc":
        return pydoc_corpus(split)
    if name == "c4" and split == "test":
        logger.info("C4 has no public test split; using its validation split (as GPTQ does)")
    tried: list[str] = []
    root = _data_root(data_dir)
    if root is not None:
        corpus = _load_local_named(name, split, root, tried)
        if corpus is not None:
            logger.info("%s[%s]: reading %s", name, split, corpus.origin)
            return corpus
        logger.info("%s[%s]: no local copy under %s; trying Hugging Face datasets", name, split, root)
    try:
        corpus = _load_hf(name, split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        looked = "; ".join(tried) if tried else f"none (no data_dir given and ${DATA_DIR_ENV} unset)"
        raise DataError(
            f"could not load {name!r} split {split!r}. Local paths tried: {looked}. "
            f"Hugging Face datasets {_hf_names(name)} failed: {type(exc).__name__}: {exc}. "
            f"{_LAYOUT_HELP}"
        ) from exc
    logger.info("%s[%s]: loaded from %s", name, split, corpus.origin)
    return corpus


# ---------------------------------------------------------------------------------------------
# Paths given directly as the source.


def _detect_folder(folder: Path, split: str) -> Corpus:
    """Return the split of a dataset folder given as a path, whatever its known layout."""
    tried: list[str] = []
    # One dataset's own folder (wiki.*.raw, ptb.*.txt, c4-*.jsonl, or HF rows {split}.jsonl).
    if any(folder.glob("wiki.*.raw")):
        found = _wikitext_in(folder, split, tried)
    elif any(folder.glob("ptb.*.txt")):
        found = _ptb_in(folder, split, tried)
    elif any(folder.glob("c4-*")):
        found = _c4_in(folder, split, tried)
    else:
        found = _rows_folder(folder, split, tried)
    if found is not None:
        return found
    # A data dir holding several datasets in sub-folders.
    present = [n for n, subs in _LOCAL_SUBDIRS.items() if any((folder / s).is_dir() for s in subs)]
    if len(present) == 1:
        return load_named(present[0], split, folder)
    if len(present) > 1:
        raise DataError(
            f"folder {str(folder)!r} holds several datasets ({', '.join(present)}): pass the dataset "
            f"name as the source and the folder as data_dir (--data-dir)"
        )
    raise DataError(
        f"no {split!r} split found in folder {str(folder)!r}; looked for {', '.join(tried)}. {_LAYOUT_HELP}"
    )


def _rows_folder(folder: Path, split: str, tried: list[str]) -> Corpus | None:
    """A folder of Hugging Face rows, ``{split}.jsonl``, or plain ``{split}.txt``.

    Rows with a ``text`` field are joined with ``"\n\n"`` (WikiText), with ``sentence`` with ``" "`` (PTB).
    """
    names = [split] + (["valid"] if split == "validation" else [])
    for stem in names:
        rows_file, txt = folder / f"{stem}.jsonl", folder / f"{stem}.txt"
        tried += [str(rows_file), str(txt)]
        if rows_file.is_file():
            field, rows = read_jsonl_column(rows_file, ("text", "sentence"))
            joiner = " " if field == "sentence" else "\n\n"  # PTB-style sentences, else WikiText-style rows
            return Corpus(tuple(rows), joiner, False, str(rows_file))
        if txt.is_file():
            return Corpus((read_text(txt),), "", False, str(txt))
    return None


def load_path(path: Path, split: str) -> Corpus:
    """Return the text of a local file or folder given as the source.

    A ``.jsonl`` (or ``.json``, optionally gzipped) file is a list of documents (field ``text``,
    joined with ``"\\n\\n"``); any other file is plain text taken as is. A single file has no
    splits: ``split`` is ignored. A folder is read by its layout: ``wiki.{split}.raw``,
    ``ptb.{split}.txt``, ``c4-{split}*.jsonl``, Hugging Face rows ``{split}.jsonl``, or
    ``{split}.txt``; a data dir holding one dataset's sub-folder (``wikitext-2-raw/``, ``ptb/``,
    ``c4/``) is read as that dataset.
    """
    if not path.exists():
        raise DataError(
            f"no such file or folder: {str(path)!r} (a source is one of {', '.join(DATASETS)} "
            f"or a path to a .txt/.raw/.jsonl file or a dataset folder)"
        )
    if path.is_dir():
        return _detect_folder(path, split)
    if has_suffix(path, JSONL_SUFFIXES):
        return Corpus(tuple(read_jsonl_field(path, ("text",))), "\n\n", True, str(path))
    try:
        text = read_text(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc.reason})") from exc
    return Corpus((text,), "", False, str(path))


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.startswith((".", "~")) or Path(source).suffix != ""


def load_corpus(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> Corpus:
    """Return the :class:`Corpus` of ``split`` for a dataset name or a local path.

    Raises:
        DataError: unknown name, missing path, unreadable file, or a split with no text.
    """
    split = normalize_split(split)
    key = os.fspath(source).strip()
    if key.lower() in DATASETS:
        corpus = load_named(key.lower(), split, data_dir)
    elif Path(key).expanduser().exists() or _looks_like_path(key):
        corpus = load_path(Path(key).expanduser(), split)
    else:
        raise DataError(
            f"unknown dataset {key!r}: expected one of {', '.join(DATASETS)} "
            f"or a path to a .txt/.raw/.jsonl file or a dataset folder"
        )
    if not any(part.strip() for part in corpus.parts):
        raise DataError(f"no text in {corpus.origin} (split {split!r})")
    return corpus
