"""Conversion of the authors' RQ-VAE / RQ-Transformer checkpoints (kakaobrain/rq-vae-transformer).

The authors' stage-1 model is configured by the ``arch`` block of its yaml (``hparams`` + ``ddconfig``)
and its state dict uses taming-transformers key names, with the shared codebook stored once per depth.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..autoencoder_blocks import taming_to_diffusers
from ..checkpoint_utils import CheckpointError, build_prior_config, check_state_dict, require_keys
from .tokenizer import RQVAEModel

# Keys of the official ``arch`` block that change nothing in the model function.
_IGNORED_HPARAMS = {"loss_type", "use_padding_idx", "masked_dropout", "bottleneck_type", "code_hier"}


def rqvae_config_from_official(arch: Mapping) -> dict:
    """Translate the official stage-1 ``arch`` block (``hparams`` + ``ddconfig``) to ``RQVAEModel`` kwargs."""
    if "hparams" not in arch or "ddconfig" not in arch:
        raise CheckpointError("RQ-VAE config must have 'hparams' and 'ddconfig' blocks (the 'arch' block of the stage-1 yaml)")
    hp, dd = arch["hparams"], arch["ddconfig"]
    require_keys(hp, ["embed_dim", "n_embed", "latent_shape", "code_shape"], "RQ-VAE hparams")
    require_keys(dd, ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution"], "RQ-VAE ddconfig")
    if hp.get("bottleneck_type", "rq") != "rq":
        raise CheckpointError(f"only bottleneck_type 'rq' is supported, got {hp['bottleneck_type']!r}")
    if dd.get("double_z", False):
        raise CheckpointError("ddconfig.double_z=true is not an RQ-VAE layout")
    if float(dd.get("dropout", 0.0)) != 0.0:
        raise CheckpointError(f"ddconfig.dropout={dd['dropout']} is not supported (all published models use 0.0)")
    if not dd.get("resamp_with_conv", True):
        raise CheckpointError("ddconfig.resamp_with_conv=false is not supported")
    latent_shape, code_shape = list(hp["latent_shape"]), list(hp["code_shape"])
    if latent_shape[:2] != code_shape[:2]:
        raise CheckpointError(
            f"code_shape {code_shape} groups latent pixels of latent_shape {latent_shape}; only h=H, w=W is supported"
        )
    n_embed, decay = hp["n_embed"], hp.get("decay", 0.99)
    if isinstance(n_embed, (list, tuple)):
        if len(set(n_embed)) != 1:
            raise CheckpointError(f"per-depth codebook sizes {n_embed} differ; only one size is supported")
        n_embed = n_embed[0]
    if isinstance(decay, (list, tuple)):
        if len(set(decay)) != 1:
            raise CheckpointError(f"per-depth EMA decays {decay} differ; only one decay is supported")
        decay = decay[0]
    if latent_shape[2] != hp["embed_dim"]:
        raise CheckpointError(f"latent_shape[2]={latent_shape[2]} must equal embed_dim={hp['embed_dim']}")
    return dict(
        in_channels=dd.get("in_channels", 3),
        out_channels=dd.get("out_ch", 3),
        sample_size=dd["resolution"],
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        layers_per_block=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]),
        latent_channels=dd["z_channels"],
        embed_dim=hp["embed_dim"],
        codebook_size=int(n_embed),
        code_depth=code_shape[2],
        shared_codebook=bool(hp.get("shared_codebook", False)),
        ema_decay=float(decay),
        restart_unused_codes=bool(hp.get("restart_unused_codes", False)),
        commitment_weight=float(hp.get("latent_loss_weight", 0.25)),
    )


def convert_rqvae_state_dict(state_dict: Mapping[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename official RQ-VAE keys to ``RQVAEModel`` keys; fold the D copies of a shared codebook into one."""
    levels = len(config["block_out_channels"])
    out = {}
    out.update(taming_to_diffusers(state_dict, levels, "encoder.", "encoder"))
    out.update(taming_to_diffusers(state_dict, levels, "decoder.", "decoder"))
    for name in ("quant_conv", "post_quant_conv"):
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            if key not in state_dict:
                raise CheckpointError(f"checkpoint is missing {key!r}")
            out[key] = state_dict[key]
    depth = config["code_depth"]
    for d in range(depth):
        for buf in ("weight", "cluster_size_ema", "embed_ema"):
            key = f"quantizer.codebooks.{d}.{buf}"
            if key not in state_dict:
                raise CheckpointError(f"checkpoint is missing {key!r} (code depth {depth})")
            if config["shared_codebook"]:
                first = state_dict[f"quantizer.codebooks.0.{buf}"]
                if not torch.equal(state_dict[key], first):
                    raise CheckpointError(
                        f"shared_codebook is true but {key!r} differs from quantizer.codebooks.0.{buf}"
                    )
                if d == 0:
                    out[key] = first
            else:
                out[key] = state_dict[key]
    known = {k for k in state_dict if k.startswith(("encoder.", "decoder.", "quantizer.codebooks.", "quant_conv.", "post_quant_conv."))}
    unknown = sorted(set(state_dict) - known)
    if unknown:
        raise CheckpointError(f"checkpoint has keys the RQ-VAE converter does not understand: {unknown[:8]}")
    extra_books = sorted(k for k in state_dict if k.startswith("quantizer.codebooks.") and int(k.split(".")[2]) >= depth)
    if extra_books:
        raise CheckpointError(f"checkpoint has codebooks beyond code depth {depth}: {extra_books[:4]}")
    return out


