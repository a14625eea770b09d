#!/usr/bin/env bash
# Run the hymenoptera bake-off through `dvc repro` in a scratch git+DVC copy of this repository
# and record its results under experiments/hymenoptera/.
#
#   CVPIPE_REAL_DATA=/path/to/shared/data experiments/run_bakeoff.sh [scratch-dir]
#
# The scratch copy gets the repository's files (tracked and untracked-but-not-ignored, without
# recorded results) and experiments/hymenoptera/params.yaml as its params.yaml (with
# ingest.source pointed at $CVPIPE_REAL_DATA/hymenoptera_data). W&B runs offline into it.
# BAKEOFF_RESULTS=DIR writes the results there instead of experiments/hymenoptera/results
# (tests/test_experiments.py uses it to check that the committed results reproduce).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${CVPIPE_REAL_DATA:?set CVPIPE_REAL_DATA to the folder holding hymenoptera_data}"
WORK="${1:-$(mktemp -d /tmp/cvpipe-bakeoff-XXXX)}"
PY="${PYTHON:-python}"
SRC="$REPO/experiments/hymenoptera"
RESULTS="${BAKEOFF_RESULTS:-$SRC/results}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- . ':!experiments/*/results' \
   | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -C "$WORK" -xf -
sed "s#__DATA__#$DATA#" "$SRC/params.yaml" > "$WORK/params.yaml"
cd "$WORK"
export PYTHONPATH="$WORK/src" WANDB_MODE=offline DVC_NO_ANALYTICS=1 CVPIPE_RUNNER="${CVPIPE_RUNNER:-local}"
rm -f dvc.lock
[ -d .git ] || git init -q
[ -d .dvc ] || "$PY" -m dvc init -q
start=$(date +%s)
if ! "$PY" -m dvc repro > repro.log 2>&1; then
  tail -n 30 repro.log >&2
  echo "run_bakeoff: dvc repro failed (full log: $WORK/repro.log)" >&2
  exit 1
fi
grep -E "^Running stage" repro.log || true
end=$(date +%s)
OUT="$RESULTS"
rm -rf "$OUT"
mkdir -p "$OUT/metrics" "$OUT/plots" "$OUT/wandb"
cp reports/leaderboard.md reports/leaderboard.csv reports/pareto.png reports/compare.json "$OUT/"
[ -f reports/selection.json ] && cp reports/selection.json "$OUT/"
cp dvc.lock "$OUT/dvc.lock"
# one folder per bake-off cell, <arch>/seed<seed> (bakeoff.archs x bakeoff.seeds)
for d in metrics/*/seed*/; do
  run=${d#metrics/}; run=${run%/}; [ -f "$d/evaluate.json" ] || continue
  mkdir -p "$OUT/metrics/$run" "$OUT/plots/$run"
  # the full evaluate and train reports (metrics/ holds their headlines)
  if [ -f "reports/$run/evaluate.json" ]; then cp "reports/$run/evaluate.json" "$OUT/metrics/$run/"; else cp "$d/evaluate.json" "$OUT/metrics/$run/"; fi
  cp "reports/$run/train.json" "$OUT/metrics/$run/train.json"
  cp "plots/$run/confusion_matrix.png" "plots/$run/reliability.png" "plots/$run/mistakes.png" "plots/$run/history.csv" "$OUT/plots/$run/"
done
cp models/best/card.json "$OUT/card.json"
# W&B offline run summaries (the run folders themselves stay in $WORK/wandb; `wandb sync` uploads them)
"$PY" - "$OUT/wandb/runs.json" <<'PYEOF'
import json, sys
sys.path.insert(0, "tests")  # the offline-run reader lives with the tests (tests/wandb_offline.py)
from wandb_offline import find_runs, read_run
runs = []
for p in find_runs("wandb"):
    r = read_run(p)
    runs.append({"id": r.id, "name": r.name, "job_type": r.job_type, "group": r.group, "tags": r.tags,
                 "arch": r.config.get("arch"), "seed": (r.config.get("train") or {}).get("seed"), "exit_code": r.exit_code,
                 "summary": {k: v for k, v in r.summary.items() if isinstance(v, (int, float, str, bool))}})
open(sys.argv[1], "w").write(json.dumps(runs, indent=2) + "\n")
PYEOF
"$PY" - "$OUT/machine.json" "$((end - start))" <<'PYEOF'
import json, os, platform, sys, torch
info = {"cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(), "cuda": torch.cuda.is_available(),
        "dvc_repro_seconds": int(sys.argv[2])}
from cvpipe.torchkit.runtime import cpu_model
model = cpu_model()
if model:
    info["cpu_model"] = model
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
PYEOF
echo "results in $OUT (scratch repo: $WORK)"
