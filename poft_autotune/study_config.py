"""Study definitions: a YAML file (or a dict) -> a validated :class:`StudyConfig` -> :func:`run_study`.

A definition (``poft-autotune run study.yaml``)::

    model: models/my-classifier       # a local directory (relative to this file) or a Hub id;
                                      # or {demo: minilm_sentiment, base_steps: 150} (the demo's base)
    data:                             # local files, loaded with datasets' csv / json / parquet builders
      train: data/train.csv
      eval: data/eval.csv
      format: csv                     # optional: inferred from the extension
      text_column: text
      label_column: label             # class ids, or strings (mapped to ids in sorted order)
    # data: {demo: movie_snippets, n_train: 2000, n_eval: 500}    # or the demo's movie snippets
    metric: accuracy                  # optional: accuracy for classifiers, perplexity for causal LMs
    methods: [quantize, prune, nm, prune+quantize]
    space:                            # optional overrides of SearchSpace's ranges
      steps: [10, 40]
      learning_rate: [1.0e-5, 2.0e-4]
      lora_rank: [0, 8]
      lora_merge: [true, false]       # LoRA adapters merged + re-compressed, or shipped beside the base
      choices: {quantize: {bits: [3, 8]}}
    n_trials: 6
    seed: 0
    study_name: my_study              # default: the file name without its extension
    output_dir: .                     # default: the file's directory; the study is <output_dir>/<study_name>.db
    storage: null                     # or an Optuna storage URL, used as given
    keep_checkpoints: front           # front | all | none
    policy: agent                     # agent | tpe | nsga2 | random
    early_stopping: {checks: 3, min_steps: 10, margin: 0.005}   # or false
    promote: true                     # re-run short-recovery front points at space.steps' high end
    max_size_bytes: 40000000          # optional constraints: bytes of the exported checkpoint,
    min_retained: 0.98                # and the fraction of the dense metric to keep
    training: {batch_size: 16, max_length: 128, eval_batch_size: 32}
    trust_remote_code: false          # true runs Python code shipped with the model (review it first)
    allow_space_change: false         # true continues an existing study with a changed search space

Relative paths (``model``, ``data.train``, ``data.eval``, ``output_dir``) are relative to the YAML file.
Every problem in a definition is reported at once: unknown keys (with the valid ones), missing required
keys, values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from poft_autotune.errors import InvalidConfigError, MissingDependencyError
from poft_autotune.pareto import ParetoFront
from poft_autotune.search.policy import available_policies
from poft_autotune.search.space import SearchSpace
from poft_autotune.search.stopping import EarlyStopping

DEMO_MODELS = ("minilm_sentiment",)
DEMO_DATA = ("movie_snippets",)
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
KEEP = ("front", "all", "none")

# Each key's expected type: a short description for messages and a converter that raises ValueError.
Check = tuple[str, Callable[[Any], Any]]


def _int(minimum: int | None = None) -> Check:
    def convert(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
            raise ValueError
        return v

    what = {None: "an integer", 0: "an integer >= 0", 1: "a positive integer"}[minimum]
    return what, convert


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        return float(v)
    if not isinstance(v, (int, float)):
        raise ValueError
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _range(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, Any]]:
    def convert(v: Any) -> tuple[Any, Any]:
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            v = [v, v]  # one value fixes it
        if not isinstance(v, list) or len(v) != 2:
            raise ValueError
        low, high = item(v[0]), item(v[1])
        if low > high:
            raise ValueError
        return low, high

    return convert


def _list(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def convert(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list):
            v = [v]
        if not v:
            raise ValueError
        return tuple(item(x) for x in v)

    return convert


def _mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError
    return dict(v)


INT, POS_INT, NONNEG_INT = _int(), _int(1), _int(0)
FLOAT: Check = ("a number", _float)
STR: Check = ("a non-empty string", _str)
BOOL: Check = ("true or false", _bool)
MAPPING: Check = ("a mapping (key: value lines)", _mapping)
STR_LIST: Check = ("a list of strings", _list(_str))
MODEL: Check = ("a path, a Hub id or {demo: minilm_sentiment}", lambda v: v if isinstance(v, Mapping) else _str(v))

TOP: dict[str, Check] = {
    "model": MODEL,
    "data": MAPPING,
    "metric": STR,
    "greater_is_better": BOOL,
    "methods": STR_LIST,
    "space": MAPPING,
    "n_trials": POS_INT,
    "seed": INT,
    "storage": STR,
    "study_name": STR,
    "output_dir": STR,
    "keep_checkpoints": STR,
    "training": MAPPING,
    "policy": STR,
    "early_stopping": ("a mapping {checks, min_steps, margin} or false", lambda v: v if v is False else _mapping(v)),
    "promote": BOOL,
    "max_size_bytes": POS_INT,
    "min_retained": FLOAT,
    "trust_remote_code": BOOL,
    "allow_space_change": BOOL,
}
REQUIRED = {"model": "a local model directory or a Hub id", "data": "the train and eval data"}
SPACE: dict[str, Check] = {
    "steps": ("[low, high] (integers >= 0)", _range(NONNEG_INT[1])),
    "learning_rate": ("[low, high] (numbers > 0)", _range(_float)),
    "distill_weight": ("[low, high] (numbers in [0, 1])", _range(_float)),
    "temperature": ("[low, high] (numbers > 0)", _range(_float)),
    "lora_rank": ("a list of integers >= 0 (0 = full fine-tune)", _list(NONNEG_INT[1])),
    "lora_merge": ("a list of true/false (false = ship LoRA adapters unmerged)", _list(_bool)),
    "choices": MAPPING,
}
FILE_DATA: dict[str, Check] = {"train": STR, "eval": STR, "format": STR, "text_column": STR, "label_column": STR}
DEMO_DATA_KEYS: dict[str, Check] = {"demo": STR, "n_train": POS_INT, "n_eval": POS_INT}
DEMO_MODEL_KEYS: dict[str, Check] = {"demo": STR, "base_steps": POS_INT}
TRAINING: dict[str, Check] = {
    "batch_size": POS_INT,
    "gradient_accumulation_steps": POS_INT,
    "weight_decay": FLOAT,
    "warmup_steps": NONNEG_INT,
    "lr_scheduler_type": STR,
    "max_grad_norm": FLOAT,
    "max_length": POS_INT,
    "eval_batch_size": POS_INT,
    "use_cpu": BOOL,
}


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """The demo's dense base: MiniLM fine-tuned ``base_steps`` steps (``poft_autotune.demo.finetuned_minilm``)."""

    base_steps: int = 150


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The demo's movie snippets: ``n_train`` rows to recover on, ``n_eval`` to measure on."""

    n_train: int = 2000
    n_eval: int = 500


