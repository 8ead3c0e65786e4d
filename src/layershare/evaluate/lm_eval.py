"""Zero-shot downstream accuracy of a loaded causal LM through lm-evaluation-harness.

The model (dense or compressed, already in memory) is wrapped in lm-eval's HFLM, which accepts an
instantiated transformers model and tokenizer. Task names are either the local suite of
evaluate/tasks.py (written to the layershare cache, no dataset hub) or any lm-eval task
(piqa, arc_easy, hellaswag, ...), passed through unchanged; those need their dataset reachable.
lm_eval is imported here only, on first use: importing it takes seconds.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from layershare.evaluate.tasks import TASKS, write_tasks

SEED = 1234  # lm-eval's own default seeds, fixed here so a rerun gives the same numbers
HEADLINE = ("acc_norm", "acc")  # the metric reported per task: the first the task has


@dataclass
class TaskResult:
    """One task's headline metric, its standard error (nan where lm-eval gives none) and the
    number of examples scored."""
    task: str
    metric: str
    value: float
    stderr: float
    n: int


@functools.lru_cache(maxsize=None)
def _task_manager(include_path: str, include_defaults: bool):
    """Cached: indexing lm-eval's own task files takes several seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _load(manager, name: str):
    """The task objects of one task (or group) name; a dataset that cannot be reached is a ValueError."""
    if name not in manager.all_tasks:
        raise ValueError(f"unknown task {name!r}: not one of layershare's ({', '.join(TASKS)}) nor an lm-eval task")
    try:
        return list(manager.load(name)["tasks"].values())
    except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise ValueError(f"task {name!r}: its dataset could not be reached or read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e


def _headline(name: str, metrics: dict, n: int) -> TaskResult:
    names = [k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k]
    metric = next((m for m in HEADLINE if m in names), names[0])
    key = next(k for k in metrics if k.split(",")[0] == metric)
    stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
    return TaskResult(name, metric, float(metrics[key]),
                      float(stderr) if isinstance(stderr, (int, float)) else math.nan, n)


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
              task_dir: str | Path | None = None, seed: int = SEED) -> list[TaskResult]:
    """Zero-shot results of `model` on `tasks`, one TaskResult per task (its headline metric:
    acc_norm where the task has it, else acc, else its first metric). `limit`: the first N
    examples of each task only. `task_dir`: where the local suite is (default: written to the
    layershare cache by tasks.write_tasks)."""
    from layershare.adapters import get_adapter

    if get_adapter(model).task != "causal-lm":
        raise ValueError("downstream tasks need a causal language model, not an image classifier")
    if not tasks:
        raise ValueError("no task given")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise RuntimeError("lm-evaluation-harness is not installed; install it with: "
                           "pip install 'layershare[eval]'") from e

    task_dir = str(Path(task_dir) if task_dir is not None else write_tasks())
    manager = _task_manager(task_dir, include_defaults=not set(tasks) <= set(TASKS))
    loaded = [task for name in tasks for task in _load(manager, name)]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(lm, tasks=loaded, task_manager=manager, limit=limit, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    return [_headline(name, metrics, out["n-samples"][name]["effective"])
            for name, metrics in out["results"].items() if name in out["n-samples"]]
