"""A small held-out zero-shot suite built from a novel, written as lm-evaluation-harness tasks.

Two tasks, both drawn (seeded, so the same text gives the same examples) from one book that the
calibration does not see (default: Austen's Persuasion; calibration uses Sense and Sensibility,
the perplexity text is Northanger Abbey):

- `austen_lastword` (LAMBADA-style, `loglikelihood`, metric `acc`): a passage of whole
  consecutive sentences, 60-150 words, whose last word the model must predict greedily. The rule:
  the passage's final sentence ends in a space, a word of at least 3 ASCII letters, then . ! or ?
  and any closing quotes (dropped from the passage), and that word, ignoring case, already occurs
  earlier in the passage, so the context holds what is needed to recover it. Passages do not
  overlap; `n` of them are drawn at random.
- `austen_nextsent` (`multiple_choice`, metrics `acc` and `acc_norm`): a context of 3
  consecutive sentences, then 4 candidate next sentences: the true one and 3 sentences from
  elsewhere in the book (more than 50 sentences from the true one) whose word counts are
  within 20% (at least 2 words) of it. Every candidate has 6-40 words; the true one's place
  among the 4 is drawn at random.

The text is cut into paragraphs at blank lines, lines are joined, the `_` italics marks of the
source are dropped, and paragraphs that do not end in . ! ? or a closing quote (titles,
chapter headings) are left out. Sentences end at . ! ? (plus closing quotes) before a capital
or an opening quote, except after Mr. Mrs. Dr. St.

`write_tasks` writes each task's examples as jsonl and an lm-eval YAML that reads them with the
datasets library's packaged `json` builder, so the suite needs no dataset hub.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

TASKS = ("austen_lastword", "austen_nextsent")
BOOK = "persuasion"
LASTWORD_WORDS = (60, 150)
NEXTSENT_CONTEXT = 3
NEXTSENT_WORDS = (6, 40)
DISTRACTOR_DISTANCE = 50

_SENTENCE_END = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["']))"""  # after . ! ? and a closing quote
                           r"""(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)\s+(?=["'A-Z])""")
_LAST_WORD = re.compile(r"""\s([A-Za-z]{3,})[.!?]+["']*$""")


def sentences(text: str) -> list[str]:
    """The text's sentences in order (see the module docstring for the rule)."""
    out = []
    for para in re.split(r"\n\s*\n", text.replace("_", "")):
        para = " ".join(para.split())
        if para and para[-1] in ".!?\"'":
            out += [s for s in _SENTENCE_END.split(para) if s]
    return out


def _words(sentence: str) -> int:
    return len(sentence.split())


def lastword_examples(text: str, n: int = 300, seed: int = 0) -> list[dict]:
    """Up to `n` passages {"text": passage ending in its target word}, in book order."""
    sents = sentences(text)
    passages, start = [], 0
    for end, last in enumerate(sents):
        match = _LAST_WORD.search(last)
        if not match:
            continue
        first, words = end, _words(last)
        while words < LASTWORD_WORDS[0] and first > start:
            first -= 1
            words += _words(sents[first])
        if not LASTWORD_WORDS[0] <= words <= LASTWORD_WORDS[1]:
            continue
        passage = " ".join(sents[first:end] + [last[:match.end(1)]])
        target = match.group(1)
        earlier = {w.lower() for w in re.findall(r"[A-Za-z]+", passage[:-len(target)])}
        if target.lower() in earlier:
            passages.append({"text": passage})
            start = end + 1
    picked = sorted(random.Random(seed).sample(range(len(passages)), min(n, len(passages))))
    return [passages[i] for i in picked]


def nextsent_examples(text: str, n: int = 300, seed: int = 0) -> list[dict]:
    """Up to `n` examples {"context", "choices" (4 sentences), "label" (the true one's index)}."""
    sents = sentences(text)
    lengths = [_words(s) for s in sents]
    ok = [NEXTSENT_WORDS[0] <= k <= NEXTSENT_WORDS[1] for k in lengths]
    golds = []  # true next sentences whose contexts do not overlap, in book order
    for i in range(NEXTSENT_CONTEXT, len(sents)):
        if ok[i] and (not golds or i - NEXTSENT_CONTEXT > golds[-1]):
            golds.append(i)
    rng = random.Random(seed)
    examples = []
    for gold in sorted(rng.sample(golds, min(n, len(golds)))):
        tolerance = max(2, round(0.2 * lengths[gold]))
        pool = [j for j in range(len(sents)) if ok[j] and abs(j - gold) > DISTRACTOR_DISTANCE
                and abs(lengths[j] - lengths[gold]) <= tolerance and sents[j] != sents[gold]]
        if len(pool) >= 3:
            choices = [sents[j] for j in rng.sample(pool, 3)]
            label = rng.randrange(4)
            choices.insert(label, sents[gold])
            examples.append({"context": " ".join(sents[gold - NEXTSENT_CONTEXT:gold]), "choices": choices,
                             "label": label})
    return examples


def _yaml(task: str, data: Path) -> str:
    common = (f"task: {task}\ndataset_path: json\ndataset_name: null\n"
              f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n")
    if task == "austen_lastword":  # as lm-eval's lambada_openai
        body = ("output_type: loglikelihood\n"
                "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    else:  # as lm-eval's hellaswag
        body = ("output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{label}}\"\n"
                "doc_to_choice: choices\nmetric_list:\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return common + body + "metadata:\n  version: 1.0\n"


def _write(path: Path, content: str) -> None:
    """Write only on change: the datasets cache keys on the file, so an unchanged file is reused."""
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        path.write_text(content, encoding="utf-8")


def write_tasks(directory: str | Path | None = None, text: str | None = None, n: int = 300,
                seed: int = 0) -> Path:
    """Write both tasks' jsonl data and YAML files into `directory` (default: the layershare
    cache's lm_eval_tasks/) from `text` (default: the book BOOK) and return the directory,
    ready for lm-eval's TaskManager(include_path=...)."""
    from layershare.data.assets import austen_book, cache_dir

    directory = Path(directory) if directory is not None else cache_dir() / "lm_eval_tasks"
    directory.mkdir(parents=True, exist_ok=True)
    text = austen_book(BOOK) if text is None else text
    for task, make in (("austen_lastword", lastword_examples), ("austen_nextsent", nextsent_examples)):
        examples = make(text, n=n, seed=seed)
        if not examples:
            raise ValueError(f"the text is too short to make any {task} example")
        data = directory / f"{task}.jsonl"
        _write(data, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        _write(directory / f"{task}.yaml", _yaml(task, data))
    return directory
