"""End-to-end evaluation: samples of a pipeline, a set of images, or the reconstructions of a tokenizer.

The default feature space is the bundled in-domain classifier (``hf-rq/emoji-classifier-64``), whose
folder also stores the features of the emoji test split (``reference_features.safetensors``), so the
default evaluation needs neither the dataset nor the network. Pass ``extractor=`` (e.g. an
:class:`~hf_rq.evaluation.inception.InceptionV3FeatureExtractor`) and a matching ``reference`` for the
standard FID space.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import metrics as M
from .features import ClassifierFeatureExtractor, FeatureExtractorOutput, as_feature_extractor, extract_features, images_to_tensor

DEFAULT_CLASSIFIER = "hf-rq/emoji-classifier-64"
REFERENCE_FILE = "reference_features.safetensors"


@dataclass
class ReferenceFeatures:
    """Features `(N, F)` of real images (optionally with their labels `(N,)`) to compare samples against."""

    features: torch.Tensor
    labels: torch.Tensor | None = None
    description: str = ""


def load_classifier(name_or_path: str = DEFAULT_CLASSIFIER, device=None):
    from .classifier import CNNImageClassifier

    model = CNNImageClassifier.from_pretrained(name_or_path).eval()
    return model.to(device) if device is not None else model


def load_reference_features(classifier_name_or_path: str = DEFAULT_CLASSIFIER) -> ReferenceFeatures:
    """The real-image features stored next to a classifier (``reference_features.safetensors``)."""
    from safetensors import safe_open

    from ..hub import resolve_pretrained

    resolved = resolve_pretrained(classifier_name_or_path)
    if Path(resolved).is_dir():
        path = Path(resolved) / REFERENCE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{classifier_name_or_path} has no {REFERENCE_FILE}; pass reference images instead")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(resolved, REFERENCE_FILE)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        features = f.get_tensor("features")
        labels = f.get_tensor("labels") if "labels" in f.keys() else None
    description = f"{meta.get('dataset', '?')} {meta.get('split', '?')} split ({features.shape[0]} images)"
    return ReferenceFeatures(features=features, labels=labels, description=description)


def load_feature_extractor(kind: str = "classifier", classifier: str = DEFAULT_CLASSIFIER,
                           inception_weights: str | None = None, allow_pickle: bool = False,
                           inception_preset: str = "torch-fidelity", device=None) -> torch.nn.Module:
    """``kind="classifier"``: penultimate features of ``classifier``; ``"inception"``: the FID Inception-v3."""
    if kind == "classifier":
        return ClassifierFeatureExtractor(load_classifier(classifier, device))
    if kind == "inception":
        from .inception import InceptionV3FeatureExtractor

        model = InceptionV3FeatureExtractor.from_pretrained(inception_weights, preset=inception_preset,
                                                            allow_pickle=allow_pickle)
        return model.to(device) if device is not None else model
    raise ValueError(f"feature extractor kind must be 'classifier' or 'inception', got {kind!r}")


def reference_from_images(extractor, images, labels=None, batch_size: int = 64, description: str = "") -> ReferenceFeatures:
    """Features of real images (any form :func:`extract_features` takes) as a :class:`ReferenceFeatures`."""
    out = extract_features(extractor, images, batch_size=batch_size)
    return ReferenceFeatures(out.features, None if labels is None else torch.as_tensor(labels), description)


def distribution_metrics(real_features: torch.Tensor, fake: FeatureExtractorOutput, k: int = 3,
                         kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                         seed: int = 0) -> dict[str, float]:
    """FID, KID, precision/recall (and Inception Score when ``fake`` has logits) of generated vs real features."""
    n_fake = fake.features.shape[0]
    out = {"fid": M.fid_from_features(real_features, fake.features)}
    out["kid_mean"], out["kid_std"] = M.kernel_inception_distance(
        real_features, fake.features, kid_subsets, kid_subset_size, generator=torch.Generator().manual_seed(seed))
    if n_fake > k and real_features.shape[0] > k:
        out.update(M.precision_recall(real_features, fake.features, k=k))
    if fake.logits is not None:
        # Shuffle before splitting: samples usually come grouped by class, which would bias every split.
        order = torch.randperm(n_fake, generator=torch.Generator().manual_seed(seed))
        splits = max(1, min(is_splits, n_fake // 2))
        out["inception_score_mean"], out["inception_score_std"] = M.inception_score(fake.logits[order], splits=splits)
    return out


def _class_report(logits: torch.Tensor, class_ids: torch.Tensor, id2label: dict[int, str]) -> dict:
    pred = logits.argmax(-1)
    per_class = {}
    for k in sorted(set(class_ids.tolist())):
        mask = class_ids == k
        per_class[id2label.get(k, str(k))] = float((pred[mask] == k).double().mean())
    return {"class_consistency": M.class_consistency(logits, class_ids), "class_consistency_per_class": per_class}


def _default_reference(classifier, extractor, reference: ReferenceFeatures | None) -> ReferenceFeatures:
    """The given reference, else (classifier features only) the one stored next to the classifier."""
    if reference is not None:
        return reference
    if extractor is not None:
        raise ValueError("a custom feature extractor needs reference features computed with it (reference=...)")
    source = getattr(getattr(classifier, "config", None), "_name_or_path", None)
    if not source:
        raise ValueError("pass reference features: the classifier was not loaded from a folder that has them")
    return load_reference_features(source)


def class_counts(class_ids: list[int], total: int, reference_labels: torch.Tensor | None,
                 to_reference_id: dict[int, int]) -> list[int]:
    """How many samples each class gets: ``total`` split in proportion to the classes' share of the reference
    (largest remainders; at least one each, which can exceed ``total`` when it is below the number of classes),
    or evenly when the reference has no labels.

    FID compares whole distributions, so a class-balanced sample set is "wrong" against an unbalanced
    reference (the emoji test split has 46 people_body but 8 activities images) even for a perfect model.
    """
    if reference_labels is None:
        base, extra = divmod(total, len(class_ids))
        return [base + (i < extra) for i in range(len(class_ids))]
    weights = torch.tensor([float((reference_labels == to_reference_id[c]).sum()) for c in class_ids])
    if weights.sum() == 0:
        raise ValueError("none of the requested classes occurs in the reference labels")
    exact = weights / weights.sum() * total
    counts = exact.floor().long().clamp_min(1)
    order = (exact - exact.floor()).argsort(descending=True).tolist()
    i = 0
    while counts.sum() < total:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts.tolist()


def evaluate_images(
    images,
    class_ids=None,
    classifier=DEFAULT_CLASSIFIER,
    extractor=None,
    reference: ReferenceFeatures | None = None,
    batch_size: int = 64,
    k: int = 3,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics of generated ``images`` (PIL list, uint8 or [0, 1] tensor `(N, 3, H, W)`, or batches of them).

    Args:
        class_ids: the class asked for, per image `(N,)`, in the classifier's ids: gives class-consistency.
        classifier: name/path of a :class:`CNNImageClassifier` (or the model): class-consistency, and the
            default feature space and reference (its ``reference_features.safetensors``).
        extractor: feature extractor of the distribution metrics (default: the classifier's features);
            with another extractor pass ``reference`` features computed by it.
        reference: real-image features; required with a custom ``extractor``.

    Returns a dict with ``fid``, ``kid_mean``/``kid_std``, ``precision``/``recall``, ``inception_score_*``
    (classifier logits), ``class_consistency`` (+ per class) and counts.
    """
    if not isinstance(classifier, torch.nn.Module):
        classifier = load_classifier(classifier) if (classifier is not None) else None
    clf_extractor = as_feature_extractor(classifier) if classifier is not None else None
    if extractor is None and clf_extractor is None:
        raise ValueError("pass a classifier or a feature extractor")
    reference = _default_reference(classifier, extractor, reference)
    extractor = clf_extractor if extractor is None else as_feature_extractor(extractor)
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
        images = torch.cat([images_to_tensor(b) for b in images])
    else:
        images = images_to_tensor(images)
    fake = extract_features(extractor, images, batch_size=batch_size)
    out = {"num_generated": int(fake.features.shape[0]), "num_reference": int(reference.features.shape[0])}
    if reference.description:
        out["reference"] = reference.description
    out.update(distribution_metrics(reference.features, fake, k=k, kid_subset_size=kid_subset_size, seed=seed))
    if class_ids is not None:
        class_ids = torch.as_tensor(class_ids).reshape(-1).cpu()
        if class_ids.numel() != out["num_generated"]:
            raise ValueError(f"got {class_ids.numel()} class ids for {out['num_generated']} images")
        if clf_extractor is None:
            raise ValueError("class-consistency needs a classifier")
        clf_logits = fake.logits if extractor is clf_extractor else extract_features(clf_extractor, images, batch_size).logits
        out.update(_class_report(clf_logits, class_ids, clf_extractor.id2label))
    return out


