"""The README's Python example runs as written and is the demo recipe it says it is."""

from pathlib import Path

import torch
import yaml
from conftest import write_fake_fmnist

ROOT = Path(__file__).resolve().parents[1]
#: Data arguments of the demo config that do not act with ``num_local: 0`` (no local crops to size).
UNUSED_WITHOUT_LOCAL_CROPS = {"local_size", "local_scale"}


def _library_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## As a library") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_library_example_of_the_readme_runs_and_is_the_demo_recipe(tmp_path, monkeypatch):
    code = _library_example()
    call = 'SSLDataModule("fashion_mnist",'
    assert code.count(call) == 1, "the example builds its data module once, from the demo data"
    # the one change: a small Fashion-MNIST-format folder (128 training images = 2 steps of 64) for the real one
    (tmp_path / "fmnist").mkdir()
    root = write_fake_fmnist(tmp_path / "fmnist", n_train=128, n_test=40)
    code = code.replace(call, f"{call} root={str(root)!r},")
    monkeypatch.chdir(tmp_path)  # Lightning's default logs and checkpoints
    scope: dict = {}
    exec(compile(code, "README.md (As a library)", "exec"), scope)

    trainer, model, data = scope["trainer"], scope["model"], scope["data"]
    assert trainer.global_step == 2
    assert 0.0 <= float(trainer.callback_metrics["val/knn_top1"]) <= 100.0
    features = scope["features"]
    assert features.shape == (scope["images"].shape[0], 192)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(features.shape[0]))

    demo = yaml.safe_load((ROOT / "experiments" / "demo" / "sop.yaml").read_text())
    assert demo["model"]["class_path"] == "sop_lightning.SOP" and type(model).__name__ == "SOP"
    for key, value in demo["model"]["init_args"].items():
        assert _plain(model.hparams[key]) == _plain(value), f"model.{key}"
    assert demo["data"]["init_args"]["num_local"] == 0
    for key, value in demo["data"]["init_args"].items():
        if key not in UNUSED_WITHOUT_LOCAL_CROPS:
            actual = data.dataset if key == "dataset" else data.hparams[key]  # a Dataset is not a hyperparameter
            assert _plain(actual) == _plain(value), f"data.{key}"
    assert (model.hparams["img_size"], model.hparams["patch_size"]) == (28, 14)  # linked by the CLI, not here
