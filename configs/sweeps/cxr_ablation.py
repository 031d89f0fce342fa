r"""CXR-CLIP's ICL/TCL ablation as a seed sweep: the full loss against L_CLIP alone, x N seeds.

  python -m vljax.sweep run --sweep=configs/sweeps/cxr_ablation.py:phantom,seeds=3 \
      --workdir=/tmp/sweeps/cxr_ablation
  python -m vljax.sweep report --workdir=/tmp/sweeps/cxr_ablation

Settings (the same steps, schedule, data order and augmentations):

  clip_only      L_CLIP over the four image-text pairs (--config.loss.w_icl=0 --config.loss.w_tcl=0)
  icl_tcl        L_CLIP + 1.0 ICL + 0.5 TCL (DESIGN.md §2; the recipe's default)

The baseline for paired differences is `clip_only`; seed index k sets seed = data_seed = subset_seed = k.

Arguments after ':' (comma-separated):
  phantom     (default) `configs/cxr_clip.py:phantom`, sized for 2 CPU cores.
  smoke       `configs/cxr_clip.py:tiny`: the machinery end to end; its numbers mean nothing.
  full        the published recipe `configs/cxr_clip.py`; needs --set=data.dirs='("/data/mimic-cxr-jpg",)'.
  seeds=N     seed indices 0..N-1 (default 3; smoke 2).
"""

from __future__ import annotations

from vljax.sweep.spec import Sweep, parse_args, variant_of

ARGS = {"phantom": bool, "smoke": bool, "full": bool, "seeds": int}
SETTINGS = {
    "clip_only": {"loss.w_icl": 0.0, "loss.w_tcl": 0.0},
    "icl_tcl": {"loss.w_icl": 1.0, "loss.w_tcl": 0.5},
}
BASELINE = "clip_only"


def get_sweep(arg: str | None = None) -> Sweep:
    args = parse_args(arg, ARGS, "configs/sweeps/cxr_ablation.py")
    variant = variant_of(args, "configs/sweeps/cxr_ablation.py")
    config = {"phantom": "configs/cxr_clip.py:phantom", "smoke": "configs/cxr_clip.py:tiny",
              "full": "configs/cxr_clip.py"}[variant]
    return Sweep(name=f"cxr_ablation_{variant}", config=config, settings=dict(SETTINGS),
                 seeds=args.get("seeds", 2 if variant == "smoke" else 3), baseline=BASELINE,
                 required=("data.dirs",) if variant == "full" else ())
