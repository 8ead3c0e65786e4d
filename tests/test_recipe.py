"""Recipes: typed stage configs, YAML and saved-directory round trips, version-1 (flat) recipes,
and the errors for what cannot be run."""
import dataclasses
import json
import re
import types
import typing

import pytest
from conftest import make_model, small_recipe

import layershare
from layershare import Recipe
from layershare.config import RecipeError
from layershare.methods import (
    METHODS,
    FFNMergeConfig,
    FiPSConfig,
    MASAConfig,
    SVDConfig,
    SVDLLMConfig,
    config_class,
    config_from_dict,
)

NAMES = sorted(METHODS)
# a ratio of the whole model each method reaches on the tiny llama (checked in the test with layershare.plan)
SAVE_RATIO = {"ffn-merge": 0.16,  # 2 of the 4 tiny MLPs: 16.25%
              "masa": 0.2, "basis-sharing-attention": 0.2}


def int_fields(cls) -> list[str]:
    """The fields annotated int (or int | None)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is int or (typing.get_origin(tp) in (typing.Union, types.UnionType) and int in typing.get_args(tp)):
            out.append(f.name)
    return out


# ---- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_default_config_round_trips_through_yaml(name, tmp_path):
    cfg = config_class(name)()
    recipe = Recipe(stages=[cfg])
    recipe.to_yaml(tmp_path / "r.yaml")
    back = Recipe.from_yaml(tmp_path / "r.yaml")
    assert back.to_dict() == recipe.to_dict()
    assert type(back.stages[0]) is type(cfg) and back.stages[0] == cfg
    assert back == recipe


@pytest.mark.parametrize("name", [n for n in NAMES if n != "quant"])  # quant has no list-valued field
def test_non_default_lists_round_trip_through_yaml(name, tmp_path):
    """List-valued fields (explicit groups, ffn-merge's window) survive YAML as lists of ints."""
    cls = config_class(name)
    fields = {}
    if "groups" in cls.field_names():
        fields["groups"] = [[0, 1], [2, 3]]
    if "window" in cls.field_names():
        fields["window"] = [1, 2]
    assert fields, f"{name} has neither groups nor window"
    recipe = Recipe(stages=[cls(**fields)], nsamples=3, seqlen=17, seed=5, dtype="bfloat16")
    recipe.to_yaml(tmp_path / "r.yaml")
    back = Recipe.from_yaml(tmp_path / "r.yaml")
    assert back.to_dict() == recipe.to_dict()
    for k, v in fields.items():
        assert getattr(back.stages[0], k) == v
    assert (back.nsamples, back.seqlen, back.seed, back.dtype) == (3, 17, 5, "bfloat16")


@pytest.mark.parametrize("name", NAMES)
def test_recipe_round_trips_through_a_saved_directory(name, tokens, tmp_path):
    recipe = small_recipe(method=name, ratio=SAVE_RATIO.get(name, 0.2))
    model = make_model("llama")
    stages = layershare.plan(model, recipe)  # feasible on the tiny model (raises BudgetError otherwise)
    assert 0 < stages[0].plan.model_ratio < 1 or name == "quant"  # quantization removes no parameter
    res = layershare.compress(model, recipe, data=tokens, output_dir=tmp_path / "c")
    assert res.output_dir == tmp_path / "c"
    assert Recipe.from_yaml(tmp_path / "c" / "recipe.yaml").to_dict() == recipe.to_dict()
    meta = json.loads((tmp_path / "c" / "layershare.json").read_text())
    assert meta["recipe"] == recipe.to_dict()
    assert Recipe.from_dict(meta["recipe"]) == recipe


# ---- unknown keys and wrong types ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_is_refused(name):
    with pytest.raises(RecipeError) as e:
        config_from_dict({"method": name, "updaet": True})
    assert name in str(e.value) and "updaet" in str(e.value)
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"version": 2, "stages": [{"method": name, "updaet": True}]})
    msg = str(e.value)
    assert msg.startswith("stage 1") and name in msg and "updaet" in msg
    with pytest.raises(RecipeError) as e:
        Recipe.of(name, updaet=True)
    assert str(e.value).startswith("stage 1") and "updaet" in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_types_are_refused(name):
    with pytest.raises(RecipeError) as e:
        config_from_dict({"method": name, "ratio": "0.2"})
    assert name in str(e.value) and "ratio" in str(e.value)
    ints = int_fields(config_class(name))
    assert ints, f"{name} has no int field"
    for field in ints:
        for value in (2.5, True):
            with pytest.raises(RecipeError) as e:
                config_from_dict({"method": name, field: value})
            msg = str(e.value)
            assert name in msg and re.search(rf"\b{field}\b", msg), msg
        with pytest.raises(RecipeError) as e:
            Recipe.from_dict({"version": 2, "stages": [{"method": name, field: 2.5}]})
        assert str(e.value).startswith("stage 1") and field in str(e.value)


def test_an_int_is_accepted_where_a_float_belongs():
    cfg = config_from_dict({"method": "fips", "steps": 3, "lr": 1})
    assert cfg.steps == 3 and cfg.lr == 1.0 and type(cfg.lr) is float
    cfg = config_from_dict({"method": "masa", "group_size": None})
    assert isinstance(cfg, MASAConfig) and cfg.group_size is None


