"""Conversion of the authors' DQ-VAE / DQ-Transformer checkpoints (CrossmodalGroup/DynamicVectorQuantization).

Stage 1 (``dqvae``): ``models.stage1_dynamic.{dqvae_dual_entropy, dqvae_dual_feat, dqvae_triple_feat}`` state dicts
(taming key names, a Lightning checkpoint's ``loss.*`` keys are dropped) with their yaml/JSON config (the
``model`` block with ``target`` / ``params``). Stage 2 (``dqtransformer``): a ``Dualformer`` checkpoint (its
``transformer.*`` StackGPT keys; the ``first_stage_model.*`` DQ-VAE can be converted from the same file) with the
stage-2 config. The StackGPT causal-mask buffers ``*.attn.mask`` (``block_size^2`` floats each, 400 MB for the
published model) are checked to be the lower triangle and dropped: attention is causal by construction here.

Usage::

    python -m hf_rq.convert dqvae --checkpoint vqgan.ckpt --allow-pickle --config dqvae.yml --output out/dqvae \\
        [--entropy-thresholds thresholds.json | --entropy-threshold 1.6778]
    python -m hf_rq.convert dqtransformer --checkpoint dualformer.ckpt --allow-pickle --config class.yml \\
        --output out/pipe --pipeline   # the DQ-VAE is read from the same checkpoint (first_stage_model.*)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from ..autoencoder_blocks import taming_to_diffusers
from ..checkpoint_utils import CheckpointError, build_prior_config, check_state_dict, require_keys
from .entropy import threshold_for_ratio

GATE_TYPES = {"1layer-fc": (1, "silu"), "2layer-fc-SiLu": (2, "silu"), "2layer-fc-ReLu": (2, "relu")}


def _target_and_params(config: Mapping, what: str) -> tuple[str, Mapping]:
    """Accept a whole yaml (``model: {target, params}``), a ``{target, params}`` block, or bare params."""
    if "model" in config and isinstance(config["model"], Mapping):
        config = config["model"]
    if "params" in config:
        return str(config.get("target", "")), config["params"]
    return "", config


def _block(params: Mapping, key: str, what: str) -> Mapping:
    block = params.get(key)
    if not isinstance(block, Mapping):
        raise CheckpointError(f"{what} config has no '{key}' block")
    return block.get("params", block)


def dqvae_config_from_official(config: Mapping, entropy_threshold: float | None = None,
                               entropy_thresholds: str | Path | Mapping | None = None,
                               entropy_bin_range: tuple[float, float] = (-1.0, 1.0)) -> dict:
    """Translate the authors' stage-1 config to ``DQVAEModel`` kwargs (strict).

    The entropy router's threshold is, in order: ``entropy_threshold``; the key for the config's
    ``fine_grain_ratito`` in ``entropy_thresholds`` (a JSON path or dict); the config's ``json_path`` if that file
    exists (relative to the working directory, as in the authors' code). The budget-loss targets are read from
    ``lossconfig.params.budget_loss_config`` when present.
    """
    target, params = _target_and_params(config, "DQ-VAE")
    enc_target = str((params.get("encoderconfig") or {}).get("target", ""))
    enc = _block(params, "encoderconfig", "DQ-VAE")
    dec = _block(params, "decoderconfig", "DQ-VAE")
    vq = _block(params, "vqconfig", "DQ-VAE")
    require_keys(enc, ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "router_config"],
                 "DQ-VAE encoderconfig")
    require_keys(dec, ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_ch", "resolution"], "DQ-VAE decoderconfig")
    require_keys(vq, ["codebook_size"], "DQ-VAE vqconfig")
    require_keys(params, ["quant_before_dim", "quant_after_dim"], "DQ-VAE params")
    triple = "Triple" in enc_target or "triple" in target
    num_grains = 3 if triple else 2
    ch, mult = int(enc["ch"]), list(enc["ch_mult"])
    z, D = int(enc["z_channels"]), int(params["quant_after_dim"])
    for key, value in (("dropout", enc.get("dropout", 0.0)), ("decoder dropout", dec.get("dropout", 0.0))):
        if float(value) != 0.0:
            raise CheckpointError(f"DQ-VAE {key}={value} is not supported (published models use 0.0)")
    if not enc.get("resamp_with_conv", True) or not dec.get("resamp_with_conv", True):
        raise CheckpointError("resamp_with_conv=false is not supported")
    if dec.get("give_pre_end", False):
        raise CheckpointError("decoderconfig.give_pre_end=true is not supported")
    if int(params["quant_before_dim"]) != z or int(dec["in_ch"]) != z:
        raise CheckpointError(f"quant_before_dim ({params['quant_before_dim']}) and decoder in_ch ({dec['in_ch']}) must equal "
                              f"z_channels ({z})")
    if int(vq.get("codebook_dim", D)) != D:
        raise CheckpointError(f"vqconfig.codebook_dim ({vq['codebook_dim']}) must equal quant_after_dim ({D})")
    if dec.get("position_type", "fourier+learned") != "fourier+learned":
        raise CheckpointError(f"decoder position_type {dec['position_type']!r} is not supported (only 'fourier+learned', published)")
    if int(dec["resolution"]) != int(enc["resolution"]):
        raise CheckpointError(f"encoder and decoder resolutions differ ({enc['resolution']} vs {dec['resolution']})")
    # The authors size each finer head as coarse_width // (ch_mult ratio); it equals the trunk width of that level
    # whenever the ratio divides, which is the only case their forward pass runs.
    width = ch * mult[-1]
    for g in range(1, num_grains):
        width = width // (mult[-g] // mult[-g - 1])
        if width != ch * mult[-1 - g]:
            raise CheckpointError(f"ch_mult {mult}: the authors' head width {width} differs from the trunk width "
                                  f"{ch * mult[-1 - g]} (their model cannot run this config)")

    router_target, router = str(enc["router_config"].get("target", "")), enc["router_config"].get("params", {})
    levels = len(mult)
    coarse_grid = int(enc["resolution"]) // 2 ** (levels - 1)
    kwargs = dict(
        in_channels=int(enc.get("in_channels", 3)),
        out_channels=int(dec.get("out_ch", 3)),
        sample_size=int(enc["resolution"]),
        block_out_channels=tuple(ch * m for m in mult),
        layers_per_block=int(enc["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in enc["attn_resolutions"]),
        decoder_block_out_channels=tuple(int(dec["ch"]) * m for m in dec["ch_mult"]),
        decoder_layers_per_block=int(dec["num_res_blocks"]),
        decoder_attn_resolutions=tuple(int(r) for r in dec["attn_resolutions"]),
        latent_channels=z,
        embed_dim=D,
        codebook_size=int(vq["codebook_size"]),
        ema_decay=float(vq.get("decay", 0.99)),
        restart_unused_codes=bool(vq.get("restart_unused_codes", True)),
        commitment_weight=float(vq.get("commitment_beta", 0.25)),
        num_grains=num_grains,
    )
    fine_grid = coarse_grid * 2 ** (num_grains - 1)
    if "latent_size" in dec and int(dec["latent_size"]) != fine_grid:
        raise CheckpointError(f"decoder latent_size {dec['latent_size']} differs from the fine grid {fine_grid}")

    if router_target.endswith("FixedEntropyRouter"):
        if triple:
            raise CheckpointError("an entropy router with three granularities does not exist in the authors' code")
        patch = int(params.get("entropy_patch_size", 16))
        image_size = int(params.get("image_size", 256))
        if patch * coarse_grid != int(enc["resolution"]) or image_size != int(enc["resolution"]):
            raise CheckpointError(
                f"entropy_patch_size {patch} / image_size {image_size} must tile the {enc['resolution']} px image into the "
                f"{coarse_grid}x{coarse_grid} coarse grid"
            )
        ratio = float(router.get("fine_grain_ratito", router.get("fine_grain_ratio", 0.5)))
        if entropy_threshold is None:
            source = entropy_thresholds
            if source is None and router.get("json_path") and Path(router["json_path"]).is_file():
                source = router["json_path"]
            if source is None:
                raise CheckpointError(
                    f"the entropy router needs its threshold: pass --entropy-threshold VALUE or --entropy-thresholds JSON "
                    f"(the config's json_path {router.get('json_path')!r} is not a file here)"
                )
            entropy_threshold = threshold_for_ratio(source, ratio)
        kwargs.update(router_type="entropy", entropy_threshold=float(entropy_threshold),
                      entropy_bin_range=tuple(float(v) for v in entropy_bin_range), fine_grain_ratio=ratio)
    elif router_target.endswith("FeatureRouter"):
        if ("Triple" in router_target) != triple:
            raise CheckpointError(f"router {router_target!r} does not match the encoder {enc_target!r}")
        require_keys(router, ["num_channels"], "DQ-VAE router params")
        if int(router["num_channels"]) != z:
            raise CheckpointError(f"router num_channels {router['num_channels']} must equal z_channels {z}")
        norm = router.get("normalization_type", "none")
        m = re.fullmatch(r"group-(\d+)", str(norm))
        if norm != "none" and not m:
            raise CheckpointError(f"router normalization_type {norm!r} is not supported ('none' or 'group-N')")
        gate_type = router.get("gate_type", "1layer-fc")
        if gate_type not in GATE_TYPES:
            raise CheckpointError(f"router gate_type {gate_type!r} is not supported ({sorted(GATE_TYPES)})")
        layers, act = GATE_TYPES[gate_type]
        kwargs.update(router_type="feature", entropy_threshold=None, router_norm_num_groups=int(m.group(1)) if m else 0,
                      router_gate_layers=layers, router_gate_act=act,
                      update_router=bool(enc.get("update_router", True)))
        budget = ((params.get("lossconfig") or {}).get("params") or {}).get("budget_loss_config")
        if budget:
            bp = budget.get("params", {})
            if triple:
                expected = (coarse_grid, 2 * coarse_grid, 4 * coarse_grid)
                found = (bp.get("min_grain_size", 8), bp.get("median_grain_size", 16), bp.get("max_grain_size", 32))
                kwargs.update(fine_grain_ratio=float(bp.get("target_fine_ratio", 0.3)),
                              median_grain_ratio=float(bp.get("target_median_ratio", 0.3)),
                              budget_gamma=float(bp.get("gamma", 1.0)))
            else:
                expected = (coarse_grid, 2 * coarse_grid)
                found = (bp.get("min_grain_size", 8), bp.get("max_grain_size", 16))
                if not bp.get("calculate_all", True):
                    raise CheckpointError("budget calculate_all=false is not supported (published: true)")
                kwargs.update(fine_grain_ratio=float(bp.get("target_ratio", 0.5)), budget_gamma=float(bp.get("gamma", 1.0)))
            if tuple(int(v) for v in found) != expected:
                raise CheckpointError(f"budget loss grain sizes {found} must be the grid side lengths {expected}")
        elif triple:
            kwargs.update(median_grain_ratio=0.3, fine_grain_ratio=0.3, budget_gamma=1.0)
    else:
        raise CheckpointError(f"unknown DQ-VAE router {router_target!r}")
    return kwargs


def _rename_head(state_dict: Mapping[str, torch.Tensor], official: str, ours: str, levels: int) -> dict:
    """``encoder.mid_<g>.*`` / ``norm_out_<g>`` / ``conv_out_<g>`` -> ``encoder.<g>_head.*``."""
    sub = {}
    for key, value in state_dict.items():
        if key.startswith(f"encoder.mid_{official}."):
            sub["h.mid." + key[len(f"encoder.mid_{official}."):]] = value
        elif key.startswith(f"encoder.norm_out_{official}."):
            sub["h.norm_out." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(f"encoder.conv_out_{official}."):
            sub["h.conv_out." + key.rsplit(".", 1)[1]] = value
    renamed = taming_to_diffusers(sub, levels, "h.", "encoder")
    return {f"encoder.{ours}_head." + k[2:]: v for k, v in renamed.items()}


def convert_dqvae_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "") -> dict:
    """Rename the authors' stage-1 keys (under ``prefix``, e.g. ``"first_stage_model."``) to ``DQVAEModel`` keys."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"checkpoint has no keys under {prefix!r}")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # LPIPS + discriminator of a Lightning ckpt
    levels = len(config["block_out_channels"])
    names = ("coarse", "median", "fine") if config["num_grains"] == 3 else ("coarse", "fine")
    out = {}
    trunk = {k: v for k, v in sd.items() if k.startswith(("encoder.conv_in.", "encoder.down."))}
    out.update(taming_to_diffusers(trunk, levels, "encoder.", "encoder"))
    for name in names:
        out.update(_rename_head(sd, name, name, levels))
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.router\.feature_norm_(coarse|median|fine)\.(weight|bias)", key)
        if m:
            out[f"router.{m.group(1)}_norm.{m.group(2)}"] = value
        elif key.startswith("encoder.router.gate."):
            out["router." + key[len("encoder.router."):]] = value
    position = {
        "decoder.position_bias_fourier.lff.ffm.conv.weight": "position_embedding.fourier.weight",
        "decoder.position_bias_fourier.lff.ffm.conv.bias": "position_embedding.fourier.bias",
        "decoder.position_bias_learned.row_embed.weight": "position_embedding.row_embed.weight",
        "decoder.position_bias_learned.col_embed.weight": "position_embedding.col_embed.weight",
    }
    for key, ours in position.items():
        if key in sd:
            out[ours] = sd[key]
    decoder = {k: v for k, v in sd.items() if k.startswith("decoder.") and k not in position}
    out.update(taming_to_diffusers(decoder, len(config["decoder_block_out_channels"]), "decoder.", "decoder"))
    for name in ("quant_conv", "post_quant_conv"):
        for param in ("weight", "bias"):
            if f"{name}.{param}" in sd:
                out[f"{name}.{param}"] = sd[f"{name}.{param}"]
    for buf in ("weight", "cluster_size_ema", "embed_ema"):
        if f"quantize.codebook.{buf}" in sd:
            out[f"quantizer.{buf}"] = sd[f"quantize.codebook.{buf}"]
    known_prefixes = ("encoder.conv_in.", "encoder.down.", "encoder.router.", "decoder.", "quant_conv.",
                      "post_quant_conv.", "quantize.codebook.")
    known_heads = tuple(f"encoder.{kind}_{name}." for name in names for kind in ("mid", "norm_out", "conv_out"))
    unknown = sorted(k for k in sd if not k.startswith(known_prefixes + known_heads))
    if unknown:
        raise CheckpointError(f"checkpoint has keys the DQ-VAE converter does not understand: {unknown[:8]}")
    return out


def convert_dqvae(state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "", **threshold_kwargs):
    """Build a ``DQVAEModel`` from the authors' stage-1 state dict and config, with strict key and shape checks.

    ``threshold_kwargs``: ``entropy_threshold`` / ``entropy_thresholds`` / ``entropy_bin_range`` (see
    :func:`dqvae_config_from_official`).
    """
    from .tokenizer import DQVAEModel

    kwargs = dqvae_config_from_official(config, **threshold_kwargs)
    try:
        model = DQVAEModel(**kwargs)
    except ValueError as exc:
        raise CheckpointError(f"the DQ-VAE config is not valid: {exc}") from exc
    converted = convert_dqvae_state_dict(state_dict, kwargs, prefix)
    check_state_dict(converted, model, "DQ-VAE checkpoint")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _threshold_kwargs(args) -> dict:
    return dict(entropy_threshold=args.entropy_threshold, entropy_thresholds=args.entropy_thresholds,
                entropy_bin_range=tuple(args.entropy_bin_range))


def _run_dqvae(args) -> None:
    from ..checkpoint_utils import load_config_file, load_state_dict

    model = convert_dqvae(load_state_dict(args.checkpoint, allow_pickle=args.allow_pickle), load_config_file(args.config),
                          prefix=args.prefix, **_threshold_kwargs(args))
    model.save_pretrained(args.output)
    print(f"wrote DQVAEModel ({model.config.router_type} router, {model.config.num_grains} granularities) to {args.output}")


def _add_threshold_arguments(p) -> None:
    p.add_argument("--entropy-threshold", type=float, default=None,
                   help="entropy router: the threshold itself (overrides the config's json_path)")
    p.add_argument("--entropy-thresholds", default=None,
                   help="entropy router: thresholds JSON ({'1'..'99'}); the key for the config's fine ratio is used")
    p.add_argument("--entropy-bin-range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("LOW", "HIGH"),
                   help="histogram bin range of the patch entropy (default -1 1, the authors' current model code)")


def register_commands(subparsers) -> None:
    """Sub-commands of ``python -m hf_rq.convert`` for the DQ family."""
    from ..convert import add_common_arguments

    p = subparsers.add_parser("dqvae", help="authors' DQ-VAE (stage 1) checkpoint -> DQVAEModel folder")
    add_common_arguments(p)
    p.add_argument("--prefix", default="", help="key prefix of the DQ-VAE in the checkpoint (e.g. 'first_stage_model.')")
    _add_threshold_arguments(p)
    p.set_defaults(func=_run_dqvae)
    _register_dqtransformer(subparsers)


# ------------------------------------------------------------------------------------------ DQ-Transformer
_DQT_RENAMES = {
    "pos_emb": "sequence_position_embedding",
    "content_emb.weight": "content_embedding.weight",
    "content_coarse_pos_emb.weight": "coarse_position_embedding.weight",
    "content_fine_pos_emb.weight": "fine_position_embedding.weight",
    "seg_emb.weight": "segment_embedding.weight",
    "position_head.0.weight": "position_norm.weight",
    "position_head.0.bias": "position_norm.bias",
    "position_head.1.weight": "position_head.weight",
    "content_head.0.weight": "content_norm.weight",
    "content_head.0.bias": "content_norm.bias",
    "content_head.1.weight": "content_head.weight",
    # the text prefix of a text-to-image model (see hf_rq.dq.text_conditioning)
    "text_projection.weight": "text_projection.weight",
    "text_projection.bias": "text_projection.bias",
}


def dqtransformer_config_from_official(config: Mapping) -> dict:
    """Translate the authors' stage-2 (``Dualformer``) config to ``DQTransformerConfig`` kwargs (strict).

    Every special token of the official config (pads, ends, class/start offsets of the permuter and of the
    label provider, the StackGPT vocabulary sizes) must equal the value this library derives from ``K``, the
    grid and the number of classes; otherwise the checkpoint would be read with shifted tokens.
    """
    _, params = _target_and_params(config, "DQ-Transformer")
    tr = _block(params, "transformer_config", "DQ-Transformer")
    perm = _block(params, "permuter_config", "DQ-Transformer")
    require_keys(tr, ["vocab_size", "coarse_position_size", "fine_position_size", "block_size", "position_layer",
                      "content_layer", "n_head", "n_embd"], "StackGPT params")
    require_keys(perm, ["coarse_hw", "fine_hw", "content_pad_code"], "permuter params")
    cond_key = "class_cond_stage_config" if "class_cond_stage_config" in params else "uncond_stage_config"
    cond_target = str((params.get(cond_key) or {}).get("target", ""))
    cond = _block(params, cond_key, "DQ-Transformer")
    hc, hf = int(perm["coarse_hw"]), int(perm["fine_hw"])
    if hf != 2 * hc:
        raise CheckpointError(f"permuter fine_hw ({hf}) must be twice coarse_hw ({hc})")
    K = int(perm["content_pad_code"])
    if cond_target.endswith("ClassAwareSOSProvider"):
        num_classes = int(cond["n_classes"])
        starts = {"threshold_content": K + 2, "threshold_coarse_position": hc * hc + 2,
                  "threshold_fine_position": hf * hf + 2}
    elif cond_target.endswith("PositionAwareSOSProvider"):
        num_classes = 0
        starts = {"coarse_sos": K + 2, "fine_sos": K + 2, "coarse_pos_sos": hc * hc + 2, "fine_pos_sos": hf * hf + 2}
    else:
        raise CheckpointError(f"unsupported conditioning {cond_target!r} (ClassAwareSOSProvider or PositionAwareSOSProvider)")
    if cond.get("coarse_seg_sos", 0) != 0 or cond.get("fine_seg_sos", 1) != 1:
        raise CheckpointError("the segment start tokens must be 0 (coarse) and 1 (fine)")
    from .tokens import DQVocabulary

    v = DQVocabulary(K, hc, num_classes)
    expected = {
        ("permuter", "content_eos_code"): v.content_eos,
        ("permuter", "coarse_position_pad_code"): v.coarse_pad,
        ("permuter", "coarse_position_eos_code"): v.coarse_eos,
        ("permuter", "fine_position_pad_code"): v.fine_pad,
        ("permuter", "fine_position_eos_code"): v.fine_eos,
        ("StackGPT", "vocab_size"): v.content_vocab_size,
        ("StackGPT", "coarse_position_size"): v.coarse_position_vocab_size,
        ("StackGPT", "fine_position_size"): v.fine_position_vocab_size,
        ("StackGPT", "content_pad_code"): v.content_pad,
        ("StackGPT", "coarse_position_pad_code"): v.coarse_pad,
        ("StackGPT", "fine_position_pad_code"): v.fine_pad,
        **{("label provider", k): value for k, value in starts.items()},
    }
    sources = {"permuter": perm, "StackGPT": tr, "label provider": cond}
    for (where, key), value in expected.items():
        found = sources[where].get(key, value)
        if int(found) != value:
            raise CheckpointError(f"{where} {key}={found} differs from the layout this library uses ({value}) for "
                                  f"K={K}, a {hc}x{hc}/{hf}x{hf} grid and {num_classes} classes")
    if not tr.get("activate_pad_ignore", True):
        raise CheckpointError("activate_pad_ignore=false is not supported (published: true)")
    if not params.get("activate_sos_for_fine_sequence", True):
        raise CheckpointError("activate_sos_for_fine_sequence=false is not supported (published: true)")
    segment = int(tr.get("segment_size", -1))
    if segment not in (-1, 0, 2):
        raise CheckpointError(f"segment_size={segment} is not supported (2 or none)")
    return dict(
        codebook_size=K,
        coarse_grid_size=hc,
        num_classes=num_classes,
        hidden_size=int(tr["n_embd"]),
        num_position_layers=int(tr["position_layer"]),
        num_content_layers=int(tr["content_layer"]),
        num_attention_heads=int(tr["n_head"]),
        max_position_embeddings=int(tr["block_size"]),
        use_segment_embedding=segment > 0,
        fine_position_order=str(perm.get("fine_position_order", "region-first")),
        content_loss_weight=float(params.get("content_loss_weight", 1.0)),
        position_loss_weight=float(params.get("position_loss_weight", 1.0)),
        embd_pdrop=float(tr.get("embd_pdrop", 0.0)),
        attn_pdrop=float(tr.get("attn_pdrop", 0.0)),
        resid_pdrop=float(tr.get("resid_pdrop", 0.0)),
    )


def convert_dqtransformer_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict:
    """Rename StackGPT keys (under ``prefix``, ``"transformer."`` in a Dualformer checkpoint) to ours.

    The causal-mask buffers ``*.attn.mask`` are checked to be the all-ones lower triangle and dropped.
    """
    from ..transformer_blocks import convert_mingpt_block_keys

    out, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        m = re.fullmatch(r"(position|content)_transformer\.(\d+)\.(.+)", k)
        if k in _DQT_RENAMES:
            out[_DQT_RENAMES[k]] = value
        elif m and m.group(3) == "attn.mask":
            n = value.shape[-1]
            if value.shape != (1, 1, n, n) or not torch.equal(value.reshape(n, n), torch.ones(n, n, dtype=value.dtype).tril()):
                raise CheckpointError(f"{key} is not the causal lower-triangular mask; this attention pattern is not supported")
        elif m:
            out[convert_mingpt_block_keys(f"{m.group(1)}_transformer.blocks.{m.group(2)}.{m.group(3)}")] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint has keys the DQ-Transformer converter does not understand: {sorted(unknown)[:8]}")
    if not out:
        raise CheckpointError(f"checkpoint has no DQ-Transformer keys under {prefix!r}")
    return out


def convert_dqtransformer(state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = "",
                          id2label: Mapping | None = None, sampling: Mapping | None = None):
    """Build a ``DQTransformerForImageGeneration`` from the authors' StackGPT state dict and stage-2 config.

    ``prefix``: ``"transformer."`` for a whole Dualformer checkpoint (its ``first_stage_model.*`` keys are then
    ignored here; convert them with :func:`convert_dqvae`). ``sampling`` (``temperature``, ``top_k``, ``top_p``,
    ``top_k_pos``, ``top_p_pos``) becomes the saved generation defaults; ``id2label`` names the classes.
    """
    from transformers import GenerationConfig

    from .prior import DQ_GENERATION_DEFAULTS, DQTransformerConfig, DQTransformerForImageGeneration

    kwargs = dqtransformer_config_from_official(config)
    text_key = prefix + "text_projection.weight"
    if is_text_to_image(config):
        if "text_encoder.text_projection" not in state_dict or text_key not in state_dict:
            raise CheckpointError(
                f"a text-to-image Dualformer needs 'text_encoder.*' weights and the text prefix projection {text_key!r}; "
                "the published StackGPT has no layer that reads the text (it drops `cond`), so a checkpoint of the "
                "published code cannot condition on text")
        kwargs["text_feature_size"] = int(state_dict["text_encoder.text_projection"].shape[1])
    cfg = build_prior_config(DQTransformerConfig, kwargs, "DQ-Transformer", id2label)
    model = DQTransformerForImageGeneration(cfg)
    if prefix:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("first_stage_model.", "text_encoder."))}
    converted = convert_dqtransformer_state_dict(state_dict, prefix)
    check_state_dict(converted, model, "DQ-Transformer checkpoint")
    model.load_state_dict(converted, strict=True)
    generation = dict(do_sample=True, temperature=1.0, top_k=300, top_p=1.0, **DQ_GENERATION_DEFAULTS)
    renames = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "top_k_pos": "position_top_k",
               "top_p_pos": "position_top_p", "fix_fine_position": "fix_fine_position"}
    for theirs, ours in renames.items():
        if sampling and sampling.get(theirs) is not None:
            generation[ours] = sampling[theirs]
    model.generation_config = GenerationConfig(**generation)
    return model.eval()


