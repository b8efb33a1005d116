"""Helpers for checking a backend (or a plug-in: converter, container, kernel) against ``masked``.

:func:`compare_with_masked` is the one-line check for a plug-in: it runs one SparK training
forward+backward on ``masked`` (SparK's dense reference) and on the backend under test, from the same
weights, images and mask, and reports how far every output, gradient and statistic lies apart
(:class:`EquivalenceReport`).

:func:`switch_branches_on` draws the weights such a comparison needs. timm starts residual branches
switched off: the last BatchNorm's weight is 0 in ResNets (``zero_init_last``), ByobNets, CSPNets,
RegNets and RepViT; NF-Nets' gains and GCNet's last conv are 0, GRN's weight is 0, ConvNeXt's and
RDNet's layer scales are 1e-6. Compared at that initialisation, a branch's convs get exactly zero (or
1e-6-scaled) gradients on both sides and the features do not depend on them, so an equivalence check
passes whatever the branch computes. The test suite, ``benchmarks/compare_backends.py`` and
:func:`compare_with_masked` draw those parameters first.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from .backends import Backend
from .errors import SparkSparseError
from .mask import ActiveMask
from .spark import SparK, create_spark

__all__ = ["SWITCHED_OFF_BELOW", "switch_branches_on", "compare_with_masked", "EquivalenceReport", "Deviation",
           "ComparisonError", "DEFAULT_TOLERANCES"]

#: a parameter whose every entry is below this in magnitude counts as switching its branch off
SWITCHED_OFF_BELOW = 1e-4

#: dtype -> default ``(rtol, atol)`` of :meth:`EquivalenceReport.assert_close`. In float64 a backend that computes
#: SparK's maths differs from ``masked`` only by another summation order (``sparse`` on tiny_cnn and resnet18: about
#: 1e-13 relative), while the broken plug-ins of tests/test_testing_helpers.py (flipped taps, filled masked sites)
#: give more than 1e-2. float32 whole-model gradients can move by percents where a ReLU input lies within rounding
#: of 0 (README, "Precision"): its defaults only catch gross errors, which is why comparisons run in float64.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {torch.float64: (1e-9, 1e-10),
                                                               torch.float32: (1e-2, 1e-4)}

#: ``factory(backend) -> SparK``: builds the model to compare on the backend it is given (a name or an instance)
ModelFactory = Callable[[Union[str, Backend]], SparK]


def switch_branches_on(module: nn.Module, seed: int = 0, low: float = 0.5, high: float = 1.5) -> list[str]:
    """Draw every parameter of ``module`` that is all zero or all below :data:`SWITCHED_OFF_BELOW` in
    magnitude from U(low, high), in place; the names drawn, in ``named_parameters`` order.

    Draws come from a generator seeded with ``seed`` on the CPU, so every backend and device that
    starts from the same module gets the same weights. (In eval mode, where BatchNorm uses its
    initial running statistics, a deep net's activations grow with these gains: comparisons there
    should draw smaller ones.)
    """
    gen = torch.Generator().manual_seed(seed)
    drawn = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.numel() and float(param.abs().max()) < SWITCHED_OFF_BELOW:
                value = torch.empty(param.shape, dtype=param.dtype).uniform_(low, high, generator=gen)
                param.copy_(value.to(param.device))
                drawn.append(name)
    return drawn


class ComparisonError(SparkSparseError, RuntimeError):
    """The backend under comparison failed to run the float64 step that ``masked`` ran (e.g. a kernel refuses
    float64): raised with the backend's own error and the way to compare in float32."""


class Deviation(NamedTuple):
    """How far one compared quantity lies from ``masked``'s: largest absolute difference, and the largest
    magnitude of ``masked``'s value (the scale a relative tolerance applies to)."""

    max_abs: float
    ref_max: float

    @property
    def max_rel(self) -> float:
        """``max_abs`` relative to the largest reference magnitude (elementwise ratios blow up near zeros)."""
        return self.max_abs / max(self.ref_max, 1e-30)

    def within(self, rtol: float, atol: float) -> bool:
        return self.max_abs <= atol + rtol * self.ref_max


def _deviation(got: torch.Tensor, want: torch.Tensor) -> Deviation:
    got, want = got.detach().double(), want.detach().double()
    if not want.numel():
        return Deviation(0.0, 0.0)
    return Deviation(float((got - want).abs().max()), float(want.abs().max()))


