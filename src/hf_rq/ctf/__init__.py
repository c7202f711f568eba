"""CTF family: LlamaGen-style VQ tokenizer, LlamaGen GPT baseline, coarse-to-fine prior, pipelines, conversion."""

from .tokenizer import LlamaGenVQModel

__all__ = []
__all__ += ["LlamaGenVQModel"]

from .clustering import CoarseLabels, build_coarse_labels  # noqa: E402
from .pipeline import CTFPipeline, CTFPipelineOutput, LlamaGenPipeline  # noqa: E402
from .llamagen import LlamaGenConfig, LlamaGenForImageGeneration, LlamaGenModel  # noqa: E402
from .prior import CTFAuxiliaryModel, CTFConfig, CTFForImageGeneration  # noqa: E402

__all__ += ["CoarseLabels", "build_coarse_labels", "CTFPipeline", "CTFPipelineOutput", "LlamaGenPipeline",
            "CTFAuxiliaryModel", "CTFConfig", "CTFForImageGeneration", "LlamaGenConfig",
            "LlamaGenForImageGeneration", "LlamaGenModel"]
