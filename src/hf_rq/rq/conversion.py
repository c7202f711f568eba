"""Conversion of the authors' RQ-VAE / RQ-Transformer checkpoints (kakaobrain/rq-vae-transformer).

The authors' stage-1 model is configured by the ``arch`` block of its yaml (``hparams`` + ``ddconfig``)
and its state dict uses taming-transformers key names, with the shared codebook stored once per depth.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..autoencoder_blocks import taming_to_diffusers
from ..checkpoint_utils import CheckpointError, check_state_dict, require_keys
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
