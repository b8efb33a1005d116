"""Export to timm, SparK's released formats, ConvNeXt key layouts, atomic writes, bad files."""
import os
import stat
from types import SimpleNamespace

import pytest
import timm
import torch

import spark_sparse as ss
from equivalence import assert_encoder_matches_timm
from spark_sparse.checkpoint import (CheckpointError, atomic_save, convnext_fb_to_timm, convnext_timm_to_fb,
                                     load_pretrained, read_checkpoint)


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_export_loads_into_plain_timm_and_gives_identical_features(model, tmp_path):
    spark = ss.create_spark(model, input_size=64, drop_path_rate=0.0)
    with torch.no_grad():                       # make the weights differ from any fresh init
        for p in spark.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    atomic_save(spark.encoder_state_dict(), tmp_path / f"{model}_1kpretrained.pth")
    assert_encoder_matches_timm(spark, model, torch.load(tmp_path / f"{model}_1kpretrained.pth"), atol=1e-5)


def test_convnext_key_layouts_round_trip_exactly():
    state = timm.create_model("convnext_tiny", pretrained=False, num_classes=0).state_dict()
    fb = convnext_timm_to_fb(state)
    assert "downsample_layers.0.0.weight" in fb and "stages.0.0.dwconv.weight" in fb and "norm.weight" in fb
    assert "stages.1.2.pwconv1.weight" in fb and "downsample_layers.2.1.weight" in fb
    back = convnext_fb_to_timm(fb)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def _official_spark_state(spark, model):
    """What SparK's ``SparK.state_dict(with_config=True)`` holds for the same weights."""
    encoder = spark.encoder_state_dict()
    if model.startswith("convnext"):
        encoder = {k: v for k, v in convnext_timm_to_fb(encoder).items() if not k.startswith("norm.")}
    state = {f"sparse_encoder.sp_cnn.{k}": v for k, v in encoder.items()}
    for k, v in spark.state_dict().items():
        if k.startswith("decoder."):
            state["dense_decoder." + k[len("decoder."):]] = v
        elif k.startswith(("densify_norms.", "densify_projs.", "mask_tokens.")):
            state[k] = v
    state.update(imn_m=torch.zeros(1, 3, 1, 1), imn_s=torch.ones(1, 3, 1, 1), norm_black=torch.zeros(1, 3, 64, 64),
                 config={"mask_ratio": 0.6})
    return state


@pytest.mark.parametrize("model", ["resnet18", "convnext_tiny"])
def test_sparks_spark_style_checkpoint_loads(model, tmp_path):
    source = ss.create_spark(model, input_size=64)
    path = tmp_path / f"{model}_withdecoder_1kpretrained_spark_style.pth"
    torch.save({"arch": model, "epoch": 3, "module": _official_spark_state(source, model), "is_pretrain": True}, path)
    target = ss.create_spark(model, input_size=64)
    assert load_pretrained(target, path) == "spark-style"
    want, got = source.state_dict(), target.state_dict()
    for k in want:
        if "head.norm" not in k:
            assert torch.equal(want[k], got[k]), k


def test_sparks_own_checkpoint_into_a_narrower_decoder_names_the_width(tmp_path):
    """SparK's files keep ``args`` as a string (``str(args)``) and its decoder is always 768 wide."""
    source = ss.create_spark("tiny_cnn", input_size=64)
    path = tmp_path / "tiny_cnn_still_pretraining.pth"
    torch.save({"args": "Namespace(model='tiny_cnn')", "module": _official_spark_state(source, "tiny_cnn")}, path)
    with pytest.raises(CheckpointError, match=r"\(SparK spark-style checkpoint\) does not fit this model: .*; its "
                                              r"decoder is 768 wide, this run's 64: give --decoder_width 768$"):
        load_pretrained(ss.create_spark("tiny_cnn", input_size=64, decoder_width=64), path)


