"""Data: multi-crop views, blockwise masks, data modules and the offline demo data set."""

from .datamodule import LabelledDataModule, MultiCropBatch, SSLDataModule, collate_labelled, collate_multicrop
from .datasets import ImageFolderDataset, TransformedDataset
from .demo import FashionMNIST
from .masking import BlockMaskGenerator, MaskRatioSampler
from .transforms import MultiCropTransform, eval_transform

__all__ = [
    "MultiCropBatch",
    "SSLDataModule",
    "LabelledDataModule",
    "collate_labelled",
    "collate_multicrop",
    "ImageFolderDataset",
    "TransformedDataset",
    "FashionMNIST",
    "BlockMaskGenerator",
    "MaskRatioSampler",
    "MultiCropTransform",
    "eval_transform",
]
