"""hf-rq: autoregressive image generation over quantized tokens (RQ, DQ, CTF), Hugging Face-native.

Public classes are importable from the top level. Each family lives in its own sub-package with the
same file names (``tokenizer``, ``prior``, ``pipeline``, ``conversion``); saved pipelines record those
module paths in ``model_index.json``, so a saved class never moves.
"""

__version__ = "0.1.0.dev0"

from .image_processing import make_image_grid, postprocess_images, preprocess_images
from .outputs import QuantizerOutput, TokenizerDecoderOutput, TokenizerEncoderOutput, TokenizerOutput
from .quantizers import EMACodebook, ResidualQuantizer
from .rq import *  # noqa: F401,F403
from .dq import *  # noqa: F401,F403
from .ctf import *  # noqa: F401,F403
