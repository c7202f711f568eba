"""Conversion of LlamaGen's released checkpoints (FoundationVision/LlamaGen) to hf_rq folders.

``python -m hf_rq.convert llamagen-vq --checkpoint vq_ds16_c2i.pt --allow-pickle --config VQ-16 --output DIR``
"""

from __future__ import annotations

import argparse
import re
from contextlib import nullcontext
from typing import Mapping

import torch

from ..autoencoder_blocks import taming_to_diffusers
from ..checkpoint_utils import CheckpointError, check_state_dict, load_config_file, load_state_dict
from .tokenizer import LlamaGenVQModel
from .llamagen import LlamaGenConfig, LlamaGenForImageGeneration
from .prior import CTFAuxiliaryModel, CTFForImageGeneration

# ======================================================================================================
# VQ tokenizer (vq_ds16_c2i.pt, vq_ds8_c2i.pt)
# ======================================================================================================

# The official ``VQ_models`` presets. ``VQModel`` always builds its encoder/decoder with ch=128 and
# num_res_blocks=2 (neither is a ModelArgs field), so those are fixed here too.
LLAMAGEN_VQ_PRESETS = {
    "VQ-16": dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),
}
_VQ_MODEL_ARGS_DEFAULTS = dict(
    codebook_size=16384,
    codebook_embed_dim=8,
    codebook_l2_norm=True,
    codebook_show_usage=True,
    commit_loss_beta=0.25,
    entropy_loss_ratio=0.0,
    encoder_ch_mult=[1, 1, 2, 2, 4],
    decoder_ch_mult=[1, 1, 2, 2, 4],
    z_channels=256,
    dropout_p=0.0,
)
_CODEBOOK_USAGE_KEY = "quantize.codebook_used"


def llamagen_vq_official_config(config: Mapping | str) -> dict:
    """Normalise an official VQ description to ``{"model_args": ..., "encoder_kwargs": ..., "decoder_kwargs": ...}``.

    Accepts a preset name (``"VQ-16"``, ``"VQ-8"``), a bare ``ModelArgs`` dict, or a dict with a
    ``model_args`` block and optional ``encoder_kwargs`` / ``decoder_kwargs`` (the layout of
    ``reference/llamagen/*/vq*.json``). Missing ModelArgs fields take the official defaults.
    """
    if isinstance(config, str):
        if config not in LLAMAGEN_VQ_PRESETS:
            raise CheckpointError(f"unknown LlamaGen VQ preset {config!r}; expected one of {sorted(LLAMAGEN_VQ_PRESETS)}")
        config = {"model_args": LLAMAGEN_VQ_PRESETS[config]}
    if not isinstance(config, Mapping):
        raise CheckpointError(f"LlamaGen VQ config must be a mapping or a preset name, got {type(config).__name__}")
    model_args = config["model_args"] if "model_args" in config else config
    unknown = sorted(set(model_args) - set(_VQ_MODEL_ARGS_DEFAULTS))
    if unknown:
        raise CheckpointError(f"LlamaGen VQ model_args has unknown field(s) {unknown}")
    model_args = {**_VQ_MODEL_ARGS_DEFAULTS, **model_args}
    defaults = dict(ch=128, num_res_blocks=2, norm_type="group", dropout=model_args["dropout_p"], resamp_with_conv=True,
                    z_channels=model_args["z_channels"])
    encoder = {**defaults, "in_channels": 3, "ch_mult": model_args["encoder_ch_mult"], **config.get("encoder_kwargs", {})}
    decoder = {**defaults, "out_channels": 3, "ch_mult": model_args["decoder_ch_mult"], **config.get("decoder_kwargs", {})}
    return {"model_args": model_args, "encoder_kwargs": encoder, "decoder_kwargs": decoder}


