"""Loading: a warning where bfloat16 would be emulated on the CPU, none where it is native or not asked for."""

import warnings

import pytest

from lingregion import models


def test_bfloat16_on_a_cpu_without_bf16_instructions_warns_with_the_measured_slowdown(tiny_folder, monkeypatch):
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu": 120.0)
    with pytest.warns(UserWarning, match="120× slower than float32 on this CPU"):
        m = models.load(str(tiny_folder), dtype="bfloat16")
    assert m.info["dtype"] == "bfloat16"
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu": 0.5)  # AMX: bf16 is the faster one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.load(str(tiny_folder), dtype="bfloat16")
        models.load(str(tiny_folder), dtype="float32")
    assert not [w for w in caught if "slower than float32" in str(w.message)]
