"""Numerical equivalence of a variant against ``masked`` on the same weights, images and mask."""
from __future__ import annotations

import torch

from _variants import autocast


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double(), want.double()
    abs_err = float((got - want).abs().max()) if want.numel() else 0.0
    return abs_err, abs_err / max(float(want.abs().max()), 1e-30)


def compare(work, reference) -> dict:
    """Max abs / relative error of every feature map, the loss, the input and every parameter gradient.

    ``masked_sites_nonzero`` counts feature values at masked sites that are not exactly zero (must be 0).
    """
    out, nonzero = {}, 0
    for name, w in (("ref", reference), ("got", work)):
        images = w.images.clone().requires_grad_(True)
        mask = w.fresh_mask()
        with autocast(w.device, w.dtype):
            feats = [f.to_dense().float() for f in w.spark.encode(images, mask)]
            loss = w.spark.loss(images, w.spark.decoder(w.spark.densify(w.spark.encode(images, mask))).float(), mask)
        w.spark.zero_grad(set_to_none=True)
        loss.backward()
        out[name] = dict(feats=[f.detach() for f in feats], loss=loss.detach(), grad_in=images.grad,
                         grads={k: p.grad.clone() for k, p in w.spark.named_parameters() if p.grad is not None},
                         mask=mask)
        w.spark.zero_grad(set_to_none=True)
    ref, got = out["ref"], out["got"]
    errors = {}
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
