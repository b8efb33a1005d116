"""The diagnosis benchmarks refuse a setting no run can use with one usage error (exit status 2) before
anything is built or measured, show their defaults in --help, and label what their tables leave unsaid."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import spark_sparse as ss
from spark_sparse.backends.registry import BackendInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import data_loading  # noqa: E402
import guard_noise  # noqa: E402
import kernel_profile  # noqa: E402
import kink_flips  # noqa: E402
import step_breakdown  # noqa: E402
from _args import HelpFormatter  # noqa: E402

NOT_TUNED = argparse.Namespace(applies=False)

SCRIPTS = {"step_breakdown": step_breakdown, "kernel_profile": kernel_profile, "kink_flips": kink_flips,
           "guard_noise": guard_noise, "data_loading": data_loading}

REFUSED = [
    ("step_breakdown", ["--models", "resnet5"], "--models: unknown model 'resnet5'; did you mean resnet50"),
    ("step_breakdown", ["--variants", "recipe:spark", "recipe:turbo"],
     "--variants recipe:turbo: unknown recipe 'turbo'"),
    ("step_breakdown", ["--variants", "recipe:fast@bf32"], "--variants recipe:fast@bf32: unknown dtype 'bf32'"),
    ("step_breakdown", ["--variants", "sprase"], "--variants sprase: not a registered backend (did you mean sparse?)"),
    ("step_breakdown", ["--repeats", "0"], "--repeats 0: must be at least 1"),
    ("step_breakdown", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ("step_breakdown", ["--threads", "0"], "--threads 0: must be at least 1"),
    ("step_breakdown", ["--input-size", "100"], "--input-size 100: must be a positive multiple of 32"),
    ("step_breakdown", ["--decoder-widths", "768", "16"], "--decoder-widths 16: must be an int of at least 32, as it "
                                                          "is halved at each of the decoder's 5 levels (SparK: 768)"),
    ("step_breakdown", ["--autotune-budget", "nan"], "--autotune-budget nan: must be a positive number of seconds"),
    ("step_breakdown", ["--mask", "nan"], "--mask nan: must be a ratio of hidden patches above 0 and below 1"),
    ("kernel_profile", ["--model", "nosuchmodel"], "--model: unknown model 'nosuchmodel'"),
    ("kernel_profile", ["--backends", "masked", "nosuch"], "--backends nosuch: not a registered backend"),
    ("kernel_profile", ["--backends", "masked", "--layers"], "--layers replays the convs of the first backend other"),
    ("kernel_profile", ["--batch", "0"], "--batch 0: must be at least 1"),
    ("kernel_profile", ["--warmup", "-1"], "--warmup -1: must be 0 or more"),
    ("kernel_profile", ["--repeats", "0"], "--repeats 0: must be at least 1"),
    ("kernel_profile", ["--mask", "inf"], "--mask inf: must be a ratio"),
    ("kink_flips", ["--models", "convnext_tiny", "nosuchmodel"], "--models: unknown model 'nosuchmodel'"),
    ("kink_flips", ["--quick", "--backends", "nosuch"], "--backends nosuch: not a registered backend"),
    ("kink_flips", ["--mask", "1"], "--mask 1.0: must be a ratio"),
    ("kink_flips", ["--input-size", "0"], "--input-size 0: must be a positive multiple of 32"),
    ("guard_noise", ["--rounds", "2", "--window", "5"], "--rounds 2: must be at least --window (5)"),
    ("guard_noise", ["--window", "0"], "--window 0: must be at least 1"),
    ("guard_noise", ["--model", "nosuchmodel"], "--model: unknown model 'nosuchmodel'"),
    ("guard_noise", ["--mask", "0"], "--mask 0.0: must be a ratio"),
    ("data_loading", ["--workers", "0", "-1"], "--workers -1: must be 0 (loading in the main process) or more"),
    ("data_loading", ["--images", "0"], "--images 0: must be at least 1"),
    ("data_loading", ["--names", "0"], "--names 0: must be at least 1"),
    ("data_loading", ["--quick", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ("data_loading", ["--repeats", "0"], "--repeats 0: must be at least 1"),
]


@pytest.mark.parametrize("script, argv, message", REFUSED, ids=[f"{s} {' '.join(a)}" for s, a, _ in REFUSED])
def test_an_impossible_setting_is_one_usage_error_naming_flag_value_and_rule(script, argv, message, capsys,
                                                                              monkeypatch):
    built = []
    monkeypatch.setattr(ss, "create_spark", lambda *a, **k: built.append(a))     # nothing may be built
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[script].main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f": error: {message}" in err, err
    assert err.startswith("usage:") and not built


def test_a_backend_that_cannot_run_here_is_refused_with_its_reason(capsys, monkeypatch):
    infos = [BackendInfo("masked", True, "", ""),
             BackendInfo("faraway", False, "needs a device this machine lacks", "")]
    monkeypatch.setattr(ss, "list_backends", lambda: infos)
    for script, argv in [(kernel_profile, ["--backends", "masked", "faraway"]),
                         (kink_flips, ["--backends", "faraway"]), (step_breakdown, ["--variants", "faraway"])]:
        with pytest.raises(SystemExit) as exit_:
            script.main(argv)
        assert exit_.value.code == 2
        assert "faraway: this backend cannot run here: needs a device this machine lacks" in capsys.readouterr().err


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_every_default(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[script].main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())       # argparse wraps lines
    assert "(default: 2)" in out                         # --threads, in every script
    if script in ("kink_flips", "data_loading"):
        assert f"(default: bench_out/{script})" in out   # where the results go unless --out says otherwise


def test_a_default_of_zero_is_shown_as_any_other():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--out", default=None, help="folder")
    assert "seed (default: 0)" in parser.format_help() and "folder (default" not in parser.format_help()


def test_quick_presets_yield_to_options_given_explicitly():
    flips = kink_flips.parse_args(["--quick", "--models", "resnet18"])
    assert flips.models == ["resnet18"] and flips.seeds == [0] and flips.backends == ["sparse"]
    loading = data_loading.parse_args(["--quick", "--workers", "0", "2"])
    assert loading.workers == [0, 2] and loading.images == 16 and loading.repeats == 1
    assert data_loading.parse_args(["--quick"]).workers == [1]


def test_the_breakdown_counts_repeats_without_the_warm_up_and_explains_a_negative_remainder(capsys, monkeypatch):
    ms = {"step": 10.0, "encoder": 5.0, "densify": 1.0, "decoder": 3.0, "optimizer": 3.0}   # more than the step
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(step_breakdown, "Workload", lambda *a, **k: argparse.Namespace(dtype="fp32"))
    monkeypatch.setattr(step_breakdown, "tune_workload", lambda *a: NOT_TUNED)
    monkeypatch.setattr(step_breakdown, "part_functions", lambda work: {part: part for part in ms})
    monkeypatch.setattr(step_breakdown, "time_once", lambda part, device: ms[part])
    step_breakdown.main(["--models", "resnet18", "--variants", "masked", "--repeats", "2"])
    out = capsys.readouterr().out
    assert [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("[breakdown]")] == [
        "warm-up done", "repeat 1/2", "repeat 2/2"]
    assert "     -2 (-20%)" in out and "a remainder, not timed itself" in out and "negative here for masked" in out


def test_the_breakdown_times_each_variant_at_each_decoder_width_and_names_the_rows(capsys, monkeypatch, tmp_path):
    import render_benchmarks

    built = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(step_breakdown, "Workload", lambda variant, *a, decoder_width, **k: built.append(
        (variant.name, decoder_width)) or argparse.Namespace(dtype="fp32", width=decoder_width))
    monkeypatch.setattr(step_breakdown, "tune_workload", lambda *a: NOT_TUNED)
    monkeypatch.setattr(step_breakdown, "part_functions", lambda work: {part: (part, work.width) for part in
                                                                        step_breakdown.PARTS})
    monkeypatch.setattr(step_breakdown, "time_once", lambda part, device: {"decoder": part[1] / 10}.get(part[0], 1.0))
    step_breakdown.main(["--models", "resnet18", "--variants", "masked", "recipe:fast", "--decoder-widths", "768",
                         "256", "768", "--repeats", "1", "--out", str(tmp_path)])
    assert built == [("masked", 768), ("masked", 256), ("recipe:fast", 768), ("recipe:fast", 256)]    # each width once
    out = capsys.readouterr().out
    assert "masked w256" in out and "recipe:fast w768" in out and "decoder width" not in out
    report = json.loads((tmp_path / "breakdown.json").read_text())
    assert report["meta"]["decoder_widths"] == [768, 256]
    entry = {"kind": "breakdown", "data": report}
    rendered = render_benchmarks.render_breakdown("run", entry).splitlines()
    assert "26 (2560%)" in next(line for line in rendered if line.startswith("masked w256 "))     # 25.6 ms of 1 ms
    part = {"model": "resnet18", "variant": "masked", "part": "decoder"}
    assert render_benchmarks._part(entry, {**part, "width": "256"}) == 25.6
    with pytest.raises(render_benchmarks.TemplateError, match="2 breakdown rows .* name one with width="):
        render_benchmarks._part(entry, part)
    with pytest.raises(render_benchmarks.TemplateError, match="no breakdown row .* width=512"):
        render_benchmarks._part(entry, {**part, "width": "512"})


def test_a_variants_later_decoder_widths_reuse_its_first_widths_tuning(monkeypatch):
    """Each width tuned on its own could pick other encoder kernels (timing noise): the rows would mix them in."""
    modes = []
    monkeypatch.setattr(step_breakdown, "Workload", lambda *a, **k: argparse.Namespace(dtype="fp32"))
    monkeypatch.setattr(step_breakdown, "tune_workload", lambda work, dtype, mode, budget: modes.append(mode) or NOT_TUNED)
    args = step_breakdown.parse_args(["--variants", "masked", "recipe:fast", "--decoder-widths", "768", "384", "256"])
    step_breakdown.tuned_workloads(args, "resnet18")
    assert modes == ["on", "cached", "cached"] * 2
    modes.clear()
    step_breakdown.tuned_workloads(step_breakdown.parse_args(["--decoder-widths", "768", "384", "--autotune", "off"]),
                                   "resnet18")
    assert set(modes) == {"off"}


def test_a_breakdown_from_before_densify_and_widths_renders_its_own_columns():
    import render_benchmarks
    from _report import breakdown_lines

    rows = [{"variant": "recipe:spark", "step": 10.0, "encoder": 4.0, "decoder": 3.0, "optimizer": 1.0, "rest": 2.0}]
    header, line = breakdown_lines(rows)
    assert header.split() == ["variant", "step", "encoder", "decoder", "optimizer", "densify,", "loss,", "rest"]
    assert line.startswith("recipe:spark ") and line.endswith("2 ( 20%)")
    entry = {"kind": "breakdown", "data": {"tables": [{"model": "resnet50", "rows": rows}]}}
    part = {"model": "resnet50", "variant": "recipe:spark"}
    assert render_benchmarks._part(entry, {**part, "part": "rest"}) == 2.0
    with pytest.raises(render_benchmarks.TemplateError, match="part=densify: not timed in that run"):
        render_benchmarks._part(entry, {**part, "part": "densify"})
    with pytest.raises(render_benchmarks.TemplateError, match="recorded no width"):
        render_benchmarks._part(entry, {**part, "part": "step", "width": "768"})
    with pytest.raises(render_benchmarks.TemplateError, match="width=wide: a decoder width is a whole number"):
        render_benchmarks._part(entry, {**part, "part": "step", "width": "wide"})


def test_a_model_argument_that_is_a_spark_setting_is_refused_not_overridden():
    """--model-kwargs drop_path_rate=0.1 was silently replaced by the benchmark's 0.0 (and decoder_width=... by
    SparK's 768)."""
    with pytest.raises(TypeError, match="multiple values for keyword argument 'decoder_width'"):
        step_breakdown.Variant("masked").build("resnet18", 64, 0.6, "cpu", model_kwargs={"decoder_width": 64})


