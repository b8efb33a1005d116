"""Several processes (gloo on CPU): same weights on every rank, files from rank 0 only."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spark_sparse.checkpoint import read_checkpoint
from spark_sparse.errors import ConfigError
from spark_sparse.train.distributed import local_gpu
from spark_sparse.train.engine import pretrain

from apptools import (distributed_worker, make_image_folder, nan_on_rank1_worker, pretrain_group_worker,
                      refused_folder_worker, tiny_config)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_without_hanging(worker, args: tuple, seconds: float, hung: str) -> None:
    """Two processes of ``worker``; fail with ``hung`` (killing them) if they have not ended within ``seconds``."""
    context = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.time() + seconds
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hung)


def test_two_gloo_processes_hold_identical_weights(tmp_path):
    data = make_image_folder(tmp_path / "data", count=8)
    cfg = tiny_config(data, tmp_path / "out", ep=1, bs=8, backend="torch")   # 4 images per rank
    mp.spawn(distributed_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pth"), torch.load(tmp_path / "rank1.pth")
    trained = [k for k in rank0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(rank0[k], rank1[k]) for k in trained)
    header, epoch = [json.loads(line) for line in (tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()]
    assert header["world_size"] == 2 and header["global_batch"] == 8 and epoch["epoch"] == 1
    assert (tmp_path / "out" / "stdout_backup.txt").read_text().count("finished: min loss") == 1


HEAD_NET = """
import torch.nn as nn
import spark_sparse as ss


@ss.register_container
class HeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 2 * c, 3, s, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
                                    for c, s in ((3, 4), (6, 2), (12, 2), (24, 2)))
        self.head = nn.Linear(48, 10)                     # a classifier the hierarchical forward never calls

    def get_downsample_ratio(self):
        return 32

    def get_feature_map_channels(self):
        return [6, 12, 24, 48]

    def forward(self, x, hierarchical=True):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features if hierarchical else self.head(x.mean((2, 3)))


@ss.register_model("head_net")
def head_net(drop_path_rate=0.0):
    return HeadNet()
