"""The training run: output files, export to timm, exact resume, guards, bad data, non-finite loss."""
import functools
import importlib.machinery
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from spark_sparse.checkpoint import CheckpointError, atomic_save, read_checkpoint
from spark_sparse.errors import ConfigError
from spark_sparse.models import model_default_drop_path
from spark_sparse.spark import SparK
from spark_sparse.speed import BatchEstimate, plan_speed
from spark_sparse.train import engine, outputs
from spark_sparse.train.data import DataError, ImageFolderDataset, find_images
from spark_sparse.train.distributed import split_global_batch
from spark_sparse.train.config import PretrainConfig
from spark_sparse.train.engine import Trainer, TrainingError, pretrain
from spark_sparse.train.optim import default_beta2

from apptools import make_image_folder, tiny_config

#: the backend users get without --backend (the default recipe's on a CPU)
DEFAULT_BACKEND = plan_speed(tiny_config(".", ".").recipe, "cpu").backend


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), count=8)


@pytest.fixture(scope="module")
def folder12(tmp_path_factory):
    """12 images at batch 4: 3 iterations per epoch, so a run can stop in the middle of one."""
    return make_image_folder(tmp_path_factory.mktemp("data12"), count=12)


def _epoch_records(log_path):
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    return [r for r in records if "args" not in r]


def test_one_epoch_writes_every_output_file(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "out", ep=1, wp_ep=0.5), capture_console=True)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"pretrain_log.txt", "stdout_backup.txt", "stderr_backup.txt",
                                               "tiny_cnn_still_pretraining.pth", "tiny_cnn_1kpretrained.pth",
                                               "reconstruction.png", ".spark-pretrain.lock"}
    header, epoch = [json.loads(line) for line in (out / "pretrain_log.txt").read_text().splitlines()]
    assert header["model"] == "tiny_cnn" and header["args"]["bs"] == 4
    assert "tiny_cnn_1kpretrained.pth (the encoder's state dict, for TinyCNN.load_state_dict)" in \
        (out / "stdout_backup.txt").read_text()                 # not a timm model: no "timm-style" promise
    # the default 'auto' backend runs masked where its whole-encoder guard measured masked faster
    assert header["backend"] == header["speed_plan"]["backend"] in {DEFAULT_BACKEND, "masked"}
    assert header["backend_plan"] and "cmd" in header and "git_commit" in header and header["warnings"] == []
    assert epoch["epoch"] == 1 and epoch["loss"] > 0 and epoch["images_per_s"] > 0
    assert {"remaining", "finish_time", "lr"} <= epoch.keys()
    # the kernel tuning printed before the folder could be written to is in the backup too, first
    assert (out / "stderr_backup.txt").read_text().lstrip().startswith("[autotune]")
    # SparK's own keys, for its users' log readers
    assert header["git_commit_id"] == header["git_commit"] and header["git_dirty"] == outputs.git_state()["git_dirty"]
    assert (epoch["cur_ep"], epoch["last_L"], epoch["rema"], epoch["fini"]) == \
           ("1/1", epoch["loss"], epoch["remaining"], epoch["finish_time"])
    assert "finished" in (out / "stdout_backup.txt").read_text()
    ckpt = read_checkpoint(out / "tiny_cnn_still_pretraining.pth")
    assert {"model", "optimizer", "scaler", "epoch", "iteration", "args", "epoch_progress"} <= ckpt.keys()
    # plain tensors and Python values: torch's default (weights_only) loader reads it as SparK users would
    assert torch.load(out / "tiny_cnn_still_pretraining.pth", weights_only=True).keys() == ckpt.keys()


def test_a_library_call_leaves_the_callers_console_streams_alone(folder, tmp_path, monkeypatch):
    seen = []
    real_step = Trainer.step

    def step(self, *args, **kwargs):
        seen.append((sys.stdout, sys.stderr))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    before = (sys.stdout, sys.stderr)
    pretrain(tiny_config(folder, tmp_path, ep=1))
    assert seen and all(streams == before for streams in seen) and (sys.stdout, sys.stderr) == before
    assert not (tmp_path / "stdout_backup.txt").exists() and not (tmp_path / "stderr_backup.txt").exists()


def test_exported_resnet_loads_into_timm(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1, model="resnet18"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "resnet18_1kpretrained.pth"), strict=True)


NARROW_RESNET = {"channels": (8, 16, 32, 64)}


def test_a_model_built_with_constructor_arguments_exports_into_timm_built_with_them(folder, tmp_path, capsys):
    pretrain(tiny_config(folder, tmp_path, ep=1, model="resnet18", model_kwargs=NARROW_RESNET))
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, **NARROW_RESNET)
    model.load_state_dict(torch.load(tmp_path / "resnet18_1kpretrained.pth"), strict=True)
    header = json.loads((tmp_path / "pretrain_log.txt").read_text().splitlines()[0])
    assert header["args"]["model_kwargs"] == {"channels": [8, 16, 32, 64]}
    assert "(timm-style encoder, built with channels=(8, 16, 32, 64))" in capsys.readouterr().out


def test_resuming_or_initialising_with_other_constructor_arguments_names_the_runs_own(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "run", ep=1, model="resnet18", model_kwargs=NARROW_RESNET))
    checkpoint = str(tmp_path / "run" / "resnet18_still_pretraining.pth")
    with pytest.raises(CheckpointError, match=re.escape(
            "does not fit this model: ") + ".*" + re.escape(
            "; it was saved by a run of resnet18 built with channels=(8, 16, 32, 64), this run builds resnet18 with "
            "its defaults: to start from it, give --model_kwargs 'channels=(8, 16, 32, 64)'")):
        Trainer(tiny_config(folder, tmp_path / "init", model="resnet18", init_weight=checkpoint), "")
    with pytest.raises(CheckpointError, match=re.escape(
            "was pre-training resnet18 built with channels=(8, 16, 32, 64), this run builds it with its defaults: "
            "to continue that run, give --model_kwargs 'channels=(8, 16, 32, 64)'")):
        Trainer(tiny_config(folder, tmp_path / "out", model="resnet18", resume_from=checkpoint), "")
    trainer = Trainer(tiny_config(folder, tmp_path / "out", model="resnet18", resume_from=checkpoint,
                                  model_kwargs=["channels=(8,16,32,64)"]), "")
    assert trainer.spark.encoder.get_feature_map_channels() == [8, 16, 32, 64]


