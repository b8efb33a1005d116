"""results.json, results.md and the PNG plots of a benchmark run, with the run's provenance.

Every ``results.json`` records where its numbers come from (:func:`provenance`): the git commit
and whether the tree had uncommitted changes (and which files), the date, Python and the OS, next
to the machine and library versions the benchmark itself records. ``render_benchmarks.py`` prints
this next to every table of BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

#: CPU features that change what a table measures: the vector width of fp32 matmuls and whether bf16 has
#: matmul units of its own (without avx512_bf16 or amx_bf16, bf16 matmuls go through fp32 and are slower than fp32)
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def provenance() -> dict:
    """Commit, dirty state, date and interpreter of this run (``None`` fields outside a git checkout)."""
    # here, not at the top: render_benchmarks imports this module and must not pay for torch
    from spark_sparse.train.outputs import git_state

    return {**git_state(REPO),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform()}


def write_reference(out: Path, script: str, argv, sections: list[dict], values: dict, **fields) -> Path:
    """``out/reference.json`` of a diagnosis script (tables for ``render_benchmarks.py`` and the single
    values its template quotes), with the command, ``fields`` (threads, seconds, ...), machine,
    versions and provenance. ``argv=None``: the script ran from the command line."""
    from compare_backends import machine_info, versions       # compare_backends imports this module

    command = shlex.join([sys.executable] + (sys.argv if argv is None else [script, *argv]))
    meta = {"command": command, **fields, "machine": machine_info(), "versions": versions(),
            "provenance": provenance()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reference.json"
    path.write_text(json.dumps({"meta": meta, "sections": sections, "values": values}, indent=1))
    return path


def run_reference_sections(sections: dict, args, script: str, argv, tag: str) -> Path:
    """Run the diagnosis script's sections ``args.sections`` (``name -> fn(args) -> (table, values)``), with
    progress on stdout, and write their ``reference.json`` to ``args.out`` (see :func:`write_reference`)."""
    started = time.time()
    tables, values = [], {}
    for name in args.sections:
        table, values[name] = sections[name](args)
        tables.append(table)
        print(f"[{tag}] {name} done ({time.time() - started:.0f} s)", flush=True)
    path = write_reference(args.out, script, argv, tables, values, threads=args.threads, repeats=args.repeats,
                           seconds=round(time.time() - started, 1))
    print(f"[{tag}] wrote {path}")
    return path


#: fp32's unit roundoff: rounding a value to fp32 moves it by up to this fraction of itself
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def floor_ratios(record: dict) -> Optional[dict[str, float]]:
    """Per compared group (each feature map, the loss, the input gradient, the parameter gradients), the
    row's max abs error against ``masked`` over ``masked``'s own fp32-vs-fp64 max abs error, that floor
    taken at least as fp32's unit roundoff of the group's largest value.

    Scale-free where the per-tensor relative error is not: a tensor that is zero in exact arithmetic (a
    BatchNorm bias gradient of ~1e-20) makes relative errors of 1 out of pure rounding. About 1 means "as
    precise as ``masked`` in fp32", up to about 2 as close as two fp32 computations get. The roundoff
    minimum matters for the loss, one number: ``masked`` fp32 may land within 1e-9 of the exact loss by
    chance, while any other summation order moves it by one fp32 step (2^-23 of it). The group's largest
    value is read as ``max abs error / max rel error``, which for the parameter gradients (worst tensors
    by either measure) can only understate it. ``None`` when the row is not fp32 (the floor is an fp32
    one) or the record has no per-group errors; groups without error are left out.
    """
    errors = (record.get("equivalence") or {}).get("errors")
    floor = (record.get("fp32_noise_floor") or {}).get("errors")
    if record.get("dtype") != "fp32" or not errors or not floor:
        return None
    ratios = {}
    for group, error in errors.items():
        if error["max_abs"] == 0.0:
            continue
        largest = error["max_abs"] / error["max_rel"] if error["max_rel"] > 0 else 0.0
        floor_abs = max(floor.get(group, {}).get("max_abs", 0.0), FP32_UNIT_ROUNDOFF * largest)
        ratios[group] = error["max_abs"] / floor_abs if floor_abs > 0 else float("inf")
    return ratios


def error_vs_floor(record: dict) -> Optional[float]:
    """The worst of :func:`floor_ratios` (0 when every group is exact; ``None`` where it is ``None``)."""
    ratios = floor_ratios(record)
    return None if ratios is None else max(ratios.values(), default=0.0)


def worst_group(record: dict) -> str:
    """The group :func:`error_vs_floor` comes from; in rows without a floor (fp64, bf16), the group of the
    largest relative error; "-" when every group is exact."""
    ratios = floor_ratios(record)
    if ratios is None:
        errors = (record.get("equivalence") or {}).get("errors") or {}
        ratios = {group: error["max_rel"] for group, error in errors.items() if error["max_abs"] > 0}
    return max(ratios, key=ratios.get) if ratios else "-"


def _fmt_exp(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def weights_note(meta: dict) -> str:
    """Which weights the error columns were measured on (runs before ``--weights`` existed used timm's)."""
    if meta.get("weights") == "branches-on":
        return ("every variant on timm's initial weights with the parameters that switch residual branches off "
                "(zero last-BatchNorm weights, zero gains, 1e-6 layer scales) drawn from U(0.5, 1.5)")
    return ("every variant on timm's initial weights as they are: in ResNet-like nets (zero last-BatchNorm weights, "
            "zero gains, 1e-6 layer scales) the residual branches are switched off, so these errors do not cover them")


def equivalence_header() -> list[str]:
    return ["| model | variant | mask | dtype | batch | drawn | max abs err | max rel err | fp32 floor rel err | "
            "x floor | worst group | masked sites nonzero |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def equivalence_row(r: dict) -> str:
    """One row of an equivalence table (``--what equivalence``)."""
    return (f"| {r['model']} | {r['backend']} | {r['mask_ratio']} | {r['dtype']} | {r['batch_size']} | "
            f"{r.get('switched_on', '-')} | {r['max_abs_err']:.1e} | {r['max_rel_err']:.1e} | "
            f"{_fmt_exp((r['fp32_noise_floor'] or {}).get('max_rel_err'))} | {_fmt(error_vs_floor(r), 2)} | "
            f"{worst_group(r)} | "
            f"{r['equivalence']['masked_sites_nonzero']} |")


def row_label(row: dict, rows: list[dict]) -> str:
    """A step-breakdown row's name: its variant, with its decoder width where the table has several."""
    several = len({r.get("decoder_width") for r in rows}) > 1
    return f"{row['variant']} w{row['decoder_width']}" if several else row["variant"]


def breakdown_title(table: dict, meta: dict) -> str:
    """The line above a step breakdown's table: its model and settings (the decoder width where the run has one,
    rows name theirs where it has several; runs before ``--decoder-widths`` recorded none: SparK's)."""
    widths = meta.get("decoder_widths") or []
    width = f", decoder width {widths[0]}" if len(widths) == 1 else ""
    return (f"{table['model']}, batch {meta['batch_size']}, {meta['input_size']} px, mask {meta['mask']}, "
            f"{meta['threads']} threads{width} (ms, median of {meta['repeats']}; share of the step)")


def breakdown_lines(rows: list[dict]) -> list[str]:
    """A step breakdown's header and one line per row: each part's median in ms and its share of the step
    (``step_breakdown.py`` prints these, ``render_benchmarks.py`` renders them; runs before densify was timed
    alone have no densify column, their remainder includes it)."""
    parts = [part for part in ("encoder", "densify", "decoder", "optimizer") if part in rows[0]]
    rest = "loss, rest" if "densify" in parts else "densify, loss, rest"
    labels = [row_label(row, rows) for row in rows]
    width = max([18, *map(len, labels)])
    lines = [f"{'variant':<{width}} {'step':>7} " + " ".join(f"{part:>15}" for part in parts) + f" {rest:>21}"]
    for row, label in zip(rows, labels):
        step = row["step"]
        cells = [f"{row[p]:7.0f} ({row[p] / step:4.0%})" for p in (*parts, "rest")]
        lines.append(f"{label:<{width}} {step:7.0f} " + " ".join(f"{c:>15}" for c in cells[:-1]) + f" {cells[-1]:>21}")
    return lines


def write_markdown(path: Path, meta: dict, records: list[dict]) -> None:
    lines = [f"# Backend comparison ({meta['what']}, {meta['device']}, {meta['threads']} threads)", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']['cpu']} ({meta['machine']['cores']} cores), torch {meta['versions']['torch']}, "
             f"timm {meta['versions']['timm']}  "]
    if meta.get("model_kwargs"):
        lines.append(f"Models built with: {meta['model_kwargs']}  ")
    errors = (f"errors vs `{meta.get('reference', 'masked')}` on the same weights, images and mask ({weights_note(meta)}; relative = max abs "
              f"error / max |reference|, worst tensor); fp32 floor = the same errors between `masked` in fp32 and in "
              f"fp64, i.e. what fp32 rounding alone gives; x floor = the worst group's max abs error over the floor's "
              f"(fp32 rows).")
    if meta["what"] == "equivalence":
        lines += [f"Equivalence only (no timing): {errors} drawn = parameters drawn; worst group = where x floor "
                  f"comes from (rows without a floor: the largest relative error); masked sites nonzero = feature "
                  f"values at masked sites that are not exactly 0 (must be 0).", "", *equivalence_header()]
        lines += [equivalence_row(r) for r in records]
    else:
        lines += [f"Medians of {meta['repeats']} repeats after {meta['warmup']} warm-up, variants interleaved; speed-up "
                  f"vs `masked` from the same run; memory: {meta['memory_method']}; {errors}", "",
                  "| model | variant | mask | dtype | batch | fwd ms | fwd+bwd ms | step ms | images/s | speed-up | "
                  "peak MB | max abs err | max rel err | fp32 floor rel err | x floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            lines.append(f"| {r['model']} | {r['backend']} | {r['mask_ratio']} | {r['dtype']} | {r['batch_size']} | "
                         f"{_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} | {_fmt(r['step_ms'])} | "
                         f"{_fmt(r['images_per_s'])} | {_fmt(r['speedup_vs_masked'], 2)}x | {_fmt(r['peak_mem_mb'], 0)} | "
                         f"{r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} | {r['fp32_noise_floor']['max_rel_err']:.2e} | "
                         f"{_fmt(error_vs_floor(r), 2)} |")
    if meta["skipped"]:
        lines += ["", "Skipped (unavailable here):"] + [f"- `{name}`: {why}" for name, why in meta["skipped"].items()]
    path.write_text("\n".join(lines) + "\n")


def _figure(size: tuple[float, float]):
    """A figure on its own Agg canvas: no pyplot state, no ``matplotlib.use`` (the caller's backend stays)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    """The speed-up and memory charts of ``records``; none when no configuration finished."""
    paths = []
    if not records:
        return paths
    models = sorted({r["model"] for r in records})
    fig = _figure((5 * len(models), 4))
    axes = fig.subplots(1, len(models), squeeze=False)
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

    measured = [r for r in records if r["peak_mem_mb"] is not None]
    if not measured:                                     # --memory off: no chart of zeros
        return paths
    fig = _figure((7, 4))
    ax = fig.subplots()
    labels = [f"{r['model']}\n{r['backend']}\nmask {r['mask_ratio']}" for r in measured]
    ax.bar(range(len(measured)), [r["peak_mem_mb"] for r in measured])
    ax.set_xticks(range(len(measured)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("peak memory growth (MB)")
    fig.tight_layout()
    paths.append(out / "peak_memory.png")
    fig.savefig(paths[-1], dpi=100)
    return paths


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    """``{"meta": meta + provenance, "records": records}``; the provenance is the meta's own (compare_backends
    takes it when the run starts) or, without one, taken now."""
    meta = {**meta, "provenance": meta.get("provenance") or provenance()}
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
