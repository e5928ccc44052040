"""Short meta-training runs through the gin configs: they learn, and the same seed gives the same numbers."""

import json
import os

import gin
import pytest

import tfmeta.configurables  # noqa: F401  (registers the gin configurables)
from tfmeta.experiment import Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "Experiment.num_steps = 600",
    "Experiment.steps_per_epoch = 300",
    "Experiment.validation_tasks = 0",
    "Experiment.eval_num_tasks = 200",
    "Experiment.verbose = 0",
]


def experiment(config, *bindings):
    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings([os.path.join(REPO, "gin_configs", config)], SHORT + list(bindings))
    return Experiment()


@pytest.mark.parametrize("config", ["maml_sine.gin", "fomaml_sine.gin", "reptile_sine.gin"])
def test_short_run_lowers_post_adaptation_mse(config, tmp_path):
    exp = experiment(config)
    untrained = exp.evaluate(exp.build())["loss"]["mean"]
    trained = exp.train(str(tmp_path))["eval"]["loss"]["mean"]
    assert trained[1] < 0.6 * untrained[1]
    assert trained[-1] < 0.5 * untrained[-1]


def test_same_seed_same_numbers(tmp_path):
    first = experiment("maml_sine.gin").train(str(tmp_path / "a"))
    second = experiment("maml_sine.gin").train(str(tmp_path / "b"))
    assert first == second
    other = experiment("maml_sine.gin", "Experiment.seed = 1").train(str(tmp_path / "c"))
    assert other["eval"]["loss"]["mean"] != first["eval"]["loss"]["mean"]
    with open(tmp_path / "a" / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(first))
