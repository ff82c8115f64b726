#!/usr/bin/env bash
# The one command to run on a CUDA machine: CUDA/xformers tests, then
# `scripts/bench.py cuda` (benchmarks/cuda.py: SDXL-sized Diffusion-DPO vs MaPO, SD-Turbo-sized ReNO,
# LLaVA-7B-shaped engine step). Everything it writes lands under $OUT (or ./device_out without $OUT).
#
# Prepare the wheels first where pip can download (a GPU machine with torch 2.11 cu130, transformers, accelerate,
# peft, timm, torchvision, huggingface_hub 1.33, but no diffusers / open_clip / xformers; Python 3.12):
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   python3 -m pip download --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
# xformers: 0.0.35 is the release for torch 2.11 (its metadata: torch>=2.10; one py39-none abi3 wheel,
# xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl, 3.2 MB). 0.0.34 pins torch==2.10.0 and its
# wheel is 110 MB (over the 64 MiB a call carries). If xformers does not import there, the xformers
# runs fall back to SDPA and the results say so ("attention_used", "xformers_note").
# Wheels are looked for in .whl/, wheels/ and shared/wheels/ (.whl must be named in `carry`).
#
# Run on the GPU machine, with .whl/ copied beside the checkout, about 5-6 minutes on an H100 (install
# ~20 s, tests <= 100 s, bench <= 400 s budget):
#   bash scripts/device_check.sh
# Outputs: $OUT/device_check.log, $OUT/bench_cuda.json (written after every measurement, so a
# crash or timeout keeps what was measured), $OUT/BENCHMARKS.md, $OUT/pytest.log.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

for dir in .whl wheels shared/wheels; do
  if compgen -G "$dir/*.whl" >/dev/null; then
    echo "== installing wheels from $dir: $(ls "$dir"/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH" || echo "!! wheel install from $dir failed"
    break
  fi
done

echo "== versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" - <<'PYEOF'
import importlib
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip", "xformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: NOT importable ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import xformers.ops as xops
    q = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    print("xformers memory_efficient_attention ok:", tuple(xops.memory_efficient_attention(q, q, q).shape))
except Exception as exc:
    print(f"xformers check failed: {type(exc).__name__}: {exc}")
PYEOF

echo "== pytest -m 'cuda or xformers'"
timeout 100 "$PY" -m pytest -q -m "cuda or xformers" -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -30

echo "== bench cuda"
# the section lives in benchmarks/cuda.py; each part runs as `python -m benchmarks.cuda --child PART` from here
timeout 440 "$PY" scripts/bench.py cuda --json "$OUT/bench_cuda.json" --budget 400 > "$OUT/bench_stdout.log" 2>&1
echo "bench exit code $?"
grep -E '^\[cuda:' "$OUT/bench_stdout.log" | cut -c1-400
cp BENCHMARKS.md "$OUT/" 2>/dev/null || true
echo "== done; results in $OUT/bench_cuda.json"
