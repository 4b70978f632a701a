"""Perplexity by the GPTQ protocol: non-overlapping windows, exp of the mean token NLL."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from billm.errors import DataError, ModelError
from billm.model.walker import max_positions

logger = logging.getLogger(__name__)

# Extra GPU memory kept free for activations and float32 logits when deciding to move a model.
_GPU_HEADROOM_BYTES = 2 * 1024**3


@dataclass
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        ppl: perplexity, ``exp(nll)``.
        nll: mean over windows of the per-window mean token negative log-likelihood (nats).
        n_windows: windows evaluated.
        n_tokens: tokens fed to the model (``n_windows * seqlen``); each window predicts
            ``seqlen - 1`` of them.
        seqlen: window length.
        seconds: wall time of the evaluation loop.
    """

    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        """Return the result as a plain dict (JSON-serializable)."""
        return asdict(self)


def make_windows(input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut (1, N) or (N,) token ids into non-overlapping windows: (N // seqlen, seqlen).

    The remainder is dropped, as GPTQ does; ``max_windows`` keeps only the first ones.

    Raises:
        DataError: fewer than ``seqlen`` tokens.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    flat = input_ids.reshape(-1)
    n_windows = flat.numel() // seqlen
    if n_windows == 0:
        raise DataError(f"only {flat.numel()} evaluation tokens: less than one window of seqlen={seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    return flat[: n_windows * seqlen].reshape(n_windows, seqlen)  # (n_windows, seqlen)


def window_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Return the mean next-token NLL of each window, float32: (batch,).

    ``logits`` (batch, seqlen, vocab) predict ``windows`` (batch, seqlen) shifted by one.
    """
    shift_logits = logits[:, :-1, :].float()  # (batch, seqlen-1, vocab)
    shift_labels = windows[:, 1:].to(shift_logits.device)  # (batch, seqlen-1)
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")  # (batch, seqlen-1)
    return nll.mean(dim=1)


def _check_seqlen(model, seqlen: int) -> None:
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and seqlen > limit:
        raise ModelError(f"seqlen={seqlen} is longer than the model's maximum of {limit} positions")


def _model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a parameterless or meta model)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return torch.device("cpu")
    return param.device


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return None


def choose_placement(
    model_device: torch.device, target: torch.device | None, model_bytes: int, free_bytes: int | None
) -> str:
    """Decide how to run a model on ``target``: ``"stay"``, ``"move"`` or ``"offload"``.

    ``offload`` (block-by-block execution with the weights kept on the CPU) when the target
    has a known amount of free memory smaller than the model plus a working headroom.
    """
    if target is None or target == model_device:
        return "stay"
    if free_bytes is not None and model_bytes + _GPU_HEADROOM_BYTES > free_bytes:
        return "offload"
    return "move"


@contextlib.contextmanager
def cpu_offloaded(model: torch.nn.Module, device: torch.device):
    """Run ``model`` on ``device`` with its weights kept on the CPU (``accelerate.cpu_offload``).

    The hooks are removed on exit, which puts the weights back where they were.
    """
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_submodules(model)


def _normalize_device(device) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def _placed(model: torch.nn.Module, device):
    """Yield the device inputs go to, after placing the model there (see :func:`perplexity`)."""
    current = _model_device(model)
    target = _normalize_device(device)
    placement = choose_placement(current, target, _model_bytes(model), _free_bytes(target) if target else None)
    if placement == "stay":
        yield current
    elif placement == "move":
        logger.info("moving the model from %s to %s", current, target)
        model.to(target)
        yield target
    else:
        logger.info("the model (%.2f GB) does not fit on %s: running it block by block from the CPU",
                    _model_bytes(model) / 1e9, target)
        with cpu_offloaded(model, target):
            yield target


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Return the perplexity of ``model`` on ``input_ids`` by the GPTQ protocol.

    ``input_ids`` (1, N) is cut into ``N // seqlen`` non-overlapping windows (the remainder is
    dropped; ``max_windows`` keeps the first ones). Each window's logits are taken in float32 and
    its mean next-token NLL over its ``seqlen - 1`` predictions computed; the perplexity is
    ``exp`` of the mean of these per-window means. This is GPTQ's formula exactly
    (``exp(sum(mean_loss_w * seqlen) / (n_windows * seqlen))``); as all windows predict the same
    number of tokens it also equals ``exp(total NLL / total predicted tokens)``.

    Args:
        model: a causal LM returning ``.logits``; put in eval mode for the loop, then restored.
        input_ids: token ids, (1, N) or (N,).
        seqlen: window length.
        max_windows: evaluate only the first windows.
        batch_size: windows per forward pass.
        device: where to run. If the model lives elsewhere it is moved there (and left there),
            or, when it does not fit in the GPU's free memory, run block by block with
            ``accelerate.cpu_offload`` and its weights kept on the CPU.

    Raises:
        DataError: fewer than ``seqlen`` tokens.
        ModelError: ``seqlen`` longer than the model's maximum positions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_seqlen(model, seqlen)
    windows = make_windows(input_ids, seqlen, max_windows)
    n_windows = windows.shape[0]
    was_training = model.training
    model.eval()
    means: list[torch.Tensor] = []
    start = time.perf_counter()
    try:
        with _placed(model, device) as run_device, torch.inference_mode():
            with tqdm(total=n_windows, desc="perplexity", unit="window") as progress:
                for lo in range(0, n_windows, batch_size):
                    batch = windows[lo : lo + batch_size].to(run_device)  # (b, seqlen)
                    logits = model(input_ids=batch, use_cache=False).logits
                    means.append(window_nll(logits, batch).double().cpu())
                    progress.update(batch.shape[0])
    finally:
        model.train(was_training)
    nll = torch.cat(means).mean().item()
    result = PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_windows=n_windows,
        n_tokens=n_windows * seqlen,
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )
    logger.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", result.ppl, n_windows, seqlen, result.seconds)
    return result
