"""Measured dispatch (backend ``auto``): plan from measurements, cache, modes, budget, guard, plan state, resume.

Timings are injected (a fake timer answers from a table), so every choice here is deterministic;
the fake timer never calls the timed function and warm-up is 0, so nothing but shape discovery runs.
"""
import gc
import itertools
import json
import os
import stat
import sys
import threading
import weakref
import zlib
from pathlib import Path

import pytest
import torch

import spark_sparse as ss
from spark_sparse.autotune import AutotuneOptions, autotune, load_plan_state
from spark_sparse.autotune import cache
from spark_sparse.autotune.cache import CACHE_FILE
from spark_sparse.autotune.guard import choose_encoder, unsteady_timings
from spark_sparse.backends.auto import sparse_convs
from spark_sparse.errors import ConfigError
from spark_sparse.kernels import registry as kernel_registry
from spark_sparse.kernels.gather import GatherKernel
from spark_sparse.mask import ActiveMask

from equivalence import max_errors

KERNEL_ORDER = ["gather", "gemm", "dense", "spconv", "minkowski"]


class FakeTimer:
    """Layer ms from ``layer_ms(layer, kernel)``, encoder ms from ``encoder_ms[variant]``; counts its calls."""

    def __init__(self, layer_ms=None, encoder_ms=None):
        self.layer_ms = layer_ms or (lambda layer, kernel: 1.0 + KERNEL_ORDER.index(kernel) if kernel in KERNEL_ORDER
                                     else 9.0)
        self.encoder_ms = encoder_ms or {"tuned": 1.0, "static": 2.0, "masked": 3.0}
        self.calls = []

    def __call__(self, fn, what):
        self.calls.append(what)
        if what.kind == "layer":
            return self.layer_ms(what.name, what.candidate)
        return self.encoder_ms[what.candidate]

    def layer_calls(self):
        return [c for c in self.calls if c.kind == "layer"]

    def encoder_calls(self):
        return [c for c in self.calls if c.kind == "encoder"]


class NoTimer:
    """Fails the test if anything is measured."""

    def __call__(self, fn, what):
        raise AssertionError(f"nothing should be measured, but {what} was")


def build(model="tiny_cnn", backend="auto", size=64, dtype=torch.float32, seed=0, decoder_width=768):
    torch.manual_seed(seed)
    return ss.create_spark(model, backend=backend, input_size=size, drop_path_rate=0.0,
                           decoder_width=decoder_width).to(dtype)


def tune(spark, tmp_path, timer, batch=2, mode="on", budget_s=600.0, model="tiny_cnn", size=64, memory_limit=None,
         decoder_width=768, **kwargs):
    """Tune on the fake timings; without a memory limit unless asked (its tests are under "memory" below)."""
    dtype = next(spark.parameters()).dtype
    options = AutotuneOptions(mode=mode, budget_s=budget_s, warmup=0, repeats=1, progress=False,
                              cache_dir=tmp_path / "cache", memory_limit=memory_limit)
    return autotune(spark, batch, "cpu", options=options, timer=timer,
                    build_masked=lambda: build(model, "masked", size, dtype, decoder_width=decoder_width), **kwargs)


def pinned(spark, dtype=torch.float32):
    return {name: conv.pinned_kernel("cpu", dtype) for name, conv in sparse_convs(spark.encoder)}


def static_rule(spark, dtype=torch.float32):
    return {name: spark.backend.static_kernel(conv, "cpu", dtype) for name, conv in sparse_convs(spark.encoder)}


# ---------------------------------------------------------------------- choosing from measurements
def test_each_layer_is_pinned_to_its_fastest_measured_kernel(tmp_path):
    spark = build()
    static = static_rule(spark)
    result = tune(spark, tmp_path, FakeTimer())           # gather fastest, then gemm, dense, ...
    assert result.backend == "auto" and result.spark is spark
    assert set(pinned(spark).values()) == {"gather"} != set(static.values())
    for name, decision in result.decisions.items():
        assert decision.kernel == "gather" and decision.status == "measured"
        assert decision.ms["gather"] == 1.0 and decision.ms["gemm"] == 2.0
    plan = dict(spark.backend.plan(spark.encoder))
    assert all(plan[name].startswith("gather") and "[measured: gather 1, gemm 2, dense 3" in plan[name]
               for name in result.decisions)


def test_an_untuned_auto_says_once_that_it_runs_the_static_rule_and_a_tuned_one_says_nothing(tmp_path, recwarn):
    untuned = build()
    images = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"backend 'auto' has not been tuned, so every conv runs on the 'sparse' "
                                         r"backend's static rule: call spark_sparse\.autotune\.autotune"):
        untuned(images)
    untuned(images)                                          # said once per model
    tuned = build()
    tune(tuned, tmp_path, FakeTimer(), mode="off")          # even --autotune off is a choice the user made
    tuned(images)
    assert not [w for w in recwarn if "has not been tuned" in str(w.message)]


def test_the_choice_follows_the_timings_per_layer(tmp_path):
    def layer_ms(layer, kernel):   # a different winner per layer
        order = KERNEL_ORDER[zlib.crc32(layer.encode()) % 5:] + KERNEL_ORDER[:zlib.crc32(layer.encode()) % 5]
        return 1.0 + order.index(kernel)

    spark = build("resnet18")
    result = tune(spark, tmp_path, FakeTimer(layer_ms), model="resnet18")
    for name, decision in result.decisions.items():
        assert decision.kernel == min(decision.ms, key=decision.ms.get) == pinned(spark)[name]
    assert len({d.kernel for d in result.decisions.values()}) >= 3


def test_identical_layers_are_measured_once(tmp_path):
    spark = build()
    timer = FakeTimer()
    result = tune(spark, tmp_path, timer)
    measured_layers = {call.name for call in timer.layer_calls()}
    # tiny_cnn's residual pairs hold two identical convs: only one of each pair is timed
    assert "stages.0.1.first.0" in measured_layers and "stages.0.1.second.0" not in measured_layers
    assert result.decisions["stages.0.1.second.0"].ms == result.decisions["stages.0.1.first.0"].ms


