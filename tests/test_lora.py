"""LoRA recovery on a compressed base: adapters train, the merge is re-compressed, nothing is lost."""

import json

import pytest
import torch

from poft_autotune import NMConfig, QuantizeConfig, compress_
from poft_autotune.compression.base import get_mask, get_quant, select_layers
from poft_autotune.data import CAUSAL_LM, PadCollator, evaluate_model
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer
from poft_autotune.recovery.lora import attach_lora, merge_lora_
from poft_autotune.testing import lm_dataset, tiny_llama, tiny_training_args


@pytest.mark.parametrize(
    "configs",
    [[QuantizeConfig(bits=4, group_size=16)], [NMConfig(n=2, m=4), QuantizeConfig(bits=8, group_size=None)]],
    ids=["int4", "2:4+int8"],
)
def test_lora_trains_merges_and_recompresses(configs, tmp_path):
    model = tiny_llama()
    compress_(model, configs)
    layers = select_layers(model, None)  # the same module objects become peft's base_layer, then come back
    frozen = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    peft_model = attach_lora(model, CAUSAL_LM, rank=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    args = tiny_training_args(str(tmp_path), max_steps=10, learning_rate=1e-2)
    RecoveryTrainer(
        model=peft_model,
        args=args,
        train_dataset=lm_dataset(64),
        data_collator=PadCollator(0, CAUSAL_LM),
        callbacks=[CompressionCallback(peft_model)],
    ).train()
    # The compressed base did not move while the adapters trained.
    for name, layer in layers.items():
        assert torch.equal(layer.weight, frozen[name]), name
    ids = torch.arange(1, 17)[None]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = merge_lora_(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    changed = False
    assert select_layers(merged, None) == layers
    for name, layer in layers.items():
        grid, mask = get_quant(layer), get_mask(layer)
        q, scale, zero = grid.quantize(layer.weight)
        on_grid = grid.dequantize(q, scale, zero, layer.weight.dtype)
        assert torch.equal(layer.weight, on_grid), f"{name} is off its grid after the merge"
        if mask is not None:
            assert torch.count_nonzero(layer.weight[~mask]) == 0, name
        changed |= not torch.equal(layer.weight, frozen[name])
    assert changed, "the merge did not change any weight"
    with torch.no_grad():
        shipped = merged(input_ids=ids).logits
    # Re-quantization moves the merged model only slightly away from the adapted one.
    assert torch.allclose(shipped, adapted, atol=0.5)


def test_lora_rank_must_be_positive():
    from poft_autotune import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="`recovery.lora_rank`"):
        attach_lora(tiny_llama(), CAUSAL_LM, rank=0)


def _lm_context(tmp_path, model):
    from poft_autotune.data import prepare_dataset, resolve_metric
    from poft_autotune.search.objective import TrialContext

    train, evaluation = prepare_dataset(lm_dataset(32), CAUSAL_LM), prepare_dataset(lm_dataset(16, seed=1), CAUSAL_LM)
    metric = resolve_metric(None, CAUSAL_LM)
    collator = PadCollator(0, CAUSAL_LM)
    dense = evaluate_model(model, evaluation, metric, collator)
    return TrialContext(model, train, evaluation, metric, collator, tiny_training_args(str(tmp_path)), dense)


def test_unmerged_lora_ships_base_plus_adapter(tmp_path):
    """lora_merge=False: the trial evaluates compressed base + adapter, sizes both files, reloads both."""
    from safetensors import safe_open

    from poft_autotune import InvalidConfigError, RecoveryConfig, TrialPlan, load_pretrained, run_trial
    from poft_autotune.export import weight_bytes

    context = _lm_context(tmp_path, tiny_llama())
    quant = (QuantizeConfig(bits=4, group_size=16),)
    recovery = {"steps": 6, "learning_rate": 1e-2, "lora_rank": 4}
    merged = run_trial(TrialPlan(quant, RecoveryConfig(**recovery)), context, tmp_path / "merged")
    plan = TrialPlan(quant, RecoveryConfig(**recovery, lora_merge=False))
    result = run_trial(plan, context, tmp_path / "unmerged")
    out = tmp_path / "unmerged"
    adapter_file = out / "adapter" / "adapter_model.safetensors"
    assert (out / "adapter" / "adapter_config.json").is_file() and adapter_file.is_file()
    assert not (out / "adapter_config.json").exists()  # a plain from_pretrained of the base must not see it
    # Size: the base as for the merged trial plus the adapter file, byte for byte.
    assert result.size_breakdown["adapter"] == adapter_file.stat().st_size
    assert result.size_bytes == weight_bytes(out) == merged.size_bytes + adapter_file.stat().st_size
    with safe_open(str(adapter_file), "pt") as f:
        names = list(f.keys())
        assert names and all("lora_" in n for n in names)
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)  # full precision
    # The evaluated model is the shipped pair, and it is what training produced (no merge happened).
    assert result.unmerged_metric == result.recovered_metric
    assert result.recovered_metric == pytest.approx(merged.unmerged_metric, rel=1e-5)
    assert result.recovered_metric != result.compressed_metric
    # Reload: base + adapter reproduce the trial's metric; the base alone does not.
    reloaded = load_pretrained(out)
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    again = evaluate_model(reloaded, context.eval_dataset, context.metric, context.collator)
    assert again == pytest.approx(result.recovered_metric, rel=1e-5)
    with reloaded.disable_adapter():
        base_only = evaluate_model(reloaded, context.eval_dataset, context.metric, context.collator)
    assert base_only != pytest.approx(result.recovered_metric, rel=1e-5)
    recipe = json.loads((out / "poft_recipe.json").read_text())
    assert recipe["recipe"]["plan"]["recovery"]["lora_merge"] is False
    # Safetensors only, for the adapter as for the base: no silent fallback to a pickled adapter.
    adapter_file.unlink()
    with pytest.raises(InvalidConfigError, match="adapter_model.safetensors"):
        load_pretrained(out)


