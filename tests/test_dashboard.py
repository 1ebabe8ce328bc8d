"""The real optuna-dashboard server shows every trial's note (plan, the three numbers, size) over HTTP."""

import json
import threading
import urllib.request

import optuna

from poft_autotune import SearchSpace, autotune
from poft_autotune.dashboard import make_server, trial_note
from poft_autotune.pareto import CHECKPOINT_ATTR, RESULT_ATTR
from poft_autotune.search import TrialPlan, TrialResult
from poft_autotune.testing import classification_dataset, tiny_bert, tiny_training_args


def _get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_dashboard_serves_trial_notes(tmp_path):
    storage = f"sqlite:///{tmp_path}/dash.db"
    autotune(
        tiny_bert(),
        classification_dataset(32),
        classification_dataset(16, seed=1),
        metric="accuracy",
        n_trials=2,
        space=SearchSpace(methods=("quantize", "prune"), steps=(2, 4), lora_rank=(0,)),
        storage=storage,
        study_name="dash",
        training_args=tiny_training_args(str(tmp_path / "args")),
        output_dir=tmp_path,
        show_progress=False,
    )
    server = make_server(storage, "127.0.0.1", 0)  # any free loopback port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        summaries = _get(base, "/api/studies")["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == "dash")
        detail = _get(base, f"/api/studies/{study_id}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert detail["name"] == "dash"
    assert detail["objective_names"] == ["size_bytes", "accuracy"]
    assert "## Pareto front" in detail["note"]["body"]  # the study note: the front table
    trials = detail["trials"]
    assert len(trials) == 3 and all(t["state"] == "Complete" for t in trials)
    study = optuna.load_study(study_name="dash", storage=storage)
    for served, frozen in zip(trials, study.trials, strict=True):
        body = served["note"]["body"]
        result = frozen.user_attrs[RESULT_ATTR]
        for key in ("dense_metric", "compressed_metric", "recovered_metric"):
            assert f"{result[key]:.4f}" in body, (key, body)
        assert f"{result['size_bytes']:,} bytes" in body and "packed" in body and "dense" in body
        assert f"{100 * result['retained']:.1f} %" in body
        if frozen.number > 0:
            assert "`recovery.steps`" in body and "Timings" in body
        if CHECKPOINT_ATTR in frozen.user_attrs and frozen.number in {t.number for t in study.best_trials}:
            assert frozen.user_attrs[CHECKPOINT_ATTR] in body
    assert trials[0]["note"]["body"].startswith("## Trial 0: dense")


def test_trial_note_lists_plan_numbers_size_and_timings():
    from poft_autotune import QuantizeConfig, RecoveryConfig

    plan = TrialPlan((QuantizeConfig(bits=4, group_size=32),), RecoveryConfig(steps=7, lora_rank=8), seed=3)
    result = TrialResult(
        size_bytes=2048,
        size_breakdown={"total": 2048, "packed": 1024, "scales": 512, "sparse_meta": 0, "dense": 256, "header": 256},
        metric_name="accuracy",
        greater_is_better=True,
        dense_metric=0.9,
        compressed_metric=0.6,
        recovered_metric=0.84,
        recovery_steps=7,
        timings={"compress_s": 0.5, "recover_s": 3.25, "total_s": 4.0},
    )
    note = trial_note(plan, result, trial_number=5, checkpoint="/ckpt/trial-5")
    assert note.startswith("## Trial 5: int4-g32")
    for text in ("0.9000", "0.6000", "**0.8400**", "93.3 %", "80 %", "`quantize.bits` | 4", "`recovery.lora_rank` | 8"):
        assert text in note, text
    assert "| packed | 1,024 | 50.0 % |" in note and "recovery fine-tune | 3.2 s" in note
    assert "Checkpoint: `/ckpt/trial-5`" in note
    assert "not kept" in trial_note(plan, result)
    assert "leaves the front" in trial_note(plan, result, checkpoint="/c", keep_checkpoints="front")
