#!/usr/bin/env bash
# Re-creates the README's editing strips (docs/images/edit_*.png: input, mask, three edits) with the bundled
# models, offline, with `hf-rq edit`. Seeded: the same software gives the same pictures.
#
#   DATA=../shared/data/emoji bash benchmarks/readme_editing.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data/emoji}
PYTHON=${PYTHON:-python}
mkdir -p docs/images
MASK=$(mktemp --suffix=.png)
trap 'rm -f "$MASK"' EXIT
# the centre quarter of a 64x64 image, white = regenerate
"$PYTHON" -c "import numpy as np, PIL.Image, sys; m = np.zeros((64, 64), np.uint8); m[16:48, 16:48] = 255; PIL.Image.fromarray(m).save(sys.argv[1])" "$MASK"

food="$DATA/test/food_drink/$(ls "$DATA/test/food_drink" | head -1)"
smiley="$DATA/test/smileys_emotion/$(ls "$DATA/test/smileys_emotion" | head -1)"
animal="$DATA/test/animals_nature/$(ls "$DATA/test/animals_nature" | head -1)"

edit() { hf-rq edit --seed 0 --num-images 3 --quiet "$@"; }
edit --model hf-rq/rq-emoji-64 --image "$smiley" --mask "$MASK" --class smileys_emotion --output docs/images/edit_rq.png
edit --model hf-rq/rq-emoji-64 --image "$smiley" --keep-depth 2 --class smileys_emotion --output docs/images/edit_rq_keep_depth.png
edit --model hf-rq/dq-emoji-64 --image "$food" --mask "$MASK" --class food_drink --output docs/images/edit_dq.png
edit --model hf-rq/dq-emoji-64 --image "$food" --zoom-out 0.5 --class food_drink --output docs/images/edit_dq_zoom_out.png
edit --model hf-rq/ctf-emoji-64 --image "$animal" --mask "$MASK" --class animals_nature --output docs/images/edit_ctf.png
edit --model hf-rq/ctf-emoji-64 --image "$animal" --keep-coarse-labels --class animals_nature --output docs/images/edit_ctf_keep_coarse.png