def test_a_layer_only_one_kernel_can_run_is_not_measured(tmp_path):
    spark = build("convnext_tiny")
    timer = FakeTimer()
    result = tune(spark, tmp_path, timer, model="convnext_tiny")
    candidates = {name: conv.candidate_kernels("cpu", torch.float32, reproducible_only=True)
                  for name, conv in sparse_convs(spark.encoder)}
    for name, decision in result.decisions.items():
        if len(candidates[name]) == 1:
            assert decision.status == "only candidate" and not decision.ms
    assert all(call.candidate in candidates[call.name] for call in timer.layer_calls())


def test_on_the_cpu_a_kernel_without_bit_reproducible_results_is_never_timed_or_chosen(tmp_path, monkeypatch):
    """On the CPU masked is bit-reproducible and exact resume is promised: 'auto' keeps that."""
    from spark_sparse.kernels import registry
    from spark_sparse.kernels.gather import GatherKernel

    class Unreproducible(GatherKernel):
        NAME = "unreproducible"
        REPRODUCIBLE_ON = frozenset()

    monkeypatch.setitem(registry._KERNELS, Unreproducible.NAME, Unreproducible)
    spark = build()
    convs = sparse_convs(spark.encoder)
    assert all(Unreproducible.NAME in conv.candidate_kernels("cpu", torch.float32) for _, conv in convs)
    timer = FakeTimer(lambda layer, kernel: 0.1 if kernel == Unreproducible.NAME else 1.0 + KERNEL_ORDER.index(kernel))
    result = tune(spark, tmp_path, timer)
    assert timer.layer_calls() and all(call.candidate != Unreproducible.NAME for call in timer.layer_calls())
    assert all(Unreproducible.NAME not in d.ms and d.kernel != Unreproducible.NAME for d in result.decisions.values())


# ---------------------------------------------------------------------- the cache
def test_layer_measurements_are_cached_and_reused_and_the_guard_is_timed_again(tmp_path):
    first = tune(build(), tmp_path, FakeTimer())
    assert (tmp_path / "cache" / CACHE_FILE).is_file()
    spark = build()
    timer = FakeTimer(encoder_ms={"tuned": 3.0, "static": 2.0, "masked": 1.0})   # the machine changed since
    second = tune(spark, tmp_path, timer)
    assert not timer.layer_calls() and {d.status for d in second.decisions.values()} == {"cached"}
    assert second.guard.status == "measured" and first.guard.choice == "tuned" and second.guard.choice == "masked"
    assert second.backend == "masked"
    third = tune(build(), tmp_path, NoTimer(), mode="cached")        # cached mode: the last guard result
    assert third.guard.status == "cached" and third.guard.ms == second.guard.ms and third.backend == "masked"


@pytest.mark.parametrize("change", ["batch", "dtype", "threads", "kernel_source"])
def test_a_different_key_is_measured_again(tmp_path, change, monkeypatch):
    from spark_sparse.autotune import cache

    assert len(cache.kernels_digest()) == 16
    tune(build(), tmp_path, FakeTimer())
    if change == "kernel_source":                                      # our kernels' code changed
        monkeypatch.setattr(cache, "kernels_digest", lambda: "0" * 16)
    timer = FakeTimer()
    threads = torch.get_num_threads()
    try:
        if change == "batch":
            tune(build(), tmp_path, timer, batch=16)                   # other active-row buckets
        elif change == "dtype":
            tune(build(dtype=torch.float64), tmp_path, timer)
        elif change == "kernel_source":
            tune(build(), tmp_path, timer)
        else:
            torch.set_num_threads(1 if threads > 1 else 2)               # another environment
            tune(build(), tmp_path, timer)
    finally:
        torch.set_num_threads(threads)
    assert timer.layer_calls() and timer.encoder_calls()


@pytest.mark.parametrize("content", [b"{not json", b"\x00\x00\xff\xfe\x80 binary", b"[1, 2]"])
def test_a_corrupt_cache_file_is_reported_ignored_and_rewritten(tmp_path, content):
    path = tmp_path / "cache" / CACHE_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    timer = FakeTimer()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        result = tune(build(), tmp_path, timer)
    assert timer.layer_calls() and result.backend == "auto"
    assert json.loads(path.read_text())["environments"]


@pytest.mark.parametrize("entry", [[], {"layers": []}, {"layers": {"k": "fast"}}, {"encoders": {"k": 3}}])
def test_cache_entries_of_another_shape_are_reported_and_left_out(tmp_path, entry):
    environment = {"device": "this one"}
    (tmp_path / CACHE_FILE).write_text(json.dumps({"format": cache.FORMAT,
                                                   "environments": {cache.canonical(environment): entry}}))
    with pytest.warns(RuntimeWarning, match="entries of another shape"):
        mine = cache.TuneCache(environment, tmp_path)
    assert mine.layer("k") == {} and mine.encoder("k") is None
    mine.put_layer("k", {"gemm": 2.0})
    mine.save()
    assert cache.TuneCache(environment, tmp_path).layer("k") == {"gemm": 2.0}


def test_the_cache_file_gets_the_mode_of_the_users_other_files(tmp_path):
    """mkstemp creates 0o600 files: a cache folder shared by a group must stay readable to it (umask applies)."""
    previous = os.umask(0o002)
    try:
        mine = cache.TuneCache({"device": "this one"}, tmp_path)
        mine.put_layer("k", {"gemm": 2.0})
        mine.save()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / CACHE_FILE).stat().st_mode) == 0o664


def test_an_unwritable_cache_folder_is_not_fatal(tmp_path):
    (tmp_path / "cache").write_text("a file where the folder should be")
    # both said: the cache cannot be read (layers measured again) nor written (the next run measures again)
    with pytest.warns(RuntimeWarning, match="cannot be read"), pytest.warns(RuntimeWarning, match="could not write"):
        result = tune(build(), tmp_path, FakeTimer())
    assert result.backend == "auto"


