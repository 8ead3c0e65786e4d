"""A compressed directory is verified before it is trusted (checkpoint.py, io.load_compressed)."""
import json
import random
import resource

import pytest
import torch
from conftest import make_model, small_recipe
from safetensors.torch import load_file, save_file

import layershare
from layershare.checkpoint.verify import CheckpointError
from layershare.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import VOCAB

    tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("ck") / "c"
    layershare.compress(make_model("llama"), small_recipe(ratio=0.2, steps=3, lr=1e-3), data=tokens, output_dir=out)
    return out


def _copy(saved, tmp_path, name="d"):
    import shutil

    dst = tmp_path / name
    shutil.copytree(saved, dst)
    return dst


def _edit_entry(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["layershare"])
    (path / "config.json").write_text(json.dumps(cfg))


def _record_size(d, meta):
    """layershare.json told the new size of a rewritten weights file (the structure is what is tested)."""
    size = (d / "model.safetensors").stat().st_size
    meta["weights_bytes"] = meta["weights_files"]["model.safetensors"]["bytes"] = size
    (d / "layershare.json").write_text(json.dumps(meta))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_hashes_are_recorded_and_checked(saved, tmp_path, input_ids):
    meta = json.loads((saved / "layershare.json").read_text())
    assert len(meta["weights_files"]["model.safetensors"]["sha256"]) == 64 and len(meta["entry_sha256"]) == 64
    d = _copy(saved, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-400:] = bytes(400)  # 400 bytes overwritten in place: same size
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256.*--no-verify"):
        layershare.load(d)
    assert main(["info", str(d)]) == 2  # info runs the same checks (exit 2, one error line)
    try:  # the user's call: the hash is skipped, the structure still checked
        layershare.load(d, verify=False, runtime="compact")
    except CheckpointError as e:
        assert "bitmask" in str(e) or "values" in str(e)
    e = _copy(saved, tmp_path, "e")
    _edit_entry(e, lambda en: en.update(dtype="float16"))
    with pytest.raises(CheckpointError, match="config.json does not match the hash"):
        layershare.load(e)
    meta = json.loads((e / "layershare.json").read_text())  # a directory saved before config.json was hashed
    (e / "layershare.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config_sha256"}))
    with pytest.raises(CheckpointError, match="layershare entry does not match the hash"):
        layershare.load(e)


@pytest.mark.parametrize("edit,message", [
    (lambda en: en.update(format_version=99), "format_version: 99 is not a format this version reads"),
    (lambda en: en.update({"class": "pipeline"}), "layershare.class: 'pipeline' is not a model class"),
    (lambda en: en["bases"].update({k: [100000, 100000] for k in list(en["bases"])[:1]}),
     "differs from its basis's 100000|declares \\[100000, 100000\\]"),
    (lambda en: en["bases"].update({k: [100000, v[1]] for k, v in list(en["bases"].items())[:1]}),
     "but config.json declares \\[100000, "),
    (lambda en: en["bases"].update({k: "big" for k in list(en["bases"])[:1]}), "must be a list of 2 positive integers"),
    (lambda en: en["layers"].update({"config.name_or_path": next(iter(en["layers"].values()))}),
     "'config.name_or_path', which is not a module of the model|lack 'config.name_or_path.V_values'"),
    (lambda en: en["layers"].update({"model.layers.0.input_layernorm": next(iter(en["layers"].values()))}),
     "a LlamaRMSNorm, as a compressed linear|lack 'model.layers.0.input_layernorm.V_values'"),
    (lambda en: en.update(tied={"model.layers.1.mlp": "model.layers.0.mlp"}), "has tensors of its own"),
    (lambda en: next(iter(en["layers"].values())).update(role="sideways"), "role: must be 'in' or 'out'"),
    (lambda en: next(iter(en["layers"].values())).update(sparse="yes"), "sparse: must be true or false"),
    (lambda en: next(iter(en["layers"].values())).pop("v_shape"), "must hold exactly"),
])
def test_a_malformed_entry_is_refused_before_any_allocation(saved, tmp_path, edit, message):
    d = _copy(saved, tmp_path)
    _edit_entry(d, edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message):
        layershare.load(d, verify=False)  # the schema and shapes, without the hash that would catch it first
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing big allocated
    with pytest.raises(CheckpointError):
        layershare.load(d)


