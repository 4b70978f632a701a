"""Calibration and evaluation text: dataset names, local files, Hugging Face ``datasets``.

A *source* is a dataset name (:data:`DATASETS`) or a local path:

- ``wikitext2``, ``ptb``, ``c4``: read from ``data_dir`` (or ``$BILLM_DATA_DIR``) when a local
  copy is there, else through Hugging Face ``datasets``;
- ``pydoc``: CPython's language reference (``pydoc_data.topics``), always available;
- a ``.txt``/``.raw`` file (text as is), a ``.jsonl`` file of documents (field ``text``), or a
  folder laid out like the Hugging Face dataset (``{split}.jsonl``) or like the original releases.

Texts are joined as the GPTQ protocol does (WikiText-2 ``"\\n\\n".join(rows)``, PTB
``" ".join(sentences)``, C4 ``" ".join`` of the first 1100 validation documents).
"""

from __future__ import annotations

import os

from billm.data.sources import DATA_DIR_ENV, DATASETS, SPLITS, Corpus, load_corpus
from billm.data.tokens import get_calibration_batches, get_eval_tokens

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "SPLITS",
    "Corpus",
    "get_calibration_batches",
    "get_eval_tokens",
    "load_corpus",
    "load_split_text",
]


def load_split_text(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """Return the joined text of one split of ``source``, by the GPTQ protocol.

    Args:
        source: a name in :data:`DATASETS` or a path to a .txt/.raw/.jsonl file or dataset folder.
        split: ``train``, ``validation`` (alias ``valid``) or ``test``. C4 has no test split:
            ``test`` means its validation split. Ignored for a single file.
        data_dir: folder of local dataset copies; defaults to ``$BILLM_DATA_DIR``.

    Raises:
        DataError: unknown name, missing path, unreachable dataset, or empty text.
    """
    return load_corpus(source, split, data_dir).text()