def convert_rqvae(state_dict: Mapping[str, torch.Tensor], arch: Mapping) -> RQVAEModel:
    """Build an ``RQVAEModel`` from an official state dict and ``arch`` config, with strict checks."""
    config = rqvae_config_from_official(arch)
    model = RQVAEModel(**config)
    converted = convert_rqvae_state_dict(state_dict, config)
    check_state_dict(converted, model, "RQ-VAE checkpoint")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _run_rqvae(args) -> None:
    from ..checkpoint_utils import load_config_file, load_state_dict

    model = convert_rqvae(load_state_dict(args.checkpoint, allow_pickle=args.allow_pickle),
                          load_config_file(args.config, section="arch"))
    model.save_pretrained(args.output)
    print(f"wrote RQVAEModel to {args.output}")


def register_commands(subparsers) -> None:
    """Sub-commands of ``python -m hf_rq.convert`` for the RQ family."""
    from ..convert import add_common_arguments

    p = subparsers.add_parser("rqvae", help="authors' RQ-VAE (stage 1) checkpoint -> RQVAEModel folder")
    add_common_arguments(p)
    p.set_defaults(func=_run_rqvae)
    _register_rqtransformer(subparsers)


# ------------------------------------------------------------------------------------------ RQ-Transformer
# Defaults of the authors' RQTransformerConfig dataclass (filled by their ``augment_arch_defaults``); the
# published yamls omit most of these keys.
_RQT_DEFAULTS = dict(vocab_size_cond=0, block_size_cond=0, input_emb_vqvae=False, head_emb_vqvae=False,
                     cumsum_depth_ctx=False, shared_cls_emb=False, embd_pdrop=0.0)
_RQT_BLOCK_DEFAULTS = dict(mlp_bias=True, attn_bias=True, attn_pdrop=0.0, resid_pdrop=0.1, gelu="v1")
# Keys of the authors' config that change nothing in the model function when the embeddings come from the
# RQ-VAE (``shared_tok_emb`` only matters with a token table; the others are unused by their model).
_RQT_IGNORED = {"type", "ema", "ar_hierarchy", "use_padding_emb", "scaled_head_emb_vqvae", "shared_tok_emb"}

_RQT_RENAMES = {
    "pos_emb_cond": "class_position_embedding",
    "pos_emb_hw": "spatial_position_embedding",
    "pos_emb_d": "depth_position_embedding",
    "cond_emb.weight": "class_embedding.weight",
    "input_mlp.weight": "spatial_input_proj.weight",
    "input_mlp.bias": "spatial_input_proj.bias",
    "head_mlp.weight": "depth_input_proj.weight",
    "head_mlp.bias": "depth_input_proj.bias",
    "classifier.layer_norm.weight": "final_layer_norm.weight",
    "classifier.layer_norm.bias": "final_layer_norm.bias",
    "classifier.linear.weight": "lm_head.weight",
    "classifier.linear.bias": "lm_head.bias",
}
# The text-to-image model (block_size_cond > 1): the conditioning stream is the text prefix.
_RQT_TEXT_RENAMES = {
    "pos_emb_cond": "text_position_embedding",
    "cond_emb.weight": "text_embedding.weight",
    "cond_classifier.layer_norm.weight": "text_head.layer_norm.weight",
    "cond_classifier.layer_norm.bias": "text_head.layer_norm.bias",
    "cond_classifier.linear.weight": "text_head.linear.weight",
    "cond_classifier.linear.bias": "text_head.linear.bias",
}
# Their text tokenizers of the CharBPE kind (``txt_tok_name``); the others are not used by a released model.
_RQT_TEXT_TOKENIZERS = ("bpe16k_huggingface", "bpe30k_huggingface")


