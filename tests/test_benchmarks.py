"""The benchmark scripts run end to end on a tiny model, and a grid resumes instead of starting again."""

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))

    def run(module: str, *argv: str) -> int:
        mod = __import__(module)
        monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])
        return mod.main()

    return run


def test_ablation_grid_resumes(bench, tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "abl"
    common = ("--model", str(tiny_llama_dir), "--out", str(out), "--limit", "1", "--data-dir", str(shared_data),
              "--calib-samples", "8")
    assert bench("ablation", *common, "--rows", "dense,no-adapter") == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"dense", "no-adapter"}
    row = res["rows"]["no-adapter"]
    assert row["ppl"] > 0 and row["bits_per_weight"] < 4 and row["layers"]
    assert "--rows dense,no-adapter" in row["command"] and "commit" in row  # each row says what made it
    assert "| no-adapter |" in (out / "README.md").read_text()
    first = (out / "results.json").read_text()
    capsys.readouterr()
    # a second run with one more row keeps the finished rows and computes only the new one
    assert bench("ablation", *common, "--rows", "dense,no-adapter,greedy") == 0
    log = capsys.readouterr().out
    assert "[dense] done already" in log and "[no-adapter] done already" in log
    res2 = json.loads((out / "results.json").read_text())
    assert set(res2["rows"]) == {"dense", "no-adapter", "greedy"}
    assert res2["rows"]["no-adapter"] == json.loads(first)["rows"]["no-adapter"]
    assert res2["rows"]["greedy"]["config"]["calib"]["n_samples"] == 8
    # --redo measures a finished row again (its code changed), leaving the others
    capsys.readouterr()
    assert bench("ablation", *common, "--rows", "dense,no-adapter", "--redo", "no-adapter") == 0
    log = capsys.readouterr().out
    assert "[dense] done already" in log and "[no-adapter] ppl" in log and "[no-adapter] done already" not in log
    # rows calibrated differently never land in one table
    with pytest.raises(SystemExit, match="calibrated on 8 x 512"):
        bench("ablation", *common[:-1], "4", "--rows", "paper")
    with pytest.raises(SystemExit, match="not 8 x 512 c4 tokens, seed 1"):  # --seed: other windows, another grid
        bench("ablation", *common, "--seed", "1", "--rows", "paper")