def test_the_cache_file_keeps_only_the_most_recently_written_environments(tmp_path):
    old = {f"old-{i:02d}": {"environment": {"n": i}, "written": float(i), "layers": {"k": {"gemm": 1.0}}}
           for i in range(1, 21)}
    (tmp_path / CACHE_FILE).write_text(json.dumps({"format": cache.FORMAT, "environments": old}))
    mine = cache.TuneCache({"device": "this one"}, tmp_path)
    mine.put_layer("layer", {"gemm": 2.0})
    mine.save()
    kept = json.loads((tmp_path / CACHE_FILE).read_text())["environments"]
    assert len(kept) == cache.MAX_ENVIRONMENTS
    assert mine.environment in kept and kept[mine.environment]["layers"] == {"layer": {"gemm": 2.0}}
    assert sorted(name for name in kept if name != mine.environment) == [f"old-{i:02d}" for i in range(6, 21)]
    assert cache.TuneCache({"device": "this one"}, tmp_path).layer("layer") == {"gemm": 2.0}


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    mine = cache.TuneCache({"device": "this one"}, tmp_path)
    mine.put_layer("layer", {"gemm": 2.0})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.json, "dump", disk_full)
    with pytest.warns(RuntimeWarning, match="could not write .*No space left"):
        mine.save()
    assert sorted(path.name for path in tmp_path.iterdir()) == [CACHE_FILE + ".lock"]     # no temporary file


def test_runs_writing_the_cache_at_once_keep_each_others_entries(tmp_path):
    """The first writer has read the file and not yet replaced it when the second writes: without the lock
    the first one's replacement drops the second one's entry."""
    first, second = cache.TuneCache({"device": "this one"}, tmp_path), cache.TuneCache({"device": "this one"}, tmp_path)
    first.put_layer("first", {"gemm": 1.0})
    second.put_layer("second", {"gemm": 2.0})
    has_read, go_on = threading.Event(), threading.Event()
    read = first._read

    def read_then_wait():
        on_disk = read()
        has_read.set()
        go_on.wait(10)
        return on_disk
    first._read = read_then_wait
    writers = [threading.Thread(target=first.save), threading.Thread(target=second.save)]
    writers[0].start()
    assert has_read.wait(10)
    writers[1].start()
    writers[1].join(1.0)             # without the lock it has written by now
    go_on.set()
    for writer in writers:
        writer.join(10)
    again = cache.TuneCache({"device": "this one"}, tmp_path)
    assert again.layer("first") == {"gemm": 1.0} and again.layer("second") == {"gemm": 2.0}


# ---------------------------------------------------------------------- modes and budget
class _ScaledGather(GatherKernel):
    """A plug-in with other maths: gather's result times 1.5 (the fake timer makes it the fastest)."""

    NAME = "scaled_gather_test"

    def conv(self, features, weight, bias, call):
        return super().conv(features, weight, bias, call) * 1.5


def test_a_kernel_with_other_maths_is_never_timed_nor_chosen_however_fast(tmp_path, monkeypatch):
    monkeypatch.setitem(kernel_registry._KERNELS, _ScaledGather.NAME, _ScaledGather)
    timer = FakeTimer(layer_ms=lambda layer, kernel: 0.01 if kernel == _ScaledGather.NAME else 1.0)
    with pytest.warns(RuntimeWarning, match=r"kernel 'scaled_gather_test' computes other numbers than '\w+' on layer "
                                            r"\S+ \(output: max abs err .* of its largest value\); it is not used"):
        result = tune(build(), tmp_path, timer)
    offered = [d for d in result.decisions.values() if _ScaledGather.NAME in d.ms]
    assert offered and all(d.ms[_ScaledGather.NAME] == float("inf") for d in offered)
    assert _ScaledGather.NAME not in {d.kernel for d in result.decisions.values()}
    assert not [c for c in timer.calls if c.kind == "layer" and c.candidate == _ScaledGather.NAME]


@pytest.mark.parametrize("dtype, agreeing, differing", [(torch.float64, 1e-12, 1e-7), (torch.float32, 1e-6, 1e-3)])
def test_the_agreement_check_compares_in_the_results_own_precision(dtype, agreeing, differing):
    """fp64 values half-way between two fp32 ones: a 1e-12 change rounds them to another fp32 value (a 1e-7
    difference), so a check that compared in fp32 would call two agreeing fp64 results different."""
    from spark_sparse.autotune.layers import disagreement

    expected = (torch.arange(1, 1001, dtype=torch.float64) * (1 + 2.0 ** -24)).to(dtype)
    assert disagreement({"output": expected * (1 + agreeing)}, {"output": expected}, dtype) is None
    assert disagreement({"output": expected * (1 + differing)}, {"output": expected}, dtype).startswith("output: max")


def test_cached_mode_measures_nothing_and_keeps_the_static_rule_for_unknown_layers(tmp_path):
    spark = build()
    result = tune(spark, tmp_path, NoTimer(), mode="cached")
    assert pinned(spark) == static_rule(spark)
    assert all(d.status == "static rule, not measured: --autotune cached" for d in result.decisions.values())
    assert result.guard.status.startswith("not measured") and result.backend == "auto"
    assert "the cache holds no layer of this model for this device" in result.summary()
    assert "(--autotune cached; plan: made by this run)" in result.headline()


def test_cached_mode_uses_what_an_earlier_run_measured(tmp_path):
    first = tune(build(), tmp_path, FakeTimer())
    spark = build()
    result = tune(spark, tmp_path, NoTimer(), mode="cached")
    assert set(pinned(spark).values()) == {"gather"} and result.guard.status == "cached"
    assert "the cache holds no layer" not in result.summary()
    measured = sum(d.status == "measured" for d in first.decisions.values())
    assert measured and f"plan: made by this run, layers: {measured} measured now, 0 from the cache)" in first.headline()
    assert f"plan: made by this run, layers: 0 measured now, {measured} from the cache)" in result.headline()


def test_off_mode_is_the_static_rule_and_says_it_was_not_measured(tmp_path):
    spark = build()
    result = tune(spark, tmp_path, NoTimer(), mode="off")
    assert pinned(spark) == static_rule(spark) and result.guard is None
    assert "not measured" in result.summary()
    assert not (tmp_path / "cache").exists()


def test_an_exhausted_budget_leaves_the_remaining_layers_on_the_static_rule(tmp_path):
    spark = build()
    timer = FakeTimer()
    result = tune(spark, tmp_path, timer, budget_s=0.0)
    assert not timer.layer_calls()
    assert pinned(spark) == static_rule(spark)
    assert all("budget of 0 s exhausted" in d.status for d in result.decisions.values())
    assert "budget" in dict(spark.backend.plan(spark.encoder))["stem.0"]