def _stack_block(arch: Mapping, name: str) -> dict:
    stack = arch.get(name)
    if not isinstance(stack, Mapping) or "n_layer" not in stack or "n_head" not in stack.get("block", {}):
        raise CheckpointError(f"RQ-Transformer config needs '{name}.n_layer' and '{name}.block.n_head'")
    block = dict(_RQT_BLOCK_DEFAULTS, **stack["block"])
    if block.get("embed_dim", arch["embed_dim"]) != arch["embed_dim"]:
        raise CheckpointError(f"{name}.block.embed_dim={block['embed_dim']} differs from embed_dim={arch['embed_dim']}")
    if block["gelu"] != "v1":
        raise CheckpointError(f"{name}.block.gelu={block['gelu']!r} is not supported (only the exact GELU 'v1')")
    if not (block["mlp_bias"] and block["attn_bias"]):
        raise CheckpointError(f"{name}.block without biases (mlp_bias/attn_bias false) is not supported")
    return dict(n_layer=int(stack["n_layer"]), n_head=int(block["n_head"]), attn_pdrop=float(block["attn_pdrop"]),
                resid_pdrop=float(block["resid_pdrop"]))


def rqtransformer_config_from_official(arch: Mapping, vocab_size: int | None = None) -> dict:
    """Translate the authors' stage-2 ``arch`` block to ``RQTransformerConfig`` kwargs (strict).

    ``vocab_size`` is used when the block has none (the published yamls take it from ``dataset.vocab_size``).
    Only the image models are supported: codeword inputs (``input_emb_vqvae``, ``head_emb_vqvae``,
    ``cumsum_depth_ctx``), one shared classifier, and a single class/start token or (``block_size_cond > 1``,
    the CC-3M model) a text prefix of ``block_size_cond`` tokens from ``vocab_size_cond``.
    """
    require_keys(arch, ["block_size", "embed_dim", "input_embed_dim"], "RQ-Transformer arch")
    unknown = sorted(set(arch) - set(_RQT_DEFAULTS) - _RQT_IGNORED - {"block_size", "embed_dim", "input_embed_dim",
                                                                       "vocab_size", "body", "head"})
    if unknown:
        raise CheckpointError(f"RQ-Transformer arch has keys the converter does not understand: {unknown}")
    a = dict(_RQT_DEFAULTS, **arch)
    for flag in ("input_emb_vqvae", "head_emb_vqvae", "cumsum_depth_ctx", "shared_cls_emb"):
        if not a[flag]:
            raise CheckpointError(f"arch.{flag}=false is not supported (every published image model sets it true)")
    block_size = list(a["block_size"])
    if len(block_size) != 3:
        raise CheckpointError(f"arch.block_size must be [h, w, D], got {block_size}")
    vocab = a.get("vocab_size", vocab_size)
    if vocab is None:
        raise CheckpointError("no vocab_size: it is neither in arch nor in dataset.vocab_size nor given")
    if isinstance(vocab, (list, tuple)):
        if len(set(vocab)) != 1:
            raise CheckpointError(f"per-depth vocab sizes {vocab} differ; only one size is supported")
        vocab = vocab[0]
    text_length = int(a["block_size_cond"]) if int(a["block_size_cond"]) > 1 else 0
    if text_length and int(a["vocab_size_cond"]) <= 1:
        raise CheckpointError(f"block_size_cond={text_length} needs vocab_size_cond > 1 (the text vocabulary)")
    body, head = _stack_block(a, "body"), _stack_block(a, "head")
    for key in ("attn_pdrop", "resid_pdrop"):
        if body[key] != head[key]:
            raise CheckpointError(f"body and head use different {key} ({body[key]} vs {head[key]}); only one value is supported")
    num_classes = int(a["vocab_size_cond"]) if int(a["vocab_size_cond"]) > 1 and not text_length else 0
    text = dict(text_length=text_length, text_vocab_size=int(a["vocab_size_cond"])) if text_length else {}
    return dict(
        **text,
        codebook_size=int(vocab),
        grid_height=int(block_size[0]),
        grid_width=int(block_size[1]),
        code_depth=int(block_size[2]),
        code_embed_dim=int(a["input_embed_dim"]),
        hidden_size=int(a["embed_dim"]),
        num_spatial_layers=body["n_layer"],
        num_depth_layers=head["n_layer"],
        num_attention_heads=body["n_head"],
        num_depth_attention_heads=head["n_head"],
        num_classes=num_classes,
        embd_pdrop=float(a["embd_pdrop"]),
        attn_pdrop=body["attn_pdrop"],
        resid_pdrop=body["resid_pdrop"],
    )