def _pipeline_classes(pipeline) -> tuple[int, dict[int, str] | None]:
    config = pipeline.transformer.config
    names = getattr(pipeline, "id2label", None)
    return int(config.num_classes), names


def map_classes_to_classifier(pipeline_names: dict[int, str] | None, num_classes: int,
                              classifier_names: dict[int, str]) -> dict[int, int]:
    """Pipeline class id -> classifier class id, by name (or by id when the pipeline has no names)."""
    if pipeline_names:
        by_name = {v: k for k, v in classifier_names.items()}
        unknown = [v for v in pipeline_names.values() if v not in by_name]
        if unknown:
            raise ValueError(f"the classifier does not know the model's classes {unknown} (it knows {sorted(by_name)})")
        return {k: by_name[v] for k, v in pipeline_names.items()}
    if num_classes != len(classifier_names):
        raise ValueError(f"the model has {num_classes} unnamed classes but the classifier has {len(classifier_names)}")
    return {k: k for k in range(num_classes)}


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    num_images_per_class: int = 20,
    class_labels=None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    classifier=DEFAULT_CLASSIFIER,
    extractor=None,
    reference: ReferenceFeatures | None = None,
    return_images: bool = False,
    progress: bool = True,
    class_balance: str = "reference",
    **sampling_kwargs,
) -> dict:
    """Sample ``num_images_per_class * num_classes`` images of every class (or of ``class_labels``) and evaluate them.

    ``class_balance="reference"`` (default) splits the samples over the classes in the proportions of the
    reference's labels (when it has labels), so that FID/KID/precision/recall compare like with like;
    ``"uniform"`` gives every class ``num_images_per_class``. ``sampling_kwargs`` (``temperature``,
    ``top_k``, ``top_p``, ``guidance_scale``, ...) go to the pipeline.
    Besides the metrics of :func:`evaluate_images` the result has ``images_per_second`` (sampling and
    decoding only) and, with ``return_images``, the PIL ``images`` and their ``class_ids``.
    """
    if not isinstance(classifier, torch.nn.Module) and classifier is not None:
        classifier = load_classifier(classifier)
    if class_balance not in ("reference", "uniform"):
        raise ValueError(f"class_balance must be 'reference' or 'uniform', got {class_balance!r}")
    reference = _default_reference(classifier, extractor, reference)
    num_classes, names = _pipeline_classes(pipeline)
    if num_classes == 0:
        raise ValueError("evaluate_pipeline measures class-conditional models; this one is unconditional")
    if class_labels is None:
        ids = list(range(num_classes))
    else:
        from ..pipeline_utils import resolve_class_labels

        ids = resolve_class_labels(class_labels, num_classes, names).tolist()
    mapping = map_classes_to_classifier(names, num_classes, classifier.id2label)
    labels = reference.labels if class_balance == "reference" else None
    counts = class_counts(ids, num_images_per_class * len(ids), labels, mapping)
    pipeline.set_progress_bar_config(disable=not progress, leave=False)
    requested = [c for c, n in zip(ids, counts) for _ in range(n)]
    images, seconds = [], 0.0
    for i in range(0, len(requested), batch_size):
        start = time.perf_counter()
        batch = pipeline(class_labels=requested[i:i + batch_size], generator=generator, output_type="pt", **sampling_kwargs).images
        seconds += time.perf_counter() - start
        images.append(batch.cpu())
    images = torch.cat(images)
    class_ids = torch.tensor([mapping[c] for c in requested])
    out = evaluate_images(images, class_ids, classifier=classifier, extractor=extractor, reference=reference)
    out["class_balance"] = "reference" if labels is not None else "uniform"
    out["images_per_second"] = len(requested) / seconds
    if return_images:
        from ..image_processing import numpy_to_pil

        out["images"] = numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        out["class_ids"] = requested
    return out