@dataclass
class EquivalenceReport:
    """One forward+backward of a backend against ``masked`` on the same weights, images and mask.

    ``deviations`` maps each quantity to its :class:`Deviation`: ``loss``, ``feature i`` (the i-th hierarchical
    map, finest first, at active sites), ``grad input``, ``grad <parameter>`` and ``buffer <name>`` (BatchNorm
    running statistics, after the step). ``masked_sites_nonzero`` counts the backend's feature values at masked
    sites that are not exactly 0, ``reference_masked_sites_nonzero`` those of ``masked`` (SparK's invariant: both
    must be 0; a converter whose module breaks it on ``masked`` is wrong even where both sides agree).
    ``mismatches`` lists what cannot be compared by value: shapes, names or gradients present on one side only.
    ``plan`` is what ran each layer of the backend (:meth:`Backend.plan`), to see whether a plug-in kernel ran.
    """

    backend: str
    model: str
    dtype: torch.dtype
    deviations: dict[str, Deviation] = field(default_factory=dict)
    masked_sites_nonzero: int = 0
    reference_masked_sites_nonzero: int = 0
    mismatches: list[str] = field(default_factory=list)
    plan: list[tuple[str, str]] = field(default_factory=list)

    def _tolerances(self, rtol: Optional[float], atol: Optional[float]) -> tuple[float, float]:
        if rtol is not None and atol is not None:
            return rtol, atol
        if self.dtype not in DEFAULT_TOLERANCES:
            raise ValueError(f"no default tolerances for {self.dtype}: pass rtol= and atol=")
        default_rtol, default_atol = DEFAULT_TOLERANCES[self.dtype]
        return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)

    def worst(self, rtol: Optional[float] = None, atol: Optional[float] = None) -> tuple[str, Deviation]:
        """The quantity farthest outside (or least inside) its tolerance ``atol + rtol * ref_max``."""
        rtol, atol = self._tolerances(rtol, atol)
        if not self.deviations:
            raise ValueError("the report compares nothing")
        return max(self.deviations.items(), key=lambda item: item[1].max_abs / (atol + rtol * item[1].ref_max))

    def failures(self, rtol: Optional[float] = None, atol: Optional[float] = None) -> list[str]:
        """Every violation, in words: non-zero masked sites and mismatches first (they say most), then deviations
        beyond ``atol + rtol * ref_max`` in the report's order (loss, features, input and parameter gradients,
        buffers). Tolerances default to :data:`DEFAULT_TOLERANCES` of the report's dtype."""
        rtol, atol = self._tolerances(rtol, atol)
        counts = ((self.masked_sites_nonzero, self.backend), (self.reference_masked_sites_nonzero, "masked"))
        found = [f"{count} feature values at masked sites are not 0 on {side!r}" for count, side in counts if count]
        found.extend(self.mismatches)
        found.extend(f"{name}: max abs error {dev.max_abs:.3g} (rel {dev.max_rel:.3g}) > {atol:g} + {rtol:g} * "
                     f"{dev.ref_max:.3g}" for name, dev in self.deviations.items() if not dev.within(rtol, atol))
        return found

    @property
    def ok(self) -> bool:
        """No failure at the default tolerances of the report's dtype."""
        return not self.failures()

    def assert_close(self, rtol: Optional[float] = None, atol: Optional[float] = None) -> None:
        """Raise ``AssertionError`` listing every failure (see :meth:`failures`), with the summary."""
        found = self.failures(rtol, atol)
        if found:
            listed = "\n  ".join(found[:20]) + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else "")
            raise AssertionError(f"backend {self.backend!r} differs from 'masked' on {self.model}:\n  {listed}\n{self}")

    def ran_on(self) -> Counter:
        """How many of the backend's layers each kernel (or layer kind) ran, from the plan's first word."""
        return Counter(how.split()[0] for _, how in self.plan if how.split())

    def __str__(self) -> str:
        lines = [f"{self.backend} vs masked on {self.model} ({str(self.dtype).replace('torch.', '')}): "
                 f"{len(self.deviations)} quantities compared; values at masked sites not 0: "
                 f"{self.masked_sites_nonzero} ({self.backend}), {self.reference_masked_sites_nonzero} (masked)"]
        if self.deviations:
            name, dev = self.worst()
            lines.append(f"  worst: {name}: max abs {dev.max_abs:.3g}, rel {dev.max_rel:.3g}")
        for key in ("loss", *(k for k in self.deviations if k.startswith("feature")), "grad input"):
            if key in self.deviations:
                dev = self.deviations[key]
                lines.append(f"  {key}: max abs {dev.max_abs:.3g}, rel {dev.max_rel:.3g}")
        grads = [dev for key, dev in self.deviations.items() if key.startswith("grad ") and key != "grad input"]
        if grads:
            lines.append(f"  parameter gradients ({len(grads)}): max rel {max(d.max_rel for d in grads):.3g}")
        lines.extend(f"  mismatch: {m}" for m in self.mismatches)
        if self.plan:
            lines.append("  ran on: " + ", ".join(f"{kind} x{n}" for kind, n in self.ran_on().most_common()))
        return "\n".join(lines)


def _one_step(spark: SparK, images: torch.Tensor, mask: ActiveMask, seed: int) -> dict:
    """Features, loss, input and parameter gradients and buffers of one training forward+backward; the
    features are those the loss was computed from. Seeded alike on both sides (drop path's draws)."""
    x = images.clone().requires_grad_(True)
    torch.manual_seed(seed)
    features = spark.encode(x, mask)
    loss = spark.loss(x, spark.decoder(spark.densify(features)), mask)
    loss.backward()
    return dict(features=[f.to_dense().detach() for f in features], loss=loss.detach(), grad_input=x.grad,
                grads={name: p.grad for name, p in spark.named_parameters()},
                buffers={name: b.detach().clone() for name, b in spark.named_buffers()})


