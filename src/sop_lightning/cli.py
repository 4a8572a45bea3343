"""``sop-lightning fit | validate | export`` — LightningCLI in subclass mode (API.md, Command line).

:func:`main` is the console-script entry point and returns an exit status (0 on success; failures raise;
argument errors and bad values exit with status 2 and a one-line message, so a scheduler sees them);
:func:`build_cli` returns the ``SOPLightningCLI`` object for scripts and notebooks that want the trainer, model
and data module (a bad value raises :class:`ConfigError`, a ``ValueError``, with the same message).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
import traceback
import zipfile
from argparse import Action, ArgumentError
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .checkpoints import is_distributed_checkpoint

__all__ = ["ConfigError", "SOPLightningCLI", "build_cli", "main"]


class ConfigError(ValueError):
    """A bad configuration value, as a method's or data module's constructor reported it (the argument, its
    value and the constraint); :func:`main` prints it as one line and exits with status 2."""


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during, outermost first (a chain can loop back)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _library_value_error(err: BaseException) -> ValueError | None:
    """The innermost ``ValueError`` raised by sop_lightning's own code in ``err``'s chain, or None."""
    package = Path(__file__).resolve().parent
    found = None
    for link in _chain(err):
        frames = traceback.extract_tb(link.__traceback__)
        if isinstance(link, ValueError) and frames and Path(frames[-1].filename).resolve().is_relative_to(package):
            found = link
    return found


def _unexpected_keyword(err: BaseException) -> TypeError | None:
    """The ``TypeError`` "got an unexpected keyword argument" in ``err``'s chain, or None."""
    return next((e for e in _chain(err) if isinstance(e, TypeError) and "unexpected keyword argument" in str(e)), None)


def _closest(word: str, candidates: Iterable[str]) -> list[str]:
    """Up to three of ``candidates`` closest to ``word``, closest first."""
    return difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    found = _closest(word, candidates)
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _unknown_subcommand(token: str, subcommands: list[str]) -> str:
    return f"unknown subcommand {token!r}{_did_you_mean(token, subcommands)}: one of {', '.join(subcommands)}"


def _subcommands() -> list[str]:
    """LightningCLI's subcommands and the library's ``export``, in the order the help lists them."""
    return [*SOPLightningCLI.subcommands(), "export"]


def _version() -> str:
    """``sop-lightning X (torch Y, lightning Z, timm W)``: what ``--version`` prints, for bug reports."""
    import lightning
    import timm
    import torch

    from . import __version__

    versions = f"torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}"
    return f"sop-lightning {__version__} ({versions})"


def _literal_choices(text: str) -> list[Any] | None:
    """The values of every ``typing.Literal[...]`` in ``text`` (jsonargparse's report of a type), in order and
    without repeats (as strings: ``64`` and ``'64'`` are one choice on a command line); None where one cannot
    be read back."""
    choices: dict[str, Any] = {}
    for inner in re.findall(r"typing\.Literal\[(.*?)\]", text):
        try:
            values = ast.literal_eval(f"({inner},)")
        except (SyntaxError, ValueError):
            return None
        for value in values:
            choices.setdefault(str(value), value)
    return list(choices.values()) or None


def _not_one_of(name: str, given: str, choices: list[Any]) -> str:
    """``name: 'given' is not one of a, b, c (did you mean a?)`` — a value outside a ``Literal``'s choices."""
    names = [str(c) for c in choices]
    return f"{name}: {given!r} is not one of {', '.join(names)}{_did_you_mean(given, names)}"


def _type_error_line(name: str, report: str) -> str:
    """``name: report``, or :func:`_not_one_of` where ``report`` is jsonargparse's "Expected a
    typing.Literal[...]. Got value: v"."""
    literal = re.fullmatch(r"Expected a (typing\.Literal\[.*\])\. Got value: (.*)", report)
    choices = _literal_choices(literal.group(1)) if literal else None
    return _not_one_of(name, literal.group(2), choices) if choices else f"{name}: {report}"


