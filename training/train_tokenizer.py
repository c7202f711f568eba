#!/usr/bin/env python
"""Train or fine-tune an image tokenizer (RQ-VAE, DQ-VAE, LlamaGen VQ) with the VQGAN objective.

    python training/train_tokenizer.py --model rqvae --model_config training/configs/rqvae_emoji64.json \
        --train_data_dir ../shared/data/emoji --resolution 64 --output_dir runs/rqvae-emoji
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train_tokenizer.py ...

Loss: reconstruction (MSE or L1) + commitment (+ codebook, + the model's extra loss such as DQ's budget loss)
+ LPIPS + PatchGAN hinge loss with the adaptive weight, from ``--disc_start`` (see hf_rq.training.losses).
The final model is written to ``--output_dir`` with ``save_pretrained`` (the EMA weights with ``--use_ema``).

``--train_decoder_only`` fine-tunes a pretrained tokenizer's decoder side alone: the encoder and codebook are
frozen and the whole model runs in eval mode (no codebook EMA updates or restarts, deterministic routing), so
every image keeps its codes and a prior trained on them stays valid. With it, ``--model_config`` may rebuild a
wider decoder (``decoder_*`` keys), which then starts fresh where its shapes changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hf_rq.training import (
    DiscriminatorLoss, NLayerDiscriminator, TokenizerLoss, TokenizerLossConfig, TOKENIZERS, add_data_arguments,
    add_training_arguments, check_parallelism, check_resolution, check_tokenizer_input, codebook_size,
    codebook_statistics, collate, downsample_factor, enable_gradient_checkpointing, last_decoder_layer,
    freeze_to_decoder, load_image_data, load_lpips, log_image_grid, make_accelerator, make_model_card, make_scheduler,
    parse_config_argument, prepare_resumable_state, push_folder_to_hub, reconstruction_grid_images,
    reconstruction_metrics, save_checkpoint, training_length, validate_training_arguments, with_new_decoder,
    write_rank_report,
)

logger = logging.getLogger("train_tokenizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(TOKENIZERS), default="rqvae", help="Tokenizer family to train.")
    parser.add_argument("--model_config", type=str, default=None,
                        help="Architecture for training from scratch: a JSON file (e.g. a config.json) or inline JSON.")
    g = parser.add_argument_group("loss")
    g.add_argument("--reconstruction_loss", choices=["mse", "l1"], default="mse")
    g.add_argument("--commitment_weight", type=float, default=None, help="Default: the model config's, else 0.25.")
    g.add_argument("--codebook_weight", type=float, default=1.0, help="Weight of a gradient-trained codebook's loss.")
    g.add_argument("--perceptual_weight", type=float, default=1.0, help="LPIPS weight; 0 trains without it (no VGG weights needed).")
    g.add_argument("--lpips_weights", type=str, default=None,
                   help="LPIPS linear layers, or a combined LPIPS file (python -m hf_rq.training.lpips).")
    g.add_argument("--vgg_weights", type=str, default=None, help="torchvision's vgg16 weights (default: the torch hub cache).")
    g.add_argument("--allow_pickle", action="store_true", help="Allow .pth weight files (read with weights_only=True).")
    g.add_argument("--disc_weight", type=float, default=0.75, help="PatchGAN loss weight; 0 disables the discriminator.")
    g.add_argument("--disc_start", type=int, default=0, help="Optimizer step at which the GAN loss starts.")
    g.add_argument("--disc_layers", type=int, default=2)
    g.add_argument("--disc_channels", type=int, default=64)
    g.add_argument("--adaptive_disc_weight", action=argparse.BooleanOptionalAction, default=True,
                   help="Balance the GAN gradient against the reconstruction gradient at the decoder's last layer.")
    g.add_argument("--disc_weight_max", type=float, default=1e4, help="Clamp of the adaptive weight (DQ uses 0.75).")
    g.add_argument("--disc_learning_rate", type=float, default=None, help="Default: --learning_rate.")
    g.add_argument("--max_eval_samples", type=int, default=512, help="Validation images used for PSNR / codebook usage.")
    parser.add_argument("--train_decoder_only", action="store_true",
                        help="Fine-tune only the decoder of --pretrained_model_name_or_path (codes unchanged); "
                             "--model_config may then set decoder_* keys to rebuild a larger decoder.")
    add_data_arguments(parser)
    add_training_arguments(parser, default_lr=4e-5)
    parser.set_defaults(adam_beta1=0.5, adam_beta2=0.9)  # the RQ-VAE authors' Adam betas (ARCHITECTURE.md 1.6)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    validate_training_arguments(args)
    if args.pretrained_model_name_or_path is None and args.model_config is None:
        parser.error("pass --model_config (train from scratch) or --pretrained_model_name_or_path (fine-tune)")
    if args.train_decoder_only and args.pretrained_model_name_or_path is None:
        parser.error("--train_decoder_only fine-tunes a pretrained tokenizer: pass --pretrained_model_name_or_path")
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args, "train_tokenizer")
    check_parallelism(accelerator, args, allow_sharding=False)
    set_seed(args.seed)
    spec = TOKENIZERS[args.model]

    # Everything that can be misconfigured fails here, before the first step.
    with accelerator.main_process_first():
        data = load_image_data(args)
    if args.pretrained_model_name_or_path:
        model = spec.load_pretrained(args.pretrained_model_name_or_path, args.revision)
        if args.train_decoder_only and args.model_config:
            model = with_new_decoder(spec, model, parse_config_argument(args.model_config))
        elif args.model_config:
            logger.warning("--model_config is ignored when fine-tuning the whole of a pretrained tokenizer")
    else:
        model = spec.from_config(spec.prepare_config(parse_config_argument(args.model_config), args, data.train),
                                 args.resolution)
    check_resolution(args.resolution, downsample_factor(model), type(model).__name__)
    check_tokenizer_input(model, args.resolution)
    perceptual = load_lpips(args.vgg_weights, args.lpips_weights, args.allow_pickle) if args.perceptual_weight > 0 else None
    discriminator = NLayerDiscriminator(3, args.disc_channels, args.disc_layers) if args.disc_weight > 0 else None
    num_codes = codebook_size(model)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = freeze_to_decoder(spec, model) if args.train_decoder_only else list(model.parameters())
    # Decoder-only: eval mode keeps the codebook (no EMA updates, no restarts) and the routing as they are.
    model.train(not args.train_decoder_only)

    train_dataloader = torch.utils.data.DataLoader(
        data.train, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch, max_steps, _ = training_length(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=betas,
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = make_scheduler(args, optimizer, max_steps, accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if discriminator is not None:
        disc_loss = DiscriminatorLoss(discriminator, args.disc_weight)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_learning_rate or args.learning_rate,
                                           betas=betas, weight_decay=0.0, eps=args.adam_epsilon)
        disc_scheduler = make_scheduler(args, disc_optimizer, max_steps, accelerator.num_processes)
        disc_loss, disc_optimizer, disc_scheduler = accelerator.prepare(disc_loss, disc_optimizer, disc_scheduler)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    commitment_weight = args.commitment_weight
    if commitment_weight is None:
        commitment_weight = getattr(unwrapped.config, "commitment_weight", 0.25)
    loss_fn = TokenizerLoss(
        TokenizerLossConfig(args.reconstruction_loss, commitment_weight, args.codebook_weight, args.perceptual_weight,
                            args.disc_weight, args.disc_start, args.adaptive_disc_weight, args.disc_weight_max),
        perceptual, discriminator)
    ema, state, guard = prepare_resumable_state(accelerator, args, unwrapped, model_cls=type(unwrapped), model_config=unwrapped.config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{type(unwrapped).__name__}: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, "
                f"{len(data.train)} images, {max_steps} steps of {total_batch} images, {steps_per_epoch} steps/epoch")
    progress = tqdm(total=max_steps, initial=state.step, desc="steps", disable=not accelerator.is_local_main_process)
    code_counts = torch.zeros(num_codes, dtype=torch.long, device=accelerator.device)
    seen_indices: list[int] = []
    while state.step < max_steps:
        train_dataloader.set_epoch(state.epoch)
        # Resuming mid-epoch: the seedable sampler repeats the epoch's order; skip what was already consumed.
        loader = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                  if state.batches_in_epoch else train_dataloader)
        for batch in loader:
            state.batches_in_epoch += 1
            images = batch["pixel_values"]
            if args.write_rank_report:
                seen_indices += batch["index"].tolist()
            with accelerator.accumulate(model, *([disc_loss] if discriminator is not None else [])):
                with accelerator.autocast():
                    output = model(images)
                    terms = loss_fn(output, images, state.step, last_decoder_layer(unwrapped))
                finite = guard.check(terms, state.step + 1, accelerator)  # raises, or False to skip this batch
                if finite:
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad()
                if finite and loss_fn.gan_active(state.step):
                    with accelerator.autocast():
                        d_terms = disc_loss(images, output.sample)
                    if guard.check(d_terms, state.step + 1, accelerator):
                        accelerator.backward(d_terms["disc_loss"])
                        disc_optimizer.step()
                        disc_scheduler.step()
                    disc_optimizer.zero_grad()
                    terms.update(d_terms)
            code_counts += torch.bincount(output.codes.reshape(-1), minlength=num_codes)[:num_codes]
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if ema is not None:
                ema.step(unwrapped.parameters())
            if state.step % args.logging_steps == 0 or state.step == max_steps:
                logs = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
                logs.update(codebook_statistics(accelerator.reduce(code_counts, "sum").cpu()), lr=lr_scheduler.get_last_lr()[0])
                code_counts.zero_()
                accelerator.log(logs, step=state.step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", usage=f"{logs['codebook_usage']:.2f}")
            if state.step % args.checkpointing_steps == 0 or state.step == max_steps:
                save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
            if state.step % args.validation_steps == 0 and accelerator.is_main_process:
                validate(args, accelerator, unwrapped, ema, data, num_codes, state.step)
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    accelerator.wait_for_everyone()
    if args.write_rank_report:
        write_rank_report(args, accelerator, seen_indices, unwrapped)
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        unwrapped.save_pretrained(args.output_dir)
        metrics = validate(args, accelerator, unwrapped, None, data, num_codes, state.step, final=True)
        finish(args, unwrapped, data, metrics)
    accelerator.end_training()
    return state


def validate(args, accelerator, model, ema, data, num_codes, step, final=False):
    """Reconstruction grid + PSNR / codebook usage on the validation split (EMA weights when kept)."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    dataset = data.validation or data.train
    metrics = reconstruction_metrics(model, dataset, num_codes, args.train_batch_size, args.max_eval_samples)
    metrics = {f"val_{k}": v for k, v in metrics.items()}
    accelerator.log({k: v for k, v in metrics.items() if k != "val_num_images"}, step=step)
    images = reconstruction_grid_images(model, dataset, args.num_validation_images)
    if images:
        name = "final" if final else f"step-{step}"
        log_image_grid(accelerator, "reconstructions", images, step, rows=2,
                       save_to=Path(args.output_dir) / "validation" / f"reconstructions-{name}.png")
    if ema is not None:
        ema.restore(model.parameters())
    return metrics


def finish(args, model, data, metrics):
    """Model card, metrics file and the optional upload."""
    out = Path(args.output_dir)
    (out / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    repo_id = args.hub_model_id or out.resolve().name
    cls = type(model).__name__
    usage = (f"import torch\nfrom hf_rq import {cls}\n\ntokenizer = {cls}.from_pretrained({repo_id!r})\n"
             f"images = torch.rand(1, 3, {args.resolution}, {args.resolution}) * 2 - 1   # (N, 3, H, W) in [-1, 1]\n"
             "codes = tokenizer.encode(images, return_codes=True).codes\nrecon = tokenizer(images).sample")
    make_model_card(out, repo_id=repo_id, kind="tokenizer", model_class=cls, script="train_tokenizer.py", args=args,
                    metrics={k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, usage=usage,
                    tags=[args.model])
    if args.push_to_hub:
        push_folder_to_hub(out, repo_id, token=args.hub_token, private=args.hub_private_repo)


if __name__ == "__main__":
    main()
