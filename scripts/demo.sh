#!/usr/bin/env bash
# Create .venv if missing, install trainguard, and run the main job: a real small training
# run (a CNN on scikit-learn's bundled digits) checkpointed by trainguard on a local directory.
# It is interrupted half-way, resumed from its last committed checkpoint, and its checkpoints
# are then listed and verified with the CLI.
source "$(dirname "$0")/_venv.sh" examples
RUN_DIR="${RUN_DIR:-runs/digits-demo}"
rm -rf "$RUN_DIR"
TG="$ROOT/.venv/bin/trainguard"

echo "== 1. train, stopping (as if preempted) after 120 of 300 steps"
"$VPY" examples/train_digits.py --run-dir "$RUN_DIR" --steps 300 --stop-after 120
echo
echo "== 2. run the same command again: it resumes from the newest valid checkpoint"
"$VPY" examples/train_digits.py --run-dir "$RUN_DIR" --steps 300
echo
echo "== 3. trainguard ls $RUN_DIR"
"$TG" ls "$RUN_DIR"
echo
echo "== 4. trainguard verify $RUN_DIR"
"$TG" verify "$RUN_DIR"