def test_a_missing_or_extra_tensor_is_refused(saved, tmp_path):
    for name, change in (("missing", lambda sd: sd.pop(next(k for k in sd if k.endswith("V_values")))),
                         ("extra", lambda sd: sd.update(stray=torch.zeros(3)))):
        d = _copy(saved, tmp_path, name)
        sd = load_file(str(d / "model.safetensors"))
        change(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        meta = json.loads((d / "layershare.json").read_text())
        _record_size(d, meta)
        with pytest.raises(CheckpointError, match="lack|unexpected tensors"):
            layershare.load(d, verify=False)


def test_a_compressed_directory_is_not_taken_for_a_dense_model(saved):
    with pytest.raises(ValueError, match="is a layershare compressed directory, not a dense model"):
        layershare.load_model(str(saved))


def test_fuzz_every_edit_loads_identically_or_raises(saved, tmp_path, input_ids):
    """Random single-field edits of the entry and byte flips of the weights, seeded."""
    rng = random.Random(0)
    ref = _logits(layershare.load(saved, runtime="compact"), input_ids)
    values = [0, -1, 1, 10 ** 9, 2.5, True, False, None, "x", "in", [], [1], [4, 4], {}, {"atoms": [1, 1, 1]}]
    size = (saved / "model.safetensors").stat().st_size
    outcomes = {"same": 0, "error": 0}
    for case in range(200):
        d = tmp_path / f"f{case}"
        import shutil

        shutil.copytree(saved, d)
        if case % 2:
            data = bytearray((d / "model.safetensors").read_bytes())
            data[rng.randrange(size)] ^= 1 << rng.randrange(8)
            (d / "model.safetensors").write_bytes(bytes(data))
        else:
            def edit(en):
                target = en
                key = rng.choice(list(target))
                while isinstance(target[key], dict) and target[key] and rng.random() < 0.7:
                    target = target[key]
                    key = rng.choice(list(target))
                target[key] = rng.choice(values)
            _edit_entry(d, edit)
        try:
            out = _logits(layershare.load(d, runtime="compact"), input_ids)
        except CheckpointError:
            outcomes["error"] += 1
        else:
            assert torch.equal(out, ref), f"case {case} loaded a different model"
            outcomes["same"] += 1
        shutil.rmtree(d)
    assert outcomes["error"] > 150


def test_same_inputs_and_seed_give_byte_identical_files(tokens, tmp_path):
    for name in ("a", "b"):
        layershare.compress(make_model("llama"), small_recipe(ratio=0.2, steps=3, lr=1e-3), data=tokens,
                            output_dir=tmp_path / name)
    for f in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_a_layer_path_must_name_a_linear_of_the_model(saved, tmp_path):
    """The entry and the file agree (a consistent rename), but the path is no linear of the model."""
    for new, message in (("config.name_or_path", "which is not a module of the model"),
                         ("model.layers.0.input_layernorm", "a LlamaRMSNorm, as a compressed linear")):
        d = _copy(saved, tmp_path, new)
        old = next(iter(json.loads((d / "config.json").read_text())["layershare"]["layers"]))
        _edit_entry(d, lambda en: en.update(layers={**{k: v for k, v in en["layers"].items() if k != old},
                                                     new: en["layers"][old]},
                                             guard=en["guard"].replace(old + ".", new + ".")))
        sd = {(new + k[len(old):] if k.startswith(old + ".") else k): v
              for k, v in load_file(str(d / "model.safetensors")).items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        meta = json.loads((d / "layershare.json").read_text())
        _record_size(d, meta)
        with pytest.raises(CheckpointError, match=message):
            layershare.load(d, verify=False)


HOSTILE_LOAD = """
import resource, sys
import layershare, layershare.api, layershare.checkpoint.read, transformers
from transformers import LlamaForCausalLM
from layershare.checkpoint.verify import CheckpointError
vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more address space
try:
    layershare.load(sys.argv[1], verify=False)
except CheckpointError as e:
    print("refused:", e)
    sys.exit(0)
sys.exit(3)
"""


def _consistent_rank(rank):
    """Every shape of the entry agrees with a basis of `rank`: only the weights file's header can
    tell that the entry lies."""
    def edit(en):
        key = next(iter(en["bases"]))
        en["bases"][key] = [en["bases"][key][0], rank]
        for layer in en["layers"].values():
            if layer["basis"] == key:
                layer["v_shape"] = [rank, layer["v_shape"][1]]
    return edit


@pytest.mark.parametrize("edit", [
    lambda en: en["bases"].update({k: [100000, 100000] for k in list(en["bases"])[:1]}),
    _consistent_rank(10 ** 7),
])
def test_declared_shapes_are_refused_under_a_memory_limit(saved, tmp_path, edit):
    """A config edited to declare a 40 GB basis (alone, or with every shape made consistent with
    it) fails fast with CheckpointError in a process that could not allocate it (1 GiB of address
    space left): nothing is allocated from the entry."""
    import subprocess
    import sys

    d = _copy(saved, tmp_path)
    _edit_entry(d, edit)
    run = subprocess.run([sys.executable, "-c", HOSTILE_LOAD, str(d)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused:" in run.stdout and ("100000" in run.stdout or "10000000" in run.stdout), run.stdout
