"""The one entry point: ``billm.quantize(model, calibration, config) -> QuantReport``.

Block by block: capture the first block's inputs, then for each decoder block accumulate the
Hessian of every selected linear from the block's calibration inputs, quantize each linear with
the configured method (simulated weights written in place), and run the quantized block again
so the next block sees quantized outputs. Finished blocks go back to the offload device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .bits import storage_bits
from .config import QuantConfig
from .errors import BillmError, DataError, ModelError, QuantizationError
from .eval.perplexity import max_positions
from .methods import get_method
from .methods.obc import HessianAccumulator, OBCTimes, hessian_error
from .packing.formats import StoredWeight

if TYPE_CHECKING:
    from .resume import ProgressStore
from .model.walker import (
    BlockInputs, Device, capture_inputs, find_blocks, find_linears, get_weight, run_block, select_linears, set_weight,
)

log = logging.getLogger(__name__)

PHASES = ("capture", "hessian", "search", "compensation", "propagation")


@dataclass
class LayerReport:
    """What happened to one linear.

    Attributes:
        name: qualified module name.
        shape: (out_features, in_features).
        weight_bits: bits per weight as papers count them.
        storage_bits: bits per weight of everything the stored form needs (:mod:`billm.bits`).
        hessian_rel_err: ``tr(D H D^T) / tr(W H W^T)``, D = W - Q: relative output error on the calibration data.
        weight_rel_err: ``||W - Q||_F / ||W||_F``.
        seconds: time spent quantizing this linear.
        info: method-specific figures (salient columns, break points, ...).
    """

    name: str
    shape: tuple[int, int]
    weight_bits: float
    storage_bits: float
    hessian_rel_err: float
    weight_rel_err: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantReport:
    """Per-layer report and phase timings of one :func:`quantize` run.

    ``stored`` maps each quantized linear's full name to its packed form (what
    :func:`billm.save` writes); it is not part of :meth:`to_dict`.
    """

    config: dict[str, Any]
    layers: list[LayerReport]
    phases: dict[str, float]
    nsamples: int
    seqlen: int
    stored: dict[str, StoredWeight] = field(default_factory=dict, repr=False)

    @property
    def n_weights(self) -> int:
        """Quantized weights in total."""
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def weight_bits(self) -> float:
        """Average bits per quantized weight (paper counting), weighted by layer size."""
        n = self.n_weights
        return sum(r.weight_bits * r.shape[0] * r.shape[1] for r in self.layers) / n if n else float("nan")

    @property
    def storage_bits(self) -> float:
        """Average stored bits per quantized weight, scales and bitmaps included (:mod:`billm.bits`)."""
        n = self.n_weights
        return sum(r.storage_bits * r.shape[0] * r.shape[1] for r in self.layers) / n if n else float("nan")

    @property
    def seconds(self) -> float:
        """Total wall time of the phases."""
        return sum(self.phases.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"config": self.config, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "weight_bits": self.weight_bits, "storage_bits": self.storage_bits, "n_weights": self.n_weights, "seconds": self.seconds,
                "phases": dict(self.phases), "layers": [asdict(r) for r in self.layers]}


def _as_batches(calibration: Union[Tensor, Sequence[Tensor]], batch_size: int) -> list[Tensor]:
    if isinstance(calibration, Tensor):
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.dim() != 2:
            raise DataError(f"calibration token ids must be (nsamples, seqlen), got shape {tuple(calibration.shape)}")
        rows = list(calibration)
    else:
        rows = [t.reshape(-1) for t in calibration]
    if not rows:
        raise DataError("no calibration samples given")
    lengths = {r.numel() for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise DataError(f"calibration samples must all have the same non-zero length, got {sorted(lengths)}")
    return [torch.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def shared_input_groups(block: nn.Module, linears: dict[str, nn.Module], inputs, device: Device,
                        index: int = 0) -> list[list[str]]:
    """Group the linears of a block that receive the very same input tensor (one Hessian each group).

    Found by running the block on one calibration batch and comparing the input tensors, so
    q/k/v projections (or gate/up) share one accumulator on any architecture that feeds them one
    tensor, with no name matching.
    """
    seen: dict[str, Tensor] = {}  # holding the inputs keeps them alive, so ids cannot be reused
    hooks = [m.register_forward_hook(lambda _m, inp, _out, n=n: seen.__setitem__(n, inp[0]))
             for n, m in linears.items()]
    try:
        first = BlockInputs(hidden=inputs.hidden[:1], kwargs=inputs.kwargs[:1], layer_kwargs=inputs.layer_kwargs[:1])
        run_block(block, first, device, device, index)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[object, list[str]] = {}
    for n in linears:
        groups.setdefault(id(seen[n]) if n in seen else ("unseen", n), []).append(n)
    return list(groups.values())


def quantize(model: nn.Module, calibration: Union[Tensor, Sequence[Tensor]], config: QuantConfig,
             device: Optional[Device] = None, batch_size: int = 8, progress: bool = True,
             store: Optional["ProgressStore"] = None) -> QuantReport:
    """Quantize the linears of every decoder block of ``model`` in place (simulated weights).

    Args:
        model: a Hugging Face causal LM (or any model with a list of repeated decoder blocks).
        calibration: token ids, (nsamples, seqlen) or a list of 1-D tensors of one length.
        config: the method's config (e.g. :class:`billm.BiLLMConfig`).
        device: where each block runs while it is quantized (e.g. ``"cuda"``); the rest of the
            model waits on its current device. Default: the model's device.
        batch_size: calibration sequences per forward call.
        progress: show a tqdm bar over blocks.
        store: a :class:`~billm.resume.ProgressStore`: every finished block is recorded there,
            and a run that finds earlier progress continues after its last finished block.

    Returns:
        A :class:`QuantReport` with one :class:`LayerReport` per quantized linear.

    Raises:
        QuantizationError: a weight or activation is not finite, or a Hessian cannot be factored.
            Blocks finished before the failure stay quantized in place; reload the model to retry.
    """
    fn = get_method(config.method)
    batches = _as_batches(calibration, batch_size)
    nsamples, seqlen = sum(b.shape[0] for b in batches), batches[0].shape[1]
    max_pos = max_positions(getattr(model, "config", None))
    if max_pos is not None and seqlen > max_pos:
        raise DataError(f"calibration seqlen {seqlen} exceeds the model's maximum of {max_pos} positions")
    blocks_name, blocks = find_blocks(model)
    targets = [select_linears(find_linears(b), f"{blocks_name}.{i}", config.include, config.exclude)
               for i, b in enumerate(blocks)]
    if not any(targets):
        raise ModelError(f"no linear layers to quantize in {type(model).__name__} "
                         f"(include={list(config.include)}, exclude={list(config.exclude)})")
    for i, lin in enumerate(targets):  # fail before any work, naming the layer
        for name, mod in lin.items():
            if not torch.isfinite(get_weight(mod)).all():
                raise QuantizationError(f"{blocks_name}.{i}.{name}: the weight has NaN/Inf entries; refusing to quantize it")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    offload = home
    phases = {p: 0.0 for p in PHASES}
    was_training = model.training
    model.eval()

    current: Optional[nn.Module] = None
    try:
        t0 = time.perf_counter()
        inputs = capture_inputs(model, batches, device=device, offload=offload)
        phases["capture"] += time.perf_counter() - t0

        layers: list[LayerReport] = []
        stored: dict[str, StoredWeight] = {}
        start = 0
        state = store.load() if store is not None else None
        if state is not None:  # replay the finished blocks: their packed weights decode to the simulated ones
            start = state.next_block
            for name, st in state.stored.items():
                mod = model.get_submodule(name)
                set_weight(mod, st.values().to(get_weight(mod).device))
            stored.update(state.stored)
            layers = [LayerReport(**{**d, "shape": tuple(d["shape"])}) for d in state.layers]
            for k, v in state.phases.items():
                phases[k] += v
            if state.hidden is not None:
                inputs.hidden = state.hidden
            log.info("resumed: blocks 0..%d were finished by an earlier run", start - 1)
        groups: Optional[list[list[str]]] = None
        bar = tqdm(list(enumerate(blocks))[start:], desc=f"{config.method} blocks", disable=not progress, unit="block",
                   initial=start, total=len(blocks))
        for i, block in bar:
            before = dict(phases)
            n_layers_before = len(layers)
            current = block
            block.to(device)
            linears = targets[i]
            # 1) statistics: one pass of the calibration inputs through the (still full-precision) block
            t0 = time.perf_counter()
            # Blocks repeat one structure: probe the input sharing once, reuse it while the names match.
            if config.uses_hessian and (groups is None or {n for g in groups for n in g} != set(linears)):
                groups = shared_input_groups(block, linears, inputs, device, i)
            accs: dict[str, HessianAccumulator] = {}
            handles = []
            for group in (groups if config.uses_hessian else []):  # one accumulator per distinct input (q/k/v share one, gate/up another)
                acc = HessianAccumulator(get_weight(linears[group[0]]).shape[1], device,
                                         name=" / ".join(f"{blocks_name}.{i}.{n}" for n in group))
                accs.update({n: acc for n in group})
                handles.append(linears[group[0]].register_forward_hook(
                    lambda _m, inp, _out, a=acc: a.add_batch(inp[0].detach())))
            try:
                if handles:
                    run_block(block, inputs, device, offload, i)
            except QuantizationError as e:
                raise QuantizationError(f"block {blocks_name}.{i}: {e}") from e
            finally:
                for h in handles:
                    h.remove()
            phases["hessian"] += time.perf_counter() - t0
            # 2) quantize each linear
            for name, mod in linears.items():
                full = f"{blocks_name}.{i}.{name}"
                W = get_weight(mod).to(torch.float32)
                if config.uses_hessian and accs[name].nsamples == 0:
                    raise QuantizationError(f"{full}: received no calibration input (is it on an unused "
                                            f"path?); exclude it with --exclude")
                H = accs[name].H if config.uses_hessian else None
                times = OBCTimes()
                t0 = time.perf_counter()
                try:
                    res = fn(W.clone(), H, config, times)
                except BillmError as e:
                    raise QuantizationError(f"{full}: {e}") from e
                took = time.perf_counter() - t0
                phases["search"] += times.quantize
                phases["compensation"] += times.compensate
                phases["hessian"] += took - times.quantize - times.compensate
                rel = hessian_error(W, res.q, H)[1] if H is not None else float("nan")
                wrel = float(torch.linalg.norm(W - res.q) / torch.linalg.norm(W).clamp(min=1e-12))
                set_weight(mod, res.q)
                if res.stored is not None:
                    stored[full] = res.stored
                elif store is not None:
                    raise QuantizationError(f"method {config.method!r} returned no packed form for {full}; "
                                            "a resumable run needs one (WeightResult.stored)")
                layers.append(LayerReport(name=full, shape=tuple(W.shape), weight_bits=res.weight_bits,
                                          storage_bits=storage_bits(config.to_dict(), tuple(W.shape), res.info,
                                                                    res.weight_bits),
                                          hessian_rel_err=rel, weight_rel_err=wrel, seconds=took, info=res.info))
                log.info("%s %s: rel. output error %.4f, rel. weight error %.4f, %.3f bits, %.2fs",
                         full, tuple(W.shape), rel, wrel, res.weight_bits, took)
            del accs
            # 3) propagate: the next block sees this block's quantized outputs
            t0 = time.perf_counter()
            if i + 1 < len(blocks):
                inputs.hidden = run_block(block, inputs, device, offload, i)
            block.to(offload)
            phases["propagation"] += time.perf_counter() - t0
            if store is not None:
                done = layers[n_layers_before:]
                store.record_block(i, done, {r.name: stored[r.name] for r in done if r.name in stored},
                                   inputs.hidden if i + 1 < len(blocks) else None,
                                   {k: phases[k] - before[k] for k in phases})
            if layers:
                bar.set_postfix(err=f"{layers[-1].hessian_rel_err:.3f}")
    finally:  # on any failure: the block back where it was, the mode restored
        if current is not None:
            current.to(offload)
        model.train(was_training)
    return QuantReport(config=config.to_dict(), layers=layers, phases=phases, nsamples=nsamples, seqlen=seqlen,
                       stored=stored)
