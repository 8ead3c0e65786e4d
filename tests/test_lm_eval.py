"""The local zero-shot suite (evaluate/tasks.py) and its run through lm-evaluation-harness
(evaluate/lm_eval.py, `layershare eval --tasks`), on a generated text and tiny models."""
import json
import math
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import SAMPLE_TEXT, small_recipe  # noqa: E402

from layershare.evaluate.tasks import (  # noqa: E402
    LASTWORD_WORDS,
    NEXTSENT_WORDS,
    TASKS,
    lastword_examples,
    nextsent_examples,
    sentences,
    write_tasks,
)
from layershare.testing import make_model  # noqa: E402

WORDS = sorted({w.strip(".,").lower() for w in SAMPLE_TEXT.split()})


def make_text(n_sentences: int = 600, seed: int = 0) -> str:
    """Paragraphs of 3-6 sentences of 6-20 words from the tokenizer fixture's vocabulary, in
    which words repeat often (so many passages qualify for austen_lastword)."""
    rng = random.Random(seed)
    paragraphs, sents = [], []
    for i in range(n_sentences):
        words = rng.choices(WORDS, k=rng.randint(6, 20))
        sents.append(" ".join(words).capitalize() + rng.choice(".!?"))
        if len(sents) >= rng.randint(3, 6) or i == n_sentences - 1:
            paragraphs.append(" ".join(sents))
            sents = []
    return "Chapter 1\n\n" + "\n\n".join(paragraphs)


TEXT = make_text()
FLAT = " ".join(TEXT.split())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """One directory for the module: lm-eval's task index is cached per directory."""
    return write_tasks(tmp_path_factory.mktemp("tasks"), text=TEXT, n=40)


def test_sentences_rule():
    text = 'Mr. Darcy came. She said "Yes." Then _he_ left!\n\nChapter 1\n\nAnother\none?'
    assert sentences(text) == ["Mr. Darcy came.", 'She said "Yes."', "Then he left!", "Another one?"]


def test_lastword_examples():
    examples = lastword_examples(TEXT, n=40)
    assert len(examples) == 40 and examples == lastword_examples(TEXT, n=40)
    assert examples != lastword_examples(TEXT, n=40, seed=1)
    for e in examples:
        *context, target = e["text"].split(" ")
        assert target.isalpha() and len(target) >= 3
        assert target.lower() in {w.strip(".!?").lower() for w in context}
        assert LASTWORD_WORDS[0] <= len(context) + 1 <= LASTWORD_WORDS[1]
        assert FLAT.split(e["text"], 1)[1][0] in ".!?"  # in the text, the target ends its sentence


def test_nextsent_examples():
    examples = nextsent_examples(TEXT, n=40)
    assert len(examples) == 40 and examples == nextsent_examples(TEXT, n=40)
    assert examples != nextsent_examples(TEXT, n=40, seed=1)
    assert {e["label"] for e in examples} == {0, 1, 2, 3}
    for e in examples:
        gold = e["choices"][e["label"]]
        assert f"{e['context']} {gold}" in FLAT  # the true continuation
        assert len(set(e["choices"])) == 4
        for c in e["choices"]:
            assert NEXTSENT_WORDS[0] <= len(c.split()) <= NEXTSENT_WORDS[1]
            assert abs(len(c.split()) - len(gold.split())) <= max(2, round(0.2 * len(gold.split())))


def test_write_tasks(task_dir):
    for task in TASKS:
        data = task_dir / f"{task}.jsonl"
        assert len(data.read_text().splitlines()) == 40
        assert json.dumps(str(data.resolve())) in (task_dir / f"{task}.yaml").read_text()
    with pytest.raises(ValueError, match="too short"):
        write_tasks(task_dir / "short", text="One two three. Four five six.")


def test_run_tasks(task_dir, tokenizer):
    from layershare.evaluate.lm_eval import run_tasks

    model = make_model("llama", vocab=300)
    results = run_tasks(model, tokenizer, list(TASKS), limit=5, task_dir=task_dir)
    assert [(r.task, r.metric, r.n) for r in results] == [("austen_lastword", "acc", 5),
                                                          ("austen_nextsent", "acc_norm", 5)]
    for r in results:
        assert 0 <= r.value <= 1 and math.isfinite(r.stderr)


def test_unknown_or_unreachable_task_is_one_error(task_dir, monkeypatch):
    import datasets
    import huggingface_hub

    from layershare.evaluate.lm_eval import run_tasks

    model = make_model("llama", vocab=300)
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        run_tasks(model, None, ["austen_lastword", "no_such_task"], task_dir=task_dir)
    # no network here: offline mode fails at once instead of after the hub client's retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="task 'piqa': its dataset could not be reached"):
        run_tasks(model, None, ["piqa"], task_dir=task_dir)


def test_cli_tasks_on_a_compressed_dir(tmp_path, tokenizer, monkeypatch, capsys):
    import layershare
    import layershare.data.assets
    from layershare.cli import main

    monkeypatch.setenv("LAYERSHARE_CACHE", str(tmp_path / "cache"))  # the default task dir, from TEXT
    monkeypatch.setattr(layershare.data.assets, "austen_book", lambda name: TEXT)
    tokens = torch.randint(0, 128, (1024,), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "c"
    layershare.compress(make_model("llama", vocab=300), small_recipe(ratio=0.2, nsamples=2, seqlen=16),
                        data=tokens, tokenizer=tokenizer, output_dir=out)
    assert main(["eval", str(out), "--tasks", ",".join(TASKS), "--limit", "5"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "the first 5 examples of each task" in rows[0]
    assert [r.split()[:2] + r.split()[-1:] for r in rows[2:]] == [["austen_lastword", "acc", "5"],
                                                                  ["austen_nextsent", "acc_norm", "5"]]
    assert main(["eval", str(out), "--text", "x", "--limit", "5"]) == 2
    assert "--limit applies to --tasks only" in capsys.readouterr().err