def test_the_breakdown_tunes_a_variant_on_auto_before_timing_it(capsys, recwarn):
    """recipe:fast runs backend auto: untimed, untuned, it ran the static rule (with a warning saying so), not what
    spark-pretrain runs."""
    step_breakdown.main(["--models", "resnet18", "--variants", "masked", "recipe:fast", "--input-size", "64",
                         "--batch-size", "1", "--repeats", "1", "--decoder-widths", "32", "--autotune", "off"])
    out = capsys.readouterr().out
    assert "recipe:fast, decoder width 32: runs auto (off," in out and "masked, decoder width" not in out
    assert not [w for w in recwarn if "has not been tuned" in str(w.message)]
    assert ", decoder width 32 (ms" in out


@pytest.mark.parametrize("variant", ["masked", "recipe:fast"])
def test_a_benchmark_workload_builds_the_decoder_width_it_is_given(variant):
    from _measure import Workload

    work = Workload(step_breakdown.Variant(variant), "resnet18", 64, 0.6, 1, "fp32", "cpu", decoder_width=64)
    assert work.spark.decoder.width == 64


def test_loading_in_the_main_process_is_measured_and_labelled_with_no_per_worker_rate(tmp_path):
    path = data_loading.main(["--quick", "--workers", "0", "--sections", "loader", "--out", str(tmp_path)])
    report = json.loads(path.read_text())
    rows = [row for row in report["sections"][0]["rows"] if row[0].startswith("DataLoader")]
    assert [row[0] for row in rows] == [f"DataLoader, 0 workers (loading in the main process, 2 torch threads), "
                                        f"{kind} batches" for kind in ("uint8", "float32")]
    assert all(float(row[1]) > 0 and row[2] == "-" for row in rows)
    assert report["values"]["loader"]["workers_0_uint8_images_per_s"] > 0


