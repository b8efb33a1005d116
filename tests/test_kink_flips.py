"""benchmarks/kink_flips.py tells a decoder ReLU flip from a backend's arithmetic: it must find a planted one."""
import sys
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kink_flips  # noqa: E402
import render_benchmarks as rb  # noqa: E402
from _measure import Workload  # noqa: E402
from _variants import Variant  # noqa: E402


def _workload() -> Workload:
    return Workload(Variant("masked"), "resnet18", 64, 0.6, 2, "fp32", "cpu", seed=0)


def _last_kinked(spark) -> nn.Module:
    """The decoder's last ReLU/ReLU6: no kink lies after it, so a flip planted there cannot cause others."""
    return [m for m in spark.decoder.modules() if type(m) in kink_flips.KINKS][-1]


def test_the_same_model_twice_has_no_flips_and_no_error():
    work = _workload()
    ref, inputs = kink_flips.run(work.spark, work.images, work.fresh_mask())
    row = kink_flips.compare_one("again", work.spark, work.images, work.fresh_mask, ref, inputs)
    assert row[1] == 0 and float(row[2]) == 0.0 and float(row[4]) == 0.0


def test_a_planted_flip_is_counted_and_aligning_it_removes_its_error():
    work = _workload()
    ref, inputs = kink_flips.run(work.spark, work.images, work.fresh_mask())
    last = _last_kinked(work.spark)
    name = next(n for n, m in work.spark.decoder.named_modules() if m is last)
    x = inputs[name]
    smallest_positive = torch.where(x > 0, x, torch.full_like(x, float("inf"))).flatten().argmin()

    def flip_one(module, args):
        # the smallest positive input crosses 0, as a rounding difference would: its value changes
        # sign, its gradient path stays (a negated copy would also negate the gradient)
        x = args[0]
        one = torch.zeros(x.numel(), dtype=torch.bool)
        one[smallest_positive] = True
        one = one.view(x.shape)
        return (x + torch.where(one, -2 * x, torch.zeros_like(x)).detach(),)

    handle = last.register_forward_pre_hook(flip_one)
    try:
        row = kink_flips.compare_one("planted", work.spark, work.images, work.fresh_mask, ref, inputs)
    finally:
        handle.remove()
    flips, before, after = row[1], float(row[2]), float(row[4])
    assert flips == 1
    assert before > 1e-4, f"one flipped gradient gate should move a gradient visibly ({before:.1e})"
    assert after < 1e-6, f"with the flip aligned only rounding should remain ({after:.1e})"


def test_the_script_writes_a_file_the_renderer_reads(tmp_path):
    kink_flips.main(["--quick", "--out", str(tmp_path / "cpu_kinks")])
    text = rb.render("{{run cpu_kinks}}\n{{ref cpu_kinks key=kinks.max_convnext_tiny_aligned_rel_err fmt=.1e}}",
                     rb.load_results(tmp_path))
    assert "decoder kink flips" in text and "masked fp32" in text and "kink_flips.py --quick" in text
    assert 0 < float(text.splitlines()[-1]) < 1e-3
