"""The one entry point: ``billm.quantize(model, calibration, config) -> QuantReport``.

Steps, block by block (each a function below): capture the first block's inputs
(:func:`~billm.model.walker.capture_inputs`); for each decoder block, accumulate the Hessian of
every selected linear from the block's calibration inputs (:func:`accumulate_hessians`), quantize
each linear with the config's method and swap in its :class:`~billm.packing.linear.PackedLinear`
(:func:`quantize_linear`), and run the now-packed block again so the next block sees quantized
outputs (:func:`propagate`). Finished blocks go back to the offload device; a resumed run first
replays the finished blocks from its progress store (:func:`replay`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .errors import BillmError, DataError, ModelError, QuantizationError
from .memory import return_freed_memory
from .methods.obc import (HessianAccumulator, OBCTimes, PreparedHessian, all_finite, last_use_of_factor, output_energy,
                          output_error)
from .methods.registry import Method, method_of
from .model.lazy import LazyWeights, fill_outside_blocks, is_lazy
from .model.walker import (
    BlockInputs, Device, capture_inputs, find_blocks, find_linears, get_weight, max_positions, replace_module, run_batch,
    run_block, select_linears, to_host,
)
from .packing.checkpoint import quantization_record
from .packing.formats import StoredWeight
from .packing.linear import PackedLinear, decode_once
from .packing.rotation import Rotation
from .reconstruct import Settings, finetune_model, reconstruct_block

if TYPE_CHECKING:
    from .resume import ProgressStore

log = logging.getLogger(__name__)

PHASES = ("capture", "hessian", "search", "compensation", "propagation")


@dataclass
class LayerReport:
    """What happened to one linear.

    Attributes:
        name: qualified module name.
        shape: (out_features, in_features).
        weight_bits: bits per weight as papers count them (the format's ``weight_bits``).
        storage_bits: bytes of the packed buffers (and map share) x 8 / weights
            (:func:`billm.packing.formats.storage_bits`).
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
    """Per-layer metrics and phase timings of one :func:`quantize` run (the weights live in the model)."""

    config: dict[str, Any]
    layers: list[LayerReport]
    phases: dict[str, float]
    nsamples: int
    seqlen: int
    resumed_blocks: int = 0  # blocks an interrupted earlier run had finished (replayed from the progress store)
    finetune: dict[str, Any] = field(default_factory=dict)  # end-to-end tuning's figures (config.finetune); the layers'
    # errors above are those before it

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
        """Average stored bits per quantized weight, scales and bitmaps included (from the packed bytes)."""
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
                "phases": dict(self.phases), "layers": [asdict(r) for r in self.layers],
                **({"finetune": dict(self.finetune)} if self.finetune else {})}


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
        run_block(block, first, device, device, index, keep=False)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[object, list[str]] = {}
    for n in linears:
        groups.setdefault(id(seen[n]) if n in seen else ("unseen", n), []).append(n)
    return list(groups.values())


@dataclass
class _Run:
    """The state of one :func:`quantize` call, handed from step to step."""

    model: nn.Module
    config: QuantConfig
    method: Method
    blocks_name: str
    blocks: nn.ModuleList
    targets: list[dict[str, nn.Module]]  # per block, the linears to quantize by in-block name (emptied once done)
    device: torch.device  # the first of ``devices``: where the block, its Hessians and the packed layers live
    offload: torch.device
    devices: list[torch.device] = field(default_factory=list)  # every device working on a block
    weights: Optional[LazyWeights] = None  # where an empty model's tensors come from, block by block
    activations: Optional[torch.device] = None  # where the calibration activations wait (default: offload)
    inputs: Optional[BlockInputs] = None
    layers: list[LayerReport] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    groups: Optional[list[list[str]]] = None  # linears sharing one input, probed once
    fp_hidden: Optional[list[Tensor]] = None  # the full-precision model's activations (_keeps_fp_stream)

    def name(self, i: int, linear: str) -> str:
        return f"{self.blocks_name}.{i}.{linear}"


