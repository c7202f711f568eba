"""Training infrastructure shared by the scripts in ``training/`` (tokenizers and priors of every family).

* `data`: Hub or ``imagefolder`` datasets, deterministic per-sample transforms, class names -> ``id2label``.
* `losses`, `lpips`: the VQGAN objective (reconstruction, LPIPS, PatchGAN hinge loss, adaptive weight), the
  NaN/inf guard, codebook usage statistics.
* `checkpointing`: atomic rotating checkpoints and exact resume on top of Accelerate.
* `code_cache`: encode a dataset once with a frozen tokenizer into a fingerprinted `datasets` dataset.
* `distributed`: gradient checkpointing, and what FSDP / DeepSpeed ZeRO change (gathered final model, checks).
* `common`: flags, the Accelerator, schedules, per-step generators, image-grid logging.
* `hub`: model cards and upload.

Not imported by ``import hf_rq``; import ``hf_rq.training`` explicitly.
"""

from .checkpointing import (
    TrainState, latest_checkpoint, list_checkpoints, load_checkpoint, prepare_resumable_state, resolve_resume_checkpoint,
    save_checkpoint,
)
from .code_cache import CodeCacheError, cache_codes, tokenizer_fingerprint
from .common import (
    add_training_arguments, gather_code_counts, log_image_grid, make_accelerator, make_scheduler, step_generator,
    training_length, validate_training_arguments, weights_fingerprint, write_rank_report,
)
from .data import (
    DataConfigError, ImageData, ImageDataset, ImageTransform, add_data_arguments, check_resolution, collate,
    load_image_data,
)
from .distributed import (
    ParallelismConfigError, check_parallelism, enable_gradient_checkpointing, gathered_model, params_are_sharded, sharding,
)
from .families import (
    TOKENIZERS, FamilyNotAvailableError, WrongModelClassError, check_tokenizer_input, codebook_size, downsample_factor,
    find_component, freeze_to_decoder, parse_config_argument, with_new_decoder,
)
from .hub import make_model_card, push_folder_to_hub
from .losses import (
    DiscriminatorLoss, NLayerDiscriminator, NonFiniteGuard, TokenizerLoss, TokenizerLossConfig, adaptive_gan_weight,
    codebook_statistics, hinge_d_loss, last_decoder_layer, reconstruction_loss,
)
from .lpips import LPIPS, LPIPSWeightsNotFoundError, VGG16Features, load_lpips
from .validation import psnr, reconstruction_grid_images, reconstruction_metrics
