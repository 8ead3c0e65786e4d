"""Basis Sharing as in the paper: one shared basis per matrix type across a group of blocks
(MLP up/gate; attention Q/K/V), the output-side matrices per layer; on the attention too."""
import pytest
import torch
from conftest import make_model, small_recipe

import layershare
from layershare.compression.budget import count_params
from layershare.config import RecipeError
from layershare.methods import BasisSharingAttentionConfig, config_class


def test_one_basis_per_type_and_group(tokens):
    model = make_model("llama")  # 4 blocks, pairs: 2 groups x (gate, up) bases + 4 down projections
    layershare.compress(model, small_recipe(method="basis-sharing", ratio=0.2), data=tokens)
    bases = dict(model.layershare_bases.items())
    assert sorted(bases) == ["s0_g0_b0", "s0_g0_b1", "s0_g0_l2", "s0_g0_l5",  # l: the per-layer down projections
                             "s0_g1_b0", "s0_g1_b1", "s0_g1_l2", "s0_g1_l5"]
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.basis is model.model.layers[1].mlp.gate_proj.basis  # shared across the pair
    assert mlp.gate_proj.basis is not mlp.up_proj.basis  # each type its own basis
    assert model.model.layers[2].mlp.gate_proj.basis is not mlp.gate_proj.basis  # and per group


def test_joint_basis_option_shares_up_and_gate(tokens):
    model = make_model("llama")
    res = layershare.compress(model, small_recipe(method="basis-sharing", ratio=0.2, joint_basis=True),
                              data=tokens)
    assert abs(res.sizes.ratio - 0.2) < 0.01
    assert sorted(k for k in model.layershare_bases.keys() if "_b" in k) == ["s0_g0_b0", "s0_g1_b0"]
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.basis is mlp.up_proj.basis is model.model.layers[1].mlp.up_proj.basis


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_attention_full_rank_reproduces_dense_logits(arch, tokens, input_ids):
    model = make_model(arch)
    with torch.no_grad():
        dense = model(input_ids).logits
    layershare.compress(model, small_recipe(method="basis-sharing-attention",
                                            rank=model.config.hidden_size), data=tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_budget_and_round_trip(arch, tokens, input_ids, tmp_path):
    model = make_model(arch)
    total = count_params(model)
    res = layershare.compress(model, small_recipe(method="basis-sharing-attention", ratio=0.08),
                              data=tokens, output_dir=tmp_path / "c")
    assert abs(res.sizes.ratio - 0.08) < 0.01  # of the whole model (the attention holds 26% of it)
    assert count_params(model) == pytest.approx(total - res.plan.removed, abs=0.5)
    assert 0 < res.report.groups[0].stats.rel_err_before < 1  # the group's output error, measured
    with torch.no_grad():
        before = model(input_ids).logits
        after = layershare.load(tmp_path / "c", runtime="compact")(input_ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_paper_whole_method_mlp_plus_attention(tokens, input_ids, tmp_path):
    """basis-sharing on the MLPs with basis-sharing-attention as the attention stage (the paper's
    whole method), and FiPS with it: both ratios add up, and the result round-trips."""
    for method in ("basis-sharing", "fips"):
        model = make_model("llama")
        recipe = layershare.Recipe(stages=[BasisSharingAttentionConfig(ratio=0.05), config_class(method)(ratio=0.15)],
                                   nsamples=8, seqlen=32)
        res = layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / method)
        assert abs(res.sizes.ratio - 0.2) < 0.01
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "SharedBasisLinear"
        with torch.no_grad():
            torch.testing.assert_close(layershare.load(tmp_path / method, runtime="compact")(input_ids).logits,
                                       model(input_ids).logits, atol=0, rtol=0)


def test_attention_refuses_an_mlp_ratio():
    with pytest.raises(RecipeError, match="basis-sharing-attention: ratio_of must be 'model' or 'attention'"):
        small_recipe(method="basis-sharing-attention", ratio=0.2, ratio_of="mlp")
