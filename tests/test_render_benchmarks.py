"""BENCHMARKS.md is generated from committed result files: every figure traceable to a recorded run."""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import render_benchmarks as rb  # noqa: E402


def _record(model, backend, mask, fwd_bwd, peak, speedup):
    return {"model": model, "backend": backend, "mask_ratio": mask, "dtype": "fp32", "fwd_ms": fwd_bwd / 3,
            "fwd_bwd_ms": fwd_bwd, "step_ms": None, "images_per_s": 8000 / fwd_bwd, "speedup_vs_masked": speedup,
            "peak_mem_mb": peak, "max_abs_err": 1e-9, "max_rel_err": 2e-6, "fp32_noise_floor": {"max_rel_err": 5e-2}}


def _results(root: Path, name: str, commit="0123456789abcdef", dirty=False) -> Path:
    meta = {"command": "/some/venv/bin/python benchmarks/compare_backends.py --models resnet50 --out x",
            "what": "encoder", "device": "cpu", "threads": 2, "repeats": 3, "warmup": 1, "seconds": 90.0,
            "memory_method": "peak growth", "skipped": {}, "machine": {"cpu": "Test CPU", "cores": 4, "python": "3.11.7"},
            "versions": {"torch": "9.9", "spconv": None},
            "provenance": {"git_commit": commit, "git_dirty": dirty, "date": "2026-11-26T10:00:00+00:00"}}
    records = [_record("resnet50", "masked", 0.6, 1600.0, 1000.0, 1.0), _record("resnet50", "sparse", 0.6, 800.0, 500.0, 2.0)]
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"meta": meta, "records": records}))
    return root


def test_the_committed_benchmarks_page_is_what_the_committed_results_give():
    assert rb.main(["--check"]) == 0, "BENCHMARKS.md was edited by hand or the results changed: re-render it"


def test_a_run_renders_its_command_provenance_and_table(tmp_path):
    results = rb.load_results(_results(tmp_path, "cpu_x", dirty=True))
    text = rb.render("{{run cpu_x}}", results)
    assert "python benchmarks/compare_backends.py --models resnet50 --out x" in text     # interpreter path dropped
    assert "commit 0123456789 (with uncommitted changes)" in text and "Test CPU (4 cores)" in text
    assert "torch 9.9" in text and "spconv" not in text
    assert "| resnet50 | sparse | 0.6 | fp32 | 267 | 800 | - | 10.0 | 2.00x | 500 | 1.0e-09 | 2.0e-06 | 5.0e-02 |" in text


@pytest.mark.parametrize("changed, state", [
    (None, "with uncommitted changes"),
    (["benchmarks/results/cpu_a/results.json", "BENCHMARKS.md", "tests/test_x.py"],
     "uncommitted changes to results, the benchmarks page or tests only"),
    (["benchmarks/results/cpu_a/results.json", "spark_sparse/autotune/guard.py"],
     "with uncommitted changes to spark_sparse/autotune/guard.py"),
])
def test_the_provenance_says_whether_uncommitted_changes_could_touch_the_measured_code(changed, state):
    prov = {"git_commit": "0123456789abcdef", "git_dirty": True, "git_changed_files": changed}
    assert rb._tree_state(prov) == state
    assert rb._tree_state({**prov, "git_dirty": False}) == "clean tree"


def test_figures_in_prose_come_from_the_records_and_judge_their_target(tmp_path):
    results = rb.load_results(_results(tmp_path, "cpu_x"))
    template = ("{{value cpu_x model=resnet50 variant=sparse mask=0.6 field=speedup_vs_masked suffix=x target=>=2.5}}; "
                "{{ratio cpu_x model=resnet50 mask=0.6 field=peak_mem_mb num=sparse den=masked suffix=x target=<=0.6}}; "
                "{{value cpu_x model=resnet50 variant=sparse mask=0.6 field=fwd_bwd_ms fmt=.0f suffix=' ms'}}")
    assert rb.render(template, results).splitlines()[-1] == \
        "2.00x (target ≥ 2.5x: not met); 0.50x (target ≤ 0.6x: met); 800 ms"


