"""`deploy triton`, offline: every config.pbtxt it writes parses into tritonclient's ModelConfig (as Triton reads
it) and agrees with its graph, which is the bundle's byte for byte; deliberately broken configs are caught, by
protobuf (unknown field, unknown enum name) or by our checks (wrong platform, dims or dtype that disagree with
the graph, a name that is not the folder's); LLaVA-Mini gets its three graphs; nothing else in the repository
is touched; --force replaces only a model folder deploy wrote, whose files get the umask's modes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from convllava_edge.cli.main import main
from convllava_edge.deploy_triton import TritonOptions, check_model, check_repository, deploy_triton, external_data
from convllava_edge.errors import ConfigError
from convllava_edge.manifest import load_manifest

DEMO = Path(__file__).resolve().parents[2] / "convllava_edge" / "models" / "shapes-demo"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def repo(tmp_path):
    (tmp_path / "repo" / "someone_else").mkdir(parents=True)
    (tmp_path / "repo" / "someone_else" / "config.pbtxt").write_text("kept as it is")
    folders = deploy_triton(DEMO, tmp_path / "repo", TritonOptions(instances=2))
    return folders[0]


@pytest.mark.timeout(60)
def test_the_demo_deploys_and_every_config_parses(repo):
    config = text_format.Parse((repo / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("shapes-demo-checkpoint_vision", "onnxruntime_onnx", 0)
    assert [(i.name, list(i.dims)) for i in config.input] == [("pixel_values", [1, 3, -1, -1])]
    assert [o.name for o in config.output] == ["image_features", "image_embeds"]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    manifest = load_manifest(DEMO)
    graph = next(f for f in manifest.files if f.path == manifest.vision[0].graph)
    assert sha(repo / "1" / "model.onnx") == graph.sha256  # byte-identical to the bundle's
    assert (repo.parent / "someone_else" / "config.pbtxt").read_text() == "kept as it is"
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    check_model(repo)


BROKEN = [
    ("unknown field", lambda t: t.replace("max_batch_size: 0", "max_batch_size: 0\nmax_batch: 4"), "max_batch"),
    ("unknown enum name", lambda t: t.replace("TYPE_FP32", "TYPE_FLOAT32", 1), "TYPE_FLOAT32"),
    ("wrong platform", lambda t: t.replace('"onnxruntime_onnx"', '"onnxruntime_onx"'), "platform 'onnxruntime_onx'"),
    ("dims", lambda t: t.replace("dims: [ 1, -1, 256 ]", "dims: [ 1, -1, 257 ]"), "dims [1, -1, 257] disagree"),
    ("rank", lambda t: t.replace("dims: [ 1, 3, -1, -1 ]", "dims: [ 3, -1, -1 ]"), "dims [3, -1, -1] disagree"),
    ("fixed where symbolic", lambda t: t.replace("dims: [ 1, 3, -1, -1 ]", "dims: [ 1, 3, 256, 256 ]"), "disagree"),
    ("dtype", lambda t: t.replace("TYPE_FP32", "TYPE_FP16", 1), "is TYPE_FP16, the graph's is TYPE_FP32"),
    ("input name", lambda t: t.replace('"pixel_values"', '"pixels"'), "inputs ['pixels']"),
    ("name", lambda t: t.replace('name: "shapes-demo-checkpoint_vision"', 'name: "other"'), "differs from its folder"),
    ("batching", lambda t: t.replace("max_batch_size: 0", "max_batch_size: 8"), "max_batch_size 8"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [c[0] for c in BROKEN])
def test_broken_configs_are_caught_in_one_line(repo, case):
    _, edit, fragment = next(c for c in BROKEN if c[0] == case)
    config = repo / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(ConfigError) as e:
        check_model(repo)
    assert fragment in str(e.value) and "\n" not in str(e.value) and str(config) in str(e.value), str(e.value)


@pytest.mark.timeout(120)
def test_cli_tensorrt_force_and_refusals(tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["deploy", "triton", str(DEMO), "--out", str(out)]) == 0
    capsys.readouterr()
    for args, fragment in ((["--tensorrt", "fp16"], "not TensorRT-ready"), ([], "exists: remove it or pass --force"),
                           (["--vision-type", "fp8"], "fp8"), (["--tensorrt", "fp4", "--force"], "--tensorrt 'fp4'")):
        assert main(["deploy", "triton", str(DEMO), "--out", str(out), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert main(["deploy", "triton", str(DEMO), "--out", str(out), "--force", "--gpu"]) == 0
    assert "KIND_GPU" in (out / "shapes-demo-checkpoint_vision" / "config.pbtxt").read_text()
    assert main(["deploy", "check", str(out)]) == 0


@pytest.mark.timeout(300)
def test_tensorrt_block_and_external_data(tiny_bundle, tmp_path):
    """A TensorRT-ready type gets the accelerator block (parsed, checked); a graph whose weights live in an
    external file: the file it names is found (deploy copies it beside model.onnx under that name)."""
    bundle = tiny_bundle
    manifest = load_manifest(bundle)
    ready = next((e.variant for e in manifest.vision if e.tensorrt_ready), None)
    assert ready is not None, [(e.variant, e.tensorrt_ready) for e in manifest.vision]
    (folder,) = deploy_triton(bundle, tmp_path / "repo", TritonOptions(vision_type=ready, tensorrt="fp16"))
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    graph = onnx.load(str(folder / "1" / "model.onnx"))
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save(graph, str(outside / "g.onnx"), save_as_external_data=True, location="g.onnx.weights",
              size_threshold=0)
    assert external_data(outside / "g.onnx") == ["g.onnx.weights"]
    assert all((folder / "1" / name).is_file() for name in external_data(folder / "1" / "model.onnx"))


@pytest.mark.timeout(300)
def test_llava_mini_gets_its_three_graphs(mini, tmp_path):
    from convllava_edge.export.bundle import ExportOptions, export_bundle

    sft, clip = mini
    bundle = tmp_path / "mini"
    export_bundle(sft, bundle, ExportOptions(vision_types=("fp32",), llm_type="F32"), vision_tower=clip)
    folders = deploy_triton(bundle, tmp_path / "repo")
    manifest = load_manifest(bundle)
    assert sorted(f.name for f in folders) == sorted(f"{manifest.name}_{role}" for role in manifest.vision[0].parts)
    assert len(check_repository(tmp_path / "repo")) == 3
    for folder in folders:
        role = folder.name.removeprefix(manifest.name + "_")
        part = manifest.vision[0].parts[role]
        assert sha(folder / "1" / "model.onnx") == next(f.sha256 for f in manifest.files if f.path == part)


# -- --force replaces only what deploy wrote (its marker, nothing unlisted); folders with the umask's modes -----
MODEL = "shapes-demo-checkpoint_vision"


def refused(capsys, args, *needles) -> str:
    assert main(["deploy", "triton", str(DEMO), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.timeout(120)
def test_force_keeps_a_users_file_and_an_extra_version_folder(tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["deploy", "triton", str(DEMO), "--out", str(out)]) == 0
    notes = out / MODEL / "MY_NOTES.txt"
    notes.write_text("mine")
    graph = sha(out / MODEL / "1" / "model.onnx")
    refused(capsys, ["--out", str(out), "--force", "--gpu"], str(out / MODEL), "'MY_NOTES.txt'")
    assert notes.read_text() == "mine" and sha(out / MODEL / "1" / "model.onnx") == graph
    assert "KIND_CPU" in (out / MODEL / "config.pbtxt").read_text()  # not replaced at all
    notes.unlink()
    (out / MODEL / "2").mkdir()
    (out / MODEL / "2" / "model.onnx").write_bytes(b"a user's other version")
    refused(capsys, ["--out", str(out), "--force"], str(out / MODEL), "'2'")
    assert (out / MODEL / "2" / "model.onnx").read_bytes() == b"a user's other version"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.timeout(120)
def test_force_refuses_a_model_folder_deploy_did_not_write(tmp_path, capsys):
    out = tmp_path / "repo"
    (out / MODEL / "1").mkdir(parents=True)
    (out / MODEL / "config.pbtxt").write_text("someone's own config")
    refused(capsys, ["--out", str(out), "--force"], str(out / MODEL), ".convllava-edge-deploy.json")
    assert (out / MODEL / "config.pbtxt").read_text() == "someone's own config"
    (out / MODEL / "config.pbtxt").unlink()
    (out / MODEL / "1").rmdir()
    (out / MODEL).rmdir()
    (out / MODEL).symlink_to(tmp_path)
    refused(capsys, ["--out", str(out), "--force"], str(out / MODEL), "symbolic link")


@pytest.mark.timeout(120)
def test_force_replaces_our_own_earlier_deployment(tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["deploy", "triton", str(DEMO), "--out", str(out)]) == 0
    (out / MODEL / "config.pbtxt").unlink()  # a damaged deployment: replacing it is what --force is for
    assert main(["deploy", "triton", str(DEMO), "--out", str(out), "--force", "--gpu"]) == 0
    assert "KIND_GPU" in (out / MODEL / "config.pbtxt").read_text()
    assert main(["deploy", "triton", str(DEMO), "--out", str(out), "--force"]) == 0
    assert "KIND_CPU" in (out / MODEL / "config.pbtxt").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    check_model(out / MODEL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask022", "umask027"])
def test_model_folders_get_the_modes_of_the_umask(tmp_path, mask, dir_mode, file_mode):
    previous = os.umask(mask)
    try:
        (folder,) = deploy_triton(DEMO, tmp_path / "repo")
    finally:
        os.umask(previous)
    modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes == {".": dir_mode, "1": dir_mode, "1/model.onnx": file_mode, "config.pbtxt": file_mode,
                     ".convllava-edge-deploy.json": file_mode}, {k: oct(v) for k, v in modes.items()}


@pytest.mark.timeout(60)
def test_a_file_where_a_repository_should_be_is_one_line(tmp_path, capsys):
    file = tmp_path / "repo.txt"
    file.write_text("not a repository")
    refused(capsys, ["--out", str(file)], str(file), "not a folder")
    assert main(["deploy", "check", str(file)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(file) in err and "not a folder" in err, err
    assert file.read_text() == "not a repository"
