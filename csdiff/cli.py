"""The `csdiff` command: LightningCLI for fit/validate/test/predict, plus csdiff's own verbs.

Own verbs (``layers``, ``extract``) have jsonargparse parsers too, so every command takes
``--config``, ``--print_config`` and dotted overrides: one entry point, one config language.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from csdiff import __version__

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "CSDIFF_DEBUG"


def config_error_line(text: str) -> str:
    """The essence of a jsonargparse error: the innermost key and its first concrete problem."""
    keys = re.findall(r'Parser key "([^"]+)"', text)
    vague = (
        "Does not validate",
        "Subtypes:",
        "Errors:",
        "Given value",
        "Problem with given class_path",
        "Expected a <class 'NoneType'>",
    )
    problems = [line.strip(" -") for line in text.splitlines() if line.strip() and not any(v in line for v in vague)]
    problems = [p for p in problems if not p.startswith("Parser key")] or [text.strip().splitlines()[0]]
    where = f"invalid value for {'.'.join(keys)}: " if keys else ""
    return " ".join((where + problems[0]).split())


def error_line(err: BaseException) -> str:
    """One line for the user: the error's own message, also when it was re-raised from a
    DataLoader worker (whose message embeds the worker's traceback)."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if "Does not validate against any of the Union subtypes" in text:  # raised while instantiating a class
        return config_error_line(text)
    return " ".join(text.split())


def _parser(prog: str, description: str) -> ArgumentParser:
    # errors raise (main reports them in one line) instead of printing the usage and a union dump
    parser = ArgumentParser(prog=f"csdiff {prog}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    return parser


def run_layers(argv: list[str]) -> int:
    """Print every activation name of a model with its (C, H, W) shape at an image size."""
    parser = _parser("layers", "List every valid activation name of a model, with its shape at an image size.")
    parser.add_argument(
        "--model", type=str, default="tiny", help="hub id, local folder, single file, `tiny`, or a random-* model"
    )
    parser.add_argument("--base_model", type=str | None, default=None, help="configuration folder for single files")
    parser.add_argument(
        "--img_size", type=int | None, default=None, help="image side (default: the model's native size)"
    )
    parser.add_argument("--format", type=Literal["table", "json"], default="table", help="`json` for scripts")
    cfg = parser.parse_args(argv)
    from csdiff.backbone.listing import list_layers, vae_factor
    from csdiff.backbone.loading import load_sd_components
    from csdiff.backbone.names import AGGREGATES

    parts = load_sd_components(cfg.model, base_model=cfg.base_model)
    factor = vae_factor(parts.vae)
    img_size = parts.family.native_latent_size(parts.unet) * factor if cfg.img_size is None else cfg.img_size
    rows = list_layers(parts, img_size)
    if cfg.format == "json":
        print(json.dumps([dict(name=r.name, shape=list(r.shape), module=r.module) for r in rows], indent=1))
        return 0
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'C x H x W':>18}  module")
    for r in rows:
        print(f"{r.name:<{width}}  {' x '.join(map(str, r.shape)):>18}  {r.module}")
    aggregate = rows[-1].name if rows[-1].name in AGGREGATES else None
    count = f"{len(rows) - 1} activation names (+ {aggregate})" if aggregate else f"{len(rows)} activation names"
    sets = ", ".join(parts.family.layer_sets) or "none"
    print(f"{count} for {cfg.model} at img_size {img_size}; named sets: {sets}")
    return 0


def config_extractor_options(model: Any, otherwise: str) -> dict[str, Any]:
    """Extractor arguments (backbone options, variants, layers) from a `csdiff fit` config's
    model section, for the verbs that take a task config (``otherwise``: what to do instead)."""
    options = model.init_args
    if not {"backbone", "variants", "layers"} <= set(options.keys()):
        raise ValueError(f"{model.class_path} has no backbone/variants/layers options: {otherwise}")
    if not options.layers:
        raise ValueError("the config's model names no layers: set model.init_args.layers")
    backbone = options.backbone.as_dict() if hasattr(options.backbone, "as_dict") else dict(options.backbone or {})
    variants = [v.as_dict() if hasattr(v, "as_dict") else dict(v) for v in (options.variants or [{"name": "plain"}])]
    return dict(backbone, layers=list(options.layers), variants=variants)


def device_options(trainer: Any, device: str | None) -> dict[str, Any]:
    """The Trainer options a predict-loop verb (extract, visualize, assess) uses: the config's
    accelerator, devices, strategy and nodes, or ``--device`` (``cpu``, ``cuda:1``) for one device."""
    options = {k: trainer[k] for k in ("accelerator", "devices", "strategy", "num_nodes")}
    if device is not None:
        kind, _, index = device.partition(":")
        options.update(
            accelerator="gpu" if kind == "cuda" else kind, devices=[int(index)] if index else 1, strategy="auto"
        )
    return options


def run_extract(argv: list[str]) -> int:
    """Write features of a folder of images, or of a task config's dataset, into a feature folder.

    Runs Lightning's predict loop: ``--trainer.devices N --trainer.strategy ddp`` spreads the
    images over devices (each rank writes its own). ``--config`` takes a `csdiff fit` config,
    whose model gives the extractor (``backbone``, ``variants``, ``layers``) and whose data the
    images (a datamodule with ``feature_images()``, e.g. DDPMSegDataModule).
    """
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    from csdiff.backbone import DiffusionFeatureExtractor
    from csdiff.data.reading import DataError, output_names
    from csdiff.data.segmentation import ImageFolderDataset
    from csdiff.tasks.options import VariantOptions

    parser = _parser(
        "extract",
        "Extract diffusion features of images into a feature folder (fp16 safetensors, one file per image, manifest.json).",
    )
    # variants as the tasks type them (plain dicts, every key checked): the extractor's
    # dataclass types would make jsonargparse turn nested LoRAs/ControlNets into class specs
    parser.add_class_arguments(DiffusionFeatureExtractor, "extractor", instantiate=False, skip={"variants"})
    parser.add_argument(
        "--extractor.variants",
        type=list[VariantOptions] | None,
        default=None,
        help="one dict per variant (name, prompt, seed, loras, controlnets, denoise_from, weights)",
    )
    parser.add_subclass_arguments(
        LightningModule,
        "model",
        required=False,
        instantiate=False,
        help="a task whose backbone, variants and layers make the extractor (from a `csdiff fit` config)",
    )
    parser.add_subclass_arguments(
        LightningDataModule,
        "data",
        required=False,
        help="a datamodule whose images to extract (from a `csdiff fit` config)",
    )
    parser.add_class_arguments(Trainer, "trainer", instantiate=False)
    parser.add_argument(
        "--seed_everything",
        type=bool | int | None,
        default=None,
        help="read from task configs; unused (features use the variants' seeds)",
    )
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="read from task configs; unused")
    parser.add_argument("--input", type=str | None, default=None, help="an image file or a folder of images")
    parser.add_argument(
        "--output",
        type=str | None,
        default=None,
        help="feature folder (default with a datamodule: its `features` folder)",
    )
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--overwrite", type=bool, default=False, help="recompute files that already exist")
    parser.add_argument("--device", type=str | None, default=None, help="shorthand for one device, e.g. cpu or cuda:1")
    parser.set_defaults({"extractor.feature_dtype": "float16"})
    cfg = parser.parse_args(argv)
    if cfg.model is not None:
        kwargs = dict(config_extractor_options(cfg.model, "give --extractor.* instead"), feature_dtype="float16")
    else:
        kwargs = cfg.extractor.as_dict()
    datamodule = parser.instantiate_classes(cfg).data if cfg.data is not None and cfg.input is None else None
    if cfg.input is not None:
        dataset = ImageFolderDataset(cfg.input)
        items = list(zip(output_names(dataset.paths, dataset.root), dataset.paths))
    elif datamodule is not None:
        if not hasattr(datamodule, "feature_images"):
            raise DataError(
                f"{type(datamodule).__name__} does not list images for extraction; extract its image folder with --input"
            )
        items = datamodule.feature_images()
    else:
        raise DataError(
            "nothing to extract: give --input FOLDER, or --config with a data section (a `csdiff fit` config)"
        )
    output = cfg.output or getattr(datamodule, "features", None)
    if output is None:
        raise DataError("give --output FOLDER for the feature files")
    from csdiff.tasks.extraction import check_output_folder, extract_to_folder

    check_output_folder(output)  # before loading any weights
    trainer_options = device_options(cfg.trainer, cfg.device)
    if not isinstance(trainer_options["strategy"], str):
        raise ValueError("give --trainer.strategy as a name (e.g. ddp) for extraction")
    extractor = DiffusionFeatureExtractor(**kwargs)
    written, present = extract_to_folder(
        extractor, items, output, trainer_options, cfg.batch_size, cfg.num_workers, cfg.overwrite
    )
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"wrote {written} feature files to {output} ({present} already present)")
    return 0


