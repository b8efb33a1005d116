"""The GPU check (benchmarks/gpu_check.sh) end to end on the CPU at tiny sizes, and its parts.

Nobody can run the real check before a GPU session; this keeps its driver, the benchmark options it
uses (several dtypes, equivalence on a slice, a time budget, the largest batch) and its output
layout working in CI, so the one GPU run does not fail on a broken script.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import render_benchmarks  # noqa: E402
from _capacity import fit_largest_batch  # noqa: E402


def _run_smoke(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               TMPDIR=str(tmp_path))
    env.pop("GPU_CHECK_T0", None)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_smoke_run_writes_one_folder_with_both_tables(tmp_path):
    # the pytest phase is left out here: pytest inside pytest adds minutes and only re-checks collection
    result = _run_smoke(tmp_path, "--phases", "environment", "encoder", "step", "data")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    folder = tmp_path / "out" / "cpu_smoke"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["data/reference.json", "encoder/results.json", "encoder/speedup_vs_mask_ratio.png", "gpu_check.md",
                     "step/peak_memory.png", "step/results.json"]

    encoder = json.loads((folder / "encoder" / "results.json").read_text())
    records = encoder["records"]
    assert {r["dtype"] for r in records} == {"fp32", "bf16"}
    measured = {r["backend"] for r in records}
    assert {"masked", "sparse"} <= measured
    failed = {f["variant"] for f in encoder["meta"]["failed"]}
    for variant in gpu_check.ENCODER_VARIANTS:               # each one measured, or skipped/failed with a reason
        assert variant in measured or encoder["meta"]["skipped"].get(variant) or variant in failed, variant
    assert all(r["equivalence"]["masked_sites_nonzero"] == 0 for r in records)
    assert encoder["meta"]["check_batch"] == gpu_check.SMOKE.check_batch

    step = json.loads((folder / "step" / "results.json").read_text())["records"]
    assert {r["backend"] for r in step} == {"masked"} | {f"recipe:{r}" for r in gpu_check.STEP_RECIPES}
    for record in step:
        assert set(record["capacity"]) >= {"batch_sizes", "peak_growth_mb", "per_image_mb", "max_batch"}
        assert record["capacity"]["batch_sizes"] == [gpu_check.SMOKE.batch // 2, gpu_check.SMOKE.batch]

    summary = (folder / "gpu_check.md").read_text()
    assert "SMOKE" in summary
    assert "\nModel families this timm cannot build (left out): none\n" in summary, summary
    for phase in ("install", "environment", "encoder", "step", "data"):
        assert f"| {phase} | ok |" in summary, summary
    loader = json.loads((folder / "data" / "reference.json").read_text())["values"]["loader"]
    fast = next(r for r in step if r["backend"] == "recipe:fast@bf16")
    assert f"\nLoader: 1 worker {loader['workers_1_uint8_images_per_s']:.0f} images/s (SparK's float32 batches: " \
           f"{loader['workers_1_float32_images_per_s']:.0f}); the step `fast@bf16` takes tiny_cnn " \
           f"{fast['images_per_s']:.0f} images/s.\n" in summary, summary

    # what a GPU session does next: copy both folders into the results and render the page's GPU section
    results = tmp_path / "results"
    for what in ("encoder", "step", "data"):
        shutil.copytree(folder / what, results / f"gpu_smoke_{what}")
    (results / "gpu_smoke_check").mkdir()
    shutil.copy(folder / "gpu_check.md", results / "gpu_smoke_check")
    page = render_benchmarks.render("{{gpu gpu}}", render_benchmarks.load_results(results))
    assert "encoder fwd+bwd `auto` >= 1.5x `masked`, tiny_cnn fp32 mask 0.6" in page, page
    assert "step `fast@bf16` >= 3x `spark` images/s, tiny_cnn" in page, page
    assert "| tiny_cnn | auto | 0.6 | bf16 |" in page and "| tiny_cnn | recipe:fast@bf16 |" in page, page
    assert "Largest batch at equal memory" in page, page
    assert "\npytest -m gpu: " in page and "\nDevice: " in page and "\nLoader: 1 worker " in page, page
    assert "#### Data loading on that machine's CPUs (`benchmarks/results/gpu_smoke_data/`)" in page, page
    assert "| DataLoader, 1 worker, uint8 batches |" in page, page


_FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for the GPU image's python: logs each call; the image's setuptools builds (or not) as told
echo "$*" >> "$CALLS"
case "$*" in
    *"import spark_sparse.kernels"*) exit 1 ;;
    *--no-build-isolation*) exit "$IMAGE_BUILD_RC" ;;
    *--find-links*) exit 0 ;;
    *gpu_check.py*) echo "install=$GPU_CHECK_INSTALL_STATUS note=$GPU_CHECK_INSTALL_NOTE"; exit 0 ;;
esac
exit 3
"""