@dataclasses.dataclass(frozen=True)
class FileData:
    """Local train/eval files read with the ``datasets`` builder ``format`` (csv, json or parquet)."""

    train: Path
    eval: Path
    format: str
    text_column: str = "text"
    label_column: str = "label"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The recovery Trainer's settings that a study file may set; the plan sets steps and learning rate."""

    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    max_grad_norm: float = 1.0
    max_length: int = 128
    eval_batch_size: int = 32
    use_cpu: bool = False

    def arguments(self, output_dir: str) -> Any:
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            max_grad_norm=self.max_grad_norm,
            use_cpu=self.use_cpu,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
        )


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A validated study definition; build with :func:`load_study_config` or :func:`parse_study_config`."""

    model: str | DemoModel
    data: FileData | DemoData
    space: SearchSpace
    study_name: str
    output_dir: Path
    metric: str | None = None
    greater_is_better: bool | None = None
    n_trials: int = 12
    seed: int = 0
    storage: str | None = None
    keep_checkpoints: str = "front"
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    policy: str = "agent"
    early_stopping: EarlyStopping | None = dataclasses.field(default_factory=EarlyStopping)
    promote: bool = True
    max_size_bytes: int | None = None
    min_retained: float | None = None
    trust_remote_code: bool = False
    allow_space_change: bool = False

    @property
    def storage_url(self) -> str:
        """The storage as given, else ``sqlite:///<output_dir>/<study_name>.db`` with an absolute path."""
        return self.storage or f"sqlite:///{(self.output_dir / self.study_name).resolve()}.db"

    @property
    def report_dir(self) -> Path:
        return self.output_dir / self.study_name