def test_worst_row_compares_a_variant_with_the_fastest_of_others_on_every_configuration(tmp_path):
    root = _results(tmp_path, "cpu_x")
    data = json.loads((root / "cpu_x" / "results.json").read_text())
    data["records"] += [_record("resnet50", "auto", 0.6, 760.0, 500.0, 2.1),        # 800 / 760 = 1.05
                        _record("convnext", "masked", 0.6, 1000.0, 900.0, 1.0),
                        _record("convnext", "sparse", 0.6, 1100.0, 600.0, 0.9),
                        _record("convnext", "auto", 0.6, 1040.0, 600.0, 0.96)]     # 1000 / 1040 = 0.96
    (root / "cpu_x" / "results.json").write_text(json.dumps(data))
    text = rb.render("{{worst cpu_x variant=auto against=masked,sparse field=fwd_bwd_ms fmt=.3f suffix=x "
                     "target=>=0.95}}", rb.load_results(root))
    assert text.splitlines()[-1] == "0.962x (target ≥ 0.95x: met)"


def test_results_not_committed_say_so_and_unmentioned_ones_are_appended(tmp_path):
    results = rb.load_results(_results(tmp_path, "gpu_h100"))
    text = rb.render("{{run cpu_missing}} {{ref cpu_missing key=a.b}}", results)
    assert "No committed results in `benchmarks/results/cpu_missing/` (not measured yet)" in text
    assert "(not measured yet)" in text
    assert "## Other committed results" in text and "### `gpu_h100`" in text and "| resnet50 | sparse |" in text


@pytest.mark.parametrize("template,error", [("{{speed cpu_x}}", "unknown directive"),
                                            ("{{value cpu_x model=resnet50 variant=torch mask=0.6 field=fwd_ms}}",
                                             "no record"),
                                            ("{{value cpu_x model=resnet50 variant=sparse mask=0.6 field=fwd_ms "
                                             "target=2}}", "target=")])
def test_template_mistakes_are_errors_not_silent_gaps(tmp_path, template, error):
    with pytest.raises(rb.TemplateError, match=error):
        rb.render(template, rb.load_results(_results(tmp_path, "cpu_x")))


def test_reference_points_write_a_file_the_renderer_reads(tmp_path):
    import reference_points
    reference_points.main(["--quick", "--sections", "matmul", "gemm", "--out", str(tmp_path / "cpu_ref")])
    results = rb.load_results(tmp_path)
    text = rb.render("{{run cpu_ref}}\n{{ref cpu_ref key=gemm.onednn_gflops_max fmt=.3f}}", results)
    assert "Square matmul" in text and "oneDNN 1x1 conv" in text and "reference_points.py --quick" in text
    assert float(text.splitlines()[-1]) > 0


def _errors(**groups):
    return {"errors": {name: {"max_abs": value, "max_rel": 0.5} for name, value in groups.items()}}


def test_x_floor_is_the_worst_groups_abs_error_over_maskeds_fp32_floor():
    from _report import error_vs_floor

    record = {"dtype": "fp32", "equivalence": _errors(loss=2e-7, grad_input=3e-6, grad_params=0.0),
              "fp32_noise_floor": _errors(loss=4e-7, grad_input=1e-6, grad_params=1e-5)}
    assert error_vs_floor(record) == pytest.approx(3.0)                   # grad_input: 3e-6 / 1e-6
    assert error_vs_floor({**record, "equivalence": _errors(loss=0.0, grad_input=0.0)}) == 0.0
    # a floor below fp32's roundoff of the largest value (here max_abs / max_rel = 2e-9) counts as that
    assert error_vs_floor({**record, "equivalence": _errors(loss=1e-9),
                           "fp32_noise_floor": _errors(loss=0.0)}) == pytest.approx(0.5 / 2 ** -24)
    one_step = {"loss": {"max_abs": 2.0 ** -23, "max_rel": 2.0 ** -23}}        # a loss of 1, one fp32 step off
    assert error_vs_floor({**record, "equivalence": {"errors": one_step},
                           "fp32_noise_floor": _errors(loss=1e-9)}) == pytest.approx(2.0)
    assert error_vs_floor({**record, "equivalence": {"errors": {"loss": {"max_abs": 1e-9, "max_rel": 0.0}}},
                           "fp32_noise_floor": _errors(loss=0.0)}) == float("inf")
    assert error_vs_floor({**record, "dtype": "bf16"}) is None           # the floor is an fp32 one
    assert error_vs_floor({"dtype": "fp32"}) is None


