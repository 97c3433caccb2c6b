"""Output paths checked before work and written atomically; results matched to a ground truth by name."""

import json
import os
import stat
from pathlib import Path

import pytest

from regionclip.errors import BadAnnotations, BadOutput
from regionclip.evaluate import check_split, load_ground_truth, write_report
from regionclip.outputs import (annotated_paths, atomic_write_json, atomic_write_text, check_output_dir,
                                check_output_file, relative_paths)
from regionclip.results import ImageIndex, category_ids_for, image_ids_for, resolve_records

needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@needs_proc
def test_output_file_under_proc_is_refused():
    with pytest.raises(BadOutput, match=r"/proc/x\.json: cannot create files in /proc"):
        check_output_file("/proc/x.json")
    with pytest.raises(BadOutput, match="cannot create folders in /proc"):
        check_output_file("/proc/new/x.json")
    with pytest.raises(BadOutput, match="cannot create"):
        check_output_dir("/proc/new")


def test_wrong_kinds_of_path(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(BadOutput, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(BadOutput, match=r"f\.txt is a file, not a folder"):
        check_output_file(a_file / "out.json")
    with pytest.raises(BadOutput, match=r"--save-dir .*f\.txt is a file, not a folder"):
        check_output_dir(a_file, "--save-dir")
    with pytest.raises(BadOutput, match="is a file, not a folder"):
        check_output_dir(a_file / "sub" / "dir")


def test_good_paths_pass_and_leave_nothing_behind(tmp_path):
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    check_output_file(tmp_path / "x.json")
    check_output_dir(tmp_path / "out" / "sub")
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_replace_with_plain_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "d" / "r.json", {"a": float("nan"), "b": [1, 2]})
        assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        atomic_write_text(path, "replaced")
        assert path.read_text() == "replaced"
        report = write_report({"overall": {"AP": 1.0}}, tmp_path / "report.json")
        assert stat.S_IMODE(report.stat().st_mode) == 0o644  # was 0600 (tempfile's mode)
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["r.json"]  # no temporary left


def test_atomic_write_to_a_folder_is_one_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(BadOutput, match="cannot write"):
        atomic_write_text(tmp_path / "taken", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_annotated_paths_keep_names_apart_and_extensions(tmp_path):
    inputs = [tmp_path / "x" / "a.jpg", tmp_path / "y" / "a.jpg", tmp_path / "y" / "b.PNG", tmp_path / "y" / "c.gif"]
    targets = annotated_paths(inputs, tmp_path / "out")
    parent, shown = relative_paths(inputs)
    assert parent == tmp_path and targets == [tmp_path / "out" / "x" / "a.jpg", tmp_path / "out" / "y" / "a.jpg",
                       tmp_path / "out" / "y" / "b.PNG", tmp_path / "out" / "y" / "c.gif.jpg"]
    assert [str(p) for p in shown] == ["x/a.jpg", "y/a.jpg", "y/b.PNG", "y/c.gif"]
    # One folder of inputs lands directly in the save folder.
    targets = annotated_paths([tmp_path / "y" / "a.jpg", tmp_path / "y" / "b.png"], "out")
    assert targets == [Path("out/a.jpg"), Path("out/b.png")]
    assert relative_paths([tmp_path / "y" / "a.jpg", tmp_path / "y" / "b.png"])[1] == [Path("a.jpg"), Path("b.png")]
    # A literal "c.gif.jpg" beside "c.gif" still gets its own file.
    targets = annotated_paths([tmp_path / "c.gif", tmp_path / "c.gif.jpg"], tmp_path / "o")
    assert len(set(targets)) == 2


def test_annotated_paths_never_overwrite_an_input(tmp_path):
    with pytest.raises(BadOutput, match="would overwrite input"):
        annotated_paths([tmp_path / "a.jpg"], tmp_path)


@pytest.fixture
def gt(tmp_path):
    data = {
        "images": [{"id": 10, "file_name": "val/a.jpg", "width": 50, "height": 40},
                   {"id": 11, "file_name": "train/a.jpg", "width": 50, "height": 40},
                   {"id": 12, "file_name": "b.jpg", "width": 50, "height": 40}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 20, 10]}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return load_ground_truth(path)


def test_image_index_matches_longest_trailing_path_then_base_name(gt):
    index = ImageIndex(gt)
    assert index.lookup("/data/coco/val/a.jpg") == 10
    assert index.lookup("train/a.jpg") == 11
    assert index.lookup("elsewhere/b.jpg") == 12  # base name, unique
    assert index.lookup("other/a.jpg") is None  # two images named a.jpg: no guess
    assert index.lookup("c.jpg") is None
    assert image_ids_for(gt, ["x/val/a.jpg", "b.jpg"]) == [10, 12]
    with pytest.raises(BadAnnotations, match=r"1 of 2 images match no file_name .*first: c\.jpg"):
        image_ids_for(gt, ["b.jpg", "c.jpg"])


def test_category_ids_for_names(gt):
    assert category_ids_for(gt, ["dog", "bird", "cat"]) == ({"dog": 9, "cat": 7}, ["bird"])


def test_resolve_records_names_win_over_ids(gt):
    records = [{"image": "imgs/val/a.jpg", "image_id": 0, "label": "cat", "category_id": 1, "bbox": [0, 0, 1, 1],
                "score": 0.5},
               {"image_id": 12, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 0.5}]
    out = resolve_records(gt, records)
    assert [(r["image_id"], r["category_id"]) for r in out] == [(10, 7), (12, 9)]
    assert records[0]["image_id"] == 0  # the input is not modified


def test_resolve_records_unresolvable_is_one_error(gt):
    rec = {"bbox": [0, 0, 1, 1], "score": 0.5}
    with pytest.raises(BadAnnotations, match=r"2 results name images that match no file_name .*first: z\.jpg"):
        resolve_records(gt, [{**rec, "image": "z.jpg", "label": "cat"}, {**rec, "image": "z.jpg", "label": "cat"}])
    with pytest.raises(BadAnnotations, match=r"1 results have labels that are not categories .*first: 'bird'"):
        resolve_records(gt, [{**rec, "image_id": 10, "label": "bird"}])


def test_check_split_against_ground_truth_and_vocabulary(gt):
    assert check_split(gt, {"base": ["cat"], "novel": ["dog"]}) == {"base": [7], "novel": [9]}
    assert check_split(gt, {"base": ["cat"], "novel": ["dog"]}, vocabulary=["dog"])  # novel names alone: fine
    with pytest.raises(BadAnnotations, match="categories not in the ground truth .*'cow'"):
        check_split(gt, {"base": ["cat"], "novel": ["cow"]})
    with pytest.raises(BadAnnotations, match="none of the split's categories is in the vocabulary"):
        check_split(gt, {"base": ["cat"], "novel": ["dog"]}, vocabulary=["bird"])
