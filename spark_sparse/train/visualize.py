"""A PNG grid of input / masked input / reconstruction, SparK's visualisation."""
from __future__ import annotations

from pathlib import Path

import torch

from ..mask import ActiveMask
from .data import denormalize

__all__ = ["save_reconstruction_grid"]


def save_reconstruction_grid(spark, images: torch.Tensor, mask: ActiveMask, path: Path, title: str = "") -> Path:
    """One row per image: input, masked input, reconstruction (visible patches kept).

    Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas: no pyplot state, no
    ``matplotlib.use``, so the caller's matplotlib backend and open figures are untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    was_training = spark.training
    spark.eval()
    try:
        rows = [denormalize(t.float()).cpu() for t in spark.reconstruct(images, mask)]
    finally:
        spark.train(was_training)
    n = images.shape[0]
    fig = Figure(figsize=(6, 2 * n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        for j, (label, batch) in enumerate(zip(("input", "masked", "reconstruction"), rows)):
            axes[i, j].imshow(batch[i].permute(1, 2, 0).numpy())
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a hidden half-written PNG behind
        raise
    return path
