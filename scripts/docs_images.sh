#!/usr/bin/env bash
# The README's pictures and eval table, regenerated from a main-job run:
#   bash scripts/main.sh && bash scripts/docs_images.sh [RUN]      (RUN: default runs/tiny)
# - docs/rl_curves.png, docs/selection.png: RUN's RL curves and checkpoint-selection plot (scaled to 900 px wide)
# - docs/chat_demo.png: the Gradio demo in headless Chromium (the Playwright test's screenshot: KaTeX-rendered math)
# - docs/eval.md: `megatron-ring eval` of RUN's selected SFT checkpoint and its RL stage-1 result on the held-out
#   sets (their first 50 problems, k=4 at T 1.0, the CPU server; ≈10 min), in the layout of the paper's Table 1
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny}
PY=.venv/bin/python
mkdir -p docs
$PY - "$RUN" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
run = Path(sys.argv[1])
for src, dst in [(run / "rl_stage1/rl_curves.png", "docs/rl_curves.png"),
                 (run / "sft/selection/selection.png", "docs/selection.png")]:
    im = Image.open(src)
    if im.width > 900:
        im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
    im.save(dst, optimize=True)
    print(f"{dst}: {im.width}x{im.height} from {src}")
PYEOF
$PY -m pytest -q -p no:cacheprovider "tests/test_serving.py::test_gradio_demo_in_headless_chromium"
$PY - <<'PYEOF'
from PIL import Image
im = Image.open("tests/_artifacts/chat_ui.png")
if im.width > 900:
    im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
im.save("docs/chat_demo.png", optimize=True)
print(f"docs/chat_demo.png: {im.width}x{im.height}")
PYEOF
for label in sft rl_stage1; do
  src="$RUN/$label"
  [ -d "$RUN/export_$label" ] || $PY -m megatron_ring.cli export --ckpt "$src" --out "$RUN/export_$label" --tokenizer "$RUN/data/tokenizer"
  $PY -m megatron_ring.cli eval --serve "$RUN/export_$label" --benchmarks heldout_math heldout_code heldout_science \
    --k 4 --limit 50 --max-tokens 192 --data-dir "$RUN/data/eval" --out "$RUN/eval" --label "$label" 2>&1 | { grep -v "sample/s" || true; }
done
cp "$RUN/eval/results.md" docs/eval.md
echo "docs/eval.md:"; cat docs/eval.md