def _codebook_size(tokenizer) -> int:
    for key in ("codebook_size", "num_embeddings", "n_embed", "vocab_size"):
        value = getattr(tokenizer.config, key, None)
        if value is not None:
            return int(value)
    raise ValueError(f"cannot tell the codebook size of {type(tokenizer).__name__}")


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer,
    images,
    batch_size: int = 32,
    extractor="classifier",
    reference_extractor_kwargs: dict | None = None,
    device=None,
) -> dict:
    """PSNR, SSIM, rFID (+ KID) and codebook usage/perplexity of a tokenizer on real images.

    Args:
        tokenizer: an hf_rq tokenizer (``forward(images in [-1, 1])`` returns ``sample`` and ``codes``).
        images: uint8 `(N, 3, H, W)` tensor, [0, 1] float tensor, list of PIL images, or an ``ImageFolderSplit``.
        extractor: feature space of rFID: ``"classifier"`` (bundled classifier), ``"inception"``, a feature
            extractor module, or None to skip rFID.
        reference_extractor_kwargs: keyword arguments of :func:`load_feature_extractor` for a string ``extractor``.

    Codes with a depth axis (RQ: `(N, h, w, D)`) also get per-depth usage and perplexity.
    """
    if hasattr(images, "images") and isinstance(images.images, torch.Tensor):
        images = images.images
    images = images_to_tensor(images)
    device = device or next(tokenizer.parameters()).device
    tokenizer.eval()
    recon, codes = [], []
    psnrs, ssims = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        out = tokenizer(x.to(device) * 2 - 1)
        y = (out.sample.float().cpu().clamp(-1, 1) + 1) / 2
        psnrs.append(M.psnr(y, x))
        ssims.append(M.ssim(y, x))
        recon.append(y)
        codes.append(out.codes.cpu())
    recon, codes, psnr = torch.cat(recon), torch.cat(codes), torch.cat(psnrs)
    result = {
        "num_images": len(images),
        "psnr": float(psnr[torch.isfinite(psnr)].mean()) if torch.isfinite(psnr).any() else float("inf"),
        "ssim": float(torch.cat(ssims).mean()),
        "mse": float((recon - images).pow(2).mean()),
    }
    result.update(M.codebook_usage(codes, _codebook_size(tokenizer), depth_axis=-1 if codes.ndim == 4 else None))
    if extractor is not None:
        if isinstance(extractor, str):
            extractor = load_feature_extractor(extractor, **(reference_extractor_kwargs or {}))
        real = extract_features(extractor, images, batch_size=64).features
        fake = extract_features(extractor, recon, batch_size=64).features
        result["rfid"] = M.fid_from_features(real, fake)
        result["rkid_mean"], result["rkid_std"] = M.kernel_inception_distance(real, fake)
    return result