def test_the_folder_guard_offers_a_run_built_with_other_constructor_arguments_its_own_command(folder, tmp_path):
    logged = "spark-pretrain x --model resnet18 --model_kwargs 'channels=(8,16,32,64)'"
    pretrain(tiny_config(folder, tmp_path, ep=1, model="resnet18", model_kwargs=NARROW_RESNET), cmd=logged)
    checkpoint = tmp_path / "resnet18_still_pretraining.pth"
    with pytest.raises(ConfigError, match=re.escape(
            f"continue it:  {logged} --resume_from={checkpoint} --ep <more than 1>   (its own command, from its log: "
            f"it was built with other --model_kwargs; it finished its 1 epoch)")):
        Trainer(tiny_config(folder, tmp_path, ep=2, model="resnet18"), "spark-pretrain x --model resnet18 --ep 2")
    with pytest.raises(ConfigError, match=re.escape(f"continue it:  {logged} --ep 2 --resume_from={checkpoint}\n")):
        Trainer(tiny_config(folder, tmp_path, ep=2, model="resnet18", model_kwargs=NARROW_RESNET), f"{logged} --ep 2")


def test_constructor_arguments_that_are_not_literals_are_refused_before_the_run(folder, tmp_path):
    """A partial compares by identity (its resume would be refused), a lambda cannot be pickled into the checkpoint:
    neither reaches a run."""
    for value in (functools.partial(torch.nn.BatchNorm2d, eps=1e-3), lambda: 1):
        with pytest.raises(ConfigError, match=r"norm_layer=.*must be Python literals.*spark_sparse.create_spark\("
                                              r"name, norm_layer=\.\.\.\)"):
            tiny_config(folder, tmp_path, model="resnet18", model_kwargs={"norm_layer": value})


def test_constructor_arguments_the_model_does_not_take_are_named_with_its_complaint(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"model 'resnet18' could not be built with no_such_width=8 \(TypeError: "
                                          r".*no_such_width.*check their names and values"):
        Trainer(tiny_config(folder, tmp_path, model="resnet18", model_kwargs={"no_such_width": 8}), "")
    assert not tmp_path.joinpath("pretrain_log.txt").exists()


def _stop_with_sigterm_during(trainer: Trainer, global_it: int, whole_group: bool = False) -> None:
    """SIGTERM arrives while step ``global_it`` runs (before its forward ends): the run stops (with a checkpoint)
    after that step.

    ``whole_group``: the loader's workers get it too, from another process, as from ``kill -TERM -<pgid>``,
    ``timeout`` or SLURM (torch's workers exit quietly on a SIGTERM from their parent, not from others;
    the test cannot signal its real process group: pytest is in it)."""
    real_step = trainer.step

    def step(images, it, stop=None):
        if it == global_it:
            if whole_group:
                workers = [str(worker.pid) for worker in multiprocessing.active_children()]
                assert workers, "no loader workers to signal"
                subprocess.run(["kill", "-s", "TERM", str(os.getpid()), *workers], check=True)
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step(images, it, stop)

    trainer.step = step


def _kernel_plan(trainer: Trainer):
    state = trainer.autotune.plan_state()
    return None if state is None else (state["backend"], state["kernels"], state["guard"] and state["guard"]["choice"])


@pytest.mark.parametrize("backend,amp,workers,whole_group", [
    ("masked", "none", 0, False), ("torch", "none", 0, False), ("sparse", "none", 0, False),
    (DEFAULT_BACKEND, "none", 2, False), (DEFAULT_BACKEND, "bf16", 0, False), ("masked", "none", 2, True)],
    ids=["masked", "torch", "sparse", f"{DEFAULT_BACKEND}-default", f"{DEFAULT_BACKEND}-bf16", "masked-workers-signalled"])
