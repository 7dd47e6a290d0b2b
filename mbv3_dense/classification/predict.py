"""What ``lightning predict`` writes for the classifier: a JSON line per image with its top-5 classes.

Layout under the output folder::

    classifications.jsonl   {"file", "name", "width", "height", "top5": [{"index", "class", "probability"}]}
    pictures/<name>.jpg      the image with its top-5 drawn in the top-left corner (unless pictures=False)
    skipped.jsonl, summary.json

Class names are the checkpoint's (its model record), else the training folder names
(``<root>/train/<class>``, the order of the class indices) when the data root has them, otherwise the
indices as text.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from mbv3_dense.data.listing import ImageFile
from mbv3_dense.data.predict import PredictionWriter, draw_text_block, font_for, to_pil


class TopK(NamedTuple):
    """Per image: ``probabilities [k]`` (softmax, decreasing) and ``indices [k]`` (class indices)."""

    probabilities: Tensor
    indices: Tensor


def top_k(logits: object, k: int = 5) -> list[TopK]:
    """The network's ``[N, C]`` logits -> per image the top ``k`` (all, with fewer classes) softmax probabilities,
    on the CPU (``lightning predict`` and ``scripts/predict.py``)."""
    probabilities = torch.as_tensor(logits).float().softmax(dim=1)
    top = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [TopK(p, i) for p, i in zip(top.values.cpu(), top.indices.cpu(), strict=True)]


def draw_top5(image: Tensor, top: list[tuple[str, float]], min_side: int = 0) -> Image.Image:
    """uint8 ``[3, H, W]`` -> a PIL image with ``(class name, probability)`` lines in the top-left corner;
    images with a side under ``min_side`` are enlarged (by a whole factor) so that the text fits."""
    pil = to_pil(image)
    if min(pil.size) < min_side:
        factor = -(-min_side // min(pil.size))
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    draw_text_block(ImageDraw.Draw(pil), (6, 6), [f"{name} {p:.2f}" for name, p in top], font_for(pil.size))
    return pil


class ClassificationWriter(PredictionWriter):
    """Writes :class:`TopK` predictions (see the module docstring for the layout).

    Args:
        output_dir / overwrite / pictures / class_info: as :class:`~mbv3_dense.data.predict.PredictionWriter`.
    """

    task = "classify"
    outputs = ("classifications.jsonl", "pictures")

    def _name(self, index: int) -> str:
        names = (self.class_info or {}).get("names")
        return names[index] if names is not None and index < len(names) else str(index)

    def _open(self) -> None:
        self._rows = open(self.output_dir / "classifications.jsonl", "w")  # noqa: SIM115 - closed in _close

    def _write_image(self, file: ImageFile, image: Tensor, output: TopK) -> None:
        top = [{"index": int(i), "class": self._name(int(i)), "probability": round(float(p), 6)}
               for p, i in zip(output.probabilities.tolist(), output.indices.tolist(), strict=True)]
        row = {"file": str(file.path), "name": file.name, "width": int(image.shape[-1]),
               "height": int(image.shape[-2]), "top5": top}
        self._rows.write(json.dumps(row) + "\n")
        if self.pictures:
            draw_top5(image, [(t["class"], t["probability"]) for t in top]).save(self._picture_path(file), quality=90)

    def _flush(self) -> None:
        self._rows.flush()

    def _close(self) -> None:
        self._rows.close()