def llamagen_vq_config_from_official(config: Mapping | str) -> dict:
    """Translate an official VQ description (see :func:`llamagen_vq_official_config`) to ``LlamaGenVQModel`` kwargs."""
    official = llamagen_vq_official_config(config)
    args, enc, dec = official["model_args"], official["encoder_kwargs"], official["decoder_kwargs"]
    for name, kw in (("encoder_kwargs", enc), ("decoder_kwargs", dec)):
        if kw["norm_type"] != "group":
            raise CheckpointError(f"{name}.norm_type={kw['norm_type']!r} is not supported (released models use 'group')")
        if float(kw["dropout"]) != 0.0:
            raise CheckpointError(f"{name}.dropout={kw['dropout']} is not supported (released models use 0.0)")
        if not kw["resamp_with_conv"]:
            raise CheckpointError(f"{name}.resamp_with_conv=false is not supported")
        if list(kw["ch_mult"])[:1] != [1]:
            # LlamaGen's conv_in outputs ``ch``; diffusers' outputs the first level's width. They agree iff ch_mult[0] = 1.
            raise CheckpointError(f"{name}.ch_mult must start with 1, got {list(kw['ch_mult'])}")
        if kw["z_channels"] != args["z_channels"]:
            raise CheckpointError(
                f"{name}.z_channels={kw['z_channels']} differs from model_args.z_channels={args['z_channels']}"
            )
    if enc["num_res_blocks"] != dec["num_res_blocks"]:
        raise CheckpointError(
            f"encoder/decoder num_res_blocks differ ({enc['num_res_blocks']} vs {dec['num_res_blocks']}); not supported"
        )
    if float(args["entropy_loss_ratio"]) != 0.0:
        raise CheckpointError(f"entropy_loss_ratio={args['entropy_loss_ratio']} is not supported (released models use 0.0)")
    enc_channels = tuple(enc["ch"] * m for m in enc["ch_mult"])
    dec_channels = tuple(dec["ch"] * m for m in dec["ch_mult"])
    return dict(
        in_channels=enc["in_channels"],
        out_channels=dec["out_channels"],
        block_out_channels=enc_channels,
        decoder_block_out_channels=None if dec_channels == enc_channels else dec_channels,
        layers_per_block=enc["num_res_blocks"],
        latent_channels=args["z_channels"],
        embed_dim=args["codebook_embed_dim"],
        codebook_size=args["codebook_size"],
        codebook_l2_norm=bool(args["codebook_l2_norm"]),
        commitment_weight=float(args["commit_loss_beta"]),
    )


def _llamagen_to_taming(key: str, prefix: str, kind: str, num_levels: int) -> str:
    """One LlamaGen encoder/decoder key -> the taming name that ``taming_to_diffusers`` understands.

    LlamaGen names levels ``conv_blocks.{i}.{res,attn,downsample,upsample}`` and the middle block
    ``mid.{0,1,2}`` (res, attn, res); its decoder lists levels from the coarsest (``conv_blocks.0``) while
    taming's ``up.{level}`` counts from the finest.
    """
    rest = key[len(prefix):]
    m = re.fullmatch(r"conv_blocks\.(\d+)\.(res|attn)\.(\d+)\.(.+)", rest)
    if m:
        i, sub, j, leaf = m.groups()
        level = int(i) if kind == "encoder" else num_levels - 1 - int(i)
        side = "down" if kind == "encoder" else "up"
        return f"{prefix}{side}.{level}.{'block' if sub == 'res' else 'attn'}.{j}.{leaf}"
    m = re.fullmatch(r"conv_blocks\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
    if m and (m.group(2) == "downsample") == (kind == "encoder"):
        i, which, param = m.groups()
        level = int(i) if kind == "encoder" else num_levels - 1 - int(i)
        side = "down" if kind == "encoder" else "up"
        return f"{prefix}{side}.{level}.{which}.conv.{param}"
    m = re.fullmatch(r"mid\.([012])\.(.+)", rest)
    if m:
        return f"{prefix}mid.{('block_1', 'attn_1', 'block_2')[int(m.group(1))]}.{m.group(2)}"
    if re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest):
        return key
    raise CheckpointError(f"unrecognised LlamaGen {kind} key in checkpoint: {key!r}")


