"""Block reconstruction: tune a quantized block's stored continuous values so it reproduces a target output.

After every linear of a decoder block is quantized (each a :class:`~billm.packing.linear.PackedLinear`),
the block as a whole is run on calibration inputs and its stored continuous values (scales, means,
offsets: the format's :func:`tunable_fields`) are tuned with Adam so that its output comes close
to a target (the full-precision block's output). The values are trained in the form they are
stored: the forward decodes the weight from the tuned values *rounded to the stored dtype*
(fp16, fp8, ...), the backward passes the gradient straight through that rounding
(:func:`stored_round`). The tuned values are written back in the stored dtype, so the layer
decodes to exactly the weights of the tuned forward. Bitmaps and codes are not changed; the sign planes a
format declares (``Format.signs``) are tuned too when asked (``Settings.signs``), through latent weights
and a straight-through sign (:func:`ste_sign`), and written back packed.

Pure torch: no ``transformers`` import. The driver (:mod:`billm.driver`) hands the block, its
inputs and keyword arguments per calibration batch, and the target outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .packing.formats import StoredWeight, get_format
from .packing.linear import PackedLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """How one block is tuned.

    Attributes:
        steps: Adam steps (0: nothing is tuned).
        lr: learning rate relative to each tuned value's magnitude (Adam's steps are about ``lr``
            times the size of the value, whatever the field's scale: a value ``v0`` is tuned as
            ``v0 + s u``, ``s = max(|v0|, mean |v0| / 100)`` of its tensor, with Adam on ``u``).
        batch: calibration sequences per step (at most one calibration batch's).
        seed: seeds the choice of mini-batches (with the block index).
        signs: also tune the sign planes a format declares (``Format.signs``) through latent weights: each
            starts at +-1, the forward takes its sign, the backward passes the gradient where ``|latent| <= 1``
            (a clipped straight-through estimator); a sign flips when its latent crosses 0.
        sign_lr: Adam's learning rate on those latents.
    """

    steps: int
    lr: float = 1e-2
    batch: int = 1
    seed: int = 0
    signs: bool = False
    sign_lr: float = 0.05


@dataclass
class Stats:
    """What tuning one block did (figures for the report).

    Attributes:
        steps: Adam steps taken (0 when nothing was tunable or steps was 0).
        values: stored values tuned.
        loss_first: the loss figure of the first mini-batch, before tuning (a block: the relative squared error
            ``|out - target|^2 / |target|^2``; the whole model: the next-token cross-entropy, or the KL divergence
            from the full-precision model's distribution).
        loss_last: the same, averaged over the last (up to 10) mini-batches, before each one's step.
        seconds: wall time.
        signs: sign-plane entries tuned (``Settings.signs``), flipped: how many of them changed.
    """

    steps: int = 0
    values: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    seconds: float = 0.0
    signs: int = 0
    flipped: int = 0


def tunable_fields(stored: StoredWeight) -> list[str]:
    """The fields of a stored weight that hold continuous values: the format's ``tunable`` list, or by default
    every floating-point field (scales, means, column scales; never bit planes, codes or indices)."""
    declared = get_format(stored.format).tunable
    if declared is not None:
        return [f for f in declared if f in stored.tensors]
    return [f for f, t in stored.tensors.items() if t.is_floating_point()]


def stored_round(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float32) rounded to what ``dtype`` holds, clamped into its range first, as float32; no gradient."""
    if dtype == x.dtype:
        return x.detach()
    big = torch.finfo(dtype).max
    return x.detach().clamp(-big, big).to(dtype).to(x.dtype)


def straight_through(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Forward: exactly :func:`stored_round` of ``x``; backward: the identity (straight-through estimator)."""
    return stored_round(x, dtype) + (x - x.detach())  # r + 0.0 is r exactly


def _fresh(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor copied to ``device`` as a normal tensor (an inference-mode tensor cannot be
    saved for backward)."""
    if isinstance(obj, Tensor):
        return obj.to(device).clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh(v, device) for k, v in obj.items()}
    return obj


def select_rows(obj: Any, rows: Tensor, n: int) -> Any:
    """``obj`` (a block's keyword arguments) with the given ``rows`` of every tensor whose first dimension is the
    batch's ``n`` sequences (tensors of rank >= 2 only: attention masks, per-sequence positions); other tensors
    (shared by the batch, broadcast over it) as they are."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() >= 2 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(select_rows(o, rows, n) for o in obj)
    if isinstance(obj, dict):
        return {k: select_rows(v, rows, n) for k, v in obj.items()}
    return obj


def ste_sign(z: Tensor) -> Tensor:
    """Forward: +1 where ``z >= 0``, else -1 (float32); backward: the gradient where ``|z| <= 1``, else 0."""
    clipped = z.clamp(-1.0, 1.0)
    return torch.where(z >= 0, 1.0, -1.0).detach() + (clipped - clipped.detach())


def relative_step(v0: Tensor) -> Tensor:
    """The per-value step size of :class:`Settings`' ``lr``: ``max(|v0|, mean |v0| / 100)`` (a value at 0 still moves)."""
    a = v0.abs()
    return a.clamp(min=float(a.mean()) / 100 + 1e-12)


class _Layer:
    """One packed layer under tuning: each tunable field as ``v0 + step * u``, ``u`` (zeros at first) the parameter."""

    def __init__(self, module: PackedLinear, signs: bool = False) -> None:
        self.module = module
        st = module.stored()
        self.fixed = dict(st.tensors)
        self.dtypes = {f: st.tensors[f].dtype for f in tunable_fields(st)}
        self.start = {f: st.tensors[f].detach().float() for f in self.dtypes}
        self.step = {f: relative_step(v) for f, v in self.start.items()}
        self.params = {f: nn.Parameter(torch.zeros_like(v)) for f, v in self.start.items()}
        self.planes = get_format(st.format).signs if signs else None
        self.latents = {} if self.planes is None else {  # +-1 where the stored signs are +1 / -1
            f: nn.Parameter(torch.where(b, 1.0, -1.0)) for f, b in self.planes.unpack(st.tensors, st.shape, st.meta).items()}

    def values(self, f: str) -> Tensor:
        """Field ``f``'s tuned float32 values (not yet rounded to the stored dtype)."""
        return self.start[f] + self.step[f] * self.params[f]

    def decode(self) -> Tensor:
        """(out, in) float32 weight decoded from the tuned values as stored (straight-through rounding)."""
        m = self.module
        tensors = {**self.fixed, **{f: straight_through(self.values(f), d) for f, d in self.dtypes.items()}}
        if self.planes is not None:
            return self.planes.decode(tensors, {f: ste_sign(z) for f, z in self.latents.items()}, m.shape, m.meta)
        return get_format(m.format).decode(tensors, m.shape, m.meta)

    def write_back(self) -> int:
        """Store the tuned values in their stored dtypes and the tuned signs packed (the layer then decodes to exactly
        what was tuned). Returns how many signs flipped."""
        new = {f: stored_round(self.values(f), d).to(d) for f, d in self.dtypes.items()}
        flipped = 0
        if self.planes is not None:
            m = self.module
            before = self.planes.unpack(self.fixed, m.shape, m.meta)
            after = {f: (z.detach() >= 0) for f, z in self.latents.items()}
            flipped = sum(int((before[f] != after[f]).sum()) for f in after)
            new.update(self.planes.pack(after, m.shape, m.meta))
        self.module.replace_fields(new)
        return flipped


def _draws(sizes: Sequence[int], batch: int, steps: int, gen: torch.Generator) -> list[tuple[int, Tensor]]:
    """For each step, (calibration batch, the rows of it to use): batches drawn in proportion to their sequences."""
    weights = torch.tensor(sizes, dtype=torch.float64)
    out = []
    for _ in range(steps):
        b = int(torch.multinomial(weights, 1, generator=gen))
        rows = torch.randperm(sizes[b], generator=gen)[:batch]  # (min(batch, sizes[b]),)
        out.append((b, rows.sort().values))
    return out


def tune(module: nn.Module, settings: Settings, loss_of: Callable[[int], tuple[Tensor, float]], label: str) -> Stats:
    """Tune the stored continuous values (and, with ``settings.signs``, the sign planes) of every
    :class:`PackedLinear` inside ``module`` with Adam, then write them back in their stored form.

    ``loss_of(k)`` runs step ``k``'s forward (the layers then decode from the values being tuned) and returns
    (the differentiable loss, the figure reported for it). The module's own parameters are frozen meanwhile.
    With 0 steps, or nothing tunable, nothing changes (not one byte). ``label`` names the module in the log.
    """
    t0 = time.perf_counter()
    layers = [_Layer(m, settings.signs) for m in module.modules() if isinstance(m, PackedLinear)]
    layers = [la for la in layers if la.params or la.latents]
    if settings.steps <= 0 or not layers:
        return Stats()
    groups = [{"params": [p for la in layers for p in la.params.values()], "lr": settings.lr},
              {"params": [z for la in layers for z in la.latents.values()], "lr": settings.sign_lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    frozen = {p: p.requires_grad for p in module.parameters()}
    kernels = {la.module: la.module.kernel for la in layers}
    losses: list[float] = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for la in layers:
            la.module.kernel = "dequant"  # the forward multiplies with the decoded weight (module._decoded)
            la.module.replace_fields({})  # caches built in inference mode (a rotation's signs) are rebuilt for autograd
        with torch.inference_mode(False), torch.enable_grad():
            for k in range(settings.steps):
                for la in layers:
                    la.module._decoded = la.decode()
                loss, figure = loss_of(k)
                losses.append(figure)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for la in layers:
            la.module.kernel = kernels[la.module]
            la.module._decoded = None
    flipped = sum(la.write_back() for la in layers)
    stats = Stats(steps=len(losses), values=sum(p.numel() for la in layers for p in la.params.values()),
                  loss_first=losses[0], loss_last=sum(losses[-10:]) / len(losses[-10:]),
                  seconds=time.perf_counter() - t0, signs=sum(z.numel() for la in layers for z in la.latents.values()),
                  flipped=flipped)
    log.info("%s tuned: %d steps, %d values, %d of %d signs flipped, loss %.4f -> %.4f, %.1fs", label, stats.steps,
             stats.values, stats.flipped, stats.signs, stats.loss_first, stats.loss_last, stats.seconds)
    return stats


def reconstruct_block(block: nn.Module, hidden: Sequence[Tensor], kwargs: Sequence[dict[str, Any]],
                      targets: Sequence[Tensor], settings: Settings, device: torch.device,
                      index: int = 0) -> Stats:
    """Tune the stored continuous values of every :class:`PackedLinear` of ``block`` in place (:func:`tune`),
    toward ``targets``; the reported loss is the relative squared error ``|out - target|^2 / |target|^2``.

    Args:
        block: the decoder block (on ``device``), its quantized linears already PackedLinear.
        hidden: per calibration batch, the block's input hidden states (n_b, seq, dim), anywhere.
        kwargs: per calibration batch, the block's other keyword arguments.
        targets: per calibration batch, the output (n_b, seq, dim) the block should reproduce.
        settings: steps, learning rate, mini-batch size and seed.
        device: where the block runs; mini-batches are moved there one at a time.
        index: the block's number (seeds its mini-batches with ``settings.seed``).

    Returns:
        :class:`Stats`. With 0 steps, or no tunable field in the block, nothing changes (not one byte).
    """
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    draws = _draws([h.shape[0] for h in hidden], settings.batch, max(settings.steps, 0), gen)

    def loss_of(k: int) -> tuple[Tensor, float]:
        b, rows = draws[k]
        n = hidden[b].shape[0]
        x = _fresh(hidden[b].index_select(0, rows.to(hidden[b].device)), device)  # (batch, seq, dim)
        kw = _fresh(select_rows(kwargs[b], rows, n), device)
        target = targets[b].index_select(0, rows.to(targets[b].device)).to(device, torch.float32)  # (batch, seq, dim)
        out = block(x, **kw)
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        err = (out - target).pow(2).sum()
        return err, float(err.detach()) / max(float(target.pow(2).sum()), 1e-30)

    return tune(block, settings, loss_of, f"block {index}")


def teacher_logits(model: nn.Module, last_block: nn.Module, ids: Tensor, hidden: Tensor) -> Tensor:
    """The logits ``model`` computes when ``last_block``'s output is ``hidden`` (batch, seq, dim): the model's own tail
    (final norm, head) on another stream's last hidden states, e.g. the full-precision model's. No gradients.
    (The blocks still run, and their output is replaced; the tail is what matters.)"""
    def swap(module: nn.Module, args: Any, out: Any) -> Any:
        several = isinstance(out, (tuple, list))
        first = out[0] if several else out
        h = hidden.to(device=first.device, dtype=first.dtype)
        return type(out)([h, *out[1:]]) if several else h

    handle = last_block.register_forward_hook(swap)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()  # (batch, seq, vocab)
    finally:
        handle.remove()


def finetune_model(model: nn.Module, batches: Sequence[Tensor], settings: Settings, device: torch.device,
                   teacher: Optional[Sequence[Tensor]] = None, last_block: Optional[nn.Module] = None) -> Stats:
    """End-to-end tuning: every stored continuous value of ``model``'s PackedLinear layers at once (:func:`tune`).

    The loss, also the reported figure (nats): without ``teacher``, the next-token cross-entropy of the calibration
    text; with it, the KL divergence from the full-precision model's next-token distribution to the quantized
    model's, averaged over the tokens, the full-precision logits from :func:`teacher_logits`.

    Args:
        model: a causal LM (``model(ids, labels=ids).loss``), all of it on ``device``.
        batches: calibration token ids, (n_b, seq) per batch.
        settings: steps, learning rate (relative, as for blocks), sequences per step and seed.
        device: where the model runs.
        teacher: per batch, the full-precision model's last-block outputs (n_b, seq, dim), anywhere.
        last_block: the model's last decoder block (where ``teacher`` is put in), with ``teacher``.
    """
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + 999_983)
    draws = _draws([b.shape[0] for b in batches], settings.batch, max(settings.steps, 0), gen)

    def loss_of(k: int) -> tuple[Tensor, float]:
        b, rows = draws[k]
        ids = batches[b].index_select(0, rows).to(device)  # (batch, seq)
        if teacher is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            t = teacher[b].index_select(0, rows.to(teacher[b].device))
            log_p = torch.log_softmax(teacher_logits(model, last_block, ids, t), -1)
            log_q = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)  # (batch, seq, vocab)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return loss, float(loss.detach())

    return tune(model, settings, loss_of, "model")
