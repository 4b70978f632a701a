"""Device discipline: every tensor the hot paths create takes its device from their inputs.

On a GPU a tensor made on the CPU and combined with CUDA tensors fails (or silently copies every
call), so the code under ``src/billm/methods`` and ``src/billm/kernels`` names the device of each
factory call (``torch.zeros(..., device=x.device)``) or derives it from a tensor (``torch.zeros_like``,
``x.new_zeros``). Without a GPU this is checked by :class:`FactoryWatch`, a ``TorchFunctionMode`` that
records every factory call from those folders that names no device, while each built-in method
quantizes a weight and while ``PackedLinear`` multiplies by every path. The tests marked ``cuda``
run the same on a GPU (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import billm.kernels
import billm.methods
from billm import ArbConfig, BiLLMConfig, GPTQConfig, LowRankConfig, PBLLMConfig, RTNConfig, SignConfig, SliMConfig
from billm.kernels import triton_available
from billm.methods import available_methods, get_method
from billm.methods.obc import hessian_error
from billm.packing.formats import registered_formats
from billm.packing.linear import PackedLinear

WATCHED = (Path(billm.methods.__file__).resolve().parent, Path(billm.kernels.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor, torch.randn,
             torch.rand, torch.randint, torch.randperm, torch.linspace, torch.logspace, torch.eye, torch.empty_strided,
             torch.scalar_tensor, torch.tril_indices, torch.triu_indices}
"""Factories whose device is the default (CPU) unless named; ``*_like`` and ``Tensor.new_*`` follow their input."""


class FactoryWatch(TorchFunctionMode):
    """Records factory calls made from :data:`WATCHED` source files without an explicit ``device=``.

    Attributes:
        calls: ``"methods/refine.py:46 tensor"`` for each such call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._where: dict[str, str | None] = {}

    def _watched(self, filename: str) -> str | None:
        """``methods/refine.py`` for a file in a watched folder, else None (cached per file)."""
        if filename not in self._where:
            path = Path(filename).resolve()
            self._where[filename] = next((f"{w.name}/{path.relative_to(w)}" for w in WATCHED if path.is_relative_to(w)),
                                         None)
        return self._where[filename]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):  # torch's own Python layers
                frame = frame.f_back
            where = self._watched(frame.f_code.co_filename) if frame is not None else None
            if where is not None:
                self.calls.append(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def _builtin_methods() -> list[str]:
    """Methods registered by billm itself (test_plugin registers others in the same session)."""
    return [n for n in available_methods() if get_method(n).quantize_weight.__module__.startswith("billm.methods.")]


def _method_cases() -> list:
    """Every built-in method at its defaults and each preset, and the options that reach other code."""
    cases = []
    for name in _builtin_methods():
        cls = get_method(name).config
        for preset in ["default", *cls.presets]:
            cases.append(pytest.param(cls.preset(preset, blocksize=32), id=f"{name}-{preset}"))
    return cases + [
        pytest.param(BiLLMConfig(blocksize=32, refine_rounds=2), id="billm-refine2"),  # sign combinations per entry
        pytest.param(BiLLMConfig.plus(blocksize=32, refine_rounds=1, centred=True), id="billm-plus-refine-centred"),
        pytest.param(BiLLMConfig(blocksize=32, salient_metric="magnitude", break_grid="quantile", salient_order=1,
                                 centred=True), id="billm-magnitude-quantile-salient1"),
        pytest.param(GPTQConfig(bits=3, groupsize=16, act_order=True), id="gptq-w3-g16-act-order"),
        pytest.param(RTNConfig(bits=2, groupsize=16), id="rtn-w2-g16"),
        pytest.param(SliMConfig(bits=3, groupsize=16, sba_error="output"), id="slim-w3-g16-output"),
        pytest.param(SignConfig(centred=True, obc=False), id="sign-centred-no-obc"),
        pytest.param(PBLLMConfig(blocksize=32, salient_metric="magnitude"), id="pbllm-magnitude"),
    ]


METHOD_CASES = _method_cases()
PATH_CASES = [  # one per stored format and layout (test_path_cases_cover_every_registered_format checks it)
    pytest.param(BiLLMConfig(blocksize=32), id="billm"),
    pytest.param(BiLLMConfig.reference(blocksize=20), id="billm-reference-b20"),
    pytest.param(RTNConfig(bits=2), id="rtn-w2"),
    pytest.param(GPTQConfig(bits=3, groupsize=12), id="gptq-w3-g12"),
    pytest.param(SliMConfig(bits=2, groupsize=16), id="slim-w2-g16"),
    pytest.param(SignConfig(centred=True), id="sign-centred"),
    pytest.param(PBLLMConfig(blocksize=32), id="pbllm"),
    pytest.param(ArbConfig(blocksize=32), id="arb"),
    pytest.param(LowRankConfig(rank=8, admm_iters=5), id="lowrank-r8"),
]
SHAPE = (24, 96)
# The Triton path runs in the interpreter on CPU tensors without a GPU, compiled on CUDA tensors with one.
INTERPRET = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KDEV = "cpu" if INTERPRET else "cuda"


def test_the_watch_flags_a_watched_file_that_names_no_device():
    # A stand-in for a hot-path function, compiled as if it lived in methods/: the watch must name it.
    fake = str(WATCHED[0] / "fake_method.py")
    code = compile("def make(x):\n    return torch.arange(4) + x\n", fake, "exec")
    scope = {"torch": torch}
    exec(code, scope)
    with FactoryWatch() as watch:
        scope["make"](torch.zeros(4))
    assert watch.calls == ["methods/fake_method.py:2 arange"]


@pytest.mark.parametrize("cfg", METHOD_CASES)
def test_quantizers_create_every_tensor_on_the_weights_device(cfg, random_problem):
    W, H = random_problem(*SHAPE, seed=1)
    with FactoryWatch() as watch:
        get_method(cfg.method)(W.clone(), H.clone(), cfg)
    assert not watch.calls, f"factory calls without device=: {sorted(set(watch.calls))}"


def _kernel_device_ready(path: str) -> None:
    if path != "triton":
        return
    if not triton_available():
        pytest.skip("triton is not installed")
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        from billm.kernels import triton_kernels

        if not isinstance(triton_kernels._billm_kernel, InterpretedFunction):
            pytest.skip("Triton was imported without TRITON_INTERPRET=1: its kernels cannot run on CPU here")


def test_path_cases_cover_every_registered_format(random_problem):
    W, H = random_problem(*SHAPE, seed=2)
    covered = {get_method(p.values[0].method)(W.clone(), H.clone(), p.values[0]).stored.format for p in PATH_CASES}
    assert covered == set(registered_formats())


@pytest.mark.parametrize("path", ["dequant", "dense", "lut", "triton"])
@pytest.mark.parametrize("cfg", PATH_CASES)
def test_packed_linear_paths_create_every_tensor_on_the_inputs_device(cfg, path, random_problem):
    _kernel_device_ready(path)
    W, H = random_problem(*SHAPE, seed=2)
    res = get_method(cfg.method)(W.clone(), H.clone(), cfg)
    x = torch.randn(5, SHAPE[1], generator=torch.Generator().manual_seed(0)).to(KDEV)
    with FactoryWatch() as watch, torch.no_grad():
        layer = PackedLinear.from_stored(res.stored.to(KDEV))
        layer.kernel = path
        ys = [layer(x[:1]), layer(x)]  # decoding (GEMV) and a prompt; the layout is built inside the watch
    assert not watch.calls, f"factory calls without device=: {sorted(set(watch.calls))}"
    ref = x.cpu() @ res.q.t()
    for y in ys:
        assert y.device == x.device
        torch.testing.assert_close(y.cpu(), ref[:y.shape[0]], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", METHOD_CASES)
def test_quantizers_run_on_cuda_as_on_cpu(cfg, random_problem):
    W, H = random_problem(*SHAPE, seed=1)
    res = get_method(cfg.method)(W.clone().cuda(), H.clone().cuda(), cfg)
    assert res.q.is_cuda and all(t.is_cuda for t in res.stored.tensors.values())
    assert torch.equal(res.stored.decode(), res.q)  # the check billm.quantize makes: the stored form is the model
    cpu = get_method(cfg.method)(W.clone(), H.clone(), cfg)
    err_gpu, err_cpu = hessian_error(W, res.q.cpu(), H)[1], hessian_error(W, cpu.q, H)[1]
    assert err_gpu <= err_cpu * 1.25 + 1e-6  # the same quality (float rounding may flip a few choices)


def test_phase_clock_waits_for_every_cuda_device(monkeypatch):
    # CUDA calls return once queued: an unsynchronised phase time counted launches only (0.02 s for a 7B propagation)
    from billm.driver import clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(d))
    clock([torch.device("cpu")])
    assert waited == []
    clock([torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 1)])
    assert waited == [torch.device("cuda", 0), torch.device("cuda", 1)]