@pytest.mark.parametrize("image_builds,carried,status,note", [
    (True, True, "ok", "project installed (editable)"),
    (False, True, "ok", "built with the carried setuptools, the image's failed"),
    (False, False, "failed", "no setuptools wheel in"),
], ids=["image-setuptools", "carried-setuptools", "neither"])
def test_install_falls_back_to_the_carried_setuptools_only_when_the_images_cannot_build(
        tmp_path, image_builds, carried, status, note):
    """pyproject.toml needs setuptools >= 77, which the GPU image may lack: the retry must use the carried wheel
    (an isolated build), and only after the image's own build failed."""
    python = tmp_path / "python"
    python.write_text(_FAKE_PYTHON)
    python.chmod(0o755)
    build_wheels = tmp_path / "build"
    build_wheels.mkdir()
    if carried:
        (build_wheels / "setuptools-84.2.1-py3-none-any.whl").write_bytes(b"")
    calls = tmp_path / "calls"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OUT=str(tmp_path / "out"), PYTHON=str(python), CALLS=str(calls),
               IMAGE_BUILD_RC="0" if image_builds else "1", GPU_CHECK_BUILD_WHEELS=str(build_wheels))
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"install={status} " in result.stdout and note in result.stdout, result.stdout
    retried = [line for line in calls.read_text().splitlines() if "--find-links" in line]
    assert retried == ([] if image_builds or not carried else
                       [f"-m pip install -q --no-index --find-links {build_wheels} --no-deps -e ."])


def test_a_phase_past_its_deadline_is_killed_with_what_it_started(tmp_path):
    marker = tmp_path / "child_alive"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"'import time, pathlib; time.sleep(8); pathlib.Path(r\"{marker}\").touch()']); time.sleep(60)")
    started = time.time()
    result, _ = gpu_check.run_phase("sleepy", [sys.executable, "-c", script], timeout=5, budget=5)
    assert result.status == "timed out" and time.time() - started < 20
    time.sleep(5)
    assert not marker.exists(), "the phase's child process outlived the deadline"


def test_a_check_ended_by_sigterm_kills_the_running_phase_with_what_it_started(tmp_path):
    """``timeout`` or a job's end sends SIGTERM to the check (gpu_check.sh execs it): its phase, in a session of
    its own, must not go on running without it."""
    import signal
    import threading

    marker = tmp_path / "child_alive"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"'import time, pathlib; time.sleep(8); pathlib.Path(r\"{marker}\").touch()']); time.sleep(60)")
    previous = signal.signal(signal.SIGTERM, gpu_check._exit_on_sigterm)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(SystemExit) as ended:
            gpu_check.run_phase("sleepy", [sys.executable, "-c", script], timeout=60, budget=60)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert ended.value.code == 128 + signal.SIGTERM
    time.sleep(8)
    assert not marker.exists(), "the phase's child process outlived the check"


def test_a_phase_with_no_time_left_is_skipped():
    result, _ = gpu_check.run_phase("late", [sys.executable, "-c", "pass"], timeout=1, budget=30)
    assert result.status == "skipped" and "no time left" in result.note


