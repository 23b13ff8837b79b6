"""tools/gpu_report.py and bench/targets.py on CPU: the report is a pure function of the results
JSON, so the target checks, the ratios, the file naming and the argument handling are tested here
on a small fake results file; the pytest budget plugin and the benchmarks' selection run in
subprocesses (on this CPU machine every benchmark skips with the reason)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import targets  # noqa: E402
from helpers import load_tool  # noqa: E402


gpu_report = load_tool("gpu_report")


def rec(op, provider, B, ms, D=None, dtype="bf16", mode="fwd+bwd", **extra):
    return {"op": op, "provider": provider, "B": B, "D": D, "dtype": dtype, "mode": mode, "median_ms": ms,
            "p20_ms": None if ms is None else ms * 0.9, "p80_ms": None if ms is None else ms * 1.1,
            "oom": False, "flops": 0.0, "bytes": 3.0 * B * B * 2, **extra}


def fake_results() -> dict:
    records = [
        rec("infonce_terms", "triton", 1024, 0.010, roofline_ms=0.004),  # 40 % of its roofline
        rec("infonce_terms", "eager", 1024, 0.050),  # 5x: met
        rec("infonce_terms", "compiled", 1024, 0.012),  # 1.2x: missed
        rec("infonce_terms", "triton", 1024, 0.020, dtype="fp32"),
        rec("infonce_terms", "eager", 1024, 0.030, dtype="fp32"),
        rec("proxy_argmax", "triton", 8192, 0.1, D=256, mode="fwd"),
        rec("proxy_argmax", "eager", 8192, 0.4, D=256, mode="fwd"),
        rec("proxy_argmax", "compiled", 8192, 0.2, D=256, mode="fwd"),
        rec("sps_reliable_objective", "triton", 128, 0.020, launches=3, graph_ms=0.008),
        rec("sps_reliable_objective", "eager", 128, 0.300, launches=61, graph_ms=0.090),
        rec("infonce_terms_embed", "triton", 8192, 0.40, D=256),  # > 0.31 ms: missed
        rec("infonce_terms_embed", "triton", 32768, 18.0, D=1024, loss_peak_mb=12.5),
        rec("infonce_terms_embed", "eager", 32768, 60.0, D=1024, loss_peak_mb=20480.0),
        rec("infonce_terms_embed", "triton", 65536, 70.0, D=1024, loss_peak_mb=25.0),
        {**rec("infonce_terms_embed", "eager", 65536, None, D=1024), "oom": True},
    ]
    return {"meta": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3",
                     "date": "2026-11-24", "commit": "abc1234", "suite": "targets", "budget_s": 540, "elapsed_s": 500},
            "parity": {"counts": {"passed": 40, "failed": 1, "skipped": 2},
                       "failures": [{"nodeid": "tests/test_kernels_triton.py::test_x[8192]",
                                     "reason": "E  AssertionError: 3 of 9 differ"}],
                       "skip_reasons": [{"reason": gpu_report_budget_reason(), "count": 2}]},
            "bench": {"counts": {"passed": 14, "skipped": 3}, "failures": [],
                      "skip_reasons": [{"reason": "cross_consistency: no Triton kernel yet (ModuleNotFoundError: x)",
                                        "count": 3}]},
            "records": records}


def gpu_report_budget_reason():
    sys.path.insert(0, str(ROOT / "tools"))
    import pytest_budget

    return pytest_budget.BUDGET_REASON


def _row(rows, name):
    (row,) = [r for r in rows if r["target"] == name]
    return row


def test_targets_are_marked_met_missed_or_not_measured_with_the_measured_numbers():
    rows = targets.evaluate(fake_results()["records"])
    r = _row(rows, "infonce_terms B=1024 bf16 fwd+bwd: vs eager")
    assert r["status"] == "met" and r["measured"].startswith("5.00x") and r["required"] == ">= 3x"
    r = _row(rows, "infonce_terms B=1024 bf16 fwd+bwd: vs compiled")
    assert r["status"] == "missed" and r["measured"].startswith("1.20x")
    assert _row(rows, "infonce_terms B=8192 bf16 fwd+bwd: vs eager")["status"] == "not measured"
    assert _row(rows, "cross_consistency B=1024 bf16 fwd+bwd: vs eager")["status"] == "not measured"
    assert _row(rows, "proxy_argmax B=8192 D=256 bf16 fwd: vs eager")["measured"].startswith("4.00x")
    assert _row(rows, "proxy_argmax B=8192 D=256 bf16 fwd: vs compiled")["status"] == "met"
    assert _row(rows, "sps_reliable_objective B=128: time") == {
        "target": "sps_reliable_objective B=128: time", "required": "<= 25.0 µs", "measured": "20.0 µs",
        "status": "met"}
    assert _row(rows, "sps_reliable_objective B=128: launches")["measured"] == "3"
    assert _row(rows, "sps_reliable_objective B=128: in a CUDA graph")["status"] == "met"
    r = _row(rows, "infonce_terms_embed B=8192 D=256: time")
    assert r["status"] == "missed" and r["measured"] == "400.0 µs"
    assert _row(rows, "infonce_terms_embed B=32768 D=1024: time")["status"] == "met"
    r = _row(rows, "infonce_terms_embed B=32768 D=1024: loss-attributable peak")
    assert r["status"] == "met" and r["measured"] == "12.5 MB"
    r = _row(rows, "infonce_terms_embed B=65536: runs")
    assert r["status"] == "met" and "eager out of memory" in r["measured"]


def test_a_missed_limit_and_an_out_of_memory_kernel_are_reported_as_missed():
    records = [rec("sps_reliable_objective", "triton", 128, 0.030, launches=9, graph_ms=0.012),
               {**rec("infonce_terms_embed", "triton", 65536, None, D=1024), "oom": True},
               rec("infonce_terms_embed", "triton", 32768, 30.0, D=1024, loss_peak_mb=41.0)]
    rows = targets.evaluate(records)
    for name in ("sps_reliable_objective B=128: time", "sps_reliable_objective B=128: launches",
                 "sps_reliable_objective B=128: in a CUDA graph", "infonce_terms_embed B=65536: runs",
                 "infonce_terms_embed B=32768 D=1024: time",
                 "infonce_terms_embed B=32768 D=1024: loss-attributable peak"):
        assert _row(rows, name)["status"] == "missed", name


def test_with_no_records_every_target_is_not_measured():
    rows = targets.evaluate([])
    assert rows and {r["status"] for r in rows} == {"not measured"}
    # every op at both speed-up sizes, against both baselines
    for op in targets.MATRIX_OPS + targets.EMBED_OPS:
        assert sum(r["target"].startswith(op + " B=") and ": vs " in r["target"] for r in rows) >= 4, op


def test_markdown_report_holds_environment_targets_times_ratios_and_outcomes():
    md = gpu_report.render(fake_results())
    assert md.startswith("# fastncl GPU report: NVIDIA H100 80GB HBM3, 2026-11-24")
    for text in ("torch 2.11.0+cu130", "Triton 3.6.0", "commit abc1234", "40 passed, 1 failed, 2 skipped",
                 "(2 skipped for the time budget)",
                 "| infonce_terms B=1024 bf16 fwd+bwd: vs compiled | >= 1.5x | 1.20x",
                 "| missed |", "| met |", "| not measured |", "3 × cross_consistency: no Triton kernel yet",
                 "`tests/test_kernels_triton.py::test_x[8192]`: E AssertionError: 3 of 9 differ"):
        assert text in md, text
    assert "{" not in md and "`% of roofline`: the op's bound on this GPU" in md
    table = md[md.index("## Times"):]
    # the B=1024 bf16 row: Triton with its spread, the baselines, both ratios, the % of floor
    (row,) = [line for line in table.splitlines() if line.startswith("| infonce_terms | 1024 | — | bf16 | fwd+bwd |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:10] == ["10.0 µs (9.0 µs–11.0 µs)", "50.0 µs", "12.0 µs", "5.00×", "1.20×"]
    nbytes = 3 * 1024 * 1024 * 2
    assert cells[10] == f"{nbytes / 1e-5 / 1e9:.0f} GB/s"
    assert cells[11] == "40 %"  # the record's roofline_ms over its median
    (row,) = [line for line in table.splitlines() if line.startswith("| infonce_terms | 1024 | — | fp32 | fwd+bwd |")]
    assert [c.strip() for c in row.strip("|").split("|")][11] == "—"  # no bound recorded: no percentage
    (row,) = [line for line in table.splitlines() if line.startswith("| infonce_terms_embed | 65536 |")]
    assert "| OOM |" in row and "| base OOM |" in row
    (row,) = [line for line in table.splitlines() if line.startswith("| sps_reliable_objective | 128 |")]
    assert "8.0 µs / 90.0 µs / —" in row and "3 / 61 / —" in row
    # rows in a fixed order: fused objectives, matrix ops, embedding ops; bf16 before fp32
    ops = [line.split("|")[1].strip() for line in table.splitlines()
           if line.startswith("| ") and "|---" not in line][1:]
    assert ops.index("sps_reliable_objective") < ops.index("infonce_terms") < ops.index("infonce_terms_embed")


def test_result_files_are_named_by_gpu_and_date_and_written_to_every_folder(tmp_path):
    assert gpu_report.result_name("NVIDIA H100 80GB HBM3", "2026-11-24") == "nvidia-h100-80gb-hbm3-2026-11-24"
    assert gpu_report.slug("  ") == "unknown"
    results = fake_results()
    paths = gpu_report.write_results(results, [tmp_path / "results", tmp_path / "out"], "nvidia-h100-2026-11-24")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        "out/nvidia-h100-2026-11-24.json", "out/nvidia-h100-2026-11-24.md",
        "results/nvidia-h100-2026-11-24.json", "results/nvidia-h100-2026-11-24.md"]
    written = json.loads((tmp_path / "out" / "nvidia-h100-2026-11-24.json").read_text())
    assert written == results
    assert (tmp_path / "results" / "nvidia-h100-2026-11-24.md").read_text() == gpu_report.render(written)
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_render_option_rewrites_the_markdown_of_a_results_file(tmp_path, capsys):
    path = tmp_path / "gpu-2026-11-24.json"
    path.write_text(json.dumps(fake_results()))
    assert gpu_report.main(["--render", str(path)]) == 0
    assert path.with_suffix(".md").read_text() == gpu_report.render(fake_results())


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "is not JSON"), ('{"meta": {}}', "no 'records' list")])
def test_render_of_a_bad_file_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert gpu_report.main(["--render", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path) in err
    assert not path.with_suffix(".md").exists()


@pytest.mark.parametrize("argv, message", [
    (["--suite", "all"], "invalid choice"), (["--budget", "20"], "--budget must be above"),
    (["--parity-budget", "0"], "--parity-budget must be positive"),
    (["--skip-parity", "--skip-bench"], "leave nothing to run")])
def test_bad_arguments_exit_with_code_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gpu_report.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_without_a_gpu_the_run_stops_with_a_one_line_error(tmp_path, capsys):
    assert gpu_report.main(["--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results")]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_outcomes_are_summarized_and_a_cut_jsonl_line_is_ignored(tmp_path):
    path = tmp_path / "o.jsonl"
    lines = [{"nodeid": "a", "outcome": "passed"}, {"nodeid": "b", "outcome": "failed", "reason": "E boom"},
             {"nodeid": "c", "outcome": "skipped", "reason": "r1"},
             {"nodeid": "d", "outcome": "skipped", "reason": "r1"},
             {"nodeid": "e", "outcome": "error", "reason": "E setup"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"nodeid": "f", "outc')
    summary = gpu_report.summarize_outcomes(gpu_report.read_jsonl(path))
    assert summary == {"counts": {"passed": 1, "failed": 1, "skipped": 2, "error": 1},
                       "failures": [{"nodeid": "b", "reason": "E boom"}, {"nodeid": "e", "reason": "E setup"}],
                       "skip_reasons": [{"reason": "r1", "count": 2}]}


def _pytest(args, cwd, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "tools"), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "pytest_budget", "-q", "-p", "no:cacheprovider",
                           *args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def test_budget_plugin_skips_tests_after_the_deadline_and_streams_outcomes(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "def test_skip():\n    pytest.skip('not today')\n")
    out = tmp_path / "open.jsonl"
    _pytest(["test_sample.py"], tmp_path, FASTNCL_OUTCOMES=str(out), FASTNCL_DEADLINE=str(time.time() + 600))
    got = {o["nodeid"].split("::")[1]: o for o in gpu_report.read_jsonl(out)}
    assert {k: o["outcome"] for k, o in got.items()} == {
        "test_ok": "passed", "test_bad": "failed", "test_skip": "skipped"}
    assert "one is not two" in got["test_bad"]["reason"] and got["test_skip"]["reason"] == "not today"

    out = tmp_path / "late.jsonl"
    _pytest(["test_sample.py"], tmp_path, FASTNCL_OUTCOMES=str(out), FASTNCL_DEADLINE=str(time.time() - 1))
    got = gpu_report.read_jsonl(out)
    assert len(got) == 3 and {(o["outcome"], o["reason"]) for o in got} == {("skipped", gpu_report_budget_reason())}


def test_target_benchmarks_run_first_and_every_benchmark_skips_without_a_gpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this checks the CPU behaviour")
    out = tmp_path / "bench.jsonl"
    r = _pytest(["bench/", "--ignore", "bench/bench_train_cpu.py", "-m", "target", "-p", "no:randomly"], ROOT,
                FASTNCL_OUTCOMES=str(out))
    assert r.returncode == 0, r.stdout[-2000:]
    got = gpu_report.read_jsonl(out)
    assert len(got) > 50 and {o["outcome"] for o in got} == {"skipped"}
    assert all("no CUDA GPU" in o["reason"] for o in got)
    ids = [o["nodeid"] for o in got]
    assert "sps_reliable_objective-B128-bf16-fwd+bwd-triton" in ids[0]
    for needed in ("infonce_terms_embed-B65536-D1024-bf16-fwd+bwd-eager",
                   "infonce_terms_embed-B8192-D256-bf16-fwd+bwd-triton",
                   "proxy_argmax-B1024-D256-bf16-fwd-compiled", "triplet_terms-B8192-bf16-fwd+bwd-eager"):
        assert any(needed in i for i in ids), needed
    assert not any("fp32" in i or "-B128-" in i and "sps" not in i for i in ids)


def test_a_whole_run_writes_results_and_logs_on_a_machine_that_skips_everything(tmp_path, monkeypatch, capsys):
    """The orchestration end to end on CPU: environment faked as a GPU machine; the parity tests
    (here the CUDA-graph file only) and three benchmarks run in their subprocesses and skip."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this checks the CPU behaviour")
    monkeypatch.setattr(gpu_report, "environment", lambda: {"gpu": "Fake GPU 80GB", "torch": "t", "triton": "x",
                                                            "python": "3", "cuda": None})
    out, results_dir = tmp_path / "out", tmp_path / "results"
    code = gpu_report.main(["--out", str(out), "--results-dir", str(results_dir), "--commit", "deadbee",
                            "--parity-tests", "tests/test_cuda_graph_sps.py",
                            "-k", "infonce_terms and B1024 and not embed", "--budget", "300"])
    assert code == 0
    (json_path,) = results_dir.glob("fake-gpu-80gb-*.json")
    results = json.loads(json_path.read_text())
    assert results["meta"]["commit"] == "deadbee"
    assert results["meta"]["parity_tests"] == ["tests/test_cuda_graph_sps.py"]
    assert results["meta"]["select"] == "infonce_terms and B1024 and not embed"
    assert results["parity"]["counts"] == {"skipped": 4}
    assert results["bench"]["counts"] == {"skipped": 3} and results["records"] == []
    assert "no CUDA GPU" in results["bench"]["skip_reasons"][0]["reason"]
    # pytest-benchmark writes its raw JSON for a session that skipped every benchmark in some
    # environments and not in others: it may be there, the rest must
    assert sorted(p.name for p in out.iterdir() if p.name != "bench-raw.json") == sorted(
        ["bench.log", "parity.log", json_path.name, json_path.with_suffix(".md").name])
    assert (out / json_path.with_suffix(".md").name).read_text() == gpu_report.render(results)
    assert "| not measured |" in capsys.readouterr().out