def convert_rqtransformer_state_dict(state_dict: Mapping[str, torch.Tensor], text: bool = False) -> dict[str, torch.Tensor]:
    """Rename the authors' stage-2 keys to ``RQTransformerForImageGeneration`` keys (no codebook yet).

    ``text``: the checkpoint is the text-to-image model (its ``cond_*`` keys are the text prefix)."""
    from ..transformer_blocks import convert_mingpt_block_keys

    renames = {**_RQT_RENAMES, **_RQT_TEXT_RENAMES} if text else _RQT_RENAMES
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in renames:
            out[renames[key]] = value
        elif key.startswith("body_transformer.blocks."):
            out[convert_mingpt_block_keys("spatial_transformer." + key[len("body_transformer."):])] = value
        elif key.startswith("head_transformer.blocks."):
            out[convert_mingpt_block_keys("depth_transformer." + key[len("head_transformer."):])] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint has keys the RQ-Transformer converter does not understand: {sorted(unknown)[:8]}")
    return out


def convert_rqtransformer(state_dict: Mapping[str, torch.Tensor], arch: Mapping, tokenizer: RQVAEModel,
                          sampling: Mapping | None = None, id2label: Mapping | None = None, text_tokenizer=None):
    """Build an ``RQTransformerForImageGeneration`` from the authors' stage-2 state dict and ``arch`` block.

    ``tokenizer`` is the matching ``RQVAEModel`` (converted with :func:`convert_rqvae`); its codebook is copied
    into the prior. ``sampling`` (the config's ``experiment.sample`` / ``sampling`` block: ``temperature``,
    ``top_k``, ``top_p``) becomes the saved generation defaults; ``id2label`` names the classes.
    ``text_tokenizer`` (the authors' text tokenizer, ``hf_rq.rq.text_tokenizer``) is required for a
    text-to-image checkpoint: its ``[PAD]`` id becomes ``text_pad_token_id`` and its size is checked.
    """
    from transformers import GenerationConfig

    from .prior import RQTransformerConfig, RQTransformerForImageGeneration

    kwargs = rqtransformer_config_from_official(arch, vocab_size=tokenizer.config.codebook_size)
    kwargs["shared_codebook"] = bool(tokenizer.config.shared_codebook)
    text = kwargs.get("text_length", 0) > 0
    if text:
        if text_tokenizer is None:
            raise CheckpointError("this is a text-to-image checkpoint (block_size_cond > 1): pass the authors' text "
                                  "tokenizer files (--text-vocab / --text-merges)")
        if len(text_tokenizer) > kwargs["text_vocab_size"]:
            raise CheckpointError(f"the text tokenizer has {len(text_tokenizer)} tokens, more than the model's "
                                  f"vocab_size_cond={kwargs['text_vocab_size']}")
        kwargs["text_pad_token_id"] = text_tokenizer.pad_token_id
    config = build_prior_config(RQTransformerConfig, kwargs, "RQ-Transformer", id2label)
    model = RQTransformerForImageGeneration(config)
    converted = convert_rqtransformer_state_dict(state_dict, text=text)
    try:
        model.load_codebook_from(tokenizer)
    except ValueError as exc:
        raise CheckpointError(f"the RQ-VAE does not match the RQ-Transformer config: {exc}") from exc
    converted["code_embeddings"] = model.code_embeddings.clone()
    check_state_dict(converted, model, "RQ-Transformer checkpoint")
    model.load_state_dict(converted, strict=True)
    generation = dict(do_sample=True, temperature=1.0)
    for key in ("temperature", "top_k", "top_p"):
        if sampling and sampling.get(key) is not None:
            generation[key] = sampling[key]
    model.generation_config = GenerationConfig(**generation)
    return model.eval()