def test_baselines_table(bench, tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "base"
    common = ("--model", str(tiny_llama_dir), "--limit", "1", "--data-dir", str(shared_data), "--tables", "2:4,quant")
    assert bench("baselines", *common, "--out", str(out), "--calib-samples", "8", "--rows", "wanda-absmax") == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == {"dense", "2:4/wanda-absmax"}  # quant has no wanda-absmax row
    assert res["rows"]["2:4/wanda-absmax"]["config"]["sparsity"]["pattern"] == "2:4"
    readme = (out / "README.md").read_text()
    assert "## 2:4 sparsity + 4-bit weights" in readme
    assert "Not measured yet: magnitude-group-absmax, magnitude-absmax, sparsegpt-optq," in readme  # what is left
    assert "quantization only" not in readme.lower()  # a table with no row measured is left out
    capsys.readouterr()
    # another grid takes the rows it shares with the first instead of recomputing them ...
    out2 = tmp_path / "base2"
    assert bench("baselines", *common, "--out", str(out2), "--calib-samples", "8", "--rows",
                 "wanda-absmax,magnitude-absmax", "--reuse", str(out / "results.json")) == 0
    assert capsys.readouterr().out.count("reused from") == 2
    res2 = json.loads((out2 / "results.json").read_text())
    row = res2["rows"]["2:4/wanda-absmax"]
    assert row["reused_from"].endswith(": 2:4/wanda-absmax") and row["ppl"] == res["rows"]["2:4/wanda-absmax"]["ppl"]
    assert "reused_from" not in res2["rows"]["2:4/magnitude-absmax"]
    assert "--reuse" in (out2 / "README.md").read_text()
    # ... but never a row calibrated differently
    out3 = tmp_path / "base3"
    assert bench("baselines", *common, "--out", str(out3), "--calib-samples", "4", "--rows", "wanda-absmax",
                 "--reuse", str(out / "results.json")) == 0
    assert "reused from" not in capsys.readouterr().out


def test_grid_scores_a_row_from_a_checkpoint(bench, tiny_llama_dir, shared_data, tmp_path, capsys):
    """A row compressed by `slim compress` (resumable, for rows that take hours) is scored like one computed in
    the grid, with the same result; a checkpoint of another recipe or a bad ROW=DIR stops the grid."""
    from slim.cli.commands import main as slim_main

    ck = tmp_path / "ck"
    assert slim_main(["compress", str(tiny_llama_dir), "--preset", "wanda-absmax", "--calib-samples", "8",
                      "--data-dir", str(shared_data), "--out", str(ck), "--quiet"]) == 0
    common = ("--model", str(tiny_llama_dir), "--limit", "1", "--data-dir", str(shared_data), "--tables", "2:4",
              "--calib-samples", "8")
    assert bench("baselines", *common, "--out", str(tmp_path / "here"), "--rows", "wanda-absmax") == 0
    assert bench("baselines", *common, "--out", str(tmp_path / "there"), "--rows", "wanda-absmax",
                 "--from-checkpoint", f"2:4/wanda-absmax={ck}") == 0
    here = json.loads((tmp_path / "here" / "results.json").read_text())["rows"]["2:4/wanda-absmax"]
    there = json.loads((tmp_path / "there" / "results.json").read_text())["rows"]["2:4/wanda-absmax"]
    assert there["from_checkpoint"] == str(ck) and there["checkpoint_command"].startswith("slim ")
    assert there["ppl"] == pytest.approx(here["ppl"], rel=1e-4)
    assert there["bits_per_weight"] == pytest.approx(here["bits_per_weight"])
    gpu = tmp_path / "ck-gpu"  # compressed on another device: the same recipe, so the same row
    shutil.copytree(ck, gpu)
    meta = json.loads((gpu / "slim_config.json").read_text())
    meta["config"]["device"] = "cuda"
    (gpu / "slim_config.json").write_text(json.dumps(meta))
    assert bench("baselines", *common, "--out", str(tmp_path / "gpu"), "--rows", "wanda-absmax",
                 "--from-checkpoint", f"2:4/wanda-absmax={gpu}") == 0
    with pytest.raises(SystemExit, match="another recipe"):
        bench("baselines", *common, "--out", str(tmp_path / "bad"), "--rows", "magnitude-absmax",
              "--from-checkpoint", f"2:4/magnitude-absmax={ck}")
    for spec in (f"nosuchrow={ck}", f"2:4/wanda-absmax={tmp_path}"):
        with pytest.raises(SystemExit, match="--from-checkpoint"):
            bench("baselines", *common, "--out", str(tmp_path / "bad"), "--from-checkpoint", spec)


def test_ablation_rejects_unknown_row(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench("ablation", "--out", str(tmp_path / "x"), "--rows", "paper,nonsense")


def test_compress_time_side_by_side(bench, tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "timing"
    assert bench("compress_time", "--model", str(tiny_llama_dir), "--out", str(out), "--order", "paper,default",
                 "--data-dir", str(shared_data), "--calib-samples", "8") == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in res["runs"]] == ["paper", "default"]
    assert res["summary"]["paper"]["vs_paper"] == 1.0
    assert "median vs paper" in (out / "README.md").read_text()


def test_baselines_table_formats_collapsed_rows(bench):
    import baselines  # importable: the bench fixture put benchmarks/ on sys.path

    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "torch_threads": 2, "transformers": "x"}
    res = {"model": "m", "eval": {"windows": 1, "seqlen": 8}, "calib": "c", "command": "cmd", "machine": machine,
           "rows": {"2:4/wanda-absmax": {"ppl": 15910592.17, "bits_per_weight": 3.0},
                    "2:4/wanda-gptq": {"ppl": 155.677, "bits_per_weight": 3.135}}}
    text = baselines.render(res)
    assert "| Wanda | AbsMax | 1.59e+07 |" in text and "| Wanda | Group OPTQ | 155.68 |" in text


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "grid"))
def test_help_renders(bench, script, capsys):
    # argparse %-formats help strings: a bare '%' (as in '50%') crashed `baselines.py --help` once
    if script == "triton_sass":  # imports Triton at module level (gpu_runtime only when it runs kernels)
        pytest.importorskip("triton", reason="Triton is not installed")
    with pytest.raises(SystemExit) as e:
        bench(script, "--help")
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_plus_ft_table_scores_each_checkpoint_once(bench, tiny_llama_dir, shared_data, tmp_path, capsys):
    from slim.cli.commands import main

    ck, ft = tmp_path / "ck", tmp_path / "ft"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), "--calib-samples", "4", "--calib-seqlen", "64",
                 "--data-dir", str(shared_data), "-q"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["finetune", str(ck), "--out", str(ft), "--data", str(text), "--max-tokens", "256", "--seqlen",
                 "32", "--batch", "4", "--micro-batch", "4", "-q"]) == 0
    out = tmp_path / "plus"
    with pytest.raises(SystemExit):  # a checkpoint not written by slim finetune is refused before any evaluation
        bench("plus_ft", "--out", str(out), f"x={ck}")
    assert not out.exists()
    argv = ["--out", str(out), "--limit", "2", "--data-dir", str(shared_data), f"tiny={ft}"]
    assert bench("plus_ft", *argv) == 0
    run = json.loads((out / "results.json").read_text())["runs"]["tiny"]
    assert run["tokens"] == 256 and run["source"] == "ck" and run["train_seconds"] > 0
    assert run["before"]["ppl"] > 0 and run["after"]["ppl"] > 0 and run["before"]["file"] != run["after"]["file"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    assert len(stamps) == 2
    assert bench("plus_ft", *argv) == 0  # scored already: nothing evaluated again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()} == stamps
    assert "| tiny | ck |" in (out / "README.md").read_text()
    assert bench("plus_ft", *argv, "--backend", "reference", "--dtype", "fp32") == 0  # other settings: scored anew
    assert len(list((out / "evals").glob("*-reference-fp32-limit2.json"))) == 2
    assert len(list((out / "evals").iterdir())) == 4
    # --keep: a later call adds its row and keeps the earlier one with the command that scored it
    assert bench("plus_ft", *argv[:-1], "--keep", f"again={ft}") == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == ["tiny", "again"] and "--keep" not in res["runs"]["tiny"]["scored_by"]["command"]
    readme = (out / "README.md").read_text()
    assert "Commands:" in readme and "- tiny: `" in readme and "- again: `" in readme
    assert bench("plus_ft", *argv[:-1], f"again={ft}") == 0  # without --keep the table is this call's alone
    assert list(json.loads((out / "results.json").read_text())["runs"]) == ["again"]


@pytest.mark.slow  # a one-off probe, archived (benchmarks/archive/): out of the default suite
def test_finetune_lr_probe_reuses_runs_and_refuses_other_options(bench, tiny_llama_dir, shared_data, tmp_path,
                                                                  monkeypatch):
    from slim.cli.commands import main

    ck = tmp_path / "ck"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), "--calib-samples", "4", "--calib-seqlen", "64",
                 "--data-dir", str(shared_data), "-q"]) == 0
    out, work = tmp_path / "probe", tmp_path / "work"
    argv = [str(ck), "--out", str(out), "--work", str(work), "--lrs", "1e-3,1e-1", "--max-tokens", "256",
            "--batch", "4", "--micro-batch", "4", "--seqlen", "32", "--autocast", "none", "--eval-limit", "1",
            "--data-dir", str(shared_data)]
    monkeypatch.syspath_prepend(str(BENCH / "archive"))
    assert bench("finetune_lr_probe", *argv) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["lr"] for r in runs] == [1e-3, 1e-1] and runs[0]["before"] == runs[1]["before"]
    assert runs[0]["after"] != runs[1]["after"]  # the lr reached the training
    stamp = (work / "lr1e-3" / "model.safetensors").stat().st_mtime_ns
    assert bench("finetune_lr_probe", *argv) == 0  # reused, not trained again
    assert (work / "lr1e-3" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="other options"):
        bench("finetune_lr_probe", *[a if a != "256" else "512" for a in argv])


