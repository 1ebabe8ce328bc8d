"""Structured pruning: heads, FFN channels and blocks physically removed; the result reloads as is."""

import copy

import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from poft_autotune import InvalidConfigError, compress_
from poft_autotune.compression import select_layers
from poft_autotune.compression.base import get_quant
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.compression.structured import StructuredConfig
from poft_autotune.search.space import SearchSpace
from poft_autotune.size import checkpoint_size
from poft_autotune.testing import tiny_bert, tiny_llama

IDS = torch.randint(1, 60, (2, 10), generator=torch.Generator().manual_seed(0))
CALIBRATION = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _reloads_identically(model, auto_cls, tmp_path):
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = auto_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, expected)
    return reloaded


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_llama_gqa_shrinks_and_reloads(importance, tmp_path):
    model = tiny_llama(num_hidden_layers=3, num_key_value_heads=2)  # 4 query heads in 2 KV groups
    dense_params, dense_size = _params(model), checkpoint_size(model).total
    compress_(model, [StructuredConfig(heads=0.5, ffn=0.25, layers=1, importance=importance)], calibration=CALIBRATION)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert (config.intermediate_size, config.num_hidden_layers) == (48, 2)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    assert _params(model) < dense_params and checkpoint_size(model).total < dense_size
    reloaded = _reloads_identically(model, AutoModelForCausalLM, tmp_path)
    assert reloaded.config.num_key_value_heads == 1
    # the KV cache is indexed by the renumbered layer_idx
    cached = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(cached, model.generate(IDS[:1], max_new_tokens=4, do_sample=False, use_cache=False))


def test_removal_equals_zeroing_the_weakest_units():
    """Removing a head group, FFN channels and a block gives the dense model's output with those units zeroed
    (a Llama block whose output projections are zero is the identity on the residual stream)."""
    model = tiny_llama(num_hidden_layers=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 8:16] *= 1e-3  # head 1 is the weakest of 4
            layer.self_attn.q_proj.weight[8:16] *= 1e-3
            layer.mlp.down_proj.weight[:, :16] *= 1e-3  # channels 0..15 the weakest of 64
            layer.mlp.up_proj.weight[:16] *= 1e-3
        block = model.model.layers[1]
        block.self_attn.o_proj.weight *= 1e-3  # block 1 writes the least into the residual stream
        block.mlp.down_proj.weight *= 1e-3
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.o_proj.weight[:, 8:16] = 0
            layer.mlp.down_proj.weight[:, :16] = 0
        reference.model.layers[1].self_attn.o_proj.weight.zero_()
        reference.model.layers[1].mlp.down_proj.weight.zero_()
        expected = reference(IDS).logits
    compress_(model, [StructuredConfig(heads=0.25, ffn=0.25, layers=1)])
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 3
    with torch.no_grad():
        assert torch.allclose(model.eval()(IDS).logits, expected, atol=1e-5)


def test_activation_importance_drops_the_identity_block():
    model = tiny_llama(num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
        expected = model.eval()(IDS).logits
    compress_(model, [StructuredConfig(layers=1, importance="activation")], calibration=CALIBRATION)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-6)


def test_bert_ffn_and_layers_reload(tmp_path):
    model = tiny_bert(num_hidden_layers=3)
    compress_(model, [StructuredConfig(ffn=0.5, layers=1)])
    assert (model.config.intermediate_size, model.config.num_hidden_layers) == (32, 2)
    assert len(model.bert.encoder.layer) == 2
    assert [b.attention.self.layer_idx for b in model.bert.encoder.layer] == [0, 1]
    _reloads_identically(model, AutoModelForSequenceClassification, tmp_path)


def test_bert_heads_rejected_with_reason():
    with pytest.raises(InvalidConfigError, match="`heads` must be 0 for model type 'bert'"):
        compress_(tiny_bert(), [StructuredConfig(heads=0.25)])


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2)
    )
    with pytest.raises(InvalidConfigError, match=r"supported model types: \['bert', 'llama'\]"):
        compress_(model, [StructuredConfig(ffn=0.5)])


@pytest.mark.parametrize(
    "config,match",
    [
        (StructuredConfig(heads=0.8), "`heads` must leave at least one KV group"),
        (StructuredConfig(ffn=0.999), "`ffn` must leave at least one FFN channel"),
        (StructuredConfig(layers=2), "`layers` must leave at least one block"),
    ],
)
def test_fractions_checked_before_any_change(config, match):
    model = tiny_llama(num_key_value_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match=match):
        compress_(model, [config])
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "configs,match",
    [
        ([PruneConfig(sparsity=0.5), StructuredConfig(ffn=0.5)], "must come first"),
        # down_proj has 64 inputs now (64 % 64 == 0) but 32 after structured pruning: checked on planned shapes
        ([StructuredConfig(ffn=0.5), NMConfig(n=2, m=64)], "`m` must divide"),
        ([StructuredConfig(ffn=0.5), QuantizeConfig(bits=4, group_size=64)], "`group_size` must divide"),
    ],
)
def test_plan_order_and_later_configs_checked_against_new_shapes(configs, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match=match):
        compress_(model, configs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_structured_then_quantize_and_prune():
    model = tiny_llama(num_hidden_layers=3)
    compress_(
        model,
        [StructuredConfig(heads=0.5, ffn=0.5, layers=1), PruneConfig(sparsity=0.5), QuantizeConfig(group_size=16)],
    )
    layers = select_layers(model, None)
    assert len(layers) == 2 * 7 and all(get_quant(layer) is not None for layer in layers.values())
    assert torch.isfinite(model(IDS).logits).all()


def test_config_validation_and_suggest():
    with pytest.raises(InvalidConfigError, match="`targets` must be None"):
        StructuredConfig(ffn=0.5, targets=("mlp",))
    params = {"structured.heads": 0.25, "structured.ffn": 0.5, "structured.layers": 1}
    params["structured.importance"] = "activation"
    config = StructuredConfig.suggest(optuna.trial.FixedTrial(params), {"layers": (0, 1)})
    assert config == StructuredConfig(heads=0.25, ffn=0.5, layers=1, importance="activation")
    assert config.short() == "struct-h25-f50-l1-act" and config.needs_calibration
    bert = SearchSpace(methods=("structured",)).fitted_to(tiny_bert()).choices["structured"]
    assert bert["heads"] == (0.0, 0.0) and bert["layers"] == (0, 0)
