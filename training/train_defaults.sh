#!/usr/bin/env bash
# Retrains the default models shipped in src/hf_rq/bundled/ (rq-emoji-64, dq-emoji-64, ctf-emoji-64) with the
# project's own training scripts. Every command, seed and step count is here; the measured wall time of each
# stage is appended to $OUT/timings.tsv. See src/hf_rq/bundled/TRAINING.md for the run that produced them.
#
#   DATA=../shared/data/emoji OUT=runs/defaults bash training/train_defaults.sh          # all three families
#   FAMILIES="rq" bash training/train_defaults.sh                                       # one of them
#   FAMILIES="rq-text" bash training/train_defaults.sh    # the text-to-image default (rq-emoji-64-text)
#   FAMILIES="dq-cfg" bash training/train_defaults.sh     # dq-emoji-64's guidance fine-tune (see TRAINING.md)
#   FAMILIES="dq-decoder" bash training/train_defaults.sh # then its decoder-only fine-tune (see TRAINING.md)
#
# With a GPU the three families train side by side (the models are small, the GPU is mostly idle otherwise);
# on a CPU they run one after the other. TOKENIZER_STEPS / PRIOR_STEPS scale a run down for a smoke test.
set -euo pipefail

DATA=${DATA:-../shared/data/emoji}
OUT=${OUT:-runs/defaults}
FAMILIES=${FAMILIES:-"rq dq ctf"}
TOKENIZER_STEPS=${TOKENIZER_STEPS:-6000}
PRIOR_STEPS=${PRIOR_STEPS:-6000}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

common=(--train_data_dir "$DATA" --resolution 64 --random_flip --seed "$SEED" --report_to tensorboard
        --checkpointing_steps 2000 --checkpoints_total_limit 1 --logging_steps 50 --dataloader_num_workers 2)
tokenizer_args=(--train_batch_size 64 --learning_rate 4e-4 --lr_scheduler cosine --lr_warmup_steps 200
                --max_train_steps "$TOKENIZER_STEPS" --perceptual_weight 0 --disc_start $((TOKENIZER_STEPS / 2))
                --use_ema --validation_steps "$TOKENIZER_STEPS")
prior_args=(--train_batch_size 128 --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 300
            --max_train_steps "$PRIOR_STEPS" --use_ema --validation_steps "$PRIOR_STEPS")

timed() {  # timed NAME COMMAND...: run, log, and record the wall time
    local name=$1 start
    shift
    start=$(date +%s)
    "$@" >"$OUT/$name.log" 2>&1 || { echo "$name failed; see $OUT/$name.log" >&2; tail -20 "$OUT/$name.log" >&2; return 1; }
    printf '%s\t%s\n' "$name" "$(( $(date +%s) - start ))" >>"$OUT/timings.tsv"
}

