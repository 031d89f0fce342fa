"""What each phantom finding draws, how large and how dense: the one table the renderer
(`phantom.anatomy`) and the report writer (`phantom.text`) both read, through
`sample_finding_params` (every study's drawn geometry) and `drawn_sizes_cm` (the sizes a report
quotes).

The phantom is a designed test signal, not anatomy. Each finding stays what and where it is
anatomically (the change that defines it, in its own organ or structure, at a position and extent
that vary between studies), and the `designed` profile gives it a size, an HU change and a count
that a small 3D CNN can detect at the phantom default's 18 x 18 x 24 mm voxels (every focal change
at least ~20 mm across and >= 85 HU, most far larger). The `anatomic` profile is the earlier,
closer-to-life rendering (calcified spots of 5 mm, 1-2 cm lesions), kept for data-layer tests and
for finer geometries.

Columns (ranges are drawn per study, per object, from the finding's own random stream):
  drawn      what the renderer paints, and in which structure;
  size_mm    the extent named in `drawn` (a diameter, a thickness, a growth), mm;
  hu_change  HU of what is drawn minus the HU of the tissue it replaces (0 for a change of size);
  count      how many objects are drawn (inclusive range; sides for paired organs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vljax.data.findings import FINDINGS


@dataclasses.dataclass(frozen=True)
class Sign:
    drawn: str
    size_mm: tuple[float, float]
    hu_change: tuple[float, float]
    count: tuple[int, int] = (1, 1)

    def __post_init__(self):
        for name in ("size_mm", "hu_change", "count"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} range {lo}..{hi} is empty")


# HU of the tissues the findings replace (the `hu_change` reference), from phantom.anatomy.HU.
_LUNG, _FAT, _MYO, _BLOOD, _LIVER, _BILE, _KIDNEY, _BONE = -850.0, -95.0, 60.0, 160.0, 105.0, 10.0, 170.0, 260.0


def _s(drawn, size, hu, count=(1, 1)) -> Sign:
    return Sign(drawn, tuple(map(float, size)), tuple(map(float, hu)), tuple(map(int, count)))


ANATOMIC: dict[str, Sign] = {
    "pleural effusion": _s("dependent fluid layer at the posterior lung base(s); size = AP depth", (30, 55), (8 - _LUNG,) * 2, (1, 2)),
    "atelectasis": _s("plate of collapsed lung at the base(s); size = craniocaudal thickness", (18, 18), (55 - _LUNG,) * 2, (1, 2)),
    "cardiomegaly": _s("heart enlarged; size = growth of each radius", (17, 22), (0, 0)),
    "coronary calcification": _s("calcified foci on the heart surface; size = diameter", (10, 10), (750 - _MYO,) * 2, (2, 4)),
    "aortic valve calcification": _s("calcified aortic root; size = diameter", (16, 16), (950 - _BLOOD,) * 2),
    "hepatomegaly": _s("liver extended caudally; size = craniocaudal growth", (68, 82), (0, 0)),
    "hepatic steatosis": _s("whole liver at lower attenuation; size = none (diffuse)", (0, 0), (-85, -55)),
    "biliary ductal dilation": _s("fluid-filled intrahepatic ducts and common duct; size = duct diameter", (11, 11), (_BILE - _LIVER,) * 2, (3, 3)),
    "metastatic disease": _s("hypodense liver lesions with an enhancing rim; size = diameter", (14, 30), (35 - _LIVER,) * 2, (3, 6)),
    "gallstones": _s("dense stones in the gallbladder lumen; size = diameter", (10, 16), (650 - _BILE,) * 2, (1, 3)),
    "surgically absent gallbladder": _s("gallbladder replaced by fat, metal clips in the fossa; size = clip diameter", (7, 7), (2500 - _FAT,) * 2, (2, 2)),
    "splenomegaly": _s("spleen enlarged, mainly caudally; size = craniocaudal growth", (80, 92), (0, 0)),
    "pancreatic atrophy": _s("thin fatty pancreas; size = remaining gland diameter", (11, 11), (-60, -60)),
    "renal cyst": _s("water-density cyst in one kidney; size = diameter", (26, 44), (4 - _KIDNEY,) * 2),
    "renal hypodensities": _s("hypodense lesions in both kidneys; size = diameter; count per kidney", (11, 16), (45 - _KIDNEY,) * 2, (3, 5)),
    "hydronephrosis": _s("fluid-filled renal sinus and dilated ureter; size = ureter diameter", (14, 14), (8 - _KIDNEY,) * 2, (1, 2)),
    "bowel obstruction": _s("dilated fluid-filled small-bowel loops with air-fluid levels, collapsed colon; size = loop diameter", (48, 48), (0, 0)),
    "appendicitis": _s("thick appendix with periappendiceal fat stranding; size = stranding diameter", (52, 52), (-20 - _FAT,) * 2),
    "submucosal edema": _s("low-attenuation submucosa in a thickened bowel wall; size = wall thickness", (8, 8), (5 - 55,) * 2),
    "hiatal hernia": _s("gas-filled stomach above the diaphragm; size = diameter", (48, 68), (55 - _LUNG,) * 2),
    "ascites": _s("fluid replacing peritoneal fat around the organs; size = none (diffuse)", (0, 0), (8 - _FAT,) * 2),
    "free air": _s("gas pockets under the anterior abdominal wall; size = diameter", (20, 36), (-1000 - _FAT,) * 2, (1, 3)),
    "anasarca": _s("subcutaneous fat thickened and stranded; size = added thickness", (14, 14), (-25 + 100,) * 2),
    "prostatomegaly": _s("enlarged prostate; size = diameter", (54, 72), (0, 0)),
    "atherosclerosis": _s("calcified plaques on the aorta and iliac arteries; size = diameter", (9, 9), (750 - _BLOOD,) * 2, (6, 13)),
    "abdominal aortic aneurysm": _s("dilated infrarenal aorta with mural thrombus; size = diameter", (44, 64), (45 - _BLOOD,) * 2),
    "thrombosis": _s("filling defect in the portal vein, IVC or left iliac vein; size = thrombus diameter", (13, 17), (45 - _BLOOD,) * 2),
    "lymphadenopathy": _s("enlarged retroperitoneal/mesenteric nodes; size = diameter", (18, 30), (45 - _FAT,) * 2, (3, 6)),
    "osteopenia": _s("low-density cancellous bone and thin cortex; size = none (diffuse)", (0, 0), (95 - _BONE,) * 2),
    "fracture": _s("vertebral compression: lost height, low-density cleft, sclerotic end plate; size = cleft height", (18, 18), (15 - _BONE,) * 2),
}

DESIGNED: dict[str, Sign] = {
    "pleural effusion": _s("dependent fluid layer at the posterior lung base(s); size = AP depth", (60, 90), (8 - _LUNG,) * 2, (1, 2)),
    "atelectasis": _s("plate of collapsed lung at the base(s); size = craniocaudal thickness", (44, 60), (55 - _LUNG,) * 2, (1, 2)),
    "cardiomegaly": _s("heart enlarged; size = growth of each radius", (26, 34), (0, 0)),
    "coronary calcification": _s("calcified foci on the heart surface; size = diameter", (28, 34), (750 - _MYO,) * 2, (5, 7)),
    "aortic valve calcification": _s("calcified aortic root; size = diameter", (34, 40), (950 - _BLOOD,) * 2, (3, 4)),
    "hepatomegaly": _s("liver extended caudally; size = craniocaudal growth", (95, 125), (0, 0)),
    "hepatic steatosis": _s("whole liver at lower attenuation; size = none (diffuse)", (0, 0), (-130, -100)),
    "biliary ductal dilation": _s("fluid-filled intrahepatic ducts and common duct; size = duct diameter", (28, 34), (_BILE - _LIVER,) * 2, (4, 6)),
    "metastatic disease": _s("hypodense liver lesions with an enhancing rim; size = diameter", (40, 52), (0 - _LIVER,) * 2, (4, 7)),
    "gallstones": _s("dense stones in the gallbladder lumen; size = diameter", (30, 36), (650 - _BILE,) * 2, (4, 6)),
    "surgically absent gallbladder": _s("gallbladder replaced by fat, metal clips in the fossa; size = clip diameter", (26, 32), (2500 - _FAT,) * 2, (5, 7)),
    "splenomegaly": _s("spleen enlarged, mainly caudally; size = craniocaudal growth", (110, 140), (0, 0)),
    "pancreatic atrophy": _s("thin fatty pancreas; size = remaining gland diameter", (4, 6), (-150, -150)),
    "renal cyst": _s("water-density cyst in one kidney; size = diameter", (56, 70), (4 - _KIDNEY,) * 2, (1, 2)),
    "renal hypodensities": _s("hypodense lesions in both kidneys; size = diameter; count per kidney", (30, 36), (-20 - _KIDNEY,) * 2, (3, 4)),
    "hydronephrosis": _s("fluid-filled renal sinus and dilated ureter; size = ureter diameter", (24, 30), (8 - _KIDNEY,) * 2, (1, 2)),
    "bowel obstruction": _s("dilated fluid-filled small-bowel loops with air-fluid levels, collapsed colon; size = loop diameter", (52, 60), (0, 0)),
    "appendicitis": _s("thick appendix with periappendiceal fat stranding; size = stranding diameter", (70, 84), (25 - _FAT,) * 2),
    "submucosal edema": _s("low-attenuation submucosa in a thickened bowel wall; size = wall thickness", (14, 18), (-25 - 55,) * 2),
    "hiatal hernia": _s("gas-filled stomach above the diaphragm; size = diameter", (90, 110), (55 - _LUNG,) * 2),
    "ascites": _s("fluid replacing peritoneal fat around the organs; size = none (diffuse)", (0, 0), (8 - _FAT,) * 2),
    "free air": _s("gas pockets under the anterior abdominal wall; size = diameter", (44, 60), (-1000 - _FAT,) * 2, (2, 4)),
    "anasarca": _s("subcutaneous fat thickened and stranded; size = added thickness", (20, 26), (-5 + 100,) * 2),
    "prostatomegaly": _s("enlarged prostate; size = diameter", (90, 110), (60, 60)),
    "atherosclerosis": _s("calcified plaques on the aorta and iliac arteries; size = diameter", (22, 28), (750 - _BLOOD,) * 2, (10, 16)),
    "abdominal aortic aneurysm": _s("dilated infrarenal aorta with mural thrombus; size = diameter", (70, 90), (45 - _BLOOD,) * 2),
    "thrombosis": _s("filling defect in the portal vein, IVC or left iliac vein; size = thrombus diameter", (36, 44), (-20 - _BLOOD,) * 2),
    "lymphadenopathy": _s("enlarged retroperitoneal/mesenteric nodes; size = diameter", (40, 52), (45 - _FAT,) * 2, (4, 7)),
    "osteopenia": _s("low-density cancellous bone and thin cortex; size = none (diffuse)", (0, 0), (60 - _BONE,) * 2),
    "fracture": _s("vertebral compression: lost height, low-density cleft, sclerotic end plate; size = cleft height", (40, 50), (15 - _BONE,) * 2, (2, 3)),
}

# Where a thrombosis is drawn (one per study; the renderer knows each vessel, the report names it).
THROMBOSIS_VESSELS = ("portal vein", "inferior vena cava", "left common iliac vein")

PROFILES: dict[str, dict[str, Sign]] = {"designed": DESIGNED, "anatomic": ANATOMIC}
for _name, _table in PROFILES.items():  # every finding is drawn in every profile, nothing else
    if set(_table) != set(FINDINGS):
        raise AssertionError(f"phantom signs profile {_name!r} does not cover exactly the 30 findings")


def signs_for(profile: str) -> dict[str, Sign]:
    if profile not in PROFILES:
        raise ValueError(f"unknown phantom signs profile {profile!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]


def digest(profile: str) -> str:
    """A short hash of a profile's table: a phantom generated from other values is not reused."""
    import hashlib
    import json

    rows = {f: dataclasses.astuple(s) for f, s in sorted(signs_for(profile).items())}
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]


