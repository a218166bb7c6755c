"""lm-evaluation-harness, built in: its own Hugging Face model class (HFLM) runs a linearized model as it
is, batched, with no patching. Needs the `eval` extra (`pip install 'linearize[eval]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from linearize.errors import LinearizeError


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for each lm-eval task name (standard tasks download their datasets; local
    task YAML files can be added with `include_path`)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LinearizeError("lm-eval is not installed: `pip install 'linearize[eval]'` (or lm-eval)") from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LinearizeError(f"unknown lm-eval task(s) {unknown}: see `lm-eval --tasks list`, or pass --include")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0
    )
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" -> "acc"; numbers only, no standard errors."""
    out = {}
    for key, value in values.items():
        name, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
            out[name] = float(value)
    return out
