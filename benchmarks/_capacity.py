"""Largest training batch that fits a fixed memory budget, from peak memory measured at two batch sizes.

What is measured: for one variant, the peak growth of allocated memory during one training step
(above what is allocated before it: the variant's weights, buffers and optimizer state, plus
whatever else the process holds) at two batch sizes ``b1 < b2``. Step memory is linear in the batch
(activations kept for backward scale with it; weights, gradients, optimizer updates and workspaces do
not), so the two points give ``growth(b) = fixed + b * per_image``. The variant's whole need at
batch ``b`` is ``persistent + fixed + b * per_image``, where ``persistent`` (weights, buffers,
optimizer state) is counted exactly from its tensors. The largest batch is the largest ``b`` whose
need fits the budget; every variant gets the same budget ("at equal memory"): on CUDA the card's
total memory less 10% (allocator slack and the CUDA context), on the CPU the machine's memory less
10%. It is an extrapolation from two measured points, not a run at that batch: allocator
fragmentation at the limit is not modelled.
"""
from __future__ import annotations

import math

import torch

METHOD = ("peak growth of one training step at two batch sizes -> linear fit (fixed + per image); largest batch "
          "with weights, buffers, optimizer state + fit within the budget (the same for every variant)")


def memory_budget_mb(device: str) -> tuple[float, str]:
    """(MB, what it is): the budget every variant's largest batch is computed against."""
    if torch.device(device).type == "cuda":
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
        return 0.9 * total, f"90% of the card's {total:.0f} MB ({torch.cuda.get_device_name(torch.device(device))})"
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:")) / 1024
    return 0.9 * total, f"90% of the machine's {total:.0f} MB"


def fit_largest_batch(growth_mb: dict[int, float], persistent_mb: float, budget_mb: float) -> dict:
    """Fit ``growth(b) = fixed + b * per_image`` through two measured batch sizes; the largest batch in budget.

    ``growth_mb`` maps batch size -> measured peak growth (MB) of one step at that batch.
    """
    if len(growth_mb) != 2:
        raise ValueError(f"need peak growth at exactly two batch sizes, got {sorted(growth_mb)}")
    (b1, g1), (b2, g2) = sorted(growth_mb.items())
    per_image = (g2 - g1) / (b2 - b1)
    fixed = g1 - b1 * per_image
    result = {"batch_sizes": [b1, b2], "peak_growth_mb": [g1, g2], "per_image_mb": per_image, "fixed_mb": fixed,
              "persistent_mb": persistent_mb, "budget_mb": budget_mb}
    if per_image <= 0:
        return dict(result, max_batch=None,
                    why=f"peak growth did not increase with the batch ({g1:.0f} MB at {b1}, {g2:.0f} MB at {b2})")
    return dict(result, max_batch=max(0, math.floor((budget_mb - persistent_mb - fixed) / per_image)), why="")


def markdown_section(records: list[dict], budget_what: str,
                     heading: str = "## Largest batch at equal memory") -> list[str]:
    """Markdown lines of the 'largest batch at equal memory' table for the records that carry a fit."""
    rows = [r for r in records if r.get("capacity")]
    if not rows:
        return []
    base = {(r["model"], r["mask_ratio"]): r["capacity"]["max_batch"] for r in rows if r["backend"] == "masked"}
    lines = ["", heading, "",
             f"Method: {METHOD}. Budget: {budget_what}.", "",
             "| model | variant | mask | dtype | peak growth MB (batch) | per image MB | fixed MB | persistent MB | "
             "largest batch | vs masked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["capacity"]
        ref = base.get((r["model"], r["mask_ratio"]))
        ratio = f"{c['max_batch'] / ref:.2f}x" if c["max_batch"] is not None and ref else "-"
        points = ", ".join(f"{g:.0f} ({b})" for b, g in zip(c["batch_sizes"], c["peak_growth_mb"]))
        largest = c["max_batch"] if c["max_batch"] is not None else f"- ({c['why']})"
        lines.append(f"| {r['model']} | {r['backend']} | {r['mask_ratio']} | {r['dtype']} | {points} | "
                     f"{c['per_image_mb']:.1f} | {c['fixed_mb']:.0f} | {c['persistent_mb']:.0f} | {largest} | {ratio} |")
    return lines
