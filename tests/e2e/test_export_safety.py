"""What export refuses and cleans up: --force replaces only bundles, leftovers of killed exports are removed,
bundles get the usual file modes, hostile configs and corrupt shards are refused in one line, early.

Long module: five guards on what export writes and reads, one section each, sharing the helpers at the top that
damage a tiny checkpoint or bundle in place.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from convllava_edge.cli.main import main
from convllava_edge.errors import CheckpointError, ExportError
from convllava_edge.export import staging as B
from convllava_edge.export.bundle import ExportOptions, export_bundle, staging_folder
from convllava_edge.export.checkpoint import TensorStore
from convllava_edge.export.config import LlavaConfig
from convllava_edge.export.convllava.tower import TowerConfig
from convllava_edge.export.llava_mini.modules import LlavaMiniConfig, read_clip_config
from convllava_edge.manifest import (MANIFEST_NAME, SCHEMA_VERSION, FileRecord, Manifest, TokensPerImage,
                                     VisionEntry, write_manifest)
from convllava_edge.preprocess import PreprocessConfig

from convllava_edge.export.convllava import synthetic as S
from support.synthetic_mini import TINY_CLIP
from support.tiny import SPEC

TOWER_KEY = "model.vision_tower.vision_tower.encoder.stages.1.layers.0.pwconv1.weight"
LLM_KEY = "model.layers.0.mlp.up_proj.weight"


# -- helpers ---------------------------------------------------------------------------------------
def export_error(capsys, *args) -> str:
    """Run ``export ARGS`` through the CLI entry point; it must fail with exactly one 'error:' line."""
    code = main(["export", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def linked_copy(src: Path, dst: Path, replace: dict[str, bytes] | None = None) -> Path:
    """``dst`` with a symbolic link to each file of ``src``, except ``replace``'s, written as given: cheap copies."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if replace and f.name in replace:
            (dst / f.name).write_bytes(replace[f.name])
        else:
            os.symlink(f, dst / f.name)
    return dst


def with_config(src: Path, dst: Path, **changes) -> Path:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    return linked_copy(src, dst, {"config.json": json.dumps(config).encode()})  # NaN/Infinity as Python's json writes


def snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_size) for p in folder.rglob("*"))


def staging_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if B.PARTIAL in p.name or B.OLD in p.name)


