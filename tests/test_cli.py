"""``poft-autotune``: every subcommand on a tiny study; study files validated with clear errors."""

import json
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import optuna
import pytest
import transformers
import yaml

from poft_autotune import ParetoFront, SearchSpace, autotune, cli
from poft_autotune.demo import DEMO_STEPS, DEMO_TRIALS, demo_config
from poft_autotune.export import weight_bytes
from poft_autotune.study_config import load_study_config, parse_study_config
from poft_autotune.testing import (
    classification_dataset,
    csv_study,
    tiny_bert,
    tiny_training_args,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 2-trial study on a tiny BERT, every checkpoint kept: (storage url, db path, tmp dir)."""
    tmp = tmp_path_factory.mktemp("cli")
    autotune(
        tiny_bert(),
        classification_dataset(32),
        classification_dataset(16, seed=1),
        metric="accuracy",
        n_trials=2,
        space=SearchSpace(methods=("quantize",), steps=(2, 4), lora_rank=(0,)),
        study_name="tiny",
        training_args=tiny_training_args(str(tmp / "args")),
        output_dir=tmp,
        keep_checkpoints="all",
        show_progress=False,
    )
    return f"sqlite:///{tmp}/tiny.db", tmp / "tiny.db", tmp


@pytest.mark.parametrize("command", ["demo", "run", "worker", "front", "export", "dashboard"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: poft-autotune {command}" in capsys.readouterr().out


def test_front_in_every_format(study, capsys):
    url, db, _ = study
    front = ParetoFront.from_study(optuna.load_study(study_name="tiny", storage=url))
    assert cli.main(["front", url]) == 0
    table = capsys.readouterr().out
    assert table.startswith("trial  plan") and len(table.splitlines()) == 2 + len(front)
    assert cli.main(["front", str(db), "--format", "json"]) == 0  # a plain path works too
    assert json.loads(capsys.readouterr().out) == json.loads(front.to_json())
    assert cli.main(["front", url, "--study", "tiny", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.strip() == front.to_markdown()


def test_front_picks_or_lists_studies(study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/two.db"
    for name in ("alpha", "beta"):
        optuna.create_study(study_name=name, storage=url, directions=["minimize", "maximize"])
    assert cli.main(["front", url]) == 1
    assert "holds 2 studies; pick one with --study NAME: ['alpha', 'beta']" in capsys.readouterr().err
    assert cli.main(["front", url, "--study", "gamma"]) == 1
    assert "No study 'gamma' in this storage" in capsys.readouterr().err
    assert cli.main(["front", url, "--study", "beta"]) == 0
    assert "front is empty" in capsys.readouterr().out
    assert cli.main(["front", str(tmp_path / "missing.db")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()  # nothing created by a typo
    assert cli.main(["front", f"sqlite:///{tmp_path}/missing.db"]) == 1
    assert "the file does not exist" in capsys.readouterr().err


def test_export_copies_the_trial_checkpoint(study, tmp_path, capsys):
    url, _, _ = study
    trial = optuna.load_study(study_name="tiny", storage=url).trials[1]
    target = tmp_path / "ship"
    assert cli.main(["export", url, "--trial", "1", str(target)]) == 0
    assert weight_bytes(target) == trial.values[0]
    assert "exported trial 1" in capsys.readouterr().out
    assert cli.main(["export", url, "--trial", "1", str(target)]) == 1  # exists: needs --overwrite
    assert cli.main(["export", url, "--trial", "1", str(target), "--overwrite"]) == 0
    assert cli.main(["export", url, "--trial", "99", str(tmp_path / "x")]) == 1
    assert "has no trial 99" in capsys.readouterr().err


def test_dashboard_binds_loopback_and_prints_the_url(study, monkeypatch, capsys):
    url, _, _ = study
    served = []
    monkeypatch.setattr(WSGIServer, "serve_forever", lambda self, *a, **k: served.append(self.server_address))
    assert cli.main(["dashboard", url, "--port", "0"]) == 0
    assert served and served[0][0] == "127.0.0.1"
    assert f"http://127.0.0.1:{served[0][1]}/dashboard/" in capsys.readouterr().out


@pytest.fixture
def local_study(tmp_path):
    """A study directory with a tiny saved classifier, two CSV files and a valid definition."""
    return tmp_path, csv_study(tmp_path)


def test_run_a_yaml_study_on_local_csv(local_study, capsys):
    tmp_path, definition = local_study
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(definition))
    verbosity = transformers.logging.get_verbosity()
    assert cli.main(["run", str(path), "--quiet"]) == 0
    assert transformers.logging.get_verbosity() == verbosity  # --quiet is undone after the command
    out = capsys.readouterr().out
    db = tmp_path / "out" / "local.db"
    assert f"poft-autotune dashboard sqlite:///{db}" in out and "trial  plan" in out
    study = optuna.load_study(study_name="local", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.metric_names == ["size_bytes", "accuracy"]
    report = tmp_path / "out" / "local"
    assert "![front](front.png)" in (report / "report.md").read_text()
    assert (report / "front.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "change,messages",
    [
        ({"modle": "model"}, ["unknown key 'modle'", "did you mean 'model'?"]),
        ({"model": None}, ["missing required key 'model'"]),
        ({"n_trials": "six"}, ["'n_trials' must be a positive integer, got 'six' (str)"]),
        (
            {"training": {"batch_sise": 8, "max_length": -1}, "methods": ["quantise"]},
            [
                "unknown key 'training.batch_sise'",
                "'training.max_length' must be a positive integer, got -1",
                "Unknown compression method 'quantise'",
            ],
        ),
        ({"data": {"train": "data/train.csv"}}, ["'data' needs 'data.eval'"]),
        ({"data": {"train": "nope.csv", "eval": "data/eval.csv"}}, ["'data.train': no such file"]),
        ({"space": {"steps": [5, 2]}}, ["'space.steps' must be [low, high]"]),
        (
            {"policy": "bayes", "early_stopping": {"checks": -1}, "min_retained": "high"},
            [
                "'policy' must be one of ['agent', 'nsga2'",
                "`EarlyStopping.checks` must be",
                "'min_retained' must be",
            ],
        ),
    ],
)
def test_bad_study_files_fail_with_every_problem_listed(local_study, change, messages, capsys):
    tmp_path, definition = local_study
    definition = {**definition, **change}
    if "modle" in change:
        del definition["model"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(definition))
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Invalid study definition {path}:")
    for message in messages:
        assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_yaml_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    assert cli.main(["run", str(path)]) == 1
    assert "must be a mapping of keys" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "absent.yaml")]) == 1
    assert "No study file" in capsys.readouterr().err


def test_demo_budget_comes_from_its_arguments(tmp_path, study, monkeypatch, capsys):
    parser = cli.build_parser()
    default = cli.demo_config_from_args(parser.parse_args(["demo"]))
    assert (default.n_trials, default.space.steps) == (DEMO_TRIALS, DEMO_STEPS) == (6, (10, 40))
    assert default.storage_url == f"sqlite:///{Path('studies').resolve()}/demo.db"
    args = parser.parse_args(["demo", "--trials", "3", "--steps", "5", "9", "--out", str(tmp_path)])
    config = cli.demo_config_from_args(args)
    assert (config.n_trials, config.space.steps, config.study_name) == (3, (5, 9), "demo")
    assert config.storage_url == f"sqlite:///{tmp_path}/demo.db"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--trials", "0"])
    # The command runs exactly that config (run_study stubbed: the real demo downloads its assets).
    import poft_autotune.study_config as study_config

    url, _, _ = study
    ran = []
    fake_front = ParetoFront.from_study(optuna.load_study(study_name="tiny", storage=url))
    monkeypatch.setattr(
        study_config, "run_study", lambda c, show_progress: ran.append((c, show_progress)) or fake_front
    )
    assert cli.main(["demo", "--trials", "3", "--out", str(tmp_path), "--quiet"]) == 0
    assert ran == [(demo_config(3, DEMO_STEPS, tmp_path), False)]
    assert f"poft-autotune dashboard sqlite:///{tmp_path}/demo.db" in capsys.readouterr().out


def test_example_study_files_are_valid(local_study):
    assert load_study_config(REPO / "studies" / "demo.yaml") == demo_config(out=REPO / "studies")
    tmp_path, _ = local_study
    definition = yaml.safe_load((REPO / "studies" / "example_local_csv.yaml").read_text())
    definition.update(model=str(tmp_path / "model"))
    definition["data"].update(train=str(tmp_path / "data" / "train.csv"), eval=str(tmp_path / "data" / "eval.csv"))
    config = parse_study_config(definition)
    assert config.space.choices == {"quantize": {"bits": [3, 8]}} and config.n_trials == 12


def test_search_settings_in_a_study_file(local_study):
    tmp_path, definition = local_study
    config = parse_study_config(
        {**definition, "policy": "nsga2", "early_stopping": False, "promote": False, "max_size_bytes": 10**6},
        base_dir=tmp_path,
    )
    assert (config.policy, config.early_stopping, config.promote, config.max_size_bytes) == (
        "nsga2",
        None,
        False,
        10**6,
    )
    assert parse_study_config(definition, base_dir=tmp_path).policy == "agent"
