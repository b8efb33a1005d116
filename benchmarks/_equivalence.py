"""Numerical equivalence of a variant against ``masked`` on the same weights, images and mask."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from _variants import autocast


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double(), want.double()
    abs_err = float((got - want).abs().max()) if want.numel() else 0.0
    return abs_err, abs_err / max(float(want.abs().max()), 1e-30)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32 if autocast made it bf16/fp16; fp32 and fp64 as they are (an fp64 comparison
    rounded to fp32 would hide every difference below fp32's resolution and show rounding flips)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _outputs(spark, images: torch.Tensor, mask, device: str, dtype: str) -> dict:
    """Feature maps, loss, input gradient and parameter gradients of one forward+backward."""
    images = images.clone().requires_grad_(True)
    with autocast(device, dtype):
        feats = [_at_least_fp32(f.to_dense()) for f in spark.encode(images, mask)]
        loss = spark.loss(images, _at_least_fp32(spark.decoder(spark.densify(spark.encode(images, mask)))), mask)
    spark.zero_grad(set_to_none=True)
    loss.backward()
    out = dict(feats=[f.detach() for f in feats], loss=loss.detach(), grad_in=images.grad,
               grads={k: p.grad.clone() for k, p in spark.named_parameters() if p.grad is not None}, mask=mask)
    spark.zero_grad(set_to_none=True)
    return out


def _compare_outputs(got: dict, ref: dict) -> dict:
    errors, nonzero = {}, 0
    for i, (g, r) in enumerate(zip(got["feats"], ref["feats"])):
        site = got["mask"].dense_like(g).expand_as(g)
        nonzero += int((g[~site] != 0).sum())
        errors[f"feature_{i}"] = _errors(g[site], r[site])
    errors["loss"] = _errors(got["loss"], ref["loss"])
    errors["grad_input"] = _errors(got["grad_in"], ref["grad_in"])
    param_errs = [_errors(got["grads"][k], ref["grads"][k]) for k in ref["grads"] if k in got["grads"]]
    errors["grad_params"] = (max(e[0] for e in param_errs), max(e[1] for e in param_errs))
    missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
    return {"errors": {k: {"max_abs": a, "max_rel": r} for k, (a, r) in errors.items()},
            "max_abs_err": max(a for a, _ in errors.values()), "max_rel_err": max(r for _, r in errors.values()),
            "masked_sites_nonzero": nonzero, "grad_params_mismatched_names": missing}


def outputs_of(work, fp64: bool = False) -> dict:
    """One forward+backward of ``work`` on its images and a freshly built mask (see :func:`_outputs`).

    ``fp64``: on a float64 copy of its model (weights, images and every kernel in double), where
    rounding no longer hides a difference of maths: what remains is how much the net amplifies the last
    bits of another summation order.
    """
    if fp64:
        return _outputs(copy.deepcopy(work.spark).double(), work.images.double(), work.fresh_mask(), work.device,
                        "fp32")
    return _outputs(work.spark, work.images, work.fresh_mask(), work.device, work.dtype)


def compare(work, reference_outputs: dict, fp64: bool = False) -> dict:
    """Max abs / relative error of every feature map, the loss, the input and every parameter gradient
    of ``work`` against the reference's :func:`outputs_of` (taken once per configuration).

    ``masked_sites_nonzero`` counts feature values at masked sites that are not exactly zero (must be 0).
    """
    return _compare_outputs(outputs_of(work, fp64), reference_outputs)


def fp32_noise_floor(masked, fp32_outputs: Optional[dict] = None) -> dict:
    """The same errors between ``masked`` in fp32 and ``masked`` in fp64: what fp32 rounding alone gives.

    Parameter gradients of a whole SparK model (BatchNorm in the decoder, per-patch normalised
    targets) are ill-conditioned: SparK's own fp32 code differs from its fp64 maths by up to a few
    percent on some gradient tensors. A variant's error vs ``masked`` is only meaningful next to this.
    ``fp32_outputs``: masked's fp32 :func:`outputs_of` where the caller has them already.
    """
    exact = outputs_of(masked, fp64=True)
    got = fp32_outputs or _outputs(masked.spark, masked.images, masked.fresh_mask(), masked.device, "fp32")
    return _compare_outputs(got, exact)