def _compare_steps(report: EquivalenceReport, got: dict, ref: dict, mask: ActiveMask) -> None:
    """Fill ``report`` from the :func:`_one_step` results of the backend (``got``) and of ``masked`` (``ref``)."""
    report.deviations["loss"] = _deviation(got["loss"], ref["loss"])
    if len(got["features"]) != len(ref["features"]):
        report.mismatches.append(f"{len(got['features'])} feature maps, masked gives {len(ref['features'])}")
    for level, (g, r) in enumerate(zip(got["features"], ref["features"])):
        if g.shape != r.shape:
            report.mismatches.append(f"feature {level}: shape {tuple(g.shape)}, masked's {tuple(r.shape)}")
            continue
        site = mask.dense_like(r).expand_as(r)
        report.masked_sites_nonzero += int((g[~site] != 0).sum())
        report.reference_masked_sites_nonzero += int((r[~site] != 0).sum())
        report.deviations[f"feature {level}"] = _deviation(g[site], r[site])
    report.deviations["grad input"] = _deviation(got["grad_input"], ref["grad_input"])
    for kind, key in (("grad", "grads"), ("buffer", "buffers")):
        for name in sorted(set(got[key]) ^ set(ref[key])):
            report.mismatches.append(f"{kind} {name}: on {'masked' if name in ref[key] else report.backend} only")
        for name, want in ref[key].items():
            have = got[key].get(name)
            if name not in got[key] or (have is None and want is None):
                continue
            if (have is None) != (want is None):
                report.mismatches.append(f"{kind} {name}: None on {report.backend if have is None else 'masked'} "
                                         f"only")
            elif have.shape != want.shape:
                report.mismatches.append(f"{kind} {name}: shape {tuple(have.shape)}, masked's {tuple(want.shape)}")
            else:
                report.deviations[f"{kind} {name}"] = _deviation(have, want)


def compare_with_masked(model: Union[str, nn.Module, ModelFactory], backend: Union[str, Backend], input_size: int = 64,
                        batch: int = 2, mask_ratio: float = 0.6, seed: int = 0, dtype: torch.dtype = torch.float64,
                        device: Union[str, torch.device] = "cpu", **create_kwargs) -> EquivalenceReport:
    """Compare one SparK training step on ``backend`` with the same step on ``masked``.

    ``model``: a registered model name or a built encoder (a copy of it for each backend; built with
    :func:`~spark_sparse.create_spark`, ``input_size``, ``mask_ratio``, a 64-wide decoder unless
    ``decoder_width`` is given, and ``create_kwargs``), or
    ``factory(backend) -> SparK``, called once with ``"masked"`` and once with ``backend``. ``backend``: a
    name or an instance (``create_backend("sparse", kernels=("mykernel", "gemm"))``).

    The ``masked`` model is built first (torch seeded with ``seed``), its switched-off branches drawn
    (:func:`switch_branches_on`), and its state loaded into the other, so both hold the same weights; both run
    in ``dtype`` on ``device``, on the same images and one mask. float64 by default: a wrong computation is
    then not hidden by float32 rounding. The global RNG state is restored afterwards.

    Raises :class:`ComparisonError` when the backend fails where ``masked`` ran (e.g. a kernel that refuses
    float64: then compare with ``dtype=torch.float32`` and tolerances for float32).
    """
    name = backend if isinstance(backend, str) else backend.name
    build = model
    if isinstance(model, (str, nn.Module)):
        create_kwargs.setdefault("decoder_width", 64)       # the decoder is dense on both sides: keep it cheap

        def build(on: Union[str, Backend]) -> SparK:
            encoder = copy.deepcopy(model) if isinstance(model, nn.Module) else model     # a built one: a copy each
            return create_spark(encoder, backend=on, input_size=input_size, mask_ratio=mask_ratio, **create_kwargs)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        reference = build("masked").to(device, dtype)
        report = EquivalenceReport(name, model if isinstance(model, str) else type(reference.encoder).__name__, dtype)
        switch_branches_on(reference.encoder, seed=seed)
        state = {key: value.clone() for key, value in reference.state_dict().items()}
        images = torch.randn(batch, 3, *reference.input_hw, dtype=dtype,
                             generator=torch.Generator().manual_seed(seed + 1)).to(device)
        mask = reference.mask(batch, generator=torch.Generator().manual_seed(seed + 2), device=device)
        ref = _one_step(reference, images, mask, seed + 3)
        torch.manual_seed(seed)
        other = build(backend).to(device, dtype)          # conversion does not depend on dtype: errors as they are
        other.load_state_dict(state)
        try:
            got = _one_step(other, images, mask, seed + 3)
            report.plan = other.backend.plan(other.encoder, device, dtype)
        except Exception as err:
            if dtype != torch.float64:
                raise
            raise ComparisonError(
                f"backend {name!r} failed in float64 where 'masked' ran: {type(err).__name__}: {err}. If the "
                f"backend (or a kernel it runs) does not support float64, compare in float32: "
                f"compare_with_masked(..., dtype=torch.float32), with float32 tolerances") from err
    _compare_steps(report, got, ref, mask)
    return report
