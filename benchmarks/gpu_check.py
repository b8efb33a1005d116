#!/usr/bin/env python
"""The one-shot GPU check: environment, ``pytest -m gpu``, the encoder and step tables, the loader's images/s.

Run through ``bash benchmarks/gpu_check.sh`` (it installs the project and any carried wheels first);
README "GPU check" gives the device call. Every phase runs in its own process with a deadline, so a
slow or hanging phase cannot eat the others' time: phase ``i`` must end by ``start + budget_1 + ...
+ budget_i`` (time a phase leaves unused goes to the next ones). The benchmark phases get that
deadline as ``--budget-s`` (they stop starting configurations and keep every finished row) and are
killed a few seconds after it at the latest.

Output: ONE folder ``$OUT/<name>/`` of 7 files (the device tool brings back 8 at most), laid out
like ``benchmarks/results/<name>/``::

    gpu_check.md          environment, phases (status, seconds), pytest summary, the issue's targets,
                          the loader's images/s against the step's
    pytest_gpu.log        the full ``pytest -m gpu`` output
    encoder/              results.json, speedup_vs_mask_ratio.png   (compare_backends)
    step/                 results.json, peak_memory.png             (compare_backends --what step)
    data/                 reference.json                            (data_loading.py --sections loader)

The benchmarks' results.md files stay in the stage folder, a new temporary folder per check unless
``--stage`` names one (their tables are printed at the end and rendered again from results.json by
``render_benchmarks.py``). SIGTERM (``timeout``, a job's end) kills the running phase with the check.

``GPU_CHECK_SMOKE=1`` runs the same phases on the CPU at tiny sizes (the test
``tests/test_gpu_check_smoke.py`` does, so CI catches a broken driver before a GPU session does).
This file uses the standard library only: a version difference on the GPU machine can break a
phase, never the driver.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

#: the environment phase's script: prints one JSON line (versions, device, backends with reasons)
ENVIRONMENT_SCRIPT = r"""
import json, platform, subprocess
from importlib.metadata import version, PackageNotFoundError
info = {"python": platform.python_version()}
for dist in ("torch", "triton", "timm", "spconv-cu126", "spconv", "cumm-cu126", "numpy", "spark-sparse"):
    try:
        info[dist] = version(dist)
    except PackageNotFoundError:
        info[dist] = None
import torch
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_mb=round(props.total_memory / 2**20),
                cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["driver"] = f"nvidia-smi failed: {exc}"
else:
    info["device"] = f"cpu ({platform.machine()})"
import spark_sparse as ss
info["backends"] = {b.name: (b.reason or "available") for b in ss.list_backends()}
info["families_left_out"] = {family: reason for family, (_, reason) in ss.models.unavailable_families().items()}
print(json.dumps(info))
"""


@dataclass
class Sizes:
    """What the tables measure: the issue's GPU grid, or a tiny CPU grid for the smoke run."""

    device: str
    models: list[str]
    input_size: int
    batch: int
    masks: list[str]
    dtypes: list[str]
    repeats: int
    warmup: int
    check_batch: int
    step_models: list[str]
    autotune_budget_s: float      # per configuration and tuned column (``auto``, ``recipe:fast``)
    pytest_workers: int           # pytest-xdist processes for ``pytest -m gpu`` (where xdist is installed)
    data_workers: list[int]       # loader worker counts of the data phase (SparK runs 8 per GPU)
    data_images: int              # synthetic JPEGs the data phase decodes
    budgets: dict[str, float] = field(default_factory=dict)


GPU = Sizes(device="cuda", models=["resnet50", "convnext_base"], input_size=224, batch=128, masks=["0.6", "0.75"],
            dtypes=["fp32", "bf16"], repeats=3, warmup=1, check_batch=16, step_models=["resnet50", "convnext_base"],
            autotune_budget_s=20, pytest_workers=4, data_workers=[4, 8], data_images=384,
            # seconds from the shell's start (its install is the first phase): under 8 minutes in all
            budgets={"install": 45, "environment": 25, "pytest": 110, "encoder": 140, "step": 120, "data": 25})
