"""Write the seeded phantom CT dataset in the Merlin layout.

    python tools/make_phantom.py --out /tmp/vljax_phantom --num-studies 1000 --seed 0
"""

from __future__ import annotations

import argparse  # a plain CLI tool, not a trainer: no absl flag registry needed
import sys

from vljax.data.phantom import PhantomConfig, generate_phantom


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; an old phantom there is replaced)")
    p.add_argument("--num-studies", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, nargs=3, default=(6.0, 6.0, 8.0), metavar=("X", "Y", "Z"),
                   help="nominal voxel size in mm (varied per study)")
    p.add_argument("--signs", default="designed", choices=("designed", "anatomic"),
                   help="finding conspicuity profile (vljax/data/phantom/signs.py)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    p.add_argument("--no-vary-orientation", action="store_true", help="store every study as RAS")
    p.add_argument("--force", action="store_true", help="regenerate even if the same phantom is already there")
    a = p.parse_args(argv)
    try:
        cfg = PhantomConfig(num_studies=a.num_studies, seed=a.seed, spacing=tuple(a.spacing),
                            vary_orientation=not a.no_vary_orientation, workers=a.workers,
                            signs=a.signs)
        generate_phantom(a.out, cfg, reuse=not a.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