def fake_bundle(folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A folder with a manifest this tool writes, listing one file (a bundle as far as --force is concerned)."""
    folder.mkdir(parents=True)
    (folder / "vision-fp32.onnx").write_bytes(b"graph")
    graph = VisionEntry("fp32", "vision-fp32.onnx", ("vision-fp32.onnx",), "test", True)
    manifest = Manifest(schema_version=SCHEMA_VERSION, family="convllava", name="x",
                        created_with="convllava-edge 0.1.0", files=(FileRecord.of(folder, folder / graph.graph),),
                        preprocess=PreprocessConfig(image_size=256, crop_size=(256, 256)), n_embd=256,
                        tokens_per_image=TokensPerImage(), vision=(graph,))
    write_manifest(folder, manifest)
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


def owner_marker(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True)
    (folder / B.OWNER_FILE).write_text(json.dumps({**B._owner_record(), **changes}))
    (folder / "half-written.gguf").write_bytes(b"x" * 10)
    return folder


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


# -- --force replaces bundles only, never an input -------------------------------------------------
@pytest.mark.timeout(60)
def test_force_leaves_a_plain_folder_and_its_files_alone(tiny, tmp_path, capsys):
    out = tmp_path / "my-folder"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = export_error(capsys, tiny.bin_ckpt, "--out", out, "--force")
    assert line == (f"error: {out} is not a convllava-edge bundle (no {MANIFEST_NAME}); "
                    "--force only replaces bundles")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_without_force_an_existing_folder_gives_the_usual_error(tiny, tmp_path, capsys):
    out = fake_bundle(tmp_path / "b")
    before = snapshot(out)
    line = export_error(capsys, tiny.bin_ckpt, "--out", out)
    assert line == f"error: {out} already exists (use --force to replace it)"
    assert snapshot(out) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["checkpoint", "parent", "dot", "dotdot", "root", "link", "tower"])
def test_force_never_replaces_an_input_or_a_folder_holding_one(tiny, tmp_path, capsys, monkeypatch, case):
    work = tmp_path / "work"
    ck = linked_copy(tiny.bin_ckpt, work / "ck")
    tower = linked_copy(tiny.tower, work / "tower")
    os.symlink(ck, tmp_path / "link")
    extra = []
    out = {"checkpoint": ck, "parent": work, "root": Path("/"), "link": tmp_path / "link", "tower": tower}.get(case)
    if case == "dot":  # the checkpoint's folder itself, named by '.'
        monkeypatch.chdir(ck)
        out = Path(".")
    elif case == "dotdot":
        monkeypatch.chdir(ck)
        out = Path("..")
    elif case == "tower":
        extra = ["--vision-tower", tower]
    before = snapshot(tmp_path)
    line = export_error(capsys, ck, "--out", out, "--force", *extra)
    assert "export never replaces its inputs" in line
    assert line.startswith(f"error: --out {out}")
    assert (" is the " if case in ("checkpoint", "dot", "link", "tower") else " holds the ") in line
    assert snapshot(tmp_path) == before  # nothing created, nothing removed, no '..partial-*' in any folder


@pytest.mark.timeout(60)
def test_dot_as_a_plain_folder_is_refused_cleanly(tiny, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    line = export_error(capsys, tiny.bin_ckpt, "--out", ".", "--force")
    assert line == (f"error: . ({here}) is not a convllava-edge bundle (no {MANIFEST_NAME}); "
                    "--force only replaces bundles")
    assert (here / "notes.txt").read_text() == "mine"
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_a_bundle_holding_a_file_it_does_not_list_is_not_replaced(tmp_path):
    out = fake_bundle(tmp_path / "b", {"my-notes.txt": b"mine"})
    with pytest.raises(ExportError, match=r"holds 'my-notes.txt', which its manifest.json does not list"):
        with staging_folder(out, force=True):
            pass
    assert (out / "my-notes.txt").read_bytes() == b"mine"
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("card,ours", [
    (b"---\nlibrary_name: convllava-edge\ntags:\n- gguf\n---\n# a bundle\n", True),  # what export writes
    (b"# my notes on this bundle\nlibrary_name: convllava-edge\n", False),  # no front matter: the user's
    (b"---\nlibrary_name: transformers\n---\nlibrary_name: convllava-edge\n", False),  # mark outside it
])
def test_a_bundle_card_is_ours_only_when_its_front_matter_says_so(tmp_path, card, ours):
    out = fake_bundle(tmp_path / "b", {"README.md": card})
    if ours:
        with staging_folder(out, force=True) as tmp:
            (tmp / "new.gguf").write_bytes(b"new")
        assert [p.name for p in out.iterdir()] == ["new.gguf"]
    else:
        with pytest.raises(ExportError, match=r"holds 'README.md', which its manifest.json does not list"):
            with staging_folder(out, force=True):
                pass
        assert (out / "README.md").read_bytes() == card
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_force_replaces_an_empty_folder_and_a_damaged_bundle(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    damaged = fake_bundle(tmp_path / "damaged")
    (damaged / "vision-fp32.onnx").unlink()  # listed, missing: still ours
    for out in (empty, damaged):
        with staging_folder(out, force=True) as tmp:
            (tmp / "new.gguf").write_bytes(b"new")
        assert [p.name for p in out.iterdir()] == ["new.gguf"]
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manifest,reason", [
    (b"{not json", "manifest.json unreadable: JSONDecodeError"),
    (json.dumps({"created_with": "other-tool 1.0", "schema_version": 1, "files": []}).encode(),
     "manifest.json was not written by convllava-edge"),
    (json.dumps({"created_with": "convllava-edge 0.1.0", "schema_version": "1", "files": []}).encode(),
     "manifest.json has schema_version '1'"),
    (json.dumps({"created_with": "convllava-edge 0.1.0", "schema_version": 1, "files": [{"path": "../x"}]}).encode(),
     "manifest.json has a malformed file list"),
])
def test_only_our_manifest_makes_a_bundle(tmp_path, manifest, reason):
    out = tmp_path / "b"
    out.mkdir()
    (out / MANIFEST_NAME).write_bytes(manifest)
    with pytest.raises(ExportError, match=f"is not a convllava-edge bundle \\({reason}"):
        B.check_out(out, force=True)
    assert (out / MANIFEST_NAME).read_bytes() == manifest


@pytest.mark.timeout(60)
def test_out_under_a_regular_file(tiny, tmp_path, capsys):
    blocker = tmp_path / "report.pdf"
    blocker.write_text("pdf")
    line = export_error(capsys, tiny.bin_ckpt, "--out", blocker / "bundle")
    assert line == f"error: --out {blocker / 'bundle'}: {blocker} is not a folder"
    assert blocker.read_text() == "pdf"


@pytest.mark.timeout(60)
def test_out_in_a_read_only_folder(tiny, tmp_path, capsys, monkeypatch):
    # Tests run as root, where chmod does not bite: the checks and the system calls are made to fail instead.
    target = tmp_path / "ro"
    target.mkdir()
    real_access, real_mkdtemp = os.access, tempfile.mkdtemp
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == target else real_access(p, mode, **kw))
    line = export_error(capsys, tiny.bin_ckpt, "--out", target / "b")
    assert line == f"error: --out {target / 'b'}: cannot write in {target} (permission denied)"
    monkeypatch.setattr(os, "access", real_access)

    def refuse(*args, dir=None, **kw):
        if Path(dir) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    line = export_error(capsys, tiny.bin_ckpt, "--out", target / "b")
    assert line == f"error: --out {target / 'b'}: cannot write in {target}: Permission denied"
    assert list(target.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_failed_swap_puts_the_previous_bundle_back(tmp_path, monkeypatch):
    out = fake_bundle(tmp_path / "b")
    before = snapshot(out)
    real_replace = os.replace

    def fail_into_place(src, dst):
        if Path(src).name.startswith(f".b{B.PARTIAL}"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(ExportError, match=r"^--out .*/b: cannot move the new bundle into place: "
                                          r"Invalid cross-device link$"):
        with staging_folder(out, force=True) as tmp:
            (tmp / "new.gguf").write_bytes(b"new")
    assert snapshot(out) == before
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_when_the_previous_bundle_cannot_go_back_it_is_kept_and_named(tmp_path, monkeypatch):
    out = fake_bundle(tmp_path / "b")
    before = snapshot(out)
    real_replace = os.replace

    def fail_both_ways(src, dst):
        if Path(src).name.startswith(f".b{B.PARTIAL}") or Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_both_ways)
    with pytest.raises(ExportError, match=r"nor the previous one back: it is in .*/\.b\.old-[^/]+/bundle$") as info:
        with staging_folder(out, force=True) as tmp:
            (tmp / "new.gguf").write_bytes(b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    kept = Path(str(info.value).rsplit("it is in ", 1)[1])
    assert snapshot(kept) == before
    assert B.remove_leftovers(out) == [] and snapshot(kept) == before  # unmarked: no later export removes it


@pytest.mark.timeout(30)
def test_a_symbolic_link_loop_as_out(tiny, tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    line = export_error(capsys, tiny.bin_ckpt, "--out", tmp_path / "loop" / "b", "--force")
    assert line.startswith(f"error: --out {tmp_path / 'loop' / 'b'}: cannot resolve the path")


# -- leftovers of killed exports ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_leftovers_of_dead_exports_are_removed_and_no_others(tmp_path):
    out = tmp_path / "b"
    code = ("import os, signal\n"
            "from pathlib import Path\n"
            "from convllava_edge.export.bundle import staging_folder\n"
            f"with staging_folder(Path({str(out)!r}), False) as tmp:\n"
            "    (tmp / 'vision-fp32.onnx').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=100)
    assert result.returncode == -signal.SIGKILL, result.stderr
    (killed,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".b{B.PARTIAL}")]
    assert (killed / B.OWNER_FILE).is_file() and (killed / "vision-fp32.onnx").is_file()
    reused = owner_marker(tmp_path / f".b{B.OLD}reused", start="0")  # our PID, another start: a recycled PID
    rebooted = owner_marker(tmp_path / f".b{B.PARTIAL}rebooted", boot_id="another-boot")
    live = owner_marker(tmp_path / f".b{B.PARTIAL}live")  # this process: still running
    remote = owner_marker(tmp_path / f".b{B.PARTIAL}remote", host="another-machine", start="0")
    other_out = owner_marker(tmp_path / f".other{B.PARTIAL}x", start="0")  # another bundle's
    unmarked = tmp_path / f".b{B.PARTIAL}mine"  # a user's folder that happens to carry such a name
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("mine")
    with staging_folder(out, force=False) as tmp:
        (tmp / "vision-fp32.onnx").write_bytes(b"whole")
    assert (out / "vision-fp32.onnx").read_bytes() == b"whole" and not (out / B.OWNER_FILE).exists()
    assert not killed.exists() and not reused.exists() and not rebooted.exists()
    assert live.is_dir() and remote.is_dir() and other_out.is_dir()
    assert (unmarked / "notes.txt").read_text() == "mine"


@pytest.mark.timeout(30)
def test_owner_records():
    me = B._owner_record()
    assert me["pid"] == os.getpid() and me["start"] is not None and me["boot_id"] is not None
    assert B.owner_alive(me)
    assert not B.owner_alive({**me, "start": str(int(me["start"]) + 1)})
    assert not B.owner_alive({**me, "boot_id": "0" * 36})
    assert B.owner_alive({**me, "pid_namespace": -1, "start": "0"})  # another container: cannot tell
    assert B.owner_alive({"pid": "12"}) and B.owner_alive({})  # not ours: kept
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = {**me, "pid": child.pid, "start": B._start_time(child.pid)}
    assert B.owner_alive(record)
    child.kill()
    child.wait()
    assert not B.owner_alive(record)


# -- file modes -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_staged_bundle_gets_the_modes_of_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    out = tmp_path / "b"
    with staging_folder(out, force=False) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # mkdtemp's, whatever the umask
        fd = os.open(tmp / "llm.gguf", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "graph.onnx").write_bytes(b"g")
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "llm.gguf").stat().st_mode) == file_mode
    assert stat.S_IMODE((out / "sub" / "graph.onnx").stat().st_mode) == file_mode


@pytest.mark.timeout(600)
def test_force_replaces_a_real_bundle_with_usual_modes(tiny, tiny_bundle, tmp_path, capsys, umask):
    """The one full export here: a real bundle replaced, modes under umask 022, a dead export's leftover gone."""
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    assert (out / "llm-q4_k_m.gguf").is_file()
    dead = owner_marker(tmp_path / f".bundle{B.PARTIAL}dead", start="0")
    umask(0o022)
    code = main(["export", str(tiny.bin_ckpt), "--out", str(out), "--force", "--llm-type", "F16", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["llm"]["type"] == "F16"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, "README.md"]
                                                           + [f["path"] for f in manifest["files"]])
    assert not (out / "llm-q4_k_m.gguf").exists()  # the previous bundle is gone, not merged
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert not dead.exists() and staging_leftovers(tmp_path) == []


# -- config checks before anything native runs ----------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,value,expected", [
    ("rms_norm_eps", -1.0, "key 'rms_norm_eps' = -1.0, expected a finite number with 0 < rms_norm_eps < 1"),
    ("rms_norm_eps", math.nan, "key 'rms_norm_eps' = nan, expected a finite number"),
    ("rms_norm_eps", math.inf, "key 'rms_norm_eps' = inf, expected a finite number"),
    ("rms_norm_eps", 0, "key 'rms_norm_eps' = 0.0, expected a finite number"),
    ("hidden_size", -5, "key 'hidden_size' = -5, expected an integer in 1..65536"),
    ("max_position_embeddings", -1, "key 'max_position_embeddings' = -1, expected an integer in 1..16777216"),
    ("num_attention_heads", 3, "hidden_size 256 is not a multiple of num_attention_heads 3"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("num_hidden_layers", 5000, "key 'num_hidden_layers' = 5000, expected an integer in 1..1024"),
    ("vocab_size", 2 ** 30, "key 'vocab_size' = 1073741824, expected an integer in 1..16777216"),
    ("intermediate_size", 512.5, "key 'intermediate_size' = 512.5 is not an integer"),
    ("hidden_size", "256", "key 'hidden_size' = '256' is not an integer"),
    ("head_dim", 63, "head dimension 63 is odd"),
    ("rope_theta", -10000.0, "key 'rope_theta' = -10000.0, expected a finite number with rope_theta > 0"),
    ("eos_token_id", [2, SPEC.vocab_size], f"key 'eos_token_id' = {SPEC.vocab_size}, expected an integer in "
                                           f"0..{SPEC.vocab_size - 1}"),
    ("pad_token_id", -1, f"key 'pad_token_id' = -1, expected an integer in 0..{SPEC.vocab_size - 1}"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, "key 'rope_scaling.factor' = 0.0"),
    ("mm_hidden_size", 0, "key 'mm_hidden_size' = 0, expected an integer in 1..65536"),
])
def test_bad_llm_config_is_one_line_before_any_work(tiny, tmp_path, capsys, key, value, expected):
    ck = with_config(tiny.bin_ckpt, tmp_path / "ck", **{key: value})
    out = tmp_path / "b"
    line = export_error(capsys, ck, "--out", out)
    assert line.startswith(f"error: {ck / 'config.json'}: ") and expected in line
    assert not out.exists() and staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_the_released_layout_config_passes(tiny):
    llm = LlavaConfig.load(tiny.bin_ckpt).llm
    assert (llm.hidden_size, llm.head_dim, llm.rms_norm_eps) == (SPEC.hidden_size, 64, SPEC.rms_norm_eps)


