"""``spark-pretrain`` parses SparK's arguments (underscored, dashed, old aliases) and fails clearly."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import spark_sparse.cli as cli
from spark_sparse.models.model_kwargs import format_model_kwargs, parse_model_kwargs
from spark_sparse.train.config import PretrainConfig
from spark_sparse.user_modules import UserModuleError, import_user_module

from apptools import make_image_folder


@pytest.fixture
def captured(monkeypatch):
    """Run the CLI up to the training call and capture the configuration it built."""
    seen = {}

    def fake_pretrain(cfg, cmd="", max_epochs=None, capture_console=False):
        seen["cfg"], seen["capture_console"] = cfg, capture_console

    monkeypatch.setattr("spark_sparse.train.engine.pretrain", fake_pretrain)
    return seen


def _run(args):
    return CliRunner().invoke(cli.pretrain_command, args, catch_exceptions=False)


def test_spark_style_arguments_paste_in(captured, tmp_path):
    result = _run(["exp1", f"--data_path={tmp_path}", "--model=resnet50", "--bs=512", "--ep=3", "--mask=0.75",
                   "--input_size=192", "--base_lr=1e-4", "--wp_ep=2", "--dataloader_workers=1", "--sbn=False"])
    assert result.exit_code == 0, result.output
    cfg: PretrainConfig = captured["cfg"]
    assert (cfg.exp_name, cfg.model, cfg.bs, cfg.ep, cfg.mask, cfg.input_size, cfg.base_lr, cfg.wp_ep, cfg.sbn) == \
           ("exp1", "resnet50", 512, 3, 0.75, 192, 1e-4, 2, False)
    assert cfg.output_dir.name == "output_exp1"


def test_dashed_arguments_and_separate_values_work(captured, tmp_path):
    result = _run(["exp2", "--data-path", str(tmp_path), "--base-lr", "3e-4", "--input-size", "160",
                   "--exp-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert (cfg.base_lr, cfg.input_size, cfg.output_dir) == (3e-4, 160, tmp_path / "out")


def test_sparks_tensorboard_folder_turns_tensorboard_on_and_is_where_it_writes(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}", f"--tb_lg_dir={tmp_path / 'tb'}"]).exit_code == 0
    assert captured["cfg"].tensorboard and captured["cfg"].tensorboard_dir == tmp_path / "tb"
    assert _run(["x", f"--data_path={tmp_path}", "--tensorboard", f"--exp_dir={tmp_path / 'run'}"]).exit_code == 0
    assert captured["cfg"].tensorboard_dir == tmp_path / "run" / "tensorboard_log"
    assert _run(["x", f"--data_path={tmp_path}"]).exit_code == 0 and not captured["cfg"].tensorboard


def test_speed_options_override_the_recipe(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}", "--foreach-optimizer=True", "--channels_last=False"]).exit_code == 0
    assert (captured["cfg"].foreach_optimizer, captured["cfg"].channels_last) == (True, False)


def test_sparks_defaults_apply_with_a_data_path(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}"]).exit_code == 0
    cfg = captured["cfg"]
    assert (cfg.model, cfg.input_size, cfg.mask, cfg.bs, cfg.ep, cfg.wp_ep, cfg.base_lr, cfg.wd, cfg.wde, cfg.clip,
            cfg.opt, cfg.dataloader_workers, cfg.amp) == \
           ("resnet50", 224, 0.6, 4096, 1600, 40, 2e-4, 0.04, 0.2, 5.0, "lamb", 8, "none")


def test_no_data_path_selects_the_demo(captured):
    result = _run([])
    assert result.exit_code == 0
    cfg = captured["cfg"]
    assert cfg.demo and cfg.data_path is None and cfg.model == "resnet18" and cfg.ep == 10


def test_the_demo_names_as_its_defaults_only_the_values_not_given(captured):
    result = CliRunner().invoke(cli.pretrain_command, ["--ep=1", "--input_size=96"])
    assert result.exit_code == 0, result.output
    assert "with demo defaults model=resnet18" in result.stderr and " ep=" not in result.stderr
    assert "input_size=" not in result.stderr
    assert (captured["cfg"].ep, captured["cfg"].input_size) == (1, 96)


def test_the_local_rank_torch_distributed_launch_adds_is_accepted(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}", "--local_rank=3"]).exit_code == 0
    assert _run(["x", f"--data_path={tmp_path}", "--local-rank=0"]).exit_code == 0


@pytest.mark.parametrize("args, rule", [(["--lr=1e-3"], "--lr is set at run time: the peak lr is --base_lr x global "
                                                       "batch / 256"),
                                        (["--densify_norm=bn"], "--densify_norm is set at run time: it follows the "
                                                                "model"),
                                        (["--batch_size_per_gpu=64"], "--batch_size_per_gpu is set at run time: it is "
                                                                      "--bs (the global batch) / processes"),
                                        (["--glb_batch_size", "512"], "--glb_batch_size is set at run time: it is --bs "
                                                                      "rounded down"),
                                        (["--log_txt_name=a.txt"], "--log_txt_name is set at run time: it is "
                                                                   "<exp_dir>/pretrain_log.txt"),
                                        (["--cmd=x"], "--cmd is set at run time: the log's header records"),
                                        (["--commit_id=abc"], "--commit_id is set at run time: the log's header")])
def test_what_sparks_args_set_at_run_time_is_refused_with_the_rule(args, rule, tmp_path, monkeypatch):
    monkeypatch.setattr("spark_sparse.train.engine.pretrain", _raising(AssertionError("must not start")))
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", *args])
    assert result.exit_code == 2 and rule in result.output, result.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_the_training_steps_stops_with_a_message_not_a_traceback(signum, tmp_path, monkeypatch):
    """Kernel tuning can take minutes before the loop's own handlers (which save a checkpoint) are installed:
    Ctrl-C there printed a traceback, SIGTERM ended the process without a word."""
    def tuning(cfg, cmd, capture_console):
        os.kill(os.getpid(), signum)
        time.sleep(5)                      # the handler raises within this sleep
        raise AssertionError("the signal did not stop the run")
    monkeypatch.setattr("spark_sparse.train.engine.pretrain", tuning)
    before = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as in a terminal: a shell's background job (CI) starts with SIGINT ignored
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}"])
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert result.exit_code == 128 + signum, result.output
    assert f"{signal.Signals(signum).name} received outside the training steps" in result.output
    assert "Traceback" not in result.output
    assert signal.getsignal(signal.SIGTERM) is before                # the previous handler is back


def test_old_aliases_keep_working(captured, tmp_path):
    ckpt = tmp_path / "r.pth"
    assert _run(["x", f"--data_path={tmp_path}", "--model=res50", f"--resume={ckpt}"]).exit_code == 0
    assert captured["cfg"].model == "resnet50" and captured["cfg"].resume_from == str(ckpt)


def test_sparse_conv_selects_the_recommended_sparse_backend(captured, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "recommended_sparse_backend", lambda: "torch")
    assert _run(["x", f"--data_path={tmp_path}", "--sparse_conv=1"]).exit_code == 0
    assert captured["cfg"].backend == "torch"


def test_unknown_backend_lists_available_ones(tmp_path):
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", "--backend=warp"])
    assert result.exit_code == 2 and "unknown backend 'warp'" in result.output and "masked" in result.output


def test_an_unknown_backend_close_to_a_known_one_is_suggested(tmp_path):
    result = CliRunner().invoke(cli.pretrain_command, ["t", f"--data_path={tmp_path}", "--backend=sprase"])
    assert result.exit_code == 2 and "did you mean 'sparse'?" in result.output


def test_the_logged_command_is_one_that_runs_again(monkeypatch):
    """``python -m spark_sparse.cli`` has the package's file as argv[0] (not executable): it is written as the
    module run; under torchrun the launch flags come first, so that a resume runs as many processes."""
    module_file = cli.__file__
    for name in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    python, torchrun = shlex.quote(sys.executable), shlex.quote(str(Path(sys.executable).parent / "torchrun"))
    assert cli.launch_command([module_file, "t", "--bs=8"]) == f"{python} -m spark_sparse.cli t --bs=8"
    assert cli.launch_command(["/venv/bin/spark-pretrain", "t"]) == "/venv/bin/spark-pretrain t"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.launch_command([module_file, "t"]) == f"{torchrun} --nnodes=1 --nproc_per_node=2 -m spark_sparse.cli t"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert cli.launch_command([module_file, "t"]) == (f"{torchrun} --nnodes=2 --nproc_per_node=2 --node_rank=1 "
                                                      "--master_addr=node0 --master_port=1234 -m spark_sparse.cli t")


def test_unknown_model_lists_known_ones(tmp_path):
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", "--model=no_such_net"])
    assert result.exit_code == 2 and "unknown model 'no_such_net'" in result.output and "resnet50" in result.output
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", "--model=resnet5"])
    assert "did you mean resnet50" in result.output


def test_help_shows_every_option_with_defaults():
    result = CliRunner().invoke(cli.pretrain_command, ["--help"], terminal_width=200)
    for option in ("--data_path", "--model", "--input_size", "--mask", "--bs", "--ep", "--wp_ep", "--base_lr", "--wd",
                   "--wde", "--clip", "--opt", "--ada", "--dp", "--sbn", "--dataloader_workers", "--init_weight",
                   "--resume_from", "--backend", "--device", "--amp", "--seed", "--tensorboard", "--recipe",
                   "--num_nodes", "--ngpu_per_node", "--node_rank", "--master_address", "--master_port"):
        assert option in result.output, option
    assert "[default: 0.04]" in result.output and "default 4096" in result.output


def test_the_cli_tees_the_console_into_the_run_folder(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}"]).exit_code == 0
    assert captured["capture_console"] is True


def test_overwrite_and_resume_auto_reach_the_run(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}", "--overwrite", "--resume_from=auto"]).exit_code == 0
    assert captured["cfg"].overwrite is True and captured["cfg"].resume_from == "auto"


def _raising(error):
    def fake_pretrain(cfg, cmd="", max_epochs=None, capture_console=False):
        raise error
    return fake_pretrain


@pytest.mark.parametrize("error", [
    "spark_sparse.kernels.NoKernelError", "spark_sparse.backends.UnsupportedModuleError",
    "spark_sparse.backends.UnknownBackendError", "spark_sparse.models.UnknownModelError",
    "spark_sparse.train.data.DataError", "spark_sparse.checkpoint.CheckpointError",
    "spark_sparse.train.engine.TrainingError", "spark_sparse.errors.ConfigError"])
def test_our_errors_print_one_line_with_the_fix_and_no_traceback(error, monkeypatch, tmp_path):
    import importlib
    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    monkeypatch.setattr("spark_sparse.train.engine.pretrain", _raising(cls("layer x cannot run: use --backend=torch")))
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == "Error: layer x cannot run: use --backend=torch\n"


@pytest.mark.parametrize("bug", [ValueError("internal bug"), KeyError("missing"), RuntimeError("broken")],
                         ids=["ValueError", "KeyError", "RuntimeError"])
def test_unexpected_errors_keep_their_traceback(bug, monkeypatch, tmp_path):
    monkeypatch.setattr("spark_sparse.train.engine.pretrain", _raising(bug))
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}"])
    assert result.exit_code == 1 and result.exception is bug        # not turned into a one-line message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a usable GPU")
def test_asking_for_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    from apptools import make_image_folder
    data = make_image_folder(tmp_path / "data", count=2)
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={data}", "--device=cuda",
                                                       f"--exp_dir={tmp_path / 'out'}"])
    assert result.exit_code == 1 and result.output.startswith("Error: --device cuda asks for CUDA, but ")
    assert "use --device cpu" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cuda_asked_of_a_cuda_build_without_a_gpu_points_at_the_driver_not_at_another_build(tmp_path, monkeypatch):
    from apptools import make_image_folder
    data = make_image_folder(tmp_path / "data", count=2)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={data}", "--device=cuda",
                                                       f"--exp_dir={tmp_path / 'out'}"])
    assert result.exit_code == 1 and "(CUDA 13.0) finds no usable GPU: check the driver (nvidia-smi)" in result.output
    assert "install a CUDA build" not in result.output and "or use --device cpu" in result.output


def test_sparks_exp_name_flag_names_the_run(captured, tmp_path):
    assert _run(["--exp_name=debug", f"--data_path={tmp_path}"]).exit_code == 0
    assert captured["cfg"].output_dir.name == "output_debug"
    result = CliRunner().invoke(cli.pretrain_command, ["a", "--exp_name=b", f"--data_path={tmp_path}"])
    assert result.exit_code == 2 and "two names for the run" in result.output


def test_a_run_on_user_data_without_a_name_is_named_after_its_model(captured, tmp_path):
    assert _run([f"--data_path={tmp_path}", "--model=resnet18"]).exit_code == 0
    assert (captured["cfg"].exp_name, captured["cfg"].output_dir.name) == ("resnet18", "output_resnet18")


@pytest.mark.parametrize("args, message", [
    (["--mask=0"], "--mask 0.0: the ratio of patches hidden must be above 0"),
    (["--mask=1.5"], "--mask 1.5: the ratio"),
    (["--ep=0"], "--ep 0: at least one epoch"),
    (["--base_lr=-1"], "--base_lr -1.0: must be positive"),
    (["--dataloader_workers=-1"], "--dataloader_workers -1: 0 (load in the training process) or more"),
    (["--input_size=0"], "--input_size 0: must be a positive multiple of 32"),
    (["--dp=1.5"], "--dp 1.5: a drop-path rate is in [0, 1)"),
    (["--dp=-0.5"], "--dp -0.5: a drop-path rate is in [0, 1)"),
    (["--ada=1"], "--ada 1.0: Adam's beta2 must be in [0, 1)"),
    (["--wd=-0.1"], "--wd -0.1: weight decay cannot be negative"),
    (["--wd=nan"], "--wd nan: must be a finite number"),
    (["--base_lr=inf"], "--base_lr inf: must be a finite number"),
    (["--clip=nan", "--wp_ep=nan"], "--wp_ep nan: must be a finite number; --clip nan: must be a finite number (<= 0 "
                                    "turns clipping off)"),
    (["--model_kwargs", "img_size"], "--model_kwargs 'img_size': expected KEY=VALUE"),
    (["--model_kwargs", "a=1", "--model_kwargs", "a=2"], "--model_kwargs: a is given twice"),
    (["--model_kwargs", "drop_path_rate=0.1"], "--model_kwargs: drop_path_rate is --dp"),
    (["--model_kwargs", "input_size=192"], "--model_kwargs: input_size is --input_size"),
    (["--model_kwargs", "a=(1 b=2"], "--model_kwargs 'a=(1 b=2': unbalanced brackets"),
    (["--model_kwargs", "name=it's a=1"], "unbalanced quotes"),
    (["--model_kwargs", "a={(1, 2): 3}"], "model_kwargs a={(1, 2): 3}: dicts in a run's constructor arguments need "
                                          "string keys"),
])
def test_values_no_run_can_use_are_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr("spark_sparse.train.engine.pretrain", _raising(AssertionError("must not start")))
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", *args])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output, result.output
    assert "Traceback" not in result.output


USER_MODELS = '''
import spark_sparse as ss
from spark_sparse.models.example import TinyCNN


@ss.register_model("user_tiny_cnn")
def user_tiny_cnn(drop_path_rate=0.0, **kwargs):
    return TinyCNN(widths=(8, 8, 16, 16), drop_path_rate=drop_path_rate, **kwargs)
'''


def test_a_users_module_registers_the_model_the_console_script_pre_trains(tmp_path):
    """``--import_module`` by dotted name from the current folder: the console script has no current folder on
    ``sys.path`` (``python -P`` reproduces that), so the option must add it. The run writes SparK's files
    under the user's model name and logs the module."""
    work = make_image_folder(tmp_path / "work")
    (work / "my_models.py").write_text(USER_MODELS)
    command = [sys.executable, "-P", "-c", "import sys; from spark_sparse.cli import main; sys.argv[0] = "
               "'spark-pretrain'; main()", "--import_module", "my_models", "--model", "user_tiny_cnn",
               "--data_path", ".", "--input_size", "64", "--bs", "4", "--ep", "1", "--wp_ep", "0",
               "--dataloader_workers", "0", "--device", "cpu", "--backend", "sparse", "--exp_dir", "out"]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "out"
    assert (out / "user_tiny_cnn_1kpretrained.pth").is_file()
    assert (out / "user_tiny_cnn_still_pretraining.pth").is_file()
    header = json.loads((out / "pretrain_log.txt").read_text().splitlines()[0])
    assert header["model"] == "user_tiny_cnn" and header["args"]["import_module"] == ["my_models"]


