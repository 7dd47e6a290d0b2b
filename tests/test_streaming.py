"""Streaming from LitData chunks: the same samples as the files, and bad chunk folders named.

``scripts/prepare_streaming.py`` writes each data module's splits (2 LitData workers, so the items come in two
runs of chunks); the data module with ``streaming`` then gives, for every index and key, exactly the sample the
file-based module gives (every augmentation on), for the four data modules, also through a URL that LitData
downloads into its cache (``local:``, its stand-in for a bucket). Bad input is an error naming the folder, the
chunk file or the item: chunks of another task, a truncated or missing chunk, another format version, an
incomplete index, items out of order, a plain LitData folder, and, through ``lightning fit``, the three cases
the issue names. Training from chunks (weights, resume, DDP) is tests/test_streaming_training.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from detection.data import CocoDataModule
from mbv3_dense.classification.data import ImageFolderDataModule
from mbv3_dense.data.sampling import SampleKey
from mbv3_dense.data.streaming.read import ChunkReader
from mbv3_dense.data.streaming.record import FORMAT_VERSION, RECORD_KEY, StreamingDataError
from mbv3_dense.data.streaming.stage import cache_folder
from segmentation.data import CityscapesDataModule
from segmentation.folder import MaskFolderDataModule
from segmentation.synthetic import MaskFolderSpec, generate_mask_folders

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"


def prepare_streaming() -> Callable[[list[str]], int]:
    spec = importlib.util.spec_from_file_location("prepare_streaming", REPO / "scripts" / "prepare_streaming.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def prepare(root: Path, out: Path, *args: str) -> Path:
    assert prepare_streaming()(["--root", str(root), "--out", str(out), "--num-workers", "2", *args]) == 0
    return out


@pytest.fixture(scope="module")
def mask_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    generate_mask_folders(root, MaskFolderSpec(height=64, width=96, train_images=5, val_images=2, seed=4,
                                               mask_format="color"))
    return root


# kind -> (data module, its arguments with every augmentation on, the preparer's arguments)
KINDS = {
    "classify": (ImageFolderDataModule, {"crop_size": 32, "val_resize_size": 36, "auto_augment": True,
                                         "random_erase": 0.5}, ["--task", "classify"]),
    "detect": (CocoDataModule, {"num_classes": 5, "image_size": 96, "zoom_out_p": 0.5, "photometric_p": 0.5},
               ["--task", "detect"]),
    "segment": (CityscapesDataModule, {"crop_size": (48, 48), "scale_range": (0.5, 2.0)}, ["--task", "segment"]),
    "segment-folders": (MaskFolderDataModule, {"crop_size": (48, 48), "mask_format": "color"},
                        ["--task", "segment", "--layout", "folders", "--mask-format", "color"]),
}


@pytest.fixture(scope="module")
def roots(tiny_imagefolder: Path, tiny_coco: Path, tiny_cityscapes: Path, mask_folders: Path) -> dict[str, Path]:
    return {"classify": tiny_imagefolder, "detect": tiny_coco, "segment": tiny_cityscapes,
            "segment-folders": mask_folders}


@pytest.fixture(scope="module")
def chunks(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind's chunks, written once for the module."""
    out = tmp_path_factory.mktemp("chunks")
    return {kind: prepare(roots[kind], out / kind, *args) for kind, (_, _, args) in KINDS.items()}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_streamed_samples_are_the_files_samples(kind: str, roots: dict[str, Path], chunks: dict[str, Path],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module_class, options, _ = KINDS[kind]
    files = module_class(root=str(roots[kind]), num_workers=0, **options)
    files.setup("fit")
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "cache"))
    for location in (str(chunks[kind]), f"local:{chunks[kind]}"):  # a folder, and a URL through LitData's cache
        streamed = module_class(root=str(tmp_path / "no_files_here"), num_workers=0, streaming=location, **options)
        assert streamed.num_classes == files.num_classes and streamed.class_info == files.class_info
        streamed.setup("fit")
        assert len(streamed.train_set) == len(files.train_set) and len(streamed.val_set) == len(files.val_set)
        for index in range(len(files.train_set)):
            for key in (SampleKey(index, 0, 0), SampleKey(index, 3, 11)):
                assert _same(streamed.train_set[key], files.train_set[key]), (location, key)
        for index in range(len(files.val_set)):
            assert _same(streamed.val_set[index], files.val_set[index]), (location, index)

    record = json.loads((chunks[kind] / "train" / "index.json").read_text())[RECORD_KEY]
    assert record["count"] == len(files.train_set) and record["split"] == "train"
    assert record["format_version"] == FORMAT_VERSION
    assert len(list((chunks[kind] / "train").glob("chunk-*.bin"))) == 2, "one run of chunks per preparer worker"


