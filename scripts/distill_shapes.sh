#!/usr/bin/env bash
# Produce the embedded few-step model `shapes-fast` from the trained `shapes` model, and the LCM
# student it is compared with. Run from anywhere; rerunning continues where it stopped (finished
# phases are skipped, an interrupted one resumes from its last checkpoint).
#
# Budget: about 60 min (guided) + 20 min (LCM) on one CPU core each. Measured per training step at batch 32
# on the embedded architecture (5.8M-param UNet, 8x8x4 latents), single-thread CPU seconds, and
# the expected wall time on 2 cores (~1.8x faster; a forward+backward at batch 64: 0.9 s -> 0.5 s):
#   guidance distillation  teacher CFG (one forward of 2x32) + student    0.83 s -> ~0.46 s
#   progressive round      two teacher DDIM steps (2 forwards) + student   0.89 s -> ~0.49 s
#   LCM                    teacher CFG + EMA-target forward + student      1.05 s -> ~0.58 s
#   guided: 2500 + 1200 steps (measured ~1.05 s/step on one core)  ~61 min
#   LCM:    1000 steps (measured ~1.25 s/step on one core)          ~21 min
#   + the training pool (2048 rendered scenes through the VAE, ~15 s, built once, shared)
#   + loading, exports, checkpoints            <1 min
# Then measure_distill.py (not in the training budget): ~5 min for 200 prompts per row.
# On a machine shared with other jobs, OMP_NUM_THREADS=1 avoids thread-barrier stalls.
#
# The budget figures above are the previous `shapes` (8x8 latents). The shipped shapes-fast of the
# current one (16x16 latents) is stage 1 alone, w in [1, 5]: `sdlab distill guided --model shapes
# --out runs/distill16 --w-min 1 --w-max 5 --rounds 0 --end-steps 4 --stage1-steps 1800
# --batch-size 32 --lr 2e-4 --name shapes-fast` (~20 min on 2 cores); its rounds, LCM student and
# sweep: README, "Go fast".
#
# Environment overrides: SDLAB (the sdlab command), PYTHON, TEACHER (default: the embedded
# `shapes`; runs/shapes/model works too), OUT (default runs/distill), INSTALL=0 to not install
# the student as src/sdlab/models/shapes-fast, FAST=lcm to install the LCM student instead,
# N (prompts per row of the report, default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
SDLAB=${SDLAB:-.venv/bin/sdlab}
PYTHON=${PYTHON:-.venv/bin/python}
TEACHER=${TEACHER:-shapes}
OUT=${OUT:-runs/distill}
INSTALL=${INSTALL:-1}
FAST=${FAST:-guided}

# 1. Guided distillation (Meng et al. 2022): stage 1 learns CFG at w in [1, 3] in one pass
#    (2,500 steps, about 40 min on one core: at 500 it had not learned its guidance input);
#    then one progressive round 8 -> 4 DDIM steps (1,200 steps, about 21 min).
"$SDLAB" distill guided --model "$TEACHER" --out "$OUT/guided" --resume \
    --w-min 1 --w-max 3 --default-guidance 1.5 --start-steps 8 --end-steps 4 \
    --stage1-steps 2500 --steps-per-round 1200 --batch-size 32 --lr 2e-4 \
    --name shapes-fast

# 2. LCM (Luo et al. 2023) on the same teacher, guidance range and training latents; 4 steps.
mkdir -p "$OUT/lcm"
[ -e "$OUT/lcm/pool.pt" ] || cp "$OUT/guided/pool.pt" "$OUT/lcm/pool.pt"
"$SDLAB" distill lcm --model "$TEACHER" --out "$OUT/lcm" --resume \
    --w-min 1 --w-max 6 --steps 1000 --batch-size 32 --lr 2e-4 \
    --solver-steps 50 --target-decay 0.95 --loss huber --default-steps 4 \
    --name shapes-fast-lcm

# 3. Install the chosen student as the embedded `shapes-fast` (fp16, its sdlab.json picks
#    the sampler, 4 steps and the guidance scale).
if [ "$INSTALL" = 1 ]; then
    case "$FAST" in
        # the stage-1 student at 4 DDIM steps measured above the 8 -> 4 round (0.82 vs 0.78)
        guided) SRC="$OUT/guided/stage1" ;;
        lcm) SRC="$OUT/lcm/model" ;;
        *) echo "FAST must be guided or lcm" >&2; exit 2 ;;
    esac
    rm -rf src/sdlab/models/shapes-fast
    mkdir -p src/sdlab/models
    cp -r "$SRC" src/sdlab/models/shapes-fast
    # the embedded model answers to its own name, whichever student it is
    "$PYTHON" - <<'EOF'
import json, pathlib
meta_file = pathlib.Path("src/sdlab/models/shapes-fast/sdlab.json")
meta = json.loads(meta_file.read_text())
meta["name"] = "shapes-fast"
meta["defaults"]["steps"] = 4
meta_file.write_text(json.dumps(meta, indent=2))
EOF
    echo "installed $SRC as src/sdlab/models/shapes-fast"
fi

# 4. Compare (teacher DDIM 1/2/4/8/50 and DPM++ 2M, guided rounds, LCM, w = 1 vs default w).
"$PYTHON" scripts/measure_distill.py --teacher "$TEACHER" --guided "$OUT/guided" \
    --lcm "$OUT/lcm/model" --n "${N:-200}" --out "$OUT/report"