# ---------------------------------------------------------------------- the whole-encoder guard
def test_the_guard_runs_masked_when_the_tuned_plan_is_slower(tmp_path):
    spark = build()
    result = tune(spark, tmp_path, FakeTimer(encoder_ms={"tuned": 5.0, "static": 6.0, "masked": 2.0}))
    assert result.backend == "masked" and result.spark.backend.name == "masked" and result.spark is not spark
    mine, theirs = spark.state_dict(), result.spark.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert result.plan_state()["backend"] == "masked"
    assert "masked 2 ms" in result.summary() and "tuned 5 ms" in result.summary()
    lines = result.describe().splitlines()        # the measured per-layer plan follows, marked as not the one used
    assert lines[1] == "  the per-layer plan below was measured and is not used (the guard chose masked):"
    assert len(lines) == 2 + len(result.decisions)


def test_a_tie_with_masked_goes_to_masked(tmp_path):
    result = tune(build(), tmp_path, FakeTimer(encoder_ms={"tuned": 3.0, "static": 4.0, "masked": 3.0}))
    assert result.backend == "masked"


@pytest.mark.parametrize("encoder_ms, choice", [
    ({"tuned": 0.98, "static": 1.0, "masked": 3.0}, "static"),     # 2% faster: within the noise, not taken
    ({"tuned": 0.95, "static": 1.0, "masked": 3.0}, "tuned"),      # 5% faster: taken
    ({"tuned": 0.99, "static": 1.0, "masked": 1.01}, "masked"),    # nothing beats masked by the margin
    ({"tuned": 0.9, "static": 0.98, "masked": 1.0}, "tuned"),      # the static rule does not, the tuned plan does
])
def test_a_variant_replaces_a_simpler_one_only_when_faster_by_the_margin(encoder_ms, choice):
    assert choose_encoder(encoder_ms, margin=0.03) == choice
    assert choose_encoder(encoder_ms, margin=0.0) == min(encoder_ms, key=encoder_ms.get)


def test_the_guard_takes_its_own_rounds_and_rotates_the_order_of_its_variants(tmp_path):
    timer = FakeTimer()
    spark = build()
    options = AutotuneOptions(warmup=0, repeats=1, guard_repeats=6, progress=False, cache_dir=tmp_path / "cache")
    autotune(spark, 2, "cpu", options=options, timer=timer, build_masked=lambda: build(backend="masked"))
    order = [c.candidate for c in timer.encoder_calls()]
    rounds = [tuple(order[i:i + 3]) for i in range(0, len(order), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["masked", "static", "tuned"] for r in rounds)
    assert {r[0] for r in rounds} == {"masked", "static", "tuned"}, f"every variant leads some round: {rounds}"


def test_a_guard_timed_on_a_loaded_machine_says_its_choice_may_be_wrong(tmp_path, recwarn):
    class MaskedSlowEveryOtherRound(FakeTimer):            # another process's load, on half the rounds
        rounds = itertools.cycle([3.0, 9.0])

        def __call__(self, fn, what):
            value = super().__call__(fn, what)
            return next(self.rounds) if what.kind == "encoder" and what.candidate == "masked" else value

    tune(build(), tmp_path, FakeTimer())                     # steady rounds: nothing to say
    assert not [w for w in recwarn if "varied widely" in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"varied widely .*: masked 3-9 ms over 6 rounds\), .*its choice "
                                            r"\(tuned\) may not be the fastest, and is not cached"):
        tune(build(), tmp_path / "loaded", MaskedSlowEveryOtherRound())
    assert tune(build(), tmp_path / "loaded", NoTimer(), mode="cached").guard.status == "not measured (--autotune cached)"


def test_one_slow_round_is_not_unsteady_but_half_of_them_are():
    assert unsteady_timings({"masked": [3.0, 3.1, 3.0, 30.0, 3.05, 3.0]}, spread=0.5) == {}
    assert unsteady_timings({"masked": [3.0, 3.0, 3.0, 30.0]}, spread=0.5) == {}      # too few rounds to judge
    assert unsteady_timings({"masked": [3.0, 9.0, 3.0, 9.0, 3.0, 9.0], "tuned": [1.0] * 6}, spread=0.5) == {
        "masked": (3.0, 9.0)}


def test_the_guard_keeps_the_static_rule_when_it_beats_the_tuned_plan(tmp_path):
    spark = build()
    result = tune(spark, tmp_path, FakeTimer(encoder_ms={"tuned": 5.0, "static": 2.0, "masked": 3.0}))
    assert result.backend == "auto" and pinned(spark) == static_rule(spark)
    assert result.plan_state()["kernels"] == static_rule(spark)


def test_the_static_variant_is_not_timed_when_the_tuned_plan_is_the_static_rule(tmp_path):
    spark = build()
    static = static_rule(spark)
    timer = FakeTimer(layer_ms=lambda layer, kernel: 1.0 if kernel == static.get(layer) else 5.0)
    tune(spark, tmp_path, timer)
    assert {c.candidate for c in timer.encoder_calls()} == {"tuned", "masked"}


def test_tuning_changes_no_weight_statistic_or_random_stream(tmp_path):
    spark = build()
    before = {k: v.clone() for k, v in spark.state_dict().items()}
    rng = torch.get_rng_state()
    options = AutotuneOptions(warmup=1, repeats=1, progress=False, cache_dir=tmp_path / "cache")
    # every candidate and every encoder variant really runs once (the warm-up); the timer is fake
    autotune(spark, 2, "cpu", options=options, build_masked=lambda: build(backend="masked"), timer=FakeTimer())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in spark.state_dict().items())
    assert all(p.grad is None for p in spark.parameters()) and spark.training


def test_other_backends_are_not_tuned(tmp_path):
    spark = build(backend="sparse")
    result = tune(spark, tmp_path, NoTimer())
    assert not result.applies and result.spark is spark and result.plan_state() is None