def test_the_worst_group_names_where_x_floor_comes_from():
    from _report import worst_group

    record = {"dtype": "fp32", "equivalence": _errors(loss=2e-7, grad_input=3e-6),
              "fp32_noise_floor": _errors(loss=4e-7, grad_input=1e-6)}
    assert worst_group(record) == "grad_input"
    assert worst_group({**record, "equivalence": _errors(loss=0.0)}) == "-"
    fp64 = {"dtype": "fp64", "equivalence": {"errors": {"loss": {"max_abs": 1e-15, "max_rel": 1e-15},
                                                        "grad_params": {"max_abs": 1e-16, "max_rel": 1e-9}}}}
    assert worst_group(fp64) == "grad_params"


@pytest.mark.parametrize("weights, note", [(None, "these errors do not cover them"),      # runs before --weights
                                           ("init", "these errors do not cover them"),
                                           ("branches-on", "drawn from U(0.5, 1.5)")])
def test_a_speed_table_says_which_weights_its_errors_were_measured_on(tmp_path, weights, note):
    root = _results(tmp_path, "cpu_x")
    data = json.loads((root / "cpu_x" / "results.json").read_text())
    if weights:
        data["meta"]["weights"] = weights
    (root / "cpu_x" / "results.json").write_text(json.dumps(data))
    errors_line = next(line for line in rb.render("{{run cpu_x}}", rb.load_results(root)).splitlines()
                       if line.startswith("Errors:"))
    assert note in errors_line


def test_an_equivalence_run_renders_errors_without_timing_columns(tmp_path):
    root = _results(tmp_path, "cpu_eq")
    data = json.loads((root / "cpu_eq" / "results.json").read_text())
    data["meta"].update(what="equivalence", weights="branches-on")
    for record in data["records"]:
        record.update(batch_size=2, switched_on=69, fwd_ms=None, fwd_bwd_ms=None, speedup_vs_masked=None,
                      equivalence={**_errors(loss=2e-7, grad_input=3e-6), "masked_sites_nonzero": 0},
                      fp32_noise_floor={"max_rel_err": 5e-2, **_errors(loss=4e-7, grad_input=1e-6)})
    (root / "cpu_eq" / "results.json").write_text(json.dumps(data))
    text = rb.render("{{run cpu_eq}}", rb.load_results(root))
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert "ms" not in header and "speed-up" not in header and header.endswith("| masked sites nonzero |")
    assert "| resnet50 | sparse | 0.6 | fp32 | 2 | 69 | 1.0e-09 | 2.0e-06 | 5.0e-02 | 3.00 | grad_input | 0 |" in text


def test_the_largest_x_floor_and_the_masked_site_count_come_from_every_row(tmp_path):
    root = _results(tmp_path, "cpu_eq")
    data = json.loads((root / "cpu_eq" / "results.json").read_text())
    floor = {"max_rel_err": 5e-2, **_errors(loss=1e-7, grad_input=1e-6)}
    for record, (loss, grad, nonzero) in zip(data["records"], [(3e-7, 1e-6, 0), (1e-7, 2e-6, 2)]):
        record.update(equivalence={**_errors(loss=loss, grad_input=grad), "masked_sites_nonzero": nonzero},
                      fp32_noise_floor=floor)
    data["records"].append({**data["records"][1], "backend": "auto",
                            "equivalence": {**_errors(loss=1e-7), "masked_sites_nonzero": 0}})
    (root / "cpu_eq" / "results.json").write_text(json.dumps(data))
    results = rb.load_results(root)
    text = rb.render("{{maxfloor cpu_eq}} {{maxfloor cpu_eq variant=auto}} {{nonzero cpu_eq fmt=d}}", results)
    assert text.splitlines()[-1] == "2.00 1.00 2"          # masked's own 3.00 is not a variant's error
    data["meta"].update(what="equivalence", reference="sparse")      # --reference sparse: masked is a variant
    for record in data["records"]:
        record.update(batch_size=2)
    (root / "cpu_eq" / "results.json").write_text(json.dumps(data))
    results = rb.load_results(root)
    assert rb.render("{{maxfloor cpu_eq}}", results).splitlines()[-1] == "3.00"
    assert "Errors against `sparse` (`--reference sparse`)" in rb.render("{{run cpu_eq}}", results)


def test_the_table_shows_x_floor_per_row(tmp_path):
    results = rb.load_results(_results(tmp_path, "cpu_x"))
    header = next(line for line in rb.render("{{run cpu_x}}", results).splitlines() if line.startswith("| model"))
    assert header.endswith("| x floor |")


