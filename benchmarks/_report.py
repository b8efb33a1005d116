"""results.json, results.md and the PNG plots of a benchmark run."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_markdown(path: Path, meta: dict, records: list[dict]) -> None:
    lines = [f"# Backend comparison ({meta['what']}, {meta['device']}, {meta['threads']} threads)", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']['cpu']} ({meta['machine']['cores']} cores), torch {meta['versions']['torch']}, "
             f"timm {meta['versions']['timm']}  ",
             f"Medians of {meta['repeats']} repeats after {meta['warmup']} warm-up, variants interleaved; speed-up vs "
             f"`masked` from the same run; memory: {meta['memory_method']}; errors vs `masked` on the same weights, "
             f"images and mask (relative = max abs error / max |reference|, worst tensor); fp32 floor = the same errors "
             f"between `masked` in fp32 and in fp64, i.e. what fp32 rounding alone gives.", "",
             "| model | variant | mask | dtype | batch | fwd ms | fwd+bwd ms | step ms | images/s | speed-up | peak MB | "
             "max abs err | max rel err | fp32 floor rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['backend']} | {r['mask_ratio']} | {r['dtype']} | {r['batch_size']} | "
                     f"{_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | {_fmt(r['step_ms'])} | {_fmt(r['images_per_s'])} | "
                     f"{_fmt(r['speedup_vs_masked'], 2)}x | {_fmt(r['peak_mem_mb'], 0)} | "
                     f"{r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} | {r['fp32_noise_floor']['max_rel_err']:.2e} |")
    if meta["skipped"]:
        lines += ["", "Skipped (unavailable here):"] + [f"- `{name}`: {why}" for name, why in meta["skipped"].items()]
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant in sorted({r["backend"] for r in records if r["model"] == model}):
            pts = sorted((r["mask_ratio"], r["speedup_vs_masked"]) for r in records
                         if r["model"] == model and r["backend"] == variant and r["speedup_vs_masked"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=model, xlabel="mask ratio", ylabel="speed-up vs masked")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "speedup_vs_mask_ratio.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\n{r['backend']}\nmask {r['mask_ratio']}" for r in records]
    ax.bar(range(len(records)), [r["peak_mem_mb"] or 0 for r in records])
    ax.set_xticks(range(len(records)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("peak memory growth (MB)")
    fig.tight_layout()
    paths.append(out / "peak_memory.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