def test_a_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(folder12, tmp_path, backend, amp, workers,
                                                                          whole_group):
    def config(out, **extra):
        return tiny_config(folder12, tmp_path / out, backend=backend, amp=amp, dataloader_workers=workers, **extra)

    straight = Trainer(config("a"), "")
    straight.run()
    # on 'auto' the second run must pick the same kernels to be comparable: it reads the first run's
    # measurements from the (test session's) autotune cache instead of timing again
    interrupted = Trainer(config("b", **({"autotune": "cached"} if backend == "auto" else {})), "")
    assert _kernel_plan(interrupted) == _kernel_plan(straight)
    _stop_with_sigterm_during(interrupted, global_it=3, whole_group=whole_group)   # epoch 1, iteration 0 of 3
    with pytest.raises(engine.StopRequested, match="--resume_from=") as stopped:
        interrupted.run()
    assert stopped.value.signum == signal.SIGTERM                                  # the CLI exits 128 + 15
    ckpt = read_checkpoint(tmp_path / "b" / "tiny_cnn_still_pretraining.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1)        # stopped after the step SIGTERM arrived in
    resumed = Trainer(config("b", resume_from="auto"), "")     # the folder's own checkpoint
    assert resumed.state.epoch == 0                           # not loaded until run()
    resumed.run()
    a, b = straight.spark.state_dict(), resumed.spark.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    logged = ("epoch", "loss", "min_loss", "lr", "unreadable_images")
    want = [{k: r[k] for k in logged} for r in _epoch_records(tmp_path / "a" / "pretrain_log.txt")]
    got = [{k: r[k] for k in logged} for r in _epoch_records(tmp_path / "b" / "pretrain_log.txt")]
    assert got == want                                        # the resumed epoch's loss covers all its iterations
    assert _epoch_records(tmp_path / "b" / "pretrain_log.txt")[-1]["resumed_at_iteration"] == 1


def test_a_stop_in_an_epochs_last_step_closes_the_epoch_first_and_resumes_into_the_next(folder12, tmp_path, capsys):
    straight = Trainer(tiny_config(folder12, tmp_path / "a", backend="masked"), "")
    straight.run()
    capsys.readouterr()
    interrupted = Trainer(tiny_config(folder12, tmp_path / "b", backend="masked"), "")
    _stop_with_sigterm_during(interrupted, global_it=2)                       # epoch 0's last of 3 iterations
    with pytest.raises(engine.StopRequested, match=r"stopped after epoch 1/2; resume with: --resume_from="):
        interrupted.run()
    bar = capsys.readouterr().err.split("\r")[-1]                             # the progress bar as it was left
    assert bar.startswith("epoch 1/2: 100%") and " 3/3 " in bar, bar
    ckpt = read_checkpoint(tmp_path / "b" / "tiny_cnn_still_pretraining.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    assert [r["epoch"] for r in _epoch_records(tmp_path / "b" / "pretrain_log.txt")] == [1]
    resumed = Trainer(tiny_config(folder12, tmp_path / "b", backend="masked", resume_from="auto"), "")
    resumed.run()
    a, b = straight.spark.state_dict(), resumed.spark.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = ("epoch", "loss", "min_loss", "lr")
    assert [{k: r[k] for k in logged} for r in _epoch_records(tmp_path / "b" / "pretrain_log.txt")] == \
        [{k: r[k] for k in logged} for r in _epoch_records(tmp_path / "a" / "pretrain_log.txt")]


def test_the_console_backups_tell_where_a_run_resumed_and_why_it_stopped(folder12, tmp_path):
    launched = "torchrun --nproc_per_node=2 -m spark_sparse.cli x --ep=1 --overwrite"    # the log's cmd
    interrupted = Trainer(tiny_config(folder12, tmp_path, backend="masked", ep=1), launched, capture_console=True)
    _stop_with_sigterm_during(interrupted, global_it=1)
    with pytest.raises(engine.StopRequested):
        interrupted.run()
    assert ("[spark-pretrain] stopped after iteration 2/3 of epoch 1/1; resume with: torchrun --nproc_per_node=2 -m "
            f"spark_sparse.cli x --ep=1 --resume_from={tmp_path / 'tiny_cnn_still_pretraining.pth'}") in \
        (tmp_path / "stderr_backup.txt").read_text()
    Trainer(tiny_config(folder12, tmp_path, backend="masked", ep=1, resume_from="auto"), "",
            capture_console=True).run()
    stdout = (tmp_path / "stdout_backup.txt").read_text()
    assert "resumed from" in stdout and ": 0 of 1 epochs done, then 2/3 iterations of epoch 1" in stdout
    assert stdout.count("resumed from") == 1


def test_a_checkpoint_saved_after_an_epochs_last_step_but_before_its_end_resumes(folder12, tmp_path):
    """Earlier versions saved a stop in an epoch's last step as (epoch, iteration = iterations per epoch): resuming
    it runs no step of that epoch, closes it (log line, lr from the schedule) and goes on."""
    straight = Trainer(tiny_config(folder12, tmp_path / "a", backend="masked"), "")
    straight.run()
    interrupted = Trainer(tiny_config(folder12, tmp_path / "b", backend="masked"), "")
    _stop_with_sigterm_during(interrupted, global_it=2)                       # saved as (1, 0): made (0, 3) below
    with pytest.raises(engine.StopRequested):
        interrupted.run()
    path = tmp_path / "b" / "tiny_cnn_still_pretraining.pth"
    ckpt = read_checkpoint(path)
    first = _epoch_records(tmp_path / "b" / "pretrain_log.txt")[0]
    ckpt.update(epoch=0, iteration=3, min_loss=float("inf"), epoch_progress={"loss_sum": 3 * first["loss"],
                                                                             "unreadable": []})
    atomic_save(ckpt, path)
    log = tmp_path / "b" / "pretrain_log.txt"
    log.write_text(log.read_text().splitlines()[0] + "\n")                    # the header only, as such a run left
    pretrain(tiny_config(folder12, tmp_path / "b", backend="masked", resume_from="auto"))
    got, want = _epoch_records(log), _epoch_records(tmp_path / "a" / "pretrain_log.txt")
    assert [r["epoch"] for r in got] == [1, 2] and got[0]["lr"] == want[0]["lr"]
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-12) and got[1]["loss"] == want[1]["loss"]


def test_a_resumed_trainer_run_again_continues_from_its_latest_checkpoint(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1))
    trainer = Trainer(tiny_config(folder, tmp_path, ep=3, resume_from="auto"), "")
    assert trainer.run(max_epochs=1).epoch == 2
    assert trainer.run().epoch == 3                 # reads the folder's checkpoint again, as a new resume would


def test_resuming_a_finished_run_trains_nothing_writes_nothing_and_names_its_encoder(folder, tmp_path, capsys):
    pretrain(tiny_config(folder, tmp_path, ep=1))
    log = (tmp_path / "pretrain_log.txt").read_bytes()
    capsys.readouterr()
    state = pretrain(tiny_config(folder, tmp_path, ep=1, resume_from="auto"))    # e.g. a requeued job
    assert state.epoch == 1 and (tmp_path / "pretrain_log.txt").read_bytes() == log
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and f"its pre-trained encoder is {tmp_path / 'tiny_cnn_1kpretrained.pth'}" \
        in printed and "--ep above 1" in printed
    elsewhere = tmp_path / "elsewhere"          # into a new folder: no folder of empty outputs
    state = pretrain(tiny_config(folder, elsewhere, ep=1, resume_from=str(tmp_path / "tiny_cnn_still_pretraining.pth")))
    assert state.epoch == 1 and not elsewhere.exists()


def test_resuming_with_fewer_epochs_than_the_run_has_done_is_refused_before_anything_is_written(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=2))
    log = (tmp_path / "pretrain_log.txt").read_bytes()
    with pytest.raises(ConfigError, match=r"--ep 1: .* has already done 2 epochs, and a run cannot be shortened. To "
                                          r"continue it, give --ep above 2"):
        Trainer(tiny_config(folder, tmp_path, ep=1, resume_from="auto"), "")
    assert (tmp_path / "pretrain_log.txt").read_bytes() == log


def test_resume_auto_without_a_checkpoint_starts_a_new_run(folder, tmp_path):
    trainer = Trainer(tiny_config(folder, tmp_path, ep=1, resume_from="auto"), "")
    assert trainer.resume_path is None
    assert trainer.run().epoch == 1


def _previous_run(folder_path):
    folder_path.mkdir(parents=True)
    (folder_path / "pretrain_log.txt").write_text('{"name": "old", "args": {"ep": 3}}\n{"epoch": 3, "loss": 0.9}\n')
    atomic_save({"format": "spark-sparse/1"}, folder_path / "tiny_cnn_still_pretraining.pth")
    return (folder_path / "pretrain_log.txt").read_bytes()


def test_a_folder_holding_a_run_is_refused_with_the_commands_to_continue_or_start_over(folder, tmp_path):
    log = _previous_run(tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(folder, tmp_path / "out"), "spark-pretrain t --ep=2")
    message = str(err.value)
    assert "already holds a run" in message and "last logged epoch 3 of 3" in message
    assert (f"spark-pretrain t --resume_from={tmp_path / 'out' / 'tiny_cnn_still_pretraining.pth'} "   # finished:
            f"--ep <more than 3>") in message                                                      # --ep replaced
    assert "spark-pretrain t --ep=2 --overwrite" in message
    assert (tmp_path / "out" / "pretrain_log.txt").read_bytes() == log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pretrain_log.txt",
                                                                     "tiny_cnn_still_pretraining.pth"]