SMOKE = Sizes(device="cpu", models=["tiny_cnn"], input_size=64, batch=4, masks=["0.6"], dtypes=["fp32", "bf16"],
              repeats=1, warmup=0, check_batch=2, step_models=["tiny_cnn"], autotune_budget_s=5, pytest_workers=2,
              data_workers=[1], data_images=16,
              budgets={"install": 120, "environment": 120, "pytest": 300, "encoder": 600, "step": 600, "data": 120})
ENCODER_VARIANTS = ["masked", "sparse", "auto", "spconv", "triton"]
STEP_RECIPES = ["spark", "fast", "fast@bf16"]
#: files each benchmark phase contributes to the output folder (7 with gpu_check.md and pytest_gpu.log)
KEEP = {"encoder": ["results.json", "speedup_vs_mask_ratio.png"], "step": ["results.json", "peak_memory.png"],
        "data": ["reference.json"]}


@dataclass
class PhaseResult:
    name: str
    status: str            # ok / failed (rc) / timed out / skipped
    seconds: float
    budget: float
    note: str = ""


class Clock:
    """Deadlines: phase ``i`` ends by ``start + sum(budgets[:i + 1])``."""

    def __init__(self, start: float, budgets: dict[str, float]):
        self.start, self.budgets = start, budgets

    def deadline(self, phase: str) -> float:
        names = list(self.budgets)
        return self.start + sum(self.budgets[n] for n in names[:names.index(phase) + 1])

    def left(self, phase: str) -> float:
        return self.deadline(phase) - time.time()


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a phase and every process it started (compile workers); it runs in a session of its own."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:                   # it ended just now
        pass
    proc.wait()


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (``timeout``, a job's end) as an exception, so that the running phase's group is killed too."""
    raise SystemExit(128 + signum)


def run_phase(name: str, cmd: list[str], timeout: float, budget: float, log: Optional[Path] = None,
              env: Optional[dict] = None, echo=lambda line: True) -> tuple[PhaseResult, str]:
    """Run ``cmd`` with its output kept (and in ``log``) and the lines ``echo`` picks streamed with a prefix;
    kill its process group at ``timeout``."""
    if timeout < 5:
        return PhaseResult(name, "skipped", 0.0, budget, f"no time left ({timeout:.0f} s)"), ""
    shown = " ".join("<script>" if "\n" in arg else arg for arg in cmd)
    print(f"[gpu_check] phase {name}: {shown} (at most {timeout:.0f} s)", flush=True)
    started = time.time()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, env=env)
    sink = open(log, "w") if log else None

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if sink:
                sink.write(line)
                sink.flush()
            if echo(line):
                print(f"[{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        status = "timed out"
    except BaseException:                        # SIGTERM (see main) or Ctrl-C: leave no phase running behind us
        _kill_group(proc)
        raise
    reader.join(timeout=10)
    if sink:
        sink.close()
    seconds = time.time() - started
    print(f"[gpu_check] phase {name}: {status} in {seconds:.0f} s", flush=True)
    return PhaseResult(name, status, seconds, budget), "".join(lines)


def benchmark_command(python: str, what: str, sizes: Sizes, out: Path, budget_s: float) -> list[str]:
    cmd = [python, str(BENCH / "compare_backends.py"), "--device", sizes.device, "--what", what,
           "--input-size", str(sizes.input_size), "--batch-size", str(sizes.batch),
           "--repeats", str(sizes.repeats), "--warmup", str(sizes.warmup), "--check-batch", str(sizes.check_batch),
           "--budget-s", f"{budget_s:.0f}", "--autotune-budget", f"{sizes.autotune_budget_s:g}", "--allow-missing",
           "--out", str(out)]
    if sizes.device == "cpu":
        cmd += ["--memory", "inprocess", "--threads", str(min(4, os.cpu_count() or 1))]
    else:                                       # CPU threads for model construction and the fp64 check
        cmd += ["--threads", str(os.cpu_count() or 1)]
    if what == "encoder":
        return cmd + ["--models", *sizes.models, "--mask", *sizes.masks, "--dtype", *sizes.dtypes,
                      "--backends", *ENCODER_VARIANTS]
    return cmd + ["--models", *sizes.step_models, "--mask", sizes.masks[0], "--dtype", "fp32",
                  "--backends", "masked", "--recipes", *STEP_RECIPES, "--max-batch"]


def data_command(python: str, sizes: Sizes, out: Path) -> list[str]:
    """The loader's images/s on this machine's CPUs (``data_loading.py``'s loader section, SparK's worker
    counts): whether the workers feed the GPU as fast as the step table says it can take images."""
    return [python, str(BENCH / "data_loading.py"), "--sections", "loader", "--input-size", str(sizes.input_size),
            "--images", str(sizes.data_images), "--workers", *map(str, sizes.data_workers), "--repeats", "1",
            "--threads", str(os.cpu_count() or 1), "--out", str(out)]


def pytest_command(python: str, sizes: Sizes) -> list[str]:
    """``pytest -m gpu``, verbose, with a per-test timeout and several processes where the plugins are there
    (both are on the GPU image). Over a thousand small tests, most of their time is Python and Triton's
    compiler on the CPU, with the GPU nearly idle: processes in parallel fit them into the phase's budget."""
    # a test module that cannot be imported there (e.g. naming a layer the machine's older timm lacks) is an
    # error in the log, not the end of the phase
    cmd = [python, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", "--durations=15",
           "--continue-on-collection-errors"]
    if importable(python, "pytest_timeout"):
        cmd += ["--timeout", "90"]                          # one hanging test cannot take the phase
    if sizes.pytest_workers > 1 and importable(python, "xdist"):
        cmd += ["-n", str(sizes.pytest_workers)]
    return cmd + ["tests"]


def slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the folder name's card part."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w not in ("nvidia", "tesla")]
    return words[0] if words else "unknown"


def keep(stage: Path, folder: Path, what: str) -> list[str]:
    """Copy phase ``what``'s files in :data:`KEEP` from its stage to ``folder/what/``; the names copied."""
    copied = []
    for file in KEEP[what]:
        if (stage / file).exists():
            (folder / what).mkdir(exist_ok=True)
            shutil.copy2(stage / file, folder / what / file)
            copied.append(file)
    return copied


def finish_plots(python: str, stage: Path, what: str) -> None:
    """A benchmark killed at its deadline left results.json but no plots: draw them from the JSON."""
    if not (stage / "results.json").exists() or all((stage / f).exists() for f in KEEP[what] if f.endswith(".png")):
        return
    script = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
              "from _report import write_plots; out = Path(sys.argv[2]); "
              "records = json.loads((out / 'results.json').read_text())['records']; "
              "records and write_plots(out, records)")
    try:
        subprocess.run([python, "-c", script, str(BENCH), str(stage)], timeout=120)
    except subprocess.TimeoutExpired:
        print(f"[gpu_check] no plots for {what}: drawing them took over 120 s", flush=True)


