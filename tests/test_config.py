from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import STUDIES, write_study
from tuner.config import load_spec
from tuner.errors import ConfigError


def test_shipped_studies_load_with_their_registered_models() -> None:
    linear = load_spec(STUDIES / "cars_linear.toml")
    mlp = load_spec(STUDIES / "cars_mlp.toml")
    assert (linear.target, linear.features, linear.model_name) == ("mpg", ["wt"], "cars-linear")
    assert linear.space["hidden_size"].value == 0
    assert (mlp.target, mlp.features, mlp.model_name) == ("mpg", None, "cars-mpg")
    assert {"lr", "epochs", "batch_size", "hidden_size", "activation"} <= set(mlp.space)
    assert mlp.space["lr"].log is True
    assert mlp.study_direction == "minimize"


def test_default_storage_is_a_sqlite_file_next_to_the_study_file() -> None:
    spec = load_spec(STUDIES / "cars_mlp.toml")
    assert spec.storage_url == f"sqlite:///{STUDIES.resolve() / 'cars_mlp.db'}"
    assert spec.data == (STUDIES.parent / "data" / "cars.csv").resolve()


def test_space_hash_changes_with_the_space(tmp_path: Path) -> None:
    a = load_spec(write_study(tmp_path, "a"))
    b = load_spec(write_study(tmp_path, "b", space=(
        'lr = { type = "float", low = 1e-3, high = 1e-2, log = true }\n'
        'epochs = { type = "int", low = 2, high = 3 }\n'
        'batch_size = { type = "categorical", choices = [8, 16] }\n'
        'hidden_size = { type = "int", low = 2, high = 8 }\n'
        'activation = { type = "categorical", choices = ["relu", "tanh"] }\n'
    )))
    assert a.space_hash() != b.space_hash()
    assert a.space_hash() == load_spec(tmp_path / "a.toml").space_hash()


