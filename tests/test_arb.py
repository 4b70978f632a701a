"""ARB-LLM (``arb``): alternating refinement, ARB-X, ARB-RC, the ``arb`` stored format, specs and a model round trip."""

import pytest
import torch

import billm
from billm import ArbConfig, config_from_dict, config_from_spec
from billm.cli import build_parser
from billm.methods import get_method
from billm.methods.arb import arb_order1, arb_order2, arb_x_refit, encode_groups, rc_order1, rc_order2
from billm.methods.obc import hessian_error
from billm.methods.search import split_masks
from billm.packing.formats import get_format


def _group(rows=48, cols=64, seed=0, salient_cols=()):
    """A heavy-tailed weight block and a random group mask (whole columns when ``salient_cols`` is given)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g).add(0.2)  # column deviation
    x = x + 0.3 * torch.randn(rows, 1, generator=g)  # a per-row offset, for the mean to find
    if salient_cols:
        m = torch.zeros(rows, cols, dtype=torch.bool)
        m[:, list(salient_cols)] = True
    else:
        m = torch.rand(rows, cols, generator=g) < 0.6
    return x, m


def _err(x, m, q):
    return float((((x - q) * m) ** 2).sum())


def _correlated_problem(rows=32, cols=64, seed=0):
    """A weight and the Hessian of inputs with strongly correlated channels (H far from diagonal)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(8 * cols, cols, generator=g) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g))
    return W, X.T @ X / X.shape[0]


# ----------------------------------------------------------------------------- the alternation


def _order1_estimate(x, m, iters):
    B, a, mu = arb_order1(x, m, iters)
    return (a[:, None] * B + mu[:, None]) * m


def _order2_estimate(x, m, iters):
    B1, B2, a1, a2, mu = arb_order2(x, m, iters)
    return (a1[:, None] * B1 + a2[:, None] * B2 + mu[:, None]) * m


def _rc1_estimate(x, m, iters):
    B, ar, ac = rc_order1(x, m, iters)
    return ar[:, None] * ac[None, :] * B * m


def _rc2_estimate(x, m, iters):
    B1, B2, (ar1, ac1, ar2, ac2) = rc_order2(x, m, iters)
    return (ar1[:, None] * ac1[None, :] * B1 + ar2[:, None] * ac2[None, :] * B2) * m


@pytest.mark.parametrize("estimate,salient", [(_order1_estimate, False), (_order2_estimate, True),
                                              (_rc1_estimate, False), (_rc2_estimate, True)],
                         ids=["arb-order1", "arb-order2", "rc-order1", "rc-order2"])
def test_alternation_never_raises_and_clearly_lowers_the_weight_error_of_one_shot_binarization(estimate, salient):
    x, m = _group(salient_cols=(1, 5, 9, 30, 41) if salient else ())
    errors = [_err(x, m, estimate(x, m, t)) for t in range(16)]  # t = 0: one-shot (residual) binarization
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
    assert errors[15] < 0.995 * errors[0]


def test_one_shot_arb_is_the_mean_centred_binarization():
    x, m = _group()
    B, a, mu = arb_order1(x, m, 0)
    mf = m.float()
    assert torch.allclose(mu, (x * mf).sum(1) / mf.sum(1))
    assert torch.allclose(a, ((x - mu[:, None]).abs() * mf).sum(1) / mf.sum(1))


def test_row_column_scales_fit_column_deviation_better_than_row_scales_alone():
    x, m = _group()
    one_shot_row = _err(x, m, _order1_estimate(x, m, 0) - (arb_order1(x, m, 0)[2][:, None] * m))  # no mean either
    assert _err(x, m, _rc1_estimate(x, m, 15)) < 0.9 * one_shot_row


def test_arb_x_lowers_the_groups_output_error_under_the_hessian():
    x, m = _group(cols=64)
    _, H = _correlated_problem(cols=64)
    for order in (1, 2):
        if order == 1:
            B, a, mu = arb_order1(x, m, 15)
            Bs, alphas = [B], [a]
        else:
            B1, B2, a1, a2, mu = arb_order2(x, m, 15)
            Bs, alphas = [B1, B2], [a1, a2]

        def out_err(al, mu_):
            d = (x - sum(a_[:, None] * b for a_, b in zip(al, Bs)) - mu_[:, None]) * m
            return float(((d @ H) * d).sum())

        new_alphas, new_mu = arb_x_refit(x, m, H, Bs, alphas, mu, 15)
        assert out_err(new_alphas, new_mu) < 0.99 * out_err(alphas, mu), order


def test_arb_x_beats_plain_arb_in_output_error_on_a_whole_layer():
    W, H = _correlated_problem(rows=48, cols=128)
    errs = {v: hessian_error(W, get_method("arb")(W.clone(), H.clone(), ArbConfig(variant=v, blocksize=64)).q, H)[0]
            for v in ("plain", "x")}
    assert errs["x"] < errs["plain"]


def test_refinement_lowers_the_error_of_a_whole_block_in_every_variant():
    W, _ = _correlated_problem(rows=48, cols=64)
    _, H = _correlated_problem(rows=48, cols=64, seed=1)
    conc, sparse, sal = split_masks(W, torch.arange(64) < 3, float(W.abs().median()))
    for variant in ("plain", "x", "rc"):
        one_shot = encode_groups(W, conc, sparse, sal, ArbConfig(variant=variant, iters=0, x_iters=0), H).values()
        refined = encode_groups(W, conc, sparse, sal, ArbConfig(variant=variant), H).values()
        assert float(((W - refined) ** 2).sum()) < float(((W - one_shot) ** 2).sum()), variant


