"""The one command line: ``lightning fit|validate|test|predict -c configs/<run>.yaml``.

lightning 2.6 installs no ``lightning`` console script; ``pyproject.toml`` points ours here, and
``python -m mbv3_dense`` does the same. Models and data modules are chosen by ``class_path`` in
the YAML file, so this module imports neither ``detection`` nor ``segmentation``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mbv3_dense.progress import progress_bar_for

log = logging.getLogger(__name__)


class MBV3CLI(LightningCLI):
    """LightningCLI with the project's defaults: any LightningModule / LightningDataModule by
    ``class_path``, the resolved config saved next to the logs (overwriting on resume).

    ``predict`` writes files: when the config names no ``BasePredictionWriter`` callback, the
    module's own writer (``model.prediction_writer(...)``) is added, configured by
    ``--writer.output_dir`` (default ``<default_root_dir>/predictions``), ``--writer.overwrite`` and
    ``--writer.pictures``, on one device (the writer writes its files from one process); predictions
    are written batch by batch and not kept in memory (``return_predictions`` defaults to false).
    """

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(args=args, **kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("--writer.output_dir", type=str | None, default=None,
                                help="where the default prediction writer writes (default: "
                                     "<trainer.default_root_dir>/predictions)")
            parser.add_argument("--writer.overwrite", type=bool, default=False,
                                help="replace the results of an earlier run in that folder")
            parser.add_argument("--writer.pictures", type=bool, default=True,
                                help="also draw the predictions on the images")
            parser.set_defaults(return_predictions=False)
        return parser

    def _default_writer(self, config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        listed = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, BasePredictionWriter)]
        make = getattr(self.model, "prediction_writer", None)
        if listed or make is None:
            return callbacks
        devices = config.get("devices", "auto")
        if devices not in (1, "1") and not (isinstance(devices, (list, tuple)) and len(devices) == 1):
            # The writer writes shared files (COCO results, JSON lines) from one process.
            log.info("predict: one device (the config asks for devices=%s; the prediction writer writes from one "
                     "process)", devices)
            config["devices"] = 1
        options = self.config_init[self.subcommand].get("writer") or {}
        return [*callbacks, make(output_dir=options.get("output_dir"), overwrite=bool(options.get("overwrite")),
                                 pictures=options.get("pictures", True) is not False)]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Progress as periodic lines when standard output is not a terminal (CI, ``> log``); the tqdm bar
        in a terminal, or whatever progress bar the config names."""
        if self.subcommand == "predict":
            callbacks = self._default_writer(config, callbacks)
        listed = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, ProgressBar)]
        if config.get("enable_progress_bar", True) is not False and not listed:
            bar = progress_bar_for(sys.stdout)
            if bar is not None:
                callbacks = [*callbacks, bar]
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    MBV3CLI(args=args)


if __name__ == "__main__":
    main()
