#!/usr/bin/env bash
# Create .venv if missing, install trainguard, and run the main job: a real small training
# run (a CNN on scikit-learn's bundled digits) guarded by trainguard.run.Run on a local
# directory. A real SIGTERM preempts it after step 120 (as Slurm or Kubernetes would): it
# finishes the step, commits, and exits with 75 (EXIT_RESUME). The same command then
# resumes from that commit, and the checkpoints are listed and verified with the CLI.
source "$(dirname "$0")/_venv.sh" examples
RUN_DIR="${RUN_DIR:-runs/digits-demo}"
rm -rf "$RUN_DIR"
TG="$ROOT/.venv/bin/trainguard"

echo "== 1. train 300 steps; a SIGTERM arrives after step 120 (a preemption)"
rc=0
"$VPY" examples/train_digits.py --run-dir "$RUN_DIR" --steps 300 --preempt-at 120 || rc=$?
echo "exit code $rc (75 = EXIT_RESUME: preempted, state committed, run me again to resume)"
if [ "$rc" -ne 75 ]; then
    echo "expected exit code 75 from the preempted run" >&2
    exit 1
fi
echo
echo "== 2. run the same command again: it resumes from the newest valid checkpoint"
"$VPY" examples/train_digits.py --run-dir "$RUN_DIR" --steps 300
echo
echo "== 3. trainguard ls $RUN_DIR"
"$TG" ls "$RUN_DIR"
echo
echo "== 4. trainguard verify $RUN_DIR"
"$TG" verify "$RUN_DIR"
echo
echo "== 5. the run's heartbeat and the last lines of its metrics"
cat "$RUN_DIR/heartbeat.json"; echo
tail -n 3 "$RUN_DIR/metrics.jsonl"