def test_resuming_a_checkpoint_from_elsewhere_into_a_folder_with_a_run_is_refused(folder, tmp_path):
    _previous_run(tmp_path / "out")
    _previous_run(tmp_path / "other")
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(tiny_config(folder, tmp_path / "out",
                            resume_from=str(tmp_path / "other" / "tiny_cnn_still_pretraining.pth")), "")


def test_overwrite_starts_over_in_a_folder_holding_a_run(folder, tmp_path, capsys):
    _previous_run(tmp_path / "out")
    (tmp_path / "out" / "resnet18_still_pretraining.pth").write_bytes(b"another model's run")
    (tmp_path / "out" / "notes.txt").write_text("not a run file")
    pretrain(tiny_config(folder, tmp_path / "out", ep=1, overwrite=True))
    assert re.search(r"--overwrite: deleted the previous run's .*resnet18_still_pretraining.pth", capsys.readouterr().err)
    records = [json.loads(line) for line in (tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()]
    assert [("args" in r, r.get("epoch")) for r in records] == [(True, None), (False, 1)]
    assert not (tmp_path / "out" / "resnet18_still_pretraining.pth").exists()
    assert (tmp_path / "out" / "notes.txt").read_text() == "not a run file"
    assert read_checkpoint(tmp_path / "out" / "tiny_cnn_still_pretraining.pth")["epoch"] == 1


def test_dataloader_workers_live_across_epochs(folder, tmp_path, monkeypatch):
    pids = tmp_path / "pids.txt"
    real_load = ImageFolderDataset.load

    def load(self, index):
        with open(pids, "a") as fh:                  # written by the worker process that loads the image
            fh.write(f"{os.getpid()}\n")
        return real_load(self, index)

    monkeypatch.setattr(ImageFolderDataset, "load", load)
    pretrain(tiny_config(folder, tmp_path / "out", ep=2, dataloader_workers=1))
    loads = pids.read_text().split()
    workers = set(loads) - {str(os.getpid())}          # this process loads only the final PNG's images
    assert len(loads) >= 16 and len(workers) == 1


def test_the_log_says_whether_the_code_that_ran_differs_from_its_commit(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    def dirty():
        return outputs.git_state(tmp_path)["git_dirty"]

    assert outputs.git_state(tmp_path) == {"git_commit": None, "git_dirty": None, "git_changed_files": []}
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "code")
    assert len(outputs.git_state(tmp_path)["git_commit"]) == 40 and dirty() is False
    (tmp_path / "untracked.txt").write_text("")                    # not code that ran: still clean
    assert dirty() is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert dirty() is True and outputs.git_state(tmp_path)["git_changed_files"] == ["code.py"]


class _RecordingSummaryWriter:
    """Stands in for torch.utils.tensorboard's SummaryWriter (the tensorboard package is optional, not installed
    in CI): records where it was asked to write and what."""
    made: list = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        type(self).made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_logs_go_to_sparks_folder_when_one_is_named(folder, tmp_path, monkeypatch):
    fake_package = types.ModuleType("tensorboard")
    fake_package.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    fake_writer_module = types.ModuleType("torch.utils.tensorboard")
    fake_writer_module.SummaryWriter = _RecordingSummaryWriter
    monkeypatch.setitem(sys.modules, "tensorboard", fake_package)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_writer_module)
    monkeypatch.setattr(_RecordingSummaryWriter, "made", [])
    pretrain(tiny_config(folder, tmp_path / "run", ep=1, tb_lg_dir=str(tmp_path / "tb")))
    (writer,) = _RecordingSummaryWriter.made
    assert Path(writer.log_dir) == tmp_path / "tb" and writer.closed
    assert ("train/loss", 0) in writer.scalars and ("train/lr", 0) in writer.scalars


def test_a_missing_tensorboard_package_is_named_with_the_flag_that_asked_for_it(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)       # an import (and find_spec) of it fails
    with pytest.raises(ConfigError, match=r"^--tb_lg_dir needs the tensorboard package: pip install tensorboard"):
        Trainer(tiny_config(folder, tmp_path, tb_lg_dir=str(tmp_path / "tb")), "")


def test_a_finished_run_stops_its_loader_workers_at_once(folder, tmp_path):
    """Not when the trainer is garbage-collected: a notebook or a sweep holding it would keep the workers (and
    their memory) alive, and a collection at an arbitrary later moment races with other loaders' queues."""
    trainer = Trainer(tiny_config(folder, tmp_path, ep=1, wp_ep=0.5, dataloader_workers=2), "")
    before = set(multiprocessing.active_children())
    trainer.run()
    assert trainer.loader is None and set(multiprocessing.active_children()) <= before