def test_compare_backends_imports_the_users_module_before_looking_up_its_models(tmp_path, monkeypatch, capsys):
    import compare_backends
    from spark_sparse.models import registry

    module = tmp_path / "bench_user_models_test.py"
    module.write_text("import spark_sparse as ss\nfrom spark_sparse.models.example import TinyCNN\n\n"
                      "@ss.register_model('bench_user_cnn_test')\n"
                      "def bench_user_cnn_test(drop_path_rate=0.0, **kwargs):\n    return TinyCNN(**kwargs)\n")
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.delitem(sys.modules, "bench_user_models_test", raising=False)
    args = compare_backends.parse_args(["--import-module", str(module), "--models", "bench_user_cnn_test"])
    assert args.models == ["bench_user_cnn_test"] and args.import_module == [str(module)]
    with pytest.raises(SystemExit) as exit_info:
        compare_backends.parse_args(["--import-module", str(tmp_path / "missing.py")])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--recipes", "turbo"], "--recipes turbo: not a speed recipe; recipes: spark, fast"),
    (["--recipes", "fast@bf8"], "--recipes fast@bf8: not a speed recipe"),
    (["--recipes", "fsat"], "(did you mean fast?)"),
    (["--backends", "sprase"], "--backends sprase: not a registered backend (did you mean sparse?)"),
    (["--reference", "maskd"], "--reference maskd: not a registered backend (did you mean masked?)")])
def test_compare_backends_refuses_unknown_recipes_and_backends_before_building_anything(argv, message, capsys):
    """An unknown recipe ran the whole benchmark, each model failing with a traceback and the column left out."""
    import compare_backends

    with pytest.raises(SystemExit) as exit_info:
        compare_backends.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert compare_backends.parse_args(["--recipes", "spark", "fast@bf16"]).recipes == ["spark", "fast@bf16"]
    assert compare_backends.parse_args(["--backends", "nonesuch", "--allow-missing"]).backends == ["nonesuch"]