def _run_rqtransformer(args) -> None:
    from ..checkpoint_utils import load_config_file, load_state_dict

    if args.rqvae is not None:
        if args.rqvae_checkpoint or args.rqvae_config:
            raise CheckpointError("give either --rqvae (a converted RQVAEModel folder) or --rqvae-checkpoint/--rqvae-config")
        tokenizer = RQVAEModel.from_pretrained(args.rqvae)
    elif args.rqvae_checkpoint and args.rqvae_config:
        tokenizer = convert_rqvae(load_state_dict(args.rqvae_checkpoint, allow_pickle=args.allow_pickle),
                                  load_config_file(args.rqvae_config, section="arch"))
    else:
        raise CheckpointError("the RQ-Transformer needs its RQ-VAE: pass --rqvae DIR, or --rqvae-checkpoint and --rqvae-config")
    full = load_config_file(args.config)
    arch = full.get("arch", full)
    sampling = full.get("sampling") or (full.get("experiment") or {}).get("sample")
    dataset_vocab = (full.get("dataset") or {}).get("vocab_size")
    if dataset_vocab is not None and "vocab_size" not in arch:
        arch = dict(arch, vocab_size=dataset_vocab)
    id2label = load_config_file(args.id2label) if args.id2label else None
    text_tokenizer = _text_tokenizer(args, full, arch)
    model = convert_rqtransformer(load_state_dict(args.checkpoint, allow_pickle=args.allow_pickle), arch, tokenizer,
                                  sampling=sampling, id2label=id2label, text_tokenizer=text_tokenizer)
    if args.pipeline or text_tokenizer is not None:
        from .pipeline import RQTransformerPipeline

        RQTransformerPipeline(vqvae=tokenizer, transformer=model, tokenizer=text_tokenizer).save_pretrained(args.output)
        print(f"wrote RQTransformerPipeline (vqvae + transformer{' + tokenizer' if text_tokenizer else ''}) to {args.output}")
    else:
        model.save_pretrained(args.output)
        print(f"wrote RQTransformerForImageGeneration to {args.output}")


def _text_tokenizer(args, full: Mapping, arch: Mapping):
    """The authors' text tokenizer for a text-to-image config (None for image models), from --text-vocab/--text-merges."""
    length = int(arch.get("block_size_cond", 0) or 0)
    if length <= 1:
        if args.text_vocab or args.text_merges:
            raise CheckpointError("--text-vocab / --text-merges: this checkpoint has no text prefix (block_size_cond <= 1)")
        return None
    if not (args.text_vocab and args.text_merges):
        raise CheckpointError(f"this is a text-to-image checkpoint (block_size_cond={length}): pass the authors' text "
                              "tokenizer files --text-vocab bpe-16k-vocab.json --text-merges bpe-16k-merges.txt (in their "
                              "rqvae/txtimg_datasets/tokenizers/pretrained/)")
    dataset = full.get("dataset") or {}
    name = dataset.get("txt_tok_name", "bpe16k_huggingface")
    if name not in _RQT_TEXT_TOKENIZERS:
        raise CheckpointError(f"dataset.txt_tok_name={name!r} is not supported (only {_RQT_TEXT_TOKENIZERS})")
    context = int(dataset.get("context_length", length))
    if context != length:
        raise CheckpointError(f"dataset.context_length={context} differs from arch.block_size_cond={length}")
    from .text_tokenizer import rq_text_tokenizer_from_files

    return rq_text_tokenizer_from_files(args.text_vocab, args.text_merges, length)


def _register_rqtransformer(subparsers) -> None:
    from ..convert import add_common_arguments

    p = subparsers.add_parser("rqtransformer", help="authors' RQ-Transformer (stage 2) checkpoint -> prior folder")
    add_common_arguments(p)
    p.add_argument("--rqvae", default=None, help="converted RQVAEModel folder (save_pretrained) of the matching RQ-VAE")
    p.add_argument("--rqvae-checkpoint", default=None, help="authors' matching RQ-VAE checkpoint (for its codebook)")
    p.add_argument("--rqvae-config", default=None, help="authors' matching RQ-VAE config (.yaml/.json)")
    p.add_argument("--id2label", default=None, help="JSON file {class id: name} (optional)")
    p.add_argument("--pipeline", action="store_true",
                   help="write a full RQTransformerPipeline folder (vqvae/ + transformer/) instead of the prior alone "
                        "(always done for a text-to-image checkpoint, with tokenizer/)")
    p.add_argument("--text-vocab", default=None, help="text-to-image: the authors' bpe-16k-vocab.json")
    p.add_argument("--text-merges", default=None, help="text-to-image: the authors' bpe-16k-merges.txt")
    p.set_defaults(func=_run_rqtransformer)
