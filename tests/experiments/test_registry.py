"""The registry: every experiment follows the protocol, in the order the config declares, and a config is
checked only for the experiments it selects."""

import types

import pytest

from lingregion import Config
from lingregion.experiments import registry
from lingregion.experiments.registry import EXPERIMENTS, Experiment
from lingregion.store import LingregionError


def test_experiment_names_are_the_registry():
    assert Config().experiments == list(EXPERIMENTS)
    assert all(callable(e.measure) and callable(e.section) for e in EXPERIMENTS.values())


def test_a_module_that_breaks_the_protocol_is_named():
    fake = types.ModuleType("lingregion.experiments.fake")
    fake.NAME, fake.section = "fake", lambda result: []
    with pytest.raises(TypeError, match=r"fake is not an experiment: missing \['measure'\]"):
        Experiment.of(fake)
    fake.measure, fake.validate = (lambda run: {}), "not a function"
    with pytest.raises(TypeError, match=r"not callable \['validate'\]"):
        Experiment.of(fake)
    fake.validate = lambda cfg: None
    assert Experiment.of(fake).findings is None


def test_only_the_selected_experiments_are_validated():
    registry.validate(Config(experiments=["removal"], struct_dims=[0]))  # structural's rule is not checked
    with pytest.raises(LingregionError, match="struct_dims"):
        registry.validate(Config(experiments=["structural"], struct_dims=[0]))
    with pytest.raises(LingregionError, match="unknown experiment"):
        registry.validate(Config(experiments=["nothing"]))