# ---------------------------------------------------------------------- memory: the step's peak, limit
def test_held_bytes_counts_each_saved_storage_once_without_the_excluded_ones():
    from spark_sparse.autotune.memory import held_bytes

    x = torch.randn(100, requires_grad=True)
    y = torch.randn(3, 100, requires_grad=True)
    # x * y saves both; (x * y) * y saves the product and y again (one storage)
    assert held_bytes(lambda: (x * y) * y) == 4 * (100 + 300 + 300)
    assert held_bytes(lambda: (x * y) * y, exclude=[x, y]) == 4 * 300
    assert held_bytes(lambda: x.detach() * y.detach()) == 0                    # nothing needs a gradient: nothing saved


def test_held_bytes_frees_what_the_forward_saved():
    """A forward that saves its own output (exp, ReLU, ...) must not outlive the measurement: a pack
    hook that returned the tensor itself tied it to its own graph node in a cycle the garbage
    collector cannot see, and every tuned model leaked its activations (GBs in a benchmark run)."""
    from spark_sparse.autotune.memory import held_bytes

    x = torch.randn(1000, requires_grad=True)
    outputs = []

    def forward():
        y = x.exp()                                     # exp saves its result for backward
        outputs.append(weakref.ref(y))
        return y.sum()

    assert held_bytes(forward) == 4 * 1000
    gc.collect()
    assert outputs[0]() is None, "the saved output is still alive after held_bytes returned"


def test_lighter_plan_frees_bytes_at_the_least_slowdown_per_byte():
    from spark_sparse.autotune.memory import lighter_plan

    kernels = {"a": "fast", "b": "fast", "c": "fast"}
    ms = {"a": {"fast": 1.0, "slim": 3.0}, "b": {"fast": 1.0, "slim": 1.5, "slimmer": 4.0}, "c": {"fast": 1.0, "lean": 0.9}}
    held = {"a": {"fast": 100, "slim": 50}, "b": {"fast": 100, "slim": 50, "slimmer": 10}, "c": {"fast": 100, "lean": 99}}
    assert lighter_plan(kernels, ms, held, 0) == {}
    assert lighter_plan(kernels, ms, held, 1) == {"c": "lean"}               # lighter and faster: first, for free
    assert lighter_plan(kernels, ms, held, 30) == {"c": "lean", "b": "slim"}  # 0.5 ms / 50 B beats a's 2 ms / 50 B
    # b's next step (2.5 ms for 40 B) is dearer per byte than a's (2 ms for 50 B)
    assert lighter_plan(kernels, ms, held, 100) == {"c": "lean", "b": "slim", "a": "slim"}
    assert lighter_plan(kernels, ms, held, 10**6) == {"c": "lean", "b": "slimmer", "a": "slim"}   # all it can


def test_the_live_tensor_peak_counts_what_backward_allocates_for_a_moment():
    """What forward saves is not the whole step: a backward that needs a large buffer for a moment
    raises the step's peak above it (hrnet_w18_small's tuned plan did, by its backward's buffers)."""
    from spark_sparse.autotune.memory import LiveTensorPeak, held_bytes, peak_bytes

    class WideBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            scratch = torch.zeros(100, x.numel())             # 400 x the input, for a moment only
            return (scratch + grad).sum(0)

    x = torch.randn(1000, requires_grad=True)

    def step():
        WideBackward.apply(x).sum().backward()

    assert held_bytes(lambda: WideBackward.apply(x).sum(), exclude=[x]) == 0     # saves its input: nothing new
    peak = peak_bytes(step, torch.device("cpu"))
    assert 2 * 400_000 <= peak < 2 * 400_000 + 20_000            # the scratch and (scratch + grad) at once
    with LiveTensorPeak() as tracker:
        x.grad = None
        step()
    assert tracker.peak_bytes == peak and x.grad is not None


def test_the_live_tensor_peak_does_not_count_what_existed_before():
    from spark_sparse.autotune.memory import LiveTensorPeak

    weight = torch.randn(300, 300)
    with LiveTensorPeak() as tracker:
        weight.t().mul_(2)                          # a view of an existing tensor, changed in place
        weight[:10].add_(1)
        new = weight + 1                             # 360 KB of new memory
        del new
        again = weight * 3                           # the same size again, maybe at the same address
    assert tracker.peak_bytes == 4 * 300 * 300 and tracker.live_bytes == 4 * 300 * 300
    del again


# a narrow decoder (few parameters) and batch 4: the activations outweigh the gradients, as at
# SparK's batch sizes (with the default 768-wide decoder at test sizes the gradients dominate)
SMALL_STATE = dict(decoder_width=32, batch=4)


