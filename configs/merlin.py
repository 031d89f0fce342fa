r"""Merlin-style 3D CT CLIP: I3D ResNet-152 image tower + BERT text tower, symmetric InfoNCE.

Real data (Merlin release layout, or a vljax JSONL manifest), e.g. on a Cloud TPU v4 pod:

  python -m vljax.train --config=configs/merlin.py --workdir=gs://bucket/runs/merlin \
      --config.data.dir=/data/merlin --distributed

The embedded phantom default (generates a 6,000-study synthetic dataset under the workdir, small
towers, sized to finish in about 16 minutes on 2 CPU cores):

  python -m vljax.train --config=configs/merlin.py:phantom --workdir=/tmp/vljax_run

On a GPU or TPU (`jax.default_backend() != "cpu"`) the phantom default grows: 6x6x8 mm voxels, a
wider image tower and more steps (`_accelerator_phantom`); `geometry=cpu|accelerator` picks one
explicitly (default `auto`), and `config.data.geometry` records which one ran.

`tiny` (`--config=configs/merlin.py:tiny`): a 64-study phantom and tiny towers (ResNet-10 width 4 on
16x16x8 volumes, a 2-layer BERT trained from scratch), 20 steps: about a minute on 2 cores, for trying
flags and for the tests. Its numbers mean nothing.

The argument after ':' is a comma-separated list: `phantom`, `tiny` and/or `key=value` with the keys of
`ARGS` below (type-checked, unknown keys rejected). Any field can be overridden with
`--config.optim.lr=1e-4` etc.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from vljax.cli import parse_config_arg

# Arguments accepted after ':' and their types. `phantom` is a bare flag.
ARGS = {"phantom": bool, "tiny": bool, "seed": int, "data_seed": int, "subset_seed": int, "steps": int, "batch": int,
        "sampling": str, "balance_ratio": float, "train_fraction": float, "geometry": str}
SAMPLING = ("random", "alternating", "balanced")
# Phantom geometry: `auto` resolves by the JAX backend (`resolve_geometry`).
GEOMETRIES = ("auto", "cpu", "accelerator")


def parse_arg(arg: str | None) -> dict:
    """'phantom,seed=3' -> {'phantom': True, 'seed': 3}; raises ValueError on unknown keys/bad types."""
    out = parse_config_arg(arg, ARGS, "configs/merlin.py")
    if "sampling" in out and out["sampling"] not in SAMPLING:
        raise ValueError(f"configs/merlin.py: sampling={out['sampling']!r}; choose one of {list(SAMPLING)}")
    if "geometry" in out and out["geometry"] not in GEOMETRIES:
        raise ValueError(f"configs/merlin.py: geometry={out['geometry']!r}; choose one of {list(GEOMETRIES)}")
    return out


def resolve_geometry(requested: str, backend: str | None) -> str:
    """'cpu' or 'accelerator': `requested` itself unless it is 'auto', which picks 'cpu' on the CPU
    backend and 'accelerator' on any other (gpu, tpu, ...). `backend` is only read for 'auto'."""
    if requested not in GEOMETRIES:
        raise ValueError(f"configs/merlin.py: geometry={requested!r}; choose one of {list(GEOMETRIES)}")
    if requested != "auto":
        return requested
    if not backend:
        raise ValueError("configs/merlin.py: geometry=auto needs the JAX backend name")
    return "cpu" if backend == "cpu" else "accelerator"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0                 # model initialisation and dropout
    c.data_seed = 0            # order of training batches (and the seeded section order)
    c.subset_seed = 0          # which studies a data-fraction subset keeps
    c.total_steps = 20_000     # a run is defined by steps, not epochs
    c.batch_size = 8           # global batch (the reproduction study's 8; Merlin used 18)
    # > 1: GradCache (vljax/update.py make_grad_fn): the towers run on accum_steps micro-batches per
    # device, the InfoNCE on the whole global batch; the same loss and gradients with the towers'
    # activations held for one micro-batch. Image BatchNorm then normalises over each micro-batch.
    c.accum_steps = 1

    # ---------------------------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.dir = config_dict.placeholder(str)   # Merlin layout folder or .jsonl manifest (required)
    c.data.phantom = False                      # generate/reuse a phantom dataset (data.dir or workdir/phantom)
    c.data.phantom_studies = 1000
    c.data.phantom_seed = 0
    c.data.phantom_signs = "designed"           # vljax/data/phantom/signs.py: "designed" or "anatomic"
    c.data.spacing = (1.5, 1.5, 3.0)            # mm, x y z (RAS)
    c.data.shape = (224, 224, 160)              # voxels, x y z -> model input D,H,W = 160,224,224
    c.data.hu_window = (-1000.0, 1000.0)
    c.data.dtype = "float32"                    # host-side volume dtype (bfloat16 halves transfer)
    # A record of the geometry recipe (set by the `geometry=` argument, not meant to be overridden):
    # "merlin" (the published one above), or the phantom default's "cpu" / "accelerator", with the JAX
    # backend that `geometry=auto` was resolved on (None when geometry= was given explicitly).
    c.data.geometry = "merlin"
    c.data.geometry_backend = config_dict.placeholder(str)
    c.data.max_text_len = 512
    c.data.tokenizer = config_dict.placeholder(str)  # None: the text tower's folder (or MiniLM's)
    # Batch composition (vljax/data/sampling.py). random: full reports, random order; alternating:
    # Merlin's full-report / organ-section alternation; balanced: alternation (unless alternate=False)
    # with balance_ratio normal studies in every batch. Every strategy has the same steps and schedule.
    c.data.sampling = "alternating"
    c.data.balance_ratio = 0.5                  # fraction of normal studies per batch (balanced)
    c.data.alternate = True                     # balanced on the alternating schedule (published setting)
    c.data.section_period = 2                   # every 2nd step (odd steps) is a section step
    c.data.section_order = "round_robin"        # or "seeded": a seeded permutation per cycle of sections
    c.data.sections = config_dict.placeholder(tuple)  # None: the 12 sections that carry a finding
    c.data.train_fraction = 1.0                 # seeded, nested subset of the training split
    c.data.workers = 4                          # Grain worker processes building batches
    c.data.cache_volumes = False                # preprocess every training volume once, keep them in memory
    # A preprocessed-volume cache built by tools/preprocess.py with this config's spacing, shape,
    # hu_window and dtype (vljax/data/volume_cache.py): volumes are read from it instead of decoded and
    # resampled, bitwise the same. None: preprocess on the fly.
    c.data.cache = config_dict.placeholder(str)
    c.data.prefetch = 2                         # batches buffered per worker
    # A study whose volume cannot be read: "raise" stops the run naming it; "skip" trains on a
    # deterministic replacement from the same class stream (batches stay a function of seed and step),
    # leaves it out of evaluations, and counts and names it (run_stats.json, results.json, the log).
    c.data.on_error = "raise"
    c.data.max_skip_fraction = 0.01             # skip: stop when more than this fraction of a split fails

    # ---------------------------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    # conv: "auto" (2D convolutions over the depth taps on XLA:CPU, native 3D convs on GPU/TPU),
    # "native" or "depth_taps" (vljax/models/conv.py); the parameters are the same.
    # init: "scratch" (random) or "torchvision:/path/resnet152.safetensors" (a torchvision ResNet state
    # dict of the same depth and width, I3D-inflated: each 2D kernel in the centre depth tap, as Merlin).
    # bn_stats: training BatchNorm statistics over the "global" batch (synchronised across devices,
    # as one device holding the whole batch) or "per_device" (each device's own examples, as data
    # parallelism without synchronised BatchNorm). Evaluation uses the running averages either way.
    c.model.image = ml_collections.ConfigDict(dict(name="resnet3d", depth=152, width=64, norm="batch",
                                                   num_groups=32, remat=True, bn_stats="global",
                                                   feature_norm=False, conv="auto", init="scratch"))
    c.model.text = ml_collections.ConfigDict(dict(name="bert", init="pretrained", size="base",
                                                  vocab_size=30522, pooling="cls", trainable=True))
    c.model.text.path = config_dict.placeholder(str)  # HF BERT folder; None = MiniLM shipped by pip
    c.model.embed_dim = 512
    c.model.logit_scale_init = 1.0              # Merlin; CLIP: log(1/0.07) with max log(100)
    c.model.logit_scale_max = config_dict.placeholder(float)
    c.model.dtype = "bfloat16"
    c.model.phenotype_weight = 0.0              # > 0 adds the phenotype head and its BCE loss

    # ---------------------------------------------------------------------------------- optimiser
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.end_lr_fraction = 0.0               # cosine decays to lr * this at total_steps
    c.optim.weight_decay = 0.05                 # on matrices/kernels only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0                     # global norm; 0 disables

    # ---------------------------------------------------------------------------------- devices
    # The mesh (vljax/sharding.py): the batch is split over all data x fsdp devices; parameters and
    # optimiser state arrays of at least fsdp_min_size elements are sharded over fsdp (FSDP); -1 is
    # "the rest of the devices". data=-1, fsdp=1: plain data parallelism, replicated state.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))

    # ---------------------------------------------------------------------------------- loop
    c.log_every = 50
    c.eval_every = 2000          # validation loss + zero-shot F1 on the val split; 0 = only at the end
    c.eval_max_studies = 0       # cap on val studies per periodic eval (0 = all)
    c.ckpt_every = 1000
    c.keep_checkpoints = 3
    # "auto": resume from the workdir's newest readable checkpoint when the config and the dataset
    # fingerprint match; "force" (experts): resume on changed data too, with a loud warning.
    c.resume = "auto"
    c.final_eval_split = "test"  # split of the final zero-shot evaluation written to results.json
    c.eval_batch_size = 8
    # Zero-shot prompt set (vljax/evals/zero_shot.py PROMPT_SETS): "merlin" (report sentences written
    # for real CT reports), "phantom" (the phantom report writer's phrase lists) or "merlin+phantom".
    c.zero_shot_prompts = "merlin"

    requested = args.get("geometry", "auto")
    if args.get("tiny"):
        if requested != "auto":
            raise ValueError("configs/merlin.py: tiny has its own geometry; geometry= does not apply")
        args["phantom"], requested = True, "cpu"
    if args.get("phantom"):
        _phantom(c)
        # The backend is queried only for `auto` (querying initialises JAX, which must come after
        # jax.distributed.initialize() on multi-host runs: pass geometry= explicitly there).
        backend = None
        if requested == "auto":
            import jax

            backend = jax.default_backend()
        c.data.geometry = resolve_geometry(requested, backend)
        c.data.geometry_backend = backend
        if c.data.geometry == "accelerator":
            _accelerator_phantom(c)
        if args.get("tiny"):
            _tiny(c)
    elif requested != "auto":
        raise ValueError(f"configs/merlin.py: geometry={requested} applies to the phantom default only "
                         "(e.g. --config=configs/merlin.py:phantom,geometry=accelerator)")
    for key, field in (("seed", "seed"), ("data_seed", "data_seed"), ("subset_seed", "subset_seed"),
                       ("steps", "total_steps"), ("batch", "batch_size")):
        if key in args:
            c[field] = args[key]
    for key in ("sampling", "balance_ratio", "train_fraction"):
        if key in args:
            c.data[key] = args[key]
    return c


def _phantom(c: ml_collections.ConfigDict) -> None:
    """The embedded default: small towers, coarse volumes, steps sized for 2 CPU cores."""
    c.data.phantom = True
    # 6,000 studies (3,634 training): with 1,000 the towers memorise the 618 training studies (training
    # InfoNCE 1.3 against 4.6 on val) instead of learning the findings (BUILD_NOTES.md, "Phantom
    # default, session 6"). Generating them takes ~1.5 minutes on 2 cores.
    c.data.phantom_studies = 6000
    # 18x18x24 mm voxels, 432x432x384 mm field of view: XLA:CPU 3D convolutions are slow even as
    # 2D convolutions over the depth taps; the phantom's designed findings (vljax/data/phantom/signs.py)
    # are sized to be visible at this geometry.
    c.data.spacing = (18.0, 18.0, 24.0)
    c.data.shape = (24, 24, 16)
    c.data.max_text_len = 352                   # phantom reports: 263 tokens median, 340 max
    # Soft-tissue window: at 18 mm voxels the findings are attenuation changes of 50-100 HU inside
    # organs, 4x larger in [0, 1] than with Merlin's [-1000, 1000]; a from-scratch ResNet learns them
    # much faster (BUILD_NOTES.md, "Phantom default").
    c.data.hu_window = (-200.0, 300.0)
    c.data.sampling = "alternating"             # Merlin's full-report / organ-section alternation
    # 37 KB per preprocessed volume: decode and resample the training split once (2 processes), then
    # build batches in the main process (a Grain worker would only copy cached arrays).
    c.data.cache_volumes = True
    c.data.workers = 0
    c.model.image.update(depth=18, width=16, norm="batch", remat=False, feature_norm=True)
    c.model.phenotype_weight = 1.0              # Merlin's multi-task phenotype head (16 phantom codes)
    # Locked pretrained MiniLM text tower with a trainable projection. Every sentence is embedded on
    # its own and mean-pooled, as the sentence-transformers checkpoint was trained, and a text is the
    # mean of its sentences: the phantom's reports are made of a few thousand distinct sentences, so
    # the text features of all training texts take seconds (the token-level cache took ~3 minutes
    # per 1,000 studies). On 2 CPU cores a trainable text tower costs more per step than the image
    # tower (BUILD_NOTES.md, "Phantom default").
    c.model.text.update(init="pretrained", pooling="sentence_mean", trainable=False)
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.logit_scale_max = math.log(100.0)
    c.model.dtype = "float32"
    # With cached volumes, pooled text features and depth-tap convolutions a step of 32 runs in ~0.1 s
    # on 2 cores: 8,000 steps of 32 (about 70 passes over the 3,634 training studies) in about 13
    # minutes. The towers underfit at 6,000 steps; 8,000 raised phantom 1's val macro AUROC from
    # 0.746 to 0.770 (selected on val: BUILD_NOTES.md, "Phantom default, session 6", session 7).
    c.total_steps = 8000
    c.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.log_every = 200
    c.eval_every = 3000
    c.eval_max_studies = 96
    c.ckpt_every = 1000
    c.eval_batch_size = 32
    # Zero-shot prompts: Merlin-style report sentences and the phantom report writer's own phrase
    # lists, one ensemble per finding (val macro AUROC 0.733 against 0.708 with the first alone and
    # 0.599 with the second alone, on one checkpoint: BUILD_NOTES.md, "Phantom default, session 6").
    c.zero_shot_prompts = "merlin+phantom"


def _tiny(c: ml_collections.ConfigDict) -> None:
    """A run that only shows the machinery works (applied after `_phantom`): a 64-study phantom, tiny
    towers, few steps; no pretrained weights, nothing to download or cache."""
    c.data.phantom_studies = 64
    c.data.geometry = "tiny"
    c.data.shape = (16, 16, 8)
    c.data.spacing = (24.0, 24.0, 40.0)
    c.data.max_text_len = 64
    c.model.image.update(depth=10, width=4)  # ResNet-10: ~17 % less CPU per tiny run than ResNet-18
    c.model.text.update(init="scratch", size="tiny", trainable=True, pooling="cls")
    c.model.embed_dim = 16
    c.total_steps = 20
    c.batch_size = 8
    c.optim.warmup_steps = 2
    c.log_every = 5
    c.eval_every = 10
    c.eval_max_studies = 0
    c.ckpt_every = 10
    c.eval_batch_size = 8
    c.zero_shot_prompts = "merlin"  # the smallest prompt set: its numbers mean nothing here


def _accelerator_phantom(c: ml_collections.ConfigDict) -> None:
    """The phantom default on a GPU/TPU, applied after `_phantom`: the phantom's native 6x6x8 mm voxels
    over the same 432x432x384 mm field of view as the CPU geometry, a wider image tower, more steps.
    Absolute values, independent of the CPU sizing in `_phantom`; the recipe otherwise (towers' kind,
    text side, batch, learning rate, sampling) is the phantom default's."""
    c.data.spacing = (6.0, 6.0, 8.0)
    c.data.shape = (72, 72, 48)                 # 432 x 432 x 384 mm
    c.data.workers = 4                          # accelerator hosts have the cores to feed it
    c.model.image.width = 32
    c.total_steps = 12000
    c.optim.warmup_steps = 300
    c.log_every = 100
    c.eval_every = 2000
    c.eval_max_studies = 192
    c.ckpt_every = 1000
    c.eval_batch_size = 32
