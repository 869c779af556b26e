"""--force never deletes or changes what a command reads: every writer refuses an output that is, contains or lies
inside one of its inputs (real paths: symlinks resolved), in one sentence and before any work; and replacing an
output leaves nothing of the old one behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgevl.artifact.folder import hash_files, refuse_overlap, staged_folder
from edgevl.cli import main
from edgevl.errors import EdgevlError


def _snapshot(folder: Path) -> dict[str, str]:
    return hash_files(folder) | {p.relative_to(folder).as_posix(): "dir" for p in folder.rglob("*") if p.is_dir()}


def _refused(capsys, argv: list, *fragments: str) -> str:
    code = main([str(a) for a in argv])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("["))
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def place(tmp_path, tiny_model_dir, tiny_artifact):
    """Copies of the checkpoint and the artifact in their own parent folders (the tests point outputs at those
    parents), with links to them and to their parents."""
    ckpt = tmp_path / "models" / "ckpt"
    art = tmp_path / "exports" / "art"
    shutil.copytree(tiny_model_dir, ckpt)
    shutil.copytree(tiny_artifact, art)
    for name, target in (("ckpt-link", ckpt), ("models-link", ckpt.parent), ("art-link", art),
                         ("exports-link", art.parent)):
        (tmp_path / name).symlink_to(target, target_is_directory=True)
    return tmp_path


# output -> (what the sentence says, the input it names): the output is the input, its parent, inside it, and each
# through a symlink
OVERLAPS = {
    "{input}": "is",
    "{input}/..": "contains",
    "{input}/sub/out": "is inside",
    "{link}": "is",
    "{parent_link}": "contains",
    "{link}/out": "is inside",
}


def _outputs(root: Path, input_path: Path, link: str, parent_link: str) -> list[tuple[Path, str]]:
    values = {"input": input_path, "link": root / link, "parent_link": root / parent_link}
    return [(Path(pattern.format(**values)), relation) for pattern, relation in OVERLAPS.items()]


@pytest.mark.parametrize("force", [True, False])
def test_export_never_replaces_or_writes_into_its_checkpoint(place, capsys, force):
    ckpt = place / "models" / "ckpt"
    before = _snapshot(place / "models")
    for out, relation in _outputs(place, ckpt, "ckpt-link", "models-link"):
        _refused(capsys, ["export", ckpt, "-o", out, *(["--force"] if force else [])],
                 f"{relation} the checkpoint", "never replaces or writes into what it reads")
        _refused(capsys, ["export", place / "ckpt-link", "-o", out, "--force"], f"{relation} the checkpoint")
    assert _snapshot(place / "models") == before
    assert not list(place.rglob(".*partial*")) and not list(place.rglob(".*old-*"))


def test_export_refuses_the_blobs_a_cached_checkpoint_links_to(tmp_path, tiny_model_dir, capsys):
    """A hub-cache snapshot: its files are symlinks into a blobs folder; that folder is the checkpoint too."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        shutil.copy2(file, blobs / file.name)
        (snapshot / file.name).symlink_to(blobs / file.name)
    before = _snapshot(blobs)
    _refused(capsys, ["export", snapshot, "-o", blobs, "--force"], "contains the checkpoint", "is part of it")
    _refused(capsys, ["export", snapshot, "-o", blobs / "config.json", "--force"], "is the checkpoint")
    assert _snapshot(blobs) == before