def run_scarce_splits(argv: list[str]) -> int:
    """Fit and test a label-scarce config on several random splits; print mean ± std mIoU."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="csdiff scarce-splits",
        description=run_scarce_splits.__doc__,
        epilog="Other options (e.g. --trainer.max_epochs 10) go to every `csdiff fit`.",
    )
    parser.add_argument("--config", required=True, help="a label-scarce `csdiff fit` config (configs/scarce_*.yaml)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="split seeds (default: the paper's 5)"
    )
    known, overrides = parser.parse_known_args(argv)
    from csdiff.splits import run_splits

    run_splits(known.config, known.seeds, overrides)
    return 0


def run_assess(argv: list[str]) -> int:
    """GATE: img2img grids and content-shift scores of a config's variants (csdiff.assess.command)."""
    from csdiff.assess.command import run_assess as run

    return run(argv)


def run_visualize(argv: list[str]) -> int:
    """PCA pictures of a config's features (csdiff.visualize.features), imported when used."""
    from csdiff.visualize.features import run_visualize as run

    return run(argv)


OWN_VERBS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "layers": (run_layers, "list activation names and shapes of a model"),
    "extract": (run_extract, "extract features of images or of a config's dataset into a feature folder"),
    "visualize": (
        run_visualize,
        "PCA pictures of a config's features per layer and variant beside t = 0; attention maps",
    ),
    "scarce-splits": (run_scarce_splits, "fit + test a label-scarce config on 5 random splits, mean ± std"),
    "assess": (run_assess, "does each variant suppress content shift? img2img grids and GATE scores"),
}