# ----------------------------------------------------------------------------- the stored form


@pytest.mark.parametrize("cfg", [ArbConfig(blocksize=32), ArbConfig(variant="x", blocksize=32),
                                 ArbConfig(variant="plain", blocksize=48), ArbConfig.preset("reference", blocksize=32),
                                 ArbConfig(blocksize=32, scale_dtype="float8_e4m3fn", min_salient_cols=0)],
                         ids=["rc", "x", "plain-b48", "reference", "rc-fp8"])
@pytest.mark.parametrize("shape", [(17, 131), (5, 9), (40, 96)])
def test_stored_form_decodes_exactly_to_the_simulated_weights(cfg, shape, random_problem):
    W, H = random_problem(*shape, outlier_cols=(2,))
    res = get_method("arb")(W.clone(), H.clone(), cfg)
    st = res.stored
    assert set(st.tensors) == set(st.fields())
    for name, spec in st.fields().items():
        assert tuple(st.tensors[name].shape) == spec.shape and st.tensors[name].dtype == spec.dtype, name
    assert ("col_scales" in st.tensors) == (cfg.variant == "rc") and ("means" in st.tensors) != (cfg.variant == "rc")
    assert torch.equal(st.values(), res.q)
    assert st.weight_bits == pytest.approx((shape[1] + res.info["salient_cols"]) / shape[1])
    assert st.storage_bits == st.nbytes * 8 / (shape[0] * shape[1])


def test_rc_stores_row_and_column_scales_and_each_salient_row_takes_at_most_four_levels_per_column(random_problem):
    W, H = random_problem(24, 64)
    res = get_method("arb")(W.clone(), H.clone(), ArbConfig(blocksize=64))
    st = res.stored
    assert st.tensors["col_scales"].shape == (2, 64) and st.tensors["scales"].shape == (1, 4, 24)
    for c in res.info["salient_columns"][0]:
        assert len(torch.unique(res.q[:, c].abs())) <= 4 * 24  # four values a row, scaled per column
    non = [c for c in range(64) if c not in res.info["salient_columns"][0]]
    ratio = res.q[:, non] / (st.tensors["scales"][0, :2].float().abs().max(0).values[:, None] + 1e-30)
    assert torch.isfinite(ratio).all()


def test_a_corrupted_salient_mask_is_refused(random_problem):
    W, H = random_problem(8, 64)
    st = get_method("arb")(W.clone(), H.clone(), ArbConfig(blocksize=32)).stored
    t = dict(st.tensors)
    t["salient_mask"] = torch.zeros_like(t["salient_mask"])
    with pytest.raises(ValueError, match="salient-column mask"):
        get_format("arb").decode(t, st.shape, st.meta)


# ----------------------------------------------------------------------------- configs and specs


def test_specs_presets_and_flags():
    assert config_from_spec("arb") == ArbConfig() == ArbConfig.preset("rc")
    assert ArbConfig().variant == "rc"
    assert config_from_spec("arb:x") == ArbConfig(variant="x")
    assert config_from_spec("arb:plain+t5+b64") == ArbConfig(variant="plain", iters=5, blocksize=64)
    ref = config_from_spec("arb:reference")
    assert (ref.variant, ref.search_domain.value, ref.scale_dtype) == ("rc", "salience", "float32")
    assert config_from_spec("arb:variant=x+x_iters=3") == ArbConfig(variant="x", x_iters=3)
    for cfg in (ArbConfig(), ref, ArbConfig(variant="x", iters=2)):
        assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(billm.BillmError):
        ArbConfig(variant="xx")
    with pytest.raises(billm.BillmError):
        config_from_spec("arb:reference+x")  # two presets
    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--method", "arb", "--variant", "x",
                                      "--iters", "3"])
    assert (args.method, args.variant, args.iters) == ("arb", "x", 3)


# ----------------------------------------------------------------------------- a model, end to end


@pytest.mark.parametrize("cfg", [ArbConfig(blocksize=32), ArbConfig(variant="x", blocksize=32)], ids=["rc", "x"])
def test_tiny_model_quantizes_saves_and_loads_to_equal_logits_with_storage_bits_from_the_files_bytes(
        cfg, tiny_model, tmp_path):
    model = tiny_model("llama")
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, calib, cfg, progress=False)
    packed = [m for m in model.modules() if isinstance(m, billm.PackedLinear)]
    assert len(packed) == len(rep.layers) == 14 and {m.format for m in packed} == {"arb"}
    out = billm.save(model, tmp_path / "ck", report=rep)
    loaded = billm.load(out)
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    info = billm.inspect_checkpoint(out)
    assert [lb.storage_bits for lb in info.layers] == [lr.storage_bits for lr in rep.layers]
    for lb in info.layers:  # every byte named: signs, second signs, bitmap, column mask, fp16 scales
        (r, c), k, nb = lb.shape, lb.meta["n_salient"], -(-lb.shape[1] // 32)
        extra = 2 * c * 2 if cfg.variant == "rc" else nb * 3 * r * 2  # column scales or means
        expect = r * -(-c // 8) + r * -(-k // 8) + r * -(-(c - k) // 8) + -(-c // 8) + nb * 4 * r * 2 + extra
        assert lb.storage_bits == expect * 8 / (r * c), lb.name
    assert set(info.layers[0].tensor_bytes) >= {"signs", "salient 2nd signs", "group bitmap", "scales"}
    assert 1.0 < rep.weight_bits < rep.storage_bits
