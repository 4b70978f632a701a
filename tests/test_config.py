import json

import pytest

from billm import BiLLMConfig, BillmError, config_from_dict
from billm.config import BreakGrid, SalientMetric, SearchDomain


def test_round_trip_through_json():
    cfg = BiLLMConfig(search_domain="salience", exclude=["*.down_proj"], blocksize=64)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["method"] == "billm" and d["version"] == 2 and d["scale_dtype"] == "float16"
    back = config_from_dict(d)
    assert back == cfg
    assert back.search_domain is SearchDomain.SALIENCE and back.exclude == ("*.down_proj",)


def test_version_one_dicts_meant_float32_scales():
    d = BiLLMConfig().to_dict()
    del d["scale_dtype"]
    assert config_from_dict({**d, "version": 1}).scale_dtype == "float32"
    assert config_from_dict(d).scale_dtype == "float16"
    with pytest.raises(BillmError, match="newer"):
        config_from_dict({**d, "version": 3})


def test_presets():
    ref, paper = BiLLMConfig.reference(), BiLLMConfig.paper()
    assert (ref.search_domain, ref.max_salient_cols, ref.break_grid) == (SearchDomain.SALIENCE, 49, BreakGrid.QUANTILE)
    assert (paper.search_domain, paper.min_salient_cols, paper.max_salient_cols) == (SearchDomain.WEIGHT, 3, 30)
    assert paper.n_break_candidates == 9 and paper.salient_metric is SalientMetric.HESSIAN
    assert BiLLMConfig() == paper  # the measured best variant is the default (README)


@pytest.mark.parametrize("bad", [
    dict(blocksize=0), dict(percdamp=-1), dict(salient_metric="entropy"), dict(min_salient_cols=5, max_salient_cols=2),
    dict(salient_order=3), dict(n_break_candidates=0), dict(include=[]), dict(scale_dtype="bfloat16"),
])
def test_invalid_options_are_clear_errors(bad):
    with pytest.raises(BillmError, match="invalid config"):
        BiLLMConfig(**bad)


def test_unknown_keys_and_methods():
    with pytest.raises(BillmError, match="unknown billm option"):
        config_from_dict({"method": "billm", "colour": "red"})
    with pytest.raises(BillmError, match="unknown method"):
        config_from_dict({"method": "nope"})


def test_wide_preset_is_tiny_with_the_second_sign_plane_on_88_of_128_columns():
    import billm

    wide, tiny = billm.config_from_spec("billm:wide"), billm.config_from_spec("billm:tiny")
    assert (wide.min_salient_cols, wide.max_salient_cols) == (88, 88)
    assert wide.replace(min_salient_cols=tiny.min_salient_cols, max_salient_cols=tiny.max_salient_cols) == tiny
