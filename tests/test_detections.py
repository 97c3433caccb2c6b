import pytest
import torch

from regionclip import Detections
from regionclip.errors import BadInput


def make(n=3):
    boxes = torch.tensor([[0, 0, 10, 20], [5, 5, 15, 25], [1, 2, 3, 4]], dtype=torch.float32)[:n]
    return Detections(boxes, torch.tensor([0.9, 0.5, 0.1])[:n], torch.tensor([0, 1, 1])[:n], ("cat", "dog"))


def test_validation_messages_name_the_shape():
    with pytest.raises(BadInput, match=r"xyxy must have shape \(N, 4\), but got \(3,\)"):
        Detections(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(BadInput, match="scores must have shape"):
        Detections(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(BadInput, match="out of range"):
        Detections(torch.zeros(1, 4), torch.zeros(1), torch.tensor([2]), ("a", "b"))


def test_indexing_int_slice_mask_and_list():
    d = make()
    assert len(d[1]) == 1 and d[1].names == ["dog"]
    assert len(d[-1]) == 1 and d[-1].names == ["dog"]
    assert len(d[:2]) == 2
    assert d[d.scores > 0.3].names == ["cat", "dog"]
    assert d[[2, 0]].scores.tolist() == pytest.approx([0.1, 0.9])
    with pytest.raises(BadInput, match="mask must have shape"):
        d[torch.tensor([True, False])]


def test_records_are_coco_xywh_with_names():
    rec = make().to_records(image="a.jpg", image_id=7, category_ids={"cat": 17, "dog": 18})
    assert rec[1] == {"bbox": [5.0, 5.0, 10.0, 20.0], "score": 0.5, "category_id": 18,
                      "label": "dog", "image_id": 7, "image": "a.jpg"}
    # Without a mapping: 1-based vocabulary positions, as COCO ids start at 1.
    assert [r["category_id"] for r in make().to_records()] == [1, 2, 2]


def test_records_leave_out_labels_the_mapping_lacks():
    rec = make().to_records(image_id=3, category_ids={"dog": 5})
    assert [(r["label"], r["category_id"]) for r in rec] == [("dog", 5), ("dog", 5)]
    assert make().to_records(category_ids={}) == []


def test_records_load_in_pycocotools():
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {"images": [{"id": 3, "file_name": "a.jpg", "width": 40, "height": 40}], "annotations": [],
                  "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    gt.createIndex()
    res = gt.loadRes(make().to_records(image="a.jpg", image_id=3))
    assert sorted(res.anns[i]["category_id"] for i in res.anns) == [1, 2, 2]


def test_empty():
    d = Detections.empty(("a",))
    assert len(d) == 0 and d.to_records() == [] and d.names == []
