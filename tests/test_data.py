"""Tests of billm.data: text sources, GPTQ-protocol joining, calibration and evaluation tokens."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pytest
import torch

from billm.data import DATASETS, get_calibration_batches, get_eval_tokens, load_split_text
from billm.data.sources import load_corpus, paragraph_cut
from billm.data.tokens import tokenize
from billm.errors import DataError


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI = SHARED_DATA / "wikitext-2-raw"
C4_TRAIN = SHARED_DATA / "c4" / "c4-train.00000-of-01024.head1041.jsonl"

needs_shared = pytest.mark.skipif(
    not (WIKI / "wiki.test.raw").is_file() or not C4_TRAIN.is_file(),
    reason=f"shared evaluation data not found at {SHARED_DATA} (expected ../shared/data from the repository root)",
)


@pytest.fixture(scope="module")
def tok(byte_tokenizer):
    return byte_tokenizer()


def read_rows(path: Path, field: str = "text") -> list[str]:
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether the 1-D ``needle`` occurs contiguously in the 1-D ``haystack``."""
    as_str = lambda t: "".join(map(chr, t.tolist()))  # noqa: E731
    return as_str(needle) in as_str(haystack)


# --------------------------------------------------------------------------------------------
# WikiText-2 (the real files, both layouts)


@pytest.fixture(scope="module")
def wiki_layouts(tmp_path_factory):
    """Two data dirs holding only the .raw layout, and only the .jsonl layout, of the shared files."""
    if not (WIKI / "wiki.test.raw").is_file():
        pytest.skip(f"shared WikiText-2 files not found at {WIKI}")
    raw_dir = tmp_path_factory.mktemp("raw")
    jsonl_dir = tmp_path_factory.mktemp("jsonl")
    (raw_dir / "wikitext-2-raw").mkdir()
    (jsonl_dir / "wikitext-2-raw").mkdir()
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        (raw_dir / "wikitext-2-raw" / name).symlink_to(WIKI / name)
    for name in ("test.jsonl", "validation.jsonl"):
        (jsonl_dir / "wikitext-2-raw" / name).symlink_to(WIKI / name)
    return raw_dir, jsonl_dir


@needs_shared
@pytest.mark.parametrize("split,jsonl", [("test", "test.jsonl"), ("validation", "validation.jsonl")])
def test_wikitext2_raw_and_jsonl_layouts_give_the_gptq_text(wiki_layouts, split, jsonl):
    raw_dir, jsonl_dir = wiki_layouts
    expected = "\n\n".join(read_rows(WIKI / jsonl))  # GPTQ: "\n\n".join(test["text"])
    assert load_split_text("wikitext2", split, raw_dir) == expected
    assert load_split_text("wikitext2", split, jsonl_dir) == expected
    assert load_split_text("wikitext2", split, SHARED_DATA) == expected


@needs_shared
def test_valid_alias_and_env_var(wiki_layouts, monkeypatch):
    raw_dir, _ = wiki_layouts
    monkeypatch.setenv("BILLM_DATA_DIR", str(raw_dir))
    assert load_split_text("wikitext2", "valid") == load_split_text("wikitext2", "validation", SHARED_DATA)


@needs_shared
def test_wikitext2_folder_given_as_path(tok):
    text = load_split_text(str(WIKI), "test")
    assert text == "\n\n".join(read_rows(WIKI / "test.jsonl"))


@needs_shared
def test_eval_tokens_are_the_default_tokenization_of_the_joined_text(tok):
    ids = get_eval_tokens("wikitext2", tok, 2048, data_dir=SHARED_DATA)
    text = load_split_text("wikitext2", "test", SHARED_DATA)
    assert ids.dtype == torch.long and ids.shape == (1, len(text.encode("utf-8")))
    assert torch.equal(ids, tok(text, return_tensors="pt").input_ids)


def test_eval_tokens_keep_the_tokenizers_default_bos(byte_tokenizer):
    bos_tok = byte_tokenizer(bos=True)
    ids = get_eval_tokens("pydoc", bos_tok, 64)
    assert ids[0, 0].item() == 256 and (ids == 256).sum().item() == 1