def _overview() -> str:
    lines = [
        f"csdiff {__version__}: diffusion features with content shift suppressed",
        "",
        "usage: csdiff <command> [--config FILE] [options]   (csdiff <command> --help for its options)",
        "",
        "commands:",
        "  fit           train a task (LightningCLI)",
        "  validate      score a checkpoint on the validation split",
        "  test          score a checkpoint on the test split",
        "  predict       write predictions of a checkpoint",
    ]
    lines += [f"  {name:<13} {text}" for name, (_, text) in OWN_VERBS.items()]
    lines += ["", "options:", "  -h, --help  show this message", "  --version   print the version"]
    return "\n".join(lines)


def _is_exported_head(path: object) -> bool:
    # imported here: csdiff.tasks loads every task (diffusers included), which `--help` should not wait for
    from csdiff.tasks.export import is_exported_head

    return is_exported_head(path)


def run_lightning(argv: list[str] | None):
    """Run a LightningCLI subcommand in-process (``None``: from ``sys.argv``); returns the CLI object.

    Parsers raise instead of printing usage and exiting, so ``main`` can report a bad config
    key in one line.
    """
    from jsonargparse import Namespace
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from csdiff.resume import (
        DEFAULT_LOGGER,
        KEYWORDS,
        CheckpointError,
        SaveLastOnStop,
        StopPredicting,
        check_checkpoint_file,
        locate_last,
        logger_root,
        read_checkpoint,
        sigterm_interruption,
    )

    class CSDiffCLI(LightningCLI):
        _head_dir: tempfile.TemporaryDirectory | None = None
        _stop: SaveLastOnStop | None = None
        _given_model: dict | None = None  # the task options the config gives explicitly
        _ckpt_given: str | None = None  # --ckpt_path as given (an exported head's folder, not its temporary file)

        def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
            """Resolve and check ``--ckpt_path`` before Lightning reads hyperparameters from it."""
            super().parse_arguments(parser, args)
            subcommand = self.config.subcommand
            # what the command line and config files give, without defaults: compared with a checkpoint's hyperparameters
            given = parser.parse_args(args, defaults=False)[subcommand].get("model")
            self._given_model = (
                given.init_args.as_dict() if isinstance(given, Namespace) and given.get("init_args") else {}
            )
            config = self.config[subcommand]
            ckpt = config.get("ckpt_path")
            if ckpt == "last":
                ckpt, version = locate_last(config.trainer)
                config.ckpt_path = str(ckpt)
                if subcommand == "fit" and version is not None:
                    self._continue_run(config, version)
            run = Path(ckpt).parent.parent if ckpt is not None and Path(ckpt).parent.name == "checkpoints" else None
            self._ckpt_given = ckpt
            if ckpt is not None and _is_exported_head(ckpt):
                ckpt = config.ckpt_path = str(self._head_checkpoint(ckpt))
            if ckpt is not None and ckpt not in KEYWORDS:
                check_checkpoint_file(ckpt)
                if subcommand != "fit":
                    self._log_beside_checkpoint(run)

        def _parse_ckpt_path(self) -> None:
            """Lightning builds the task from the checkpoint's hyperparameters, dropping the
            config's options: refuse a checkpoint of another task and options given otherwise,
            and keep the config's values of options that cannot change the results."""
            from csdiff.tasks.checkpoints import options_over_checkpoint

            subcommand = self.config.subcommand
            config = self.config[subcommand]
            ckpt = config.get("ckpt_path")
            if not (ckpt and Path(ckpt).is_file()):
                return super()._parse_ckpt_path()
            model = config.get("model")
            class_path = model.get("class_path") if isinstance(model, Namespace) else None
            shown = self._ckpt_given or ckpt
            use = options_over_checkpoint(read_checkpoint(ckpt), self._given_model or {}, class_path, subcommand, shown)
            super()._parse_ckpt_path()
            for key, value in use.items():
                self.config[subcommand].model.init_args[key] = value

        def _log_beside_checkpoint(self, run: Path | None) -> None:
            """validate/test/predict log into one folder per checkpoint and verb, not into a
            new ``version_N`` at every call: ``<run>/test`` when the checkpoint's run lies
            under the logger's folder, else ``<logger folder>/test``. A logger whose version
            the config sets, or another kind of logger, is left alone."""
            subcommand = self.config.subcommand
            trainer = self.config[subcommand].trainer
            logger = trainer.get("logger")
            if logger is None or logger is True:
                init = {"save_dir": trainer.get("default_root_dir") or ".", "name": "lightning_logs", "version": None}
                update = {subcommand: {"trainer": {"logger": {"class_path": DEFAULT_LOGGER, "init_args": init}}}}
                self.config = self.parser.parse_object(update, self.config)
                trainer = self.config[subcommand].trainer
                logger = trainer.logger
            if not (isinstance(logger, Namespace) and str(logger.get("class_path")).endswith("TensorBoardLogger")):
                return
            if logger.init_args.get("version") is None and logger.init_args.get("save_dir") is not None:
                root = logger_root(trainer)[0].resolve()
                inside = run is not None and run.resolve().is_relative_to(root)
                logger.init_args.version = str(run.resolve().relative_to(root) / subcommand) if inside else subcommand

        def _head_checkpoint(self, folder: str) -> Path:
            """An exported head as a checkpoint file for this run: Lightning reads the model's
            hyperparameters and its weights from a file, so it gets one (removed after the run)."""
            if self.config.subcommand == "fit":
                raise CheckpointError(
                    f"{folder} is an exported head: it holds no optimizer or loop state, so no fit can resume from it; "
                    f"use it with test, validate or predict"
                )
            from csdiff.tasks.export import write_checkpoint

            self._head_dir = tempfile.TemporaryDirectory(prefix="csdiff-head-")
            return write_checkpoint(folder, Path(self._head_dir.name) / f"{Path(folder).resolve().name}.ckpt")

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except SIGTERMException:  # Lightning's stop on SIGTERM, a SystemExit that would exit with 0
                stopped = self._stop.stopped if self._stop is not None else None
                raise (stopped or sigterm_interruption(subcommand)) from None
            finally:
                if self._head_dir is not None:
                    self._head_dir.cleanup()

        def _continue_run(self, config: Namespace, version: str) -> None:
            """Log the resumed fit into its run's own folder (Lightning would open a new version)."""
            logger = config.trainer.get("logger")
            if logger is None or logger is True:
                root = config.trainer.get("default_root_dir") or "."
                init = {"save_dir": root, "name": "lightning_logs", "version": version}
                update = {
                    self.config.subcommand: {"trainer": {"logger": {"class_path": DEFAULT_LOGGER, "init_args": init}}}
                }
                self.config = self.parser.parse_object(update, self.config)
            else:
                logger.init_args.version = version

        def _require_checkpoint(self) -> None:
            # a model with nothing to train (zero-shot matching) is complete without a checkpoint
            trainable = any(p.requires_grad for p in self.model.parameters())
            if trainable and self.config[self.subcommand].get("ckpt_path") is None:
                raise SystemExit(
                    f"csdiff {self.subcommand}: no checkpoint given, and scoring untrained heads means nothing. "
                    f"Pass --ckpt_path PATH (e.g. <log_dir>/checkpoints/last.ckpt from `csdiff fit`) or --ckpt_path last."
                )

        def _check_checkpoint_classes(self) -> None:
            # with --ckpt_path, Lightning builds the model from the checkpoint's hyperparameters
            ckpt = self.config[self.subcommand].get("ckpt_path")
            model_n, data_n = getattr(self.model, "num_classes", None), getattr(self.datamodule, "num_classes", None)
            if ckpt is not None and None not in (model_n, data_n) and model_n != data_n:
                raise ValueError(
                    f"the checkpoint {ckpt} was trained for {model_n} classes but the datamodule "
                    f"{type(self.datamodule).__name__} has {data_n}: use a checkpoint trained on this dataset, "
                    f"or the data config it was trained with (its run folder's config.yaml)"
                )

        def _before_run(self) -> None:
            # checkpoints hold tensors and plain values only: refuse pickled code unless asked
            if self.config_init[self.subcommand].get("weights_only") is None:
                self.config_init[self.subcommand]["weights_only"] = True
            self._check_checkpoint_classes()

        def _say_start(self) -> None:
            from lightning.pytorch.utilities import rank_zero_only

            from csdiff.console import start_line

            if rank_zero_only.rank == 0:
                print(start_line(self.subcommand, self.model, self.trainer), flush=True)

        def after_fit(self) -> None:
            from lightning.pytorch.utilities import rank_zero_only

            from csdiff.console import fit_end_line

            if rank_zero_only.rank == 0 and not self.trainer.interrupted:
                print(fit_end_line(self.trainer), flush=True)

        def before_fit(self) -> None:
            self._say_start()
            self._before_run()
            # last.ckpt by default, so `--ckpt_path last` can resume any run (an explicit false wins)
            for callback in self.trainer.checkpoint_callbacks:
                if callback.save_last is None:
                    callback.save_last = True
            self._stop = SaveLastOnStop()
            self.trainer.callbacks.append(self._stop)

        def before_validate(self) -> None:
            self._say_start()
            self._before_run()

        def before_test(self) -> None:
            self._say_start()
            self._require_checkpoint()
            self._before_run()

        def before_predict(self) -> None:
            self._say_start()
            self._require_checkpoint()
            self._before_run()
            self.trainer.callbacks.append(
                StopPredicting("the files written are complete; run the same command again to write them all")
            )

    if not {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        # short class names (`--model SegmentationTask --data ADE20KDataModule`) resolve among imported
        # subclasses; help needs none
        import csdiff.data
        import csdiff.tasks  # noqa: F401

        for name in csdiff.data.__all__:  # its modules load on first access
            getattr(csdiff.data, name)

    from csdiff.console import quiet_console

    with quiet_console():
        return CSDiffCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, **{verb: {"exit_on_error": False} for verb in LIGHTNING_VERBS}},
        )