# ---- the summary: what the issue asks of a GPU run, computed from the records (never asserted) ----

def _records(stage: Path) -> list[dict]:
    path = stage / "results.json"
    return json.loads(path.read_text())["records"] if path.exists() else []


def targets(encoder: list[dict], step: list[dict]) -> list[str]:
    """Markdown rows: the issue's GPU targets next to what this run measured."""
    rows = []
    for r in encoder:
        if r["backend"] != "auto" or r["mask_ratio"] != 0.6:
            continue
        spconv = next((s for s in encoder if s["backend"] == "spconv" and s["model"] == r["model"]
                       and s["mask_ratio"] == r["mask_ratio"] and s["dtype"] == r["dtype"]), None)
        versus = (f"; spconv {r['fwd_bwd_ms']:.1f} vs {spconv['fwd_bwd_ms']:.1f} ms: "
                  f"{'faster' if r['fwd_bwd_ms'] < spconv['fwd_bwd_ms'] else 'NOT faster'}") if spconv else \
            "; spconv not measured"
        rows.append(f"| encoder fwd+bwd `auto` >= 1.5x `masked`, {r['model']} {r['dtype']} mask 0.6 | "
                    f"{r['speedup_vs_masked']:.2f}x{versus} | {'met' if r['speedup_vs_masked'] >= 1.5 else 'not met'} |")
    by_variant = {(r["model"], r["backend"]): r for r in step}
    for model in dict.fromkeys(r["model"] for r in step):
        spark, fast = by_variant.get((model, "recipe:spark")), by_variant.get((model, "recipe:fast@bf16"))
        if not (spark and fast):
            continue
        speed = fast["images_per_s"] / spark["images_per_s"]
        rows.append(f"| step `fast@bf16` >= 3x `spark` images/s, {model} | {speed:.2f}x "
                    f"({fast['images_per_s']:.0f} vs {spark['images_per_s']:.0f}) | {'met' if speed >= 3 else 'not met'} |")
        batches = [(r.get("capacity") or {}).get("max_batch") for r in (spark, fast)]
        if all(batches) and batches[0] > 0:
            ratio = batches[1] / batches[0]
            rows.append(f"| largest batch at equal memory `fast@bf16` >= 1.5x `spark`, {model} | {ratio:.2f}x "
                        f"({batches[1]} vs {batches[0]}) | {'met' if ratio >= 1.5 else 'not met'} |")
    return rows


