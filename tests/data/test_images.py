from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from digits import (
    digits_split_counts,
    write_corrupt_image,
    write_digits_imagefolder,
    write_flat_images,
)
from PIL import Image

from lowrank_cli.data.images import Batch, ImageDataset, collate, find_images, make_loader, make_transform
from lowrank_cli.data.sampling import EpochSampler
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.inputs import data_config, image_mode


@pytest.fixture(scope="module")
def digits(digits_folder) -> Path:
    return digits_folder(32)


@pytest.fixture(scope="module")
def small_digits(digits_folder) -> Path:
    return digits_folder(32, 8)


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


# ---------------------------------------------------------------------------------------------- layout


def test_imagefolder_root_counts_and_classes(digits: Path) -> None:
    expected = digits_split_counts()
    assert expected == {"train": 1347, "val": 450}  # 1,797 scans, a quarter of each class held out

    train = find_images(digits)
    assert train.layout == "imagefolder" and train.split == "train" and train.root == digits / "train"
    assert len(train) == expected["train"] and train.labelled and train.classes == [str(d) for d in range(10)]
    val = find_images(digits, "val")
    assert len(val) == expected["val"] and val.classes == train.classes
    assert find_images(digits, "train").samples == train.samples

    # The label is the class folder, and train and val do not share an image.
    assert all(path.parent.name == train.classes[label] for path, label in train.samples + val.samples)
    assert not {p.name for p, _ in train.samples} & {p.name for p, _ in val.samples}
    assert [p for p, _ in train.samples] == sorted(p for p, _ in train.samples)


def test_digits_written_as_rgb_and_deterministic(small_digits: Path, tmp_path: Path) -> None:
    with Image.open(next((small_digits / "train" / "3").iterdir())) as im:
        assert im.mode == "RGB" and im.size == (32, 32)
    again = write_digits_imagefolder(tmp_path, image_size=32, max_per_class=8)
    names = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.png"))  # noqa: E731
    assert names(again) == names(small_digits)
    assert len(names(again)) == 80


def test_class_tree_without_split_folders(small_digits: Path) -> None:
    tree = find_images(small_digits / "train")
    assert tree.layout == "classes" and tree.split is None and len(tree) == 60 and tree.num_classes == 10
    assert find_images(small_digits / "train", "train").samples == tree.samples
    assert find_images(small_digits / "train", "val", required=False) is None
    with pytest.raises(InputError, match="no val/ split"):
        find_images(small_digits / "train", "val")


def test_flat_folder_is_unlabelled_and_takes_subfolders(tmp_path: Path) -> None:
    write_flat_images(tmp_path, 5)
    write_flat_images(tmp_path / "more", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    flat = find_images(tmp_path)
    assert flat.layout == "flat" and not flat.labelled and flat.classes == []
    assert len(flat) == 7 and {label for _, label in flat.samples} == {-1}
    with pytest.raises(InputError, match="no class folders"):
        find_images(tmp_path, labelled=True)


def test_labelled_false_reads_a_class_tree_as_plain_images(small_digits: Path) -> None:
    plain = find_images(small_digits, labelled=False)
    assert plain.layout == "flat" and len(plain) == 60 and {label for _, label in plain.samples} == {-1}


def test_val_split_missing(small_digits: Path, tmp_path: Path) -> None:
    shutil.copytree(small_digits / "train", tmp_path / "train")
    assert find_images(tmp_path, "val", required=False) is None
    with pytest.raises(InputError, match="no val/ split"):
        find_images(tmp_path, "val")


def test_val_labels_follow_train_classes(small_digits: Path, tmp_path: Path) -> None:
    shutil.copytree(small_digits / "train", tmp_path / "train")
    shutil.copytree(small_digits / "val" / "7", tmp_path / "val" / "7")  # val with one class only
    val = find_images(tmp_path, "val")
    assert val.num_classes == 10 and {label for _, label in val.samples} == {7}
    shutil.copytree(small_digits / "val" / "7", tmp_path / "val" / "cat")
    with pytest.raises(InputError, match="train split lacks \\(cat\\)"):
        find_images(tmp_path, "val")


def test_missing_empty_and_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as err:
        find_images(tmp_path / "nope")
    assert "nope" in str(err.value) and "point data at" in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"has no images \(\.jpg, .*\): point data at an ImageFolder"):
        find_images(tmp_path / "empty")

    (tmp_path / "only_text" / "a").mkdir(parents=True)
    (tmp_path / "only_text" / "a" / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="has no images"):
        find_images(tmp_path / "only_text")

    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(InputError, match="is not a folder"):
        find_images(tmp_path / "file.png")
    with pytest.raises(UsageError, match="unknown data split"):
        find_images(tmp_path / "empty", "test")


