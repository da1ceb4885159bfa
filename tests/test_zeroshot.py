"""Our offline task definitions score exactly like lm-eval's built-in tasks on the same documents."""

import pytest

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
import lm_eval  # noqa: E402
from conftest import tiny_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from slim.data import DataError  # noqa: E402
from slim.eval.zeroshot import TASKS, evaluate_tasks, resolve_tasks, sample_loglikelihoods  # noqa: E402

HUB_IDS = {"baber/piqa": "piqa", "allenai/ai2_arc": None, "allenai/winogrande": "winogrande",
           "allenai/openbookqa": "openbookqa"}


def test_offline_tasks_match_builtin(monkeypatch, smollm2_tokenizer_dir, shared_data):
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    model = tiny_model("llama", vocab=len(tok))
    limit = 6
    ours = evaluate_tasks(model, tok, list(TASKS), shared_data, limit=limit, batch_size=4, samples=True)

    def local_load_dataset(path=None, name=None, **kw):
        """Serve the built-in tasks the same local rows, under every split they may ask for."""
        task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}.get(name) or HUB_IDS[path]
        ds = datasets.Dataset.from_json(str(shared_data / TASKS[task][2]))
        return datasets.DatasetDict({s: ds for s in ("train", "validation", "test")})

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", local_load_dataset)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    ref = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), num_fewshot=0, limit=limit,
                                  task_manager=TaskManager(), log_samples=True, bootstrap_iters=1000)
    for name in TASKS:
        # the same documents, the same prompts and choices: identical per-choice log-likelihoods
        theirs = sample_loglikelihoods(ref["samples"][name])
        assert len(theirs) == limit and ours["samples"][name] == theirs, name
        for metric in ("acc", "acc_norm"):
            key = f"{metric},none"
            if key in ref["results"][name]:
                assert ours["tasks"][name][metric] == pytest.approx(ref["results"][name][key], abs=1e-12), name


def test_unknown_task_and_missing_mmlu(shared_data, caplog):
    with pytest.raises(DataError, match="unknown task 'hellaswag'"):
        resolve_tasks(["hellaswag"], shared_data)
    assert "mmlu" not in resolve_tasks(["piqa", "mmlu"], shared_data)
    assert "skipping mmlu" in caplog.text


def test_mmlu_from_user_file(tmp_path, smollm2_tokenizer_dir, shared_data):
    """A user-provided MMLU file runs as lm-eval's per-subject tasks (with their descriptions)."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shared_data / "piqa", data / "piqa")
    (data / "mmlu").mkdir()
    rows = [{"question": f"Q{i}?", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
            for i, s in enumerate(["anatomy", "anatomy", "virology"])]
    (data / "mmlu" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    res = evaluate_tasks(tiny_model("llama", vocab=len(tok)), tok, ["mmlu"], data, batch_size=4)
    assert res["tasks"]["mmlu"]["subjects"] == 2
    assert res["tasks"]["mmlu"]["acc"] in (0, 1 / 3, 2 / 3, 1)