def test_run_field_types_are_checked():
    with pytest.raises(RecipeError, match="nsamples"):
        Recipe(nsamples=2.5)
    with pytest.raises(RecipeError, match="seed"):
        Recipe(seed=True)
    with pytest.raises(RecipeError, match="dtype"):
        Recipe(dtype="float64")


# ---- version-1 (flat) recipes --------------------------------------------------------------

def test_v1_flat_recipe_with_attention_loads_as_two_stages():
    flat = {"method": "svd-llm", "ratio": 0.2, "sparsity": 0.5, "steps": 200, "extra": {"update": True},
            "attention": {"method": "masa", "ratio": 0.5, "ratio_of": "attention"}}
    r = Recipe.from_dict(flat)
    assert r.stages == [MASAConfig(ratio=0.5, ratio_of="attention"), SVDLLMConfig(update=True, ratio=0.2)]
    assert [type(s) for s in r.stages] == [MASAConfig, SVDLLMConfig]
    assert r.version == 2 and r.method == "masa+svd-llm"
    # converted once, it is a version-2 recipe that round-trips as itself
    assert Recipe.from_dict(r.to_dict()) == r


def test_v1_recipe_as_saved_before_with_every_key():
    """A flat recipe with every key version 1 wrote: the method's own fields kept (group_size 1 for
    svd-llm), FiPS's fields dropped, the run fields on the recipe; masa ignored the flat group_size."""
    flat = {"method": "svd-llm", "ratio": 0.3, "ratio_of": "model", "group_size": 1, "groups": None,
            "sparsity": 0.5, "schedule": "gradual", "prune_every": 10, "prune_end": 0.75,
            "prune_score": "activation", "steps": 200, "init": "whitened", "lr": 0.001, "weight_decay": 0.0,
            "batch_tokens": 1024, "loss": "mse", "objective": "auto", "nsamples": 16, "seqlen": 64,
            "propagate": "compressed", "dtype": "bfloat16", "device": "cpu", "seed": 3, "extra": {},
            "attention": {"method": "masa", "ratio": 0.5, "ratio_of": "attention"}}
    r = Recipe.from_dict(flat)
    assert r.stages == [MASAConfig(ratio=0.5, ratio_of="attention"),
                        SVDLLMConfig(ratio=0.3, group_size=1, propagate="compressed")]
    assert (r.nsamples, r.seqlen, r.dtype, r.device, r.seed) == (16, 64, "bfloat16", "cpu", 3)


def test_v1_masa_ignores_the_flat_group_size():
    r = Recipe.from_dict({"method": "masa", "ratio": 0.2, "group_size": 2, "extra": {}})
    assert r.stages == [MASAConfig(ratio=0.2, group_size=None)]
    assert r.stages[0].group_size is None
    # where masa read it (extra), it is kept
    r = Recipe.from_dict({"method": "masa", "ratio": 0.2, "group_size": 4, "extra": {"group_size": 2}})
    assert r.stages[0].group_size == 2


def test_v1_unknown_extra_key_is_refused():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"method": "svd-llm", "ratio": 0.2, "extra": {"updaet": True}})
    assert "updaet" in str(e.value) and "svd-llm" in str(e.value)


def test_v1_unknown_top_level_key_is_refused():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"method": "fips", "ratio": 0.2, "updaet": True})
    assert "updaet" in str(e.value)


def test_v2_unknown_top_level_key_is_refused():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"version": 2, "stages": [{"method": "fips"}], "nsample": 8})
    assert "nsample" in str(e.value)


# ---- whole-recipe checks -------------------------------------------------------------------

def test_two_stages_on_the_same_part_are_refused():
    with pytest.raises(RecipeError) as e:
        Recipe(stages=[FiPSConfig(), SVDConfig()])
    msg = str(e.value)
    assert "stage 1 (fips)" in msg and "stage 2 (svd)" in msg, msg
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"version": 2, "stages": [{"method": "masa"}, {"method": "ffn-merge"},
                                                   {"method": "basis-sharing-attention"}]})
    msg = str(e.value)
    assert "stage 1 (masa)" in msg and "stage 3 (basis-sharing-attention)" in msg, msg
    # one on each part is fine, in either order
    assert Recipe(stages=[FFNMergeConfig(), MASAConfig()]).method == "ffn-merge+masa"


def test_unsupported_version_is_refused():
    with pytest.raises(RecipeError, match="version 99"):
        Recipe.from_dict({"version": 99, "stages": [{"method": "fips"}]})
    with pytest.raises(RecipeError, match="version 99"):
        Recipe(version=99)


def test_recipe_of_puts_run_fields_on_the_recipe():
    r = Recipe.of("fips", ratio=0.3, steps=7, nsamples=12, seqlen=40, seed=2)
    assert (r.nsamples, r.seqlen, r.seed) == (12, 40, 2)
    assert r.stages == [FiPSConfig(ratio=0.3, steps=7)]
    assert not {"nsamples", "seqlen", "seed"} & set(r.stages[0].to_dict())
    assert r.to_dict()["nsamples"] == 12
