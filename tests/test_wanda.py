"""Wanda pruning (|W_ij| * ||X_j||_2 over calibration tokens) and the calibration plumbing."""

import optuna
import pytest
import torch

from poft_autotune import InvalidConfigError, compress_
from poft_autotune.compression import select_layers
from poft_autotune.compression.base import get_mask, input_norms
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.data import CAUSAL_LM, PadCollator, resolve_metric
from poft_autotune.search.objective import TrialContext, calibration_batches, run_trial
from poft_autotune.search.space import RecoveryConfig, SearchSpace, TrialPlan, suggest_plan
from poft_autotune.testing import lm_dataset, tiny_llama, tiny_training_args

Q = "model.layers.0.self_attn.q_proj"


def _batch(rows: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _captured_norms(model, name, batches):
    """Reference: the L2 norm of each input feature of ``name`` over all tokens, by a plain hook."""
    inputs = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).norm(dim=0)


def test_huge_input_channel_keeps_its_small_weights():
    """Channel 5 of q_proj's input is ~1000x the rest, its weights ~100x smaller than typical:
    magnitude pruning removes the whole column, Wanda keeps it in every row."""
    results = {}
    for criterion in ("magnitude", "wanda"):
        model = tiny_llama()
        layer = model.model.layers[0]
        with torch.no_grad():
            layer.input_layernorm.weight[5] = 1000.0  # q/k/v_proj see a huge channel 5
            layer.self_attn.q_proj.weight[:, 5] = 1e-4
        compress_(model, [PruneConfig(sparsity=0.5, criterion=criterion)], calibration=[_batch()])
        results[criterion] = get_mask(layer.self_attn.q_proj)[:, 5]
    assert not results["magnitude"].any()
    assert results["wanda"].all()


def test_mask_matches_reference_scores_and_per_row_sparsity_is_exact():
    model = tiny_llama()
    batches = [_batch(seed=0), _batch(rows=2, length=7, seed=1)]
    weights = {n: layer.weight.detach().clone() for n, layer in select_layers(model, None).items()}
    norms = {n: _captured_norms(model, n, batches) for n in (Q, "model.layers.1.mlp.down_proj")}
    compress_(model, [PruneConfig(sparsity=0.3, criterion="wanda")], calibration=batches)
    for name, layer in select_layers(model, None).items():
        mask = get_mask(layer)
        assert torch.all((~mask).sum(1) == round(0.3 * layer.in_features)), name  # every row, exactly
    for name, norm in norms.items():
        score = weights[name].abs() * norm
        mask = get_mask(dict(model.named_modules())[name])
        # within each row, every pruned score is <= every kept score
        pruned_max = torch.where(mask, -torch.inf, score).amax(1)
        kept_min = torch.where(mask, score, torch.inf).amin(1)
        assert torch.all(pruned_max <= kept_min), name


def test_padding_is_ignored():
    """A right-padded batch gives the same norms (and masks) as its rows without the padding."""
    a, b = torch.randint(1, 64, (12,)), torch.randint(1, 64, (6,))
    padded = {"input_ids": torch.stack([a, torch.cat([b, torch.full((6,), 7)])]), "attention_mask": torch.ones(2, 12)}
    padded["attention_mask"][1, 6:] = 0
    unpadded = [
        {"input_ids": a[None], "attention_mask": torch.ones(1, 12)},
        {"input_ids": b[None], "attention_mask": torch.ones(1, 6)},
    ]
    model = tiny_llama()
    layers = select_layers(model, None)
    with_pad = input_norms(model, layers, [padded])
    without = input_norms(model, layers, unpadded)
    assert all(torch.allclose(with_pad[n], without[n], rtol=1e-5) for n in layers)
    padded_counted = input_norms(model, layers, [{**padded, "attention_mask": torch.ones(2, 12)}])
    assert not torch.allclose(padded_counted[Q], without[Q], rtol=1e-3)  # the test can tell the difference
    masks = []
    for calibration in ([padded], unpadded):
        m = tiny_llama()
        compress_(m, [NMConfig(n=2, m=4, criterion="wanda")], calibration=calibration)
        masks.append(get_mask(dict(m.named_modules())[Q]))
    assert torch.equal(*masks)


def test_nm_wanda_ranks_within_groups():
    model = tiny_llama()
    batches = [_batch()]
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    norm = _captured_norms(model, Q, batches)
    compress_(model, [NMConfig(n=2, m=4, criterion="wanda")], calibration=batches)
    mask = get_mask(model.model.layers[0].self_attn.q_proj).reshape(32, -1, 4)
    assert torch.all(mask.sum(-1) == 2)
    expected = (weight.abs() * norm).reshape(32, -1, 4).topk(2, dim=-1).indices
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, expected, True))


def test_wanda_without_calibration_is_rejected_before_any_change():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match="needs calibration batches.*calibration="):
        compress_(model, [PruneConfig(sparsity=0.5), NMConfig(criterion="wanda")])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InvalidConfigError, match="`scope` must be 'layer'"):
        PruneConfig(criterion="wanda", scope="global")


def test_calibration_batches_are_deterministic_and_unlabelled():
    data = lm_dataset(40)
    collator = PadCollator(0, CAUSAL_LM)
    first = calibration_batches(data, collator, n_batches=3, batch_size=8)
    again = calibration_batches(data, collator, n_batches=3, batch_size=8)
    assert len(first) == 3 and all("labels" not in b for b in first)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again, strict=True))
    assert len(calibration_batches(data, collator, n_batches=100, batch_size=8)) == 5  # capped by the data


def test_run_trial_passes_calibration(tmp_path):
    model = tiny_llama()
    data = lm_dataset(32)
    context = TrialContext(
        model,
        data,
        data,
        resolve_metric(None, CAUSAL_LM),
        PadCollator(0, CAUSAL_LM),
        tiny_training_args(str(tmp_path)),
        dense_metric=1.0,
        calibration_batches=2,
    )
    plan = TrialPlan(compression=(PruneConfig(sparsity=0.5, criterion="wanda"),), recovery=RecoveryConfig(steps=0))
    result = run_trial(plan, context)
    assert result.size_bytes > 0 and result.compressed_metric > 0


def test_suggest_criterion_names_and_replay():
    space = SearchSpace(methods=("prune", "nm")).fitted_to(tiny_llama())
    params = {"method": "prune", "prune.sparsity": 0.4, "prune.criterion": "wanda", "recovery.steps": 20}
    params |= {
        "recovery.learning_rate": 1e-4,
        "recovery.distill_weight": 0.0,
        "recovery.temperature": 2.0,
        "recovery.lora_rank": 0,
    }
    plan = suggest_plan(optuna.trial.FixedTrial(params), space)
    assert plan.compression == (PruneConfig(sparsity=0.4, criterion="wanda"),)
    params |= {"method": "nm", "nm.pattern": "2:4", "nm.criterion": "wanda"}
    assert suggest_plan(optuna.trial.FixedTrial(params), space).compression == (NMConfig(criterion="wanda"),)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names = set()
    for _ in range(12):
        trial = study.ask()
        suggest_plan(trial, space)
        names |= set(trial.params)
    assert {"prune.criterion", "nm.criterion"} <= names