# ------------------------------------------------------------------------------------------ transforms


def test_eval_transform_from_model_normalises_like_the_model(tiny_vit: torch.nn.Module) -> None:
    cfg = data_config(tiny_vit)
    assert cfg["input_size"] == (3, 32, 32)  # from the model as built, not its pretrained_cfg (224)
    tf = make_transform(tiny_vit, training=False)
    out = tf(Image.new("RGB", (50, 40), (200, 100, 0)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    expected = (torch.tensor([200, 100, 0]) / 255 - mean) / std
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    assert torch.allclose(expected, torch.tensor([0.5686, -0.2157, -1.0]), atol=1e-4)  # ViT: mean=std=0.5


def test_transform_from_a_data_config_uses_its_mean_and_std() -> None:
    cfg = {"input_size": [3, 24, 24], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "interpolation": "bilinear", "crop_pct": 1.0}
    out = make_transform(cfg, training=False)(Image.new("RGB", (24, 24), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert out.shape == (3, 24, 24)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


def test_training_transform_is_light(tiny_vit: torch.nn.Module) -> None:
    tf = make_transform(tiny_vit, training=True)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    assert not {"ColorJitter", "RandomErasing", "RandAugment", "AutoAugment"} & set(names)
    assert tf(Image.new("RGB", (64, 48))).shape == (3, 32, 32)


def test_one_channel_model_reads_grey(small_digits: Path) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              in_chans=1, num_classes=10)
    cfg = data_config(model)
    assert cfg["input_size"] == (1, 32, 32) and len(cfg["mean"]) == 1 and image_mode(model) == "L"
    loader, _ = make_loader(find_images(small_digits), make_transform(model, False), 4, shuffle=False,
                            mode=image_mode(model))
    assert next(iter(loader)).images.shape == (4, 1, 32, 32)
    with pytest.raises(InputError, match="4 input channels"):
        image_mode({"input_size": (4, 32, 32)})


# ------------------------------------------------------------------------------------ dataset, loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_images_are_skipped_and_counted(tmp_path: Path, tiny_vit: torch.nn.Module, num_workers: int) -> None:
    write_flat_images(tmp_path, 6)
    write_corrupt_image(tmp_path / "bad_truncated.png")
    write_corrupt_image(tmp_path / "bad_garbage.png", kind="garbage")
    images = find_images(tmp_path)
    assert len(images) == 8
    loader, _ = make_loader(images, make_transform(tiny_vit, False), 4, shuffle=False, num_workers=num_workers)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert sum(b.skipped for b in batches) == 2
    assert sum(len(b.images) for b in batches) == 6
    assert all(b.images.shape[1:] == (3, 32, 32) and (b.labels == -1).all() for b in batches)


def test_dataset_returns_none_for_unreadable(tmp_path: Path) -> None:
    write_flat_images(tmp_path, 1)
    write_corrupt_image(tmp_path / "x.png")
    ds = ImageDataset(find_images(tmp_path), transform=lambda img: torch.zeros(1))
    assert ds[0] is not None and ds[1] is None  # sorted: img_0000.png, x.png
    batch = collate([None, None])
    assert batch.skipped == 2 and batch.images.numel() == 0 and batch.labels.dtype == torch.long


def test_loader_over_digits_labels(small_digits: Path, tiny_vit: torch.nn.Module) -> None:
    images = find_images(small_digits)
    loader, sampler = make_loader(images, make_transform(tiny_vit, True), 16, shuffle=True, seed=3)
    assert sampler.batches_per_epoch == 3 == len(loader)  # 60 images, drop_last for training
    batches = list(loader)
    assert [len(b.labels) for b in batches] == [16, 16, 16]
    assert all(b.labels.dtype == torch.long and 0 <= b.labels.min() and b.labels.max() <= 9 for b in batches)
    eval_loader, _ = make_loader(images, make_transform(tiny_vit, False), 16, shuffle=False)
    assert sum(len(b.labels) for b in eval_loader) == 60  # evaluation keeps the last, short batch
    with pytest.raises(InputError, match="fewer than one batch"):
        make_loader(images, make_transform(tiny_vit, True), 64, shuffle=True)


# ---------------------------------------------------------------------------------------------- sampler


def _epoch(sampler: EpochSampler) -> list[list[int]]:
    idx = list(sampler)
    return [idx[i:i + sampler.batch_size] for i in range(0, len(idx), sampler.batch_size)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_splits_an_epoch_across_ranks(drop_last: bool) -> None:
    n, bs = 103, 5
    ranks = [EpochSampler(n, bs, shuffle=True, seed=1, rank=r, world_size=2, drop_last=drop_last) for r in (0, 1)]
    epochs = [_epoch(s) for s in ranks]
    assert len(epochs[0]) == len(epochs[1]) == ranks[0].batches_per_epoch
    seen = [i for e in epochs for batch in e for i in batch]
    if drop_last:  # 103 // 10 = 10 global batches: 100 distinct samples, 3 left out this epoch
        assert ranks[0].batches_per_epoch == 10 and len(seen) == len(set(seen)) == 100
        assert all(len(b) == bs for e in epochs for b in e)
    else:  # every sample, one padded with a repeat so both ranks get 52
        assert set(seen) == set(range(n)) and len(seen) == 104 and ranks[0].batches_per_epoch == 11


def test_sampler_without_shuffle_covers_everything_once() -> None:
    ranks = [EpochSampler(40, 4, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    seen = sorted(i for s in ranks for i in s)
    assert seen == list(range(40))


def test_sampler_order_depends_on_seed_and_epoch() -> None:
    a, b = EpochSampler(50, 5, shuffle=True, seed=7), EpochSampler(50, 5, shuffle=True, seed=7)
    first = list(a)
    assert first == list(b) and sorted(first) == list(range(50))
    assert list(EpochSampler(50, 5, shuffle=True, seed=8)) != first
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == list(range(50))
    a.set_epoch(0)
    assert list(a) == first


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_sees_exactly_the_remaining_batches(world_size: int) -> None:
    for rank in range(world_size):
        full = EpochSampler(97, 4, shuffle=True, seed=5, rank=rank, world_size=world_size)
        full.set_epoch(3)
        uninterrupted = _epoch(full)
        for k in (0, 1, 5, full.batches_per_epoch - 1, full.batches_per_epoch):
            resumed = EpochSampler(97, 4, shuffle=True, seed=5, rank=rank, world_size=world_size)
            resumed.set_epoch(3)
            resumed.set_start_batch(k)
            assert _epoch(resumed) == uninterrupted[k:]
            assert len(resumed) == 4 * (full.batches_per_epoch - k)
            resumed.set_epoch(4)  # the next epoch starts from its beginning again
            assert len(_epoch(resumed)) == full.batches_per_epoch
    with pytest.raises(UsageError, match="cannot resume at batch"):
        full.set_start_batch(full.batches_per_epoch + 1)


def test_resume_through_a_dataloader(small_digits: Path, tiny_vit: torch.nn.Module) -> None:
    images = find_images(small_digits)
    tf = make_transform(tiny_vit, False)
    loader, sampler = make_loader(images, tf, 8, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(2)
    full = list(loader)
    loader, sampler = make_loader(images, tf, 8, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(2)
    sampler.set_start_batch(3)
    assert len(loader) == len(full) - 3
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    for got, want in zip(resumed, full[3:]):
        assert torch.equal(got.labels, want.labels) and torch.equal(got.images, want.images)


def test_a_symlink_loop_is_read_once_with_true_labels(tmp_path: Path, caplog) -> None:
    """Issue 26: four real images and `ln -s .. train/a/up` gave "164 training images", class b's labelled a."""
    for c in "ab":
        for i in range(2):
            folder = tmp_path / "train" / c
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{c}{i}.png")
    (tmp_path / "train" / "a" / "up").symlink_to("..")
    (tmp_path / "train" / "a" / "bee").symlink_to("../b")  # another class's folder, reached from class a
    found = find_images(tmp_path, "train")
    assert found.classes == ["a", "b"] and len(found) == 4
    assert sorted((p.name, found.classes[label]) for p, label in found.samples) == [
        ("a0.png", "a"), ("a1.png", "a"), ("b0.png", "b"), ("b1.png", "b")]
    assert "train/a/up' links back to" in caplog.text and "a symlink loop" in caplog.text
    flat = find_images(tmp_path / "train", labelled=False)  # the walk of an unlabelled folder too
    assert sorted(p.name for p, _ in flat.samples) == ["a0.png", "a1.png", "b0.png", "b1.png"]
