"""``SSLDataModule``: multi-crop views and blockwise masks built in the workers, plus labelled splits
for k-NN evaluation (ARCHITECTURE.md, ALGORITHMS.md §9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .datasets import ImageFolderDataset, IndexedDataset, TransformedDataset
from .demo import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from .masking import BlockMaskGenerator, MaskRatioSampler
from .order import ResumableLoader, TrainingOrder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, eval_transform

__all__ = [
    "MultiCropBatch",
    "ResumableLoader",
    "collate_multicrop",
    "collate_labelled",
    "SSLDataModule",
    "LabelledDataModule",
]


@dataclass
class MultiCropBatch:
    """One training batch. ``views``: ``V`` tensors ``(B, 3, h, w)``, globals first; ``masks``: bool
    ``(2, B, H', W')`` for the global views (True = masked; all False when masking is off);
    ``labels``: ``(B,)`` or ``None`` for unlabelled data; ``indices``: ``(B,)`` data-set index of each
    image (what memory banks with ``track_indices`` keep), or ``None``."""

    views: list[Tensor]
    masks: Tensor
    labels: Tensor | None = None
    indices: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiCropBatch:
        """The batch on ``device``. Lightning moves a batch with a ``to`` method by calling it, which costs a
        few microseconds, instead of walking the dataclass field by field (≈ 2 ms a step)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return MultiCropBatch([move(v) for v in self.views], move(self.masks), move(self.labels), move(self.indices))

    def pin_memory(self) -> MultiCropBatch:
        return MultiCropBatch(
            [v.pin_memory() for v in self.views],
            self.masks.pin_memory(),
            None if self.labels is None else self.labels.pin_memory(),
            None if self.indices is None else self.indices.pin_memory(),
        )

    def __iter__(self):  # allows `views, masks, labels = batch`
        return iter((self.views, self.masks, self.labels))


def _labels(labels: Sequence[int | None]) -> Tensor | None:
    if any(label is None for label in labels):
        return None
    return torch.as_tensor(labels, dtype=torch.long)


def resolve_dataset(
    source: str | Dataset,
    root: str,
    split: Literal["train", "test"] = "train",
    on_bad_image: Literal["raise", "skip"] = "raise",
    name: str = "dataset",
) -> Dataset:
    """``"fashion_mnist"`` → the demo split under ``root``; another string → an image folder; a ``Dataset``
    is returned as it is. An empty data set is an error naming the argument ``name``."""
    if isinstance(source, str):
        if source == "fashion_mnist":
            return FashionMNIST(root, split)
        return ImageFolderDataset(source, on_bad_image=on_bad_image)
    try:
        n = len(source)  # type: ignore[arg-type]
    except TypeError:
        return source  # no length: nothing to check here
    if n == 0:
        raise ValueError(f"{name}={type(source).__name__} is empty: it has no images")
    return source


def check_sources(root: str, **sources: str | Dataset | None) -> None:
    """Refuse at construction, before any training, a source that names no folder: ``"fashion_mnist"`` needs
    ``root`` to be a folder (of the IDX files), another string is an image folder. The error names the
    argument and its value; files inside the folders are checked when the data sets are built."""
    for name, source in sources.items():
        if source == "fashion_mnist":
            if not Path(root).is_dir():
                raise ValueError(
                    f"root={str(root)!r} is not a folder: {name}='fashion_mnist' reads the Fashion-MNIST IDX files "
                    "from it. Install the demo data with `sudo apt-get install dataset-fashion-mnist` (files in "
                    f"{DEFAULT_FASHION_MNIST_ROOT}), or pass root= a folder holding the IDX files"
                )
        elif isinstance(source, str) and not Path(source).is_dir():
            raise ValueError(
                f"{name}={source!r} is not a folder: a string names an image folder (class sub-folders or a flat "
                "folder of images), or 'fashion_mnist'"
            )


def _image_side(image) -> int | None:
    """Shorter side in pixels of a PIL image, a tensor ``(..., H, W)`` or an array ``(H, W[, C])``."""
    if isinstance(getattr(image, "size", None), tuple):
        return min(image.size)
    if isinstance(image, Tensor) and image.ndim >= 2:
        return min(image.shape[-2:])
    shape = getattr(image, "shape", None)
    return min(shape[:2]) if shape is not None and len(shape) >= 2 else None


