"""A method defined outside billm (config + quantizer + format) works everywhere, with no change to billm.

The toy method: ternary weights {-a, 0, +a} per row (``|w| <= threshold * mean|w|`` becomes 0),
stored as a non-zero bitmap, a sign plane and one fp16 scale per row.
"""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import billm
from billm import FieldSpec, Format, QuantConfig, StoredWeight, WeightResult, option
from billm.cli import build_parser, main
from billm.kernels.bitpack import pack_bits, packed_len, unpack_bits
from billm.methods import registry
from billm.packing import formats

NAME = "ternary_test"


@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """Ternary {-a, 0, +a} per row, no Hessian."""

    method: ClassVar[str] = NAME
    uses_hessian: ClassVar[bool] = False
    abbrev: ClassVar[dict] = {**QuantConfig.abbrev, "t": "threshold"}

    threshold: float = option(0.7, "weights below threshold * mean|w| of their row become 0")


def _fields(shape, meta):
    r, c = shape
    return {"nonzero": FieldSpec((r, packed_len(c)), torch.uint8, "non-zero bitmap"),
            "signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
            "scales": FieldSpec((r,), torch.float16, "scales")}


def _decode(t, shape, meta):
    nz, s = unpack_bits(t["nonzero"], shape[1]), unpack_bits(t["signs"], shape[1])  # (r, c) bool each
    return t["scales"].float().unsqueeze(1) * torch.where(s, 1.0, -1.0) * nz


def quantize_ternary(W, H, cfg, times=None):
    nz = W.abs() > cfg.threshold * W.abs().mean(dim=1, keepdim=True)  # (r, c)
    a = ((W.abs() * nz).sum(1) / nz.sum(1).clamp(min=1)).half()  # (r,)
    st = StoredWeight(NAME, tuple(W.shape), {}, {"nonzero": pack_bits(nz), "signs": pack_bits(W >= 0), "scales": a})
    return WeightResult(stored=st, info={"zeros": int((~nz).sum())}, q=_decode(st.tensors, st.shape, {}))


@pytest.fixture
def ternary():
    """Register the toy method through the public API; unregister afterwards."""
    billm.register_format(Format(NAME, _fields, _decode, weight_bits=lambda shape, meta: 2.0))
    billm.register_method(TernaryConfig)(quantize_ternary)
    yield TernaryConfig
    registry._METHODS.pop(NAME)
    formats.FORMATS.pop(NAME)


def test_outside_method_quantizes_saves_loads_and_counts_bytes(ternary, tiny_model, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, ids, ternary(threshold=0.5), progress=False)
    packed = [m for m in model.modules() if isinstance(m, billm.PackedLinear)]
    assert len(packed) == len(rep.layers) == 14 and {m.format for m in packed} == {NAME}
    r, c = rep.layers[0].shape
    assert rep.layers[0].storage_bits == (2 * r * packed_len(c) + 2 * r) * 8 / (r * c)  # bytes, not a formula
    assert rep.weight_bits == 2.0
    out = billm.save(model, tmp_path / "ck", report=rep)
    loaded = billm.load(out)
    x = torch.randint(3, 120, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    info = billm.inspect_checkpoint(out)
    assert [l.storage_bits for l in info.layers] == [l.storage_bits for l in rep.layers]
    assert set(info.bytes_by_kind()) == {"non-zero bitmap", "signs", "scales"}
    assert json.loads((out / "billm_quant.json").read_text())["config"] == {**ternary(threshold=0.5).to_dict()}


def test_a_stored_form_that_does_not_decode_to_its_weights_is_refused(ternary, tiny_model):
    def lying(W, H, cfg, times=None):
        res = quantize_ternary(W, H, cfg)
        return WeightResult(stored=res.stored, q=res.q + 1e-3)

    registry._METHODS[NAME] = registry.Method(TernaryConfig, lying)
    with pytest.raises(billm.QuantizationError, match="does not decode"):
        billm.quantize(tiny_model("llama"), torch.randint(3, 120, (2, 16)), ternary(), progress=False)


def test_outside_method_gets_cli_flags_and_compare_specs(ternary, tiny_folder, tmp_path):
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", NAME, "--threshold", "0.4"])
    assert (args.method, args.threshold) == (NAME, 0.4)
    assert billm.config_from_spec(f"{NAME}:t0.3+b64") == ternary(threshold=0.3, blocksize=64)
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--method", NAME, "--threshold", "0.4", "--calib", "pydoc",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "billm_quant.json").read_text())["config"]["threshold"] == 0.4
    cmp = tmp_path / "cmp"
    assert main(["compare", str(tiny_folder), "--methods", f"fp,{NAME}:t0.5", "--tasks", "pydoc", "--calib", "pydoc",
                 "--nsamples", "2", "--seqlen", "32", "--max-windows", "2", "--out", str(cmp)]) == 0
    rows = json.loads((cmp / "compare.json").read_text())["rows"]
    assert rows[1]["spec"] == f"{NAME}:t0.5" and rows[1]["weight_bits"] == 2.0 and rows[1]["storage_bits"] > 2.0


def test_options_of_another_method_are_refused(ternary, tiny_folder, tmp_path, capsys):
    rc = main(["quantize", str(tiny_folder), "--method", NAME, "--refit", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--refit do not apply to --method ternary_test" in capsys.readouterr().err
