"""What a new user met at the command line (issue 21): make-shapes over a folder, --model on a
training folder, output cut at 80 columns when piped, warnings nobody can act on."""

from __future__ import annotations

from test_cli import run

SMALL = ["--train", "1", "--val", "1", "--min-side", "64", "--max-side", "64", "--captions-per-image", "0"]


def test_make_shapes_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(["make-shapes", str(out), *SMALL], capsys)
    assert code != 0 and "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing drawn
    code, _, err = run(["make-shapes", str(out), *SMALL, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "annotations" / "instances_train.json").is_file() and (out / "notes.txt").read_text() == "mine"
    code, _, err = run(["make-shapes", str(tmp_path / "new"), *SMALL], capsys)  # a new folder needs no flag
    assert code == 0, err
