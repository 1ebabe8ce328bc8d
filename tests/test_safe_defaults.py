"""Safe defaults: no model code runs and no pickle is loaded unless asked; checkpoints are safetensors
only; the dashboard listens on 127.0.0.1 unless told otherwise."""

import inspect

import optuna
import pytest
from unsafe_models import CODE_MARKER, PICKLE_MARKER, save_pickle_only_model, save_remote_code_model

from poft_autotune import InvalidConfigError, autotune, compress_
from poft_autotune.autotune import load_model
from poft_autotune.cli import build_parser
from poft_autotune.compression.prune import PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.dashboard import launch, make_server
from poft_autotune.export import export_model, load_pretrained
from poft_autotune.study_config import StudyConfig, parse_study_config, run_study
from poft_autotune.testing import classification_dataset, tiny_bert, tiny_llama, tiny_training_args


def test_the_defaults_are_the_safe_ones():
    assert inspect.signature(autotune).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert StudyConfig.__dataclass_fields__["trust_remote_code"].default is False
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["dashboard", "studies/x.db"]).host == "127.0.0.1"


def test_a_dashboard_server_listens_on_loopback_only():
    server = make_server(optuna.storages.InMemoryStorage(), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_model_code_runs_only_when_asked(tmp_path):
    save_remote_code_model(tmp_path / "custom", tmp_path / CODE_MARKER)
    with pytest.raises(InvalidConfigError, match="trust_remote_code"):
        load_model(str(tmp_path / "custom"))
    assert not (tmp_path / CODE_MARKER).exists()

    model, tokenizer = load_model(str(tmp_path / "custom"), trust_remote_code=True)
    assert type(model).__name__ == "CustomBert" and tokenizer is not None
    assert (tmp_path / CODE_MARKER).exists()


@pytest.mark.parametrize("route", ["autotune", "study file"])
def test_trust_remote_code_reaches_the_loader(route, tmp_path):
    """The opt-in travels from autotune and from a study file to the loader: the model's code runs (the
    marker appears), then a later check stops the run before any work (perplexity needs a causal LM)."""
    save_remote_code_model(tmp_path / "custom", tmp_path / CODE_MARKER)
    data = classification_dataset(8)
    with pytest.raises(InvalidConfigError, match="perplexity"):
        if route == "autotune":
            autotune(
                str(tmp_path / "custom"),
                data,
                data,
                metric="perplexity",
                trust_remote_code=True,
                output_dir=tmp_path / "out",
                training_args=tiny_training_args(str(tmp_path / "args")),
                show_progress=False,
            )
        else:
            data.to_csv(tmp_path / "train.csv")
            definition = {
                "model": "custom",
                "data": {"train": "train.csv", "eval": "train.csv"},
                "metric": "perplexity",
                "trust_remote_code": True,
            }
            run_study(parse_study_config(definition, base_dir=tmp_path), show_progress=False)
    assert (tmp_path / CODE_MARKER).exists()
    assert not (tmp_path / "out").exists()


def test_pickle_weights_are_never_loaded(tmp_path):
    save_pickle_only_model(tmp_path / "pickled", tmp_path / PICKLE_MARKER)
    with pytest.raises(InvalidConfigError, match="has no safetensors weights"):
        load_model(str(tmp_path / "pickled"))
    with pytest.raises(InvalidConfigError, match="must hold safetensors weights"):
        load_pretrained(tmp_path / "pickled")
    assert not (tmp_path / PICKLE_MARKER).exists()


@pytest.mark.parametrize(
    "make,configs",
    [
        (tiny_bert, []),  # dense: save_pretrained
        (tiny_llama, [QuantizeConfig(bits=4, group_size=16)]),  # compressed-tensors
        (tiny_llama, [PruneConfig(sparsity=0.9), QuantizeConfig(bits=2, group_size=None)]),  # poft sparse
    ],
)
def test_exports_are_safetensors_only(make, configs, tmp_path):
    model = make()
    if configs:
        compress_(model, configs)
    out = export_model(model, tmp_path / "ship")
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes
    assert suffixes <= {".safetensors", ".json"}, suffixes  # no .bin / .pt / .pkl: nothing to unpickle
    load_pretrained(out)
