"""Tiny RQ tokenizer / pipeline builders shared by the evaluation and CLI tests (CPU, seconds)."""

from pathlib import Path

import torch

EMOJI_CLASSES = ["activities", "animals_nature", "flags", "food_drink", "objects", "people_body", "smileys_emotion",
                 "symbols", "travel_places"]


def tiny_rqvae(sample_size: int = 32, seed: int = 0):
    """32x32 images -> 4x4x3 codes, K=16 (factor 8: four levels of 32 channels)."""
    from hf_rq import RQVAEModel

    torch.manual_seed(seed)
    return RQVAEModel(sample_size=sample_size, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                      attn_resolutions=(), latent_channels=8, embed_dim=8, codebook_size=16, code_depth=3).eval()


def tiny_rq_pipeline(class_names=EMOJI_CLASSES, seed: int = 0):
    from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQTransformerPipeline

    vqvae = tiny_rqvae(seed=seed)
    config = RQTransformerConfig(codebook_size=16, grid_height=4, grid_width=4, code_depth=3, code_embed_dim=8,
                                 hidden_size=32, num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2,
                                 num_classes=len(class_names), id2label=dict(enumerate(class_names)))
    torch.manual_seed(seed)
    prior = RQTransformerForImageGeneration.from_tokenizer(config, vqvae).eval()
    pipe = RQTransformerPipeline(vqvae=vqvae, transformer=prior)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, **kwargs) -> Path:
    tiny_rq_pipeline(**kwargs).save_pretrained(folder)
    return folder


def tiny_rq_text_pipeline(seed: int = 0):
    """A text-conditional tiny RQ pipeline (text_length 6, caption dropout: guidance and negative prompts work)."""
    from hf_rq import RQTransformerConfig, RQTransformerForImageGeneration, RQTransformerPipeline
    from hf_rq.rq.text_tokenizer import train_rq_text_tokenizer

    vqvae = tiny_rqvae(seed=seed)
    text = train_rq_text_tokenizer(["grinning face", "red apple", "a cat with a hat", "smiling face"], 48, 6)
    config = RQTransformerConfig(codebook_size=16, grid_height=4, grid_width=4, code_depth=3, code_embed_dim=8,
                                 hidden_size=32, num_spatial_layers=1, num_depth_layers=1, num_attention_heads=2,
                                 text_length=6, text_vocab_size=len(text), text_pad_token_id=text.pad_token_id,
                                 use_null_text=True, text_dropout_prob=0.1)
    torch.manual_seed(seed)
    prior = RQTransformerForImageGeneration.from_tokenizer(config, vqvae).eval()
    pipe = RQTransformerPipeline(vqvae=vqvae, transformer=prior, tokenizer=text)
    pipe.set_progress_bar_config(disable=True)
    return pipe