def _parameters(class_path: str) -> list[str]:
    """The keyword arguments the class ``class_path`` takes, those it passes on in ``**kwargs`` to its bases
    included (none where it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names: dict[str, None] = {}
    for klass in getattr(cls, "__mro__", ()):
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update((p.name, None) for p in parameters if p.kind not in variadic and p.name != "self")
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break  # what it does not pass on, its bases do not see
    return list(names)


def _classes(module: str) -> list[str]:
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return [f"{module}.{n}" for n, v in vars(found).items() if inspect.isclass(v) and not n.startswith("_")]


def _argument_error_line(message: str, options: Iterable[str] = (), subcommands: Iterable[str] = ()) -> str:
    """One line for a jsonargparse parse error, naming the argument and the closest accepted names.

    jsonargparse reports an argument a method or data module does not take (``--model.init_args.num_anchorz``,
    or the same key in a YAML config) under a "Union subtypes" report of its class-path resolution; this
    keeps what the user can act on: ``model.init_args.num_anchorz: sop_lightning.SOP has no argument
    'num_anchorz' (did you mean num_anchors or ...?)``. ``options``: the subcommand's option strings
    (``--trainer.max_steps`` ...), for unknown options; ``subcommands``: the subcommand names. A message of
    another form is returned as it is."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    subcommands = list(subcommands)
    unknown = re.fullmatch(r"unrecognized arguments: (.*)", lines[0])
    if unknown and len(lines) == 1:
        tokens = unknown.group(1).split()
        flags = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
        if flags:
            options = list(options)
            return "; ".join(f"unknown argument {f}{_did_you_mean(f, options)}" for f in flags)
        if tokens and tokens[0] not in subcommands and subcommands:
            return _unknown_subcommand(tokens[0], subcommands)
        return message
    absent = re.fullmatch(r'expected "subcommand" to be one of \{.*\}, but it was not provided\.', lines[0])
    if absent and subcommands:
        return f"a subcommand is required: one of {', '.join(subcommands)} (e.g. sop-lightning fit --config CONFIG)"
    invalid = re.fullmatch(r"argument subcommand: invalid choice: '([^']*)' \(choose from .*\)", lines[0])
    if invalid and subcommands:
        return _unknown_subcommand(invalid.group(1), subcommands)
    refused = re.search(r"does not accept option '([^']+)'|^Option '([^']+)' is not accepted$", lines[0])
    if refused and len(lines) == 1:  # (not "... accepted before subcommand 'fit'": that one says what to do)
        key = refused.group(1) or refused.group(2)
        return f"unknown argument {key}{_did_you_mean(key, [o.removeprefix('--') for o in options])}"  # a config key
    missing = re.fullmatch(r"""Parser key "config": File does not exist: '(.*)'""", lines[0])
    if missing and len(lines) == 1:  # the closest config files of that folder, by stem (".yaml" is no likeness)
        path = Path(missing.group(1))
        names = {p.stem: p.name for p in sorted(path.parent.glob("*.y*ml"))} if path.parent.is_dir() else {}
        near = _closest(path.stem, names)
        hint = f" (did you mean {' or '.join(names[n] for n in near)} there?)" if near else ""
        return f"--config {str(path)!r} does not exist{hint}"
    parser_key = re.fullmatch(r'Parser key "([^"]+)":', lines[0])
    if not parser_key:
        return message
    key = parser_key.group(1)
    problem = next((i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path '")), None)
    if problem is None:
        if len(lines) == 2:
            return _type_error_line(key, lines[1])
        # a union of Literals (and None), e.g. the trainer's precision: every choice of every member
        subtypes = next((line for line in lines if line.startswith("Subtypes: [")), "")
        given = next((line.removeprefix("Given value: ") for line in lines if line.startswith("Given value: ")), None)
        members = re.sub(r"typing\.Literal\[.*?\]|<class 'NoneType'>", "", subtypes.removeprefix("Subtypes: ["))
        if given is not None and not members.strip(" ,]") and (choices := _literal_choices(subtypes)):
            return _not_one_of(key, given, choices)
        return message
    class_path = lines[problem].split("'")[1]
    detail = lines[problem + 1 :]
    if not detail:
        return message
    option = re.fullmatch(r"Option '([^']+)' is not accepted", detail[0])
    if option:
        name = option.group(1)
        hint = _did_you_mean(name, _parameters(class_path))
        return f"{key}.init_args.{name}: {class_path} has no argument {name!r}{hint}"
    inner = re.fullmatch(r'Parser key "([^"]+)":', detail[0])
    if inner and len(detail) > 1:
        return _type_error_line(f"{key}.init_args.{inner.group(1)}", detail[1])
    if re.fullmatch(r"module '[^']+' has no attribute '[^']+'", detail[0]) or "No module named" in detail[0]:
        module = class_path.rpartition(".")[0]
        return f"{key}: no class {class_path!r}{_did_you_mean(class_path, _classes(module))}"
    return message


def _short(value: Any) -> str:
    """A trainer setting as the user gave it: the repr of plain values, the class name of objects."""
    return repr(value) if value is None or isinstance(value, (str, int, float, list)) else type(value).__name__


class _PrintVersion(Action):
    """``--version``: prints :func:`_version` and exits with status 0 (the versions are read only then)."""

    def __init__(self, option_strings: list[str], dest: str = "version", **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="Print the versions of sop-lightning, torch, lightning "
                         "and timm, and exit.")  # fmt: skip

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_version())
        parser.exit()


#: the command's ``--help``: what it is and the subcommand that is not LightningCLI's
DESCRIPTION = (
    "Self-supervised ViT pre-training with SOP, DINO, iBOT, DINO-vMF and iBOT-vMF on Lightning. "
    "Choose a method and data module by class_path, e.g. sop-lightning fit --config experiments/demo/sop.yaml."
)
EPILOG = (
    "One more subcommand, not Lightning's: sop-lightning export --ckpt_path CKPT --output teacher.pth writes the "
    "teacher backbone of a method checkpoint as a timm state dict (sop-lightning export --help)."
)


class SOPLightningCLI(LightningCLI):
    """Method and data module chosen by ``class_path``; the data module's image facts (global crop
    size, patch size) are linked into the method so the ViT and the masks always agree."""

    #: model arguments set from the data module's (``data.<source>`` -> ``model.init_args.<target>``)
    LINKED = {"global_size": "img_size", "patch_size": "patch_size"}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]):
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("-V", "--version", action=_PrintVersion)

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in self.LINKED.items():
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def init_parser(self, **kwargs: Any):
        # parse errors raise (ArgumentError) instead of printing the whole usage and exiting: parse_arguments
        # turns them into one ConfigError line naming the argument and the closest accepted names
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommands = _subcommands() if parser._subcommands_action else []
            argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else []
            chosen = next((a for a in argv if a in subcommands), None)
            sub = parser._subcommands_action._name_parser_map.get(chosen) if chosen else None
            options = (sub or parser)._option_string_actions
            raise ConfigError(_argument_error_line(str(err), options, subcommands)) from err
        self._resolve_last_checkpoint()
        self._given_model = self._model_config()  # before LightningCLI applies a checkpoint's hyperparameters

    def before_instantiate_classes(self) -> None:
        self._warn_replaced_model_arguments()

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last`` with a versioned logger (the configs' TensorBoard ``save_dir``/``name``):
        Lightning looks for ``last.ckpt`` only in the *new* run's ``version_N/checkpoints``, finds none and
        trains from scratch (or validates an untrained model). Resolve it to the newest ``last*.ckpt`` of any
        version instead, so ``last`` and that file's path behave alike; the run logs into a new version folder,
        so nothing written is overwritten. With none, ``fit`` starts afresh, as Lightning's ``last`` is meant to
        (the flag can stay in a re-queued job script); ``validate`` is refused with the folder searched."""
        subcommand = self.config.get("subcommand")  # parsing: LightningCLI sets self.subcommand later
        if subcommand is None or self.config[subcommand].get("ckpt_path") != "last":
            return
        logger = self.config[subcommand].get("trainer", {}).get("logger")
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if args is None or args.get("save_dir") is None or args.get("version", "unset") is not None:
            return  # no logger, several, one without save_dir/version arguments, or a version chosen by the user
        name = args.get("name")
        root = Path(args.save_dir) / name if name else Path(args.save_dir)
        lasts = [p for p in root.glob("*/checkpoints/last*.ckpt") if p.is_file()]
        if lasts:
            newest = max(lasts, key=lambda p: p.stat().st_mtime)
            self.config[subcommand].ckpt_path = str(newest)
            rank_zero_info(f"--ckpt_path last: {newest}")
        elif subcommand != "fit":
            raise ConfigError(
                f"ckpt_path 'last': no last checkpoint under {str(root)!r} (looked for */checkpoints/last*.ckpt; "
                "a fit with ModelCheckpoint(save_last=True), as in the configs, writes one)"
            )

    def _model_config(self) -> dict[str, Any] | None:
        """The subcommand's ``model`` config as a plain dict (``class_path``, ``init_args``), or None."""
        subcommand = self.config.get("subcommand")
        model = self.config.get(subcommand, {}).get("model") if subcommand else None
        return model.clone().as_dict() if isinstance(model, Namespace) else None

    def _warn_replaced_model_arguments(self) -> None:
        """``--ckpt_path`` of a checkpoint file: LightningCLI rebuilds the model from the checkpoint's
        hyperparameters, silently replacing what the config and command line gave. Name each replaced value,
        so a resume with, say, another ``base_lr`` does not pass for one."""
        given, used = getattr(self, "_given_model", None), self._model_config()
        if not given or not used or given == used:
            return
        if given.get("class_path") != used.get("class_path"):
            replaced = [f"the method {given.get('class_path')} (checkpoint: {used.get('class_path')})"]
        else:
            args, ckpt = given.get("init_args") or {}, used.get("init_args") or {}
            linked = set(self.LINKED.values())  # set from the data module when the model is built
            replaced = [
                f"{k}={args[k]!r} (checkpoint: {ckpt[k]!r})"
                for k in args
                if k in ckpt and args[k] != ckpt[k] and k not in linked
            ]
        if replaced:
            rank_zero_warn(
                "--ckpt_path: the model is rebuilt with the checkpoint's hyperparameters, as Lightning resumes, so "
                f"these values of the config and command line are not used: {', '.join(replaced)}. To use other "
                "values, start a new run without --ckpt_path.",
                category=UserWarning,
            )

    def instantiate_classes(self) -> None:
        # jsonargparse buries a constructor's ValueError under a "Union subtypes" report: surface it alone
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = _library_value_error(err)
            if cause is not None:
                raise ConfigError(str(cause)) from cause
            unexpected = _unexpected_keyword(err)  # e.g. a checkpoint's hyperparameter this version does not take
            if unexpected is None:
                raise
            ckpt = self.config.get(self.subcommand, {}).get("ckpt_path") if self.subcommand else None
            where = f" (--ckpt_path {ckpt}: the model is rebuilt from the checkpoint's hyperparameters)" if ckpt else ""
            raise ConfigError(f"{unexpected}{where}") from unexpected

    def _parse_ckpt_path(self) -> None:
        # LightningCLI re-parses the model config with the checkpoint's hyperparameters; one it does not take
        # (a checkpoint of another version, say) is a ConfigError line, not an ArgumentError traceback
        self._check_ckpt_path()  # before LightningCLI reads it and the model and data are built: a typo costs nothing
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:
            raise ConfigError(
                f"ckpt_path: the checkpoint's hyperparameters do not fit: {_argument_error_line(str(err))}"
            ) from err

    def _check_ckpt_path(self) -> None:
        """A local ``--ckpt_path`` that does not exist, or a file that is not a whole zip archive (empty, or cut
        short by a job stopped while saving: the newest ``last.ckpt`` that ``last`` finds, say), is a
        :class:`ConfigError` naming the whole checkpoints beside it, not ``torch.load``'s traceback; Lightning's
        keywords (``last``, ``best``, ``hpc``, ``registry…``) and remote URLs pass through. A folder must be a
        distributed checkpoint (FSDP2) under ``ModelParallelStrategy``: :meth:`_check_distributed_checkpoint`."""
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt is None or ckpt in ("last", "best", "hpc") or str(ckpt).startswith("registry") or "://" in str(ckpt):
            return
        path = Path(ckpt)
        if not path.exists():
            raise ConfigError(
                f"ckpt_path {str(ckpt)!r} does not exist (a checkpoint file or distributed-checkpoint folder, "
                "or one of 'last', 'best')"
            )
        if path.is_dir():
            self._check_distributed_checkpoint(path, self.config[subcommand].get("trainer", {}).get("strategy"))
        if path.is_file() and not zipfile.is_zipfile(path):  # reads the archive's end only
            beside = [p for p in path.parent.glob("*.ckpt") if p != path and zipfile.is_zipfile(p)]
            newest = sorted(beside, key=lambda p: p.stat().st_mtime, reverse=True)[:3]
            hint = f"; the newest whole checkpoints beside it: {', '.join(p.name for p in newest)}" if newest else ""
            raise ConfigError(
                f"ckpt_path {str(ckpt)!r} is not a whole checkpoint: Lightning writes a zip archive, and this file is "
                f"empty, cut short (a job stopped while saving?) or another kind of file{hint}"
            )

    @staticmethod
    def _check_distributed_checkpoint(path: Path, strategy: Any) -> None:
        """A ``--ckpt_path`` folder must be a distributed checkpoint (``.metadata``), and only
        ``ModelParallelStrategy`` reads one: under another strategy Lightning opens the folder as a file."""
        if not is_distributed_checkpoint(path):
            raise ConfigError(f"ckpt_path {str(path)!r} is a folder but not a distributed checkpoint (no .metadata)")
        name = strategy.get("class_path", "") if isinstance(strategy, Namespace) else str(strategy)
        if not name.endswith("ModelParallelStrategy"):
            raise ConfigError(
                f"ckpt_path {str(path)!r} is a distributed checkpoint (FSDP2), which only trainer.strategy "
                f"lightning.pytorch.strategies.ModelParallelStrategy reads (on any number of devices), not "
                f"strategy={name!r}; its teacher alone: sop-lightning export --ckpt_path {path} --output teacher.pth"
            )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # the default rich progress bar gives way to --trainer.enable_progress_bar false (a batch job's log)
        if config.get("enable_progress_bar") is False:
            defaults = self.trainer_defaults.get("callbacks") or []
            defaults = [
                c for c in (defaults if isinstance(defaults, list) else [defaults]) if not isinstance(c, ProgressBar)
            ]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        try:
            return super()._instantiate_trainer(config, callbacks)
        except MisconfigurationException as err:  # e.g. accelerator gpu on a machine without one: one line
            given = ", ".join(
                f"{k}={_short(config[k])}" for k in ("accelerator", "devices", "strategy", "precision") if k in config
            )
            raise ConfigError(f"trainer: {err} ({given})") from err


def export_main(args: list[str]) -> int:
    """``sop-lightning export --ckpt_path X --output Y``: the teacher backbone as a timm state dict."""
    import argparse

    from .evaluation.export import export_checkpoint_backbone

    parser = argparse.ArgumentParser(prog="sop-lightning export", description=export_main.__doc__)
    ckpt_help = "a method checkpoint: a .ckpt file or a distributed-checkpoint folder (FSDP2)"
    parser.add_argument("--ckpt_path", required=True, help=ckpt_help)
    parser.add_argument("--output", required=True, help="where to write the timm state dict (.pth)")
    ns = parser.parse_args(args)
    try:
        kwargs = export_checkpoint_backbone(ns.ckpt_path, ns.output)
    except ValueError as err:  # not there, not a method checkpoint: named, status 2
        parser.error(str(err))
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {ns.output}\nload it with:\n  import timm, torch\n  model = timm.create_model({call})")
    print(f"  model.load_state_dict(torch.load({ns.output!r}), strict=True)")
    return 0


def build_cli(args: list[str] | None = None, run: bool = True) -> SOPLightningCLI:
    """Parse ``args`` (default ``sys.argv[1:]``) and, when ``run``, execute the subcommand; returns the CLI
    (``cli.trainer``, ``cli.model``, ``cli.datamodule``). With ``run=False`` there is no subcommand."""
    import torch

    from .callbacks import RichProgressBar

    # Float32 matmuls may use TF32 on Ampere+ GPUs; no effect on CPU.
    torch.set_float32_matmul_precision("high")
    return SOPLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RichProgressBar()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "epilog": EPILOG},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> int:
    """Console-script entry point: ``sop-lightning fit | validate | export ...``; returns the exit status."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    subcommands = _subcommands()
    if argv and not argv[0].startswith("-") and argv[0] not in subcommands:  # export is ours, not LightningCLI's
        print(f"sop-lightning: error: {_unknown_subcommand(argv[0], subcommands)}", file=sys.stderr)
        return 2
    try:
        build_cli(args)  # None: LightningCLI reads sys.argv itself
    except ConfigError as err:
        named = argv and argv[0] in subcommands
        prog = " ".join(["sop-lightning", *argv[:1]]) if named else "sop-lightning"
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