def test_tests_failing_after_a_fatal_cuda_error_run_again_once_in_a_fresh_process(tmp_path):
    """A CUDA error such as an illegal address poisons the process: the tests failing after it run
    again in a new process (here: test_b and test_c pass there; test_d fails again and is not
    retried a second time; test_a, the first to fail with the error, keeps its failure)."""
    (tmp_path / "test_poison.py").write_text(
        "POISONED = []\n"
        "def test_a():\n    POISONED.append(1)\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "def test_b():\n    assert not POISONED, 'CUDA error: an illegal memory access was encountered'\n"
        "def test_c():\n    assert not POISONED\n"
        "def test_d():\n    assert False, 'a plain failure'\n")
    outcomes = tmp_path / "o.jsonl"
    note = gpu_report.run_phase([str(tmp_path / "test_poison.py")], ["-p", "no:cacheprovider"],
                                deadline=time.time() + 120, log_path=tmp_path / "log", outcomes=outcomes, env_extra={})
    lines = gpu_report.read_jsonl(outcomes)
    runs = Counter(o["nodeid"].split("::")[1] for o in lines)
    assert runs == {"test_a": 1, "test_b": 2, "test_c": 2, "test_d": 2}
    final = {o["nodeid"].split("::")[1]: o["outcome"] for o in gpu_report.latest_outcomes(lines)}
    assert final == {"test_a": "failed", "test_b": "passed", "test_c": "passed", "test_d": "failed"}
    assert "3 failed tests after it ran again" in note
    assert gpu_report.summarize_outcomes(lines)["counts"] == {"failed": 2, "passed": 2}
    assert (tmp_path / "log").read_text().count("$ ") == 2