def _plan(model: nn.Module, config: QuantConfig, seqlen: int, device: Optional[Device]) -> _Run:
    """Check the model, the config and the calibration length; find the linears to quantize. No work yet."""
    method = method_of(config)
    max_pos = max_positions(getattr(model, "config", None))
    if max_pos is not None and seqlen > max_pos:
        raise DataError(f"calibration seqlen {seqlen} exceeds the model's maximum of {max_pos} positions")
    blocks_name, blocks = find_blocks(model)
    targets = [select_linears(find_linears(b), f"{blocks_name}.{i}", config.include, config.exclude)
               for i, b in enumerate(blocks)]
    if not any(targets):
        raise ModelError(f"no linear layers to quantize in {type(model).__name__} "
                         f"(include={list(config.include)}, exclude={list(config.exclude)})")
    for i, lin in enumerate(targets):  # fail before any work, naming the layer (an empty model's: when read)
        for name, mod in lin.items():
            _check_finite(get_weight(mod), f"{blocks_name}.{i}.{name}")
    home = next(model.parameters()).device
    home = torch.device("cpu") if home.type == "meta" else home
    devices = parse_devices(device) or [home]
    return _Run(model, config, method, blocks_name, blocks, targets, devices[0], home, devices)


def estimate_run_bytes(model: nn.Module, config: QuantConfig, quantized: Sequence[Tensor], nsamples: int,
                       seqlen: int) -> int:
    """A generous estimate of the disk a quantize run needs: the checkpoint, the progress folder, a margin.

    Args:
        model: the model (its parameters may be on ``meta``: only sizes are read).
        config: the method's config (its ``storage_estimate`` bits per quantized weight).
        quantized: the weights that will be quantized.
        nsamples, seqlen: the calibration windows (the progress folder keeps their activations, twice over when a
            full-precision stream runs beside the quantized one, each file written beside its last copy).
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = int(sum(w.numel() for w in quantized) * config.storage_estimate / 8)
    other = max(0, total - sum(w.numel() * w.element_size() for w in quantized))
    emb = model.get_input_embeddings()
    hidden = nsamples * seqlen * emb.embedding_dim * emb.weight.element_size()
    streams = 2 if _keeps_fp_stream(config) else 1
    return 2 * packed + other + 2 * streams * hidden + 50_000_000


def parse_devices(device: Union[None, Device, Sequence[Device]]) -> list[torch.device]:
    """``"cuda:0,cuda:1"`` (or a list) as devices; ``[]`` for None.

    Raises:
        BillmError: an unknown device name.
    """
    if device is None:
        return []
    items = str(device).split(",") if isinstance(device, (str, torch.device)) else list(device)
    try:
        return [torch.device(d.strip() if isinstance(d, str) else d) for d in items if str(d).strip()]
    except RuntimeError as e:
        raise BillmError(f"bad device list {device!r}: {e}") from None


def clock(devices: Sequence[torch.device]) -> float:
    """``time.perf_counter()`` once every CUDA device in ``devices`` has finished its queued work.

    CUDA calls return as soon as their kernels are queued, so a phase timed without a synchronise
    counts only the launches (a 7B block's propagation over 262k tokens read 0.02 s). Every phase
    boundary reads this clock; on the CPU it is ``perf_counter`` alone.
    """
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    return time.perf_counter()


def _check_finite(w: Tensor, name: str) -> None:
    if not w.is_meta and not all_finite(w):
        raise QuantizationError(f"{name}: the weight has NaN/Inf entries; refusing to quantize it")


def _fill_block(run: _Run, i: int) -> None:
    """An empty model's block ``i``: read its tensors (in the model's dtype) and check its linears' weights."""
    if run.weights is None:
        return
    run.weights.materialize(run.blocks[i], f"{run.blocks_name}.{i}")
    for name, mod in run.targets[i].items():
        _check_finite(get_weight(mod), run.name(i, name))


def _replicas(run: _Run, i: int) -> list[nn.Module]:
    """Block ``i`` (on the first device) and a copy of it on every further device."""
    block = run.blocks[i]
    return [block] + [copy.deepcopy(block).to(d) for d in run.devices[1:]]


def _over_batches(run: _Run, reps: list[nn.Module], each: Callable[[int, int], Any]) -> Iterator[tuple[int, Any]]:
    """``each(replica_index, batch)`` for every calibration batch, round robin over the replicas; (batch, result)
    in batch order, so whatever is accumulated from the results is accumulated in the same order on any device list."""
    nb, n = len(run.inputs.hidden), len(reps)
    if n == 1:
        yield from ((b, each(0, b)) for b in range(nb))
        return
    with ThreadPoolExecutor(n) as pool:
        for r0 in range(0, nb, n):
            futures = [pool.submit(each, k, r0 + k) for k in range(min(n, nb - r0))]
            yield from ((r0 + k, f.result()) for k, f in enumerate(futures))


