"""What ``lightning predict`` writes for SSDLite: COCO results, a JSON per image, pictures with boxes.

Layout under the output folder::

    coco_results.json        one COCO results list: {"image_id", "category_id", "bbox": XYWH, "score"}
    detections/<name>.json   {"file", "image_id", "width", "height",
                              "detections": [{"box_xyxy", "score", "label", "category_id", "class"}]}
    pictures/<name>.jpg      boxes scoring above picture_threshold, with class name and score
    skipped.jsonl, summary.json

Boxes are in the image's own pixels (XYXY in the per-image files, XYWH in the COCO results, as
COCO wants). ``label`` is the model's class index; ``category_id`` is the COCO category id of the
training annotations when they are known (the checkpoint's record, else the annotation files at hand:
contiguous labels map back to the file's ids), else the label itself; ``class`` its name. ``image_id``
comes from the file name when all names are distinct numbers (COCO's ``000000397133.jpg``), else a
running id (see the per-image files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from mbv3_dense.data.listing import ImageFile
from mbv3_dense.data.predict import PredictionWriter, draw_text_block, font_for, to_pil

Detections = dict[str, Tensor]


def draw_detections(image: Tensor, detections: list[dict], threshold: float) -> Image.Image:
    """uint8 ``[3, H, W]`` -> a PIL image with the boxes scoring above ``threshold`` and their ``class`` and
    ``score`` (``detections``: dicts with ``box_xyxy`` in the image's pixels, ``score``, ``class``)."""
    pil = to_pil(image)
    draw = ImageDraw.Draw(pil)
    font = font_for(pil.size)
    width = max(2, min(pil.size) // 200)
    shown = [det for det in detections if det["score"] > threshold]
    for det in shown:
        draw.rectangle(det["box_xyxy"], outline=(255, 40, 40), width=width)
    for det in shown:  # labels on top of every box
        x0, y0 = det["box_xyxy"][:2]
        draw_text_block(draw, (x0 + width + 1, y0 + width + 1), [f"{det['class']} {det['score']:.2f}"], font)
    return pil


class DetectionWriter(PredictionWriter):
    """Writes :meth:`detection.model.SSDLite.predict`-style detections (layout in the module docstring).

    The COCO results file is written as a JSON list entry by entry, so it is complete only after
    :meth:`close` (``on_predict_end``).

    Args:
        output_dir / overwrite / pictures / class_info: as :class:`~mbv3_dense.data.predict.PredictionWriter`
            (detection: ``names`` and ``category_ids`` of each label).
        picture_threshold: boxes drawn on the pictures score above this (all are written to the files).
    """

    task = "detect"
    outputs = ("coco_results.json", "detections", "pictures")

    def __init__(self, output_dir: str | Path | None = None, *, overwrite: bool = False, pictures: bool = True,
                 class_info: dict | None = None, picture_threshold: float = 0.3) -> None:
        super().__init__(output_dir, overwrite=overwrite, pictures=pictures, class_info=class_info)
        self.picture_threshold = picture_threshold
        self._configure_classes()

    def _configure_classes(self) -> None:
        info = self.class_info or {}
        ids = info.get("category_ids")
        self._category_ids = torch.as_tensor(ids, dtype=torch.int64) if ids is not None else None
        self._names = dict(zip(ids or range(len(info.get("names", []))), info.get("names", []), strict=True))

    def category_ids(self, labels: Tensor) -> Tensor:
        """Model labels -> category ids (the labels themselves when the classes' ids are unknown)."""
        return self._category_ids[labels.long()] if self._category_ids is not None else labels.long()

    def _open(self) -> None:
        (self.output_dir / "detections").mkdir(parents=True, exist_ok=True)
        self._results = open(self.output_dir / "coco_results.json", "w")  # noqa: SIM115 - closed in _close
        self._results.write("[")
        self._first = True

    def _write_image(self, file: ImageFile, image: Tensor, output: Detections) -> None:
        boxes = output["boxes"].detach().cpu().double()
        scores = output["scores"].detach().cpu().tolist()
        labels = output["labels"].detach().cpu()
        cats = self.category_ids(labels).tolist()
        names = self._names
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()
        for box, score, cat in zip(xywh, scores, cats, strict=True):
            entry = {"image_id": file.image_id, "category_id": int(cat), "bbox": [round(v, 3) for v in box],
                     "score": round(float(score), 5)}
            self._results.write(("" if self._first else ",\n") + json.dumps(entry))
            self._first = False
        dets = [{"box_xyxy": [round(v, 3) for v in box], "score": round(float(score), 5), "label": int(label),
                 "category_id": int(cat), "class": names.get(int(cat), str(int(cat)))}
                for box, score, label, cat in zip(boxes.tolist(), scores, labels.tolist(), cats, strict=True)]
        record = {"file": str(file.path), "image_id": file.image_id, "width": int(image.shape[-1]),
                  "height": int(image.shape[-2]), "detections": dets}
        path = self.output_dir / "detections" / f"{file.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n")
        if self.pictures:
            draw_detections(image, dets, self.picture_threshold).save(self._picture_path(file), quality=90)

    def _flush(self) -> None:
        self._results.flush()

    def _close(self) -> None:
        self._results.write("]\n")
        self._results.close()