def _mini_config(**changes) -> dict:
    config = S.llava_config(SPEC, S.TINY_TOWER)
    config.update(model_type="llava_mini_llama", mm_vision_select_layer=-2, compressor_size=1, prefusion_layer_num=2,
                  eos_token_id=[2, 3])
    config.update(changes)
    return config


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key,value,expected", [
    ("rms_norm_eps", -1e-5, "key 'rms_norm_eps' = -1e-05"),
    ("compressor_size", 0, "key 'compressor_size' = 0, expected an integer in 1..64"),
    ("prefusion_layer_num", -1, "key 'prefusion_layer_num' = -1, expected an integer in 0..1024"),
    ("resolution_ratio", "2", "key 'resolution_ratio' = '2' is not an integer"),
    ("max_position_embeddings", -1, "key 'max_position_embeddings' = -1"),
])
def test_bad_llava_mini_config(tmp_path, key, value, expected):
    good = tmp_path / "good"
    good.mkdir()
    S.write_json(good / "config.json", _mini_config())
    assert LlavaMiniConfig.load(good).compressor_size == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    S.write_json(bad / "config.json", _mini_config(**{key: value}))
    with pytest.raises(CheckpointError, match=f"^{bad / 'config.json'}: .*") as info:
        LlavaMiniConfig.load(bad)
    assert expected in str(info.value)
    with pytest.raises(CheckpointError) as info:  # through export: refused before the staging folder exists
        export_bundle(bad, tmp_path / "out", ExportOptions())
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists() and staging_leftovers(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,expected", [
    ({"depths": [2, 2, -3, 2, 2]}, "key 'depths[2]' = -3, expected an integer in 1..1024"),
    ({"hidden_sizes": [32, 48, 0, 96, 128]}, "key 'hidden_sizes[2]' = 0, expected an integer in 1..65536"),
    ({"depths": "2,2,3"}, "key 'depths' = '2,2,3' is not a list"),
    ({"image_size": -256}, "key 'image_size' = -256, expected an integer in 1..16384"),
    ({"patch_size": 0}, "key 'patch_size' = 0, expected an integer in 1..64"),
    ({"num_channels": 1}, "key 'num_channels' = 1, expected 3 (RGB)"),
    ({"depths": [1] * 9, "hidden_sizes": [8] * 9, "num_stages": 9}, "9 stages, expected at most 8"),
])
def test_bad_tower_config(tiny, tmp_path, capsys, change, expected):
    assert TowerConfig.load(tiny.tower).depths == S.TINY_TOWER.depths
    config = json.loads((tiny.tower / "config.json").read_text())
    tower = linked_copy(tiny.tower, tmp_path / "tower", {"config.json": json.dumps({**config, **change}).encode()})
    line = export_error(capsys, tiny.bin_ckpt, "--out", tmp_path / "b", "--vision-tower", tower)
    assert line == f"error: {tower / 'config.json'}: {expected}"
    assert staging_leftovers(tmp_path) == []