def is_text_to_image(config: Mapping) -> bool:
    """The authors' t2i Dualformer (``dqtransformer_t2i``): a ``text_encoder_config`` next to the transformer."""
    target, params = _target_and_params(config, "DQ-Transformer")
    return "text_encoder_config" in params or target.endswith("dqtransformer_t2i.Dualformer")


def _text_components(args, state_dict, full) -> dict:
    """``tokenizer`` + ``text_encoder`` of a text-to-image pipeline (empty for class / unconditional models)."""
    if not is_text_to_image(full):
        return {}
    from transformers import CLIPTokenizer

    from .text_conditioning import clip_tokenizer_from_bpe, load_clip_text_encoder

    encoder = load_clip_text_encoder(state_dict, "text_encoder.")
    if args.clip_tokenizer:
        tokenizer = CLIPTokenizer.from_pretrained(args.clip_tokenizer)
    elif args.bpe_vocab:
        tokenizer = clip_tokenizer_from_bpe(args.bpe_vocab, encoder.config.max_position_embeddings)
    else:
        raise CheckpointError("a text-to-image pipeline needs its tokenizer: --clip-tokenizer DIR (a CLIPTokenizer) or "
                              "--bpe-vocab bpe_simple_vocab_16e6.txt.gz (CLIP's merges file)")
    tokenizer.model_max_length = encoder.config.max_position_embeddings
    return dict(tokenizer=tokenizer, text_encoder=encoder)