def convert_llamagen_vq_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping | str
) -> dict[str, torch.Tensor]:
    """Rename official LlamaGen VQ keys to ``LlamaGenVQModel`` keys (no model is built; works on meta tensors).

    ``quantize.codebook_used`` must be present when the official model has it (``codebook_show_usage``,
    true for every released file, which the official loader reads strictly) and is then dropped: it is a
    rolling window of the last 65536 training-time code indices that only feeds a logged usage statistic,
    so it changes no output, and carrying the authors' stale window into a converted model would report
    a usage that the model never produced. Every other key must be recognised.
    """
    official = llamagen_vq_official_config(config)
    out: dict[str, torch.Tensor] = {}
    for kind in ("encoder", "decoder"):
        prefix = kind + "."
        levels = len(official[f"{kind}_kwargs"]["ch_mult"])
        taming = {_llamagen_to_taming(k, prefix, kind, levels): v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            out.update(taming_to_diffusers(taming, levels, prefix, kind))
        except KeyError as exc:
            raise CheckpointError(str(exc)) from exc
    for name in ("quant_conv", "post_quant_conv"):
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            if key not in state_dict:
                raise CheckpointError(f"checkpoint is missing {key!r}")
            out[key] = state_dict[key]
    if "quantize.embedding.weight" not in state_dict:
        raise CheckpointError("checkpoint is missing 'quantize.embedding.weight'")
    out["quantizer.embedding.weight"] = state_dict["quantize.embedding.weight"]
    if official["model_args"]["codebook_show_usage"]:
        if _CODEBOOK_USAGE_KEY not in state_dict:
            raise CheckpointError(
                f"checkpoint is missing {_CODEBOOK_USAGE_KEY!r} (codebook_show_usage is true in the config)"
            )
        if state_dict[_CODEBOOK_USAGE_KEY].ndim != 1:
            shape = tuple(state_dict[_CODEBOOK_USAGE_KEY].shape)
            raise CheckpointError(f"{_CODEBOOK_USAGE_KEY!r} must be 1-D, got shape {shape}")
    known = {"quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
             "quantize.embedding.weight"}
    if official["model_args"]["codebook_show_usage"]:
        known.add(_CODEBOOK_USAGE_KEY)
    unknown = sorted(k for k in state_dict if not k.startswith(("encoder.", "decoder.")) and k not in known)
    if unknown:
        raise CheckpointError(f"checkpoint has keys the LlamaGen VQ converter does not understand: {unknown[:8]}")
    return out


def convert_llamagen_vq(state_dict: Mapping[str, torch.Tensor], config: Mapping | str = "VQ-16") -> LlamaGenVQModel:
    """Build a ``LlamaGenVQModel`` from an official state dict and config (preset name or dict), with strict checks."""
    model = LlamaGenVQModel(**llamagen_vq_config_from_official(config))
    converted = convert_llamagen_vq_state_dict(state_dict, config)
    check_state_dict(converted, model, "LlamaGen VQ checkpoint")
    # Released files may store other float dtypes than the model's float32; cast explicitly.
    bad = sorted(k for k, v in converted.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"LlamaGen VQ checkpoint has non-float tensors where weights are expected: {bad[:8]}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)
    return model.eval()


def load_llamagen_checkpoint(path, allow_pickle: bool = False, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a LlamaGen checkpoint (weights under ``"model"``, or a raw state dict) safely.

    LlamaGen's training scripts save their ``argparse.Namespace`` under ``"args"`` next to the weights; a
    ``torch.load(weights_only=True)`` refuses it, so exactly that one plain-attribute class is allow-listed
    (it cannot run code). Everything else still goes through ``weights_only=True``.
    """
    context = nullcontext()
    if allow_pickle and hasattr(torch.serialization, "safe_globals"):
        context = torch.serialization.safe_globals([argparse.Namespace])
    with context:
        return load_state_dict(path, allow_pickle=allow_pickle, key=key)


def _read_vq_config(value: str):
    return value if value in LLAMAGEN_VQ_PRESETS else load_config_file(value)


def _run_llamagen_vq(args) -> None:
    model = convert_llamagen_vq(load_llamagen_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle),
                                _read_vq_config(args.config))
    model.save_pretrained(args.output)
    print(f"wrote LlamaGenVQModel to {args.output}")


def _register_tokenizer_commands(subparsers) -> None:
    from ..convert import add_common_arguments

    p = subparsers.add_parser(
        "llamagen-vq", help="LlamaGen VQ tokenizer (vq_ds16_c2i.pt / vq_ds8_c2i.pt) -> LlamaGenVQModel folder"
    )
    add_common_arguments(p, needs_config=False)
    p.add_argument("--config", default="VQ-16",
                   help="official preset (VQ-16, VQ-8) or a JSON/YAML with LlamaGen's ModelArgs, "
                        "optionally under 'model_args' with 'encoder_kwargs'/'decoder_kwargs' (default: VQ-16)")
    p.set_defaults(func=_run_llamagen_vq)


# ======================================================================================================
# GPT prior (c2i_*.pt) and the CTF bundle
# ======================================================================================================

# The official ``GPT_models`` presets (n_layer, n_head, dim); every other ModelArgs field keeps its default.
LLAMAGEN_GPT_PRESETS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}
# CFG scales of LlamaGen's evaluation runs (GETTING_STARTED.md); used as the converted model's default.
LLAMAGEN_EVAL_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
_GPT_MODEL_ARGS_DEFAULTS = dict(
    dim=4096, n_layer=32, n_head=32, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None, rope_base=10000,
    norm_eps=1e-5, initializer_range=0.02, token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1,
    ffn_dropout_p=0.1, drop_path_rate=0.0, num_classes=1000, caption_dim=2048, class_dropout_prob=0.1,
    model_type="c2i", vocab_size=16384, cls_token_num=1, block_size=256, max_batch_size=32, max_seq_len=2048,
)
# Official keys that are not weights: a stale rotary table and the sampler's static KV cache.
_GPT_IGNORED_KEYS = re.compile(r"freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache")
_GPT_LAYER_RENAMES = {
    "attention.wqkv.weight": "self_attn.qkv_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GPT_TOP_RENAMES = {
    "cls_embedding.embedding_table.weight": "model.class_embedding.weight",
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llamagen_gpt_official_config(config: Mapping | str, image_size: int | None = None) -> dict:
    """Normalise an official GPT description to a full ``ModelArgs`` dict.

    Accepts a preset name (``"GPT-B"`` ... ``"GPT-3B"``), a bare ``ModelArgs`` dict, a dict with a
    ``model_args`` block (``reference/llamagen/small/gpt_config.json``) or with ``model_args_per_image_size``
    (``reference/llamagen/released/gpt_*.json``, pick one with ``image_size``). ``image_size`` sets
    ``block_size = (image_size // 16) ** 2`` (the released GPTs work on downsample-16 tokens).
    """
    if isinstance(config, str):
        if config not in LLAMAGEN_GPT_PRESETS:
            raise CheckpointError(f"unknown LlamaGen GPT preset {config!r}; expected one of {sorted(LLAMAGEN_GPT_PRESETS)}")
        model_args = dict(LLAMAGEN_GPT_PRESETS[config])
    elif isinstance(config, Mapping):
        if "model_args_per_image_size" in config:
            per_size = config["model_args_per_image_size"]
            if image_size is None and len(per_size) != 1:
                raise CheckpointError(f"the config lists image sizes {sorted(per_size)}: pass image_size")
            size = str(image_size) if image_size is not None else next(iter(per_size))
            if size not in per_size:
                raise CheckpointError(f"the config has no model_args for image size {size} (has {sorted(per_size)})")
            model_args = dict(per_size[size])
        else:
            model_args = dict(config["model_args"] if "model_args" in config else config)
    else:
        raise CheckpointError(f"LlamaGen GPT config must be a mapping or a preset name, got {type(config).__name__}")
    unknown = sorted(set(model_args) - set(_GPT_MODEL_ARGS_DEFAULTS))
    if unknown:
        raise CheckpointError(f"LlamaGen GPT model_args has unknown field(s) {unknown}")
    model_args = {**_GPT_MODEL_ARGS_DEFAULTS, **model_args}
    if image_size is not None:
        if image_size % 16:
            raise CheckpointError(f"image_size {image_size} is not a multiple of the tokenizer's downsampling (16)")
        model_args["block_size"] = (image_size // 16) ** 2
    return model_args


def llamagen_gpt_config_from_official(config: Mapping | str, image_size: int | None = None) -> dict:
    """Translate an official GPT description (see :func:`llamagen_gpt_official_config`) to ``LlamaGenConfig`` kwargs."""
    args = llamagen_gpt_official_config(config, image_size)
    if args["model_type"] != "c2i":
        raise CheckpointError(f"model_type={args['model_type']!r} is not supported (only class-conditional 'c2i')")
    if args["cls_token_num"] != 1:
        raise CheckpointError(f"cls_token_num={args['cls_token_num']} is not supported (c2i models use 1)")
    grid = int(round(args["block_size"] ** 0.5))
    if grid * grid != args["block_size"]:
        raise CheckpointError(f"block_size={args['block_size']} is not a square number of tokens")
    # caption_dim is t2i-only; max_batch_size / max_seq_len only size the official sampler's static cache.
    return dict(
        vocab_size=args["vocab_size"], num_classes=args["num_classes"], class_dropout_prob=float(args["class_dropout_prob"]),
        hidden_size=args["dim"], num_hidden_layers=args["n_layer"], num_attention_heads=args["n_head"],
        num_key_value_heads=args["n_kv_head"], multiple_of=args["multiple_of"],
        ffn_dim_multiplier=args["ffn_dim_multiplier"], grid_size=grid, rope_theta=float(args["rope_base"]),
        rms_norm_eps=float(args["norm_eps"]), token_dropout=float(args["token_dropout_p"]),
        attention_dropout=float(args["attn_dropout_p"]), resid_dropout=float(args["resid_dropout_p"]),
        ffn_dropout=float(args["ffn_dropout_p"]), drop_path_rate=float(args["drop_path_rate"]),
        initializer_range=float(args["initializer_range"]),
    )


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    # DDP / torch.compile wrappers prefix every key; the official loaders never see such files, but a user's
    # own training run may produce them.
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def convert_llamagen_gpt_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official GPT keys to ``LlamaGenForImageGeneration`` keys; drop only the known non-weights
    (``freqs_cis``, ``*.attention.kv_cache.*``); any other unknown key is an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _strip_wrapper_prefix(state_dict).items():
        if _GPT_IGNORED_KEYS.fullmatch(key):
            continue
        if key in _GPT_TOP_RENAMES:
            out[_GPT_TOP_RENAMES[key]] = value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m and m.group(2) in _GPT_LAYER_RENAMES:
            out[f"model.layers.{m.group(1)}.{_GPT_LAYER_RENAMES[m.group(2)]}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint has keys the LlamaGen GPT converter does not understand: {sorted(unknown)[:8]}")
    return out


def infer_llamagen_gpt_preset(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the official preset whose (dim, n_layer) match a GPT state dict (head counts are not in the shapes)."""
    state_dict = _strip_wrapper_prefix(state_dict)
    if "tok_embeddings.weight" not in state_dict:
        raise CheckpointError("not a LlamaGen GPT state dict: 'tok_embeddings.weight' is missing")
    dim = state_dict["tok_embeddings.weight"].shape[1]
    layers = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})
    for name, preset in LLAMAGEN_GPT_PRESETS.items():
        if (preset["dim"], preset["n_layer"]) == (dim, layers):
            return name
    raise CheckpointError(f"no official GPT preset has dim={dim} and {layers} layers; pass the config explicitly")


def _load_into(model, converted: Mapping[str, torch.Tensor], source: str) -> None:
    check_state_dict(converted, model, source)
    bad = sorted(k for k, v in converted.items() if not v.is_floating_point())
    if bad:
        raise CheckpointError(f"{source} has non-float tensors where weights are expected: {bad[:8]}")
    # Released files may store bf16/fp16 weights; the model is built in float32 (cast with .to() afterwards).
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)


def convert_llamagen_gpt(state_dict: Mapping[str, torch.Tensor], config: Mapping | str | None = None,
                         image_size: int | None = None, id2label: Mapping | None = None) -> LlamaGenForImageGeneration:
    """Build a ``LlamaGenForImageGeneration`` from an official GPT state dict (``checkpoint["model"]`` or a raw
    FSDP dict) and its config (preset name, ModelArgs dict; ``None`` infers the preset from the shapes).

    Strict: every weight must be present with the right shape, and only ``freqs_cis`` / KV-cache entries
    may be extra. The default ``guidance_scale`` is LlamaGen's evaluation CFG of the preset when known.
    """
    preset = config if isinstance(config, str) else None
    if config is None:
        preset = config = infer_llamagen_gpt_preset(state_dict)
    kwargs = llamagen_gpt_config_from_official(config, image_size)
    if id2label:
        kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
    model = LlamaGenForImageGeneration(LlamaGenConfig(**kwargs))
    _load_into(model, convert_llamagen_gpt_state_dict(state_dict), "LlamaGen GPT checkpoint")
    if preset in LLAMAGEN_EVAL_CFG:
        model.generation_config.guidance_scale = LLAMAGEN_EVAL_CFG[preset]
    return model.eval()


def convert_ctf(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> CTFForImageGeneration:
    """Build a ``CTFForImageGeneration`` from a bundle in the layout METHOD.md proposes (no official CTF
    checkpoint exists): ``stage1.*`` and ``stage2.*`` hold LlamaGen GPT keys, ``fine_to_coarse`` the
    `(codebook_size,)` table, ``coarse_centroids`` (optional) the `(num_clusters, C)` k-means centroids.

    ``config`` = ``{"stage1": ModelArgs or preset, "stage2": ModelArgs or preset, "image_size": 256,
    "kmeans_normalized": true, "kmeans_seed": 0, "id2label": {...}}``; stage 1's ``vocab_size`` is the
    number of clusters, stage 2's the codebook size (its input table has one row per cluster).
    """
    missing = [k for k in ("stage1", "stage2") if k not in config]
    if missing:
        raise CheckpointError(f"CTF config is missing {missing}")
    image_size = config.get("image_size")
    stages = {}
    for name in ("stage1", "stage2"):
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not sub:
            raise CheckpointError(f"the CTF bundle has no {prefix}* weights")
        stage_config = config[name]
        if isinstance(stage_config, str):
            args = llamagen_gpt_official_config(stage_config, image_size)
            args["vocab_size"] = sub["output.weight"].shape[0] if "output.weight" in sub else args["vocab_size"]
            stage_config = args
        stages[name] = (sub, llamagen_gpt_config_from_official(stage_config, image_size))
    extra = sorted(k for k in state_dict if not k.startswith(("stage1.", "stage2."))
                   and k not in ("fine_to_coarse", "coarse_centroids"))
    if extra:
        raise CheckpointError(f"the CTF bundle has keys the converter does not understand: {extra[:8]}")
    if "fine_to_coarse" not in state_dict:
        raise CheckpointError("the CTF bundle is missing 'fine_to_coarse'")
    (sd1, kw1), (sd2, kw2) = stages["stage1"], stages["stage2"]
    sd2 = dict(sd2)
    input_rows = sd2.get("tok_embeddings.weight")
    if input_rows is None:
        raise CheckpointError("the CTF bundle is missing 'stage2.tok_embeddings.weight'")
    kw2.update(input_vocab_size=input_rows.shape[0], is_causal=False)
    coarse = LlamaGenForImageGeneration(LlamaGenConfig(**kw1))
    _load_into(coarse, convert_llamagen_gpt_state_dict(sd1), "CTF stage-1 weights")
    fine = CTFAuxiliaryModel(LlamaGenConfig(**kw2))
    _load_into(fine, convert_llamagen_gpt_state_dict(sd2), "CTF stage-2 weights")
    centroids = state_dict.get("coarse_centroids")
    extra_config = {k: config[k] for k in ("kmeans_normalized", "kmeans_seed") if k in config}
    if config.get("id2label"):
        extra_config["id2label"] = {int(k): str(v) for k, v in config["id2label"].items()}
    try:
        model = CTFForImageGeneration.from_stages(coarse, fine, state_dict["fine_to_coarse"], centroids=centroids,
                                                  codebook_dim=None if centroids is None else centroids.shape[1],
                                                  **extra_config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"inconsistent CTF bundle: {exc}") from exc
    return model


def _read_gpt_config(value: str | None):
    if value is None or value in LLAMAGEN_GPT_PRESETS:
        return value
    return load_config_file(value)


def _image_size_from_name(path: str) -> int | None:
    m = re.search(r"_(\d{3,4})\.(pt|pth|bin|safetensors)$", str(path))
    return int(m.group(1)) if m else None


def _run_llamagen_gpt(args) -> None:
    state_dict = load_llamagen_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle, key=args.weights_key)
    image_size = args.image_size or _image_size_from_name(args.checkpoint)
    id2label = load_config_file(args.id2label) if args.id2label else None
    model = convert_llamagen_gpt(state_dict, _read_gpt_config(args.config), image_size, id2label)
    model.save_pretrained(args.output)
    print(f"wrote LlamaGenForImageGeneration ({model.config.hidden_size}-d, {model.config.num_hidden_layers} layers, "
          f"{model.config.grid_size}x{model.config.grid_size} tokens) to {args.output}")


def _run_ctf(args) -> None:
    model = convert_ctf(load_llamagen_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle),
                        load_config_file(args.config))
    if args.tokenizer:
        model.check_tokenizer(LlamaGenVQModel.from_pretrained(args.tokenizer))
    model.save_pretrained(args.output)
    print(f"wrote CTFForImageGeneration ({model.config.num_clusters} coarse labels) to {args.output}")