class _Problems(list[str]):
    def check(self, section: Mapping[str, Any], schema: Mapping[str, Check], where: str) -> dict[str, Any]:
        """Type-check ``section`` against ``schema``; unknown keys and bad values are recorded, not raised."""
        out: dict[str, Any] = {}
        for key, value in section.items():
            name = f"{where}{key}"
            if key not in schema:
                close = difflib.get_close_matches(str(key), list(schema), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.append(
                    f"unknown key {name!r} (valid keys{' in ' + where[:-1] if where else ''}: {sorted(schema)}){hint}"
                )
                continue
            if value is None:
                continue  # null = the default
            what, convert = schema[key]
            try:
                out[key] = convert(value)
            except (ValueError, TypeError):
                self.append(f"{name!r} must be {what}, got {value!r} ({type(value).__name__})")
        return out


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _model(value: Any, base: Path, problems: _Problems) -> str | DemoModel | None:
    if isinstance(value, Mapping):
        spec = problems.check(value, DEMO_MODEL_KEYS, "model.")
        if spec.get("demo") not in DEMO_MODELS:
            problems.append(f"'model.demo' must be one of {list(DEMO_MODELS)}, got {value.get('demo')!r}")
            return None
        return DemoModel(**{k: v for k, v in spec.items() if k != "demo"})
    local = _resolve(base, value)
    if local.exists():
        return str(local.resolve())
    if value.startswith((".", "/", "~")):
        problems.append(f"'model': no such directory {str(local)!r}")
        return None
    return value  # a Hub id


def _data(value: dict[str, Any], base: Path, problems: _Problems) -> FileData | DemoData | None:
    if "demo" in value:
        spec = problems.check(value, DEMO_DATA_KEYS, "data.")
        if spec.get("demo") not in DEMO_DATA:
            problems.append(f"'data.demo' must be one of {list(DEMO_DATA)}, got {value.get('demo')!r}")
            return None
        return DemoData(**{k: v for k, v in spec.items() if k != "demo"})
    spec = problems.check(value, FILE_DATA, "data.")
    missing = [k for k in ("train", "eval") if k not in value]
    if missing:
        problems.append(
            f"'data' needs {' and '.join(repr(f'data.{k}') for k in missing)} (local files), or `demo: movie_snippets`"
        )
        return None
    if "train" not in spec or "eval" not in spec:
        return None
    paths = {k: _resolve(base, spec[k]) for k in ("train", "eval")}
    for key, path in paths.items():
        if not path.is_file():
            problems.append(f"'data.{key}': no such file {str(path)!r}")
    fmt = spec.get("format") or FORMATS.get(paths["train"].suffix.lower())
    if fmt not in set(FORMATS.values()):
        problems.append(
            f"'data.format' must be one of {sorted(set(FORMATS.values()))} (or use a file extension among "
            f"{sorted(FORMATS)}), got {spec.get('format') or paths['train'].suffix!r}"
        )
        return None
    columns = {k: spec[k] for k in ("text_column", "label_column") if k in spec}
    return FileData(paths["train"].resolve(), paths["eval"].resolve(), fmt, **columns)


def _space(methods: tuple[str, ...] | None, value: dict[str, Any], problems: _Problems) -> SearchSpace | None:
    spec = problems.check(value, SPACE, "space.")
    if "choices" in spec and not all(isinstance(v, Mapping) for v in spec["choices"].values()):
        problems.append("'space.choices' must map method names to {field: values} mappings")
        return None
    low, high = spec.get("distill_weight", (0.0, 1.0))
    if low < 0 or high > 1:
        problems.append(f"'space.distill_weight' must lie in [0, 1], got {[low, high]}")
    if spec.get("temperature", (1.0, 1.0))[0] <= 0:
        problems.append(f"'space.temperature' must be > 0, got {list(spec['temperature'])}")
    if methods is not None:
        spec["methods"] = methods
    try:
        return SearchSpace(**spec)
    except InvalidConfigError as exc:
        problems.append(str(exc))
        return None


def parse_study_config(
    definition: Any, *, base_dir: str | os.PathLike[str] | None = None, name: str = "poft", source: str = "<dict>"
) -> StudyConfig:
    """Validate a study definition (a mapping, e.g. parsed YAML); relative paths are relative to ``base_dir``.

    Raises one :class:`InvalidConfigError` listing every problem. ``name`` is the default study name.
    Example: ``parse_study_config({"model": "my-model", "data": {"train": "t.csv", "eval": "e.csv"}})``.
    """
    if not isinstance(definition, Mapping):
        raise InvalidConfigError(
            f"Invalid study definition {source}: it must be a mapping of keys ({sorted(TOP)}), "
            f"got {type(definition).__name__}."
        )
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems = _Problems()
    for key, what in REQUIRED.items():
        if definition.get(key) is None:
            problems.append(f"missing required key {key!r} ({what})")
    top = problems.check(definition, TOP, "")
    model = _model(top["model"], base, problems) if "model" in top else None
    data = _data(top["data"], base, problems) if "data" in top else None
    space = _space(top.get("methods"), top.get("space", {}), problems)
    training = TrainingConfig(**problems.check(top.get("training", {}), TRAINING, "training."))
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if training.lr_scheduler_type not in schedulers:
        problems.append(f"'training.lr_scheduler_type' must be one of {schedulers}, got {training.lr_scheduler_type!r}")
    keep = top.get("keep_checkpoints", "front")
    if keep not in KEEP:
        problems.append(f"'keep_checkpoints' must be one of {list(KEEP)}, got {keep!r}")
    policy = top.get("policy", "agent")
    if policy not in available_policies():
        problems.append(f"'policy' must be one of {available_policies()}, got {policy!r}")
    stopping: EarlyStopping | None = None
    if top.get("early_stopping", {}) is not False:
        try:
            stopping = EarlyStopping(**top.get("early_stopping", {}))
        except (InvalidConfigError, TypeError) as exc:
            problems.append(f"'early_stopping': {exc}")
    if problems or model is None or data is None or space is None:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InvalidConfigError(f"Invalid study definition {source}:\n{listed}")
    return StudyConfig(
        model=model,
        data=data,
        space=space,
        study_name=top.get("study_name", name),
        output_dir=_resolve(base, top.get("output_dir", ".")).resolve(),
        metric=top.get("metric"),
        greater_is_better=top.get("greater_is_better"),
        n_trials=top.get("n_trials", 12),
        seed=top.get("seed", 0),
        storage=top.get("storage"),
        keep_checkpoints=keep,
        training=training,
        policy=policy,
        early_stopping=stopping,
        promote=top.get("promote", True),
        max_size_bytes=top.get("max_size_bytes"),
        min_retained=top.get("min_retained"),
        trust_remote_code=top.get("trust_remote_code", False),
        allow_space_change=top.get("allow_space_change", False),
    )


def load_study_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a YAML study definition. Example: ``load_study_config("studies/demo.yaml")``."""
    try:
        import yaml
    except ImportError as exc:
        raise MissingDependencyError("Reading study files needs PyYAML: pip install pyyaml") from exc
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"No study file at {str(path)!r}.")
    try:
        definition = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_study_config(definition, base_dir=path.parent, name=path.stem, source=str(path))


def _load_files(data: FileData) -> tuple[Any, Any]:
    import datasets

    def load(path: Path, split: str) -> Any:
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            return datasets.load_dataset(data.format, data_files=str(path), split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise InvalidConfigError(f"Could not read data.{split} {str(path)!r} as {data.format}: {exc}") from exc

    train, evaluation = load(data.train, "train"), load(data.eval, "eval")
    label = data.label_column
    if label in train.column_names and getattr(train.features[label], "dtype", None) in ("string", "large_string"):
        names = sorted(set(train[label]))  # string labels -> class ids, in sorted order

        def encode(split: str, ds: Any) -> Any:
            unknown = sorted(set(ds[label]) - set(names)) if label in ds.column_names else []
            if unknown:
                raise InvalidConfigError(f"data.{split} has labels {unknown} that data.train lacks ({names}).")
            if label not in ds.column_names:
                return ds  # prepare_dataset names the missing column
            ids = [names.index(v) for v in ds[label]]
            return ds.remove_columns(label).add_column(label, ids)

        train, evaluation = encode("train", train), encode("eval", evaluation)
    return train, evaluation


def run_study(config: StudyConfig, *, show_progress: bool = True, storage: Any = None) -> ParetoFront:
    """Run the study a definition describes with :func:`poft_autotune.autotune`; returns its front.

    ``storage``: an Optuna storage object to use instead of ``config.storage_url`` (e.g. one with other
    heartbeat settings, :func:`poft_autotune.workers.open_storage`).
    Example: ``front = run_study(load_study_config("studies/demo.yaml"))``.
    """
    from poft_autotune.autotune import autotune

    model: str
    if isinstance(config.model, DemoModel):
        from poft_autotune.demo import finetuned_minilm, minilm_splits

        model = str(finetuned_minilm(minilm_splits()[0], config.model.base_steps, show_progress=show_progress))
    else:
        model = config.model
    text_column, label_column = "text", "label"
    if isinstance(config.data, DemoData):
        from poft_autotune.demo import minilm_splits

        _, train, evaluation = minilm_splits(config.data.n_train, config.data.n_eval)
    else:
        train, evaluation = _load_files(config.data)
        text_column, label_column = config.data.text_column, config.data.label_column
    with tempfile.TemporaryDirectory(prefix="poft-study-") as scratch:
        return autotune(
            model,
            train,
            evaluation,
            metric=config.metric,
            greater_is_better=config.greater_is_better,
            n_trials=config.n_trials,
            space=config.space,
            # None: <output_dir>/<study_name>.db, as storage_url says; an object (e.g. `worker`'s) as given
            storage=config.storage if storage is None else storage,
            study_name=config.study_name,
            seed=config.seed,
            training_args=config.training.arguments(scratch),
            text_column=text_column,
            label_column=label_column,
            max_length=config.training.max_length,
            eval_batch_size=config.training.eval_batch_size,
            output_dir=config.output_dir,
            keep_checkpoints=config.keep_checkpoints,
            show_progress=show_progress,
            policy=config.policy,
            early_stopping=config.early_stopping,
            promote=config.promote,
            max_size_bytes=config.max_size_bytes,
            min_retained=config.min_retained,
            trust_remote_code=config.trust_remote_code,
            allow_space_change=config.allow_space_change,
        )
