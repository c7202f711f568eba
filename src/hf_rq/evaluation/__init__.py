"""Quality evaluation: generation metrics (FID, KID, IS, precision/recall, class-consistency) over a pluggable
feature extractor, reconstruction metrics for tokenizers (PSNR, SSIM, rFID, codebook usage/perplexity), and the
in-domain emoji classifier that makes them work offline.

* ``metrics``: the metric functions on features / images / codes.
* ``features``: the feature-extractor interface and batched extraction.
* ``inception``: the standard FID Inception-v3 (weights from a local file; nothing is downloaded).
* ``classifier`` / ``train_classifier``: the small CNN evaluator and its training script.
* ``evaluator``: end-to-end evaluation of a pipeline, of a folder of images, or of a tokenizer.

Not imported by ``import hf_rq``; import ``hf_rq.evaluation`` explicitly.
"""

from .classifier import CNNImageClassifier, ImageClassifierOutput
from .data import ImageFolderSplit, load_imagefolder
from .evaluator import (
    DEFAULT_CLASSIFIER,
    ReferenceFeatures,
    evaluate_images,
    evaluate_pipeline,
    evaluate_reconstruction,
    load_feature_extractor,
    load_reference_features,
)
from .features import ClassifierFeatureExtractor, FeatureExtractorOutput, extract_features, images_to_tensor
from .inception import InceptionV3FeatureExtractor, InceptionWeightsNotFoundError
from .metrics import (
    FeatureStatistics,
    class_consistency,
    code_histogram,
    codebook_statistics_from_counts,
    codebook_usage,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
    psnr,
    ssim,
)

__all__ = [
    "CNNImageClassifier", "ImageClassifierOutput", "ImageFolderSplit", "load_imagefolder",
    "DEFAULT_CLASSIFIER", "ReferenceFeatures", "evaluate_images", "evaluate_pipeline", "evaluate_reconstruction",
    "load_feature_extractor", "load_reference_features",
    "ClassifierFeatureExtractor", "FeatureExtractorOutput", "extract_features", "images_to_tensor",
    "InceptionV3FeatureExtractor", "InceptionWeightsNotFoundError",
    "FeatureStatistics", "class_consistency", "code_histogram", "codebook_statistics_from_counts", "codebook_usage",
    "fid_from_features", "frechet_distance", "inception_score", "kernel_inception_distance", "precision_recall",
    "psnr", "ssim",
]
