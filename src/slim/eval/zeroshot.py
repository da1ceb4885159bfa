"""Zero-shot accuracy through lm-evaluation-harness, fully offline.

Each task is lm-eval's own built-in task definition (its prompts, answer processing and metrics,
pulled in with `include:`), with only the data source replaced by local JSON-lines files in the
Hugging Face layout. lm-eval is an optional extra (`pip install slim-compress[eval]`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..data import DataError, data_dir, sha256

log = logging.getLogger(__name__)

# name -> (lm-eval built-in yaml, split evaluated, local file under the data dir)
TASKS: dict[str, tuple[str, str, str]] = {
    "piqa": ("piqa/piqa.yaml", "validation", "piqa/validation.hf.jsonl"),
    "arc_easy": ("arc/arc_easy.yaml", "test", "arc_easy/test.hf.jsonl"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", "arc_challenge/test.hf.jsonl"),
    "winogrande": ("winogrande/default.yaml", "validation", "winogrande/dev.jsonl"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", "openbookqa/test.hf.jsonl"),
}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
MMLU_HINT = (
    "MMLU is not shipped: put the HF `cais/mmlu` 'all' test split (fields question, subject, choices, answer) "
    "as mmlu/test.jsonl under the data dir to enable it"
)


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("zero-shot tasks need lm-eval: pip install 'slim-compress[eval]'") from None
    import lm_eval

    return lm_eval


def resolve_tasks(names: list[str], data_root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Local data file per requested task; unknown names fail, MMLU without data is skipped with a message."""
    root = data_dir(data_root)
    out: dict[str, Path] = {}
    for name in names:
        if name == "mmlu":
            f = root / "mmlu" / "test.jsonl"
            if not f.is_file():
                log.warning("skipping mmlu: %s", MMLU_HINT)
                continue
            out[name] = f
            continue
        if name not in TASKS:
            raise DataError(f"unknown task {name!r}; available: {', '.join([*TASKS, 'mmlu'])}")
        f = root / TASKS[name][2]
        if not f.is_file():
            raise DataError(f"data file for {name} is missing: {f}")
        out[name] = f
    return out


def _local_task(include: Path, task: str, split: str, f: Path, **extra: Any) -> dict[str, Any]:
    """A task config: lm-eval's built-in definition with its data read from a local JSON-lines file."""
    return {
        "include": str(include), "tag": [], "task": task, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(f.resolve())}}, "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None, "fewshot_split": None, **extra,
    }


def write_task_configs(files: dict[str, Path], folder: Path) -> dict[str, list[str]]:
    """Write one YAML per task (MMLU: one per subject, as lm-eval does); returns task -> lm-eval task names."""
    import json

    import yaml

    lm_eval = require_lm_eval()
    builtin = Path(lm_eval.__file__).parent / "tasks"
    names: dict[str, list[str]] = {}
    for name, f in files.items():
        if name != "mmlu":
            rel, split, _ = TASKS[name]
            cfgs = [_local_task(builtin / rel, f"slim_{name}", split, f)]
        else:  # split the user's 'all' file by subject; each subject keeps its built-in description
            by_subject: dict[str, list[str]] = {}
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    by_subject.setdefault(json.loads(line)["subject"], []).append(line)
            cfgs = []
            for subject, rows in sorted(by_subject.items()):
                inc = builtin / "mmlu" / "default" / f"mmlu_{subject}.yaml"
                if not inc.is_file():
                    raise DataError(f"{f}: unknown MMLU subject {subject!r}")
                part = folder / f"mmlu_{subject}.jsonl"
                part.write_text("\n".join(rows) + "\n", encoding="utf-8")
                cfgs.append(_local_task(inc, f"slim_mmlu_{subject}", "test", part))
        for cfg in cfgs:
            (folder / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        names[name] = [c["task"] for c in cfgs]
    return names


def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: list[str] | None = None, data_root: str | os.PathLike | None = None,
    limit: int | None = None, batch_size: int = 8, device: str = "cpu", samples: bool = False,
) -> dict[str, Any]:
    """0-shot acc / acc_norm (with stderr) per task, their mean, and the data files' sha256.

    With `samples`, also each document's per-choice log-likelihoods (for audits and tests).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    files = resolve_tasks(list(tasks or DEFAULT_TASKS), data_root)
    if not files:
        raise DataError("no task left to run")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_task_configs(files, Path(tmp))
        tm = TaskManager(include_path=tmp, include_defaults=False)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[t for ts in names.values() for t in ts], num_fewshot=0, limit=limit,
            task_manager=tm, log_samples=samples, bootstrap_iters=1000,
        )
    per_task: dict[str, dict[str, float]] = {}
    for name, tnames in names.items():
        if name != "mmlu":
            r = res["results"][tnames[0]]
            per_task[name] = {k.split(",")[0]: v for k, v in r.items() if k.startswith(("acc", "acc_norm"))}
            per_task[name]["n"] = res["n-samples"][tnames[0]]["effective"]
        else:  # MMLU: accuracy over all questions (lm-eval's group aggregates weighted by size)
            sizes = [res["n-samples"][t]["effective"] for t in tnames]
            acc = sum(res["results"][t]["acc,none"] * n for t, n in zip(tnames, sizes, strict=True)) / sum(sizes)
            per_task[name] = {"acc": acc, "subjects": len(tnames)}
    accs = [v["acc"] for v in per_task.values()]
    out: dict[str, Any] = {}
    if samples:
        out["samples"] = {n: sample_loglikelihoods(res["samples"][ts[0]]) for n, ts in names.items() if n != "mmlu"}
    return {**out,
        "tasks": per_task, "mean_acc": sum(accs) / len(accs), "limit": limit,
        "data": {n: {"file": str(f), "sha256": sha256(f)} for n, f in files.items()},
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "unknown",
    }


def sample_loglikelihoods(samples: list[dict]) -> list[tuple[int, list[float]]]:
    """(doc_id, per-choice log-likelihoods) for each logged sample, in document order."""
    rows = [(s["doc_id"], [float(r[0][0]) for r in s["resps"]]) for s in samples]
    return sorted(rows)