def config_file_error(argv: list[str]) -> str | None:
    """What is wrong with the ``--config`` files themselves, found before any heavy import:
    a file that does not exist (unless the value is inline YAML, which jsonargparse also
    takes) or a YAML syntax error, with the file, line and column jsonargparse would drop."""
    import yaml

    files = [b for a, b in zip(argv, argv[1:]) if a == "--config"] + [
        a.split("=", 1)[1] for a in argv if a.startswith("--config=")
    ]
    for name in files:
        if not Path(name).is_file():
            try:
                inline = yaml.safe_load(name)
            except yaml.YAMLError:
                inline = None
            if not isinstance(inline, dict):
                return f"--config {name}: no such file"
            continue
        try:
            yaml.safe_load(Path(name).read_text())
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(p) for p in (err.context, err.problem) if p)
            return f"YAML syntax error in {name}{where}: {problem}"
    return None


def _quiet_libraries() -> None:
    """Silence import-time notices of transformers (e.g. about torchvision, which csdiff does
    not use) without importing it here: that second is not for `--help` to pay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported before main (main called in-process): the variable was read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def main(args: list[str] | None = None) -> int:
    """Entry point of `csdiff` and `python -m csdiff`; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    argv = list(sys.argv[1:] if args is None else args)
    _quiet_libraries()
    if not argv:  # a usage error, like any missing argument
        print(_overview(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    if argv[0] == "--version":
        print(f"csdiff {__version__}")
        return 0
    if argv[0] not in OWN_VERBS and argv[0] not in LIGHTNING_VERBS:
        print(f"csdiff: unknown command {argv[0]!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    bad_file = config_file_error(argv)
    if bad_file is not None:
        print(f"csdiff {argv[0]}: {bad_file}.", file=sys.stderr)
        return 2
    try:
        if argv[0] in OWN_VERBS:
            from csdiff.console import quiet_console

            with quiet_console():
                return OWN_VERBS[argv[0]][0](argv[1:])
        run_lightning(None if args is None else argv)
        return 0
    except ArgumentError as err:
        line = f"{config_error_line(str(err))}. See `csdiff {argv[0]} --help` or --print_config"
        print(f"csdiff {argv[0]}: {line}.", file=sys.stderr)
        return 2
    except Exception as err:
        from csdiff.resume import Interrupted

        if isinstance(err, Interrupted):  # Ctrl-C or SIGTERM, stopped at a batch boundary
            print(f"csdiff {argv[0]}: {err}; {err.hint}", file=sys.stderr)
            return err.exit_code
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"csdiff: error: {error_line(err)}  (set {DEBUG_ENV}=1 for the full traceback)", file=sys.stderr)
        return 1
