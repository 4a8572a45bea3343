import gzip
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sop_lightning.data import (
    FashionMNIST,
    ImageFolderDataset,
    LabelledDataModule,
    MultiCropBatch,
    MultiCropTransform,
    SSLDataModule,
    collate_multicrop,
)
from sop_lightning.data.transforms import gaussian_blur, hue_shift

ROOT = Path(__file__).resolve().parents[1]


def test_fashion_mnist_reads_idx_files(fake_fmnist):
    ds = FashionMNIST(str(fake_fmnist), "train")
    assert len(ds) == 20 and len(FashionMNIST(str(fake_fmnist), "test")) == 8
    img, label = ds[13]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and label == 3
    with gzip.open(fake_fmnist / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()[16:]
    expected = torch.tensor(list(raw[13 * 784 : 14 * 784]), dtype=torch.uint8).view(28, 28)
    assert torch.equal(img[0], expected) and torch.equal(img[2], expected)


def test_missing_demo_data_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path), "train")


def test_image_folder_with_classes_and_flat(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 12), (i * 50, 0, 0)).save(tmp_path / "labelled" / cls / f"{i}.png")
    ds = ImageFolderDataset(str(tmp_path / "labelled"))
    assert len(ds) == 4 and ds.classes == ["cat", "dog"] and [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    (tmp_path / "flat").mkdir()
    Image.new("L", (9, 9)).save(tmp_path / "flat" / "a.jpg")
    img, label = ImageFolderDataset(str(tmp_path / "flat"))[0]
    assert img.mode == "RGB" and label is None


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"))


def test_multicrop_transform_shapes_and_order():
    t = MultiCropTransform(32, 16, 3, global_scale=(0.5, 1.0), local_scale=(0.1, 0.4))
    views = t(Image.new("L", (40, 40), 128))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in views)
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropTransform(global_scale=(0.5, 0.2))


def test_collate_is_view_major():
    samples = [([torch.full((3, 4, 4), float(i)), torch.full((3, 4, 4), 10.0 + i), torch.zeros(3, 2, 2)],
                torch.tensor([[[i % 2 == 0]], [[True]]]), i) for i in range(3)]  # fmt: skip
    batch = collate_multicrop(samples)
    assert isinstance(batch, MultiCropBatch) and batch.batch_size == 3
    assert batch.views[0][:, 0, 0, 0].tolist() == [0, 1, 2] and batch.views[1][:, 0, 0, 0].tolist() == [10, 11, 12]
    assert batch.masks.shape == (2, 3, 1, 1) and batch.masks[0, :, 0, 0].tolist() == [True, False, True]
    assert batch.labels.tolist() == [0, 1, 2]


def test_datamodule_batches(fake_fmnist):
    dm = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                       num_local=2, patch_size=4, mask_ratio=0.3, mask_ratio_var=0.0)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, 28, 28)] * 2 + [(4, 3, 12, 12)] * 2
    assert batch.masks.shape == (2, 4, 7, 7) and batch.masks.dtype == torch.bool
    assert (batch.masks.flatten(2).sum(-1) <= int(0.3 * 49)).all() and batch.masks.any()
    train, val = dm.knn_dataloaders(batch_size=5)
    x, y, idx = next(iter(val))
    assert x.shape == (5, 3, 28, 28) and y.tolist() == [0, 1, 2, 3, 4] and idx.tolist() == [0, 1, 2, 3, 4]
    assert sum(len(b[1]) for b in train) == 20
    no_mask = SSLDataModule(root=str(fake_fmnist), batch_size=4, num_workers=0, global_size=28, local_size=12,
                            num_local=0, patch_size=4, masking=False)  # fmt: skip
    masks = next(iter(no_mask.train_dataloader())).masks
    assert masks.shape == (2, 4, 7, 7) and masks.dtype == torch.bool and not masks.any()  # the real grid (API.md)


def test_datamodule_errors(tmp_path):
    with pytest.raises(ValueError, match="global_size=30 must be divisible by patch_size=4"):
        SSLDataModule(global_size=30, patch_size=4)
    (tmp_path / "empty").mkdir()
    dm = SSLDataModule(dataset=str(tmp_path / "empty"), num_workers=0)
    with pytest.raises(ValueError, match="contains no images"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        SSLDataModule(root=str(tmp_path)).setup("fit")  # a folder without the IDX files: when the data is read
    # a folder that is not there: at construction, naming the argument (the CLI's one-line error, status 2)
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=rf"root='{missing}' is not a folder: dataset='fashion_mnist' reads"):
        SSLDataModule(root=missing)
    with pytest.raises(ValueError, match=rf"knn_val_dataset='{missing}' is not a folder"):
        SSLDataModule(dataset=str(tmp_path / "empty"), knn_val_dataset=missing)
    with pytest.raises(ValueError, match=rf"root='{missing}' is not a folder: val_dataset='fashion_mnist'"):
        LabelledDataModule(dataset=str(tmp_path / "empty"), val_dataset="fashion_mnist", root=missing)
    with pytest.raises(ValueError, match=rf"dataset='{missing}' is not a folder"):
        LabelledDataModule(dataset=missing)