@pytest.mark.parametrize("value, target, text", [
    (0.94969, ">=0.95", "0.9497x (target ≥ 0.95x: not met)"),    # .2f would print 0.95 next to "not met"
    (1.99951, ">=2.0", "1.9995x (target ≥ 2x: not met)"),
    (0.60004, "<=0.6", "0.60004x (target ≤ 0.6x: not met)"),
    (0.9512, ">=0.95", "0.95x (target ≥ 0.95x: met)"),           # consistent at two digits: left alone
])
def test_a_figure_never_rounds_across_its_target(value, target, text):
    assert rb._with_target(value, ".2f", target, "x") == text


def test_nested_fields_and_counts_come_from_the_record(tmp_path):
    root = _results(tmp_path, "cpu_x")
    data = json.loads((root / "cpu_x" / "results.json").read_text())
    data["records"][1]["autotune"] = {"peak_mb": {"tuned": 995.498}, "moved_for_memory": {"a": "gemm", "b": "spconv"}}
    (root / "cpu_x" / "results.json").write_text(json.dumps(data))
    results = rb.load_results(root)
    template = ("{{value cpu_x model=resnet50 variant=sparse mask=0.6 field=autotune.peak_mb.tuned fmt=.0f}} MB, "
                "{{count cpu_x model=resnet50 variant=sparse mask=0.6 field=autotune.moved_for_memory fmt=d}} moved")
    assert rb.render(template, results).splitlines()[-1] == "995 MB, 2 moved"
    with pytest.raises(rb.TemplateError, match="autotune.peak_mb.static"):
        rb.render("{{value cpu_x model=resnet50 variant=sparse mask=0.6 field=autotune.peak_mb.static}}", results)


def _gpu_results(root: Path, card: str, encoder: list[dict], step: list[dict]) -> Path:
    for what, records in (("encoder", encoder), ("step", step)):
        _results(root, f"gpu_{card}_{what}")
        path = root / f"gpu_{card}_{what}" / "results.json"
        data = json.loads(path.read_text())
        data["meta"]["machine"]["gpu"] = "NVIDIA H100 80GB HBM3"
        data["records"] = records
        path.write_text(json.dumps(data))
    return root


def test_gpu_checks_render_per_card_with_each_targets_verdict(tmp_path):
    def record(backend, dtype, fwd_bwd, speedup, **extra):
        return dict(_record("resnet50", backend, 0.6, fwd_bwd, 1000.0, speedup), dtype=dtype, **extra)
    encoder = [record("masked", "bf16", 90.0, 1.0), record("auto", "bf16", 50.0, 1.8), record("spconv", "bf16", 60.0, 1.5)]
    def capacity(max_batch, per_image):
        return {"batch_sizes": [64, 128], "peak_growth_mb": [64 * per_image, 128 * per_image], "per_image_mb": per_image,
                "fixed_mb": 0.0, "persistent_mb": 500.0, "max_batch": max_batch, "why": ""}
    step = [record("recipe:spark", "fp32", 800.0, 1.0, capacity=capacity(400, 180.0)),
            record("recipe:fast@bf16", "bf16", 400.0, 2.0, capacity=capacity(800, 90.0))]
    root = _gpu_results(tmp_path, "h100", encoder, step)
    (root / "gpu_h100_check").mkdir()
    (root / "gpu_h100_check" / "gpu_check.md").write_text(
        "# GPU check\n\nDevice: NVIDIA H100 80GB HBM3 (capability 9.0, 81559 MB), driver 580\n\n"
        "pytest -m gpu: 120 passed, 3 skipped in 95.1s\n")
    (root / "gpu_h100_check" / "pytest_gpu.log").write_text("...\n")
    text = rb.render("## GPU\n\n{{gpu gpu}}\n", rb.load_results(root))
    assert "### NVIDIA H100 80GB HBM3" in text
    assert "\nDevice: NVIDIA H100 80GB HBM3 (capability 9.0, 81559 MB), driver 580\n\npytest -m gpu: 120 passed, " \
           "3 skipped in 95.1s\n" in text
    assert "`benchmarks/results/gpu_h100_check/`" in text
    assert "| encoder fwd+bwd `auto` >= 1.5x `masked`, resnet50 bf16 mask 0.6 | 1.80x; spconv 50.0 vs 60.0 ms: faster " \
           "| met |" in text
    assert "| step `fast@bf16` >= 3x `spark` images/s, resnet50 | 2.00x (20 vs 10) | not met |" in text
    assert "| largest batch at equal memory `fast@bf16` >= 1.5x `spark`, resnet50 | 2.00x (800 vs 400) | met |" in text
    assert "#### Encoder (`benchmarks/results/gpu_h100_encoder/`)" in text and "| resnet50 | auto | 0.6 | bf16 |" in text
    assert "#### Step (`benchmarks/results/gpu_h100_step/`)" in text
    assert "Largest batch at equal memory (`--max-batch`):" in text
    assert "| resnet50 | recipe:fast@bf16 | 0.6 | bf16 | 5760 (64), 11520 (128) | 90.0 | 0 | 500 | 800 | - |" in text
    assert "Other committed results" not in text                 # shown in their section, not appended again


