"""Timing, peak memory and equivalence of one variant (run in-process or in a fresh subprocess)."""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from typing import Callable

import torch

import spark_sparse as ss
from spark_sparse.autotune.memory import peak_bytes
from spark_sparse.decoder import SPARK_DECODER_WIDTH
from spark_sparse.models.model_kwargs import parse_model_kwargs
from spark_sparse.user_modules import import_user_module
from _variants import Variant, autocast, tune_workload


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Workload:
    """One model under one variant, with the phases a benchmark times."""

    def __init__(self, variant: Variant, model: str, input_size: int, mask_ratio: float, batch: int, dtype: str,
                 device: str, state: dict | None = None, seed: int = 0, model_kwargs: dict | None = None,
                 decoder_width: int = SPARK_DECODER_WIDTH):
        self.variant, self.model, self.dtype, self.device = variant, model, variant.dtype or dtype, device
        self.model_kwargs, self.decoder_width = model_kwargs or {}, decoder_width
        torch.manual_seed(seed)
        self.spark = variant.build(model, input_size, mask_ratio, device, model_kwargs=self.model_kwargs,
                                   decoder_width=decoder_width)
        if state is not None:
            self.spark.load_state_dict(state)
        self.images = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed)
                                  ).to(device)
        self.active = self.spark.mask(batch, generator=torch.Generator().manual_seed(seed + 1)).active.to(device)
        self.optimizer = variant.optimizer(self.spark, model, device)
        self.switched_on: list[str] = []     # encoder parameters drawn to switch residual branches on

    def subset(self, batch: int) -> "Workload":
        """The same model, optimizer and variant on the first ``batch`` images and mask rows (shared, not copied)."""
        part = copy.copy(self)
        part.images, part.active = self.images[:batch], self.active[:batch]
        return part

    def fresh_mask(self) -> ss.ActiveMask:
        """A new mask object per call: its index tables are built inside the timed region, as in training."""
        return ss.ActiveMask(self.active.clone(), self.spark.downsample_ratio)

    def encoder_loss(self, mask):
        """A scalar of the features at active sites: what densify reads (no dense copies of sparse rows)."""
        with autocast(self.device, self.dtype):
            feats = self.spark.encode(self.images, mask)
            return sum(f.active_rows().float().square().mean() for f in feats)

    def forward(self) -> None:
        with torch.no_grad():
            self.encoder_loss(self.fresh_mask())

    def forward_backward(self) -> None:
        self.encoder_loss(self.fresh_mask()).backward()
        self.spark.zero_grad(set_to_none=True)

    def step(self) -> None:
        images = self.images
        if self.spark.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            loss = self.spark(images, self.fresh_mask())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def phases(self, what: str) -> dict[str, Callable[[], None]]:
        if what == "encoder":
            return {"fwd_ms": self.forward, "fwd_bwd_ms": self.forward_backward}
        return {"step_ms": self.step}


def time_once(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def time_and_cuda_peak(fn: Callable[[], None]) -> tuple[float, float]:
    """(ms, MB): one timed CUDA call and the peak growth of allocated memory during it.

    ``max_memory_allocated`` counts the caching allocator's live blocks exactly, so on CUDA the peak
    of one variant is measured in the benchmark process itself, during one of its timed calls
    (memory other variants hold is in the baseline, not in the growth).
    """
    elapsed: list[float] = []
    peak = peak_bytes(lambda: elapsed.append(time_once(fn, "cuda")), torch.device("cuda"))
    return elapsed[0], peak / 2**20


def persistent_mb(work: "Workload") -> float:
    """MB a variant holds between steps: parameters, buffers and optimizer state tensors."""
    tensors = list(work.spark.parameters()) + list(work.spark.buffers())
    tensors += [t for state in work.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def summarize(samples: list[float]) -> dict:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": q[0], "q3": q[2], "min": ordered[0], "max": ordered[-1],
            "samples": samples}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def peak_rss_growth_mb(fn: Callable[[], None]) -> float:
    """Peak resident memory during ``fn`` above the resident memory before it (Linux).

    The kernel's high-water mark (VmHWM) is reset first (``/proc/self/clear_refs`` = 5), so earlier
    peaks (model construction, other configurations) do not hide this one.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def peak_growth_mb(fn: Callable[[], None], device: str | torch.device) -> float:
    """Peak memory growth during ``fn``: on CUDA the allocator's (as the autotuner's memory check reads it),
    elsewhere resident memory (:func:`peak_rss_growth_mb`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return peak_bytes(fn, device) / 2**20
    return peak_rss_growth_mb(fn)


def peak_memory(work: "Workload", what: str) -> dict:
    """Peak memory growth of one measured phase (after one warm-up run of it; two on CUDA)."""
    phase = work.phases(what)["fwd_bwd_ms" if what == "encoder" else "step_ms"]
    phase()
    if torch.device(work.device).type == "cuda":
        phase()
    return {"peak_mem_mb": peak_growth_mb(phase, work.device)}


def peak_memory_child(spec: dict) -> dict:
    """Runs in a fresh process: each variant of one (model, mask) built in turn, its peak growth measured.

    The parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` low, so large blocks are returned
    to the OS when freed and resident memory follows what is live, not what glibc keeps cached.
    """
    import gc

    torch.set_num_threads(spec["threads"])
    for module in spec.get("import_module", []):       # the user's models, kernels or backends, as in the parent
        import_user_module(module)
    results = {}
    for name in spec["variants"]:
        work = Workload(Variant(name), spec["model"], spec["input_size"], spec["mask_ratio"], spec["batch"],
                        spec["dtype"], spec["device"], model_kwargs=parse_model_kwargs(spec["model_kwargs"]))
        tune_workload(work, work.dtype, spec.get("autotune", "cached"))     # backend auto: the parent's tuned plan
        results[name] = peak_memory(work, spec["what"])["peak_mem_mb"]
        del work
        gc.collect()
    return results


if __name__ == "__main__":   # child mode: python _measure.py '<json spec>'
    print(json.dumps(peak_memory_child(json.loads(sys.argv[1]))))