@pytest.mark.slow  # a shell script's wiring, many subprocesses; plus_ft's table is tested in process above
def test_gpu_script_dry_run_on_cpu(tiny_llama_dir, shared_data, tmp_path):
    """benchmarks/plus_ft_gpu.sh (what a rented GPU runs, bounded) works end to end with DEVICE=cpu and tiny
    settings: checkpoint, +FT with distillation, the +FT table, the zero-shot of the best run and of its source;
    stages left out by ONLY say so. A broken flag here would otherwise cost a GPU lease to find."""
    import os
    import subprocess

    pytest.importorskip("lm_eval")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    env = {**os.environ, "MODEL": str(tiny_llama_dir), "RUNS": str(tmp_path / "runs"), "DEVICE": "cpu",
           "RESULTS": str(tmp_path / "results"), "SLIM_DATA_DIR": str(shared_data),
           "ONLY": "compress-default|finetune-default-kd|plus-ft|zeroshot",
           "COMPRESS_EXTRA": "--calib-samples 4 --calib-seqlen 64",
           "FT_EXTRA": f"--max-tokens 256 --seqlen 32 --batch 4 --micro-batch 4 --data {text}",
           "EVAL_EXTRA": "--limit 2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(BENCH / "plus_ft_gpu.sh")], env=env, cwd=BENCH.parent, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("compress-default", "finetune-default-kd", "plus-ft-table", "zeroshot-best-ft",
                  "zeroshot-its-source"):
        assert f"[{stage}] rc 0" in r.stdout, (stage, r.stdout[-3000:])
    assert "[compress-paper] not selected" in r.stdout
    res = json.loads((tmp_path / "results" / "finetune" / "plus-ft" / "results.json").read_text())
    assert list(res["runs"]) == ["default+KD"] and res["runs"]["default+KD"]["config"]["distill"] == 1.0
    for name in ("default-ft-kd", "default"):  # the best finetuned checkpoint and its one-shot source
        zs = json.loads((tmp_path / "runs" / f"zeroshot-{name}.json").read_text())
        assert set(zs["zeroshot"]["tasks"]) == {"piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa"}


