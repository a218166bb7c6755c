"""lm-evaluation-harness, built in: its own Hugging Face model class (HFLM) runs a linearized model as it
is, batched, with no patching. Needs the `eval` extra (`pip install 'linearize[eval]'`).

Tasks are lm-eval names (their datasets come from the hub) or local task files: an lm-eval task YAML, or a
directory of them, with their data files beside them (`dataset_path: json` and `dataset_kwargs.data_files`
relative to the YAML), so tasks run where the hub cannot be reached. A multiple-choice task can also be
scored by generation: the model writes its answer (greedy, up to a new line) and it must equal the right
choice (`exact_match`, ignoring case, punctuation and surrounding spaces), next to the usual
log-likelihood comparison of the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linearize.errors import LinearizeError

SCORINGS = ("loglikelihood", "generate")
GENERATE_SUFFIX = "_generate"
LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")


@dataclass
class TaskSpec:
    """One task to run: its name in the results, what lm-eval is given (a name or a config dict) and how
    its answers are scored ("loglikelihood" or "generate")."""

    name: str
    spec: str | dict[str, Any]
    scoring: str


def _load_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (`include`, `!function`), or a LinearizeError naming the file."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as err:
        raise LinearizeError("lm-eval >= 0.4.10 is needed for local task files: pip install 'linearize[eval]'") from err
    if not path.is_file() or path.stat().st_size == 0:
        raise LinearizeError(f"task file '{path}' is {'empty' if path.is_file() else 'missing'}")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as err:  # yaml errors, a missing !function module, a bad include
        raise LinearizeError(f"task file '{path}' cannot be read as an lm-eval task ({type(err).__name__}: {err})") \
            from err
    if not isinstance(config, dict) or not config.get("task"):
        raise LinearizeError(f"task file '{path}' has no 'task' name: an lm-eval task YAML starts with `task: NAME`")
    return config


def _local_data(config: dict[str, Any], directory: Path, source: Path) -> dict[str, Any]:
    """The config with relative data files made absolute (beside the YAML), each checked to exist and hold data."""
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return config

    def resolve(entry: str) -> str:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else directory / path
        if not path.is_file():
            raise LinearizeError(f"task '{config['task']}' ({source}) names data file '{entry}', which is missing "
                                 f"(looked for {path})")
        if path.stat().st_size == 0:
            raise LinearizeError(f"task '{config['task']}' ({source}): data file '{path}' is empty")
        return str(path)

    if isinstance(files, str):
        files = resolve(files)
    elif isinstance(files, list):
        files = [resolve(f) for f in files]
    elif isinstance(files, dict):
        files = {split: resolve(f) if isinstance(f, str) else [resolve(x) for x in f] for split, f in files.items()}
    kwargs["data_files"] = files
    return {**config, "dataset_kwargs": kwargs}


def local_task_configs(path: str | Path) -> list[dict[str, Any]]:
    """The task configs of an lm-eval task YAML file or of every *.yaml / *.yml in a directory (recursively),
    data files resolved beside each file; errors name the file, before any model loads."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")])
        if not files:
            raise LinearizeError(f"task directory '{path}' holds no .yaml task file")
    else:
        files = [path]
    configs = []
    for file in files:
        config = _load_yaml(file)
        if "group" in config and "task" not in config:
            continue
        configs.append(_local_data(config, file.parent, file))
    return configs


def generative(config: dict[str, Any]) -> dict[str, Any]:
    """A multiple-choice task config scored by generation: greedy until a new line, exact match with the
    right choice (lm-eval maps `doc_to_target`'s index through `doc_to_choice` for generated answers)."""
    out = {key: value for key, value in config.items() if key not in ("metric_list", "filter_list")}
    out.update(
        task=config["task"] + GENERATE_SUFFIX,
        output_type="generate_until",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 32, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                      "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
    )
    return out


def task_specs(tasks: str, scoring: list[str] | None = None) -> list[TaskSpec]:
    """What `--tasks` asks for: comma-separated lm-eval names, or a path to a task YAML / a directory of them.
    `scoring`: "loglikelihood" and/or "generate" (None: each task as it is written); a multiple-choice task
    asked to generate gets a generative twin, named TASK_generate."""
    scoring = scoring or []
    unknown = [s for s in scoring if s not in SCORINGS]
    if unknown:
        raise LinearizeError(f"unknown scoring {unknown}: choose from {', '.join(SCORINGS)}")
    if Path(tasks).exists() or tasks.endswith((".yaml", ".yml")):
        configs = local_task_configs(tasks)
    else:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if scoring and scoring != ["loglikelihood"]:
            raise LinearizeError("--score generate needs the task's config: pass a local task file or directory "
                                 "(hub task names are run as they are written)")
        return [TaskSpec(name, name, "as written") for name in names]
    out = []
    for config in configs:
        kind = config.get("output_type", "generate_until")
        own = "loglikelihood" if kind in LOGLIKELIHOOD_TYPES else "generate"
        if not scoring or own in scoring:
            out.append(TaskSpec(config["task"], config, own))
        if "generate" in scoring and kind == "multiple_choice":
            twin = generative(config)
            out.append(TaskSpec(twin["task"], twin, "generate"))
        elif scoring and own not in scoring:
            raise LinearizeError(f"task '{config['task']}' ({kind}) cannot be scored by {', '.join(scoring)}: only "
                                 "multiple-choice tasks are scored both ways")
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: list[str] | list[TaskSpec],
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for each lm-eval task (names, or `TaskSpec`s from `task_specs`); standard
    tasks download their datasets, local task YAML files can be added with `include_path`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LinearizeError("lm-eval is not installed: `pip install 'linearize[eval]'` (or lm-eval)") from err
    specs = [t if isinstance(t, TaskSpec) else TaskSpec(t, t, "as written") for t in tasks]
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    unknown = [t.name for t in specs if isinstance(t.spec, str) and t.spec not in manager.all_tasks]
    if unknown:
        raise LinearizeError(f"unknown lm-eval task(s) {unknown}: see `lm-eval --tasks list`, pass --include, or "
                             "give a task YAML file or directory")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[t.spec for t in specs], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=0,
    )
    scoring = {t.name: t.scoring for t in specs}
    return {task: {**_metrics(values), **({"scored_by": scoring[task]} if task in scoring else {})}
            for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" -> "acc"; numbers only, no standard errors."""
    out = {}
    for key, value in values.items():
        name, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
            out[name] = float(value)
    return out