def _loader_values(stage: Path) -> dict:
    path = stage / "reference.json"
    return json.loads(path.read_text())["values"].get("loader", {}) if path.exists() else {}


def loader_line(loader: dict, step: list[dict]) -> str:
    """``Loader: ...``: images/s the loader workers deliver here against what the fastest recipe's step takes."""
    if not loader:
        return "Loader: not measured (no data phase results)."
    counts = sorted({int(key.split("_")[1]) for key in loader if key.startswith("workers_")})
    delivered = "; ".join(f"{n} worker{'s' if n != 1 else ''} {loader[f'workers_{n}_uint8_images_per_s']:.0f} images/s "
                          f"(SparK's float32 batches: {loader[f'workers_{n}_float32_images_per_s']:.0f})" for n in counts)
    steps = [f"{r['model']} {r['images_per_s']:.0f}" for r in step if r["backend"] == "recipe:fast@bf16"]
    takes = f"; the step `fast@bf16` takes {', '.join(steps)} images/s" if steps else ""
    return f"Loader: {delivered}{takes}."


def pytest_summary(log_text: str) -> str:
    """The last ``N passed, M skipped in Xs`` line of a pytest run ('' if it never got there)."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|errors|deselected|xfailed).*?)\s*=*$", log_text,
                       flags=re.MULTILINE)
    return found[-1] if found else ""


def write_summary(path: Path, env: dict, phases: list[PhaseResult], pytest_line: str, rows: list[str],
                  loader: str, smoke: bool, total_s: float) -> None:
    title = "GPU check (SMOKE run on the CPU: tiny sizes, not a GPU result)" if smoke else "GPU check"
    lines = [f"# {title}", "",
             f"Device: {env.get('device', '?')} (capability {env.get('capability', '-')}, {env.get('memory_mb', '-')} MB), "
             f"driver {env.get('driver', '-')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), cuDNN "
             f"{env.get('cudnn', '-')}, Triton {env.get('triton')}, timm {env.get('timm')}, Python {env.get('python')}, "
             f"spconv {env.get('spconv-cu126') or env.get('spconv')}; TF32 in cuDNN convs {env.get('cudnn_allow_tf32', '-')}, "
             f"in matmuls {env.get('matmul_allow_tf32', '-')}.", "",
             "Backends: " + "; ".join(f"`{name}` {why}" for name, why in env.get("backends", {}).items()), "",
             "Model families this timm cannot build (left out): "
             + ("; ".join(f"{family} ({why})" for family, why in env.get("families_left_out", {}).items()) or "none"), "",
             f"Total {total_s:.0f} s (the shell's install included).", "",
             "| phase | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.budget:.0f} | {p.note} |" for p in phases]
    lines += ["", f"pytest -m gpu: {pytest_line or 'no summary line (see pytest_gpu.log)'}", "", loader, "",
              "## The issue's GPU targets (measured here; a table row missing means it was not run)", "",
              "| target | measured | |", "|---|---|---|"] + (rows or ["| - | nothing measured | |"])
    lines += ["", "Tables: encoder/results.json, step/results.json, data/reference.json (copy `encoder`, `step` and "
                  "`data` to `benchmarks/results/gpu_<card>_encoder|step|data/`, this file and pytest_gpu.log to "
                  "`benchmarks/results/gpu_<card>_check/`, then run render_benchmarks.py; see README 'GPU check')."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu_check_out"))
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                   help="CPU, tiny sizes (default from GPU_CHECK_SMOKE=1)")
    p.add_argument("--stage", type=Path, default=None,
                   help="where the benchmarks write everything before the chosen files are copied to --out (emptied "
                        "first; default: a new temporary folder, so that two checks never share one)")
    p.add_argument("--phases", nargs="+", default=["environment", "pytest", "encoder", "step", "data"])
    args = p.parse_args(argv)
    start = float(os.environ.get("GPU_CHECK_T0") or time.time())     # the shell's start: its install counts
    sizes = SMOKE if args.smoke else GPU
    python = sys.executable
    clock = Clock(start, sizes.budgets)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.stage is None:
        args.stage = Path(tempfile.mkdtemp(prefix="gpu_check_stage_"))
        atexit.register(shutil.rmtree, args.stage, True)     # what is kept was copied into --out by then
    else:
        shutil.rmtree(args.stage, ignore_errors=True)
        args.stage.mkdir(parents=True)
    print(f"[gpu_check] stage folder (every benchmark file): {args.stage}", flush=True)
    phases: list[PhaseResult] = []
    if os.environ.get("GPU_CHECK_INSTALL_STATUS"):           # the shell's install, before this process
        phases.append(PhaseResult("install", os.environ["GPU_CHECK_INSTALL_STATUS"], time.time() - start,
                                  sizes.budgets["install"], os.environ.get("GPU_CHECK_INSTALL_NOTE", "")))
    info: dict = {}

    if "environment" in args.phases:
        result, text = run_phase("environment", [python, "-c", ENVIRONMENT_SCRIPT], clock.left("environment"),
                                 sizes.budgets["environment"], env=env)
        lines = [line for line in text.splitlines() if line.startswith("{")]
        info = json.loads(lines[-1]) if lines and result.status == "ok" else {}
        phases.append(result)
    name = "cpu_smoke" if args.smoke else f"gpu_{slug(info.get('device', 'unknown'))}"
    folder = args.out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    pytest_line = ""
    if "pytest" in args.phases:
        result, text = run_phase("pytest", pytest_command(python, sizes), clock.left("pytest"), sizes.budgets["pytest"],
                                 log=folder / "pytest_gpu.log", env=env, echo=_pytest_line_worth_showing)
        pytest_line = pytest_summary(text)
        result.note = pytest_line
        phases.append(result)

    for what in ("encoder", "step"):
        if what not in args.phases:
            continue
        stage = args.stage / what
        left = clock.left(what)
        if left < 45:
            phases.append(PhaseResult(what, "skipped", 0.0, sizes.budgets[what], f"no time left ({left:.0f} s)"))
            continue
        cmd = benchmark_command(python, what, sizes, stage, budget_s=left - 25)   # 25 s to write plots and return
        result, _ = run_phase(what, cmd, left + 10, sizes.budgets[what], env=env)
        finish_plots(python, stage, what)
        copied = keep(stage, folder, what)
        result.note = f"{len(_records(stage))} rows; kept {', '.join(copied) or 'nothing'}"
        phases.append(result)

    if "data" in args.phases:
        stage = args.stage / "data"
        result, _ = run_phase("data", data_command(python, sizes, stage), clock.left("data"), sizes.budgets["data"],
                              env=env)
        result.note = f"kept {', '.join(keep(stage, folder, 'data')) or 'nothing'}"
        phases.append(result)

    step_records = _records(args.stage / "step")
    rows = targets(_records(args.stage / "encoder"), step_records)
    loader = loader_line(_loader_values(args.stage / "data"), step_records)
    write_summary(folder / "gpu_check.md", info, phases, pytest_line, rows, loader, args.smoke, time.time() - start)
    files = sorted(str(f.relative_to(args.out)) for f in folder.rglob("*") if f.is_file())
    print(f"[gpu_check] wrote {len(files)} files under {args.out}: {', '.join(files)}", flush=True)
    for what in ("encoder", "step"):          # the summary last: the device tool returns the output's tail
        if (args.stage / what / "results.md").exists():
            print((args.stage / what / "results.md").read_text(), flush=True)
    print((folder / "gpu_check.md").read_text(), flush=True)
    return 0 if all(p.status == "ok" for p in phases) else 1


def _pytest_line_worth_showing(line: str) -> bool:
    """Failures, errors and the summary: the full verbose log is in pytest_gpu.log."""
    return not (re.search(r" (PASSED|SKIPPED)( |$)", line) or line.startswith(("tests/", "SKIPPED ")))


def importable(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
