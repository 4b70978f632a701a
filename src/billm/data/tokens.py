"""Token windows for calibration and evaluation, by the GPTQ protocol.

Tokenization uses the tokenizer's defaults (``tokenizer(text)``), as GPTQ does: a tokenizer that
adds a BOS token by default (LLaMA-1/2 style) puts one at the very start of the joined text (or of
each C4 document); one that does not (GPT-2 style, SmolLM2) adds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random

import torch
from tqdm.auto import tqdm

from billm.data.sources import Corpus, load_corpus
from billm.errors import DataError

logger = logging.getLogger(__name__)

_LENGTH_WARNING = "Token indices sequence length is longer than the specified maximum"
# Draws of a random document per calibration sample before giving up (C4: a few % of documents
# are longer than 2048 tokens, so a handful of draws usually suffice).
MAX_DOCUMENT_DRAWS = 10_000


class _DropLengthWarning(logging.Filter):
    """Drops transformers' 'sequence length is longer than the maximum' warning, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LENGTH_WARNING)


@contextlib.contextmanager
def _quiet_length_warning():
    """Silence only the tokenizer's too-long-sequence warning (we cut the tokens into windows)."""
    hf_logger = logging.getLogger("transformers.tokenization_utils_base")
    flt = _DropLengthWarning()
    hf_logger.addFilter(flt)
    try:
        yield
    finally:
        hf_logger.removeFilter(flt)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Return ``tokenizer(text)``'s ids as a LongTensor of shape (1, N), with the default special tokens."""
    with _quiet_length_warning():
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids.to(torch.long)


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")


def text_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """Return ``nsamples`` random windows of ``seqlen`` tokens from ``ids`` (1, N): (nsamples, seqlen).

    Each start is ``rng.randint(0, N - seqlen - 1)``, as in GPTQ.

    Raises:
        DataError: fewer than ``seqlen + 1`` tokens.
    """
    n = ids.shape[-1]
    if n < seqlen + 1:
        raise DataError(
            f"the calibration text has {n} tokens; random windows of seqlen={seqlen} need at least "
            f"{seqlen + 1}: use a longer text or a smaller seqlen"
        )
    flat = ids.reshape(-1)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([flat[s : s + seqlen] for s in starts])  # (nsamples, seqlen)


def document_windows(
    documents: tuple[str, ...] | list[str],
    tokenizer,
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    max_draws: int = MAX_DOCUMENT_DRAWS,
) -> torch.Tensor:
    """Return ``nsamples`` windows of ``seqlen`` tokens, each inside one document: (nsamples, seqlen).

    GPTQ's C4 sampling: per sample, draw random documents until one has more than ``seqlen``
    tokens (the document tokenized alone), then a random window inside it. Each document is
    tokenized at most once.

    Raises:
        DataError: no document longer than ``seqlen`` tokens after ``max_draws`` draws for a
            sample, or after every document has been looked at.
    """
    if not documents:
        raise DataError("no documents to sample calibration windows from")
    cache: dict[int, torch.Tensor] = {}
    longest = 0
    windows = []
    for _ in tqdm(range(nsamples), desc="calibration samples", leave=False, unit="sample"):
        for _draw in range(max_draws):
            i = rng.randint(0, len(documents) - 1)
            if i not in cache:
                cache[i] = tokenize(tokenizer, documents[i]).reshape(-1)
                longest = max(longest, cache[i].numel())
            doc = cache[i]
            if doc.numel() > seqlen:
                break
            if len(cache) == len(documents) and longest <= seqlen:
                raise DataError(
                    f"no document is longer than seqlen={seqlen} tokens (all {len(documents)} "
                    f"documents tokenized, longest {longest}): use a smaller seqlen or more documents"
                )
        else:
            raise DataError(
                f"no document longer than seqlen={seqlen} tokens found in {max_draws} random draws "
                f"({len(cache)} of {len(documents)} documents tokenized, longest {longest}): "
                f"use a smaller seqlen or longer documents"
            )
        start = rng.randint(0, doc.numel() - seqlen - 1)
        windows.append(doc[start : start + seqlen])
    return torch.stack(windows)  # (nsamples, seqlen)


def calibration_windows(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return (nsamples, seqlen) calibration windows from a corpus, seeded with ``random.Random(seed)``."""
    _check_sizes(nsamples, seqlen)
    rng = random.Random(seed)
    if corpus.documents:
        return document_windows(corpus.parts, tokenizer, nsamples, seqlen, rng)
    return text_windows(tokenize(tokenizer, corpus.text()), nsamples, seqlen, rng)


def get_calibration_batches(
    source: str | os.PathLike,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Return ``nsamples`` calibration windows of ``seqlen`` tokens, a LongTensor (nsamples, seqlen).

    The GPTQ protocol on the ``train`` split of ``source`` (a dataset name or a local path, see
    :func:`billm.data.load_split_text`). Document sources (C4, ``.jsonl`` files): each window lies
    inside one random document longer than ``seqlen`` tokens. Other sources: the whole text is
    tokenized once and windows start at random offsets. The same seed gives the same windows.

    Raises:
        DataError: the source cannot be read, or it has too little text for ``seqlen``.
    """
    corpus = load_corpus(source, "train", data_dir)
    batches = calibration_windows(corpus, tokenizer, nsamples, seqlen, seed)
    logger.info("calibration: %d windows of %d tokens from %s (seed %d)", nsamples, seqlen, corpus.origin, seed)
    return batches


def get_eval_tokens(
    source: str | os.PathLike,
    tokenizer,
    seqlen: int,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
) -> torch.Tensor:
    """Return the evaluation tokens of a split, a LongTensor of shape (1, N).

    The split's joined text (GPTQ protocol) is tokenized once with the tokenizer's default
    special tokens, exactly as ``tokenizer(text, return_tensors="pt")`` in GPTQ. For C4
    validation the tokens are cut to ``256 * seqlen``. Cutting into windows is the job of
    :func:`billm.eval.perplexity`.

    Raises:
        DataError: the source cannot be read or has no text.
    """
    if seqlen < 1:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    corpus = load_corpus(source, split, data_dir)
    ids = tokenize(tokenizer, corpus.text())
    if corpus.eval_windows is not None:
        ids = ids[:, : corpus.eval_windows * seqlen]
    logger.info("evaluation: %d tokens from %s", ids.shape[1], corpus.origin)
    return ids