def _accumulate_hessians(run: _Run, i: int) -> dict[str, HessianAccumulator]:
    """Step 1: one pass of the calibration inputs through the (full-precision) block ``i``; a Hessian per linear.

    Linears fed the very same tensor (q/k/v, gate/up) share one accumulator. With several devices
    each runs a replica of the block on its share of the batches; every input is added to the
    Hessian on the first device, in batch order (the same sums as on one device).
    """
    block, linears = run.blocks[i], run.targets[i]
    if not run.config.uses_hessian:
        return {}
    if run.groups is None or {n for g in run.groups for n in g} != set(linears):  # blocks repeat one structure
        run.groups = shared_input_groups(block, linears, run.inputs, run.device, i)
    accs: dict[str, HessianAccumulator] = {}
    for group in run.groups:
        acc = HessianAccumulator(get_weight(linears[group[0]]).shape[1], run.device,
                                 name=" / ".join(run.name(i, n) for n in group))
        accs.update({n: acc for n in group})
    reps = _replicas(run, i)
    seen: list[dict[str, Tensor]] = [{} for _ in reps]  # per replica: the group leaders' inputs of its batch
    handles = [rep.get_submodule(g[0]).register_forward_hook(
        lambda _m, inp, _out, k=k, n=g[0]: seen[k].__setitem__(n, inp[0].detach())) for k, rep in enumerate(reps)
        for g in run.groups]

    def each(k: int, b: int) -> dict[str, Tensor]:
        run_batch(reps[k], run.inputs, b, run.devices[k], i)
        out, seen[k] = seen[k], {}
        return out

    try:
        for _b, xs in _over_batches(run, reps, each):
            for n, x in xs.items():
                accs[n].add_batch(x)
    except QuantizationError as e:
        raise QuantizationError(f"block {run.blocks_name}.{i}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    for name in linears:
        if accs[name].nsamples == 0:
            raise QuantizationError(f"{run.name(i, name)}: received no calibration input (is it on an unused path?); "
                                    "exclude it with --exclude")
    return accs


def quantize_linear(mod: nn.Module, H: Optional[Tensor], config: QuantConfig, method: Method, full: str,
                    times: OBCTimes, device: Optional[torch.device] = None,
                    last_use: bool = False) -> tuple[PackedLinear, LayerReport]:
    """Step 2: quantize one linear on ``device`` (default: its weight's); returns its PackedLinear (on the
    weight's device) and its metrics.

    ``last_use``: no later linear reads ``H``, which may then be freed while the method works (its factor standing in
    for it in the error figure; :func:`~billm.methods.obc.last_use_of_factor`).

    Raises:
        QuantizationError: the method failed, or its stored form does not decode to its simulated weights.
    """
    home, dtype = get_weight(mod).device, get_weight(mod).dtype
    dev = device or home
    t0 = clock([dev])
    rot = Rotation.make(config.rotate, get_weight(mod).shape[1], config.rotate_seed, dev)  # None unless config.rotate
    if rot is not None:  # incoherence processing: the method (and the errors below) see W R and R^T H R
        H0, H = H, rot.hessian(H)
        if last_use and H0 is not None:
            H0.set_()  # no one reads the unrotated Hessian again
        del H0
    den = output_energy(_float_weight(mod, dev, rot), H) if H is not None else float("nan")  # tr(W H W^T)
    with last_use_of_factor(last_use) as last:
        try:  # the method's own float32 copy, the only one alive while it works (the errors below make theirs after)
            res = method(_float_weight(mod, dev, rot, copy=True), H, config, times)
        except BillmError as e:
            raise QuantizationError(f"{full}: {e}") from e
    factor = last.factor_of(H) if last is not None else None  # where the method released this very H: its factor
    del last
    return_freed_memory()  # the method's freed temporaries (its search's), before the decode makes its own
    shape = tuple(get_weight(mod).shape)
    errors = None
    if res.q is not None:  # the errors from the simulated weights (the decode must equal them, checked below): the
        errors = _errors(mod, dev, rot, res.q, H, factor, den)  # factor is gone before the decode's temporaries come
        factor = None
    st = (res.stored if rot is None else rot.attach(res.stored)).to(dev)
    Q = st.decode()  # (out, in): what every later forward computes with
    if res.q is not None and not torch.equal(res.q, Q):
        raise QuantizationError(f"{full}: the {method.name} stored form does not decode to the weights it simulated "
                                f"(max |diff| {float((res.q - Q).abs().max()):.3g})")
    info = res.info
    del res  # its simulated weights: equal to Q
    packed = PackedLinear.from_stored(st.to(home), getattr(mod, "bias", None), source=type(mod).__name__)
    # the propagation forward reuses it (decode_once), in the model's dtype (what its forward casts it to)
    packed.keep_decoded(Q.to(home, dtype if dtype.is_floating_point else torch.float32))
    rel, wrel = errors if errors is not None else _errors(mod, dev, rot, Q, H, factor, den)
    del factor
    took = clock([Q.device]) - t0
    log.info("%s %s: rel. output error %.4f, rel. weight error %.4f, %.3f bits (%.3f stored), %.2fs",
             full, shape, rel, wrel, st.weight_bits, st.storage_bits, took)
    return packed, LayerReport(name=full, shape=shape, weight_bits=st.weight_bits,
                               storage_bits=st.storage_bits, hessian_rel_err=rel, weight_rel_err=wrel, seconds=took,
                               info=info)


def _errors(mod: nn.Module, device: torch.device, rot: Optional[Rotation], Q: Tensor, H: Optional[Tensor],
            factor: Optional[PreparedHessian], den: float) -> tuple[float, float]:
    """(relative output error ``tr(D H D^T) / den``, relative weight error) of ``Q`` against ``mod``'s weight as the
    method saw it, D their difference; the output error from ``factor`` where the method released ``H``, nan without
    a Hessian."""
    W = _float_weight(mod, device, rot)  # (out, in)
    num = float("nan") if H is None else output_error(W, Q, None if factor is not None else H, factor)
    wrel = float(torch.linalg.norm(W - Q) / torch.linalg.norm(W).clamp(min=1e-12))
    return (num / den if den > 0 else float("nan")), wrel


def _float_weight(mod: nn.Module, device: torch.device, rot: Optional[Rotation], copy: bool = False) -> Tensor:
    """(out, in) ``mod``'s weight in float32 on ``device`` (whatever the model's dtype), rotated as the method sees it;
    ``copy``: a tensor of its own even where the weight already is float32 there (the method changes it in place)."""
    W = get_weight(mod).to(device=device, dtype=torch.float32, copy=copy and rot is None)
    return W if rot is None else rot.weight(W)


def _quantize_block(run: _Run, i: int, accs: dict[str, HessianAccumulator]) -> list[LayerReport]:
    """Step 2 for every selected linear of block ``i``: each is replaced by its PackedLinear in place.

    With several devices the linears are spread over them (the j-th on device j mod n) and quantized at once.
    """
    items = list(run.targets[i].items())
    names = [name for name, _ in items]
    if run.config.uses_hessian:  # every Hessian checked in the forward's order: a non-finite input is named where
        _ = [accs[name].H for name in names]  # it first shows, whatever order the linears are quantized in

    def one(j: int, later: Sequence[str] = ()) -> tuple[PackedLinear, LayerReport, OBCTimes]:
        name, mod = items[j]
        dev = run.devices[j % len(run.devices)]
        H = accs[name].H.to(dev) if run.config.uses_hessian else None
        times = OBCTimes()
        acc = accs.get(name)
        shared = len(run.devices) > 1 or any(accs.get(n) is acc for n in later)
        return (*quantize_linear(mod, H, run.config, run.method, run.name(i, name), times, dev, last_use=not shared),
                times)

    def place(name: str, result: tuple[PackedLinear, LayerReport, OBCTimes]) -> LayerReport:
        packed, rep, times = result
        replace_module(run.blocks[i], name, packed)
        run.phases["search"] += times.quantize
        run.phases["compensation"] += times.compensate
        run.phases["hessian"] += rep.seconds - times.quantize - times.compensate
        return rep

    if len(run.devices) == 1:  # each float linear (and its Hessian, once its group is done) let go when packed
        # the widest inputs first (down_proj's): its (cols, cols) Hessian is gone before the others' work begins.
        # Each linear's result is independent of the order (every Hessian comes from the full-precision block)
        order = sorted(range(len(items)), key=lambda j: -get_weight(items[j][1]).shape[1])
        prefix = f"{run.blocks_name}.{i}"
        # an empty model's block, quantized where it waits: once the Hessians are in, each weight the source holds is
        # read again when its turn comes, and the others wait there meanwhile
        reread = set() if run.weights is None or run.device != run.offload else \
            {n for n in names if f"{prefix}.{n}.weight" in run.weights.loaders}
        if reread:
            LazyWeights.release(run.blocks[i], [f"{n}.weight" for n in reread])
            return_freed_memory()
        reports: dict[str, LayerReport] = {}
        for k, j in enumerate(order):
            name = names[j]
            if name in reread:
                run.weights.materialize(items[j][1], f"{prefix}.{name}")
            reports[name] = place(name, one(j, [names[o] for o in order[k + 1:]]))
            items[j] = (name, None)
            run.targets[i].pop(name)
            accs.pop(name, None)
            return_freed_memory()  # the layer's float temporaries, before the next one's
        done = [reports[name] for name in names]
    else:
        with ThreadPoolExecutor(len(run.devices)) as pool:
            results = list(pool.map(one, range(len(items))))
        done = [place(name, r) for name, r in zip(names, results)]
    run.targets[i] = {}  # the float linears are gone from the model: nothing keeps them alive
    return done


def _propagate(run: _Run, i: int) -> None:
    """Step 3: the packed block ``i`` on the calibration inputs, through its decode path; its outputs feed block i+1.

    Each batch's output replaces its input as soon as it is known (one copy of the activations alive).
    Each layer's weight is decoded once for all the batches.
    """
    packed = [m for m in run.blocks[i].modules() if isinstance(m, PackedLinear)]
    kernels = [m.kernel for m in packed]
    for m in packed:
        m.kernel = "dequant"  # exactly the simulated weights, whatever the token count
    try:
        reps = _replicas(run, i)
        each = lambda k, b: to_host(run_batch(reps[k], run.inputs, b, run.devices[k], i), run.activations)  # noqa: E731
        with decode_once(m for rep in reps for m in rep.modules() if isinstance(m, PackedLinear)):
            for b, out in _over_batches(run, reps, each):
                run.inputs.hidden[b] = out
    finally:
        for m, k in zip(packed, kernels):
            m.kernel = k


# ----------------------------------------------------------------------------- block reconstruction (billm.reconstruct)

def _tunes_toward_fp(c: QuantConfig) -> bool:
    """End-to-end tuning toward the full-precision model (it needs the full-precision stream after the last block)."""
    return c.finetune > 0 and c.finetune_target == "fp"


def _keeps_fp_stream(c: QuantConfig) -> bool:
    """Whether a full-precision stream runs beside the quantized one: block reconstruction toward the full-precision
    model's own activations, or end-to-end tuning toward its next-token distribution."""
    return (c.reconstruct > 0 and c.reconstruct_target == "fpinputs") or _tunes_toward_fp(c)


def _full_precision_outputs(run: _Run, i: int, hidden: list[Tensor], into: list[Tensor]) -> list[Tensor]:
    """Block ``i``'s outputs (still full precision), per batch, on ``hidden``, put in ``into`` (which may be
    ``hidden`` itself: each batch replaced as it is done, one copy alive), charged to the tuning that wants them."""
    t0 = clock(run.devices)
    src = BlockInputs(hidden, run.inputs.kwargs, run.inputs.layer_kwargs)
    for b in range(len(hidden)):
        out = to_host(run_batch(run.blocks[i], src, b, run.device, i), run.activations)
        if b < len(into):
            into[b] = out
        else:
            into.append(out)
    run.phases["reconstruct" if run.config.reconstruct else "finetune"] += clock(run.devices) - t0
    return into


def _reconstruction_targets(run: _Run, i: int) -> Optional[list[Tensor]]:
    """Before block ``i`` is quantized: the full-precision stream, when one is kept, moves past it; then the
    block's reconstruction targets, per batch: its full-precision outputs on the quantized model's inputs, or
    (``reconstruct_target`` fpinputs) the stream itself. None when reconstruction is off."""
    if run.fp_hidden is not None:
        _full_precision_outputs(run, i, run.fp_hidden, run.fp_hidden)
    if not run.config.reconstruct:
        return None
    if run.config.reconstruct_target == "fpinputs":
        return run.fp_hidden
    return _full_precision_outputs(run, i, run.inputs.hidden, [])


def _reconstruct(run: _Run, i: int, targets: list[Tensor], done: list[LayerReport]) -> None:
    """After block ``i`` is quantized: tune its stored scales and means toward ``targets``; figures in its reports."""
    c = run.config
    stats = reconstruct_block(run.blocks[i], run.inputs.hidden, [run.inputs.for_block(b, i) for b in range(len(targets))],
                              targets, Settings(c.reconstruct, c.reconstruct_lr, c.reconstruct_batch, c.reconstruct_seed,
                                                c.reconstruct_signs, c.reconstruct_sign_lr),
                              run.device, i)
    run.phases["reconstruct"] += stats.seconds
    for r in done:
        r.info["reconstruct"] = {"block_rel_err_first": stats.loss_first, "block_rel_err_last": stats.loss_last,
                                 "steps": stats.steps}
        if stats.signs:
            r.info["reconstruct"].update(block_signs=stats.signs, block_signs_flipped=stats.flipped)


# ----------------------------------------------------------------------------- resume

def _replay(run: _Run, store: "ProgressStore") -> int:
    """Resume: swap in the packed layers an earlier run finished; returns the first block still to do."""
    state = store.load()
    if state is None:
        return 0
    _swap_in(run, state.stored)
    for i in range(state.next_block):
        run.targets[i] = {}
        _fill_block(run, i)  # what the store does not hold (norms) of an empty model's finished blocks
    run.layers = [LayerReport(**{**d, "shape": tuple(d["shape"])}) for d in state.layers]
    for k, v in state.phases.items():
        run.phases[k] += v
    if state.hidden is not None:
        run.inputs.hidden = [h.to(run.activations) for h in state.hidden]
    if state.fp_hidden is not None:
        run.fp_hidden = [h.to(run.activations) for h in state.fp_hidden]
    elif _keeps_fp_stream(run.config) and (state.hidden is not None or _tunes_toward_fp(run.config)):
        raise QuantizationError(f"the progress in {store.folder} holds no full-precision stream, which this run needs "
                                "(reconstruct_target fpinputs or finetune_target fp); run again with --restart")
    log.info("resumed: blocks 0..%d were finished by an earlier run", state.next_block - 1)
    return state.next_block


def _swap_in(run: _Run, stored: dict[str, StoredWeight]) -> None:
    """Put the recorded packed layers ``stored`` (qualified name -> stored weight) in the model, in place of what is
    there (a float linear, an emptied packed layer)."""
    for name, st in stored.items():
        old = run.model.get_submodule(name)
        w = get_weight(old) if not isinstance(old, PackedLinear) else next(old.buffers())
        bias = getattr(old, "bias", None)
        if bias is not None and bias.is_meta:  # an empty model: the bias from the source, the packed weight from the store
            bias = run.weights.read(f"{name}.bias").to(bias.dtype)
        source = old.source if isinstance(old, PackedLinear) else type(old).__name__
        replace_module(run.model, name, PackedLinear.from_stored(st.to(run.offload if w.is_meta else w.device), bias,
                                                                 source=source))


def _spill(run: _Run, i: int) -> None:
    """Empty block ``i``'s packed layers (on ``meta``): the progress store holds them; :func:`_swap_in` reads them
    back once every block is done. An empty model's run then holds one block at a time, not the packed model."""
    for m in run.blocks[i].modules():
        if isinstance(m, PackedLinear):
            m.to("meta")


def _record(run: _Run, i: int, done: list[LayerReport], store: "ProgressStore", before: dict[str, float]) -> None:
    """Write block ``i``'s packed layers, reports and output activations to the progress store."""
    prefix = f"{run.blocks_name}.{i}."
    stored = {prefix + n: m.stored() for n, m in run.blocks[i].named_modules() if isinstance(m, PackedLinear)}
    last = i + 1 == len(run.blocks)
    store.record_block(i, done, stored, None if last else run.inputs.hidden,
                       {k: run.phases[k] - before[k] for k in run.phases},
                       run.fp_hidden if not last or _tunes_toward_fp(run.config) else None)


def _finetune(run: _Run, model: nn.Module, batches: list[Tensor]) -> dict[str, Any]:
    """End-to-end tuning of the whole quantized model on ``run.device`` (``config.finetune`` steps), then back home.
    Deterministic (seeded draws), so a run resumed after its last block tunes to the same bytes."""
    c = run.config
    home = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model.to(run.device)
        teacher = None  # the full-precision stream after the last block, for the fp target
        if c.finetune_target == "fp":
            teacher = [h.to(run.offload) for h in run.fp_hidden]
        run.fp_hidden = None
        stats = finetune_model(model, batches, Settings(c.finetune, c.finetune_lr, c.finetune_batch, c.reconstruct_seed),
                               run.device, teacher=teacher, last_block=run.blocks[-1])
    finally:
        model.to(home)
        model.train(was_training)
        return_freed_memory()
    run.phases["finetune"] += stats.seconds
    return {"target": c.finetune_target, "steps": stats.steps, "values": stats.values, "loss_first": stats.loss_first, "loss_last": stats.loss_last}


def saved_source(model: nn.Module, store: "ProgressStore", weights: LazyWeights) -> Callable[[str], Tensor]:
    """Where :func:`billm.save` reads what :func:`quantize` left out of an empty model (``read_back=False``): each
    packed field from the progress store, every other tensor from the model's source; name -> tensor."""
    _, blocks = find_blocks(model)
    fields, read_field = store.field_reader(len(blocks) - 1)
    return lambda name: read_field(name) if name in fields else weights.read(name)


def _mark_quantized(model: nn.Module, config: QuantConfig) -> None:
    """Record the method's config on the model (``model.config.quantization_config``), where :func:`billm.save` reads it."""
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = quantization_record(config.method, config.to_dict())


def quantize(model: nn.Module, calibration: Union[Tensor, Sequence[Tensor]], config: QuantConfig,
             device: Optional[Device] = None, batch_size: int = 8, progress: bool = True,
             store: Optional["ProgressStore"] = None, weights: Optional[LazyWeights] = None,
             activations_on_device: bool = False, read_back: bool = True) -> QuantReport:
    """Quantize the linears of every decoder block of ``model`` in place: each becomes a :class:`PackedLinear`.

    Args:
        model: a Hugging Face causal LM (or any model with a list of repeated decoder blocks).
        calibration: token ids, (nsamples, seqlen) or a list of 1-D tensors of one length.
        config: the method's config (e.g. :class:`billm.BiLLMConfig`); its type picks the method.
        device: where each block runs while it is quantized (e.g. ``"cuda"``); the rest of the
            model waits on its current device. Default: the model's device.
        batch_size: calibration sequences per forward call.
        progress: show a tqdm bar over blocks.
        store: a :class:`~billm.resume.ProgressStore`: every finished block is recorded there,
            and a run that finds earlier progress continues after its last finished block.
        weights: for an empty model (parameters on ``meta``, from :func:`billm.model.load_skeleton`),
            where its tensors are read: the embeddings for the capture, then one block at a time,
            in the model's dtype, then the embeddings and head again at the end. With a ``store``,
            each packed block is emptied once recorded there and all are read back at the end, so
            the run holds one block at a time rather than the packed model. A model dispatched by
            accelerate (``device_map``, disk or CPU offload) needs nothing: its offloaded tensors are
            read through accelerate's maps.
        activations_on_device: keep the calibration activations on ``device`` (when they fit)
            instead of the model's home device (the CPU, where they move a batch at a time).
        read_back: with ``weights`` and ``store``: False leaves the packed blocks in ``store`` and the tensors
            outside the blocks in ``weights`` (the model's layers stay empty, on ``meta``), for
            ``billm.save(model, out, source=saved_source(model, store, weights))`` to stream into the checkpoint
            one tensor at a time; the model itself cannot run until loaded from that checkpoint.

    Returns:
        A :class:`QuantReport` with one :class:`LayerReport` per quantized linear (metrics only:
        the packed weights are in the model, where :func:`billm.save` reads them).

    Raises:
        QuantizationError: a weight or activation is not finite, or a Hessian cannot be factored.
            Blocks finished before the failure stay quantized in place (an empty model's: in ``store``,
            where a rerun resumes from them); reload the model to retry.
    """
    batches = _as_batches(calibration, batch_size)
    if not read_back and (weights is None or store is None or config.finetune):
        raise ModelError("read_back=False needs an empty model's weights and a progress store, and no finetune "
                         "(which runs the whole model)")
    weights = weights or LazyWeights.from_accelerate(model)  # None unless accelerate dispatched it
    if weights is None and is_lazy(model):
        raise ModelError("the model has parameters on the meta device and no source for them: pass "
                         "weights=billm.model.LazyWeights.from_folder(folder) (see billm.model.load_skeleton)")
    run = _plan(model, config, batches[0].shape[1], device)
    spread = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if config.finetune and len(spread) > 1:
        raise ModelError(f"finetune runs the whole model on one device; this one is dispatched over {sorted(spread)}: "
                         "load it whole (or block by block, billm's default), or leave finetune at 0")
    run.weights = weights
    run.activations = run.device if activations_on_device else run.offload
    outside: list[str] = []  # an empty model's tensors outside the blocks, read for the capture only
    if weights is not None:
        outside = fill_outside_blocks(model, run.blocks_name, weights, head=False)  # lm_head: read at the end
        _fill_block(run, 0)  # the capture's probe runs block 0
    was_training = model.training
    model.eval()
    current: Optional[nn.Module] = None
    try:
        t0 = clock(run.devices)
        run.inputs = capture_inputs(model, batches, device=run.device, offload=run.activations)
        run.phases["capture"] += clock(run.devices) - t0
        if outside:  # not used again until the blocks are done: read back at the end
            LazyWeights.release(model, outside)
            if hasattr(model, "tie_weights"):
                model.tie_weights()  # a tied lm_head still held the embeddings
            return_freed_memory()
        if config.reconstruct:
            run.phases["reconstruct"] = 0.0
        if config.finetune:
            run.phases["finetune"] = 0.0
        if _keeps_fp_stream(config):  # the second stream starts from the same captured inputs
            run.fp_hidden = [h.clone() for h in run.inputs.hidden]
        start = _replay(run, store) if store is not None else 0
        if weights is not None:
            for i in range(start):  # finished by an earlier run: read back with the others at the end
                _spill(run, i)
        bar = tqdm(range(start, len(run.blocks)), desc=f"{config.method} blocks", disable=not progress, unit="block",
                   initial=start, total=len(run.blocks))
        for i in bar:
            before = dict(run.phases)
            _fill_block(run, i)
            current = run.blocks[i].to(run.device)
            t0 = clock(run.devices)
            accs = _accumulate_hessians(run, i)
            run.phases["hessian"] += clock(run.devices) - t0
            targets = _reconstruction_targets(run, i)  # None unless config.reconstruct (the fp stream moves on)
            done = _quantize_block(run, i, accs)
            del accs
            if targets is not None:
                _reconstruct(run, i, targets, done)
                del targets
            t0 = clock(run.devices)
            if i + 1 < len(run.blocks):
                _propagate(run, i)
            current.to(run.offload)
            current = None  # home again (and emptied below once recorded, for an empty model)
            return_freed_memory()
            run.phases["propagation"] += clock(run.devices) - t0
            run.layers.extend(done)
            if store is not None:
                _record(run, i, done, store, before)
                if weights is not None:
                    _spill(run, i)
            if done:  # the last layer's output error; a method without a Hessian (RTN) has its weight error
                last = done[-1]
                bar.set_postfix({"err": f"{last.hessian_rel_err:.3f}"} if math.isfinite(last.hessian_rel_err)
                                else {"weight err": f"{last.weight_rel_err:.3f}"})
    finally:  # on any failure: the block back where it was, the mode restored
        if current is not None:
            current.to(run.offload)
        model.train(was_training)
    if weights is not None and read_back:
        if store is not None:  # the packed blocks, emptied as each was recorded
            _swap_in(run, store.packed(len(run.blocks) - 1))
        fill_outside_blocks(model, run.blocks_name, weights)  # the embeddings, final norm and lm_head, for use and save
    if config.finetune:
        run.inputs = None  # the calibration activations are not needed again: the whole model runs now
        tuned = _finetune(run, model, batches)
    else:
        tuned = {}
    _mark_quantized(model, config)
    return QuantReport(config=config.to_dict(), layers=run.layers, phases=run.phases,
                       nsamples=sum(b.shape[0] for b in batches), seqlen=batches[0].shape[1], resumed_blocks=start,
                       finetune=tuned)