@pytest.mark.timeout(30)
def test_tower_config_inferred_from_shards_is_bounded_too():
    with pytest.raises(CheckpointError, match=r"key 'depths\[1\]' = 100000, expected an integer in 1..1024"):
        TowerConfig(depths=(2, 100000), hidden_sizes=(32, 48))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,expected", [
    ({"image_size": -336}, "key 'image_size' = -336, expected an integer in 1..16384"),
    ({"patch_size": 0}, "key 'patch_size' = 0, expected an integer in 1..64"),
    ({"image_size": 65}, "image_size 65 is not a multiple of patch_size"),
    ({"num_attention_heads": 3}, "hidden_size 128 is not a multiple of num_attention_heads 3"),
    ({"hidden_size": "wide"}, "key 'hidden_size' = 'wide' is not an integer"),
])
def test_bad_clip_config(tmp_path, change, expected):
    path = tmp_path / "config.json"
    S.write_json(path, {"model_type": "clip", "vision_config": TINY_CLIP.to_dict()})
    assert read_clip_config(path).image_size == TINY_CLIP.image_size
    S.write_json(path, {"model_type": "clip", "vision_config": {**TINY_CLIP.to_dict(), **change}})
    with pytest.raises(CheckpointError) as info:
        read_clip_config(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


# -- shard integrity ------------------------------------------------------------------------------
def _poison(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    flat = tensor.view(-1)
    flat[0], flat[7], flat[-1] = math.nan, math.inf, -math.inf
    return tensor


def _rewrite_bin(src: Path, dst: Path, key: str, change) -> tuple[Path, Path]:
    """``dst``: links to ``src``'s files, but the shard holding ``key`` rewritten with ``change(tensor)``."""
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    name = index["weight_map"][key]
    state = torch.load(src / name, weights_only=True)
    state[key] = change(state[key])
    folder = linked_copy(src, dst, {name: b""})
    torch.save(state, folder / name)
    return folder, folder / name


def _rewrite_safetensors(src: Path, dst: Path, key: str, change) -> tuple[Path, Path]:
    from safetensors.torch import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = index["weight_map"][key]
    state = load_file(src / name)
    state[key] = change(state[key])
    folder = linked_copy(src, dst, {name: b""})
    save_file(state, str(folder / name), metadata={"format": "pt"})
    return folder, folder / name


@pytest.mark.timeout(120)
def test_nan_in_a_shard_is_one_line_before_any_work(tiny, tmp_path, capsys):
    ck, shard = _rewrite_bin(tiny.bin_ckpt, tmp_path / "ck", TOWER_KEY, _poison)
    out = tmp_path / "b"
    # --vision-tower: the shards' tower copy is compared with it while the checkpoint is opened
    line = export_error(capsys, ck, "--out", out, "--vision-tower", tiny.tower)
    n = math.prod(torch.load(tiny.bin_ckpt / shard.name, weights_only=True)[TOWER_KEY].shape)
    assert line == f"error: tensor {TOWER_KEY!r} in {shard} holds 3 NaN/Inf values (of {n}): the shard is corrupt"
    assert not out.exists() and staging_leftovers(tmp_path) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_every_tensor_read_is_scanned(tiny, tmp_path, fmt):
    rewrite, src = (_rewrite_bin, tiny.bin_ckpt) if fmt == "bin" else (_rewrite_safetensors, tiny.st_ckpt)
    ck, shard = rewrite(src, tmp_path / "ck", LLM_KEY, _poison)
    store = TensorStore(ck)
    assert store.info(LLM_KEY).shape == (SPEC.intermediate_size, SPEC.hidden_size)  # the shape alone is not a read
    assert torch.isfinite(store.get("model.layers.0.mlp.down_proj.weight")).all()
    with pytest.raises(CheckpointError) as info:
        store.get(LLM_KEY)
    assert str(info.value) == (f"tensor {LLM_KEY!r} in {shard} holds 3 NaN/Inf values "
                               f"(of {SPEC.intermediate_size * SPEC.hidden_size}): the shard is corrupt")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_index_total_size_against_the_shards(tiny, tmp_path, fmt):
    src = tiny.bin_ckpt if fmt == "bin" else tiny.st_ckpt
    index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    index = json.loads((src / index_name).read_text())
    total = index["metadata"]["total_size"]
    TensorStore(src)  # the released layout passes
    index["metadata"]["total_size"] = total + 2
    ck = linked_copy(src, tmp_path / "edited", {index_name: json.dumps(index).encode()})
    with pytest.raises(CheckpointError, match=rf"^{ck / index_name}: metadata.total_size is {total + 2} bytes, "
                                              rf"but the shards hold {total} bytes of tensors"):
        TensorStore(ck)
    # A tensor stored wider than the rest (a shard replaced by another export of it): same shapes, more bytes.
    rewrite = _rewrite_bin if fmt == "bin" else _rewrite_safetensors
    ck, _ = rewrite(src, tmp_path / "wider", LLM_KEY, lambda t: t.float())
    extra = SPEC.intermediate_size * SPEC.hidden_size * 2  # bf16 -> fp32: 2 more bytes per value
    with pytest.raises(CheckpointError,
                       match=rf"total_size is {total} bytes, but the shards hold {total + extra} bytes"):
        TensorStore(ck)


@pytest.mark.timeout(60)
def test_safetensors_header_that_does_not_fit_its_bytes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    folder = tmp_path / "ck"
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))  # 4x4 fp32 needs 64 bytes
    with pytest.raises(CheckpointError, match=f"^{path}: cannot read safetensors file"):
        TensorStore(folder).get("w")


@pytest.mark.timeout(60)
def test_bin_storage_larger_than_its_record(tmp_path):
    import pickletools
    import zipfile

    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, good)
    folder = tmp_path / "ck"
    folder.mkdir()
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):  # the storage's element count: the first int after 'cpu'
                ops = list(pickletools.genops(data))
                after = next(i for i, (_, arg, _) in enumerate(ops) if arg == "cpu")
                at = next(pos for op, _, pos in ops[after:] if op.name == "BININT1")
                assert data[at:at + 2] == b"K\x10"  # BININT1 16
                data = data[:at + 1] + bytes([32]) + data[at + 2:]
            dst.writestr(info, data)
    with pytest.raises(CheckpointError, match=rf"^{path}: its tensors' storages declare 128 bytes, its data records "
                                              r"hold 64 \(corrupt pickle\?\)$"):
        TensorStore(folder).get("w")