# ---------------------------------------------------------------- bad chunk folders
@pytest.fixture()
def classify_chunks(chunks: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the classification chunks, to damage."""
    copy = tmp_path / "chunks"
    subprocess.run(["cp", "-r", str(chunks["classify"]), str(copy)], check=True)
    return copy


def edit_index(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def open_classify(folder: Path, split: str = "train") -> ChunkReader:
    return ChunkReader(folder / split, task="classify", layout="imagefolder", split=split)


def test_chunks_of_another_task_are_refused(chunks: dict[str, Path], tiny_coco: Path) -> None:
    with pytest.raises(StreamingDataError, match=r"classify/train: holds classify \(imagefolder\) chunks .*reads "
                                                 r"detect \(coco\) chunks"):
        CocoDataModule(root=str(tiny_coco), num_classes=5, streaming=str(chunks["classify"])).setup("fit")
    with pytest.raises(StreamingDataError, match=r"holds segment \(cityscapes\) chunks .*reads segment \(folders\)"):
        MaskFolderDataModule(root="x", streaming=str(chunks["segment"])).num_classes  # noqa: B018
    with pytest.raises(StreamingDataError, match=r"holds the 'val' split where the 'train' split"):
        ChunkReader(chunks["classify"] / "val", task="classify", layout="imagefolder", split="train")


def test_a_truncated_or_missing_chunk_is_named(classify_chunks: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = sorted((classify_chunks / "train").glob("chunk-*.bin"))[-1]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(StreamingDataError, match=rf"{chunk.name}: chunk file is {len(data) // 2} bytes, index.json "
                                                 rf"says {len(data)}: truncated \(items \d+\.\.\d+\)"):
        open_classify(classify_chunks)
    # Through a URL the sizes are known once the node's copy is made: the download names the object.
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "cache"))
    reader = ChunkReader(f"local:{classify_chunks / 'train'}", task="classify", layout="imagefolder", split="train")
    with pytest.raises(StreamingDataError, match=rf"local:.*train/{chunk.name}: {len(data) // 2} bytes, index.json "
                                                 rf"says {len(data)}: the object is truncated or changed"):
        reader.open()
    chunk.unlink()
    with pytest.raises(StreamingDataError, match=rf"local:.*train/{chunk.name}: cannot be fetched"):
        reader.open()
    with pytest.raises(StreamingDataError, match=rf"{chunk.name}: chunk file missing"):
        open_classify(classify_chunks)


def test_a_url_is_copied_once_per_node_and_again_after_it_changed(classify_chunks: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "cache"))
    url = f"local:{classify_chunks / 'train'}"
    first = ChunkReader(url, task="classify", layout="imagefolder", split="train").open()
    copy = cache_folder(url)
    assert copy.is_relative_to(tmp_path / "cache")
    copied = {p.name: p.stat().st_mtime_ns for p in copy.glob("chunk-*.bin")}
    assert len(copied) == len(first.chunks)
    ChunkReader(url, task="classify", layout="imagefolder", split="train").open()  # another process of the node
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("chunk-*.bin")} == copied, "copied twice"

    edit_index(classify_chunks / "train", lambda index: index[RECORD_KEY].update(source="prepared again"))
    again = ChunkReader(url, task="classify", layout="imagefolder", split="train").open()
    assert again.record.source == "prepared again"
    assert json.loads((copy / "index.json").read_text())[RECORD_KEY]["source"] == "prepared again"
    assert all(p.stat().st_mtime_ns != copied[p.name] for p in copy.glob("chunk-*.bin")), "a stale copy was kept"
    assert again[3]["index"] == 3


def test_another_format_version_an_incomplete_index_and_a_plain_litdata_folder_are_refused(
        classify_chunks: Path) -> None:
    train = classify_chunks / "train"
    edit_index(train, lambda index: index[RECORD_KEY].update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(StreamingDataError, match=rf"train: chunks written by format version {FORMAT_VERSION + 1} of "
                                                 rf"scripts/prepare_streaming.py; this code reads version "
                                                 rf"{FORMAT_VERSION}"):
        open_classify(classify_chunks)
    edit_index(train, lambda index: index[RECORD_KEY].update(format_version=FORMAT_VERSION))
    open_classify(classify_chunks)

    edit_index(train, lambda index: index["chunks"].pop())
    with pytest.raises(StreamingDataError, match=r"index.json lists \d+ items in 1 chunks, the preparer wrote \d+: an "
                                                 r"incomplete folder"):
        open_classify(classify_chunks)

    val = classify_chunks / "val"
    edit_index(val, lambda index: index.pop(RECORD_KEY))
    with pytest.raises(StreamingDataError, match=r"val: LitData chunks without the preparer's record"):
        open_classify(classify_chunks, "val")
    (val / "index.json").unlink()
    with pytest.raises(StreamingDataError, match=r"val: no index.json: not a folder of LitData chunks"):
        open_classify(classify_chunks, "val")
    with pytest.raises(StreamingDataError, match=r"nowhere/train: no such chunk folder"):
        ImageFolderDataModule(root="x", streaming=str(classify_chunks / "nowhere")).setup("fit")


def test_items_out_of_the_preparers_order_are_named(classify_chunks: Path) -> None:
    train = classify_chunks / "train"
    edit_index(train, lambda index: index["chunks"].reverse())  # the files are intact, the order is not
    reader = open_classify(classify_chunks)
    with pytest.raises(StreamingDataError, match=rf"{reader.chunks[0].filename} item 0: holds item \d+: the chunks "
                                                 r"are not in the preparer's order"):
        reader[0]


def test_detection_chunks_need_the_min_box_size_they_were_cleaned_with(chunks: dict[str, Path],
                                                                     tiny_coco: Path) -> None:
    with pytest.raises(StreamingDataError, match=r"boxes were cleaned with min_box_size 1.0 .*this module has "
                                                 r"min_box_size 4.0"):
        CocoDataModule(root=str(tiny_coco), num_classes=5, min_box_size=4.0, streaming=str(chunks["detect"])).setup(
            "fit")


def test_the_preparer_refuses_a_used_folder_and_a_bucket(tiny_imagefolder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")
    main = prepare_streaming()
    assert main(["--task", "classify", "--root", str(tiny_imagefolder), "--out", str(out)]) == 2
    assert "train: the folder is not empty (remove it, or pass --overwrite)" in capsys.readouterr().err
    assert main(["--task", "classify", "--root", str(tiny_imagefolder), "--out", str(out), "--overwrite"]) == 2
    assert "train: not a chunk folder (notes.txt...); not removed" in capsys.readouterr().err
    assert main(["--task", "classify", "--root", str(tiny_imagefolder), "--out", "s3://bucket/x"]) == 2
    assert "the preparer writes to a local (or mounted) folder" in capsys.readouterr().err
    assert main(["--task", "classify", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing/train: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["another task", "truncated chunk", "another version"])
def test_lightning_fit_names_the_bad_chunk_folder(damage: str, chunks: dict[str, Path], tmp_path: Path) -> None:
    """Through the CLI, as a user meets them: one line, ``error: <folder or chunk>: <what is wrong>``."""
    streaming = tmp_path / "chunks"
    subprocess.run(["cp", "-r", str(chunks["classify" if damage != "another task" else "detect"]), str(streaming)],
                   check=True)
    if damage == "truncated chunk":
        chunk = sorted((streaming / "train").glob("chunk-*.bin"))[0]
        chunk.write_bytes(chunk.read_bytes()[:-100])
        expected = rf"error: .*{chunk.name}: chunk file is \d+ bytes, index.json says \d+: truncated"
    elif damage == "another version":
        edit_index(streaming / "train", lambda index: index[RECORD_KEY].update(format_version=0))
        expected = r"error: .*train: chunks written by format version 0 of scripts/prepare_streaming.py"
    else:
        expected = r"error: .*train: holds detect \(coco\) chunks .*reads classify \(imagefolder\) chunks"
    result = subprocess.run(
        [str(LIGHTNING), "fit", "-c", "configs/mobilenet_v3_small_imagenet.yaml", "-c", "configs/demo/classify.yaml",
         "--data.root", str(tmp_path / "no_files"), "--data.streaming", str(streaming), "--data.num_workers", "0",
         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.fast_dev_run", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(expected, result.stderr), result.stderr[-3000:]
