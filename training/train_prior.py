#!/usr/bin/env python
"""Train or fine-tune an autoregressive prior on the codes of a frozen tokenizer; saves a ready pipeline.

    python training/train_prior.py --model rq --tokenizer_name_or_path runs/rqvae-emoji \
        --model_config training/configs/rqtransformer_emoji64.json \
        --train_data_dir ../shared/data/emoji --resolution 64 --output_dir runs/rq-emoji

Step 1 encodes the dataset once with the tokenizer and caches the codes (a `datasets` dataset named after a
fingerprint of the tokenizer, so a stale cache is never used). Step 2 trains the prior with AdamW, warm-up
+ cosine schedule, gradient clipping and class dropout (for classifier-free guidance). For ``--model rq``
the targets are the paper's soft labels over stochastically sampled codes (RQ ARCHITECTURE.md 3.2).
The output folder is a pipeline (tokenizer + prior) that ``<Pipeline>.from_pretrained`` loads.
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
    ImageDataset, ImageTransform, add_data_arguments, add_training_arguments, cache_codes, check_parallelism,
    check_resolution, check_tokenizer_input, enable_gradient_checkpointing, gathered_model, load_image_data,
    log_image_grid, make_accelerator, make_model_card, make_scheduler, parse_config_argument, prepare_resumable_state,
    push_folder_to_hub, save_checkpoint, step_generator, training_length, validate_training_arguments,
    write_rank_report,
)
from hf_rq.training.priors import PRIORS, get_prior_spec
from hf_rq.training.text import add_text_arguments, caption_table, load_text_tokenizer

logger = logging.getLogger("train_prior")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRIORS), default="rq", help="Prior family.")
    parser.add_argument("--tokenizer_name_or_path", type=str, default=None,
                        help="The frozen tokenizer (a folder, a pipeline folder or a Hub id). Default: the tokenizer "
                             "of the --pretrained_model_name_or_path pipeline.")
    parser.add_argument("--model_config", type=str, default=None,
                        help="Prior architecture for training from scratch (JSON file or inline JSON); vocabulary, "
                             "grid and classes are taken from the tokenizer and the dataset.")
    g = parser.add_argument_group("prior objective")
    g.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="Replace a label by the null class with this probability (enables classifier-free guidance).")
    g.add_argument("--soft_labels", action=argparse.BooleanOptionalAction, default=True,
                   help="RQ: soft-target cross-entropy against softmax(-|r - e|^2 / T) (the paper's soft labeling).")
    g.add_argument("--stochastic_codes", action=argparse.BooleanOptionalAction, default=True,
                   help="RQ: input codes sampled from the soft distributions rather than the nearest codes.")
    g.add_argument("--soft_label_temperature", type=float, default=0.5)
    g.add_argument("--num_clusters", type=int, default=None,
                   help="CTF: coarse labels (k-means clusters of the codebook); default codebook_size / 32 (512 for 16384).")
    g.add_argument("--ctf_stage", choices=["both", "coarse", "fine"], default="both",
                   help="CTF: train both stages, or only stage 1 (coarse labels) or stage 2 (fine codes).")
    g.add_argument("--init_prior_weights", type=str, default=None,
                   help="Warm start a prior built from --model_config: copy every weight of this prior (a pipeline or "
                        "prior folder / Hub id of the same family) whose name and shape match (e.g. the transformers of a "
                        "class-conditional model under a new text prefix); the rest stays freshly initialised.")
    g.add_argument("--code_cache_dir", type=str, default=None, help="Where cached codes go (default: output_dir/code_cache).")
    g.add_argument("--cache_batch_size", type=int, default=64)
    g.add_argument("--validation_guidance_scale", type=float, default=None, help="CFG scale of the validation samples.")
    add_data_arguments(parser)
    add_text_arguments(parser)
    add_training_arguments(parser, default_lr=5e-4)
    # The RQ-Transformer authors' stage-2 optimiser (ARCHITECTURE.md 3.2), with a warm-up.
    parser.set_defaults(adam_beta1=0.9, adam_beta2=0.95, adam_weight_decay=1e-4, max_grad_norm=1.0,
                        lr_scheduler="cosine", lr_warmup_steps=100)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    validate_training_arguments(args)
    if args.tokenizer_name_or_path is None and args.pretrained_model_name_or_path is None:
        parser.error("pass --tokenizer_name_or_path (and --model_config to train from scratch), or "
                     "--pretrained_model_name_or_path (a pipeline to fine-tune)")
    if args.pretrained_model_name_or_path is None and args.model_config is None:
        parser.error("training from scratch needs --model_config (the prior's architecture)")
    if not 0 <= args.class_dropout_prob < 1:
        parser.error(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}")
    if not 0 <= args.text_dropout_prob < 1:
        parser.error(f"--text_dropout_prob must be in [0, 1), got {args.text_dropout_prob}")
    if args.caption_column and not PRIORS[args.model].supports_text:
        parser.error(f"--caption_column: the {args.model} prior has no text-conditional form (use --model rq)")
    if args.soft_label_temperature <= 0:
        parser.error(f"--soft_label_temperature must be > 0, got {args.soft_label_temperature}")
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args, "train_prior")
    check_parallelism(accelerator, args)
    set_seed(args.seed)
    spec = get_prior_spec(args.model)

    # Everything that can be misconfigured fails here, before the codes are cached.
    with accelerator.main_process_first():
        data = load_image_data(args)
    tokenizer = spec.load_tokenizer(args.tokenizer_name_or_path or args.pretrained_model_name_or_path, args.revision)
    tokenizer.requires_grad_(False).eval().to(accelerator.device)
    check_resolution(args.resolution, tokenizer.downsample_factor, type(tokenizer).__name__)
    check_tokenizer_input(tokenizer, args.resolution)
    text_tokenizer, text = None, {}
    config = None if args.pretrained_model_name_or_path else parse_config_argument(args.model_config)
    if args.caption_column:
        text_tokenizer = load_text_tokenizer(args, data.train_captions, config)
        text = {"text_tokenizer": text_tokenizer}
    else:
        spec.check_data(data.num_classes)
    if args.pretrained_model_name_or_path:
        prior = spec.load_prior(args.pretrained_model_name_or_path, args.revision)
        spec.check_prior(prior, tokenizer, data.num_classes, args, **text)
    else:
        prior = spec.build_prior(tokenizer, config, data.num_classes, args, **text)
        if args.init_prior_weights:
            copied, skipped = spec.warm_start(prior, spec.load_prior(args.init_prior_weights, args.revision))
            logger.info(f"--init_prior_weights: copied {len(copied)} tensors; kept fresh: {skipped}")
    if text_tokenizer is not None:  # row i of the split -> its caption's ids (joined on the code cache's index)
        length = prior.config.text_length
        data.train_text_ids = caption_table(text_tokenizer, data.train_captions, length)
        data.val_text_ids = caption_table(text_tokenizer, data.validation_captions, length) if data.validation_captions else None
    spec.set_class_names(prior, data.id2label)
    spec.prepare_for_training(prior, args)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(prior)
    prior.train()
    prior_cls, prior_config = type(prior), prior.config  # to rebuild a plain copy from FSDP / ZeRO-3 shards

    # Step 1: the codes of every training image (both orientations with --random_flip), cached once.
    cache_root = Path(args.code_cache_dir or Path(args.output_dir) / "code_cache")
    def codes_of(split: ImageDataset, flips: bool):
        source = ImageDataset(split.dataset, split.image_column, split.label_column,
                              ImageTransform(args.resolution, True, False), split.label_to_id, flip_all=flips)
        return cache_codes(tokenizer, source, cache_root, batch_size=args.cache_batch_size,
                           store_latents=spec.store_latents, accelerator=accelerator,
                           show_progress=accelerator.is_local_main_process).with_format("torch")
    train_codes = codes_of(data.train, args.random_flip)
    val_codes = codes_of(data.validation, False) if data.validation is not None else None

    # Step 2: train the prior.
    train_dataloader = torch.utils.data.DataLoader(
        train_codes, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch, max_steps, _ = training_length(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    # Weight decay on matrices only, not on biases, norms and embeddings (minGPT / LlamaGen practice).
    decay = [p for n, p in prior.named_parameters() if p.requires_grad and p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in prior.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.adam_weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    lr_scheduler = make_scheduler(args, optimizer, max_steps, accelerator.num_processes)
    prior, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(prior, optimizer, train_dataloader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(prior)
    ema, state, guard = prepare_resumable_state(accelerator, args, unwrapped)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{prior_cls.__name__}: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, "
                f"{len(train_codes)} code grids, {max_steps} steps of {total_batch}, {steps_per_epoch} steps/epoch")
    progress = tqdm(total=max_steps, initial=state.step, desc="steps", disable=not accelerator.is_local_main_process)
    seen_indices: list[int] = []
    while state.step < max_steps:
        train_dataloader.set_epoch(state.epoch)
        # Resuming mid-epoch: the seedable sampler repeats the epoch's order; skip what was already consumed.
        loader = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                  if state.batches_in_epoch else train_dataloader)
        for batch in loader:
            state.batches_in_epoch += 1
            if args.write_rank_report:
                seen_indices += (batch["index"] + len(data.train.dataset) * batch["flipped"].long()).tolist()
            # Draws (stochastic codes) depend only on (seed, rank, step, micro-batch): exact on resume.
            generator = step_generator(args.seed, accelerator.process_index, state.step, state.batches_in_epoch,
                                       device=accelerator.device)
            if text_tokenizer is not None:
                batch["text_ids"] = data.train_text_ids[batch["index"].cpu()].to(accelerator.device)
            with accelerator.accumulate(prior):
                with accelerator.autocast():
                    loss, logs = spec.training_loss(prior, tokenizer, batch, args, generator)
                if guard.check({"loss": loss, **logs}, state.step + 1, accelerator):  # names the bad term
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(prior.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if ema is not None:
                ema.step(unwrapped.parameters())
            if state.step % args.logging_steps == 0 or state.step == max_steps:
                logs = {k: accelerator.reduce(v.detach().float(), "mean").item() for k, v in {"loss": loss, **logs}.items()}
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=state.step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if state.step % args.checkpointing_steps == 0 or state.step == max_steps:
                save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
            if state.step % args.validation_steps == 0:
                plain = gathered_model(accelerator, prior, prior_cls, prior_config)  # all ranks: a collective
                if accelerator.is_main_process:
                    validate(args, accelerator, spec, tokenizer, plain, ema, data, val_codes, state.step,
                             text_tokenizer)
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    accelerator.wait_for_everyone()
    if args.write_rank_report:
        write_rank_report(args, accelerator, seen_indices, unwrapped)
    final = gathered_model(accelerator, prior, prior_cls, prior_config)  # sharded: gathered into a plain copy
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(final.parameters())
        final.eval()
        pipeline = spec.make_pipeline(tokenizer, final, text_tokenizer)
        pipeline.save_pretrained(args.output_dir)
        metrics = validate(args, accelerator, spec, tokenizer, final, None, data, val_codes, state.step,
                           text_tokenizer, final=True)
        finish(args, pipeline, final, data, metrics)
    accelerator.end_training()
    return state


@torch.no_grad()
def validate(args, accelerator, spec, tokenizer, prior, ema, data, val_codes, step, text_tokenizer=None, final=False):
    """Loss on the validation split's codes (hard targets) and a grid of samples (EMA weights when kept)."""
    if ema is not None:
        ema.store(prior.parameters())
        ema.copy_to(prior.parameters())
    was_training = prior.training
    prior.eval()
    metrics = {}
    if val_codes is not None and len(val_codes):
        losses = []
        for start in range(0, len(val_codes), args.train_batch_size):
            batch = {k: v.to(accelerator.device) for k, v in val_codes[start:start + args.train_batch_size].items()}
            if text_tokenizer is not None:
                batch["text_ids"] = data.val_text_ids[batch["index"].cpu()].to(accelerator.device)
            losses.append(spec.validation_loss(prior, batch).item() * len(batch["codes"]))
        metrics["val_loss"] = sum(losses) / len(val_codes)
        accelerator.log(metrics, step=step)
    pipeline = spec.make_pipeline(tokenizer, prior, text_tokenizer)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    n = args.num_validation_images
    labels = [i % data.num_classes for i in range(n)] if data.num_classes and text_tokenizer is None else None
    prompts = None
    if text_tokenizer is not None:
        pool = data.validation_captions or data.train_captions
        prompts = [pool[i * len(pool) // max(n, 1)] for i in range(n)]
    images = spec.sample(pipeline, labels, n, generator, args.validation_guidance_scale, prompts) if n else []
    if images:
        name = "final" if final else f"step-{step}"
        log_image_grid(accelerator, "samples", images[:n], step, rows=max(1, int(math.sqrt(len(images[:n])))),
                       save_to=Path(args.output_dir) / "validation" / f"samples-{name}.png")
    prior.train(was_training)
    if ema is not None:
        ema.restore(prior.parameters())
    return metrics


def finish(args, pipeline, prior, data, metrics):
    out = Path(args.output_dir)
    (out / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    repo_id = args.hub_model_id or out.resolve().name
    cls = type(pipeline).__name__
    label = repr(data.id2label[0]) if data.id2label else None
    call = f"class_labels=[{label}], " if label else ""
    if data.train_captions:
        call = f"prompt={data.train_captions[0]!r}, "
    usage = (f"import torch\nfrom hf_rq import {cls}\n\npipe = {cls}.from_pretrained({repo_id!r})\n"
             f"image = pipe({call}generator=torch.Generator().manual_seed(0)).images[0]\nimage.save(\"sample.png\")")
    make_model_card(out, repo_id=repo_id, kind="pipeline", model_class=cls, script="train_prior.py", args=args,
                    id2label=data.id2label, metrics={k: round(v, 4) for k, v in metrics.items()}, usage=usage,
                    tags=[args.model])
    if args.push_to_hub:
        push_folder_to_hub(out, repo_id, token=args.hub_token, private=args.hub_private_repo)


if __name__ == "__main__":
    main()
