"""Dataset statistics through the real data layer: manifest validation, label balance, report
sections, token lengths and preprocessed volumes. Generates the phantom first when asked.

    python -m vljax.summary --data_dir=/tmp/vljax_phantom --phantom_studies=300

Prints counts only: no report text, no identifiers beyond study ids.
"""

from __future__ import annotations

import collections
import time

import nibabel as nib
import numpy as np
from absl import app, flags

from vljax import cli
from vljax.data import ct
from vljax.data.findings import FINDINGS, SECTIONS
from vljax.data.manifest import Manifest, load_manifest
from vljax.data.phantom import PhantomConfig, generate_phantom
from vljax.data.reports import split_sections

_DATA_DIR = flags.DEFINE_string("data_dir", None, "dataset folder (Merlin layout) or .jsonl manifest", required=True)
_PHANTOM = flags.DEFINE_integer("phantom_studies", 0, "if > 0, generate (or reuse) a phantom of this size at data_dir")
_SEED = flags.DEFINE_integer("seed", 0, "phantom seed")
_VOLUMES = flags.DEFINE_integer("volumes", 8, "how many volumes to load and preprocess")
_SPACING = flags.DEFINE_list("spacing", ["7", "7", "10"], "preprocessing target spacing x,y,z (mm)")
_SHAPE = flags.DEFINE_list("shape", ["64", "64", "48"], "preprocessing target shape x,y,z (voxels)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "token length cap for the length statistics")


def summarize(manifest: Manifest) -> dict:
    """Counts per split and per finding (positive / negative / not mentioned); no text."""
    out = {"num_studies": len(manifest), "splits": dict(collections.Counter(r.split for r in manifest.records))}
    per = {}
    for i, f in enumerate(FINDINGS):
        c = collections.Counter(r.labels[i] for r in manifest.records)
        per[f] = {"pos": c[1], "neg": c[0], "unmentioned": c[-1]}
    out["findings"] = per
    return out


def main(argv) -> None:
    del argv
    if _PHANTOM.value > 0:
        generate_phantom(_DATA_DIR.value, PhantomConfig(num_studies=_PHANTOM.value, seed=_SEED.value))
    m = load_manifest(_DATA_DIR.value)
    s = summarize(m)
    print(f"\n{s['num_studies']} studies; splits: " + ", ".join(f"{k} {v}" for k, v in sorted(s["splits"].items())))
    print(f"\n{'finding':32s} {'pos':>5s} {'neg':>5s} {'n/m':>5s} {'prev%':>6s}")
    for f in FINDINGS:
        c = s["findings"][f]
        print(f"{f:32s} {c['pos']:5d} {c['neg']:5d} {c['unmentioned']:5d} {100 * c['pos'] / len(m):6.1f}")

    present = collections.Counter()
    unknown = 0
    for r in m.records:
        sec = split_sections(r.findings, r.study_id)
        present.update(k for k, v in sec.sections.items() if v)
        unknown += bool(sec.unknown_headers)
    print("\nreport sections present (% of studies): " +
          ", ".join(f"{k} {100 * present[k] / len(m):.0f}" for k in SECTIONS))
    print(f"reports with an unknown header (kept in the full report only): {unknown}")

    try:
        from vljax.data.reports import load_tokenizer, tokenize
        tok = load_tokenizer()
        ids = tokenize(tok, [r.findings for r in m.records], _MAX_TOKENS.value)
        lengths = ids["attention_mask"].sum(1)
        print(f"full-report tokens (MiniLM tokenizer): median {int(np.median(lengths))}, "
              f"p95 {int(np.percentile(lengths, 95))}, max {int(lengths.max())} (cap {_MAX_TOKENS.value})")
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"token lengths skipped: {e}")

    cfg = ct.CTPreprocessConfig(spacing=tuple(float(v) for v in _SPACING.value),
                                shape=tuple(int(v) for v in _SHAPE.value))
    print(f"\npreprocessing {min(_VOLUMES.value, len(m))} volumes to {cfg.shape} (x,y,z) at {cfg.spacing} mm:")
    t0 = time.perf_counter()
    for r in m.records[: _VOLUMES.value]:
        data, affine = ct.load_nifti(r.image)
        vol = ct.preprocess_volume(data, affine, cfg)
        print(f"  {r.study_id}: stored {''.join(nib.aff2axcodes(affine))} {data.shape} "
              f"{'x'.join(f'{v:.2f}' for v in nib.affines.voxel_sizes(affine))} mm"
              f" -> model layout (D,H,W) {vol.shape} mean {vol.mean():.3f}")
    dt = time.perf_counter() - t0
    print(f"  {dt / max(1, min(_VOLUMES.value, len(m))):.3f} s per volume (load + preprocess)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