def test_a_module_file_is_imported_once_under_its_stem(tmp_path):
    path = tmp_path / "registers_nothing_here.py"
    path.write_text("LOADS = []\nLOADS.append(1)\n")
    first = import_user_module(str(path))
    assert import_user_module(str(path)) is first and first.LOADS == [1]
    other = tmp_path / "sub" / "registers_nothing_here.py"
    other.parent.mkdir()
    other.write_text("")
    with pytest.raises(UserModuleError, match="a module named 'registers_nothing_here' is already loaded from"):
        import_user_module(str(other))


def test_a_module_file_imports_the_modules_beside_it(tmp_path, monkeypatch):
    """As ``python file.py`` would: its folder is on the path, so the file may import its neighbours."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "neighbour_of_user_models.py").write_text("WIDTH = 8\n")
    (folder / "user_models_with_a_neighbour.py").write_text("from neighbour_of_user_models import WIDTH\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    try:
        assert import_user_module(str(folder / "user_models_with_a_neighbour.py")).WIDTH == 8
        assert sys.path[-1] == str(folder)                 # after the environment: it shadows no package
    finally:
        for name in ("user_models_with_a_neighbour", "neighbour_of_user_models"):
            sys.modules.pop(name, None)


def test_a_module_that_cannot_be_found_is_a_usage_error_and_its_own_import_errors_keep_their_traceback(tmp_path,
                                                                                                     monkeypatch):
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", "--import_module=no_such_mod"])
    assert result.exit_code == 2 and "no module named 'no_such_mod' in the current folder" in result.output
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}",
                                                       f"--import_module={tmp_path / 'missing.py'}"])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "broken_user_models.py").write_text("import a_package_nobody_installed\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="a_package_nobody_installed"):
        import_user_module("broken_user_models")


def test_an_unknown_model_points_at_import_module(tmp_path):
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", "--model=my_cnn"])
    assert result.exit_code == 2 and "pass --import_module MODULE_OR_FILE.py" in result.output


def test_model_kwargs_words_reach_the_config_as_python_values(captured, tmp_path):
    result = _run(["x", f"--data_path={tmp_path}", "--model_kwargs", "img_size=192",
                   "--model-kwargs", "window_size=6 stem_type=deep", "--model_kwargs", "channels=(8, 16)"])
    assert result.exit_code == 0, result.output
    assert captured["cfg"].model_kwargs == {"img_size": 192, "window_size": 6, "stem_type": "deep",
                                            "channels": (8, 16)}


def test_model_kwargs_written_back_as_options_parse_into_the_same_values():
    kwargs = {"img_size": 192, "stem_type": "deep", "channels": (8, 16), "name": "a b", "digits": "1", "off": None}
    words = shlex.split(format_model_kwargs(kwargs, as_options=True))
    assert words[::2] == ["--model_kwargs"] * len(kwargs)
    assert parse_model_kwargs(words[1::2]) == kwargs


def test_timms_several_words_after_one_model_kwargs_are_refused_not_taken_as_the_runs_name(captured, tmp_path):
    result = CliRunner().invoke(cli.pretrain_command, [f"--data_path={tmp_path}", "--model_kwargs", "img_size=192",
                                                       "window_size=6"])
    assert result.exit_code == 2 and "EXP_NAME 'window_size=6' looks like a constructor argument" in result.output
    assert "cfg" not in captured



def test_a_run_name_with_an_equals_sign_is_a_name_without_model_kwargs(captured, tmp_path):
    assert _run(["mask=0.75", f"--data_path={tmp_path}"]).exit_code == 0
    assert captured["cfg"].exp_name == "mask=0.75" and captured["cfg"].model_kwargs == {}


def test_a_value_that_is_no_literal_python_can_build_stays_a_string(captured, tmp_path):
    assert _run(["x", f"--data_path={tmp_path}", "--model_kwargs", "a={[1]: 2}"]).exit_code == 0
    assert captured["cfg"].model_kwargs == {"a": "{[1]: 2}"}


@pytest.mark.parametrize("args, message", [
    (["--num_nodes", "0"], "Invalid value for --num_nodes: 0: must be at least 1"),
    (["--ngpu_per_node", "0"], "Invalid value for --ngpu_per_node: 0: must be at least 1 process per node"),
    (["--num_nodes", "2", "--node_rank", "5"],
     "Invalid value for --node_rank: 5: must be from 0 to --num_nodes - 1 (1)"),
    (["--node_rank", "1"], "Invalid value for --node_rank: 1: must be from 0 to --num_nodes - 1 (0)"),
])
def test_launch_flags_no_launch_can_use_are_refused_before_anything_starts(tmp_path, args, message):
    result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={tmp_path}", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_dotted_name_that_is_both_a_local_file_and_an_environment_module_is_refused(tmp_path, monkeypatch):
    """A console script has no current folder first on sys.path: ``--import_module my_shadowed`` beside a
    ``my_shadowed.py`` would import the environment's module of that name (the standard library's ``test``, for
    one); it is refused naming both, and the file's path imports the file."""
    environment, work = tmp_path / "site", tmp_path / "work"
    for folder, value in ((environment, "environment"), (work, "local")):
        folder.mkdir()
        (folder / "my_shadowed.py").write_text(f"WHERE = {value!r}\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [str(environment)] + [entry for entry in sys.path if entry not in ("", str(work))])
    try:
        result = CliRunner().invoke(cli.pretrain_command, ["x", f"--data_path={work}", "--import_module=my_shadowed"])
        assert result.exit_code == 2, result.output
        assert (f"the name 'my_shadowed' is the environment's module ({environment / 'my_shadowed.py'}), found before "
                f"{work / 'my_shadowed.py'} in the current folder; pass the file's path (--import_module "
                f"./my_shadowed.py) or rename it") in " ".join(result.output.split()), result.output
        assert "my_shadowed" not in sys.modules
        assert import_user_module("./my_shadowed.py").WHERE == "local"
    finally:
        sys.modules.pop("my_shadowed", None)
