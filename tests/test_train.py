"""The training run: output files, export to timm, exact resume, bad data, non-finite loss."""
import json

import pytest
import timm
import torch

from spark_sparse.checkpoint import read_checkpoint
from spark_sparse.spark import SparK
from spark_sparse.train.data import DataError
from spark_sparse.train.engine import Trainer, TrainingError, pretrain

from apptools import make_image_folder, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), count=8)


def test_one_epoch_writes_every_output_file(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path / "out", ep=1))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"pretrain_log.txt", "stdout_backup.txt", "stderr_backup.txt",
                                               "tiny_cnn_still_pretraining.pth", "tiny_cnn_1kpretrained.pth",
                                               "reconstruction.png"}
    header, epoch = [json.loads(line) for line in (out / "pretrain_log.txt").read_text().splitlines()]
    assert header["model"] == "tiny_cnn" and header["args"]["bs"] == 4
    assert header["backend"] == header["speed_plan"]["backend"] == "sparse"      # the default 'fast' recipe
    assert header["backend_plan"] and "cmd" in header and "git_commit" in header
    assert epoch["epoch"] == 1 and epoch["loss"] > 0 and epoch["images_per_s"] > 0
    assert {"remaining", "finish_time", "lr"} <= epoch.keys()
    assert "finished" in (out / "stdout_backup.txt").read_text()
    ckpt = read_checkpoint(out / "tiny_cnn_still_pretraining.pth")
    assert {"model", "optimizer", "scaler", "epoch", "iteration", "rng", "args"} <= ckpt.keys()


def test_exported_resnet_loads_into_timm(folder, tmp_path):
    pretrain(tiny_config(folder, tmp_path, ep=1, model="resnet18"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "resnet18_1kpretrained.pth"), strict=True)


@pytest.mark.parametrize("backend", ["masked", "torch"])
def test_resume_continues_exactly_the_same_run(folder, tmp_path, backend):
    straight = Trainer(tiny_config(folder, tmp_path / "a", backend=backend), "")
    straight.run()
    halves = Trainer(tiny_config(folder, tmp_path / "b", backend=backend), "")
    halves.run(max_epochs=1)
    resumed = Trainer(tiny_config(folder, tmp_path / "b", backend=backend,
                                  resume_from=str(tmp_path / "b" / "tiny_cnn_still_pretraining.pth")), "")
    assert resumed.state.epoch == 0   # not loaded until run()
    resumed.run()
    a, b = straight.spark.state_dict(), resumed.spark.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    log = (tmp_path / "b" / "pretrain_log.txt").read_text().splitlines()
    assert [json.loads(line).get("epoch") for line in log if '"epoch"' in line and "args" not in line] == [1, 2]


def test_unreadable_images_are_skipped_and_named(folder, tmp_path):
    broken = make_image_folder(tmp_path / "data", count=6)
    (broken / "train" / "class0" / "img0.png").write_bytes(b"this is not a png")
    pretrain(tiny_config(broken, tmp_path / "out", ep=1))
    assert "img0.png" in (tmp_path / "out" / "stderr_backup.txt").read_text()
    epoch = json.loads((tmp_path / "out" / "pretrain_log.txt").read_text().splitlines()[-1])
    assert epoch["unreadable_images"] == 1


def test_missing_and_empty_folders_fail_before_writing_anything(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        pretrain(tiny_config(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        pretrain(tiny_config(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_stops_and_keeps_a_resumable_last_good_state(folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = SparK.loss

    def flaky_loss(self, *args):
        calls["n"] += 1
        value = real_loss(self, *args)
        return value * float("nan") if calls["n"] == 3 else value

    trainer = Trainer(tiny_config(folder, tmp_path, ep=2), "")
    monkeypatch.setattr(SparK, "loss", flaky_loss)
    with pytest.raises(TrainingError, match="loss is nan.*last good state"):
        trainer.run()
    ckpt = read_checkpoint(tmp_path / "tiny_cnn_still_pretraining.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)          # 2 iterations/epoch: the 3rd step failed
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.setattr(SparK, "loss", real_loss)
    state = pretrain(tiny_config(folder, tmp_path, ep=2, resume_from=str(tmp_path / "tiny_cnn_still_pretraining.pth")))
    assert state.epoch == 2


def test_resuming_a_file_that_is_not_a_run_checkpoint_is_a_clear_error(folder, tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    from spark_sparse.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not a spark-pretrain checkpoint.*--init_weight"):
        pretrain(tiny_config(folder, tmp_path / "out", resume_from=str(tmp_path / "weights.pth")))