def test_a_spark_style_file_that_does_not_fit_names_the_keys_it_could_not_place(tmp_path):
    """The user trial's refusal named the 182 keys the model missed and none of the file's own."""
    spark = ss.create_spark("tiny_cnn", input_size=64)
    official = _official_spark_state(spark, "tiny_cnn")
    module = {k.replace("sparse_encoder.sp_cnn.", "backbone."): v for k, v in official.items()}
    unplaced = [k for k in module if k.startswith("backbone.")]
    torch.save({"module": module}, tmp_path / "fake.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(spark, tmp_path / "fake.pth")
    message = str(err.value)
    assert "(SparK spark-style checkpoint) does not fit this model: missing" in message
    assert f"unexpected {len(unplaced)} keys (e.g. {', '.join(unplaced[:4])})" in message
    assert not any(name in message for name in ("config", "imn_m", "imn_s", "norm_black"))   # SparK's, not weights


@pytest.mark.parametrize("layout", ["timm", "fb"])
def test_bare_encoder_files_load_in_either_convnext_layout(layout, tmp_path):
    source = ss.create_spark("convnext_tiny", input_size=64)
    state = source.encoder_state_dict()
    torch.save(convnext_timm_to_fb(state) if layout == "fb" else state, tmp_path / "enc.pth")
    target = ss.create_spark("convnext_tiny", input_size=64)
    assert load_pretrained(target, tmp_path / "enc.pth") == "timm-style encoder"
    assert all(torch.equal(v, target.encoder_state_dict()[k]) for k, v in state.items())


def test_checkpoint_of_another_model_says_what_differs(tmp_path):
    torch.save(ss.create_spark("resnet18", input_size=64).encoder_state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not fit this model.*(missing|unexpected|shape)"):
        load_pretrained(ss.create_spark("resnet50", input_size=64), tmp_path / "r18.pth")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_corrupt_file_is_a_clear_error(content, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)


def test_an_empty_file_is_named_empty(tmp_path):
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\): a copy or download that did not finish"):
        read_checkpoint(tmp_path / "empty.pth")


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="neither 'model', 'module' nor 'state_dict'"):
        load_pretrained(ss.create_spark("tiny_cnn", input_size=64), tmp_path / "meta.pth")


def test_atomic_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise KeyboardInterrupt("interrupted mid-save")

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert read_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save_of_that_file(tmp_path):
    (tmp_path / ".ckpt.pth.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pth.k1ll3d.tmp").write_bytes(b"another file's")
    atomic_save({"step": 1}, tmp_path / "ckpt.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.k1ll3d.tmp", "ckpt.pth"]


def test_a_save_on_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    atomic_save({"step": 1}, tmp_path / "ckpt.pth")
    import spark_sparse.checkpoint as checkpoint

    def full_disk_save(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))
    with pytest.raises(CheckpointError, match=r"could not write .*ckpt.pth: its disk is full \(RuntimeError: "
                                              r"\[enforce fail.*free some space"):
        atomic_save({"step": 2}, tmp_path / "ckpt.pth")
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "ckpt.pth") == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_checkpoints_get_the_mode_of_the_runs_other_files(tmp_path):
    """mkstemp creates 0o600 files: a checkpoint must be as readable as the log next to it (umask applies)."""
    previous = os.umask(0o022)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "ckpt.pth")
        (tmp_path / "log.txt").write_text("")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ckpt.pth").stat().st_mode) == stat.S_IMODE((tmp_path / "log.txt").stat().st_mode) \
        == 0o644


def test_classification_checkpoints_load_into_the_encoder_leaving_their_classifier_out(tmp_path):
    """timm's weights with the classifier (resnet: fc), the official ConvNeXt release ({'model': FB layout with its
    head}) and timm's train.py checkpoint ({'state_dict': 'module.'-prefixed}) all initialise the encoder."""
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    spark = ss.create_spark("resnet18", input_size=64)
    assert load_pretrained(spark, tmp_path / "resnet.pth") == \
        "timm-style encoder, its classifier left out (fc.weight, fc.bias)"
    torch.testing.assert_close(spark.encoder.model.conv1.weight, resnet.conv1.weight)

    convnext = timm.create_model("convnext_tiny", pretrained=False, num_classes=10)
    torch.save({"model": convnext_timm_to_fb(convnext.state_dict())}, tmp_path / "convnext_fb.pth")
    spark = ss.create_spark("convnext_tiny", input_size=64)
    assert load_pretrained(spark, tmp_path / "convnext_fb.pth") == \
        "'model' timm-style encoder, its classifier left out (head.fc.weight, head.fc.bias)"
    torch.testing.assert_close(spark.encoder.model.stem[0].weight, convnext.stem[0].weight)

    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}},
               tmp_path / "train_py.pth")
    assert load_pretrained(ss.create_spark("resnet18", input_size=64), tmp_path / "train_py.pth").startswith(
        "'state_dict' timm-style encoder")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_python_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"model": {}, "payload": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"holds Python objects besides tensors and plain values \(e.g. "
                                              r"[\w.]*open\), which are not unpickled.*weights_only=False"):
        load_pretrained(ss.create_spark("tiny_cnn", input_size=64), tmp_path / "evil.pth")
    assert not marker.exists()
