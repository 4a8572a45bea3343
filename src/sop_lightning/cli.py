"""``sop-lightning fit | validate`` — LightningCLI in subclass mode (API.md, Command line)."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

__all__ = ["SOPLightningCLI", "main"]


class SOPLightningCLI(LightningCLI):
    """Method and data module chosen by ``class_path``; the data module's image facts (global crop
    size, patch size) are linked into the method so the ViT and the masks always agree."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.global_size", "model.init_args.img_size", apply_on="instantiate")
        parser.link_arguments("data.patch_size", "model.init_args.patch_size", apply_on="instantiate")


def export_main(args: list[str]) -> None:
    """``sop-lightning export --ckpt_path X --output Y``: the teacher backbone as a timm state dict."""
    import argparse

    from .evaluation.export import export_checkpoint_backbone

    parser = argparse.ArgumentParser(prog="sop-lightning export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a sop_lightning method checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="where to write the timm state dict (.pth)")
    ns = parser.parse_args(args)
    kwargs = export_checkpoint_backbone(ns.ckpt_path, ns.output)
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {ns.output}\nload it with:\n  import timm, torch\n  model = timm.create_model({call})")
    print(f"  model.load_state_dict(torch.load({ns.output!r}), strict=True)")


def main(args: list[str] | None = None, run: bool = True) -> SOPLightningCLI | None:
    import torch

    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return None

    # Float32 matmuls may use TF32 on Ampere+ GPUs; no effect on CPU.
    torch.set_float32_matmul_precision("high")
    return SOPLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RichProgressBar()]},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