def test_unused_phase_time_rolls_over_to_the_next_phases():
    clock = gpu_check.Clock(100.0, {"install": 10, "environment": 20, "pytest": 30})
    assert [clock.deadline(p) for p in ("install", "environment", "pytest")] == [110, 130, 160]


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                           ("Tesla V100-SXM2-16GB", "v100")])
def test_folder_is_named_after_the_card(name, expected):
    assert gpu_check.slug(name) == expected


def test_largest_batch_is_the_linear_fit_within_the_budget():
    fit = fit_largest_batch({64: 1000 + 64 * 10, 128: 1000 + 128 * 10}, persistent_mb=500, budget_mb=10_000)
    assert fit["per_image_mb"] == pytest.approx(10) and fit["fixed_mb"] == pytest.approx(1000)
    assert fit["max_batch"] == 850


def test_largest_batch_is_not_made_up_when_memory_does_not_grow_with_the_batch():
    fit = fit_largest_batch({2: 100.0, 4: 90.0}, persistent_mb=10, budget_mb=1000)
    assert fit["max_batch"] is None and "did not increase" in fit["why"]


def test_targets_compare_what_was_measured_with_the_issue():
    encoder = [dict(model="resnet50", backend="auto", mask_ratio=0.6, dtype="bf16", fwd_bwd_ms=50.0, speedup_vs_masked=1.8),
               dict(model="resnet50", backend="spconv", mask_ratio=0.6, dtype="bf16", fwd_bwd_ms=60.0,
                    speedup_vs_masked=1.5)]
    step = [dict(model="resnet50", backend="recipe:spark", images_per_s=100.0, capacity=dict(max_batch=400)),
            dict(model="resnet50", backend="recipe:fast@bf16", images_per_s=250.0, capacity=dict(max_batch=800))]
    rows = gpu_check.targets(encoder, step)
    assert "1.80x; spconv 50.0 vs 60.0 ms: faster | met" in rows[0]
    assert "2.50x (250 vs 100) | not met" in rows[1]
    assert "2.00x (800 vs 400) | met" in rows[2]


@pytest.mark.parametrize("plugins", [True, False], ids=["xdist-and-timeout", "neither"])
def test_pytest_phase_uses_several_processes_and_a_timeout_where_the_plugins_are(monkeypatch, plugins):
    monkeypatch.setattr(gpu_check, "importable", lambda python, module: plugins)
    cmd = gpu_check.pytest_command("python3", gpu_check.GPU)
    assert cmd[:5] == ["python3", "-m", "pytest", "-m", "gpu"] and cmd[-1] == "tests"
    assert (cmd[cmd.index("-n") + 1] == "4" if plugins else "-n" not in cmd)
    assert ("--timeout" in cmd) == plugins


def test_xdist_progress_lines_are_kept_out_of_the_console_but_failures_are_shown():
    show = gpu_check._pytest_line_worth_showing
    assert not show("[gw0] [ 50%] PASSED tests/test_gpu.py::test_x[fp32] \n")
    assert not show("[gw1] [100%] SKIPPED tests/test_gpu.py::test_y \n")
    assert show("[gw1] [ 75%] FAILED tests/test_gpu.py::test_z[bf16] \n")
    assert gpu_check.pytest_summary("[gw0] [100%] PASSED tests/t.py::a \n== 1 passed, 3 skipped in 4.84s ==\n") \
        == "1 passed, 3 skipped in 4.84s"


def test_pytest_summary_line_is_found():
    log = "tests/test_gpu.py::test_x PASSED\n==== 3 passed, 2 skipped in 1.20s ====\n"
    assert gpu_check.pytest_summary(log) == "3 passed, 2 skipped in 1.20s"


def test_benchmark_budget_stops_before_the_next_configuration_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--models", "tiny_cnn",
                             "--input-size", "64", "--batch-size", "2", "--mask", "0.6", "0.75", "--backends", "masked",
                             "--repeats", "1", "--warmup", "0", "--memory", "off", "--budget-s", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["mask_ratio"] for r in data["records"]] == [0.6]
    assert [(u["mask_ratio"], u["why"].split(":")[0]) for u in data["meta"]["not_run"]] == [(0.75, "time budget")]
    assert "Not run:" in (tmp_path / "results.md").read_text()
