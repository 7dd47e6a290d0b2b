"""The PNG path of mbv3_dense.data.image_io: libspng (pyspng) behind the CRC and completeness checks, PIL as the strict
fallback, and decoding that stops after the rows a crop needs."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbv3_dense.data import image_io
from mbv3_dense.data.image_io import ImageReadError, png_layout, read_image_rgb, read_label_png

REPO = Path(__file__).resolve().parents[1]


def street(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A noisy image with structure (smooth gradients plus noise), so that PNG uses several filter types."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, start, length)`` of each chunk."""
    found, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        found.append((data[pos + 4:pos + 8], pos, length))
        pos += 12 + length
    return found


@pytest.fixture
def spng_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Counts libspng decodes (the shape each returned), so a test knows which decoder ran."""
    calls: list[tuple[int, int]] = []
    load = image_io.pyspng.load

    def counted(data: bytes, fmt: str | None = None) -> np.ndarray:
        array = load(data, fmt)
        calls.append(array.shape[:2])
        return array

    monkeypatch.setattr(image_io.pyspng, "load", counted)
    return calls


@pytest.mark.parametrize("mode", [None, "L", "RGBA", "P", "LA"])
def test_libspng_decodes_8_bit_pngs_to_pils_pixels(tmp_path: Path, mode: str | None,
                                                   spng_calls: list) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(street(40, 56), mode, **({"transparency": 7} if mode == "P" else {})))
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(read_image_rgb(path), expected)
    assert spng_calls == [(40, 56)]


def test_a_crop_reads_only_the_rows_it_needs_with_the_pixels_of_a_full_decode(tmp_path: Path,
                                                                              spng_calls: list) -> None:
    image = street(90, 64, seed=1)
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(image, compress_level=9))
    ids = (np.arange(90 * 64) % 34).astype(np.uint8).reshape(90, 64)
    label = tmp_path / "ids.png"
    Image.fromarray(ids).save(label)
    for rows in (1, 17, 89):
        assert np.array_equal(read_image_rgb(path, rows=rows), image[:rows])
        assert np.array_equal(read_label_png(label, rows=rows), ids[:rows])
    for rows in (90, 500, None):
        assert np.array_equal(read_image_rgb(path, rows=rows), image)
        assert np.array_equal(read_label_png(label, rows=rows), ids)
    assert [r for r, _ in spng_calls] == [1, 1, 17, 17, 89, 89] + [90] * 6
    # Interlaced (Adam7) rows are not stored top to bottom: the whole image, which holds the rows asked for.
    interlaced = tmp_path / "interlaced.png"
    interlaced.write_bytes(adam7_png(image))
    assert png_layout(interlaced.read_bytes()).interlaced
    assert np.array_equal(read_image_rgb(interlaced), image)
    assert np.array_equal(read_image_rgb(interlaced, rows=17), image)
    assert spng_calls[-2:] == [(90, 64), (90, 64)]


def adam7_png(rgb: np.ndarray) -> bytes:
    """``rgb`` as an interlaced (Adam7) PNG, written with zlib (PIL and OpenCV write none)."""
    height, width = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]
    stream = b"".join(b"\x00" + row.tobytes()  # filter type 0 (None) before each row of each pass
                      for y0, x0, dy, dx in passes if y0 < height and x0 < width for row in rgb[y0::dy, x0::dx])
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 1])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    return image_io.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(stream)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("where", ["first IDAT", "last IDAT", "IDAT checksum", "IHDR"])
def test_a_damaged_png_goes_to_pil_which_raises_naming_the_file(tmp_path: Path, where: str,
                                                                spng_calls: list) -> None:
    """A flipped byte the CRCs catch: libspng would decode some of these to wrong pixels without an error."""
    image = street(96, 96, seed=2)
    data = bytearray(png_bytes(image))
    idats = [(start, length) for kind, start, length in chunks(bytes(data)) if kind == b"IDAT"]
    position = {"first IDAT": idats[0][0] + 8 + idats[0][1] // 2, "last IDAT": idats[-1][0] + 8 + idats[-1][1] - 3,
                "IDAT checksum": idats[0][0] + 8 + idats[0][1] + 1, "IHDR": 8 + 8 + 10}[where]
    data[position] ^= 0x24
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    assert png_layout(bytes(data)) is None
    if where == "IDAT checksum":  # the pixels are intact and PIL, the reference, decodes them
        assert np.array_equal(read_image_rgb(path), image)
    else:
        with pytest.raises(ImageReadError, match="damaged.png"):
            read_image_rgb(path)
        with pytest.raises(ImageReadError, match="damaged.png"):
            read_image_rgb(path, rows=8)  # damage below the rows asked for still counts: the file is checked whole
    assert spng_calls == []


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.95])  # PIL, the reference, needs the pixels, not IEND
def test_a_truncated_png_raises_naming_it_with_or_without_rows(tmp_path: Path, cut: float) -> None:
    data = png_bytes(street(64, 80, seed=3))
    path = tmp_path / "cut.png"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image_rgb(path)
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image_rgb(path, rows=4)
    ids = png_bytes(np.random.default_rng(3).integers(0, 34, (64, 80), dtype=np.uint8))
    path.write_bytes(ids[:int(len(ids) * cut)])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_label_png(path, rows=4)


def test_data_after_iend_and_exif_orientation_take_pils_path(tmp_path: Path, spng_calls: list) -> None:
    image = street(24, 40, seed=4)
    path = tmp_path / "trailing.png"
    path.write_bytes(png_bytes(image) + b"\x00" * 16)
    assert png_layout(path.read_bytes()) is None
    assert np.array_equal(read_image_rgb(path), image)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    rotated = tmp_path / "rotated.png"
    rotated.write_bytes(png_bytes(image, exif=exif.tobytes()))
    assert png_layout(rotated.read_bytes()).exif
    assert read_image_rgb(rotated).shape == (40, 24, 3)
    assert spng_calls == []


def test_png_layout_reads_the_header_of_an_intact_file() -> None:
    layout = png_layout(png_bytes(street(12, 34), "P"))
    assert (layout.width, layout.height, layout.bit_depth, layout.colour_type, layout.interlaced, layout.exif) == \
        (34, 12, 8, 3, False, False)
    assert png_layout(b"not a png") is None
    assert png_layout(image_io.PNG_SIGNATURE) is None


def _benchmark_script() -> object:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("benchmark_training", REPO / "scripts" / "benchmark_training.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_crop_rows_cover_every_row_the_training_crop_reads() -> None:
    """Rows below ``crop_rows`` can be anything: the crop (image and mask) comes out the same."""
    from mbv3_dense.data.sampling import SampleKey, sample_randomness
    from segmentation.transforms import train_transform

    crop_rows = _benchmark_script().crop_rows
    transform = train_transform(crop_size=(40, 40), scale_range=(0.5, 2.0))
    height, width = 64, 96
    image, mask = street(height, width, seed=5), np.random.default_rng(5).integers(0, 34, (height, width), np.uint8)
    fewer = 0
    for index in range(150):
        key = SampleKey(index, 0, 0)
        rows = crop_rows(transform, height, width, key)
        with sample_randomness(key) as generators:
            draw = transform.draw(height, width, generators.python)
        cut_image, cut_mask = image.copy(), mask.copy()
        cut_image[rows:], cut_mask[rows:] = 255 - cut_image[rows:], 99
        for got, want in zip(transform.apply(cut_image, cut_mask, draw), transform.apply(image, mask, draw),
                             strict=True):
            assert np.array_equal(got, want), (index, rows, draw)
        fewer += rows < height
    assert fewer > 50  # most crops end above the frame's bottom


def test_the_decoder_benchmark_times_every_decoder(tmp_path: Path) -> None:
    import json
    import math
    import subprocess
    import sys

    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark_training.py", "--quick", "--measure", "decode",
                           "--tasks", "segment", "--workdir", str(tmp_path / "data"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == []
    rows = {row["decoder"]: row for row in result["decoders"]}
    assert {"PIL", "OpenCV", "libspng (pyspng)", "ours, whole frame", "ours, to the crop's last row"} <= set(rows)
    assert rows["PIL"]["vs_pil"] == 1.0
    for name, row in rows.items():
        assert math.isfinite(row["pair_ms"]) and row["pair_ms"] > 0, name
        assert math.isclose(row["pair_ms"], row["image_ms"] + row["label_ms"]), name
    assert "of the rows on average" in rows["ours, to the crop's last row"]["note"]
    assert "PNG decoder (segment)" in proc.stdout