train_family() {
    case $1 in
    rq)
        timed rqvae "$PYTHON" training/train_tokenizer.py --model rqvae --model_config training/configs/rqvae_emoji64.json \
            "${common[@]}" "${tokenizer_args[@]}" --output_dir "$OUT/rqvae-emoji-64"
        timed rq "$PYTHON" training/train_prior.py --model rq --tokenizer_name_or_path "$OUT/rqvae-emoji-64" \
            --model_config training/configs/rqtransformer_emoji64.json --class_dropout_prob 0.1 \
            "${common[@]}" "${prior_args[@]}" --output_dir "$OUT/rq-emoji-64" ;;
    dq)
        timed dqvae "$PYTHON" training/train_tokenizer.py --model dqvae --model_config training/configs/dqvae_emoji64.json \
            "${common[@]}" "${tokenizer_args[@]}" --output_dir "$OUT/dqvae-emoji-64"
        # Class dropout gives the DQ-Transformer a null class (not in the authors' model), for guidance.
        timed dq "$PYTHON" training/train_prior.py --model dq --tokenizer_name_or_path "$OUT/dqvae-emoji-64" \
            --model_config training/configs/dqtransformer_emoji64.json --class_dropout_prob 0.1 \
            "${common[@]}" "${prior_args[@]}" --output_dir "$OUT/dq-emoji-64" ;;
    dq-cfg)
        # The recipe of the shipped dq-emoji-64: its first prior (trained as above but without class dropout) is
        # fine-tuned with class dropout 0.1 on its own DQ-VAE's codes. The null class is added to the pretrained
        # prior (every weight kept, the new start-token rows at the mean of the class rows). 2-core CPU, ~45 min.
        local base=${DQ_BASE:?set DQ_BASE to the first dq-emoji-64 (no null class; see TRAINING.md for how to get it)}
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timed dq-cfg "$PYTHON" training/train_prior.py --model dq \
            --pretrained_model_name_or_path "$base" --class_dropout_prob 0.1 \
            --train_data_dir "$DATA" --resolution 64 --random_flip --seed "$SEED" --train_batch_size 64 \
            --learning_rate 3e-4 --lr_scheduler cosine --lr_warmup_steps 50 --max_train_steps "${DQ_CFG_STEPS:-1100}" \
            --use_ema --ema_decay 0.995 --checkpointing_steps 100 --checkpoints_total_limit 1 \
            --validation_steps "${DQ_CFG_STEPS:-1100}" --num_validation_images 0 --logging_steps 25 \
            --output_dir "$OUT/dq-emoji-64-cfg" ;;
    dq-decoder)
        # The shipped dq-emoji-64's DQ-VAE decoder: fine-tuned alone on the frozen codes (the prior is unchanged and
        # still fits), with the PatchGAN loss from the first step and a fresh discriminator. 2-core CPU, ~95 min.
        local base=${DQ_PIPELINE:-src/hf_rq/bundled/dq-emoji-64}
        timed dq-decoder "$PYTHON" training/train_tokenizer.py --model dqvae --pretrained_model_name_or_path "$base" \
            --train_decoder_only --train_data_dir "$DATA" --resolution 64 --random_flip --seed "$SEED" \
            --train_batch_size 64 --learning_rate 1e-4 --lr_scheduler constant --max_train_steps "${DQ_DECODER_STEPS:-1600}" \
            --perceptual_weight 0 --disc_start 0 --use_ema --ema_decay 0.99 --checkpointing_steps 200 \
            --checkpoints_total_limit 1 --validation_steps "${DQ_DECODER_STEPS:-1600}" --logging_steps 20 \
            --dataloader_num_workers 0 --output_dir "$OUT/dqvae-emoji-64-decoder" ;;
    ctf)
        timed llamagen-vq "$PYTHON" training/train_tokenizer.py --model llamagen-vq \
            --model_config training/configs/llamagen_vq_emoji64.json \
            "${common[@]}" "${tokenizer_args[@]}" --output_dir "$OUT/llamagen-vq-emoji-64"
        timed ctf "$PYTHON" training/train_prior.py --model ctf --tokenizer_name_or_path "$OUT/llamagen-vq-emoji-64" \
            --model_config training/configs/ctf_emoji64.json --class_dropout_prob 0.1 \
            "${common[@]}" "${prior_args[@]}" --output_dir "$OUT/ctf-emoji-64" ;;
    rq-text)
        # Text-to-image: the captions as imagefolder metadata, then only the prior, on the RQ-VAE of rq-emoji-64 and
        # warm-started from its class-conditional prior (same architecture; the text prefix starts fresh). This is
        # the exact command of the bundled model (2-core CPU, ~17 minutes); RQ_BASE picks another base pipeline.
        local base=${RQ_BASE:-src/hf_rq/bundled/rq-emoji-64}
        timed captions "$PYTHON" training/make_caption_metadata.py --data_dir "$DATA" --output_dir "$OUT/emoji-captions"
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timed rq-text "$PYTHON" training/train_prior.py --model rq \
            --tokenizer_name_or_path "$base" --init_prior_weights "$base" \
            --model_config training/configs/rqtransformer_emoji64_text.json \
            --train_data_dir "$OUT/emoji-captions" --caption_column caption --text_dropout_prob 0.1 \
            --resolution 64 --random_flip --seed "$SEED" --train_batch_size 64 --learning_rate 5e-4 \
            --lr_scheduler cosine --lr_warmup_steps 20 --max_train_steps "${TEXT_PRIOR_STEPS:-500}" \
            --checkpointing_steps 50 --checkpoints_total_limit 1 --validation_steps "${TEXT_PRIOR_STEPS:-500}" \
            --num_validation_images 8 --logging_steps 25 --output_dir "$OUT/rq-emoji-64-text" ;;
    *) echo "unknown family '$1' (expected rq, dq, ctf, rq-text, dq-cfg or dq-decoder)" >&2; return 2 ;;
    esac
}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    pids=()
    for family in $FAMILIES; do train_family "$family" & pids+=($!); done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    exit $status
else
    for family in $FAMILIES; do train_family "$family"; done
fi
