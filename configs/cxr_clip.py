r"""CXR-CLIP: 2D chest X-ray CLIP with label→prompt expansion, two views and two texts per study, and
image-image (ICL) and text-text (TCL) contrastive losses (DESIGN.md §2; `vljax/cxr.py`).

Real data (MIMIC-CXR-JPG, CheXpert, ChestX-ray14 folders or vljax CXR JSONL manifests, mixed), e.g.:

  python -m vljax.train --config=configs/cxr_clip.py --workdir=/runs/cxr_clip \
      --config.data.dirs='("/data/mimic-cxr-jpg", "/data/CheXpert-v1.0")' \
      --config.model.text.path=/models/Bio_ClinicalBERT --distributed

The embedded phantom (generates a synthetic chest X-ray dataset under the workdir: image-text studies
with findings/impression reports and image-label studies with CheXpert-style labels; small towers; about
10 minutes on 2 CPU cores):

  python -m vljax.train --config=configs/cxr_clip.py:phantom --workdir=/tmp/cxr_run

Ablation without ICL and TCL: `--config.loss.w_icl=0 --config.loss.w_tcl=0`.

The argument after ':' is a comma-separated list: `phantom`, `tiny` (a tiny phantom run for the tests,
about a minute) and/or `key=value` with the keys of `ARGS` (type-checked, unknown keys rejected).
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from vljax.cli import parse_config_arg

ARGS = {"phantom": bool, "tiny": bool, "seed": int, "data_seed": int, "steps": int, "batch": int,
        "image": str, "w_icl": float, "w_tcl": float}
IMAGE_TOWERS = ("resnet2d", "swin")


def parse_arg(arg: str | None) -> dict:
    out = parse_config_arg(arg, ARGS, "configs/cxr_clip.py")
    if "image" in out and out["image"] not in IMAGE_TOWERS:
        raise ValueError(f"configs/cxr_clip.py: image={out['image']!r}; choose one of {list(IMAGE_TOWERS)}")
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.task = "cxr_clip"
    c.seed = 0                 # model initialisation, dropout, augmentations and text draws
    c.data_seed = 0            # order of training studies
    c.subset_seed = 0          # (unused by CXR-CLIP; kept so that sweeps can vary it uniformly)
    c.total_steps = 30_000     # a run is defined by steps; ~15 epochs of MIMIC-CXR + CheXpert at batch 128
    c.batch_size = 128         # global batch (the paper: 128 per GPU)
    c.accum_steps = 1

    # ---------------------------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    # Dataset folders or manifests, concatenated: MIMIC-CXR-JPG, CheXpert, ChestX-ray14, or .jsonl
    # (`vljax/data/cxr_manifest.py`). Required unless `phantom`.
    c.data.dirs = config_dict.placeholder(tuple)
    c.data.phantom = False
    c.data.phantom_studies = 4000
    c.data.phantom_seed = 0
    c.data.phantom_label_only_fraction = 0.3   # image-label studies (CheXpert-style labels, no report)
    c.data.phantom_image_size = 128
    c.data.image_size = 224                    # model input (square)
    c.data.mean = 0.5                          # one gray mean/std (the towers fold ImageNet stems to gray)
    c.data.std = 0.25
    c.data.crop_scale = (0.6, 1.0)             # random resized crop: area fraction range
    c.data.contrast = 0.2                      # contrast/brightness jitter strength
    # The second text of a report study with one section: "same" or "sentence_subset" (a random
    # non-empty subset of its sentences). Image-label studies always draw two prompt texts.
    c.data.second_text = "sentence_subset"
    c.data.report_prompt_prob = 0.0            # a labelled report study uses prompt text with this probability
    c.data.prompt_bank = config_dict.placeholder(str)   # None: the shipped bank (vljax/data/cxr_prompt_bank.json)
    c.data.unc_fallback = "pos"                # uncertain labels without "unc" sentences: "pos" (U-Ones) or "neg"
    c.data.max_text_len = 256
    c.data.tokenizer = config_dict.placeholder(str)
    c.data.workers = 4
    c.data.prefetch = 2

    # ---------------------------------------------------------------------------------- model
    # image.name: "resnet2d" (torchvision ResNet, depth 50: 2048-d) or "swin" (Swin-Tiny: 768-d).
    # init: "scratch", "torchvision:/path/resnet50.safetensors" (resnet2d) or "hf:/path/swin-folder" (swin).
    c.model = ml_collections.ConfigDict()
    c.model.image = ml_collections.ConfigDict(dict(name="resnet2d", depth=50, width=64, norm="batch",
                                                   num_groups=32, remat=False, bn_stats="global",
                                                   feature_norm=False, conv="auto", init="scratch",
                                                   swin="tiny", drop_path=0.1))
    c.model.text = ml_collections.ConfigDict(dict(name="bert", init="pretrained", size="base",
                                                  vocab_size=30522, pooling="eos", trainable=True))
    c.model.text.path = config_dict.placeholder(str)   # Bio_ClinicalBERT folder; None = MiniLM shipped by pip
    c.model.embed_dim = 512
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.logit_scale_max = math.log(100.0)
    c.model.dtype = "bfloat16"
    c.model.phenotype_weight = 0.0

    c.loss = ml_collections.ConfigDict(dict(w_icl=1.0, w_tcl=0.5))

    # ---------------------------------------------------------------------------------- optimiser
    c.optim = ml_collections.ConfigDict(dict(lr=5e-5, warmup_steps=2000, end_lr_fraction=0.0, weight_decay=1e-4,
                                             b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))

    # ---------------------------------------------------------------------------------- loop / evals
    c.log_every = 50
    c.eval_every = 2000
    c.eval_max_studies = 0
    c.ckpt_every = 1000
    c.keep_checkpoints = 3
    c.resume = "auto"
    c.final_eval_split = "test"
    c.eval_batch_size = 128
    c.eval = ml_collections.ConfigDict()
    c.eval.classes = config_dict.placeholder(tuple)  # None: every class labelled in the evaluation split
    c.eval.multiclass = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")  # CheXpert 5x200
    c.eval.multiclass_per_class = 200
    c.eval.probe_fractions = (0.1, 1.0)
    c.eval.probe_max_train = 20_000            # training studies whose frozen features the probe sees

    if args.get("phantom") or args.get("tiny"):
        _phantom(c)
    if args.get("tiny"):
        _tiny(c)
    for key, field in (("seed", "seed"), ("data_seed", "data_seed"), ("steps", "total_steps"), ("batch", "batch_size")):
        if key in args:
            c[field] = args[key]
    if "image" in args:
        c.model.image.name = args["image"]
        if args["image"] == "swin" and (args.get("phantom") or args.get("tiny")):
            c.model.image.update(swin="phantom", drop_path=0.0)
    for key in ("w_icl", "w_tcl"):
        if key in args:
            c.loss[key] = args[key]
    if "steps" in args:
        c.optim.warmup_steps = min(c.optim.warmup_steps, max(0, args["steps"] // 10))
    return c


def _phantom(c: ml_collections.ConfigDict) -> None:
    """The embedded phantom default, sized for 2 CPU cores (the recipe's fields otherwise)."""
    c.data.phantom = True
    c.data.phantom_studies = 3000
    c.data.image_size = 64
    c.data.mean, c.data.std = 0.43, 0.32   # the phantom's pixel statistics at 64 px
    c.data.crop_scale = (0.8, 1.0)         # keeps the costophrenic angles (effusion, atelectasis) in view
    c.data.workers = 0          # batches of 64x64 images are built faster than worker processes start
    c.data.max_text_len = 64
    # A locked pretrained sentence encoder (the MiniLM shipped by pip), each text the mean of its
    # sentences' features: every distinct sentence is embedded once (the prompt bank's and the reports').
    c.model.text.update(init="pretrained", pooling="sentence_mean", trainable=False)
    c.model.image.update(depth=18, width=16, feature_norm=True)
    c.model.embed_dim = 128
    c.model.dtype = "float32"
    c.batch_size = 64
    c.eval_batch_size = 64
    c.total_steps = 1500
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=1e-4)
    c.log_every = 50
    c.eval_every = 500
    c.ckpt_every = 500
    c.eval.multiclass_per_class = 20
    c.eval.probe_max_train = 2000


def _tiny(c: ml_collections.ConfigDict) -> None:
    """A tiny phantom run for tests: seconds of compute; its numbers mean nothing."""
    c.data.phantom_studies = 48
    c.data.phantom_image_size = 64
    c.data.image_size = 32
    c.model.image.update(depth=10, width=4)
    c.model.embed_dim = 16
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 2
    c.eval_every = 0
    c.ckpt_every = 2
    c.eval.multiclass_per_class = 4
    c.eval.probe_max_train = 64
