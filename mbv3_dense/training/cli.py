"""The one command line: ``lightning fit|validate|test|predict -c configs/<run>.yaml``.

lightning 2.6 installs no ``lightning`` console script; ``pyproject.toml`` points ours here, and
``python -m mbv3_dense`` does the same. Models and data modules are chosen by ``class_path`` in
the YAML file, so this module imports neither ``detection`` nor ``segmentation``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import torch
from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from mbv3_dense.checkpoints.model_record import ModelRecord, import_object, read_model_record
from mbv3_dense.errors import InputError
from mbv3_dense.training.callbacks import ResumeState, ValidationPictures
from mbv3_dense.training.checkpoint_io import AtomicCheckpointIO
from mbv3_dense.training.cluster import prepare_trainer
from mbv3_dense.training.guards import FiniteCheckpointGuard
from mbv3_dense.training.progress import progress_bar_for

log = logging.getLogger(__name__)


def auto_precision(accelerator: object) -> tuple[str, str]:
    """The training precision for ``trainer.precision: null`` and why: ``bf16-mixed`` on a CUDA GPU with
    bf16 (Ampere and newer), ``16-mixed`` (with a gradient scaler) on an older one, ``32-true`` otherwise
    (CPU: mixed precision there is slower, and the deployment latency is measured in fp32/int8 anyway)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name not in ("auto", "gpu", "cuda", "cudaaccelerator") or not torch.cuda.is_available():
        return "32-true", f"accelerator {name}, no CUDA GPU in use"
    card = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", f"{card} computes in bf16"
    return "16-mixed", f"{card} has no bf16: fp16 with a gradient scaler"


