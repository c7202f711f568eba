"""Image datasets for training: a Hub dataset or a local ``imagefolder``, with deterministic transforms.

Every random choice a transform makes (crop offset, horizontal flip) is drawn from a generator seeded by
``(seed, epoch, index)`` instead of the global RNG. The data loader reads one batch ahead, so a global-RNG
transform would consume random numbers before a checkpoint is written that the resumed run consumes again;
seeding per sample keeps resumed runs bit-identical to uninterrupted ones, with any number of workers.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import PIL.Image
import torch


class DataConfigError(ValueError):
    """A dataset or data flag that cannot work; raised before training starts."""


def add_data_arguments(parser) -> None:
    """The data flags shared by every training script (the names follow diffusers' example scripts)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A Hub dataset id (or a local dataset folder that `datasets.load_dataset` understands).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name, if it has several.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="A local `imagefolder`: `<dir>/<split>/<class>/*.png` or `<dir>/<class>/*.png`; folder names "
                        "become class names.")
    g.add_argument("--train_split", type=str, default="train", help="Split used for training.")
    g.add_argument("--validation_split", type=str, default=None,
                   help="Split used for validation (reconstruction metrics, image grids). Default: 'test' or "
                        "'validation' when present, else none.")
    g.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image feature).")
    g.add_argument("--label_column", type=str, default=None,
                   help="Class-label column (default: 'label' when present). Its class names become the model's id2label.")
    g.add_argument("--caption_column", type=str, default=None,
                   help="Caption column (text-to-image priors): an imagefolder's metadata.csv / metadata.jsonl column or "
                        "a Hub dataset's text column. Class labels are then not used.")
    g.add_argument("--unconditional", action="store_true", help="Ignore class labels (priors: train an unconditional model).")
    g.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` keeps downloaded data.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set (debugging, quick runs).")
    g.add_argument("--resolution", type=int, default=256, help="Training images are resized and cropped to this size.")
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                   help="Crop the center after resizing (--no-center_crop: a random crop).")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False, help="Flip images horizontally at random.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Data-loading worker processes (0: load in the main process).")


# ------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resolution`` (bicubic), crop a square, optionally flip; -> `(3, R, R)` in [-1, 1]."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise DataConfigError(f"resolution must be a positive integer, got {self.resolution!r}")

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None, flip: bool | None = None) -> torch.Tensor:
        if not isinstance(image, PIL.Image.Image):
            raise DataConfigError(f"expected a PIL image from the image column, got {type(image).__name__}")
        image = image.convert("RGB")
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        if scale != 1:
            image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), PIL.Image.BICUBIC)
            w, h = image.size
        if self.center_crop or rng is None:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        if (w, h) != (r, r):
            image = image.crop((left, top, left + r, top + r))
        if flip is None:
            flip = self.random_flip and rng is not None and rng.random() < 0.5
        if flip:
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageDataset(torch.utils.data.Dataset):
    """A map-style view of a `datasets.Dataset` that yields ``{"pixel_values", "class_labels", "index"}``.

    ``set_epoch`` (called by Accelerate's data loader at every epoch) changes the random augmentations; a
    given ``(seed, epoch, index)`` always gives the same tensor.
    """

    def __init__(self, dataset, image_column: str, label_column: str | None, transform: ImageTransform,
                 label_to_id: Mapping[Any, int] | None = None, seed: int = 0, flip_all: bool = False):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.label_to_id = label_to_id
        self.seed = seed
        self.flip_all = flip_all  # for the code cache: rows [0, n) as is, [n, 2n) mirrored
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset) * (2 if self.flip_all else 1)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        row, flip = (index % n, index >= n) if self.flip_all else (index, None)
        example = self.dataset[int(row)]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        item = {"pixel_values": self.transform(example[self.image_column], rng, flip=flip), "index": int(index)}
        if self.label_column is not None:
            label = example[self.label_column]
            item["class_labels"] = int(self.label_to_id[label] if self.label_to_id is not None else label)
        return item


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class ImageData:
    """What the scripts need from a dataset: the splits as `ImageDataset`s and the class names."""

    train: ImageDataset
    validation: ImageDataset | None
    id2label: dict[int, str] | None
    source: str  # dataset id or folder, for the model card
    train_captions: list[str] | None = None  # row i of the train split (the code cache's ``index``)
    validation_captions: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.id2label) if self.id2label else 0


def _load_raw(args):
    import datasets

    if bool(args.dataset_name) == bool(args.train_data_dir):
        raise DataConfigError("pass exactly one of --dataset_name (a Hub dataset) or --train_data_dir (a local imagefolder)")
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise DataConfigError(f"--train_data_dir {args.train_data_dir!r} is not a directory")
        try:
            raw = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
        except (FileNotFoundError, ValueError) as exc:  # e.g. "no (supported) data files found"
            raise DataConfigError(f"no images found in --train_data_dir {args.train_data_dir!r}: {exc}") from exc
        return raw, args.train_data_dir
    raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    return raw, args.dataset_name


def _pick_image_column(features, requested: str | None, split: str) -> str:
    import datasets

    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise DataConfigError(f"--image_column {requested!r} is not a column of split {split!r}; columns: {columns}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise DataConfigError(f"split {split!r} has no image column (columns: {columns}); pass --image_column")


def _label_mapping(dataset, column: str) -> tuple[dict[int, str], dict | None]:
    """(id2label, label_to_id or None when the column already holds ids)."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names)), None
    values = dataset.unique(column)
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataConfigError(f"label column {column!r} has negative class ids ({min(values)})")
        return {i: str(i) for i in range(max(values) + 1)}, None
    raise DataConfigError(f"label column {column!r} must hold class ids or class names, got values like {values[:3]}")


def load_image_data(args, seed: int | None = None, need_labels: bool = False) -> ImageData:
    """Load ``--dataset_name`` / ``--train_data_dir`` and check it before any training starts.

    Raises `DataConfigError` naming the problem: no images, a missing image or label column, an unknown split.
    ``need_labels=False`` (tokenizers) keeps the labels only if a label column is present.
    """
    raw, source = _load_raw(args)
    splits = list(raw)
    train_split = args.train_split if args.train_split in raw else (splits[0] if len(splits) == 1 else None)
    if train_split is None:
        raise DataConfigError(f"split {args.train_split!r} not found; the dataset has splits {splits} (use --train_split)")
    train = raw[train_split]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if len(train) == 0:
        raise DataConfigError(f"the dataset {source!r} has no images in split {train_split!r}")
    image_column = _pick_image_column(train.features, args.image_column, train_split)

    label_column = None
    caption_column = getattr(args, "caption_column", None)
    if caption_column is not None and caption_column not in train.features:
        raise DataConfigError(
            f"--caption_column {caption_column!r} is not a column of split {train_split!r}; columns: "
            f"{list(train.features)} (an imagefolder needs a metadata.csv / metadata.jsonl with file_name and this column)"
        )
    if not getattr(args, "unconditional", False) and caption_column is None:
        if args.label_column is not None:
            if args.label_column not in train.features:
                raise DataConfigError(
                    f"--label_column {args.label_column!r} is not a column of split {train_split!r}; "
                    f"columns: {list(train.features)} (or pass --unconditional)"
                )
            label_column = args.label_column
        elif "label" in train.features:
            label_column = "label"
        elif need_labels:
            raise DataConfigError(
                f"no label column in split {train_split!r} (columns: {list(train.features)}); "
                "pass --label_column, or --unconditional to train without classes"
            )
    id2label, label_to_id = _label_mapping(train, label_column) if label_column else (None, None)

    val_split = args.validation_split
    if val_split is None:
        val_split = next((s for s in ("test", "validation", "valid") if s in raw and s != train_split), None)
    elif val_split not in raw:
        raise DataConfigError(f"--validation_split {val_split!r} not found; the dataset has splits {splits}")

    seed = args.seed if seed is None else seed
    train_tf = ImageTransform(args.resolution, args.center_crop, args.random_flip)
    eval_tf = ImageTransform(args.resolution, True, False)
    train_ds = ImageDataset(train, image_column, label_column, train_tf, label_to_id, seed=seed)
    val_ds = None
    if val_split is not None and len(raw[val_split]):
        val = raw[val_split]
        val_label = label_column if label_column in val.features else None
        val_ds = ImageDataset(val, image_column, val_label, eval_tf, label_to_id, seed=seed)
    captions = val_captions = None
    if caption_column is not None:
        captions = _captions(train, caption_column, train_split)
        if val_ds is not None:
            if caption_column not in val_ds.dataset.features:
                raise DataConfigError(f"--caption_column {caption_column!r} is not a column of split {val_split!r}")
            val_captions = _captions(val_ds.dataset, caption_column, val_split)
    return ImageData(train_ds, val_ds, id2label, source, captions, val_captions)


def _captions(dataset, column: str, split: str) -> list[str]:
    values = dataset[column]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataConfigError(f"caption column {column!r} of split {split!r} holds {values[bad]!r} (row {bad}), "
                              "not a string")
    return list(values)


def check_resolution(resolution: int, factor: int, model_name: str = "the tokenizer") -> None:
    """Fail before training when the images cannot be tokenized to a whole grid."""
    if resolution % factor:
        lower, upper = resolution - resolution % factor, resolution + factor - resolution % factor
        raise DataConfigError(
            f"--resolution {resolution} is not divisible by the downsampling factor {factor} of {model_name}; "
            f"use e.g. {lower or factor} or {upper}"
        )


def collate(examples: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
             "index": torch.tensor([e["index"] for e in examples])}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([e["class_labels"] for e in examples])
    return batch