def _gpu_runtime_smoke(bench, out, *extra):
    pytest.importorskip("triton", reason="Triton is not installed")
    assert bench("gpu_runtime", "--smoke", "--out", str(out), *extra) is None
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_gpu_runtime_layers_smoke(bench, tmp_path):
    """benchmarks/gpu_runtime.py (what a lent GPU runs for the cuda-int4 backend) works end to end on tiny shapes in
    the Triton interpreter: every method and forced path timed, the table written. A broken flag here would
    otherwise cost a GPU lease to find."""
    res, md = _gpu_runtime_smoke(bench, tmp_path, "--no-e2e")
    assert [(r["d_out"], r["d_in"], r["tokens"]) for r in res["layers"]] == [
        (96, 256, 1), (96, 256, 4), (96, 256, 17), (256, 96, 1), (256, 96, 4), (256, 96, 17)]
    for r in res["layers"]:
        want = {"cublas_fp16", "cublas_bf16", "slim_auto", "slim_gemm", "slim_dense", "slim+int4_adapters",
                "slim+16bit_adapters", "slim_gemm[split4]"} | ({"slim_gemv"} if r["tokens"] <= 16 else set())
        assert set(r["us"]) == want and all(v > 0 for v in r["us"].values())
        assert r["auto_path"] == ("gemv" if r["tokens"] == 1 else "gemm")
        assert r["unavailable"] == {"torch_int4": "needs CUDA", "cusparselt_fp16": "needs CUDA"}
    assert "| 96x256 | 1 |" in md and "(gemv)" in md and "Forced paths" in md
    sweep = res["sweep"]
    assert len(sweep) == 2 * 9 and all("us" in r for r in sweep), sweep  # 2 shapes x (5 GEMV + 4 GEMM) configs
    assert "Block configurations" in md