def _register_prior_commands(subparsers) -> None:
    from ..convert import add_common_arguments

    p = subparsers.add_parser("llamagen-gpt", help="LlamaGen c2i GPT (c2i_*.pt, DDP or raw FSDP) -> LlamaGenForImageGeneration folder")
    add_common_arguments(p, needs_config=False)
    p.add_argument("--config", default=None,
                   help="official preset (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, ...) or a JSON/YAML with ModelArgs "
                        "(bare, under 'model_args', or 'model_args_per_image_size'); default: inferred from the weights")
    p.add_argument("--image-size", type=int, default=None,
                   help="training image size (256 or 384: sets the 16x16 / 24x24 rotary grid); default: from the file name, else 256")
    p.add_argument("--weights-key", default=None, help="top-level entry holding the weights (default: 'model', else the raw dict)")
    p.add_argument("--id2label", default=None, help="optional JSON file {class id: name} stored in the config")
    p.set_defaults(func=_run_llamagen_gpt)

    p = subparsers.add_parser("ctf", help="CTF bundle (stage1.*/stage2.* LlamaGen weights + fine_to_coarse) -> CTFForImageGeneration folder")
    add_common_arguments(p, needs_config=True)
    p.add_argument("--tokenizer", default=None, help="optional LlamaGenVQModel folder to validate fine_to_coarse against")
    p.set_defaults(func=_run_ctf)


# ======================================================================================================
# Sub-commands of ``python -m hf_rq.convert`` for the CTF family
# ======================================================================================================


def register_commands(subparsers) -> None:
    """Sub-commands of ``python -m hf_rq.convert`` for the CTF family (LlamaGen checkpoints)."""
    _register_tokenizer_commands(subparsers)
    _register_prior_commands(subparsers)
