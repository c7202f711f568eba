#!/usr/bin/env bash
# Re-creates the README's pictures (docs/images/) and the default models' metrics table
# (src/hf_rq/bundled/TRAINING.md) from the bundled models, offline, with the hf-rq command line.
#
#   DATA=../shared/data/emoji bash benchmarks/readme_gallery.sh [METRICS_DIR]
#
# Sampling is seeded, so the pictures come out the same on the same software; the metrics take a few minutes
# on a CPU.
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data/emoji}
METRICS=${1:-runs/readme-metrics}
PYTHON=${PYTHON:-python}
mkdir -p docs/images "$METRICS"

images=()
for category in flags smileys_emotion food_drink animals_nature travel_places; do
    images+=("$(ls "$DATA"/test/"$category"/*.png | head -1)")
done

for family in rq dq ctf; do
    hf-rq generate --model "hf-rq/$family-emoji-64" --num-images 6 --seed 0 --quiet --output "docs/images/samples_$family.png"
    hf-rq reconstruct --model "hf-rq/$family-emoji-64" "${images[@]}" --output "docs/images/reconstruct_$family.png"
done

"$PYTHON" - <<'EOF'
import torch
from hf_rq import CTFPipeline
from hf_rq.image_processing import make_image_grid

pipe = CTFPipeline.from_pretrained("hf-rq/ctf-emoji-64")
pipe.set_progress_bar_config(disable=True)
out = pipe(class_labels=["flags", "smileys_emotion", "food_drink", "animals_nature"], return_coarse_labels=True,
           generator=torch.Generator().manual_seed(0))
pairs = pipe.show_coarse_labels(out)
make_image_grid(pairs, rows=1, cols=len(pairs)).save("docs/images/ctf_coarse_labels.png")
EOF

for family in rq dq ctf; do
    hf-rq evaluate generation --model "hf-rq/$family-emoji-64" --num-images-per-class 20 --seed 0 --quiet \
        --output "$METRICS/$family.json"
    hf-rq evaluate reconstruction --model "hf-rq/$family-emoji-64" --data "$DATA" --output "$METRICS/reconstruction_$family.json"
done
# rq-emoji-64's defaults before 2026-12-02, for comparison (top-k 0 = off)
hf-rq evaluate generation --model hf-rq/rq-emoji-64 --num-images-per-class 20 --seed 0 --guidance-scale 1 \
    --temperature 1 --top-k 0 --quiet --output "$METRICS/rq-old-defaults.json"
hf-rq evaluate generation --images "$DATA" --split train --quiet --output "$METRICS/real-train-images.json"
echo "pictures in docs/images/, metrics in $METRICS/"
