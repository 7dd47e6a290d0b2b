"""What ``--data.predict_images`` accepts, how output names and image ids are chosen, and the writer's guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbv3_dense.data.listing import ImageListError, list_images
from mbv3_dense.data.predict import PredictImageDataset, collate_predict, read_for_prediction


def png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 7, np.uint8)).save(path)
    return path


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path):
    for rel in ("b.png", "a/z.png", "a/c.PNG", ".hidden/x.png", "notes.txt"):
        png(tmp_path / rel) if rel.lower().endswith(".png") else (tmp_path / rel).write_text("x")
    listed = list_images(tmp_path)
    assert [f.name for f in listed.files] == ["a/c", "a/z", "b"]
    assert [f.image_id for f in listed.files] == [1, 2, 3]  # names are not numbers: running ids
    assert [p.name for p in listed.ignored] == ["notes.txt"]


def test_glob_and_list_file(tmp_path: Path):
    for rel in ("x/1.png", "x/2.png", "y/3.png"):
        png(tmp_path / rel)
    assert [f.name for f in list_images(f"{tmp_path}/*/[12].png").files] == ["1", "2"]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\ny/3.png\n\n" + str(tmp_path / "x/1.png") + "\n")
    files = list_images(listing).files
    assert [f.path for f in files] == [tmp_path / "x/1.png", tmp_path / "y/3.png"]
    assert [f.image_id for f in files] == [1, 3]  # numeric file names are the COCO image ids
    assert [f.name for f in files] == ["x/1", "y/3"]


def test_names_that_differ_only_by_extension_stay_apart(tmp_path: Path):
    png(tmp_path / "a.png")
    Image.open(tmp_path / "a.png").save(tmp_path / "a.jpg")
    assert sorted(f.name for f in list_images(tmp_path).files) == ["a_jpg", "a_png"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no image files to predict on"),
    (lambda p: p.with_suffix(".txt").write_text("\n"), "the list file names no image"),
    (lambda p: None, "no such file or folder"),
    (lambda p: p.with_suffix(".csv").write_text("a"), "neither an image"),
])
def test_nothing_to_predict_on_is_an_error_naming_the_path(tmp_path: Path, make, message):
    target = tmp_path / "input"
    make(target)
    path = next((p for p in tmp_path.iterdir()), target)
    with pytest.raises(ImageListError, match=message) as err:
        list_images(path)
    assert str(path) in str(err.value)


def test_missing_listed_file_is_skipped_not_fatal(tmp_path: Path):
    listing = tmp_path / "list.txt"
    png(tmp_path / "ok.png")
    listing.write_text("ok.png\ngone.png\n")
    files = list_images(listing).files
    batch = collate_predict([PredictImageDataset(files)[i] for i in range(len(files))])
    assert [f.path.name for f in batch.files] == ["ok.png"]
    assert [(s.path.name, s.reason) for s in batch.skipped] == [("gone.png", "missing")]
    assert str(tmp_path / "gone.png") in batch.skipped[0].message


def test_modes_are_converted_with_a_note(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    array, note = read_for_prediction(tmp_path / "c.jpg")
    assert array.shape == (5, 4, 3) and "CMYK" in note and str(tmp_path / "c.jpg") in note
    array, note = read_for_prediction(tmp_path / "g.png")
    assert note is None and (array[..., 0] == rgb[..., 0]).all() and (array[..., 2] == rgb[..., 0]).all()


def test_writer_refuses_an_earlier_run_unless_overwrite(tmp_path: Path):
    from segmentation.predict import SegmentationWriter

    files = list_images(png(tmp_path / "in/a.png")).files
    batch = collate_predict([PredictImageDataset(files)[0]])
    out = tmp_path / "out"
    first = SegmentationWriter(out, pictures=False)
    first.open()
    first.write(batch, [torch.zeros(6, 8, dtype=torch.uint8)])
    summary = first.close()
    assert summary["written"] == 1 and json.loads((out / "summary.json").read_text())["written"] == 1
    (out / "mine.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="earlier run"):
        SegmentationWriter(out).open()
    again = SegmentationWriter(out, overwrite=True, pictures=False)
    again.open()
    assert not (out / "labelIds/a.png").exists() and (out / "mine.txt").read_text() == "kept"
    again.close()


def test_writer_streams_each_batch_to_disk(tmp_path: Path):
    from mbv3_dense.classification.predict import ClassificationWriter, TopK

    png(tmp_path / "in/a.png")
    png(tmp_path / "in/b.png")
    files = list_images(tmp_path / "in").files
    dataset = PredictImageDataset(files)
    writer = ClassificationWriter(tmp_path / "out", pictures=False, class_info={"names": ["x", "y"]})
    writer.open()
    top = TopK(torch.tensor([0.75, 0.25]), torch.tensor([1, 0]))
    writer.write(collate_predict([dataset[0]]), [top])
    rows = (tmp_path / "out/classifications.jsonl").read_text().splitlines()  # on disk before the run ends
    assert len(rows) == 1 and json.loads(rows[0])["top5"][0] == {"index": 1, "class": "y", "probability": 0.75}
    writer.write(collate_predict([dataset[1]]), [top])
    assert len((tmp_path / "out/classifications.jsonl").read_text().splitlines()) == 2
    assert writer.close()["written"] == 2


def test_lightning_predict_keeps_no_predictions_in_memory():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "predict", "-c",
                           str(root / "configs/lraspp_mobilenet_v3_small_cityscapes.yaml"), "--print_config"],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "return_predictions: false" in proc.stdout
    assert "writer:" in proc.stdout and "overwrite: false" in proc.stdout and "pictures: true" in proc.stdout