def test_only_the_length_warning_is_silenced(tmp_path, byte_tokenizer):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    hf_logger = logging.getLogger("transformers.tokenization_utils_base")
    handler = Keep(level=logging.WARNING)
    hf_logger.addHandler(handler)
    try:
        tokenize(byte_tokenizer(model_max_length=16), "x" * 100)
        assert not records
        byte_tokenizer(model_max_length=16)("x" * 100)  # control: the warning does exist
        assert any("longer than the specified maximum" in str(r.msg) for r in records)
    finally:
        hf_logger.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# C4 (the real shard head, and a synthetic folder)


@needs_shared
def test_c4_calibration_windows_lie_inside_long_documents(tok):
    seqlen = 1024
    batches = get_calibration_batches("c4", tok, nsamples=6, seqlen=seqlen, seed=0, data_dir=SHARED_DATA)
    assert batches.shape == (6, seqlen) and batches.dtype == torch.long
    docs = [tok(d, return_tensors="pt").input_ids[0] for d in read_rows(C4_TRAIN)]
    long_docs = [d for d in docs if d.numel() > seqlen]
    for window in batches:
        assert any(contains(d, window) for d in long_docs)
    again = get_calibration_batches("c4", tok, nsamples=6, seqlen=seqlen, seed=0, data_dir=SHARED_DATA)
    assert torch.equal(batches, again)


@pytest.fixture
def c4_dir(tmp_path):
    """A C4-style data dir: 40 short and 3 long train documents; 1200 validation documents."""
    short = [{"text": f"short document number {i}."} for i in range(40)]
    long = [{"text": (chr(ord("A") + k) * 5 + " ") * 40} for k in range(3)]  # 240 bytes each
    train = short[:20] + [long[0]] + short[20:] + long[1:]
    write_jsonl(tmp_path / "c4" / "c4-train.00000-of-01024.jsonl", train)
    write_jsonl(tmp_path / "c4" / "c4-validation.00000-of-00008.jsonl", [{"text": f"doc {i}"} for i in range(1200)])
    return tmp_path


def test_c4_picks_documents_longer_than_seqlen(tok, c4_dir):
    seqlen = 100
    batches = get_calibration_batches("c4", tok, nsamples=8, seqlen=seqlen, seed=3, data_dir=c4_dir)
    long_docs = [tok((chr(ord("A") + k) * 5 + " ") * 40, return_tensors="pt").input_ids[0] for k in range(3)]
    for window in batches:
        assert any(contains(d, window) for d in long_docs)


def test_c4_validation_joins_first_1100_documents_and_caps_eval_tokens(tok, c4_dir):
    text = load_split_text("c4", "validation", c4_dir)
    assert text == " ".join(f"doc {i}" for i in range(1100))
    assert load_split_text("c4", "test", c4_dir) == text  # C4 has no test split
    ids = get_eval_tokens("c4", tok, seqlen=8, data_dir=c4_dir)
    assert ids.shape == (1, 256 * 8)
    assert torch.equal(ids, tok(text, return_tensors="pt").input_ids[:, : 256 * 8])


def test_c4_without_long_documents_raises(tok, c4_dir):
    with pytest.raises(DataError, match="seqlen=4096"):
        get_calibration_batches("c4", tok, nsamples=2, seqlen=4096, data_dir=c4_dir)


# --------------------------------------------------------------------------------------------
# PTB (synthetic), pydoc, plain paths


def test_ptb_folder_layouts(tmp_path):
    sentences = {s: [f" {s} sentence {i} with <unk> words \n" for i in range(5)] for s in ("train", "valid", "test")}
    for s, lines in sentences.items():
        (tmp_path / "ptb").mkdir(exist_ok=True)
        (tmp_path / "ptb" / f"ptb.{s}.txt").write_text("".join(lines))
    expected = " ".join(line.strip() for line in sentences["test"])
    assert load_split_text("ptb", "test", tmp_path) == expected
    assert load_split_text("ptb", "valid", tmp_path) == " ".join(line.strip() for line in sentences["valid"])
    rows_dir = tmp_path / "rows"
    write_jsonl(rows_dir / "ptb" / "test.jsonl", [{"sentence": line.strip()} for line in sentences["test"]])
    assert load_split_text("ptb", "test", rows_dir) == expected
    assert load_split_text(str(rows_dir / "ptb"), "test") == expected  # the folder as a path
    assert load_split_text(str(tmp_path / "ptb"), "test") == expected


