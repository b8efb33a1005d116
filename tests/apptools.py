"""Helpers for the application tests: tiny image folders and tiny run configurations."""
from pathlib import Path

import numpy as np
from PIL import Image

from spark_sparse.train.config import PretrainConfig
from spark_sparse.train.distributed import leave_process_group


def make_image_folder(root: Path, count: int = 8, size: int = 72, classes: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


def tiny_config(data_path, exp_dir, **overrides) -> PretrainConfig:
    options = dict(exp_name="t", exp_dir=str(exp_dir), data_path=str(data_path), model="tiny_cnn", input_size=64,
                   bs=4, ep=2, wp_ep=1, base_lr=1e-3, dataloader_workers=0, device="cpu", vis_images=2)
    options.update(overrides)
    return PretrainConfig(**options)


def distributed_worker(rank: int, world: int, port: int, cfg: PretrainConfig, dump_dir: str) -> None:
    """One process of a gloo run: train, then dump this rank's weights for the test to compare."""
    import os

    import torch

    from spark_sparse.train.engine import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, "", capture_console=True)   # the test reads rank 0's console backup
    trainer.run()
    torch.save(trainer.spark.state_dict(), os.path.join(dump_dir, f"rank{rank}.pth"))
    leave_process_group()


def refused_folder_worker(rank: int, world: int, port: int, cfg: PretrainConfig, dump_dir: str) -> None:
    """One process of a gloo run into a folder the main process refuses: every rank must end with its error."""
    import os

    from spark_sparse.errors import ConfigError
    from spark_sparse.train.engine import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        Trainer(cfg, "spark-pretrain t")
        outcome = "built"
    except ConfigError as err:
        outcome = str(err)
    finally:
        leave_process_group()            # as pretrain() does: gloo may abort a process that exits holding it
    with open(os.path.join(dump_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(outcome)


def nan_on_rank1_worker(rank: int, world: int, port: int, cfg: PretrainConfig, dump_dir: str) -> None:
    """One process of a gloo run in which only rank 1's second loss is NaN: every rank must stop cleanly."""
    import os

    from spark_sparse.spark import SparK
    from spark_sparse.train.engine import Trainer, TrainingError

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real_loss, calls = SparK.loss, {"n": 0}

    def loss_nan_on_rank1(self, *args):
        calls["n"] += 1
        value = real_loss(self, *args)
        return value * float("nan") if rank == 1 and calls["n"] == 2 else value

    trainer = Trainer(cfg, "")           # (its batch-size probe calls the loss too)
    SparK.loss = loss_nan_on_rank1
    try:
        trainer.run()
        outcome = "finished"
    except TrainingError as err:
        outcome = str(err)
    finally:
        leave_process_group()
    with open(os.path.join(dump_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(outcome)


def pretrain_group_worker(rank: int, world: int, port: int, cfg: PretrainConfig, dump_dir: str,
                          caller_joins: bool) -> None:
    """One process of a gloo run whose pretrain() fails (a refused folder): is the process group left after it?"""
    import os

    import torch.distributed as dist

    from spark_sparse.errors import ConfigError
    from spark_sparse.train.engine import pretrain

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if caller_joins:
        dist.init_process_group("gloo")
    try:
        pretrain(cfg)
    except ConfigError:
        pass
    with open(os.path.join(dump_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(f"in group: {dist.is_initialized()}")
    leave_process_group()
