"""Short meta-training runs through the gin configs: they learn, and the same seed gives the same numbers."""

import json
import os

import gin
import keras
import numpy as np
import pytest

import tfmeta
import tfmeta.configurables  # noqa: F401  (registers the gin configurables)
from tfmeta import evaluation
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
    short = ["Experiment.num_steps = 100", "Experiment.steps_per_epoch = 50", "Experiment.eval_num_tasks = 20"]
    first = experiment("maml_sine.gin", *short).train(str(tmp_path / "a"))
    second = experiment("maml_sine.gin", *short).train(str(tmp_path / "b"))
    assert first == second
    other = experiment("maml_sine.gin", *short, "Experiment.seed = 1").train(str(tmp_path / "c"))
    assert other["eval"]["loss"]["mean"] != first["eval"]["loss"]["mean"]
    with open(tmp_path / "a" / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(first))


CONFIGS = {
    "metasgd_sine.gin": lambda m: isinstance(m.update_rule, tfmeta.MetaSGD),
    "metacurvature_sine.gin": lambda m: isinstance(m.update_rule, tfmeta.MetaCurvature),
    "anil_sine.gin": lambda m: m.fast_mask == (False,) * 4 + (True,) * 2,
    "boil_sine.gin": lambda m: m.fast_mask == (True,) * 4 + (False,) * 2,
    "tnet_sine.gin": lambda m: sum(isinstance(layer, tfmeta.layers.LinearTransform) for layer in m.learner.layers) == 3,
    "mtnet_sine.gin": lambda m: isinstance(m.update_rule.rules[0], tfmeta.MTNetMask),
    "mamlpp_sine.gin": lambda m: (isinstance(m.update_rule, tfmeta.LSLR) and m.inner_steps == 5
                                  and m.multi_step_loss_annealing == 7000 and m.first_order_steps == 7000
                                  and "cosine" in str(m.optimizer.get_config()["learning_rate"]).lower()),
    "imaml_sine.gin": lambda m: isinstance(m, tfmeta.IMAML) and m.regularization == 10.0,
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_family_configs_build_their_method_and_learn(config, tmp_path):
    """Each config builds its method, and 600 meta-steps lower the MSE after one inner step on 100 held-out tasks
    against the same learner untrained, paired: by a 95% lower bound of at least 10% of the untrained MSE (the
    slowest here, ANIL and iMAML, gain 20%; the others 45-80%)."""
    exp = experiment(config, "Experiment.eval_num_tasks = 100", "Experiment.eval_steps = 1")
    keras.utils.set_random_seed(exp.seed)  # the initialisation `train` starts from
    meta = exp.build()
    assert CONFIGS[config](meta)
    untrained = np.array(exp.evaluate(meta)["loss"]["per_task"])[:, 1]
    results = exp.train(str(tmp_path))
    trained = np.array(exp.evaluate(exp.restore(str(tmp_path)))["loss"]["per_task"])[:, 1]
    assert results["meta_steps"] == 600 and results["eval"]["loss"]["mean"][1] == pytest.approx(trained.mean())
    gain, ci = evaluation.mean_confidence_interval(untrained - trained)
    assert gain - ci > 0.1 * untrained.mean(), (gain, ci, untrained.mean())


@pytest.mark.parametrize("config, ratio", [("maml_sine.gin", 0.95), ("emaml_sine.gin", 0.97), ("bmaml_sine.gin", 0.8)])
def test_probabilistic_sine_configs_learn_and_report_calibration(config, ratio, tmp_path):
    """BMAML's sinusoid protocol: each method lowers the post-adaptation MSE of its (ensemble) prediction in 600
    meta-steps, and the evaluation reports the predictive NLL and the coverage of the 50% and 90% intervals (BMAML
    with 5 of the protocol's 10 particles, for the suite's time)."""
    exp = experiment(os.path.join("probabilistic", config), "eval/SineTasks.num_query = 20",
                     *(["BMAML.num_particles = 5"] if config.startswith("bmaml") else []))
    untrained = exp.evaluate(exp.build())
    trained = exp.train(str(tmp_path))["eval"]
    assert trained["mean_squared_error"]["mean"][-1] < ratio * untrained["mean_squared_error"]["mean"][-1]
    assert trained["num_tasks"] == 200
    for name in ("nll", "coverage_50", "coverage_90"):
        assert len(trained[name]["ci95"]) == len(trained["loss"]["mean"])
    assert 0 <= trained["coverage_50"]["mean"][-1] <= trained["coverage_90"]["mean"][-1] <= 1


PROBABILISTIC_CONFIGS = {  # config: (meta-learner, the settings its comments state)
    "maml_ambiguous.gin": (tfmeta.MAML, lambda m: m.inner_steps == 5 and m.likelihood.stddev == 0.3),
    "emaml_ambiguous.gin": (tfmeta.EMAML, lambda m: m.num_particles == 5 and m.likelihood.stddev == 0.3),
    "platipus_ambiguous.gin": (tfmeta.PLATIPUS, lambda m: m.num_samples == 5 and m.kl_weight == 0.1),
    "bmaml_ambiguous.gin": (tfmeta.BMAML, lambda m: m.num_particles == 5 and m.inner_steps == 5),
    "abml_ambiguous.gin": (tfmeta.ABML, lambda m: m.kl_weight == 0.18 and m.likelihood.stddev == 0.3),
    "omniglot_5w1s.gin": (tfmeta.MAML, lambda m: isinstance(m.likelihood, tfmeta.likelihoods.Categorical)),
    "emaml_omniglot_5w1s.gin": (tfmeta.EMAML, lambda m: m.num_particles == 5 and m.eval_inner_steps == 10),
    "bmaml_omniglot_5w1s.gin": (tfmeta.BMAML, lambda m: m.update_rule.learning_rate == 0.08
                                and not m.learn_prior_precision and m.initial_prior_precision == 1e-3),
    "platipus_omniglot_5w1s.gin": (tfmeta.PLATIPUS, lambda m: m.num_samples == 5 and m.kl_weight == 0.1),
    "abml_omniglot_5w1s.gin": (tfmeta.ABML, lambda m: m.kl_weight == 0.002 and m.hyperprior_weight == 5e-8),
}


@pytest.mark.parametrize("config", sorted(PROBABILISTIC_CONFIGS))
def test_probabilistic_configs_build_what_they_state(config, request):
    """The ambiguous-regression and Omniglot configs of the probabilistic learners build their meta-learner with
    the settings their comments give (the Omniglot ones need the archives)."""
    if "omniglot" in config:
        request.getfixturevalue("omniglot_dir")  # skips without the archives
    cls, stated = PROBABILISTIC_CONFIGS[config]
    meta = experiment(os.path.join("probabilistic", config)).build()
    assert type(meta) is cls and stated(meta)
