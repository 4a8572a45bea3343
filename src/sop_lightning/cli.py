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


def main(args: list[str] | None = None, run: bool = True) -> SOPLightningCLI:
    import torch

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
