"""``benchmarks/compare_backends.py --quick`` writes its three outputs with every key and sane errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spark_sparse as ss
from spark_sparse.testing import switch_branches_on

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_backends import QUICK_PRESET, parse_args  # noqa: E402
KEYS = {"model", "backend", "mask_ratio", "dtype", "device", "batch_size", "input_size", "fwd_ms", "fwd_bwd_ms",
        "step_ms", "images_per_s", "speedup_vs_masked", "peak_mem_mb", "max_abs_err", "max_rel_err"}


def test_quick_run_writes_json_markdown_and_plots_within_tolerance(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"results.json", "results.md", "speedup_vs_mask_ratio.png", "peak_memory.png"} <= {p.name for p in tmp_path.iterdir()}
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "versions", "threads", "device"} <= data["meta"].keys()
    available = {b.name for b in ss.list_backends() if b.available}
    assert {r["backend"] for r in data["records"]} == available
    for record in data["records"]:
        assert KEYS <= record.keys()
        assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0 and record["peak_mem_mb"] is not None
        assert len(record["timings"]["fwd_bwd_ms"]["samples"]) == QUICK_PRESET["repeats"]
        eq = record["equivalence"]
        assert eq["masked_sites_nonzero"] == 0 and not eq["grad_params_mismatched_names"]
        # fp32, unit-scale activations: features and loss agree to float rounding; gradients are bounded in
        # absolute terms because decoder BatchNorms over near-constant mask-token regions amplify rounding
        # (relative errors of tiny gradients can reach 1e-1; in fp64 every gradient agrees to 1e-10, see
        # tests/test_equivalence_encoders.py)
        assert max(v["max_rel"] for k, v in eq["errors"].items() if k.startswith("feature")) < 1e-4, record["backend"]
        assert eq["errors"]["loss"]["max_rel"] < 1e-5
        assert eq["errors"]["grad_params"]["max_abs"] < 1e-3 and eq["errors"]["grad_input"]["max_abs"] < 1e-3
        floor = record["fp32_noise_floor"]["errors"]
        assert floor["loss"]["max_rel"] < 1e-5 and floor["grad_params"]["max_abs"] < 1e-3
    assert "| resnet18 | sparse |" in (tmp_path / "results.md").read_text()


def test_an_equivalence_run_checks_every_variant_on_switched_on_branches_without_timing(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--what", "equivalence",
                             "--models", "resnet18", "--input-size", "64", "--batch-size", "2", "--mask", "0.6",
                             "--backends", "masked", "sparse", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.md"}      # nothing timed, no plots
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["weights"] == "branches-on"
    sparse = next(r for r in data["records"] if r["backend"] == "sparse")
    assert sparse["fwd_bwd_ms"] is None and sparse["peak_mem_mb"] is None and sparse["timings"] == {}
    # resnet18: 8 blocks' last BatchNorm weights and the 20 BatchNorm biases start at exactly zero
    assert sparse["switched_on"] == 28
    assert sparse["equivalence"]["masked_sites_nonzero"] == 0 and sparse["max_rel_err"] < 1e-1
    assert "| masked sites nonzero |" in (tmp_path / "results.md").read_text()


def test_models_are_built_with_the_constructor_arguments_given(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--what", "equivalence",
                             "--models", "resnet18", "--model-kwargs", "stem_type=deep", "--input-size", "64",
                             "--batch-size", "2", "--mask", "0.6", "--backends", "masked", "sparse",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["model_kwargs"] == "stem_type='deep'"
    deep, plain = (len(switch_branches_on(ss.create_spark("resnet18", input_size=64, **kwargs).encoder))
                   for kwargs in ({"stem_type": "deep"}, {}))
    assert deep != plain and {r["switched_on"] for r in data["records"]} == {deep}      # the deep stem's own BNs
    assert "Models built with: stem_type='deep'" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        parse_args(["--model-kwargs", "stem_type"])            # no value: the same error as spark-pretrain's


def test_an_fp64_equivalence_run_compares_in_double_and_has_no_fp32_floor(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--what", "equivalence",
                             "--fp64", "--models", "resnet18", "--input-size", "64", "--batch-size", "2", "--mask", "0.6",
                             "--backends", "masked", "sparse", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sparse = next(r for r in json.loads((tmp_path / "results.json").read_text())["records"] if r["backend"] == "sparse")
    assert sparse["dtype"] == "fp64" and sparse["fp32_noise_floor"] is None
    assert 0 < sparse["max_abs_err"] < 1e-12         # fp32 would give 1e-6: the comparison ran in double
    with pytest.raises(SystemExit):
        parse_args(["--fp64"])                         # timing in fp64 is not offered


def test_an_fp64_comparison_keeps_features_and_predictions_in_double():
    from _equivalence import _outputs
    spark = ss.create_spark("resnet18", backend="sparse", input_size=64, decoder_width=64).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = _outputs(spark, images, spark.mask(2), "cpu", "fp32")
    assert {f.dtype for f in out["feats"]} == {torch.float64} and out["loss"].dtype == torch.float64


def test_errors_can_be_measured_against_another_backend_with_masked_still_the_speed_baseline(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_backends.py"), "--what", "equivalence",
                             "--fp64", "--reference", "torch", "--models", "resnet18", "--input-size", "64",
                             "--batch-size", "2", "--mask", "0.6", "--backends", "masked", "sparse",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["backend"]: r for r in data["records"]}
    assert data["meta"]["reference"] == "torch" and list(rows) == ["masked", "sparse", "torch"]  # torch added
    assert rows["torch"]["max_abs_err"] == 0.0                          # the reference against itself
    assert 0 < rows["masked"]["max_abs_err"] < 1e-12                     # masked measured against torch
    assert rows["sparse"]["max_abs_err"] < 1e-12
    assert "errors vs `torch`" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit) as refused:                          # message: test_benchmark_args.py
        parse_args(["--reference", "no_such_backend"])
    assert refused.value.code == 2


def test_quick_presets_yield_to_options_given_explicitly():
    quick = parse_args(["--quick"])
    assert {key: getattr(quick, key) for key in QUICK_PRESET} == QUICK_PRESET
    mine = parse_args(["--quick", "--repeats", "15", "--models", "resnet50"])
    assert (mine.repeats, mine.models, mine.batch_size) == (15, ["resnet50"], QUICK_PRESET["batch_size"])
    assert parse_args([]).repeats == 3 and parse_args([]).models == ["resnet50", "convnext_tiny"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet5"], "--models: unknown model 'resnet5'; did you mean resnet50"),
    (["--input-size", "50"], "--input-size 50: must be a positive multiple of 32"),
    (["--mask", "0.6", "1.5"], "--mask 1.5: must be a ratio of hidden patches above 0 and below 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--check-batch", "0"], "--check-batch 0: must be at least 1"),
])
def test_a_setting_no_configuration_can_run_is_one_usage_error_before_anything_is_built(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--quick", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "--device cuda: torch" in capsys.readouterr().err


def test_a_run_where_no_configuration_finished_draws_no_chart(tmp_path):
    from _report import write_plots

    assert write_plots(tmp_path, []) == [] and not list(tmp_path.iterdir())


def test_unmeasured_memory_is_no_chart_of_zeros(tmp_path):
    from _report import write_plots

    records = [{"model": "resnet18", "backend": b, "mask_ratio": 0.6, "speedup_vs_masked": s, "peak_mem_mb": None}
               for b, s in (("masked", 1.0), ("sparse", 1.5))]
    assert [p.name for p in write_plots(tmp_path, records)] == ["speedup_vs_mask_ratio.png"]
    records[1]["peak_mem_mb"] = 100.0
    assert [p.name for p in write_plots(tmp_path, records)] == ["speedup_vs_mask_ratio.png", "peak_memory.png"]
