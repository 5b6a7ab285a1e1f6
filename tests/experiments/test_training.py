"""What the recovery and forgetting experiments share: the training run a config asks for, and the rules that
refuse one that cannot run."""

import pytest

from lingregion.experiments import training
from lingregion.experiments.registry import validate
from lingregion.store import LingregionError

from conftest import TINY_TRAINING, tiny_config


def small_config(tiny_folder, **kw):
    return tiny_config(tiny_folder, **{**TINY_TRAINING, "experiments": ["recovery", "forgetting"], **kw})


def test_sample_counts_become_evaluation_steps(tiny_folder):
    cfg = small_config(tiny_folder, train_samples=[0, 3, 8], train_batch=2, train_accum=2)
    assert training.eval_steps(cfg) == [0, 1, 2]  # 4 samples a step, rounded up
    t = training.train_config(cfg)
    assert (t.steps, t.eval_steps, t.batch_size, t.accumulation) == (2, [1, 2], 2, 2)
    assert (t.lr, t.warmup, t.dtype, t.seed) == (cfg.train_lr, cfg.train_warmup, cfg.train_dtype, cfg.seed)


def test_a_curve_change_reads_first_to_last():
    assert training.change([10.0, 8.0, 5.0]) == "10.000 → 5.000 (×0.500)"


def test_training_config_errors(tiny_folder):
    for bad, words in [
        ({"train_samples": [0, 4, 2]}, "increasing"),
        ({"train_track": ["ru"]}, "cannot also be"),
        ({"train_ratio": 1.5}, "outside"),
        ({"train_dtype": "fp8"}, "train_dtype"),
        ({"train_samples": [0, 1, 2], "train_batch": 4}, "same training step"),
        ({"train_other": "xx"}, "unknown language"),
        ({"train_track": []}, "at least one"),
    ]:
        with pytest.raises(LingregionError, match=words):
            validate(small_config(tiny_folder, **bad))
    validate(small_config(tiny_folder))