@pytest.mark.slow
def test_gpu_runtime_e2e_smoke(bench, tmp_path):
    """The end-to-end half: dense, slim and slim + adapters decode, eager and compiled, on a tiny Llama."""
    res, md = _gpu_runtime_smoke(bench, tmp_path, "--shapes", "smoke")
    rows = {(r["model"], r["compiled"]): r for r in res["decode"]}
    assert len(rows) == 6 and all(r.get("decode_tokens_per_s") for r in rows.values()), rows
    assert "compiled (static cache)" in md


@pytest.mark.parametrize("arch", [90, 80])
def test_triton_kernels_compile_for_the_gpu(tmp_path, arch):
    """The Triton interpreter does not check what the GPU compiler does (layouts, types, register pressure): every
    kernel configuration in use compiles for Hopper (and Ampere) ahead of time, with Triton's own ptxas, without
    spilling, and its main loop stays within a budget of instructions per weight (benchmarks/triton_sass.py)."""
    import os
    import subprocess

    pytest.importorskip("triton", reason="Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(BENCH / "triton_sass.py"), "--defaults-only", "--arch", str(arch),
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "sass.json").read_text())["rows"]
    assert {(r["kernel"], r["sparse"]) for r in rows} == {("gemv", True), ("gemv", False), ("gemm", True),
                                                          ("gemm", False)}
    for row in rows:
        assert "error" not in row, row
        assert row["stack_bytes"] == 0, row  # no spills
        # sm_90 figures of this commit: 2:4 GEMV 14.0 / 15.8 per kept weight, GEMM ~12-14 per dense position
        assert row["per_weight"] < 20, row