class MBV3CLI(LightningCLI):
    """LightningCLI with the project's defaults, which every run gets without a line of YAML (README, "Tasks";
    docs/robustness.md; each option's ``--help``):

    - any LightningModule / LightningDataModule by ``class_path``; the resolved config saved beside the logs;
    - ``trainer.precision: null``: the machine's precision (:func:`auto_precision`, logged);
    - the scheduler's length from ``trainer.max_epochs`` or ``max_steps``; the network's classes from the
      checkpoint's model record (validate/test/predict ``--ckpt_path``), else from the data module;
    - the safety callbacks (``--safety_callbacks``); in ``fit``, the best and last checkpoints
      (``--checkpoints.*``, under ``<default_root_dir>/checkpoints``), the LR monitor and validation pictures;
    - the network's builder and arguments in every checkpoint (:mod:`mbv3_dense.checkpoints.model_record`);
    - ``predict``: the module's own prediction writer (``--writer.*``) on one device when the config names none.
    """

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--safety_callbacks", type=bool, default=True,
                            help="add ResumeState, FiniteCheckpointGuard and AtomicCheckpointIO to the run")
        parser.add_argument("--checkpoints.best", type=bool, default=True,
                            help="fit: keep the checkpoint with the best task metric (--ckpt_path best)")
        parser.add_argument("--checkpoints.monitor", type=str | None, default=None,
                            help="fit: the metric --checkpoints.best maximises (default: the task's own)")
        parser.add_argument("--checkpoints.last", type=bool, default=True,
                            help="fit: write last.ckpt at every epoch end and every N steps (--ckpt_path last)")
        parser.add_argument("--checkpoints.every_n_train_steps", type=NonNegativeInt, default=500,
                            help="fit: also write last.ckpt every N optimizer steps (0: epoch ends only)")
        parser.add_argument("--lr_monitor", type=bool, default=True,
                            help="fit: log the learning rate at the scheduler's interval")
        parser.add_argument("--val_pictures", type=NonNegativeInt, default=4,
                            help="fit: predictions drawn on this many fixed validation images at every validation "
                                 "(TensorBoard and <log_dir>/val_pictures; 0: none)")

    def _run_config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._run_config()
        if not self._classes_from_checkpoint(config):
            self._classes_from_data(config)
        self._schedule_length_from_trainer(config)

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but an error raised while building the network, the module or the data reaches
        the user as its own first line (``error: <message>``, exit status 2) instead of inside jsonargparse's
        report of every type it tried."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _raised_outside_jsonargparse(err)
            if cause is None:
                raise
            log.debug("while instantiating the config", exc_info=err)
            print(f"error: {cause}", file=sys.stderr, flush=True)
            raise SystemExit(2) from cause

    @classmethod
    def _schedule_length_from_trainer(cls, config: Namespace) -> None:
        """The scheduler's length (``T_max``, ``total_iters``) follows ``trainer.max_epochs`` for a module that
        steps its scheduler every epoch, ``trainer.max_steps`` for one that steps it every iteration."""
        scheduler, module_path = config.get("model.init_args.scheduler"), config.get("model.class_path")
        if not isinstance(scheduler, Namespace) or not isinstance(scheduler.get("init_args"), Namespace) \
                or not isinstance(module_path, str):
            return
        try:
            interval = getattr(import_object(module_path), "scheduler_interval", None)
        except (ImportError, AttributeError, ValueError):
            return
        source = {"epoch": "trainer.max_epochs", "step": "trainer.max_steps"}.get(interval)
        length = config.get(source) if source else None
        if not isinstance(length, int) or length <= 0:
            return
        args = scheduler.init_args
        for key in ("T_max", "total_iters"):
            if key in args and args[key] != length:
                log.info("model.init_args.scheduler.init_args.%s %s -> %d (= %s)", key, args[key], length, source)
                args[key] = length

    def _classes_from_checkpoint(self, config: Namespace) -> bool:
        """validate/test/predict with ``--ckpt_path FILE``: the network's class count and names are the ones
        the checkpoint's model record gives (the weights are what they are, whatever data is at hand).
        Returns whether the record was used."""
        network, path = config.get("model.init_args.model"), config.get("ckpt_path")
        if self.subcommand not in ("validate", "test", "predict") or not isinstance(path, str) \
                or not os.path.isfile(path) or not isinstance(network, Namespace):
            return False
        try:
            record = read_model_record(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        except Exception as err:
            log.debug("%s: no model record read (%s)", path, err)
            return False
        net_args = network.get("init_args")
        if record is None or record["builder"] != network.get("class_path") or not isinstance(net_args, Namespace):
            return False
        taken = {k: record["init_args"][k] for k in ("num_classes", "class_names")
                 if k in record["init_args"] and k in net_args and net_args[k] != record["init_args"][k]}
        for key, value in taken.items():
            net_args[key] = value
        if taken:
            log.info("network from the checkpoint's record (%s): %s", path,
                     ", ".join(f"{k}={_shown(v)}" for k, v in taken.items()))
        return True

    @staticmethod
    def _classes_from_data(config: Namespace) -> None:
        """The network's ``num_classes`` and ``class_names`` follow the data module's, where both sides
        have them (an image folder's class folders, a COCO file's categories, a classes file)."""
        data, network = config.get("data"), config.get("model.init_args.model")
        if not isinstance(data, Namespace) or not isinstance(network, Namespace):
            return
        net_args = network.get("init_args")
        if not isinstance(net_args, Namespace) or "num_classes" not in net_args:
            return
        data_class = import_object(data.class_path)
        if not hasattr(data_class, "num_classes"):
            return
        data_args = data.get("init_args")
        try:
            datamodule = data_class(**(data_args.as_dict() if data_args is not None else {}))
            found = {"num_classes": datamodule.num_classes,
                     "class_names": getattr(datamodule, "class_names", None) if "class_names" in net_args else None}
        except (OSError, ValueError) as err:  # no data at hand (predict on photos): the network as configured
            log.info("the network's classes as configured (the data's are unknown: %s)", err)
            return
        for key, value in found.items():
            if value is not None and net_args[key] != value:
                log.info("the data has %s: model.init_args.model.init_args.%s %s -> %s", _shown(value)
                         if key == "class_names" else f"{value} classes", key, _shown(net_args[key]), _shown(value))
                net_args[key] = value

    def _project_callbacks(self, config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        present = (config.get("callbacks") or []) + callbacks
        added: list[Callback] = []
        if self._run_config().get("safety_callbacks", True):
            for kind in (ResumeState, FiniteCheckpointGuard):
                if not any(isinstance(c, kind) for c in present):
                    added.append(kind())
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
                config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if self.subcommand == "fit":
            added += self._run_checkpoints(present)
            added += self._lr_monitor(config, present)
            pictures = self._run_config().get("val_pictures", 4)
            if pictures and hasattr(self.model, "draw_predictions") \
                    and not any(isinstance(c, ValidationPictures) for c in present):
                added.append(ValidationPictures(num_images=pictures))
        root = config.get("default_root_dir") or os.getcwd()
        for c in [*present, *added]:
            if isinstance(c, ModelCheckpoint) and c.dirpath is None:
                c.dirpath = os.path.realpath(os.path.join(os.fspath(root), "checkpoints"))
        record = self._model_record()
        if record is not None:
            added.append(record)
        return [*callbacks, *added]

    def _run_checkpoints(self, present: list[Callback]) -> list[Callback]:
        if any(isinstance(c, ModelCheckpoint) for c in present):
            return []  # the config names its checkpoints
        options = self._run_config().get("checkpoints") or Namespace()
        every_n_steps = options.get("every_n_train_steps", 500)
        checkpoints: list[Callback] = []
        metric = options.get("monitor") or getattr(type(self.model), "monitor", None)
        if options.get("best", True) and metric is not None:
            position = "step{step:06d}" if getattr(self.model, "scheduler_interval", "epoch") == "step" \
                else "epoch{epoch:03d}"
            name = metric.rpartition("/")[2]
            checkpoints.append(ModelCheckpoint(filename=f"{position}-{name}{{{metric}:.4f}}", monitor=metric,
                                               mode="max", auto_insert_metric_name=False, save_top_k=1,
                                               save_last=False))
        if options.get("last", True):
            # last.ckpt every N optimizer steps, and an epoch-end copy: Lightning 2.6's save_last only
            # follows a save, so the epoch-end one is a top-1 checkpoint named "last". The newer wins.
            if every_n_steps:
                checkpoints.append(ModelCheckpoint(every_n_train_steps=every_n_steps, save_top_k=0, save_last=True,
                                                   enable_version_counter=False))
            checkpoints.append(ModelCheckpoint(filename="last", every_n_epochs=1, save_on_train_epoch_end=True,
                                               save_top_k=1, enable_version_counter=False))
        return checkpoints

    def _lr_monitor(self, config: dict[str, Any], present: list[Callback]) -> list[Callback]:
        if not self._run_config().get("lr_monitor", True) or config.get("logger") is False \
                or getattr(self.model, "scheduler", None) is None \
                or any(isinstance(c, LearningRateMonitor) for c in present):
            return []
        return [LearningRateMonitor(logging_interval=getattr(self.model, "scheduler_interval", "epoch"))]

    def _model_record(self) -> ModelRecord | None:
        network = self._run_config().get("model.init_args.model")
        task = getattr(type(self.model), "task", None)
        if task is None or not isinstance(network, Namespace) or not isinstance(network.get("class_path"), str):
            return None
        init_args = network.get("init_args")
        return ModelRecord(task, network.class_path, init_args.as_dict() if init_args is not None else {})

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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the project's precision, loggers, callbacks and cluster checks. Progress as periodic
        lines when standard output is not a terminal (CI, ``> log``); the tqdm bar in a terminal, or whatever
        progress bar the config names."""
        config = {**self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {}), **kwargs}
        listed = config.get("callbacks") or []
        config["callbacks"] = list(listed) if isinstance(listed, (list, tuple)) else [listed]
        callbacks: list[Callback] = []
        if config.get("precision") is None:
            config["precision"], why = auto_precision(config.get("accelerator", "auto"))
            log.info("precision %s (trainer.precision null: %s)", config["precision"], why)
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        callbacks = self._project_callbacks(config, callbacks)
        if self.subcommand == "predict":
            callbacks = self._default_writer(config, callbacks)
        listed = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, ProgressBar)]
        if config.get("enable_progress_bar", True) is not False and not listed:
            bar = progress_bar_for(sys.stdout)
            if bar is not None:
                callbacks = [*callbacks, bar]
        # multi-node checks, DDP timeout (mbv3_dense/training/cluster.py)
        callbacks = prepare_trainer(config, callbacks)
        config["callbacks"] = [*config["callbacks"], *callbacks]
        return super().instantiate_trainer(**config)


def default_loggers(root: str | os.PathLike) -> list[Logger]:
    """TensorBoard (what Lightning users open: scalars and the validation pictures) and CSV (for scripts),
    writing into one folder, ``<root>/lightning_logs/version_N``."""
    tensorboard = TensorBoardLogger(save_dir=root, name="lightning_logs", default_hp_metric=False)
    return [tensorboard, CSVLogger(save_dir=root, name="lightning_logs", version=tensorboard.version)]


def _shown(value: object, limit: int = 8) -> str:
    """A value for a log line: long lists cut after ``limit`` items."""
    if isinstance(value, (list, tuple)) and len(value) > limit:
        return f"[{', '.join(map(str, value[:limit]))}, ... ({len(value)})]"
    return str(value)


def _raised_outside_jsonargparse(err: BaseException) -> BaseException | None:
    """The first exception in ``err``'s chain that was raised by other code than jsonargparse (the network's
    builder, a module, a data module), or None when jsonargparse itself found the problem (a bad option)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and "jsonargparse" not in tb.tb_frame.f_code.co_filename:
            return current
        current = current.__cause__ or current.__context__
    return None


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning 2.6's CombinedLoader (utilities/_pytree.py) still builds torch's deprecated LeafSpec: harmless, not
    # ours to fix (Lightning-AI/pytorch-lightning#21326), and one line in every run's log.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # TaskModule.on_after_batch_transfer turns uint8 batches into the network's input on purpose (it knows the
    # network's normalisation and memory format; the data modules do not): Lightning's note that it wins is noise.
    warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")
    torch.set_float32_matmul_precision("high")
    try:
        MBV3CLI(args=args)
    except InputError as err:
        # A problem with the user's input (a checkpoint that does not fit, a bad annotation, mask or class
        # list) ends the run with one line naming it, exit status 2.
        log.debug("input error", exc_info=err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