def check_image_size(dataset: Dataset, crop: int, name: str = "dataset", samples: int = 8) -> None:
    """Refuse, before training, a data set whose images are smaller than the crop they are trained at
    (CIFAR images under a 224-px ImageNet config): up to ``samples`` seeded images are read and their
    median shorter side compared with ``crop``. Single small images (ImageNet has a few) do not trigger it:
    ``RandomResizedCrop`` upsamples them as in the papers."""
    n = len(dataset)  # type: ignore[arg-type]
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(samples, n)].tolist()
    sides = []
    header = getattr(dataset, "image_side", None)  # image folders: read the size from the header only
    for i in picks:
        if callable(header):
            side = header(i)
        else:
            item = dataset[i]
            side = _image_side(item[0] if isinstance(item, (tuple, list)) else item)
        if side is not None:
            sides.append(side)
    if sides:
        median = sorted(sides)[len(sides) // 2]
        if median < crop:
            raise ValueError(
                f"the images of {name} are smaller than the crop: median shorter side {median} px < global_size="
                f"{crop} (of {len(sides)} sampled images); set global_size (and local_size, patch_size) to the "
                "data, or pass allow_upscale=True to train on upsampled images"
            )


def collate_multicrop(samples: list) -> MultiCropBatch:
    """``[(views, masks (2,H',W'), label[, index]), ...]`` → :class:`MultiCropBatch` (view-major)."""
    views = [torch.stack([s[0][v] for s in samples]) for v in range(len(samples[0][0]))]
    masks = torch.stack([s[1] for s in samples], dim=1)
    indices = torch.as_tensor([s[3] for s in samples], dtype=torch.long) if len(samples[0]) > 3 else None
    return MultiCropBatch(views, masks, _labels([s[2] for s in samples]), indices)


def collate_labelled(samples: list) -> tuple[Tensor, ...]:
    """``[(image, label[, index]), ...]`` → ``(images (B,3,H,W), labels (B,)[, indices (B,)])``, label -1
    where unknown."""
    labels = [-1 if s[1] is None else s[1] for s in samples]
    out = (torch.stack([s[0] for s in samples]), torch.as_tensor(labels, dtype=torch.long))
    if len(samples[0]) > 2:
        out += (torch.as_tensor([s[2] for s in samples], dtype=torch.long),)
    return out


def _fixed_subset(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """``size`` images drawn once without replacement (seeded, index order kept), or ``dataset`` itself."""
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return Subset(dataset, keep.tolist())


class _MaskSampler:
    """Draws the masks ``(num_views, H', W')`` of the global views of one image in the worker (§9.2–9.3);
    without a generator (masking off) they are all False, still of the real grid (API.md)."""

    def __init__(self, grid: int, generator: BlockMaskGenerator | None, ratios: MaskRatioSampler, num_views: int = 2):
        self.grid, self.generator, self.ratios, self.num_views = (grid, grid), generator, ratios, num_views

    def __call__(self) -> Tensor:
        if self.generator is None:
            return torch.zeros(self.num_views, *self.grid, dtype=torch.bool)
        return torch.stack([self.generator(self.ratios()) for _ in range(self.num_views)])


class SSLDataModule(L.LightningDataModule):
    """Multi-crop self-supervised training data plus labelled k-NN splits.

    Args:
        dataset: ``"fashion_mnist"`` (the offline demo data, Debian ``dataset-fashion-mnist``), a path to
            an image folder (class sub-folders or flat), or any torchvision-style ``Dataset`` returning
            ``(image, label)`` or images (PIL or tensor).
        root: folder of the Fashion-MNIST IDX files (default ``/usr/share/datasets/fashion-mnist``).
        knn_train_dataset, knn_val_dataset: labelled splits for k-NN evaluation (same forms as
            ``dataset``). For ``"fashion_mnist"`` they default to its train and test splits; for a
            labelled folder, ``knn_train_dataset`` defaults to that folder.
        knn_train_subset, knn_val_subset: monitor on a fixed random subset of n images of a k-NN split (the
            same at every validation and on every rank, all classes represented even in a class-sorted
            folder); ``None`` evaluates the whole split (the protocol of §11.1).
        batch_size: images per rank and step.
        global_size, local_size, num_local, global_scale, local_scale: multi-crop (§9.1).
        flip_prob, jitter, jitter_prob, grayscale_prob, blur_sigma, blur_probs, blur_reference_size,
        solarize_prob: the per-view augmentations of :class:`MultiCropTransform` (blur probabilities for
            global 1, global 2, locals; ``blur_reference_size`` scales ``blur_sigma`` to each crop's size).
        patch_size: ViT patch size; with ``global_size`` it fixes the mask grid (linked to the model).
        mask_ratio, mask_ratio_var: §9.3 (iBOT recipe ``[0, 0.3] ± [0, 0.2]``); ``masking=False`` gives
            all-False masks (DINO).
        mask_shape: ``"block"`` or ``"rand"``.
        eval_resize_ratio: eval transform resizes to ``global_size·ratio`` then centre-crops.
        augmentation_seed: base seed of the data order and of the crops and masks, which are drawn per
            (epoch, sample index) (:class:`~sop_lightning.data.seeding.AugmentationStreams`): the same views
            with any number of loader workers or ranks, different on every rank, replayed exactly on resume;
            ``None`` takes the process seed (``seed_everything``).
        on_bad_image: an unreadable file in an image folder: ``"raise"`` (an error naming its path) or
            ``"skip"`` (warn, use the next readable image, count them in ``data/skipped_images``).
        allow_upscale: train on images smaller than ``global_size`` (upsampled); by default such a data set is
            refused at setup (a config for another resolution), judged on the median of a few images.
    """

    def __init__(
        self,
        dataset: str | Dataset = "fashion_mnist",
        root: str | None = None,
        knn_train_dataset: str | Dataset | None = None,
        knn_val_dataset: str | Dataset | None = None,
        knn_train_subset: int | None = None,
        knn_val_subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        flip_prob: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_reference_size: int | None = None,
        solarize_prob: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        patch_size: int = 16,
        masking: bool = True,
        mask_ratio: float | list[float] = (0.0, 0.3),
        mask_ratio_var: float | list[float] = (0.0, 0.2),
        mask_shape: Literal["block", "rand"] = "block",
        eval_resize_ratio: float = 256 / 224,
        pin_memory: bool = True,
        augmentation_seed: int | None = None,
        on_bad_image: Literal["raise", "skip"] = "raise",
        allow_upscale: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["dataset", "knn_train_dataset", "knn_val_dataset"])
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if patch_size < 1 or global_size % patch_size:
            raise ValueError(f"global_size={global_size} must be divisible by patch_size={patch_size}")
        if num_local and local_size % patch_size:  # without local crops local_size is not used
            raise ValueError(
                f"local_size={local_size} must be divisible by patch_size={patch_size} (num_local={num_local})"
            )
        for name, value in (("knn_train_subset", knn_train_subset), ("knn_val_subset", knn_val_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.dataset, self.root = dataset, root or DEFAULT_FASHION_MNIST_ROOT
        check_sources(self.root, dataset=dataset, knn_train_dataset=knn_train_dataset, knn_val_dataset=knn_val_dataset)
        self.knn_train_dataset, self.knn_val_dataset = knn_train_dataset, knn_val_dataset
        self.batch_size, self.num_workers = batch_size, num_workers
        self.global_size, self.patch_size = global_size, patch_size
        self.transform = MultiCropTransform(
            global_size, local_size, num_local, global_scale, local_scale, mean, std,
            flip_prob=flip_prob, jitter=jitter, jitter_prob=jitter_prob, grayscale_prob=grayscale_prob,
            blur_sigma=blur_sigma, blur_probs=blur_probs, solarize_prob=solarize_prob,
            blur_reference_size=blur_reference_size,
        )  # fmt: skip
        grid = global_size // patch_size
        self.masks = _MaskSampler(
            grid,
            BlockMaskGenerator(grid, shape=mask_shape) if masking else None,
            MaskRatioSampler(mask_ratio, mask_ratio_var),
        )
        self.eval_transform = eval_transform(global_size, eval_resize_ratio, mean, std)
        self.order = TrainingOrder(augmentation_seed)
        self._train: Dataset | None = None

    @property
    def grid_size(self) -> int:
        """Patch grid side ``H' = global_size / patch_size`` of the global views."""
        return self.global_size // self.patch_size

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            train = resolve_dataset(self.dataset, self.root, on_bad_image=self.hparams.on_bad_image)
            if not self.hparams.allow_upscale and hasattr(train, "__len__"):
                check_image_size(train, self.global_size, f"dataset={_describe(self.dataset)}")
            self._train = train

    @property
    def skipped_images(self) -> int | None:
        """Unreadable training images skipped so far (``on_bad_image="skip"``), else ``None``."""
        if self.hparams.on_bad_image != "skip" or self._train is None:
            return None
        return int(getattr(self._train, "skipped_images", 0))

    def _loader(
        self,
        dataset: Dataset,
        collate,
        shuffle: bool,
        drop_last: bool,
        batch_size: int,
        sampler: Sampler | None = None,
        loader_class: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Multi-crop batches in the order of :class:`GlobalBatchSampler` (global batches split between the
        ranks); after a resume, the interrupted epoch continues where its checkpoint was written."""
        self.setup("fit")
        sampler = self.order.sampler(self._train, self.batch_size, self.trainer, f"dataset={_describe(self.dataset)}")
        data = TransformedDataset(self._train, self.transform, self.masks, self.order.streams)
        return self._loader(
            data,
            collate_multicrop,
            shuffle=False,  # the sampler shuffles
            drop_last=True,
            batch_size=self.batch_size,
            sampler=sampler,
            loader_class=ResumableLoader,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Counts the training batches handed to the model in the current epoch (the resume position)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, MultiCropBatch):
            self.order.count(trainer)
        return batch

    def state_dict(self) -> dict:
        """What a resumed fit needs to replay the data exactly: the augmentation base seed and the batches
        of the current epoch already trained on (saved in every checkpoint)."""
        return self.order.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self.order.load_state_dict(state_dict)

    def set_epoch(self, epoch: int) -> None:
        """Start the augmentation streams of ``epoch`` (the training sampler does it at every epoch start; for
        a loop of one's own without a sampler epoch)."""
        self.order.streams.set_epoch(epoch)

    def knn_datasets(self) -> tuple[Dataset, Dataset]:
        """Labelled ``(train, val)`` splits under the eval transform (§11.1)."""
        if self.dataset == "fashion_mnist":
            train = resolve_dataset(self.knn_train_dataset or "fashion_mnist", self.root, "train")
            val = resolve_dataset(self.knn_val_dataset or "fashion_mnist", self.root, "test")
        else:
            if self.knn_val_dataset is None:
                raise ValueError("knn_val_dataset is None: k-NN evaluation needs a labelled validation split")
            bad, source = self.hparams.on_bad_image, self.knn_train_dataset or self.dataset
            train = resolve_dataset(source, self.root, "train", bad, "knn_train_dataset")
            val = resolve_dataset(self.knn_val_dataset, self.root, "test", bad, "knn_val_dataset")
        train = _fixed_subset(train, self.hparams.knn_train_subset)
        val = _fixed_subset(val, self.hparams.knn_val_subset)
        return TransformedDataset(train, self.eval_transform), TransformedDataset(val, self.eval_transform)

    def knn_dataloaders(self, batch_size: int | None = None) -> tuple[DataLoader, DataLoader]:
        """Loaders of :meth:`knn_datasets`, yielding ``(images, labels, indices)``."""
        bs = batch_size or max(self.batch_size, 256)
        loaders = [self._loader(IndexedDataset(d), collate_labelled, False, False, bs) for d in self.knn_datasets()]
        return loaders[0], loaders[1]

    def val_dataloader(self) -> list[DataLoader]:
        """``[k-NN train split, k-NN val split]`` under the eval transform (for ``KNNEvaluation``), or
        ``[]`` when no labelled validation split is configured."""
        if self.dataset != "fashion_mnist" and self.knn_val_dataset is None:
            return []
        return list(self.knn_dataloaders())


def _describe(source: str | Dataset) -> str:
    return repr(source) if isinstance(source, str) else type(source).__name__


class LabelledDataModule(L.LightningDataModule):
    """Supervised data for the linear probe (§11.2): ``RandomResizedCrop`` + flip for training, the eval
    transform for validation; batches ``(images, labels)``.

    Args:
        dataset: ``"fashion_mnist"``, a labelled image folder, or a ``Dataset`` of ``(image, label)``.
        val_dataset: the validation split (default for ``"fashion_mnist"``: its test split).
        global_size: crop size (named like :class:`SSLDataModule`'s so the CLI links it to the model);
        patch_size: the model's patch size (linked likewise).
        train_scale: ``RandomResizedCrop`` scale.
        on_bad_image: an unreadable file in an image folder: ``"raise"`` (default, names the path) or ``"skip"``.
        augmentation_seed: base seed of the training order and of the crops and flips, drawn per (epoch, sample
            index) as in :class:`SSLDataModule`: the same batches with any number of loader workers or ranks, and
            a resumed probe continues exactly; ``None`` takes the process seed (``seed_everything``). Each epoch
            drops the last incomplete global batch (fewer than ``batch_size · world_size`` images, a new
            permutation every epoch).
    """

    def __init__(
        self,
        dataset: str | Dataset = "fashion_mnist",
        val_dataset: str | Dataset | None = None,
        root: str | None = None,
        batch_size: int = 256,
        num_workers: int = 2,
        global_size: int = 224,
        patch_size: int = 16,
        train_scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        eval_resize_ratio: float = 256 / 224,
        train_subset: int | None = None,
        on_bad_image: Literal["raise", "skip"] = "raise",
        augmentation_seed: int | None = None,
    ):
        super().__init__()
        from torchvision.transforms import InterpolationMode, v2

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if global_size % patch_size:
            raise ValueError(f"global_size={global_size} must be divisible by patch_size={patch_size}")
        self.dataset, self.val_dataset, self.root = dataset, val_dataset, root or DEFAULT_FASHION_MNIST_ROOT
        check_sources(self.root, dataset=dataset, val_dataset=val_dataset)
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.batch_size, self.num_workers, self.train_subset = batch_size, num_workers, train_subset
        self.global_size, self.patch_size = global_size, patch_size
        self.train_transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RGB(),
                v2.RandomResizedCrop(global_size, scale=train_scale, interpolation=InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )
        self.eval_transform = eval_transform(global_size, eval_resize_ratio, mean, std)
        self.order = TrainingOrder(augmentation_seed)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        return (DataLoader if sampler is None else ResumableLoader)(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate_labelled, pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Labelled batches in the order of :class:`TrainingOrder` (seeded, split between the ranks, the last
        incomplete global batch dropped); after a resume, the interrupted epoch continues where its
        checkpoint was written, with the same crops and flips."""
        train = resolve_dataset(self.dataset, self.root, "train", self.on_bad_image)
        if self.train_subset is not None:
            train = Subset(train, range(min(self.train_subset, len(train))))
        sampler = self.order.sampler(train, self.batch_size, self.trainer, f"dataset={_describe(self.dataset)}")
        return self._loader(TransformedDataset(train, self.train_transform, streams=self.order.streams), sampler)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Counts the training batches handed to the model in the current epoch (the resume position)."""
        if self.trainer is not None and self.trainer.training:
            self.order.count(self.trainer)
        return batch

    def state_dict(self) -> dict:
        """The augmentation base seed and the batches of the current epoch already trained on."""
        return self.order.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self.order.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        source = self.val_dataset or ("fashion_mnist" if self.dataset == "fashion_mnist" else None)
        if source is None:
            raise ValueError("val_dataset is None: the linear probe needs a labelled validation split")
        return self._loader(
            TransformedDataset(
                resolve_dataset(source, self.root, "test", self.on_bad_image, "val_dataset"), self.eval_transform
            ),
        )
