"""Model folders that must NOT be loaded by default: one that ships Python code, one that holds only a
pickle. Each leaves a marker file behind if it ever is (the code ran, the pickle was unpickled)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import torch

from poft_autotune.testing import save_tiny_text_classifier, tiny_bert

CODE_MARKER = "code-ran"
PICKLE_MARKER = "unpickled"


def save_remote_code_model(directory: pathlib.Path, marker: pathlib.Path) -> None:
    """A tiny text classifier whose config.json maps the auto classes to ``custom_bert.py`` in the folder;
    importing that file writes ``marker``."""
    save_tiny_text_classifier(directory)
    (directory / "custom_bert.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the model code ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n\n\n"
        "class CustomBertConfig(BertConfig):\n    model_type = 'custom-bert'\n\n\n"
        "class CustomBert(BertForSequenceClassification):\n    config_class = CustomBertConfig\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="custom-bert",
        architectures=["CustomBert"],
        auto_map={
            "AutoConfig": "custom_bert.CustomBertConfig",
            "AutoModelForSequenceClassification": "custom_bert.CustomBert",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))


@dataclasses.dataclass
class _Touch:
    path: pathlib.Path

    def __reduce__(self) -> Any:  # unpickling calls Path.touch(path): proof that the pickle was loaded
        return (pathlib.Path.touch, (self.path,))


def save_pickle_only_model(directory: pathlib.Path, marker: pathlib.Path) -> None:
    """A tiny text classifier whose weights are only ``pytorch_model.bin``, a pickle that also holds an
    object whose unpickling writes ``marker``."""
    save_tiny_text_classifier(directory)
    (directory / "model.safetensors").unlink()
    state = tiny_bert(vocab_size=14).state_dict()
    torch.save({**state, "payload": _Touch(marker)}, directory / "pytorch_model.bin")