def markdown_table(profile: str = "designed") -> str:
    """The table as Markdown (for BUILD_NOTES.md): finding, what is drawn, size, HU change, count."""
    rows = ["| finding | drawn | size (mm) | HU change | count |", "|---|---|---|---|---|"]
    fmt = lambda r, d=0: f"{r[0]:.{d}f}" if r[0] == r[1] else f"{r[0]:.{d}f}–{r[1]:.{d}f}"  # noqa: E731
    for f in FINDINGS:
        s = signs_for(profile)[f]
        drawn, _, size_what = s.drawn.partition("; size = ")
        size = "–" if s.size_mm == (0.0, 0.0) else f"{fmt(s.size_mm)} ({size_what.split(';')[0]})"
        hu = "size only" if s.hu_change == (0.0, 0.0) else f"{s.hu_change[0]:+.0f}" + (
            "" if s.hu_change[0] == s.hu_change[1] else f"…{s.hu_change[1]:+.0f}")
        rows.append(f"| {f} | {drawn} | {size} | {hu} | {fmt(s.count)} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Finding parameters (drawn for every study, used only when the finding is positive)
# --------------------------------------------------------------------------------------------
def sample_finding_params(rng: np.random.Generator, anatomy: dict, signs: dict) -> dict:
    """Geometry of every finding, drawn from its own stream so toggling one changes nothing else.

    Sizes, HU changes and counts come from `signs` (a `phantom.signs` profile); positions, sides
    and directions are drawn here. Every finding's values are drawn whether or not it is positive."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    def size(f):  # radius-like half size of one object, mm
        return u(*signs[f].size_mm) / 2.0

    def full(f):
        return u(*signs[f].size_mm)

    def hu(f):
        return u(*signs[f].hu_change)

    def count(f):
        lo, hi = signs[f].count
        return int(rng.integers(lo, hi + 1))

    def unit_in_ball(scale=1.0):
        v = rng.normal(size=3)
        return tuple(v / (np.linalg.norm(v) + 1e-9) * rng.uniform(0, 1) ** (1 / 3) * scale)

    def sides(f):
        both = count(f) == 2
        one = ["right", "left"][int(rng.integers(2))]
        return ["right", "left"] if both else [one]

    return {
        "pleural effusion": dict(sides=sides("pleural effusion"), depth=full("pleural effusion"),
                                 hu=hu("pleural effusion")),
        "atelectasis": dict(sides=sides("atelectasis"), height=u(14, 30), half=size("atelectasis"),
                            hu=hu("atelectasis")),
        "cardiomegaly": dict(growth=full("cardiomegaly")),
        "coronary calcification": dict(spots=[(u(0.2, 2.8), u(1.3, 2.3), size("coronary calcification"))
                                              for _ in range(count("coronary calcification"))],
                                       hu=hu("coronary calcification")),
        "aortic valve calcification": dict(radius=size("aortic valve calcification"),
                                           nodules=[u(0, 2 * np.pi) for _ in range(count("aortic valve calcification"))],
                                           hu=hu("aortic valve calcification")),
        "hepatomegaly": dict(growth=full("hepatomegaly")),
        "hepatic steatosis": dict(drop=-hu("hepatic steatosis")),
        "biliary ductal dilation": dict(branches=[(u(10, 45), u(-25, 25), u(10, 35))
                                                  for _ in range(count("biliary ductal dilation"))],
                                        radius=size("biliary ductal dilation"), hu=hu("biliary ductal dilation")),
        "metastatic disease": dict(lesions=[(unit_in_ball(), size("metastatic disease"))
                                            for _ in range(count("metastatic disease"))],
                                   hu=hu("metastatic disease")),
        "gallstones": dict(stones=[((u(-0.4, 0.4), u(-0.5, -0.1), u(-0.7, -0.2)), size("gallstones"))
                                   for _ in range(count("gallstones"))], hu=hu("gallstones")),
        "surgically absent gallbladder": dict(clips=[(u(-10, 10), u(-8, 8), u(-15, 15))
                                                     for _ in range(count("surgically absent gallbladder"))],
                                              radius=size("surgically absent gallbladder"),
                                              hu=hu("surgically absent gallbladder")),
        "splenomegaly": dict(growth=full("splenomegaly")),
        "pancreatic atrophy": dict(radius=size("pancreatic atrophy"), hu=hu("pancreatic atrophy")),
        "renal cyst": dict(side=["right", "left"][int(rng.integers(2))], both=count("renal cyst") == 2,
                           pos=tuple(np.array([u(-1, 1), u(-1, 1), u(-1, 1)]) / 1.9 + np.array([0.5, 0, 0])),
                           radius=size("renal cyst"), hu=hu("renal cyst")),
        "renal hypodensities": dict(lesions={s: [(unit_in_ball(), size("renal hypodensities"))
                                                 for _ in range(count("renal hypodensities"))]
                                             for s in ("right", "left")}, hu=hu("renal hypodensities")),
        "hydronephrosis": dict(sides=sides("hydronephrosis"), radius=size("hydronephrosis"),
                               hu=hu("hydronephrosis")),
        "bowel obstruction": dict(radius=size("bowel obstruction")),
        "appendicitis": dict(dir=tuple(np.array([u(-0.5, 0.1), u(-0.2, 0.4), -1.0]) / np.linalg.norm([0.3, 0.2, 1.0])),
                             radius=size("appendicitis"), hu=hu("appendicitis")),
        "submucosal edema": dict(wall=full("submucosal edema"), hu=hu("submucosal edema")),
        "hiatal hernia": dict(size=size("hiatal hernia")),
        "ascites": dict(hu=hu("ascites")),
        "abdominal aortic aneurysm": dict(radius=size("abdominal aortic aneurysm"), hu=hu("abdominal aortic aneurysm")),
        "thrombosis": dict(vessel=THROMBOSIS_VESSELS[int(rng.integers(len(THROMBOSIS_VESSELS)))],
                           radius=size("thrombosis"), hu=hu("thrombosis")),
        "atherosclerosis": dict(plaques=[(u(0, 2 * np.pi), u(0, 1), size("atherosclerosis"))
                                         for _ in range(count("atherosclerosis"))], hu=hu("atherosclerosis")),
        "lymphadenopathy": dict(nodes=[((u(-50, 30), u(-50, 30), u(-120, 0)), size("lymphadenopathy"))
                                       for _ in range(count("lymphadenopathy"))], hu=hu("lymphadenopathy")),
        "prostatomegaly": dict(radius=size("prostatomegaly"), hu=hu("prostatomegaly")),
        "free air": dict(pockets=[(u(-60, 60), u(-60, 50), size("free air")) for _ in range(count("free air"))]),
        "fracture": dict(levels=[u(anatomy["zd"] - 150, anatomy["zd"] - 20) for _ in range(count("fracture"))],
                         half=size("fracture"), hu=hu("fracture")),
        "anasarca": dict(phase=u(0, 2 * np.pi), thickness=full("anasarca"), hu=hu("anasarca")),
        "osteopenia": dict(hu=hu("osteopenia")),
    }


def drawn_sizes_cm(anatomy: dict, fp: dict) -> dict[str, float]:
    """The size a report quotes for each finding that has one, measured from what is drawn (cm)."""
    liver_cc = 2 * anatomy["liver"]["r"][2] + fp["hepatomegaly"]["growth"]
    spleen_cc = 2 * anatomy["spleen"]["r"][2] + fp["splenomegaly"]["growth"]
    return {
        "hepatomegaly": liver_cc / 10, "splenomegaly": spleen_cc / 10,
        "renal cyst": 2 * fp["renal cyst"]["radius"] / 10, "prostatomegaly": 2 * fp["prostatomegaly"]["radius"] / 10,
        "abdominal aortic aneurysm": 2 * fp["abdominal aortic aneurysm"]["radius"] / 10,
        "lymphadenopathy": 2 * max(r for _, r in fp["lymphadenopathy"]["nodes"]) / 10,
    }