def test_any_torchvision_style_dataset():
    from torchvision.datasets import FakeData

    train = FakeData(size=12, image_size=(3, 32, 32), num_classes=3, random_offset=0)
    val = FakeData(size=5, image_size=(3, 32, 32), num_classes=3, random_offset=100)
    dm = SSLDataModule(dataset=train, knn_val_dataset=val, batch_size=4, num_workers=0, global_size=32,
                       local_size=16, num_local=2, patch_size=8)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch.views[0].shape == (4, 3, 32, 32) and batch.masks.shape == (2, 4, 4, 4)
    assert batch.labels is not None and batch.labels.shape == (4,)
    knn_train, knn_val = dm.val_dataloader()
    assert sum(len(b[1]) for b in knn_train) == 12 and sum(len(b[1]) for b in knn_val) == 5


def test_dataset_from_cli_class_path(tmp_path):
    from sop_lightning.cli import build_cli

    config = tmp_path / "cfg.yaml"
    config.write_text(
        """
model:
  class_path: sop_lightning.DINO
  init_args: {backbone: vit_tiny_patch16_224, embed_dim: 32, depth: 1, num_heads: 2, hidden_dim: 32,
              num_prototypes: 8}
data:
  class_path: sop_lightning.SSLDataModule
  init_args:
    dataset: {class_path: torchvision.datasets.FakeData, init_args: {size: 8, image_size: [3, 32, 32]}}
    knn_val_dataset: {class_path: torchvision.datasets.FakeData, init_args: {size: 4, image_size: [3, 32, 32]}}
    batch_size: 4
    num_workers: 0
    global_size: 32
    local_size: 16
    num_local: 1
    patch_size: 8
    masking: false
"""
    )
    cli = build_cli(["--config", str(config), "--trainer.max_steps", "1", "--trainer.logger", "false",
                "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    assert len(cli.datamodule.dataset) == 8 and cli.model.hparams.img_size == 32


@pytest.mark.parametrize("num_workers", [0, 1])
def test_augmentations_differ_across_ranks_and_epochs_and_repeat_for_the_same_ones(num_workers):
    """Identical images, so the views differ only through the augmentation draws; every process is seeded
    alike, as in DDP after ``seed_everything(0)`` without ``workers=True``."""
    from types import SimpleNamespace

    image = Image.fromarray(torch.arange(28 * 28).remainder(251).to(torch.uint8).view(28, 28).numpy())

    def first_batch(rank: int, epoch: int = 0):
        torch.manual_seed(0)
        dm = SSLDataModule(dataset=[(image, 0)] * 8, batch_size=4, num_workers=num_workers, global_size=28,
                           local_size=12, num_local=1, patch_size=4, mask_ratio=0.3, mask_ratio_var=0.0)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=epoch)
        return next(iter(dm.train_dataloader()))

    r0, r1, r0_again, r0_epoch1 = first_batch(0), first_batch(1), first_batch(0), first_batch(0, epoch=1)
    for other in (r1, r0_epoch1):
        assert not torch.equal(r0.views[0], other.views[0]) and not torch.equal(r0.masks, other.masks)
    assert all(torch.equal(a, b) for a, b in zip(r0.views, r0_again.views)) and torch.equal(r0.masks, r0_again.masks)


def test_augmentation_streams_leave_the_main_process_generator_alone():
    from sop_lightning.data.seeding import AugmentationStreams

    streams = AugmentationStreams(seed=3)
    torch.manual_seed(0)
    with streams.draws(5):
        inside = torch.rand(2)
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2))  # as if nothing had been drawn
    with streams.draws(5):  # a sample's draws are a function of (seed, epoch, index)
        assert torch.equal(torch.rand(2), inside)
    with streams.draws(6):
        assert not torch.equal(torch.rand(2), inside)


def _global_batches(dataset, batch_size, world, workers, epoch=0, seed=7):
    """The first two global batches as one process would see them: the ranks' batches concatenated."""
    from types import SimpleNamespace

    per_rank = []
    for rank in range(world):
        dm = SSLDataModule(dataset=dataset, batch_size=batch_size, num_workers=workers, global_size=28,
                           local_size=12, num_local=1, patch_size=4, augmentation_seed=seed)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
        loader = iter(dm.train_dataloader())
        per_rank.append([next(loader) for _ in range(2)])
    return [
        (torch.cat([r[b].indices for r in per_rank]), torch.cat([r[b].views[0] for r in per_rank]),
         torch.cat([r[b].views[2] for r in per_rank]), torch.cat([r[b].masks for r in per_rank], dim=1))
        for b in range(2)
    ]  # fmt: skip