def _run_dqtransformer(args) -> None:
    from ..checkpoint_utils import load_config_file, load_state_dict

    state_dict = load_state_dict(args.checkpoint, allow_pickle=args.allow_pickle)
    full = load_config_file(args.config)
    _, params = _target_and_params(full, "DQ-Transformer")
    prefix = args.prefix
    if prefix is None:
        prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    id2label = load_config_file(args.id2label) if args.id2label else None
    model = convert_dqtransformer(state_dict, full, prefix=prefix, id2label=id2label)
    if not args.pipeline:
        model.save_pretrained(args.output)
        print(f"wrote DQTransformerForImageGeneration to {args.output}")
        return
    from .pipeline import DQTransformerPipeline
    from .tokenizer import DQVAEModel

    if args.dqvae:
        vqvae = DQVAEModel.from_pretrained(args.dqvae)
    elif args.dqvae_checkpoint:
        vq_config = load_config_file(args.dqvae_config) if args.dqvae_config else params["first_stage_config"]
        vqvae = convert_dqvae(load_state_dict(args.dqvae_checkpoint, allow_pickle=args.allow_pickle), vq_config,
                              **_threshold_kwargs(args))
    elif any(k.startswith("first_stage_model.") for k in state_dict):
        if "first_stage_config" not in params:
            raise CheckpointError("the stage-2 config has no first_stage_config for the DQ-VAE inside the checkpoint")
        vqvae = convert_dqvae(state_dict, params["first_stage_config"], prefix="first_stage_model.", **_threshold_kwargs(args))
    else:
        raise CheckpointError("--pipeline needs the DQ-VAE: a checkpoint with first_stage_model.* keys, --dqvae DIR, or "
                              "--dqvae-checkpoint [--dqvae-config]")
    text = _text_components(args, state_dict, full)
    DQTransformerPipeline(vqvae=vqvae, transformer=model, **text).save_pretrained(args.output)
    print(f"wrote DQTransformerPipeline (vqvae + transformer{' + tokenizer + text_encoder' if text else ''}) to {args.output}")