def _peak_mb(spark, batch=4, size=64, seed=0):
    from spark_sparse.autotune.memory import MB, step_peak_bytes

    active = ActiveMask.random(batch, (size // 32, size // 32), spark.mask_ratio, spark.downsample_ratio,
                               generator=torch.Generator().manual_seed(seed)).active
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return step_peak_bytes(spark, images, active, None) / MB


def test_measuring_the_step_peak_leaves_the_model_as_it_was():
    spark = build(backend="sparse", decoder_width=32).eval()
    statistics = {name: buf.clone() for name, buf in spark.named_buffers()}
    assert _peak_mb(spark) > 0
    assert not spark.training and all(p.grad is None for p in spark.parameters())
    assert all(torch.equal(buf, statistics[name]) for name, buf in spark.named_buffers())
    assert _peak_mb(spark) == _peak_mb(spark)                  # deterministic: no clock, no allocator state


def test_the_fastest_plan_is_moved_to_lighter_kernels_until_its_step_fits_the_limit(tmp_path):
    # 'gather' (fastest here) keeps every tap of its input for backward: the all-gather step peaks ~2x masked
    unlimited = tune(build(decoder_width=32), tmp_path / "a", FakeTimer(), **SMALL_STATE)
    assert set(pinned(unlimited.spark).values()) == {"gather"}
    assert unlimited.memory.limit is None and unlimited.memory.status == "no limit"
    masked_mb = _peak_mb(build(backend="masked", decoder_width=32))
    assert _peak_mb(unlimited.spark) > 1.8 * masked_mb

    spark = build(decoder_width=32)
    result = tune(spark, tmp_path / "b", FakeTimer(), memory_limit=1.15, **SMALL_STATE)
    memory = result.memory
    assert memory.status == "measured" and memory.peak_mb["masked"] == pytest.approx(masked_mb)
    assert memory.peak_mb["masked"] > memory.params_mb                           # the regime this test is about
    assert memory.peak_mb["fastest"] > 1.8 * masked_mb
    assert memory.peak_mb["tuned"] == pytest.approx(_peak_mb(spark))         # what runs is what was measured
    assert memory.step_mb("tuned") <= 1.15 * memory.step_mb("masked")
    assert memory.moved and memory.fits("tuned") and not memory.fits("fastest")
    assert {name: kernel for name, kernel in pinned(spark).items() if kernel != "gather"} == memory.moved
    for name, kernel in memory.moved.items():
        assert result.decisions[name].kernel == kernel and f"{kernel} for memory" in result.decisions[name].status
    assert "step memory (limit 1.15 x masked)" in result.summary()
    assert f"layers: {len(result.decisions)} measured;" in result.summary()      # moved layers are counted once
    # the guard's timings are the fake ones (tuned fastest): the moved plan runs
    assert result.backend == "auto" and result.guard.choice == "tuned"
    # a looser limit moves fewer layers
    loose = tune(build(decoder_width=32), tmp_path / "c", FakeTimer(), memory_limit=1.5, **SMALL_STATE)
    assert len(loose.memory.moved) < len(memory.moved) and loose.memory.fits("tuned")


def test_where_no_sparse_plan_fits_the_limit_masked_runs(tmp_path):
    # at these tiny sizes every sparse plan, even on the lightest kernels, peaks above masked (index tables)
    result = tune(build(decoder_width=32), tmp_path, FakeTimer(), memory_limit=1.0, **SMALL_STATE)
    memory = result.memory
    assert memory.moved and "even on its lightest" in memory.status
    assert not memory.fits("tuned") and not memory.fits("static") and memory.fits("masked")
    assert result.guard.choice == "masked" and result.backend == "masked"     # although timed slowest
    assert "-> masked (the faster sparse plans peak above the memory limit)" in result.summary()
    faster = tune(build(), tmp_path / "b", FakeTimer(encoder_ms={"tuned": 3.0, "static": 2.0, "masked": 1.0}))
    assert "-> masked (no sparse plan was faster here)" in faster.summary()


def test_where_the_gradients_outweigh_the_activations_the_peaks_differ_little(tmp_path):
    # the default 768-wide decoder at batch 2, 64 px: parameters (and so gradients) of ~90 MB against a few
    # MB of activations: the all-gather plan peaks a little above masked, within a 5% limit
    result = tune(build(), tmp_path, FakeTimer(), memory_limit=1.05)
    memory = result.memory
    assert memory.params_mb > 0.6 * memory.peak_mb["tuned"]                     # the gradients are most of the peak
    assert memory.peak_mb["masked"] < memory.peak_mb["tuned"] and memory.fits("tuned")
    assert not memory.moved and set(pinned(result.spark).values()) == {"gather"}


def test_the_guard_never_picks_a_variant_over_the_memory_limit():
    assert choose_encoder({"masked": 3.0, "static": 2.0, "tuned": 1.0}, 0.03, allowed=["masked", "static"]) == "static"
    assert choose_encoder({"masked": 3.0, "tuned": 1.0}, 0.03, allowed=["masked"]) == "masked"
    with pytest.raises(ValueError, match="no allowed variant"):
        choose_encoder({"masked": 3.0}, 0.03, allowed=[])


def test_below_what_any_plan_can_hold_the_lightest_timed_variant_runs(tmp_path):
    result = tune(build(decoder_width=32), tmp_path, FakeTimer(), memory_limit=0.05, **SMALL_STATE)
    memory = result.memory
    assert not memory.fits("tuned") and "even on its lightest" in memory.status
    timed = result.guard.ms
    lightest = min(timed, key=lambda name: memory.peak_mb[name])
    assert result.guard.choice == lightest


def test_the_memory_check_is_kept_in_the_plan_state_and_shown_on_resume(tmp_path):
    spark = build(decoder_width=32)
    state = tune(spark, tmp_path, FakeTimer(), memory_limit=1.15, **SMALL_STATE).plan_state()
    assert state["memory"]["limit"] == 1.15 and state["memory"]["moved"] and state["memory"]["peak_mb"]
    resumed = load_plan_state(build(decoder_width=32), json.loads(json.dumps(state)))
    assert resumed.memory.status == "checkpoint" and resumed.memory.moved == state["memory"]["moved"]
    assert pinned(resumed.spark) == pinned(spark)


def test_a_memory_limit_must_be_positive():
    with pytest.raises(ConfigError, match="memory limit 0"):
        AutotuneOptions(memory_limit=0)
    AutotuneOptions(memory_limit=None)


# ---------------------------------------------------------------------- plan state
def test_the_plan_state_round_trips_through_json_without_measuring(tmp_path):
    def layer_ms(layer, kernel):
        return 1.0 if kernel == ("dense" if zlib.crc32(layer.encode()) % 2 else "gemm") else 4.0

    spark = build("resnet18")
    state = tune(spark, tmp_path, FakeTimer(layer_ms), model="resnet18").plan_state()
    again = build("resnet18")
    result = tune(again, tmp_path / "elsewhere", NoTimer(), model="resnet18", plan_state=json.loads(json.dumps(state)))
    assert result.source == "checkpoint" and pinned(again) == pinned(spark)
    assert result.plan_state()["kernels"] == state["kernels"]


def test_a_saved_masked_decision_is_reapplied(tmp_path):
    state = tune(build(), tmp_path, FakeTimer(encoder_ms={"tuned": 5.0, "masked": 1.0, "static": 6.0})).plan_state()
    result = load_plan_state(build(), state, build_masked=lambda: build(backend="masked"))
    assert result.backend == "masked" and result.spark.backend.name == "masked"


def test_reapplying_a_saved_plan_draws_no_random_numbers(tmp_path):
    """Building the masked twin initialises weights: the run's random streams must not see it (exact resume)."""
    state = tune(build(), tmp_path, FakeTimer(encoder_ms={"tuned": 5.0, "masked": 1.0, "static": 6.0})).plan_state()
    spark = build()
    rng = torch.get_rng_state()
    result = tune(spark, tmp_path / "elsewhere", NoTimer(), plan_state=state)
    assert result.backend == "masked" and torch.equal(torch.get_rng_state(), rng)


def test_a_plan_naming_an_unavailable_kernel_is_refused_with_the_fix(tmp_path):
    state = tune(build(), tmp_path, FakeTimer()).plan_state()
    state["kernels"]["stem.0"] = "no-such-kernel"
    with pytest.raises(ConfigError, match="Exact resume needs the kernels"):
        load_plan_state(build(), state)


def test_a_plan_for_another_model_is_refused(tmp_path):
    state = tune(build(), tmp_path, FakeTimer()).plan_state()
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_plan_state(build("resnet18"), state)


# ---------------------------------------------------------------------- equivalence of the tuned backend
@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_a_tuned_auto_encoder_equals_masked_in_fp64(tmp_path, model):
    """Every layer on a kernel other than the static rule's where one exists: loss and all gradients as masked."""
    dtype = torch.float64
    ref, auto = build(model, "masked", dtype=dtype), build(model, dtype=dtype)
    auto.load_state_dict(ref.state_dict())
    static = static_rule(auto, dtype)
    timer = FakeTimer(lambda layer, kernel: 9.0 if kernel == static[layer] else 1.0 + KERNEL_ORDER.index(kernel))
    result = tune(auto, tmp_path, timer, model=model)
    assert result.backend == "auto"
    chosen = pinned(auto, dtype)
    assert sum(chosen[name] != static[name] for name in chosen) > len(chosen) // 2
    images = torch.randn(2, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask = ref.mask(2, generator=torch.Generator().manual_seed(2))
    x_ref, x = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    loss_ref, loss = ref(x_ref, mask), auto(x, mask)
    loss_ref.backward()
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    assert max_errors(x.grad, x_ref.grad)[0] < 1e-10
    grads_ref = dict(ref.named_parameters())
    for name, param in auto.named_parameters():
        if grads_ref[name].grad is None:
            assert param.grad is None, name
        else:
            assert max_errors(param.grad, grads_ref[name].grad)[0] < 1e-10, name
    buffers_ref = dict(ref.named_buffers())
    assert all(torch.allclose(buf, buffers_ref[name], atol=1e-12) for name, buf in auto.named_buffers())


# ---------------------------------------------------------------------- training: --autotune and exact resume
def test_resume_reapplies_the_saved_plan_and_continues_bit_identically(tmp_path, monkeypatch):
    from spark_sparse.autotune import CACHE_DIR_ENV
    from spark_sparse.train.engine import Trainer

    from apptools import make_image_folder, tiny_config

    folder = make_image_folder(tmp_path / "data", count=8)
    # a cache in which 'dense' wins every layer (the static rule would run gemm on most)
    spark = build()
    options = AutotuneOptions(warmup=0, repeats=1, progress=False, cache_dir=tmp_path / "cache")
    autotune(spark, 4, "cpu", channels_last=True, options=options, build_masked=lambda: build(backend="masked"),
             timer=FakeTimer(lambda layer, kernel: 1.0 if kernel == "dense" else 5.0))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))

    def config(out, **extra):
        return tiny_config(folder, tmp_path / out, backend="auto", autotune="cached", **extra)

    straight = Trainer(config("a"), "")
    assert set(pinned(straight.spark).values()) == {"dense"}
    straight.run()
    Trainer(config("b"), "").run(max_epochs=1)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "empty-cache"))     # the cache cannot supply the plan now
    resumed = Trainer(config("b", resume_from=str(tmp_path / "b" / "tiny_cnn_still_pretraining.pth")), "")
    assert resumed.autotune.source == "checkpoint" and set(pinned(resumed.spark).values()) == {"dense"}
    resumed.run()
    a, b = straight.spark.state_dict(), resumed.spark.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    header = json.loads((tmp_path / "b" / "pretrain_log.txt").read_text().splitlines()[0])
    assert header["autotune"]["kernels"] and header["speed_plan"]["backend"] == "auto"


