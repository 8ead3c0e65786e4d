"""The package's shape: the public names import, the top level holds only the documented modules,
and no module imports another that imports it back (at module level or inside a function)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import layershare

PKG = Path(layershare.__file__).parent
TOP_LEVEL = {"__init__", "__main__", "api", "cli", "config", "recipe", "testing", "hardware"}  # docs/design.md explains each


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the layershare modules it imports anywhere in its body (relative imports resolved)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import module` imports the module; `from module import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_public_name_imports():
    for name in layershare.__all__:
        assert getattr(layershare, name) is not None, name
    # the public verbs are functions, not the packages beside them
    assert callable(layershare.compress) and callable(layershare.load)


def test_top_level_holds_only_the_documented_modules():
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == TOP_LEVEL, f"unexpected top-level modules: {sorted(top - TOP_LEVEL)}"
    design = (PKG.parents[1] / "docs" / "design.md").read_text()
    for name in TOP_LEVEL - {"__init__", "__main__"}:
        assert f"{name}.py" in design, f"docs/design.md does not explain {name}.py"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports():
    for name in _modules():
        if not name.endswith("__main__"):
            importlib.import_module(name)


# ---- loading is lean: no compressor, and the memory of a dense from_pretrained ------------------

LOAD = r'''
import json, sys
def rss():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS"))) * 1024
import torch
before, start = set(sys.modules), rss()
how, path = sys.argv[1], sys.argv[2]
if how == "dense":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path)
elif how == "load":
    import layershare
    m = layershare.load(path, runtime="compact")
else:
    import layershare
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path)
m(torch.zeros(1, 4, dtype=torch.long))
tensors = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
print(json.dumps({"modules": sorted(set(sys.modules) - before), "overhead": rss() - start - tensors}))
'''

COMPRESSOR = ("layershare.api", "layershare.compression", "layershare.methods", "layershare.data.images",
              "layershare.evaluate", "sklearn", "lm_eval", "datasets", "matplotlib")


def _load_in_fresh_process(how: str, path) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LOAD, how, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_imports_no_compressor_and_costs_no_more_than_a_dense_load(tmp_path):
    """`layershare.load` and from_pretrained (after `import layershare`) import none of the compressor,
    and hold at most 30 MiB beyond their tensors more than a dense from_pretrained does (fresh processes)."""
    import torch

    from layershare import FiPSConfig, Recipe
    from layershare.testing import make_model

    model = make_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    layershare.compress(model, Recipe(stages=[FiPSConfig(ratio=0.2, steps=0)], nsamples=8, seqlen=32),
                        data=tokens, output_dir=tmp_path / "c")
    dense = _load_in_fresh_process("dense", tmp_path / "dense")
    for how in ("load", "from_pretrained"):
        seen = _load_in_fresh_process(how, tmp_path / "c")
        assert "layershare.checkpoint.read" in seen["modules"]  # it did go through layershare
        heavy = [m for m in seen["modules"] if m.startswith(COMPRESSOR)]
        assert heavy == [], f"{how} imported {heavy[:8]}"
        assert seen["overhead"] - dense["overhead"] <= 30 * 2**20, (how, seen["overhead"], dense["overhead"])


def test_no_source_file_mentions_a_circular_import():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20 and PKG / "compression" / "pipeline.py" in files
    hits = [str(f.relative_to(PKG)) for f in files if "circular" in f.read_text().lower()]
    assert hits == []


def test_public_perplexity_refuses_non_finite_logits():
    import pytest
    import torch

    from layershare.evaluate.nonfinite import NonFiniteResult
    from layershare.testing import make_model

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    ids = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteResult, match="layers.1.mlp.up_proj"):
        layershare.evaluate_perplexity(model, None, ids, seqlen=64)