def _register_dqtransformer(subparsers) -> None:
    from ..convert import add_common_arguments

    p = subparsers.add_parser("dqtransformer", help="authors' DQ-Transformer (stage 2) checkpoint -> prior or pipeline folder")
    add_common_arguments(p)
    p.add_argument("--prefix", default=None,
                   help="key prefix of StackGPT in the checkpoint (default: 'transformer.' when present)")
    p.add_argument("--id2label", default=None, help="JSON file {class id: name} (optional)")
    p.add_argument("--pipeline", action="store_true", help="write a DQTransformerPipeline folder (vqvae/ + transformer/)")
    p.add_argument("--dqvae", default=None, help="with --pipeline: a converted DQVAEModel folder")
    p.add_argument("--dqvae-checkpoint", default=None, help="with --pipeline: the authors' DQ-VAE checkpoint")
    p.add_argument("--dqvae-config", default=None, help="with --dqvae-checkpoint: its config (default: first_stage_config)")
    p.add_argument("--clip-tokenizer", default=None, help="text-to-image, with --pipeline: a CLIPTokenizer folder")
    p.add_argument("--bpe-vocab", default=None,
                   help="text-to-image, with --pipeline: CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) to build it")
    _add_threshold_arguments(p)
    p.set_defaults(func=_run_dqtransformer)
