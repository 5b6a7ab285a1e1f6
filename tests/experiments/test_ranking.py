"""What the structural and outliers experiments share: the evaluation budget, the geometric-mean ratio, and the
config rules of both."""

import math

import pytest

from lingregion import Config
from lingregion.experiments import ranking
from lingregion.store import LingregionError


def test_budget_and_ratio():
    assert ranking.eval_budget(Config(struct_eval_tokens=512, eval_tokens=256)) == 256
    base = {"ru": {"ppl": 10.0}, "zh": {"ppl": 20.0}}
    r = {"ru": {"ppl": 40.0}, "zh": {"ppl": 20.0}}
    assert ranking.geometric_ratio(r, base, ["ru", "zh"]) == pytest.approx(math.sqrt(4.0))


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"struct_families": ["rows"]}, "unknown structural family"),
        ({"struct_mode": "each"}, "unknown struct_mode"),
        ({"struct_dims": [0]}, "whole numbers"),
        ({"struct_ratio": 1.0}, "outside"),
        ({"struct_langs": []}, "struct_langs is empty"),
        ({"outlier_controls": -1}, "outlier_controls"),
    ],
)
def test_structure_config_errors(bad, words):
    with pytest.raises(LingregionError, match=words):
        ranking.validate_structure(Config(**bad))
    ranking.validate_structure(Config())