def test_the_global_batch_is_the_same_for_any_number_of_ranks_and_workers():
    """One process with batch 8 and no worker, 2 ranks of 4 with a worker each, 4 ranks of 2: the same
    images in the same (rank-major) order with the same crops and masks, as the banks need (§5)."""
    images = [Image.fromarray(torch.randint(0, 255, (28, 28), dtype=torch.uint8).numpy()) for _ in range(20)]
    dataset = [(im, i) for i, im in enumerate(images)]
    one = _global_batches(dataset, 8, world=1, workers=0)
    for other in (_global_batches(dataset, 4, world=2, workers=1), _global_batches(dataset, 2, world=4, workers=0)):
        for a, b in zip(one, other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(set(torch.cat([one[0][0], one[1][0]]).tolist())) == 16  # no image twice in an epoch
    epoch1 = _global_batches(dataset, 8, world=1, workers=0, epoch=1)
    assert not torch.equal(one[0][0], epoch1[0][0])  # a new order every epoch


def test_global_batch_sampler_against_a_brute_force_split():
    from sop_lightning.data.sampler import GlobalBatchSampler
    from sop_lightning.seeding import mix_seed

    n, B, W = 23, 3, 2
    for epoch in (0, 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(5, epoch))).tolist()
        global_batches = [perm[i : i + B * W] for i in range(0, (n // (B * W)) * B * W, B * W)]  # 3 of 6
        for rank in range(W):
            sampler = GlobalBatchSampler(range(n), B, W, rank, seed=5)
            sampler.set_epoch(epoch)
            expected = [i for g in global_batches for i in g[rank * B : (rank + 1) * B]]
            assert list(sampler) == expected and len(sampler) == len(expected) == 9
            sampler.resume(epoch, 2)  # two batches done: the next iterator starts at the third
            assert list(sampler) == expected[2 * B :] and len(sampler) == 9
            assert list(sampler) == expected  # the skip served one iterator
    with pytest.raises(ValueError, match="rank must be in"):
        GlobalBatchSampler(range(n), B, num_replicas=2, rank=2)


def test_knn_monitoring_subsets_are_fixed_and_cover_a_class_sorted_split():
    images = [Image.new("RGB", (8, 8), (c * 20, 0, 0)) for c in range(10)]
    sorted_split = [(images[c], c) for c in range(10) for _ in range(30)]  # like an ImageFolder: class after class

    def subset():
        dm = SSLDataModule(dataset=sorted_split, knn_val_dataset=sorted_split, knn_train_subset=40, knn_val_subset=20,
                           global_size=8, local_size=8, patch_size=4, num_workers=0)  # fmt: skip
        train, val = dm.knn_datasets()
        return [train[i][1] for i in range(len(train))], [val[i][1] for i in range(len(val))]

    (train, val), (train2, val2) = subset(), subset()
    assert len(train) == 40 and len(val) == 20
    assert len(set(train)) >= 8  # the first 40 images would hold 2 classes
    assert (train, val) == (train2, val2)  # the same images at every validation (and on every rank)


def _identity_free_views(**kw):
    """Every random step off and a full-image crop: a view is the normalised image itself."""
    args = dict(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                solarize_prob=0.0, blur_probs=(0.0, 0.0, 0.0), mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip
    args.update(kw)
    return MultiCropTransform(16, 16, 1, **args)


def test_every_augmentation_probability_can_be_turned_off_and_on():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    reference = (image.float() / 255 - 0.5) / 0.25
    for view in _identity_free_views()(image):
        torch.testing.assert_close(view, reference)

    def same(a, b):
        return torch.allclose(a, b, rtol=1.3e-6, atol=1e-5)  # float32 rounding of the normalisation

    blurred = _identity_free_views(blur_probs=(1.0, 0.0, 0.0))(image)
    assert not same(blurred[0], reference) and same(blurred[1], reference)
    flipped = _identity_free_views(flip_prob=1.0)(image)[0]
    torch.testing.assert_close(flipped, reference.flip(-1))
    solarized = _identity_free_views(solarize_prob=1.0)(image)  # global 2 only
    assert same(solarized[0], reference) and not same(solarized[1], reference)
    with pytest.raises(ValueError, match=r"grayscale_prob must be a probability in \[0, 1\], got 1.5"):
        MultiCropTransform(grayscale_prob=1.5)
    with pytest.raises(ValueError, match=r"blur_probs\[2\] must be a probability"):
        MultiCropTransform(blur_probs=(1.0, 0.1, -0.5))


def test_blur_sigma_scaled_to_each_crop_size():
    def sigmas(t):
        return [view.blur_sigma for view in (t.global1, t.local)]

    assert sigmas(MultiCropTransform(28, 12, 1, blur_sigma=(0.1, 2.0))) == [(0.1, 2.0), (0.1, 2.0)]
    scaled = sigmas(MultiCropTransform(28, 12, 1, blur_sigma=(0.1, 2.0), blur_reference_size=224))
    assert scaled[0] == pytest.approx((0.1 * 28 / 224, 2.0 * 28 / 224))
    assert scaled[1] == pytest.approx((0.1 * 12 / 224, 2.0 * 12 / 224))
    assert sigmas(MultiCropTransform(28, 12, 1, blur_probs=(0.0, 0.0, 0.0))) == [None, None]  # blur off: no step


def test_hue_shift_matches_torchvision_adjust_hue():
    from torchvision.transforms.v2.functional import adjust_hue_image

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 17, 19, generator=g)
    image[0, :, :4] = image[0, :1, :4]  # gray pixels (chroma 0)
    image[1, 1, :5] = image[1, 0, :5]  # ties between the largest channels
    image[1, 2, 5:9] = image[1, :2, 5:9].amax(0)
    image = (image * 255).round() / 255  # ties also where 8-bit images have them
    for factor in (-0.5, -0.37, -0.1, 0.0, 0.05, 0.25, 0.4999, 0.5):
        torch.testing.assert_close(hue_shift(image, factor), adjust_hue_image(image, factor), rtol=0, atol=2e-6)


def test_gaussian_blur_matches_torchvision_with_the_same_kernel():
    from torchvision.transforms.v2.functional import gaussian_blur_image

    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 40, 33, generator=g)
    for sigma in (0.1, 0.7, 1.3, 2.0):
        taps = 2 * math.ceil(3 * sigma) + 1
        expected = gaussian_blur_image(image, [taps, taps], [sigma, sigma])
        torch.testing.assert_close(gaussian_blur(image, sigma), expected, rtol=0, atol=1e-5)
    small = torch.rand(3, 6, 6, generator=g)  # kernel capped below the image: 5 taps for sigma 2
    torch.testing.assert_close(gaussian_blur(small, 2.0), gaussian_blur_image(small, [5, 5], [2.0, 2.0]), rtol=0,
                               atol=1e-5)  # fmt: skip


def test_views_are_drawn_as_the_torchvision_transforms_draw_them():
    """A view equals torchvision's v2 pipeline with the same parameters, fed the same random draws."""
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8, generator=g)
    t = MultiCropTransform(24, 12, 1, global_scale=(0.3, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.2, 0.0),
                           jitter_prob=1.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0,
                           mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip
    reference = v2.Compose([
        v2.RandomResizedCrop(24, scale=(0.3, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])  # fmt: skip
    for seed in range(5):
        torch.manual_seed(seed)
        view = t.global1(image)
        torch.manual_seed(seed)
        crop = reference(image)
        if float(torch.rand(1)) < 0.5:
            crop = crop.flip(-1)
        torch.rand(1)  # the jitter's draw (p = 1)
        jitter = v2.ColorJitter(0.4, 0.4, 0.2)
        crop = jitter.transform(crop, jitter.make_params([crop]))
        torch.testing.assert_close(view, (crop - 0.5) / 0.25, rtol=0, atol=1e-5)


def test_augmentation_arguments_reach_the_data_module_from_the_cli(capsys):
    import yaml

    from sop_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "experiments" / "demo" / "sop.yaml"),
              "--data.init_args.blur_probs", "[0, 0, 0]", "--data.init_args.solarize_prob", "0.1",
              "--print_config"])  # fmt: skip
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["blur_probs"] == [0, 0, 0] and data["solarize_prob"] == 0.1
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_sigma", "blur_reference_size"):
        assert name in data


def test_lightning_moves_a_batch_through_its_to_method(monkeypatch):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    views = [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)]
    batch = MultiCropBatch(views, torch.zeros(2, 2, 2, 2, dtype=torch.bool), torch.tensor([1, 2]), None)
    calls = []
    original = MultiCropBatch.to
    monkeypatch.setattr(MultiCropBatch, "to", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert calls and isinstance(moved, MultiCropBatch)  # one call, not a walk over the fields
    assert all(torch.equal(a, b) for a, b in zip(moved.views, views)) and moved.indices is None
    assert torch.equal(moved.labels, batch.labels) and moved.masks.dtype == torch.bool