def _two_rank_worker(rank: int, world: int, port: int, cfg, caches: list, dump_dir: str) -> None:
    """One gloo process: rank 0 sees a cache that decides the plan, rank 1 an empty one."""
    import os

    from spark_sparse.autotune import CACHE_DIR_ENV
    from spark_sparse.train.engine import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{CACHE_DIR_ENV: caches[rank]})
    torch.set_num_threads(1)
    trainer = Trainer(cfg, "")
    trainer.run()
    torch.save({"kernels": pinned(trainer.spark), "state": trainer.spark.state_dict()},
               os.path.join(dump_dir, f"rank{rank}.pth"))
    torch.distributed.destroy_process_group()


def _train_on_two_ranks(tmp_path, worker, **overrides) -> tuple[dict, dict]:
    """Rank 0's cache holds a plan (dense everywhere, unlike the static rule), rank 1's is empty; both train one
    epoch of 4 images each through ``worker`` (``overrides``: of the run's config); returns what each rank
    pinned and its trained state."""
    import socket

    import torch.multiprocessing as mp

    from apptools import make_image_folder, tiny_config

    folder = make_image_folder(tmp_path / "data", count=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # the ranks' environment key (their thread count)
    try:
        options = AutotuneOptions(warmup=0, repeats=1, progress=False, cache_dir=tmp_path / "cache")
        autotune(build(), 4, "cpu", channels_last=True, options=options, build_masked=lambda: build(backend="masked"),
                 timer=FakeTimer(lambda layer, kernel: 1.0 if kernel == "dense" else 5.0))
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tiny_config(folder, tmp_path / "out", ep=1, bs=8, backend="auto", autotune="cached",   # 4 images per rank
                      **overrides)
    caches = [str(tmp_path / "cache"), str(tmp_path / "empty-cache")]
    mp.spawn(worker, args=(2, port, cfg, caches, str(tmp_path)), nprocs=2, join=True)
    return torch.load(tmp_path / "rank0.pth"), torch.load(tmp_path / "rank1.pth")


def test_every_rank_runs_rank_zeros_plan(tmp_path):
    rank0, rank1 = _train_on_two_ranks(tmp_path, _two_rank_worker)
    assert set(rank0["kernels"].values()) == {"dense"} and rank1["kernels"] == rank0["kernels"]
    trained = [k for k in rank0["state"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in trained)


def test_the_guard_never_chooses_an_encoder_that_failed_on_another_rank(tmp_path, monkeypatch):
    from spark_sparse.autotune import tuner

    gathered = tuner._Ranks.gathered
    # what rank 1 reports after the guard's timing: its tuned encoder failed (rank 0, this process, ran it fine)
    monkeypatch.setattr(tuner._Ranks, "gathered",
                        lambda self, value: gathered(self, value) + ([{"tuned"}] if isinstance(value, set) else []))
    result = tune(build(), tmp_path, FakeTimer(encoder_ms={"tuned": 1.0, "static": 2.0, "masked": 3.0}))
    assert result.guard.choice == "static" and "tuned" not in result.guard.ms


def _rank_one_fails_its_first_memory_check(rank: int, world: int, port: int, cfg, caches: list, dump_dir: str
                                           ) -> None:
    """As :func:`_two_rank_worker`, but rank 1 runs out of memory measuring the tuned plan (rank 0 does not)."""
    from spark_sparse.autotune import tuner

    if rank == 1:
        measure, failed = tuner.step_peak_bytes, []

        def out_of_memory_once(model, *args, **kwargs):
            if model.backend.name == "auto" and not failed:
                failed.append(True)
                raise RuntimeError("out of memory (injected on rank 1)")
            return measure(model, *args, **kwargs)

        tuner.step_peak_bytes = out_of_memory_once
    _two_rank_worker(rank, world, port, cfg, caches, dump_dir)


def test_when_one_rank_fails_the_memory_check_every_rank_falls_back_to_the_static_rule(tmp_path):
    # a limit the static rule fits in at this tiny size (its index tables outweigh masked's small maps)
    rank0, rank1 = _train_on_two_ranks(tmp_path, _rank_one_fails_its_first_memory_check, autotune_memory=4.0)
    static = static_rule(build())
    assert set(static.values()) != {"dense"}                 # the cached plan (all dense) differs from it
    assert rank0["kernels"] == rank1["kernels"] == static
    log = (tmp_path / "out" / "pretrain_log.txt").read_text()
    assert "static rule (the tuned plan failed in the memory check)" in log


def test_the_cli_accepts_only_the_autotune_modes():
    from click.testing import CliRunner

    from spark_sparse.cli import pretrain_command

    result = CliRunner().invoke(pretrain_command, ["--autotune", "sometimes"])
    assert result.exit_code == 2 and "'on', 'cached', 'off'" in result.output


def test_the_guard_noise_control_times_the_same_plan_twice_under_two_names(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import guard_noise
    monkeypatch.setenv("SPARK_SPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)     # the script's, not the test process's
    samples = guard_noise.main(["--model", "tiny_cnn", "--input-size", "64", "--batch-size", "2", "--rounds", "5",
                                "--window", "2", "--threads", "1"])
    assert set(samples) == {"tuned", "static", "static again", "masked"}
    assert all(len(v) == 5 and all(ms > 0 for ms in v) for v in samples.values())
    out = capsys.readouterr().out
    assert "same plan twice: 2-round medians up to" in out and "middle half of the rounds spans: tuned " in out


# ---------------------------------------------------------------------- failures
def _gemm_fails(layer, kernel):
    if kernel == "gemm":
        raise RuntimeError("out of memory (simulated)")
    return 1.0 + KERNEL_ORDER.index(kernel)


def test_a_kernel_that_fails_is_not_chosen_and_its_failure_is_cached_not_retried(tmp_path):
    with pytest.warns(RuntimeWarning, match="kernel 'gemm' failed on layer .* the cache records the failure"):
        first = tune(build(), tmp_path, FakeTimer(_gemm_fails))
    assert first.decisions and all(d.kernel != "gemm" for d in first.decisions.values())
    tried = [d for d in first.decisions.values() if "gemm" in d.ms]
    assert tried and all(d.describe().endswith("failed: gemm") for d in tried)
    again = FakeTimer(_gemm_fails)
    second = tune(build(), tmp_path, again)
    assert not again.layer_calls() and {n: d.kernel for n, d in second.decisions.items()} == {n: d.kernel for n, d in first.decisions.items()}


def test_a_guard_variant_that_fails_does_not_compete_and_the_run_goes_on(tmp_path):
    class TunedOutOfMemory(FakeTimer):
        def __call__(self, fn, what):
            if what.kind == "encoder" and what.candidate == "tuned":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().__call__(fn, what)

    with pytest.warns(RuntimeWarning, match="autotune guard: the tuned encoder failed .*OutOfMemoryError"):
        result = tune(build(), tmp_path, TunedOutOfMemory())
    assert "tuned" not in result.guard.ms and result.guard.choice in {"static", "masked"}


def test_masked_failing_in_the_guard_is_the_runs_error(tmp_path):
    class MaskedFails(FakeTimer):
        def __call__(self, fn, what):
            if what.kind == "encoder" and what.candidate == "masked":
                raise RuntimeError("masked broke")
            return super().__call__(fn, what)

    with pytest.raises(RuntimeError, match="masked broke"):
        tune(build(), tmp_path, MaskedFails())


def test_a_tuned_plan_that_fails_in_the_memory_check_gives_way_to_the_static_rule(tmp_path, monkeypatch):
    from spark_sparse.autotune import tuner

    calls = []
    real = tuner.step_peak_bytes

    def second_call_fails(model, *args):       # masked's check first, then the tuned plan's
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(model, *args)

    monkeypatch.setattr(tuner, "step_peak_bytes", second_call_fails)
    spark = build(decoder_width=32)
    with pytest.warns(RuntimeWarning, match="the tuned plan failed in its memory check .*static rule runs instead"):
        result = tune(spark, tmp_path, FakeTimer(), memory_limit=1.0, **SMALL_STATE)
    assert all(d.status.startswith("static rule (the tuned plan failed") for d in result.decisions.values())
    assert set(pinned(spark).values()) != {"gather"} and "tuned" in result.memory.peak_mb