def test_pydoc_splits(tok):
    from pydoc_data.topics import topics

    whole = "\n\n".join(topics[k] for k in sorted(topics))
    train, test = load_split_text("pydoc", "train"), load_split_text("pydoc", "test")
    assert load_split_text("pydoc", "validation") == test
    assert whole.startswith(train) and whole.endswith(test)
    assert abs(len(train) / len(whole) - 0.9) < 0.01
    assert whole[len(train) : len(train) + 2] == "\n\n"
    batches = get_calibration_batches("pydoc", tok, nsamples=4, seqlen=256)
    assert batches.shape == (4, 256)


def test_paragraph_cut():
    text = "aaaa\n\nbbbb\n\ncccc"
    assert paragraph_cut(text, 0.5) == 10
    assert paragraph_cut("no breaks here", 0.5) == 7


def test_plain_text_path(tmp_path, tok):
    path = tmp_path / "notes.txt"
    text = "Some local text.\n\nWith paragraphs, kept as is.\n" * 20
    path.write_text(text)
    assert load_split_text(str(path), "train") == text
    assert load_split_text(path, "test") == text  # a single file has no splits
    batches = get_calibration_batches(str(path), tok, nsamples=3, seqlen=64)
    ids = tok(text, return_tensors="pt").input_ids[0]
    for window in batches:
        assert contains(ids, window)


def test_jsonl_path_is_a_document_source(tmp_path, tok):
    rows = [{"text": f"row {i} " * (2 if i % 3 else 30)} for i in range(30)]
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, rows)
    assert load_split_text(str(path), "train") == "\n\n".join(r["text"] for r in rows)
    corpus = load_corpus(str(path), "train")
    assert corpus.documents and len(corpus.parts) == 30
    batches = get_calibration_batches(str(path), tok, nsamples=4, seqlen=100, seed=1)
    long_docs = [tok(r["text"], return_tensors="pt").input_ids[0] for r in rows if len(r["text"]) > 100]
    for window in batches:
        assert any(contains(d, window) for d in long_docs)


# --------------------------------------------------------------------------------------------
# Sampling


def test_text_windows_follow_the_gptq_recipe(tok):
    ids = tokenize(tok, load_split_text("pydoc", "train"))[0]
    batches = get_calibration_batches("pydoc", tok, nsamples=5, seqlen=128, seed=7)
    rng = random.Random(7)
    for window in batches:
        start = rng.randint(0, ids.numel() - 128 - 1)
        assert torch.equal(window, ids[start : start + 128])


@pytest.mark.parametrize("source", ["pydoc", "c4"])
def test_same_seed_same_windows_other_seed_other_windows(tok, c4_dir, source):
    kwargs = dict(nsamples=6, seqlen=64, data_dir=c4_dir)
    a = get_calibration_batches(source, tok, seed=0, **kwargs)
    b = get_calibration_batches(source, tok, seed=0, **kwargs)
    c = get_calibration_batches(source, tok, seed=1, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_raises():
    with pytest.raises(DataError, match="unknown dataset 'wikitext3'"):
        load_split_text("wikitext3", "test")
    assert "wikitext2" in DATASETS


def test_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_split_text(str(tmp_path / "nothing.txt"), "test")
    with pytest.raises(DataError, match="not a folder"):
        load_split_text("wikitext2", "test", data_dir=tmp_path / "missing_dir")


def test_unknown_split_and_empty_text_raise(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        load_split_text("pydoc", "dev")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        load_split_text(str(empty), "train")


def test_too_little_text_raises_with_the_numbers(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("x" * 50)
    with pytest.raises(DataError, match=r"50 tokens.*seqlen=64.*65"):
        get_calibration_batches(str(path), tok, nsamples=2, seqlen=64)


def test_folder_without_known_layout_raises(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(DataError, match="no 'test' split found"):
        load_split_text(str(tmp_path), "test")


def test_data_dir_with_several_datasets_asks_for_a_name(tmp_path):
    (tmp_path / "c4").mkdir()
    (tmp_path / "ptb").mkdir()
    with pytest.raises(DataError, match="several datasets"):
        load_split_text(str(tmp_path), "test")


def test_unreachable_hub_dataset_explains_local_layout(tmp_path, monkeypatch):
    """Offline and no local copy: a DataError naming the paths tried and --data-dir."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_split_text("ptb", "test", data_dir=tmp_path)
    message = str(info.value)
    assert "ptb.test.txt" in message and "--data-dir" in message and "BILLM_DATA_DIR" in message
    assert time.perf_counter() - start < 20