"""


def test_a_user_model_with_a_classifier_head_trains_on_two_processes_its_head_frozen(tmp_path):
    """DDP fails on the second step when a parameter gets no gradient; the run finds the head and freezes it."""
    (tmp_path / "head_net.py").write_text(HEAD_NET)
    data = make_image_folder(tmp_path / "data", count=8)
    cfg = tiny_config(data, tmp_path / "out", ep=2, bs=4, backend="torch", model="head_net",
                      import_module=[str(tmp_path / "head_net.py")])
    mp.spawn(distributed_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    header = json.loads((tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()[0])
    assert any(w.startswith("2 parameter(s) get no gradient from SparK's loss and are frozen: encoder.")
               and "head.weight" in w for w in header["warnings"]), header["warnings"]
    rank0 = torch.load(tmp_path / "rank0.pth")
    assert [k for k in rank0 if k.endswith("head.weight")], "the head is still exported"


def test_resuming_with_another_process_count_is_warned_and_said_once(tmp_path, capfd):
    data = make_image_folder(tmp_path / "data", count=8)
    pretrain(tiny_config(data, tmp_path / "out", ep=1, bs=8, backend="torch"))          # one process
    capfd.readouterr()
    cfg = tiny_config(data, tmp_path / "out", ep=2, bs=8, backend="torch", resume_from="auto")
    mp.spawn(distributed_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    header = [json.loads(line) for line in (tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()][-2]
    assert any("a run of 1 process(es), with 2" in warning for warning in header["warnings"]), header["warnings"]
    assert capfd.readouterr().out.count("resumed from") == 1                 # by the main process only
    assert (tmp_path / "out" / "stdout_backup.txt").read_text().count("resumed from") == 1


def test_unreadable_images_met_by_any_rank_are_counted_and_named_once(tmp_path):
    """Each rank reads its own share of an epoch's images: the log counts, and rank 0 names, those of every rank."""
    data = make_image_folder(tmp_path / "data", count=8)
    broken = sorted((data / "train").rglob("img[0145].png"))
    for path in broken:
        path.write_bytes(b"not an image")
    cfg = tiny_config(data, tmp_path / "out", ep=1, bs=8, backend="torch")   # 4 images per rank, each image once
    mp.spawn(distributed_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    epoch = json.loads((tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()[1])
    assert epoch["unreadable_images"] == len(broken) == 4
    warnings = (tmp_path / "out" / "stderr_backup.txt").read_text()
    assert all(warnings.count(f"could not read {path}") == 1 for path in broken), warnings


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    data = make_image_folder(tmp_path / "data", count=16)
    cfg = tiny_config(data, tmp_path / "out", ep=1, bs=4, backend="torch")   # 4 iterations, 2 images per rank
    _run_without_hanging(nan_on_rank1_worker, (2, _free_port(), cfg, str(tmp_path)), 240,
                         "a rank hung after another saw a non-finite loss")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes[1].startswith("loss is nan at epoch 0 iteration 1"), outcomes[1]
    assert outcomes[0].startswith("loss is not finite on another rank at epoch 0 iteration 1"), outcomes[0]
    assert "last good state" in outcomes[0]
    ckpt = read_checkpoint(tmp_path / "out" / "tiny_cnn_still_pretraining.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1)


def test_a_folder_the_main_process_refuses_ends_every_rank_with_an_error(tmp_path):
    """Only rank 0 checks the output folder; the other ranks must learn it before the first collective
    (they used to go on into the kernel tuning's broadcast and die there with gloo's traceback)."""
    data = make_image_folder(tmp_path / "data", count=8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pretrain_log.txt").write_text('{"name": "t", "args": {}}\n{"epoch": 1}\n')
    cfg = tiny_config(data, tmp_path / "out", ep=1, bs=8, backend="torch")
    _run_without_hanging(refused_folder_worker, (2, _free_port(), cfg, str(tmp_path)), 120,
                         "a rank hung after the main process refused the folder")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert "already holds a run" in outcomes[0], outcomes[0]
    assert outcomes[1] == "rank 1: stopped, the main process refused the output folder (its error above says why)"


@pytest.mark.parametrize("caller_joins", [False, True], ids=["pretrain-joins", "caller-joins"])
def test_pretrain_leaves_the_process_group_it_joined_and_only_that(tmp_path, caller_joins):
    """A process that exits holding a gloo group is now and then aborted (SIGABRT) at exit: pretrain() leaves the
    group it joined, even when it fails; a group the caller joined first stays the caller's."""
    data = make_image_folder(tmp_path / "data", count=8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pretrain_log.txt").write_text('{"name": "t", "args": {}}\n{"epoch": 1}\n')
    cfg = tiny_config(data, tmp_path / "out", ep=1, bs=8, backend="torch")
    _run_without_hanging(pretrain_group_worker, (2, _free_port(), cfg, str(tmp_path), caller_joins), 120,
                         "a rank hung after the main process refused the folder")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [f"in group: {caller_joins}"] * 2


def test_sparks_launch_flags_start_processes_through_torchrun(tmp_path):
    data = make_image_folder(tmp_path / "data", count=8)
    cmd = [sys.executable, "-m", "spark_sparse.cli", "launched", f"--data_path={data}", "--model=tiny_cnn",
           "--input_size=64", "--bs=4", "--ep=1", "--dataloader_workers=0", "--device=cpu",
           f"--exp_dir={tmp_path / 'out'}", "--ngpu_per_node", "2", f"--master_port={_free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 1x2 processes" in result.stderr
    lines = (tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["world_size"] == 2


def test_a_launch_that_fails_ends_with_one_line_per_process_and_a_summary_not_a_traceback(tmp_path):
    data = make_image_folder(tmp_path / "data", count=8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pretrain_log.txt").write_text('{"name": "t", "args": {}}\n{"epoch": 1}\n')
    cmd = [sys.executable, "-m", "spark_sparse.cli", "launched", f"--data_path={data}", "--model=tiny_cnn",
           "--input_size=64", "--bs=4", "--ep=1", "--device=cpu", f"--exp_dir={tmp_path / 'out'}",
           "--ngpu_per_node", "2", f"--master_port={_free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "already holds a run" in result.stderr
    assert re.search(r"\[spark-pretrain\] rank [01] failed first \(exit status 1\): its error above says why; also "
                     r"ended: rank [01] \((exit status 1|SIGTERM: stopped by torchrun)\)", result.stderr)


def _signal_a_running_launch(tmp_path, signum) -> tuple[subprocess.Popen, str]:
    """Start 2 processes through SparK's launch flags (one loader worker each), send ``signum`` to the launcher
    once the run has saved its first checkpoint; its stderr once every process has ended."""
    data = make_image_folder(tmp_path / "data", count=8)
    cmd = [sys.executable, "-m", "spark_sparse.cli", "launched", f"--data_path={data}", "--model=tiny_cnn",
           "--input_size=64", "--bs=4", "--ep=200", "--wp_ep=1", "--dataloader_workers=1", "--device=cpu",
           "--backend=masked", f"--exp_dir={tmp_path / 'out'}", "--ngpu_per_node", "2", f"--master_port={_free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "out" / "tiny_cnn_still_pretraining.pth").exists():     # a few epochs in
            assert launcher.poll() is None and time.time() < deadline, "the run ended or never got going"
            time.sleep(0.5)
        launcher.send_signal(signum)
        _, err = launcher.communicate(timeout=120)        # the pipes close when the ranks (which share them) end
    finally:
        launcher.kill()
    return launcher, err


def test_sigterm_to_the_launcher_saves_and_ends_with_one_message_per_event_and_the_signals_status(tmp_path):
    """torchrun passes the signal to every rank, and loader workers are forked inside the loop: the stop was
    announced once per process (ranks and workers alike) and the launcher ended with exit 1 and a traceback."""
    import signal

    launcher, err = _signal_a_running_launch(tmp_path, signal.SIGTERM)
    assert launcher.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert err.count("SIGTERM received: saving a resumable checkpoint") == 1, err[-3000:]
    resume = re.search(r"stopped after (?:iteration \d/2 of )?epoch \d+/200; resume with: (.*)", err)
    assert err.count("stopped after ") == 1 and resume, err[-3000:]
    assert "torchrun --nnodes=1 --nproc_per_node=2 -m spark_sparse.cli launched" in resume.group(1)   # 2 processes
    assert resume.group(1).endswith(f"--resume_from={tmp_path / 'out' / 'tiny_cnn_still_pretraining.pth'}")
    assert "[spark-pretrain] SIGTERM received: the processes were stopped" in err


def test_ranks_whose_launcher_is_killed_outright_save_stop_and_free_the_folder(tmp_path):
    """torchrun starts its ranks in sessions of their own: with the launcher killed by SIGKILL they trained on,
    orphaned, and a restarted job found them writing the folder it resumed."""
    import signal

    from spark_sparse.train.outputs import RunOutputs

    _, err = _signal_a_running_launch(tmp_path, signal.SIGKILL)
    assert err.count("SIGTERM received: saving a resumable checkpoint") == 1, err[-3000:]
    assert re.search(r"stopped after (?:iteration \d/2 of )?epoch \d+/200; resume with: ", err), err[-3000:]
    RunOutputs(tmp_path / "out", "tiny_cnn", True).check_not_in_use()           # the lock went with them


@pytest.mark.parametrize("local_rank, visible, gpu", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (0, 1, 0)])
def test_each_process_takes_its_local_ranks_gpu_or_the_one_its_launcher_shows_it(local_rank, visible, gpu):
    assert local_gpu(local_rank, visible) == gpu


def test_more_processes_than_gpus_on_a_node_is_refused_naming_the_count():
    with pytest.raises(ConfigError, match=r"local rank 2 finds 2 GPUs on its node: launch at most 2 processes per "
                                          r"node \(--nproc_per_node / --ngpu_per_node 2\)"):
        local_gpu(2, 2)


def test_the_process_group_waits_longer_than_the_kernel_tuning(monkeypatch):
    """Ranks wait in a collective while rank 0 tunes: NCCL's 10-minute default must not end a longer tuning."""
    from spark_sparse.train import distributed

    seen = {}
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "under_torchrun", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    distributed.init_distributed("cpu", tuning_s=1200)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 600 + 3 * 1200
    distributed.init_distributed("cpu", tuning_s=0)
    assert seen["timeout"].total_seconds() == 30 * 60                      # gloo's own default, kept
