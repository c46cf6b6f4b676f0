"""The training command line (`train.py`): LightningCLI plus what a run needs to survive faults.

- Checkpoints are written atomically (`AtomicCheckpointIO`, a trainer default that a config can still override).
- `--ckpt_path last` resumes from the newest checkpoint that loads, and says which ones it skipped; an explicit
  `--ckpt_path FILE` that cannot be read is refused with the reason and the checkpoints that would work.
- The checkpoint's architecture is checked against the config's before anything is written (`ArchitectureGuard`).
- A run whose loss diverges to NaN/inf stops with the step range and the last finite checkpoint
  (`TrainingDiverged`, tokenizer/training/divergence.py), not with status 0 and a NaN model.
- One training per run directory: global rank 0 locks the run directory (and a checkpoint directory outside it)
  before anything is read or written there (`run_lock.py`); a second `fit` into it is refused at once, naming the
  holder's host and pid. A resume after the first run ended (or died: the kernel drops its lock) works.
- Progress: `StepProgress` (tokenizer/training/progress.py) replaces Lightning's default bar: a bar on a terminal,
  plain lines in a log, and neither reads the device between logging steps.
- A config value that a class refuses while it is built (TokenizerConfig's ranges) is reported as that class's
  own error, not inside jsonargparse's union-type message.
- SIGTERM or SIGUSR1 stops the run at a batch boundary, on every rank, after a checkpoint of that step, with exit
  status 128 + the signal number (`StopOnSignal`, tokenizer/training/preemption.py; `--stop_on_signal.*`).
- A rank that stops answering fails the others after `--collective_timeout` seconds (10 minutes by default, not
  PyTorch's 30), with one line naming the rank and the collective (tokenizer/training/collective_timeout.py).
- The run's `config.yaml` is written only once the restore has succeeded (a failed resume with a wrong config
  must not replace the one config that resumes the run). A resume whose config differs keeps the previous file as
  `config.1.yaml`, `config.2.yaml`, ... so the run's history stays readable.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from tokenizer.atomic import write_text

from ..checkpoints import CheckpointError, checkpoint_files, newest_first, newest_loadable, read_checkpoint
from .checkpoints import check_architecture
from .collective_timeout import DEFAULT_COLLECTIVE_TIMEOUT_S, collective_failure_message, strategy_with_timeout
from .config_files import expand_config_args
from .preemption import StopOnSignal, TrainingStopped, exit_status
from .progress import StepProgress
from .run_lock import lock_run_directories


class SaveConfigAfterRestore(SaveConfigCallback):
    """LightningCLI's config saver, moved from `setup` (before the checkpoint is restored) to `on_train_start`
    (after it), atomic, and keeping earlier versions that differ. Only `fit` writes: `validate` or `test` with
    another config must not rewrite the training run's record."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return
        log_dir = trainer.log_dir  # a collective (broadcast): every rank calls it
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            text = self.parser.dump(self.config, skip_none=False)
            if path.is_file() and path.read_text() != text:
                n = 1
                while (older := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
                    n += 1
                os.replace(path, older)  # same directory: atomic, and nothing is lost
            write_text(path, text)
        self.already_saved = True


class TrainCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", SaveConfigAfterRestore)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # versions are kept by the saver itself
        defaults = kwargs.setdefault("trainer_defaults", {})
        defaults.setdefault("plugins", [{"class_path": "tokenizer.training.checkpoints.AtomicCheckpointIO"}])
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")  # in every run, its settings in the config
        parser.add_argument("--collective_timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                            help="seconds a rank waits in a collective for the others before it fails naming the "
                                 "collective (with --trainer.strategy given by name, e.g. ddp)")

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:  # configs with `base:` / `run:` keys are merged first (config_files.py)
            self.config = parser.parse_args(expand_config_args(sys.argv[1:] if args is None else list(args)))
        # LightningCLI itself opens an explicit --ckpt_path right after parsing (to read its hyperparameters),
        # so an unreadable file has to be explained here, before that bare load fails.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path not in (None, "last", "hpc", "best"):
            readable_or_explain(ckpt_path)

    def instantiate_trainer(self, **kwargs):
        """The config's Trainer, with StepProgress as its progress bar unless the config turns the bar off or
        names one itself, and a strategy given by name bounded by --collective_timeout."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, StepProgress()])
        strategy = trainer_config.get("strategy", "auto")
        timed = strategy_with_timeout(strategy, config.get("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S))
        if timed is not None:
            kwargs.setdefault("strategy", timed)
        trainer = super().instantiate_trainer(**kwargs)
        if timed is None and strategy == "auto" and trainer.world_size > 1:
            rank_zero_warn("--trainer.strategy auto: the collective timeout is Lightning's (30 minutes), not "
                           "--collective_timeout; pass --trainer.strategy ddp to bound it")
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            # jsonargparse reports an error raised while a class is built (a config value out of its range) as
            # "Does not validate against any of the Union subtypes ...", several lines around the class's own
            # error, which is its cause: that error is the one to show
            if e.__cause__ is None:
                raise
            raise e.__cause__ from None

    def before_fit(self) -> None:
        self.run_lock = lock_run_directories(self.trainer)  # first: a second writer is refused before any work
        try:
            fit = self.config_init[self.subcommand]
            fit["ckpt_path"] = self.resolve_resume(fit.get("ckpt_path"))
            if fit["ckpt_path"] not in (None, "last", "hpc", "best") and hasattr(self.model, "architecture"):
                # a file: refuse another architecture before anything is set up ("last" left to Lightning's own
                # lookup is checked by ArchitectureGuard when the module loads it)
                check_architecture(read_checkpoint(fit["ckpt_path"]), self.model.architecture(),
                                   str(fit["ckpt_path"]))
        except BaseException:
            self.run_lock.close()
            raise

    def fit(self, **kwargs) -> None:
        """`trainer.fit`, with the run directories' lock released however it ends (a process that dies releases
        it too: the kernel drops it)."""
        try:
            self.trainer.fit(**kwargs)
        finally:
            self.run_lock.close()

    def resolve_resume(self, ckpt_path: str | None) -> str | None:
        """`last` -> the newest checkpoint that loads, of the ModelCheckpoint directories and the SLURM requeue
        checkpoints (`hpc_ckpt_*.ckpt` in default_root_dir, which Lightning's own `last` ignores). None if there
        is none: a first start with `--ckpt_path last`, as the SLURM script does, trains from scratch."""
        ckpt_path = None if ckpt_path is None else str(ckpt_path)
        if ckpt_path in (None, "hpc", "best"):
            return ckpt_path
        dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if ckpt_path == "last":
            if not dirs:
                return ckpt_path  # the directory is only known after setup: Lightning's own lookup
            candidates = newest_first(checkpoint_files(dirs)
                                      + checkpoint_files([self.trainer.default_root_dir], "hpc_ckpt_*.ckpt"))
            path, rejected = newest_loadable(candidates)
            for reason in rejected:
                print(f"resume: skipping {reason}", file=sys.stderr)
            if path is None:
                if rejected:
                    raise CheckpointError(f"--ckpt_path last: no checkpoint in {', '.join(map(str, dirs))} loads; "
                                          "start a new run, or pass --ckpt_path with a checkpoint from elsewhere")
                print(f"resume: no checkpoint in {', '.join(map(str, dirs))} yet; training from scratch",
                      file=sys.stderr)
                return None
            print(f"resume: from {path}", file=sys.stderr)
            return str(path)
        return ckpt_path  # an explicit file: parse_arguments has already checked that it reads


def readable_or_explain(ckpt_path: str) -> None:
    """Raise CheckpointError when `ckpt_path` cannot be read, naming the checkpoints beside it that can."""
    try:
        read_checkpoint(ckpt_path)
    except CheckpointError as e:
        usable = [str(p) for p in checkpoint_files([os.path.dirname(os.path.abspath(ckpt_path))])
                  if p.resolve() != Path(ckpt_path).resolve() and _loads(p)]
        hint = (" Checkpoints that load: " + ", ".join(usable[:5]) + " (or --ckpt_path last).") if usable else ""
        raise CheckpointError(f"{e}.{hint}") from e


def _loads(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


def main(args: list[str] | None = None) -> TrainCLI:
    """Entry point of train.py, which runs it through tokenizer.errors.run_command: a CheckpointError, a
    TrainingDiverged, a DirectoryInUse, a full disk or a bad config value ends the command with one line, status 1.
    Here: a collective that timed out or lost its peer ends with one line too, status 1; a signal that stopped the
    run exits with 128 + the signal number (TrainingStopped; Lightning's SIGTERMException, a SystemExit with status
    0, before training started or in validate/test). Called from Python (`args` given: tests), the exceptions reach
    the caller."""
    from tokenizer.gpu import enable_fast_math

    enable_fast_math()  # TF32 + cuDNN autotuning on GPU; nothing changes on CPU
    try:
        return TrainCLI(parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else {}, args=args)
    except TrainingStopped as e:
        if args is not None:
            raise
        print(f"stop: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except SIGTERMException:
        if args is not None:
            raise
        print("stop: SIGTERM, handled by Lightning (before training started, or in validate/test): no checkpoint "
              f"written. Exit status {exit_status(signal.SIGTERM)} (128 + SIGTERM).", file=sys.stderr)
        sys.exit(exit_status(signal.SIGTERM))
    except RuntimeError as e:
        message = collective_failure_message(e)
        if message is None or args is not None:
            raise  # DirectoryInUse and the rest: run_command's
        sys.exit(f"train.py: error: {message}")


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["TrainCLI", "SaveConfigAfterRestore", "main"]