@pytest.mark.slow  # the shell wiring; the benchmark itself runs in process (test_gpu_runtime_layers_smoke)
def test_gpu_runtime_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_runtime.sh, the one call a lent GPU gets, runs its stages on a CPU: the gpu tests (skipped
    here), then the benchmark in the interpreter; each stage reports its exit code."""
    import os
    import subprocess

    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "TEST_S": "300", "BENCH_S": "300",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(BENCH / "gpu_runtime.sh"), "--smoke", "--no-e2e"], env=env, cwd=BENCH.parent,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[gpu-tests] rc 0" in r.stdout and "[benchmark] rc 0" in r.stdout, r.stdout[-3000:]
    assert json.loads((tmp_path / "gpu.json").read_text())["layers"]
    assert (tmp_path / "gpu-tests.log").read_text().count("skipped") >= 1


def test_behaviour_hash_compare_names_what_differs(bench, tmp_path, capsys):
    """The refactor's proof (benchmarks/behaviour_hash.py --compare): equal stored fingerprints pass, and one
    changed tensor fails naming the field and the tensor."""
    stored = sorted((BENCH.parent / "docs" / "results" / "behaviour").glob("*.json"), reverse=True)  # before, after
    assert len(stored) == 2
    assert bench("behaviour_hash", "--compare", *map(str, stored)) == 0
    res = json.loads(stored[1].read_text())
    key = next(k for k in res["hashed"] if k.endswith("file:model.safetensors"))
    res["hashed"][key] = "0" * 64
    tensors = res["paper_checkpoint"]["safetensors"]["model.safetensors"]["tensors"]
    name = sorted(tensors)[0]
    tensors[name] = "0" * 64
    (tmp_path / "b.json").write_text(json.dumps(res))
    assert bench("behaviour_hash", "--compare", str(stored[0]), str(tmp_path / "b.json")) == 1
    out = capsys.readouterr().out
    assert f"DIFFERS  {key}" in out and name in out


def test_cpu_decode_block_costs_and_table(bench):
    """benchmarks/cpu_decode.py separates per-block and fixed decode costs from its 1- and 4-block rows and renders
    every row (llama.cpp itself is not run here)."""
    import cpu_decode

    def row(llama_tps, slim_tps):
        return {"model": "m", "gguf": "f.gguf", "slim": {"head": "int8", "variant": "v"}, "prompt_tokens": 8,
                "llama_decode_tokens_per_s": llama_tps, "slim_decode_tokens_per_s": slim_tps,
                "ratio_decode_tokens_per_s": slim_tps / llama_tps, "llama_prefill_tokens_per_s": 10.0,
                "slim_prefill_tokens_per_s": 20.0, "ratio_prefill_tokens_per_s": 2.0,
                "llama_peak_rss_bytes": 2**20, "slim_peak_rss_bytes": 2**21}

    rows = {"v-1": row(100.0, 125.0), "v-4": row(1000 / 40, 1000 / 29)}  # llama: 10 ms + 10/block; slim: 8 + 7
    costs = cpu_decode.block_costs(rows, "v")
    assert costs["llama"]["per_block_ms"] == pytest.approx(10) and costs["llama"]["fixed_ms"] == pytest.approx(0)
    assert costs["slim"]["per_block_ms"] == pytest.approx(7) and costs["per_block_ratio"] == pytest.approx(0.7)
    res = {"machine": {"cpu": "x", "cores": 2, "torch": "t"}, "threads": 2, "llama_cpp_commit": "c", "rows": rows,
           "blocks": {"v": costs}, "command": "python benchmarks/cpu_decode.py"}
    md = cpu_decode.table(res)
    assert "**1.25×**" in md and "**0.70×**" in md


def test_compress_blocks_summary_and_table(bench):
    """The scale benchmark's projections and ratios come from its runs (default over paper, blocks x seconds)."""
    import compress_blocks as blocks  # the `bench` fixture put benchmarks/ on sys.path

    runs = [{"shape": "7B", "recipe": r, "compress_seconds": t, "phase_seconds": {"calibrate": 10.0, "solve": t - 10},
             "peak_rss_mib": 2048.0, "peak_gpu_allocated_gib": 3.0, "peak_gpu_reserved_gib": 4.0,
             "mean_rel_err_final": 0.1} for r, t in (("paper", 20.0), ("default", 40.0))]
    s = blocks.summarize(runs)["7B"]
    assert s["default_vs_paper"] == pytest.approx(2.0) and s["default_vs_paper_solve"] == pytest.approx(3.0)
    assert s["projected_minutes"] == {"paper": pytest.approx(32 * 20 / 60), "default": pytest.approx(32 * 40 / 60)}
    res = {"args": {"device": "cuda", "calib_samples": 128, "calib_seqlen": 2048}, "commit": "abc",
           "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "gpu": "H100", "torch": "2", "transformers": "5"},
           "command": "python benchmarks/compress_blocks.py", "runs": runs, "summary": {"7B": s}}
    text = blocks.table(res)
    assert "| 7B | default | 40.0 | 10.0 | 30.0 |" in text
    assert "| LLaMA-2-7B | 32 | 10.7 | 21.3 | 2.00x | 3.00x |" in text
    assert "GPU H100" in text and "3.0 / 4.0" in text


@pytest.mark.slow  # two real `slim compress` runs of a tiny model through the shell script
def test_compress_blocks_script_dry_run_on_cpu(tmp_path, shared_data):
    """benchmarks/compress_blocks_gpu.sh, the one call a lent GPU gets for #47, runs its stages on a CPU."""
    import os
    import subprocess

    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "TEST_S": "300", "BENCH_S": "600", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(BENCH / "compress_blocks_gpu.sh"), "--shapes", "tiny", "--device", "cpu",
                        "--calib-samples", "2", "--calib-seqlen", "32", "--data-dir", str(shared_data)],
                       env=env, cwd=BENCH.parent, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[gpu-tests] rc 0" in r.stdout and "[benchmark] rc 0" in r.stdout, r.stdout[-3000:]
    res = json.loads((tmp_path / "out" / "blocks.json").read_text())
    assert [x["recipe"] for x in res["runs"]] == ["paper", "default"]
    assert all(x["compress_seconds"] > 0 and x["peak_rss_mib"] > 0 and "solve" in x["phase_seconds"]
               for x in res["runs"])
    assert "default_vs_paper" in res["summary"]["tiny"]