BAD_SPACES = {
    "low > high": ('lr = { type = "float", low = 0.1, high = 0.01 }', r"low \(0.1\) > high \(0.01\)"),
    "zero epochs": ('epochs = { type = "int", low = 0, high = 3 }', r"space.epochs: 0 must be >= 1"),
    "negative epochs": ('epochs = { type = "fixed", value = -1 }', r"space.epochs: -1 must be >= 1"),
    "unknown activation": (
        'activation = { type = "categorical", choices = ["relu", "swish"] }',
        r"unknown activation 'swish'; choose one of \['elu', 'gelu', 'leaky_relu', 'relu', 'sigmoid', 'silu', 'tanh'\]",
    ),
    # said once: low's own minimum (lr > 0) is not repeated after it
    "log with zero": ('lr = { type = "float", low = 0.0, high = 0.1, log = true }',
                      r"space.lr: log = true needs low > 0 \(got low = 0.0\)$"),
    "no choices": ('batch_size = { type = "categorical", choices = [] }',
                   r"space.batch_size.choices: is empty; list at least one value, or use \{ type = 'fixed'"),
    "zero width": ('hidden_size = { type = "int", low = 4, high = 4 }', r"zero-width range"),
    "float batch": ('batch_size = { type = "float", low = 1.0, high = 4.0 }', r"space.batch_size: must be type = 'int'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_impossible_search_space_names_the_parameter(tmp_path: Path, case: str) -> None:
    line, message = BAD_SPACES[case]
    name = line.split(" ")[0]
    base = {
        "lr": 'lr = { type = "float", low = 1e-3, high = 1e-1, log = true }',
        "epochs": 'epochs = { type = "int", low = 2, high = 3 }',
        "batch_size": 'batch_size = { type = "categorical", choices = [8, 16] }',
        "hidden_size": 'hidden_size = { type = "int", low = 2, high = 8 }',
        "activation": 'activation = { type = "categorical", choices = ["relu", "tanh"] }',
    }
    base[name] = line
    path = write_study(tmp_path, space="\n".join(base.values()) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"n_trails: unknown key \(did you mean 'n_trials'\?\); remove it or check its spelling"):
        load_spec(write_study(tmp_path, n_trails=5))


def test_unknown_sampler_and_pruner_list_the_valid_ones(tmp_path: Path) -> None:
    path = write_study(tmp_path, body='[sampler]\nname = "bayes"\n[pruner]\nname = "early"\n')
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert "sampler.name: 'bayes' is not allowed; input should be 'tpe', 'random', 'gp', 'cmaes' or 'qmc'" in str(err.value)
    assert "pruner.name: 'early' is not allowed" in str(err.value)


def test_every_problem_of_one_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write_study(tmp_path, n_trials=0, colour="red")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert "n_trials: Input should be greater than 0" in str(err.value)
    assert "colour: unknown key" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_parameter(tmp_path: Path) -> None:
    path = write_study(tmp_path, space='lr = { type = "float", low = 1e-3, high = 1e-1 }\n')
    with pytest.raises(ConfigError, match=r"missing parameter 'epochs'"):
        load_spec(path)


def test_invalid_toml_shows_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\ntarget = mpg\n')
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2, column 10"):
        load_spec(path)


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study file '.*nope.toml' does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_metric_must_fit_the_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metric 'accuracy' does not fit task 'regression'"):
        load_spec(write_study(tmp_path, metric="accuracy"))


def _problems(tmp_path: Path, **kw: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_spec(write_study(tmp_path, "m", **kw))  # type: ignore[arg-type]
    return str(e.value)


SPACE_REST = (
    'epochs = { type = "int", low = 2, high = 3 }\n'
    'batch_size = { type = "fixed", value = 8 }\n'
    'hidden_size = { type = "fixed", value = 4 }\n'
    'activation = { type = "fixed", value = "relu" }\n'
)


def test_a_misspelt_parameter_type_is_named_with_the_valid_types(tmp_path: Path) -> None:
    msg = _problems(tmp_path, space='lr = { type = "flaot", low = 0.001, high = 0.1 }\n' + SPACE_REST)
    assert msg.endswith(
        "m.toml: space.lr.type: 'flaot' is not a parameter type (did you mean 'float'?); "
        "choose one of ['categorical', 'fixed', 'float', 'int']"
    )
    assert "discriminator" not in msg and "tag" not in msg


def test_a_parameter_without_a_type_says_how_to_write_one(tmp_path: Path) -> None:
    msg = _problems(tmp_path, space='lr = { typ = "float", low = 0.001, high = 0.1 }\n' + SPACE_REST)
    assert "space.lr: no type ('typ': did you mean 'type'?); add type = one of ['categorical', 'fixed', 'float', 'int']" in msg
    assert "Unable to extract tag" not in msg
    msg = _problems(tmp_path, space="lr = 0.01\n" + SPACE_REST)
    assert "space.lr: 0.01 is not a parameter table; write { type = \"fixed\", value = 0.01 }" in msg


def test_unknown_keys_suggest_the_closest_valid_key(tmp_path: Path) -> None:
    msg = _problems(
        tmp_path,
        body="report_evry = 10\n[validation]\nfold = 5\n",
        space='lr = { type = "float", low = 0.001, hihg = 0.1, high = 0.1 }\n' + SPACE_REST,
    )
    assert "report_evry: unknown key (did you mean 'report_every'?); remove it or check its spelling" in msg
    assert "validation.fold: unknown key (did you mean 'folds'?)" in msg
    assert "space.lr.hihg: unknown key (did you mean 'high'?)" in msg
    # (parameter names are checked once every parameter's own fields are valid)
    msg = _problems(tmp_path, space='lr = { type = "float", low = 0.001, high = 0.1 }\n' + SPACE_REST.replace("epochs", "epoch"))
    assert "unknown parameter 'epoch' (did you mean 'epochs'?); choose from" in msg
    assert "zzz: unknown key; remove it" in _problems(tmp_path, body="zzz = 1\n")  # nothing close: no guess
    # names other tools use, which no spelling distance finds
    msg = _problems(tmp_path, body='model_name = "m"\nnum_trials = 5\n')
    assert "model_name: unknown key (did you mean 'registered_model'?)" in msg
    assert "num_trials: unknown key (did you mean 'n_trials'?)" in msg


def test_shipped_studies_do_not_warn_about_their_own_batch_sizes() -> None:
    import warnings

    from tuner.inputs import load_inputs

    for path in sorted(STUDIES.glob("*.toml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the clamping warning would raise here
            load_inputs(load_spec(path))


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_the_samplers_cannot_take_is_refused(tmp_path: Path, seed: int) -> None:
    with pytest.raises(ConfigError, match=r"seed: Input should be (greater than or equal to 0|less than 4294967296)"):
        load_spec(write_study(tmp_path, seed=seed))