def test_quantize_never_replaces_or_writes_into_its_inputs(place, capsys, photos):
    art = place / "exports" / "art"
    before = _snapshot(place / "exports")
    for out, relation in _outputs(place, art, "art-link", "exports-link"):
        _refused(capsys, ["quantize", art, "-o", out, "--recipe", "fp16", "--force"], f"{relation} the artifact")
        _refused(capsys, ["quantize", place / "art-link", "-o", out, "--recipe", "int8", "--force"],
                 f"{relation} the artifact")
    assert _snapshot(place / "exports") == before
    # the calibration data is read too: a folder of images and the images a .jsonl names
    calib = place / "cal" / "calib"
    calib.mkdir(parents=True)
    shutil.copy2(photos["astronaut"], calib / "a.png")
    for out, relation in ((calib, "is"), (calib / "out", "is inside"), (calib.parent, "contains")):
        _refused(capsys, ["quantize", art, "-o", out, "--recipe", "fp16", "--calib", calib, "--force"],
                 f"{relation} the calibration data")
    listed = place / "listed" / "b.png"
    listed.parent.mkdir()
    shutil.copy2(photos["coffee"], listed)
    jsonl = place / "calib.jsonl"
    jsonl.write_text(f'{{"image": "{listed}", "prompt": "hi"}}\n')
    _refused(capsys, ["quantize", art, "-o", listed.parent, "--recipe", "fp16", "--calib", jsonl, "--force"],
             "contains a calibration image")
    assert (calib / "a.png").read_bytes() == photos["astronaut"].read_bytes() and listed.exists()
    assert _snapshot(place / "exports") == before


def test_triton_never_replaces_or_writes_into_its_artifact(place, capsys):
    art = place / "exports" / "art"
    before = _snapshot(place / "exports")
    for out, relation in _outputs(place, art, "art-link", "exports-link"):
        for flags in (["--force"], ["--force", "--copy"], []):
            _refused(capsys, ["triton", art, "-o", out, *flags], f"the repository {Path(out).resolve()} {relation} "
                                                                  f"the artifact")
    assert _snapshot(place / "exports") == before


def test_bench_reports_never_overwrite_what_bench_reads(place, capsys, photos):
    art = place / "exports" / "art"
    before = _snapshot(place / "exports")
    image = place / "photo.png"
    shutil.copy2(photos["astronaut"], image)
    for flag in ("--json", "--markdown", "--plot"):
        _refused(capsys, ["bench", art, flag, art / "manifest.json"], "the report", "is inside the artifact")
        _refused(capsys, ["bench", art, flag, place / "art-link" / "new.json"], "is inside the artifact")
        _refused(capsys, ["bench", art, "--image", image, flag, image], "is the image")
    assert _snapshot(place / "exports") == before and image.read_bytes() == photos["astronaut"].read_bytes()


@pytest.mark.parametrize("relation,make", [
    ("is", lambda a: a), ("contains", lambda a: a.parent), ("is inside", lambda a: a / "x" / "y"),
])
def test_refuse_overlap_names_the_relation(tmp_path, relation, make):
    src = tmp_path / "in" / "src"
    src.mkdir(parents=True)
    with pytest.raises(EdgevlError, match=f"the output {make(src)} {relation} the source {src}"):
        refuse_overlap(make(src), [("the source", src)])
    refuse_overlap(tmp_path / "in" / "src2", [("the source", src)])     # a sibling whose name starts alike
    refuse_overlap(tmp_path / "other", [("the source", src)])


def test_staged_folder_refuses_overlapping_inputs_itself(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(EdgevlError, match="is inside the input"):
        with staged_folder(src / "out", force=True, inputs=[("the input", src)]):
            pytest.fail("the block must not run")
    assert list(src.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "folder", "link to a file", "empty folder"])
def test_force_replaces_an_existing_output_without_leaving_the_old_one(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("old")
    elif kind == "folder":
        (out / "sub").mkdir(parents=True)
        (out / "sub" / "f").write_text("old")
    elif kind == "empty folder":
        out.mkdir()
    else:
        (tmp_path / "target").write_text("old")
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "target")
    with pytest.raises(EdgevlError, match="already exists; pass --force"):
        with staged_folder(out):
            pass
    with staged_folder(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    written = out.resolve()
    assert (written / "new").read_text() == "new" and sorted(os.listdir(written)) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] if kind != "link to a file"
                                                                   else ["link", "target"])


def test_export_over_an_existing_file_with_force_leaves_nothing_else(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "existing_file"
    out.write_text("not an export")
    assert main(["export", str(tiny_model_dir), "-o", str(out), "--force"]) == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_file"]