def test_too_many_loader_workers_for_the_cpus_is_said_once_with_the_number_to_use(folder, tmp_path, monkeypatch,
                                                                                    recwarn):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)   # a one-CPU machine
    pretrain(tiny_config(folder, tmp_path / "out", ep=1, wp_ep=0.5, dataloader_workers=2))
    header = json.loads((tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()[0])
    said = [w for w in header["warnings"] if "--dataloader_workers 2" in w]
    assert len(said) == 1 and "on the 1 CPU this" in said[0] and "use --dataloader_workers 1 or fewer" in said[0]
    assert not [w for w in recwarn if "worker processes" in str(w.message)]    # torch's twice-printed one muted


@pytest.mark.parametrize("workers, processes, cpus, use", [(8, 1, 2, 2), (8, 8, 32, 4), (3, 2, 4, 2)])
def test_loader_workers_over_the_cpus_name_a_count_that_fits(workers, processes, cpus, use):
    message = engine.too_many_loader_workers(workers, processes, cpus)
    assert f"use --dataloader_workers {use} or fewer" in message
    assert (f"{processes} training processes x {workers}" in message) == (processes > 1)


@pytest.mark.parametrize("workers, processes, cpus", [(0, 1, 1), (8, 1, 8), (8, 8, 64), (2, 2, 4)])
def test_loader_workers_that_fit_the_cpus_are_not_warned_about(workers, processes, cpus):
    assert engine.too_many_loader_workers(workers, processes, cpus) is None


def test_global_batch_is_checked_against_the_dataset_and_the_process_count():
    assert split_global_batch(8, 2, 100) == (4, 8, [])
    local, used, warnings = split_global_batch(10, 4, 100)
    assert (local, used) == (2, 8) and "--bs 10 is not divisible by the 4 processes" in warnings[0]
    with pytest.raises(ConfigError, match=r"--bs 64 is larger than the dataset \(24 images\).*--bs 24 or less"):
        split_global_batch(64, 1, 24)
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        split_global_batch(2, 4, 100)


def test_a_batch_larger_than_the_dataset_fails_before_writing_anything(folder, tmp_path):
    with pytest.raises(ConfigError, match="larger than the dataset"):
        Trainer(tiny_config(folder, tmp_path / "out", bs=16), "")
    assert not (tmp_path / "out").exists()


def test_a_batch_above_the_memory_estimate_is_warned_before_the_first_step(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "estimate_max_batch", lambda *args, **kwargs: BatchEstimate(50.0, 10.0, 200.0, 3))
    trainer = Trainer(tiny_config(folder, tmp_path, bs=4, backend="masked"), "")
    assert len(trainer.warnings) == 1 and "batch per process (4) is larger than the estimated largest" in \
        trainer.warnings[0] and "about 3" in trainer.warnings[0]
    trainer._print_start()
    assert "warning: the batch per process (4)" in capsys.readouterr().err


def test_a_single_process_run_says_nothing_about_sync_batchnorm(folder, tmp_path, capsys):
    """SparK's --sbn is on by default; with one process there is nothing to synchronise, nothing to say."""
    Trainer(tiny_config(folder, tmp_path, backend="masked"), "")._print_start()
    assert "--sbn" not in capsys.readouterr().out


def test_fp16_autocast_on_a_cpu_warns_to_use_bf16(folder, tmp_path):
    trainer = Trainer(tiny_config(folder, tmp_path, amp="fp16", backend="masked"), "")
    assert any("--amp fp16 on a CPU" in w and "--amp bf16" in w for w in trainer.warnings)
    bf16 = Trainer(tiny_config(folder, tmp_path, amp="bf16", backend="masked"), "")
    assert not any("fp16" in w for w in bf16.warnings)


def test_unreadable_images_are_replaced_named_once_and_counted_each_epoch(folder, tmp_path, capsys):
    broken = make_image_folder(tmp_path / "data", count=8)
    (broken / "train" / "class0" / "img0.png").write_bytes(b"this is not a png")
    pretrain(tiny_config(broken, tmp_path / "out", ep=2))
    err = capsys.readouterr().err
    assert err.count("img0.png (UnidentifiedImageError: cannot identify image file") == 1
    assert "epoch 1: 1 unreadable image(s), 12% of the data, each replaced by the next readable one (1 named " \
           "above)" in err
    assert "epoch 2: 1 unreadable image(s), 12% of the data, each replaced by the next readable one (0 named " \
           "above, 1 named in an earlier epoch)" in err
    epochs = _epoch_records(tmp_path / "out" / "pretrain_log.txt")
    assert [epoch["unreadable_images"] for epoch in epochs] == [1, 1]


def test_hidden_files_and_folders_are_left_out_and_counted_on_the_data_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", count=4)
    (data / "train" / "class0" / "._img0.png").write_bytes(b"AppleDouble resource fork")
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (data / "train" / ".ipynb_checkpoints" / "img0-checkpoint.png").write_bytes(b"")
    trainer = Trainer(tiny_config(data, tmp_path / "out", backend="masked"), "")
    trainer._print_start()
    line = next(line for line in capsys.readouterr().out.splitlines() if "data:" in line)
    assert len(trainer.dataset) == 4 and f"4 images from {data / 'train'} (1 hidden file with an image name and 1 " \
                                          f"hidden folder (.ipynb_checkpoints) left out" in line


def test_a_folder_of_unreadable_images_is_refused_before_anything_is_built_or_written(tmp_path, monkeypatch):
    broken = make_image_folder(tmp_path / "data", count=4)
    for path in (broken / "train").rglob("*.png"):
        path.write_bytes(b"this is not a png")
    def never(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(engine, "create_spark", never)
    with pytest.raises(DataError) as err:
        pretrain(tiny_config(broken, tmp_path / "out", ep=1))
    message = str(err.value)
    assert message.startswith("none of 4 images sampled across the 4 files could be read, e.g. ") and \
        "UnidentifiedImageError" in message and "check that --data_path holds images" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_images_that_become_unreadable_during_a_run_are_one_message_naming_a_file_and_why(tmp_path, workers,
                                                                                           monkeypatch):
    broken = make_image_folder(tmp_path / "data", count=4)
    for path in (broken / "train").rglob("*.png"):
        path.write_bytes(b"this is not a png")
    monkeypatch.setattr(ImageFolderDataset, "check_readable", lambda self: None)   # readable when the run began
    with pytest.raises(DataError) as err:
        pretrain(tiny_config(broken, tmp_path / "out", ep=1, dataloader_workers=workers))
    message = str(err.value)        # from a loader worker too: without torch's worker traceback
    assert message.startswith("none of the 4 images could be read, e.g. ") and "UnidentifiedImageError" in message
    assert "Traceback" not in message and ".png" in message


def test_missing_and_empty_folders_fail_before_writing_anything(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pretrain(tiny_config(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        pretrain(tiny_config(tmp_path / "file.jpg", tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"--data_path '': an empty folder name \(an unset shell variable\?\) would "
                                          r"read the current folder"):
        tiny_config("", tmp_path / "out")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        pretrain(tiny_config(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_folders_that_cannot_be_listed_are_warned_about_with_the_reason(folder, tmp_path, monkeypatch):
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("class1"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = find_images(folder)
    assert all(p.parent.name == "class0" for p in listing.files)
    assert listing.unlisted == [f"{folder / 'train' / 'class1'}: Permission denied"]
    trainer = Trainer(tiny_config(folder, tmp_path, backend="masked"), "")
    assert any(w.startswith("1 folder(s) under --data_path could not be listed") and "class1: Permission denied" in w
               for w in trainer.warnings)


def test_non_finite_loss_stops_and_keeps_a_resumable_last_good_state(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = SparK.loss

    def flaky_loss(self, *args):
        calls["n"] += 1
        value = real_loss(self, *args)
        return value * float("nan") if calls["n"] == 3 else value

    trainer = Trainer(tiny_config(folder, tmp_path, ep=2), "", capture_console=True)
    monkeypatch.setattr(SparK, "loss", flaky_loss)
    with pytest.raises(TrainingError, match="loss is nan.*last good state"):
        trainer.run()
    assert re.search(r"^Error: .*loss is nan.*last good state", (tmp_path / "stderr_backup.txt").read_text(), re.M)
    ckpt = read_checkpoint(tmp_path / "tiny_cnn_still_pretraining.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)          # 2 iterations/epoch: the 3rd step failed
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.setattr(SparK, "loss", real_loss)
    state = pretrain(tiny_config(folder, tmp_path, ep=2, resume_from=str(tmp_path / "tiny_cnn_still_pretraining.pth")))
    assert state.epoch == 2


def test_resuming_a_file_that_is_not_a_run_checkpoint_is_a_clear_error_before_tuning(folder, tmp_path, monkeypatch):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    monkeypatch.setattr(engine, "autotune", lambda *args, **kwargs: pytest.fail("tuned before checking the file"))
    with pytest.raises(CheckpointError, match="not a spark-pretrain checkpoint.*--init_weight"):
        pretrain(tiny_config(folder, tmp_path / "out", resume_from=str(tmp_path / "weights.pth")))


def test_resuming_another_models_run_names_the_model_to_pass(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "tiny", ep=1))
    with pytest.raises(CheckpointError, match=r"was pre-training 'tiny_cnn', this run is 'resnet18': to continue that "
                                              r"run add --model=tiny_cnn"):
        Trainer(tiny_config(folder, tmp_path / "out", model="resnet18",
                            resume_from=str(tmp_path / "tiny" / "tiny_cnn_still_pretraining.pth")), "")


def test_a_damaged_own_checkpoint_says_how_to_restore_or_start_over_and_that_way_works(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1))
    own = tmp_path / "tiny_cnn_still_pretraining.pth"
    own.write_bytes(own.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint.*It is this run's own checkpoint, so "
                                              r"it was cut short or damaged after it was written.*restore it from a "
                                              r"copy, or start the run over without --resume_from and with "
                                              r"--overwrite"):
        Trainer(tiny_config(folder, tmp_path, ep=2, resume_from="auto"), "")
    assert pretrain(tiny_config(folder, tmp_path, ep=1, overwrite=True)).epoch == 1
    assert read_checkpoint(own)["epoch"] == 1


@pytest.mark.parametrize("input_size, mask, message", [
    (50, 0.6, "--input_size 50: must be a positive multiple of 32"),
    (32, 0.6, "keeps round(1 * 0.4) = 0 of 1 patches visible"),
    (64, 0.1, "keeps round(4 * 0.9) = all 4 patches visible, so nothing is left to reconstruct"),
])
def test_an_input_size_the_model_cannot_mask_is_refused_before_anything_is_written(folder, tmp_path, input_size,
                                                                                   mask, message):
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(folder, tmp_path / "out", input_size=input_size, mask=mask), "")
    assert message in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=re.escape(message)):      # from the settings alone: before the data's
        tiny_config(folder, tmp_path / "out", input_size=input_size, mask=mask, bs=10 ** 6)   # batch is checked


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_run(folder, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="a_file is a file"):
        Trainer(tiny_config(folder, tmp_path / "a_file" / "out"), "")


def test_an_output_folder_the_system_will_not_create_is_refused_before_the_run(folder, tmp_path):
    """Permissions allow it (root), the file system does not: found by making the folder, which is taken away."""
    with pytest.raises(ConfigError, match=r"cannot create the output folder /proc/spark_sparse_nope/"):
        Trainer(tiny_config(folder, Path("/proc/spark_sparse_nope")), "")
    nested = tmp_path / "new" / "deeper"
    Trainer(tiny_config(folder, nested), "")
    assert not (tmp_path / "new").exists()                      # the probe leaves nothing behind


def test_decoder_width_builds_the_decoder_is_checked_and_kept_by_a_resume(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "run", ep=1, decoder_width=64))
    checkpoint = torch.load(tmp_path / "run" / "tiny_cnn_still_pretraining.pth", weights_only=False)
    assert checkpoint["args"]["decoder_width"] == 64 and checkpoint["model"]["decoder.proj.weight"].shape[1] == 2
    path = str(tmp_path / "run" / "tiny_cnn_still_pretraining.pth")
    with pytest.raises(CheckpointError, match=re.escape("was pre-training with a decoder of width 64, this run builds "
                                                        "one of 768: to continue that run, give --decoder_width 64")):
        Trainer(tiny_config(folder, tmp_path / "out", ep=2, resume_from=path), "")
    with pytest.raises(CheckpointError, match=re.escape("; its decoder is 64 wide, this run's 768: give --decoder_width 64")):
        Trainer(tiny_config(folder, tmp_path / "init", init_weight=path), "")
    assert Trainer(tiny_config(folder, tmp_path / "out", ep=2, resume_from=path, decoder_width=64), "").spark.decoder.width == 64
    with pytest.raises(ConfigError, match=re.escape("--decoder_width 16: an int of at least 32, as it is halved at each of "
                                                    "the decoder's 5 levels (SparK: 768)")):
        tiny_config(folder, tmp_path / "x", decoder_width=16)
    numpys = tiny_config(folder, tmp_path / "x", decoder_width=np.int64(64)).decoder_width      # a sweep script's
    assert numpys == 64 and type(numpys) is int


def test_an_init_weight_that_does_not_fit_is_named_before_kernel_tuning(folder, tmp_path, monkeypatch):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    monkeypatch.setattr(Trainer, "_autotune", lambda self: pytest.fail("tuned before checking --init_weight"))
    with pytest.raises(CheckpointError):
        Trainer(tiny_config(folder, tmp_path / "out", init_weight=str(tmp_path / "other.pth")), "")


def test_overwrite_with_a_resume_of_the_folders_own_run_is_said_to_be_ignored(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "out", ep=1))
    resumed = Trainer(tiny_config(folder, tmp_path / "out", ep=2, overwrite=True, resume_from="auto"), "")
    assert any("--overwrite is ignored" in warning for warning in resumed.warnings)


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pretrain_log.txt").write_text('{"name": "t", "args": {}}\n')       # the header, then it died
    pretrain(tiny_config(folder, out, ep=1, resume_from="auto"))
    records = (out / "pretrain_log.txt").read_text().splitlines()
    assert records[0] == '{"name": "t", "args": {}}' and json.loads(records[-1])["epoch"] == 1   # appended to


def test_a_finished_run_whose_checkpoint_was_deleted_is_offered_its_encoder_not_a_resume_that_loops(folder, tmp_path):
    out = tmp_path / "out"
    pretrain(tiny_config(folder, out, ep=1))
    (out / "tiny_cnn_still_pretraining.pth").unlink()                  # the large file, deleted to save space
    with pytest.raises(ConfigError) as refused:
        Trainer(tiny_config(folder, out, ep=1, resume_from="auto"), "spark-pretrain x --ep=1 --resume_from=auto")
    message = str(refused.value)
    assert ("continue it:  its tiny_cnn_still_pretraining.pth is gone (it finished its 1 epoch; its encoder, "
            "tiny_cnn_1kpretrained.pth, is left): to train that encoder further, start a run from it in another "
            f"folder: spark-pretrain x --ep=1 --exp_dir <another folder> --init_weight={out / 'tiny_cnn_1kpretrained.pth'}"
            in message), message
    assert "stopped before its first epoch" not in message


def test_a_missing_resume_checkpoint_is_named_before_the_folder_guard(folder, tmp_path):
    _previous_run(tmp_path / "out")
    with pytest.raises(ConfigError, match="--resume_from .*typo.pth: no such file"):
        Trainer(tiny_config(folder, tmp_path / "out", resume_from=str(tmp_path / "typo.pth")), "")
    with pytest.raises(ConfigError, match=r"--resume_from .*out: a folder, not a checkpoint; pass the "
                                          r"<model>_still_pretraining.pth inside it, or --resume_from=auto"):
        Trainer(tiny_config(folder, tmp_path / "other", resume_from=str(tmp_path / "out")), "")


def test_a_config_from_python_is_named_after_its_model_and_takes_one_module_as_a_string():
    """As on the command line: no name -> the model's (output_<model>/), and ``import_module="my_models.py"``
    is one module, not one per character."""
    cfg = PretrainConfig(model="resnet18", import_module="my_models.py")
    assert cfg.exp_name == "resnet18" and cfg.output_dir.name == "output_resnet18"
    assert cfg.import_module == ("my_models.py",)


def test_the_folder_guard_suggests_commands_that_fit_what_it_found(folder, tmp_path):
    _previous_run(tmp_path / "out")                                   # logged epoch 3: finished for --ep 2
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(folder, tmp_path / "out"), "spark-pretrain t --resume_from=auto --ep=2")
    message = str(err.value)
    assert "spark-pretrain t --resume_from=" in message and "--resume_from=auto" not in message
    assert "--ep <more than 3>" in message and "--ep=2" not in message.split("start over")[0]
    with pytest.raises(ConfigError, match=r"continue it:  spark-pretrain <same arguments> --resume_from="):
        Trainer(tiny_config(folder, tmp_path / "out"), "")                # a library call: no command to quote
    logs_only = tmp_path / "logs_only"
    logs_only.mkdir()
    (logs_only / "pretrain_log.txt").write_text('{"name": "t", "args": {}}\n')
    with pytest.raises(ConfigError, match=r"has no tiny_cnn_still_pretraining.pth .*spark-pretrain t --resume_from=auto"):
        Trainer(tiny_config(folder, logs_only), "spark-pretrain t")
    other = tmp_path / "other"
    other.mkdir()
    atomic_save({"format": "spark-sparse/1"}, other / "resnet18_still_pretraining.pth")
    with pytest.raises(ConfigError, match="it is a run of resnet18, not of tiny_cnn: add --model resnet18"):
        Trainer(tiny_config(folder, other), "spark-pretrain t")
    (other / "pretrain_log.txt").write_text('{"name": "t", "cmd": "spark-pretrain t --model=resnet18 --bs=2 '
                                            '--overwrite", "args": {"ep": 1}}\n')
    with pytest.raises(ConfigError, match=r"continue it:  spark-pretrain t --model=resnet18 --bs=2 --resume_from=auto"
                                          r"   \(its own command, from its log: it is a run of resnet18, not of "
                                          r"tiny_cnn\)"):
        Trainer(tiny_config(folder, other), "spark-pretrain t")
    with (other / "pretrain_log.txt").open("a") as log:               # that run finished its --ep 2
        log.write('{"name": "t", "cmd": "spark-pretrain t --model=resnet18 --ep=2", "args": {"ep": 2}}\n'
                  '{"epoch": 2}\n')
    with pytest.raises(ConfigError, match=r"continue it:  spark-pretrain t --model=resnet18 --resume_from=auto --ep "
                                          r"<more than 2>   \(its own command, from its log: it is a run of resnet18, "
                                          r"not of tiny_cnn; it finished its 2 epochs\)"):
        Trainer(tiny_config(folder, other, ep=3), "spark-pretrain t --ep 3")


def test_resuming_with_other_settings_warns_in_the_console_and_the_log(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1))
    trainer = Trainer(tiny_config(folder, tmp_path, ep=2, bs=2, resume_from="auto"), "")
    trainer.run()
    header = [json.loads(line) for line in (tmp_path / "pretrain_log.txt").read_text().splitlines()
              if "args" in json.loads(line)][-1]
    assert any("--bs 2 (was 4)" in warning and "no longer the run" in warning for warning in header["warnings"])
    assert not any("--ep" in warning for warning in header["warnings"])   # a larger --ep continues a finished run
    # what SparK's per-model defaults gave, beside the arguments as given (dp and ada left to the defaults)
    assert header["args"]["dp"] is None and header["args"]["ada"] == 0.0
    assert header["resolved"] == {"dp": model_default_drop_path("tiny_cnn"), "ada": trainer.beta2,
                                  "densify_norm": trainer.spark.densify_norm_kind}
    assert trainer.beta2 == default_beta2(trainer.spark.densify_norm_kind)


def test_resuming_an_unfinished_run_with_another_length_warns_that_its_schedule_changes(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1))
    checkpoint = tmp_path / "tiny_cnn_still_pretraining.pth"
    state = torch.load(checkpoint, weights_only=True)
    state["args"]["ep"] = 3                                 # as if a 3-epoch run had stopped after its first epoch
    torch.save(state, checkpoint)
    trainer = Trainer(tiny_config(folder, tmp_path, ep=2, resume_from="auto"), "")
    trainer.run()
    assert any("--ep 2 (was 3: the lr and weight-decay schedules stretch" in warning for warning in trainer.warnings)


def _as_if_saved_on_other_data(checkpoint, images: int, listing: str = "0" * 16, iteration: int = 0) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["data"] = {"images": images, "listing": listing}
    if iteration:                          # stopped inside its first epoch
        state["epoch"], state["iteration"] = 0, iteration
    torch.save(state, checkpoint)


def test_resuming_on_data_that_changed_warns_and_refuses_where_the_epoch_has_no_place_to_continue(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1))                # 8 images at batch 4: 2 iterations per epoch
    checkpoint = tmp_path / "tiny_cnn_still_pretraining.pth"
    assert torch.load(checkpoint, weights_only=True)["data"]["images"] == 8
    _as_if_saved_on_other_data(checkpoint, images=8)
    trainer = Trainer(tiny_config(folder, tmp_path, ep=2, resume_from="auto"), "")
    trainer.run()
    assert any("on other data: the same number of images (8) but other files" in w for w in trainer.warnings)
    _as_if_saved_on_other_data(checkpoint, images=12)
    trainer = Trainer(tiny_config(folder, tmp_path, ep=3, resume_from="auto"), "")
    trainer.run()
    assert any("its run listed 12 images, the data now holds 8 (an epoch is 2 iterations, was 3;" in w
               for w in trainer.warnings)
    assert not any("other data" in w for w in Trainer(tiny_config(folder, tmp_path, ep=4, resume_from="auto"),
                                                      "").warnings)   # the data as the last run saved it
    _as_if_saved_on_other_data(checkpoint, images=12, iteration=2)
    with pytest.raises(ConfigError, match=r"cannot resume .* on this data: its run listed 12 images, .* its "
                                          r"interrupted epoch had already done 2 iterations\. Put the data back"):
        Trainer(tiny_config(folder, tmp_path, ep=4, resume_from="auto"), "")


def test_an_empty_resume_or_init_flag_means_none_as_in_spark(folder, tmp_path):
    config = tiny_config(folder, tmp_path, resume_from="", init_weight="", tb_lg_dir="")
    assert (config.resume_from, config.init_weight, config.tb_lg_dir) == (None, None, None)


def test_init_weight_is_ignored_and_said_so_when_the_run_resumes(folder, tmp_path, capsys):
    pretrain(tiny_config(folder, tmp_path / "first", ep=1))
    export = tmp_path / "first" / "tiny_cnn_1kpretrained.pth"
    pretrain(tiny_config(folder, tmp_path / "run", ep=1, init_weight=str(export)))
    export.unlink()                        # a job script's restart: the file it started from may be gone
    capsys.readouterr()
    pretrain(tiny_config(folder, tmp_path / "run", ep=2, init_weight=str(export), resume_from="auto"))
    out = capsys.readouterr().out
    assert f"--init_weight {export} ignored: resuming" in out and "initialised from" not in out


def test_a_run_shorter_than_its_warm_up_is_warned_about(folder, tmp_path):
    trainer = Trainer(tiny_config(folder, tmp_path, ep=1, wp_ep=40), "")
    assert any("--wp_ep 40 is not below --ep 1" in warning for warning in trainer.warnings)
    assert not any("--wp_ep" in w for w in Trainer(tiny_config(folder, tmp_path / "b", ep=2, wp_ep=1), "").warnings)


def test_without_flags_drops_named_options_in_every_spelling():
    from spark_sparse.train.outputs import without_flags
    words = ["x", "--resume_from=a.pth", "--ep", "2", "--resume-from", "b.pth", "--overwrite", "--master_port", "1",
             "--data_path=d"]
    assert without_flags(words, valued=("resume_from", "master_port"), bare=("overwrite",)) == \
        ["x", "--ep", "2", "--data_path=d"]


def test_loader_workers_ignore_ctrl_c_outlive_the_first_sigterm_and_close_their_copy_of_the_lock(tmp_path):
    """Ctrl-C reaches the whole process group: a worker forked inside the loop ran its stop handler and announced
    a checkpoint it does not save (once per worker); its copy of the folder's lock kept the folder locked."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    lock, other = open(tmp_path / "lock", "w"), open(tmp_path / "other", "w")
    try:
        held = os.fstat(lock.fileno())
        engine._loader_worker_init(0, folder_lock=(other.fileno(), held.st_dev, held.st_ino))   # not the lock
        os.fstat(other.fileno())                                                               # left open
        engine._loader_worker_init(0, folder_lock=(lock.fileno(), held.st_dev, held.st_ino))
        with pytest.raises(OSError):
            os.fstat(lock.fileno())                                                            # closed
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is engine._default_on_next_sigterm
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        other.close()
        try:
            lock.close()
        except OSError:
            pass


def test_a_folder_another_live_run_is_writing_is_refused_naming_it_and_free_once_it_ends(folder, tmp_path):
    """A restarted job whose first still runs, or ranks orphaned by a killed launcher, wrote alongside each other."""
    import fcntl

    pretrain(tiny_config(folder, tmp_path, ep=1))
    lock = tmp_path / ".spark-pretrain.lock"
    assert lock.read_text().startswith("pid ")
    with open(lock, "w") as held:                       # another process's open file: flock conflicts in-process too
        held.write("pid 4242 on node7, since 2026-11-29 05:00:00")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"is being written by another run right now \(pid 4242 on node7, "
                                              r"since .*\): wait for it to end or stop it"):
            Trainer(tiny_config(folder, tmp_path, ep=2, resume_from="auto"), "")
    Trainer(tiny_config(folder, tmp_path, ep=2, resume_from="auto"), "").run()      # released: the run goes on


def test_the_no_gradient_probe_names_a_head_and_leaves_the_model_and_random_streams_as_they_were():
    from spark_sparse.models.example import TinyCNN

    class WithHead(TinyCNN):
        def __init__(self):
            super().__init__(widths=(8, 8, 16, 16))
            self.head = torch.nn.Linear(16, 10)          # never called by the hierarchical forward

    spark = SparK(WithHead(), "sparse", input_size=64, decoder_width=64)
    spark.eval()
    spark.encoder.stem.train()                            # a mixed mode, kept per module
    state = {key: value.clone() for key, value in spark.state_dict().items()}
    modes = {name: module.training for name, module in spark.named_modules()}
    rng = torch.random.get_rng_state()
    assert engine.parameters_without_gradient(spark, torch.device("cpu"), None) == ["encoder.head.weight",
                                                                                     "encoder.head.bias"]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {name: module.training for name, module in spark.named_modules()} == modes
    for key, value in spark.state_dict().items():          # BatchNorm statistics and weights
        assert torch.equal(value, state[key]), key
    assert all(parameter.grad is None for parameter in spark.parameters())