def test_lora_merge_is_validated_and_searchable():
    import optuna

    from poft_autotune import InvalidConfigError, RecoveryConfig, SearchSpace
    from poft_autotune.search.space import suggest_plan

    with pytest.raises(InvalidConfigError, match="`recovery.lora_merge`.*got 'no'"):
        RecoveryConfig(lora_merge="no")
    with pytest.raises(InvalidConfigError, match="`lora_merge` must list True and/or False"):
        SearchSpace(lora_merge=())
    assert "recovery.lora_merge" not in _params(SearchSpace(lora_rank=(8,)))  # default: always merged
    params = _params(SearchSpace(lora_rank=(8,), lora_merge=(True, False)), n=12)
    assert {p["recovery.lora_merge"] for p in params["all"]} == {True, False}
    # Replayable from the stored params, like every other choice.
    for p in params["all"]:
        plan = suggest_plan(optuna.trial.FixedTrial(p), SearchSpace(lora_rank=(8,), lora_merge=(True, False)))
        assert plan.recovery.lora_merge is p["recovery.lora_merge"]
    assert "recovery.lora_merge" not in _params(SearchSpace(lora_rank=(0,), lora_merge=(True, False)))


def _params(space, n=1):
    import optuna

    from poft_autotune.search.space import suggest_plan

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        suggest_plan(trial, space)
        study.tell(trial, 0.0)
    params = [t.params for t in study.trials]
    return {**params[0], "all": params}


def test_study_file_can_let_the_search_choose_lora_merge(tmp_path):
    from poft_autotune import InvalidConfigError
    from poft_autotune.study_config import parse_study_config

    for name in ("t.csv", "e.csv"):
        (tmp_path / name).write_text("text,label\na,0\n")
    definition = {"model": "m", "data": {"train": "t.csv", "eval": "e.csv"}, "space": {"lora_merge": [True, False]}}
    assert parse_study_config(definition, base_dir=tmp_path).space.lora_merge == (True, False)
    with pytest.raises(InvalidConfigError, match="space.lora_merge"):
        parse_study_config({**definition, "space": {"lora_merge": ["no"]}}, base_dir=tmp_path)
