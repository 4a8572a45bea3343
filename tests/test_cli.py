import importlib.metadata
import re
import warnings
from pathlib import Path

import pytest
import yaml

from sop_lightning.cli import ConfigError, _argument_error_line, _library_value_error, build_cli, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").rglob("*.yaml"))
DEMO = sorted((ROOT / "experiments" / "demo").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: sop_lightning." in out
    if "imagenet" in config.parts and not config.stem.startswith("linear"):
        # k-NN monitoring at a bounded cost: every n epochs, ending on the last one, on fixed subsets
        cfg = yaml.safe_load(out)
        every, epochs = cfg["trainer"]["check_val_every_n_epoch"], cfg["trainer"]["max_epochs"]
        assert every >= 5 and epochs % every == 0
        data = cfg["data"]["init_args"]
        assert 0 < data["knn_train_subset"] <= 200_000 and 0 < data["knn_val_subset"] <= 50_000


def test_full_knn_evaluation_command_of_the_readme(capsys):
    readme = (ROOT / "README.md").read_text()
    overrides = ["--data.init_args.knn_train_subset", "null", "--data.init_args.knn_val_subset", "null"]
    assert " ".join(overrides) in readme
    config = ROOT / "experiments" / "imagenet" / "sop_vits16.yaml"
    with pytest.raises(SystemExit):
        main(["validate", "--config", str(config), *overrides, "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["knn_train_subset"] is None and data["knn_val_subset"] is None


@pytest.mark.parametrize("config", DEMO, ids=lambda p: p.stem)
def test_two_step_fit_of_demo_config(config, fake_fmnist, tmp_path):
    cli = build_cli(
        [
            "fit", "--config", str(config),
            "--data.init_args.root", str(fake_fmnist), "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "4",
            "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    events = list(Path(tmp_path).rglob("events.out.tfevents.*"))
    assert events, "TensorBoard logs were not written"
    ckpts = list(Path(tmp_path).rglob("*.ckpt"))
    assert ckpts
    # linked data facts reached the model (the demo's 2 x 2 grid: 14-px patches on 28-px views)
    assert cli.model.hparams.img_size == 28 and cli.model.hparams.patch_size == 14


def test_a_bad_value_is_one_line_and_status_2_from_main_and_a_config_error_from_build_cli(capsys):
    sop = ["fit", "--config", str(ROOT / "experiments" / "demo" / "sop.yaml"), "--trainer.logger", "false"]
    assert main([*sop, "--model.init_args.num_anchors", "1"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "sop-lightning fit: error: num_anchors (K) must be >= 2, got 1"
    with pytest.raises(ConfigError, match=r"^grayscale_prob must be a probability in \[0, 1\], got 1.5$"):
        build_cli([*sop, "--data.init_args.grayscale_prob", "1.5"])


SOP_DEMO = ["fit", "--config", str(ROOT / "experiments" / "demo" / "sop.yaml"), "--trainer.logger", "false"]
MISSPELT = {
    # an argument of the method: named with its class, not under jsonargparse's "Union subtypes" report
    "model-argument": (["--model.init_args.num_anchorz", "2"],
                       "model.init_args.num_anchorz: sop_lightning.SOP has no argument 'num_anchorz' (did you mean "
                       "num_anchors or num_patch_anchors or num_neighbors?)"),
    # one SOP passes on in **kwargs to its base class
    "inherited-argument": (["--model.init_args.momentum_teacher_ned", "1"],
                           "model.init_args.momentum_teacher_ned: sop_lightning.SOP has no argument "
                           "'momentum_teacher_ned' (did you mean momentum_teacher_end or "),
    "data-argument": (["--data.init_args.batch_sise", "2"],
                      "data.init_args.batch_sise: sop_lightning.SSLDataModule has no argument 'batch_sise' (did you "
                      "mean batch_size"),
    "trainer-argument": (["--trainer.max_stepz", "2"], "unknown argument --trainer.max_stepz (did you mean "
                         "--trainer.max_steps or "),
    "nested-class-argument": (["--trainer.logger", "TensorBoardLogger", "--trainer.logger.init_args.save_dirr", "x"],
                              "trainer.logger.init_args.save_dirr: lightning.pytorch.loggers.TensorBoardLogger has no "
                              "argument 'save_dirr' (did you mean save_dir"),
    "wrong-type": (["--model.init_args.num_anchors", "many"],
                   "model.init_args.num_anchors: Expected a <class 'int'>. Got value: many"),
    "method-class": (["--model", "sop_lightning.SOPP"], "model: no class 'sop_lightning.SOPP' (did you mean "
                     "sop_lightning.SOP or "),
    # a value outside a Literal's choices: the choices and the closest, not "Expected a typing.Literal[...]"
    "literal-value": (["--model.init_args.contribution", "sofft"],
                      "model.init_args.contribution: 'sofft' is not one of soft, onehot, uniform (did you mean soft?)"),
    # Lightning's precision: a union of three Literals (and None), every choice listed once
    "literal-union": (["--trainer.precision", "bf17"],
                      "trainer.precision: 'bf17' is not one of 64, 32, 16, transformer-engine, "
                      "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16 "
                      "(did you mean bf16"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISSPELT))
def test_a_misspelt_argument_is_one_line_naming_it_and_the_closest_names(case, capsys):
    extra, expected = MISSPELT[case]
    assert main([*SOP_DEMO, *extra]) == 2
    err = capsys.readouterr().err.strip()  # in-process: also LightningCLI's warning that pytest has an argv
    assert "usage:" not in err and "Union" not in err, err  # no 50-line usage, no class-path resolution report
    assert err.splitlines()[-1].startswith("sop-lightning fit: error: " + expected), err
    with pytest.raises(ConfigError) as raised:  # build_cli, for scripts and notebooks: a ValueError, same words
        build_cli([*SOP_DEMO, *extra], run=False)
    assert str(raised.value).startswith(expected), raised.value


def test_a_misspelt_key_of_a_config_file_is_named_too(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stepz: 3\n")
    assert main([*SOP_DEMO, "--config", str(typo)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sop-lightning fit: error: unknown argument trainer.max_stepz (did you mean trainer.max_steps or "
        "trainer.max_time or trainer.min_steps?)"
    )
    typo.write_text("model:\n  init_args:\n    koleo_weigth: 0.1\n")
    assert main([*SOP_DEMO, "--config", str(typo)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sop-lightning fit: error: model.init_args.koleo_weigth: sop_lightning.SOP has no argument 'koleo_weigth' "
        "(did you mean koleo_weight?)"
    )


def test_argument_error_lines_of_other_forms():
    assert _argument_error_line("unrecognized arguments: fti", subcommands=["fit", "validate"]) == (
        "unknown subcommand 'fti' (did you mean fit?): one of fit, validate"
    )
    invalid = "argument subcommand: invalid choice: 'vaildate' (choose from 'fit', 'validate')"  # run=True's form
    assert _argument_error_line(invalid, subcommands=["fit", "validate"]) == (
        "unknown subcommand 'vaildate' (did you mean validate?): one of fit, validate"
    )
    unreadable = 'Parser key "x":\n  Expected a typing.Literal[<Enum.A: 1>]. Got value: B'  # no literal values
    assert _argument_error_line(unreadable) == "x: Expected a typing.Literal[<Enum.A: 1>]. Got value: B"
    assert _argument_error_line("unrecognized arguments: --zzz 1", options=["--trainer.max_steps"]) == (
        "unknown argument --zzz"
    )
    before = "Option 'trainer.max_steps' is not accepted before subcommand 'fit'"  # a top-level config key
    assert _argument_error_line(before, options=["--trainer.max_steps"]) == before  # says what to do already
    other = 'Parser key "model":\n  something else\n  entirely'
    assert _argument_error_line(other) == other  # a form it does not know: as it is


@pytest.mark.parametrize(("word", "closest"), [("fitt", "fit"), ("exprot", "export")])
def test_a_misspelt_subcommand_is_one_line_with_the_closest(word, closest, capsys):
    assert main([word, "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sop-lightning: error: unknown subcommand {word!r} (did you mean {closest}?): one of fit, validate, test, "
        "predict, export"
    )


def test_a_missing_config_file_is_one_line_with_the_closest_of_its_folder(tmp_path, capsys):
    for name in ("sop.yaml", "dino.yaml", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    assert main(["fit", "--config", str(tmp_path / "sopp.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sop-lightning fit: error: --config {str(tmp_path / 'sopp.yaml')!r} does not exist (did you mean sop.yaml "
        "there?)"
    )
    assert main(["fit", "--config", str(tmp_path / "nowhere" / "sop.yaml")]) == 2  # no folder: nothing to suggest
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sop-lightning fit: error: --config {str(tmp_path / 'nowhere' / 'sop.yaml')!r} does not exist"
    )


def test_no_subcommand_is_one_line_naming_them_all(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "sop-lightning: error: a subcommand is required: one of fit, validate, test, predict, export "
        "(e.g. sop-lightning fit --config CONFIG)"
    )


def test_version_prints_the_installed_versions_and_exits_zero(capsys):
    import lightning
    import timm
    import torch

    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as exit_info:
            main([flag])
        assert exit_info.value.code in (0, None)
        assert capsys.readouterr().out.strip() == (
            f"sop-lightning {importlib.metadata.version('sop_lightning')} (torch {torch.__version__}, "
            f"lightning {lightning.__version__}, timm {timm.__version__})"
        )


def test_top_level_help_names_the_methods_and_the_export_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps lines, at hyphens too
    assert exit_info.value.code in (0, None)
    assert "SOP, DINO, iBOT, DINO-vMF and iBOT-vMF" in out and "sop-lightning export --ckpt_path CKPT" in out
    assert "--version" in out


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code in (0, None) and "--trainer.max_steps" in capsys.readouterr().out


def test_a_checkpoint_hyperparameter_the_method_does_not_take_is_a_config_error(tmp_path, capsys):
    import torch

    ckpt = tmp_path / "other_version.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "sop_lightning.SOP", "num_anchorz": 3}, "state_dict": {}}, ckpt)
    args = ["validate", "--config", str(ROOT / "experiments" / "demo" / "sop.yaml"), "--ckpt_path", str(ckpt)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sop-lightning validate: error: SelfDistillation.__init__() got an unexpected keyword argument 'num_anchorz' "
        f"(--ckpt_path {ckpt}: the model is rebuilt from the checkpoint's hyperparameters)"
    )


def test_only_value_errors_raised_by_the_library_are_reported_as_config_errors():
    from sop_lightning.methods.sop import SOP

    def outside():  # raised here, in the tests, not in sop_lightning
        raise ValueError("not ours")

    with pytest.raises(ValueError) as foreign:
        try:
            outside()
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    assert _library_value_error(foreign.value) is None
    with pytest.raises(ValueError) as ours:
        SOP(num_anchors=1)
    assert _library_value_error(ours.value) is ours.value


def _tiny_dino(root: Path, *extra: str) -> list[str]:
    """The demo DINO config at a size for a test (a 1-block d32 ViT, batches of 4), then ``extra``."""
    return ["--config", str(ROOT / "experiments" / "demo" / "dino.yaml"),
            "--data.init_args.root", str(root), "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "4", "--model.init_args.embed_dim", "32", "--model.init_args.depth", "1",
            "--model.init_args.num_heads", "2", "--model.init_args.hidden_dim", "32",
            "--model.init_args.num_prototypes", "16", "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def test_a_resume_names_the_model_values_the_checkpoint_replaces(fake_fmnist, tmp_path):
    """LightningCLI rebuilds the model of ``--ckpt_path`` from the checkpoint's hyperparameters; a value the
    user changed for the resume is not used, and the warning says which, with both values."""
    tiny = _tiny_dino(fake_fmnist, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path))
    build_cli(["fit", *tiny, "--trainer.max_steps", "2"])
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match=r"--ckpt_path: .*: base_lr=0\.1 \(checkpoint: 0\.001\)\. ") as record:
        cli = build_cli(["fit", *tiny, "--trainer.max_steps", "3", "--model.init_args.base_lr", "0.1",
                         "--ckpt_path", ckpt])  # fmt: skip
    assert cli.model.hparams.base_lr == 0.001 and cli.trainer.global_step == 3  # the checkpoint's, resumed
    named = [str(w.message) for w in record if str(w.message).startswith("--ckpt_path:")]
    assert len(named) == 1 and "img_size" not in named[0]  # linked from the data module: not the user's
    with warnings.catch_warnings(record=True) as record:  # the same values: nothing to say
        warnings.simplefilter("always")
        build_cli(["validate", *tiny, "--ckpt_path", ckpt])
    assert not [w for w in record if str(w.message).startswith("--ckpt_path:")]


def test_ckpt_path_last_finds_the_newest_version(fake_fmnist, tmp_path, monkeypatch):
    """``--ckpt_path last`` under the configs' versioned TensorBoard folders: the first fit starts afresh,
    the next resumes ``version_0/checkpoints/last.ckpt`` (Lightning alone would look in the new, empty
    ``version_1`` and train from scratch), the one after that ``version_1``'s; ``validate`` takes the newest
    too, and is refused by name where there is none."""
    monkeypatch.chdir(tmp_path)
    tiny = _tiny_dino(fake_fmnist, "--trainer.default_root_dir", "runs", "--trainer.logger.init_args.save_dir", "runs",
                      "--ckpt_path", "last")  # fmt: skip
    with pytest.raises(ConfigError, match=r"ckpt_path 'last': no last checkpoint under 'runs/dino'"):
        build_cli(["validate", *tiny])
    first = build_cli(["fit", *tiny, "--trainer.max_steps", "2"])
    assert first.trainer.ckpt_path is None and first.trainer.global_step == 2
    runs = tmp_path / "runs" / "dino"
    with pytest.warns(UserWarning, match=r"--ckpt_path: .*: base_lr=0\.1 \(checkpoint: 0\.001\)\. "):
        again = build_cli(["fit", *tiny, "--trainer.max_steps", "4", "--model.init_args.base_lr", "0.1"])
    assert again.model.hparams.base_lr == 0.001  # as for the checkpoint's own path: its hyperparameters
    assert Path(again.trainer.ckpt_path).resolve() == (runs / "version_0" / "checkpoints" / "last.ckpt").resolve()
    assert again.trainer.global_step == 4 and again.trainer.logger.version == 1  # a new folder: nothing overwritten
    third = build_cli(["fit", *tiny, "--trainer.max_steps", "6"])
    assert Path(third.trainer.ckpt_path).resolve() == (runs / "version_1" / "checkpoints" / "last.ckpt").resolve()
    assert third.trainer.global_step == 6
    val = build_cli(["validate", *tiny])
    assert Path(val.trainer.ckpt_path).resolve() == (runs / "version_2" / "checkpoints" / "last.ckpt").resolve()
    # the newest last.ckpt cut short (a job stopped while saving it): refused by name, with the whole ones beside it
    newest = runs / "version_2" / "checkpoints" / "last.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    step = next(p.name for p in newest.parent.glob("*.ckpt") if p != newest)
    for subcommand in ("fit", "validate"):
        with pytest.raises(ConfigError) as refused:
            build_cli([subcommand, *tiny])
        assert str(refused.value) == (
            f"ckpt_path {str(newest.relative_to(tmp_path))!r} is not a whole checkpoint: Lightning writes a zip "
            "archive, and this file is empty, cut short (a job stopped while saving?) or another kind of file; the "
            f"newest whole checkpoints beside it: {step}"
        )


def test_a_ckpt_path_folder_must_be_a_distributed_checkpoint_read_by_model_parallel(fake_fmnist, tmp_path):
    """A folder that is no distributed checkpoint, and a distributed checkpoint under a strategy that would open
    it as a file (every one but ``ModelParallelStrategy``), are refused by name before anything is built."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded.ckpt"
    plain.mkdir()
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")  # the file torch.distributed.checkpoint writes first
    tiny = _tiny_dino(fake_fmnist, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        build_cli(["validate", *tiny, "--ckpt_path", str(plain)])
    assert str(refused.value) == f"ckpt_path {str(plain)!r} is a folder but not a distributed checkpoint (no .metadata)"
    for strategy in ("auto", "ddp"):
        with pytest.raises(ConfigError) as refused:
            build_cli(["validate", *tiny, "--ckpt_path", str(sharded), "--trainer.strategy", strategy])
        assert str(refused.value) == (
            f"ckpt_path {str(sharded)!r} is a distributed checkpoint (FSDP2), which only trainer.strategy "
            "lightning.pytorch.strategies.ModelParallelStrategy reads (on any number of devices), not "
            f"strategy={strategy!r}; its teacher alone: sop-lightning export --ckpt_path {sharded} --output teacher.pth"
        )


def test_a_trainer_setting_lightning_refuses_is_one_line_with_the_settings(fake_fmnist, tmp_path, capsys):
    """Lightning's MisconfigurationException (``accelerator gpu`` where there is none, ``devices 0``) is a
    ConfigError naming the trainer's device settings, and status 2 from :func:`main`."""
    tiny = _tiny_dino(fake_fmnist, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path))
    assert main(["fit", *tiny, "--trainer.accelerator", "cpu", "--trainer.devices", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sop-lightning fit: error: trainer: `Trainer(devices='0')` value is not a valid input using cpu accelerator. "
        "(accelerator='cpu', devices='0', strategy='auto', precision='32-true')"
    )