def test_a_gpu_check_summary_not_shown_in_the_gpu_section_is_appended_as_it_was_written(tmp_path):
    (tmp_path / "gpu_h200_check").mkdir()
    (tmp_path / "gpu_h200_check" / "gpu_check.md").write_text("# GPU check\n\npytest -m gpu: 1 passed\n")
    text = rb.render("no GPU section", rb.load_results(tmp_path))
    assert "### `gpu_h200_check`" in text and "pytest -m gpu: 1 passed" in text


def test_no_gpu_check_committed_says_not_measured(tmp_path):
    text = rb.render("{{gpu gpu}}", rb.load_results(_results(tmp_path, "cpu_x")))
    assert "No GPU check committed" in text and "(not measured yet)" in text
    assert "### `cpu_x`" in text                                  # other folders are still appended


def test_stale_lists_the_commits_since_each_run_that_changed_the_code_it_measures(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)              # no signing or hooks from the user's config
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    for folder in ("spark_sparse", "kernels", "benchmarks"):
        (repo / folder).mkdir(parents=True)

    def commit(path: str, text: str) -> str:
        (repo / path).write_text(text)
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-qm", path], check=True)
        return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    with pytest.raises(RuntimeError, match="is not a git checkout"):
        rb.staleness({}, repo)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    measured_at = commit("spark_sparse/kernel.py", "a = 1\n")
    commit("README.md", "words\n")                                     # none of these is measured code
    commit("benchmarks/render_benchmarks.py", "render\n")
    commit("benchmarks/another_benchmark.py", "other\n")
    results = _results(tmp_path / "results", "fresh", commit=measured_at)   # its command: compare_backends.py
    assert rb.staleness(rb.load_results(results), repo) == [("fresh", measured_at[:10], "current")]
    commit("kernels/gather.py", "b = 1\n")
    commit("benchmarks/compare_backends.py", "its own script\n")
    _results(results, "unknown", commit="f" * 40)
    assert rb.staleness(rb.load_results(results), repo) == [
        ("unknown", "ffffffffff", "commit not in this clone's history (a shallow clone?)"),
        ("fresh", measured_at[:10], "2 commits since, changing 2 files")]
    fresh = results / "fresh" / "results.json"
    data = json.loads(fresh.read_text())
    data["meta"]["provenance"].update(git_dirty=True, git_changed_files=["kernels/gather.py", "BENCHMARKS.md"])
    fresh.write_text(json.dumps(data))
    assert rb.staleness(rb.load_results(results), repo)[1] == (
        "fresh", measured_at[:10], "2 commits since, changing 2 files; measured with uncommitted changes to "
                                   "kernels/gather.py")


@pytest.mark.parametrize("features, shown", [
    (None, "(4 cores)"),                                                    # a run before features were recorded
    (["avx2", "avx512f"], "(4 cores; avx2, avx512f, no bf16 units (avx512_bf16, amx_bf16))"),
    (["avx2", "avx512f", "amx_tile", "amx_bf16"], "(4 cores; avx2, avx512f, amx_tile, amx_bf16)")])
def test_the_provenance_says_whether_the_cpu_has_bf16_units(features, shown):
    """Two CPUs named "Intel(R) Xeon(R) Processor" differed eightfold in bf16 steps: one had AMX-BF16 tiles."""
    machine = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 4, "python": "3.11.7"}
    if features is not None:
        machine["cpu_features"] = features
    assert f"Intel(R) Xeon(R) Processor {shown}, Python" in rb._provenance({"machine": machine})


def test_the_benchmark_records_this_cpus_features():
    import compare_backends

    features = compare_backends.machine_info()["cpu_features"]
    if not os.path.exists("/proc/cpuinfo"):
        assert features is None
        return
    lines = [line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")]
    flags = set(lines[0].split(":", 1)[1].split()) if lines else set()      # ARM calls them "Features": none known
    assert features == [f for f in compare_backends.CPU_FEATURES if f in flags]
