"""The chest X-ray phantom's renderer: anatomy, the seven findings and per-image variation, drawn as a
projected density on a grid of physical coordinates (cm) with vectorised NumPy.

Coordinates: a 40 cm field of view centred on the chest, x to the image right (the patient's left on a
frontal view, as radiographs are displayed), y downwards; on the lateral view x runs from anterior
(image left) to posterior. Every shape is an analytic function of (x, y) with edges softened over one
pixel, so an image is evaluated directly at any size and a per-image pose (rotation, scale, shift) is a
change of coordinates. A finding's geometry is drawn for every study (`sample_findings`), positive or
not, and `render` draws it only with a non-zero state (1 = as labelled positive, 0.5 = the subtler
version of an uncertain label), so toggling a finding changes only its own pixels.

Densities: outside the body ~0, soft tissue 0.6, aerated lung subtracts 0.46 (less lung tissue and
markings); findings replace air (`A *= 1 - opacity`), so a filled lung looks like soft tissue.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

FINDINGS = ("cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "edema", "atelectasis", "nodule")
FOV_CM = 40.0
SIDES = {"right": -1.0, "left": 1.0}   # patient side -> sign of x on the frontal view
LOBES = {  # lobe -> (side, vertical fraction apex->dome, lateral fraction medial->lateral, AP fraction)
    "right upper": ("right", 0.28, 0.55, 0.35), "right middle": ("right", 0.70, 0.40, 0.20),
    "right lower": ("right", 0.80, 0.62, 0.75), "left upper": ("left", 0.32, 0.55, 0.35),
    "left lower": ("left", 0.80, 0.68, 0.75),
}
_AIR, _TISSUE, _LUCENCY, _PARENCHYMA = 0.03, 0.60, 0.46, 0.05


def sample_anatomy(rng: np.random.Generator) -> dict:
    """One patient's chest (cm): lung extent, domes, heart, ribs, lung-marking texture."""
    u = rng.uniform
    dome_r = u(5.0, 7.5)
    return dict(
        lung_w=u(12.0, 14.0), med=u(2.2, 2.8), apex=u(-14.0, -12.0),
        dome={"right": dome_r, "left": dome_r + u(0.5, 1.5)},
        sulcus=u(2.5, 3.5), wall=u(1.5, 2.5), heart_x=u(1.0, 2.0), heart_b=u(5.0, 6.0), hilum_y=u(-3.0, -1.0),
        depth=u(20.0, 25.0), rib_step=u(2.0, 2.4), rib_phase=u(0.0, 1.0), clavicle=u(0.0, 1.5),
        marks_k=[float(k) for k in rng.integers(7, 19, size=4)],
        marks_phase=[[float(p) for p in u(0, 2 * math.pi, size=4)] for _ in range(2)],
        bubble=(u(3.5, 6.5), u(1.5, 2.5), u(1.0, 1.8)),
    )


def _sides(rng: np.random.Generator, p_both: float) -> tuple[str, ...]:
    r = rng.uniform()
    return ("right", "left") if r < p_both else (("right",) if r < p_both + (1 - p_both) / 2 else ("left",))


def sample_findings(rng: np.random.Generator) -> dict:
    """Every finding's geometry, drawn whether or not the finding is present (fixed draw order)."""
    u = rng.uniform
    lobe = list(LOBES)[int(rng.integers(len(LOBES)))]
    return {
        "cardiomegaly": dict(ctr_normal=u(0.40, 0.47), ctr_large=u(0.56, 0.66)),
        "pleural effusion": dict(sides=_sides(rng, 0.3), height=u(2.5, 6.0)),
        "pneumothorax": dict(sides=(("right", "left")[int(rng.integers(2))],), rim=u(2.2, 4.0)),
        "consolidation": dict(lobe=lobe, dv=u(-0.05, 0.05), dl=u(-0.05, 0.05), rx=u(3.0, 4.5), ry=u(2.5, 4.0),
                              wobble=u(0, 2 * math.pi), bronchograms=bool(u() < 0.5)),
        "edema": dict(strength=u(0.6, 0.9), sx=u(3.0, 4.0), sy=u(4.0, 5.5)),
        "atelectasis": dict(sides=_sides(rng, 0.35), elevation=u(1.2, 2.0), above=u(1.8, 3.2), length=u(5.0, 8.0),
                            thickness=u(0.9, 1.4), tilt=u(-0.2, 0.2), along=u(0.35, 0.65)),
        "nodule": dict(sides=(("right", "left")[int(rng.integers(2))],), tv=u(0.12, 0.55), tl=u(0.4, 0.85),
                       tap=u(0.2, 0.8), diameter=u(1.2, 2.2)),
    }


def severity_words(geom: dict, states: Mapping[str, float]) -> dict:
    """What the report says about size: the drawn measure scaled as `render` scales it."""
    s = {f: states.get(f, 0.0) for f in FINDINGS}
    ctr = cardiothoracic_ratio(geom, s["cardiomegaly"])
    eff = geom["pleural effusion"]["height"] * s["pleural effusion"]
    ptx = geom["pneumothorax"]["rim"] * s["pneumothorax"]
    return {
        "cardiomegaly": "mild" if ctr < 0.6 else ("moderate" if ctr < 0.63 else "marked"),
        "pleural effusion": "small" if eff < 3.5 else ("moderate" if eff < 5.0 else "large"),
        "pneumothorax": "small" if ptx < 2.8 else "moderate",
        "edema": "mild" if geom["edema"]["strength"] * s["edema"] < 0.75 else "moderate",
        "ctr": ctr, "nodule_cm": geom["nodule"]["diameter"] * (1.0 if s["nodule"] >= 1 else 0.8),
    }


def cardiothoracic_ratio(geom: dict, state: float) -> float:
    c = geom["cardiomegaly"]
    return c["ctr_normal"] + state * (c["ctr_large"] - c["ctr_normal"])


def sample_pose(rng: np.random.Generator) -> dict:
    """Per-image variation: rotation, scale, shift, exposure, contrast and noise."""
    u = rng.uniform
    return dict(angle=u(-4.0, 4.0), scale=u(0.95, 1.05), shift=(u(-1.5, 1.5), u(-1.5, 1.5)), gain=u(0.88, 1.08),
                offset=u(-0.04, 0.04), gamma=u(0.85, 1.15), noise=u(0.008, 0.02))


IDENTITY_POSE = dict(angle=0.0, scale=1.0, shift=(0.0, 0.0), gain=1.0, offset=0.0, gamma=1.0, noise=0.0)


# --- shapes ------------------------------------------------------------------------------------------

def _soft(d, w):
    """Inside-ness from a signed distance d (cm, positive inside), edge softened over w cm."""
    return np.clip(d * (1.0 / w) + 0.5, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b):
    """Approximate signed distance (cm, positive inside) to an axis-aligned ellipse (first order in 1-q)."""
    X, Y = (x - cx) * (1.0 / a), (y - cy) * (1.0 / b)
    q = np.sqrt(X * X + Y * Y) + 1e-6
    return (1.0 - q) * q / (np.sqrt((X / a) ** 2 + (Y / b) ** 2) + 1e-6)


def _band(x, y, cx, cy, length, thickness, tilt, w):
    c, s = math.cos(tilt), math.sin(tilt)
    along, across = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return _soft(np.minimum(thickness / 2 - np.abs(across), length / 2 - np.abs(along)), w)


def _window_gauss(x, y, cx, cy, sx, sy):
    g = np.exp(-((x - cx) / sx) ** 2 - ((y - cy) / sy) ** 2)
    return np.clip((g - 0.08) * (1 / 0.92), 0.0, 1.0)  # compact support: nothing beyond ~1.6 sigma


class _Lung:
    """One lung on one view: its mask, its ellipse distance (for the apical rim) and where a finding at
    fractional position (vertical, lateral-or-AP) lies. `h` is the horizontal coordinate of the view,
    mirrored on the frontal view so that the lateral chest wall is at +lung_w for both lungs."""

    def __init__(self, h, y, an, side, frontal, elevation, w):
        self.h, self.y, self.w, self.an, self.side = h, y, w, an, side
        self.apex = an["apex"]
        if frontal:
            lo, hi = an["med"], an["lung_w"]
            sulcus, deep, front_drop, dome_at = an["sulcus"], hi, 0.8, 0.5
        else:
            shift = 0.4 if side == "right" else -0.4  # the two lungs do not superimpose exactly
            lo, hi = -an["depth"] / 2 + an["wall"] + 0.5 + shift, an["depth"] / 2 - an["wall"] + shift
            sulcus, deep, front_drop, dome_at = an["sulcus"] + 1.5, hi, 1.2, 0.35  # deeper posterior sulcus
        self.lo, self.hi = lo, hi
        cx, a = (lo + hi) / 2, (hi - lo) / 2
        cy = an["dome"][side] + sulcus - 0.5   # the chest wall does not move with the diaphragm
        self.dist = _ellipse(h, y, cx, cy, a, cy - self.apex)
        self.dome = an["dome"][side] - elevation   # volume loss raises the hemidiaphragm
        self.cp = self.dome + sulcus
        x_dome = lo + dome_at * (hi - lo)
        t_out = np.clip((h - x_dome) * (1.0 / (deep - x_dome)), 0.0, 1.0)
        t_in = np.clip((x_dome - h) * (1.0 / (x_dome - lo)), 0.0, 1.0)
        self.diaphragm = self.dome + (self.cp - self.dome) * t_out * t_out + front_drop * t_in * t_in
        self.mask = _soft(self.dist, w) * _soft(self.diaphragm - y, w)

    def at(self, tv: float, th: float) -> tuple[float, float]:
        return self.lo + th * (self.hi - self.lo), self.apex + tv * (self.dome - self.apex)


# --- the views -----------------------------------------------------------------------------------------

def render(view: str, anat: dict, geom: dict, states: Mapping[str, float], pose: Mapping, size: int,
           noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """One image, float32 [size, size] in [0, 1] (bright = dense). `states`: finding -> 0, 0.5 or 1.
    Edges are softened analytically over one pixel: 2x supersampling changed a 128 px image by 0.002
    on average, at 8x the cost."""
    n = size
    c = ((np.arange(n, dtype=np.float32) + 0.5) * (FOV_CM / n) - FOV_CM / 2).astype(np.float32)
    xi, yi = c[None, :] - np.float32(pose["shift"][0]), c[:, None] - np.float32(pose["shift"][1])
    t = math.radians(pose["angle"])
    ct, st = np.float32(math.cos(t) / pose["scale"]), np.float32(math.sin(t) / pose["scale"])
    x, y = ct * xi + st * yi, -st * xi + ct * yi
    w = FOV_CM / n
    s = {f: float(states.get(f, 0.0)) for f in FINDINGS}
    dens = (_lateral if view == "LATERAL" else _frontal)(x, y, anat, geom, s, view == "AP", w)
    img = pose["offset"] + pose["gain"] * (dens - _AIR) * (1 / 0.85)
    img = np.clip(img, 0.0, 1.0) ** np.float32(pose["gamma"])
    if noise_rng is not None and pose["noise"] > 0:
        img = img + np.float32(pose["noise"]) * noise_rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.rint(img * 255.0).astype(np.uint8)


def _markings(h, y, hx, hy, an, side_index):
    """Vessel-like streaks radiating from a hilum, fading with distance."""
    dx, dy = h - hx, y - hy
    theta = np.arctan2(dy, dx)
    acc = np.zeros_like(h)
    for k, p in zip(an["marks_k"], an["marks_phase"][side_index]):
        acc += np.cos(k * theta + p)
    r = np.sqrt(dx * dx + dy * dy)
    return 0.05 * np.clip(acc * 0.5, 0.0, 1.0) * np.exp(-r * (1 / 9.0)) + 0.01


def _lung_findings(lung: _Lung, frontal: bool, geom: dict, s: dict, w: float):
    """(air fraction, parenchyma fraction, extra density) of one lung with its findings."""
    h, y, side, an = lung.h, lung.y, lung.side, lung.an
    air = lung.mask
    paren = lung.mask
    extra = 0.0
    g = geom["pleural effusion"]
    if s["pleural effusion"] and side in g["sides"]:
        height = g["height"] * s["pleural effusion"]
        # Meniscus: the fluid rises along the chest wall (frontal) or into the posterior sulcus (lateral).
        start = lung.lo if frontal else (lung.lo + lung.hi) / 2
        t = np.clip((h - start) * (1.0 / (lung.hi - start)), 0.0, 1.0)
        surface = lung.dome + 1.0 - (height + 1.0) * t * t
        air = air * (1.0 - _soft(y - surface, 2 * w))
    g = geom["pneumothorax"]
    if s["pneumothorax"] and side in g["sides"]:
        rim_w = g["rim"] * s["pneumothorax"]
        y_mid = lung.apex + 0.6 * (lung.dome - lung.apex)
        taper = np.clip((y_mid - y) * (2.0 / (y_mid - lung.apex)), 0.0, 1.0) * rim_w
        medial_ok = np.maximum(_soft(h - (lung.lo + 0.35 * (lung.hi - lung.lo)), 1.0), _soft(lung.apex + 3 - y, 1.0))
        if not frontal:
            medial_ok = 1.0
        rim = _soft(taper - lung.dist, w) * lung.mask * medial_ok * np.clip(taper * (1.0 / w), 0.0, 1.0)
        line = _soft(0.2 - np.abs(lung.dist - taper), w) * lung.mask * medial_ok * (taper > 0.3)
        paren = paren * (1.0 - rim)
        extra = extra - 0.08 * rim + 0.12 * line
    g = geom["consolidation"]
    lobe_side, tv, tl, tap = LOBES[g["lobe"]]
    if s["consolidation"] and side == lobe_side:
        cx, cy = lung.at(tv + g["dv"], (tl if frontal else tap) + g["dl"])
        rx = g["rx"] if frontal else 0.9 * g["rx"]
        dx, dy = h - cx, y - cy
        wob = 1.0 + 0.12 * np.cos(3.0 * np.arctan2(dy, dx) + g["wobble"])
        blob = _soft(_ellipse(dx / wob, dy / wob, 0.0, 0.0, rx, g["ry"]), 0.6)
        opac = (0.85 if s["consolidation"] >= 1 else 0.45) * blob
        if g["bronchograms"] and s["consolidation"] >= 1:
            hx = lung.lo if frontal else (lung.lo + lung.hi) / 2
            tube = np.cos(11.0 * np.arctan2(y - an["hilum_y"], h - hx) + g["wobble"])
            core = _soft(_ellipse(dx, dy, 0, 0, rx, g["ry"]), 1.5)
            opac = opac * (1.0 - 0.35 * np.clip(tube * 4.0 - 3.0, 0.0, 1.0) * core)
        air = air * (1.0 - opac)
    g = geom["edema"]
    if s["edema"]:
        hx = lung.lo + (1.5 if frontal else 0.45 * (lung.hi - lung.lo))
        haze = _window_gauss(h, y, hx, an["hilum_y"], g["sx"] * (1.0 if frontal else 1.2), g["sy"])
        air = air * (1.0 - 0.75 * g["strength"] * s["edema"] * haze)
    g = geom["atelectasis"]
    if s["atelectasis"] and side in g["sides"]:
        bx = lung.lo + g["along"] * (lung.hi - lung.lo)
        band = _band(h, y, bx, lung.dome - g["above"], g["length"], g["thickness"] * (0.5 + 0.5 * s["atelectasis"]),
                     g["tilt"], w)
        air = air * (1.0 - 0.85 * s["atelectasis"] * band)
    g = geom["nodule"]
    if s["nodule"] and side in g["sides"]:
        cx, cy = lung.at(g["tv"], g["tl"] if frontal else g["tap"])
        r = g["diameter"] / 2 * (1.0 if s["nodule"] >= 1 else 0.8)
        spot = _soft(r - np.sqrt((h - cx) ** 2 + (y - cy) ** 2), w) * lung.mask
        air = air * (1.0 - (0.95 if s["nodule"] >= 1 else 0.6) * spot)
        extra = extra + 0.05 * s["nodule"] * spot
    return air, paren * air, extra


def _elevations(geom: dict, s: dict) -> dict:
    g = geom["atelectasis"]
    return {side: (g["elevation"] * s["atelectasis"] if side in g["sides"] else 0.0) for side in SIDES}


def _heart_axes(anat: dict, geom: dict, s: dict) -> tuple[float, float]:
    ctr = cardiothoracic_ratio(geom, s["cardiomegaly"])
    return ctr * anat["lung_w"], anat["heart_b"] * (1.0 + 0.8 * (ctr - 0.45))


def _frontal(x, y, an, geom, s, ap, w):
    # Neck, shoulders rounding into the chest wall.
    chest = an["lung_w"] + an["wall"]
    shoulder = np.clip((y - (an["apex"] - 7.0)) * (1 / 4.0), 0.0, 1.0)
    body_half = 6.0 + (chest + 3.0 - 6.0) * np.sqrt(shoulder) - 3.0 * np.clip((y - an["apex"]) * (1 / 8.0), 0.0, 1.0)
    dens = _AIR + _TISSUE * _soft(body_half - np.abs(x), 0.5)
    dens = dens + 0.10 * _soft(1.6 - np.abs(x), w)  # spine
    a, b = _heart_axes(an, geom, s)
    if ap:  # AP projection magnifies the heart
        a, b = 1.12 * a, 1.06 * b
    cy = an["dome"]["left"] - 0.55 * b
    heart = _soft(_ellipse(x, y, an["heart_x"], cy, a, b), w)
    dens = dens + 0.06 * heart * _soft(an["dome"]["left"] - y, 1.0)  # merges with the liver below
    trachea = _soft(0.8 - np.abs(x - 0.2), w) * _soft(an["hilum_y"] - 2.5 - y, w) * _soft(y - an["apex"] + 5.0, w)
    dens = dens - 0.22 * trachea
    bx, by, br = an["bubble"]
    dens = dens - 0.30 * _soft(_ellipse(x, y, bx, an["dome"]["left"] + by, br * 1.5, br), w)
    elev = _elevations(geom, s)
    air = np.zeros_like(x)
    for i, (side, sign) in enumerate(SIDES.items()):
        h = sign * x
        lung = _Lung(h, y, an, side, True, elev[side], w)
        a_s, p_s, e_s = _lung_findings(lung, True, geom, s, w)
        not_heart = 1.0 - heart
        air = air + a_s * not_heart
        dens = dens + (_PARENCHYMA + _markings(h, y, an["med"] + 1.0, an["hilum_y"], an, i)) * p_s * not_heart + e_s
    dens = dens - _LUCENCY * air
    # Posterior ribs (arcs dropping laterally) and the clavicles, faint over the thorax.
    ax = np.abs(x)
    phase = (y - 2.2 * (ax / an["lung_w"]) ** 2) * (1.0 / an["rib_step"]) + an["rib_phase"]
    ribs = np.clip((np.cos(2 * math.pi * phase) - 0.35) * 1.6, 0.0, 1.0)
    thorax = (_soft(an["lung_w"] + 1.0 - ax, w) * _soft(y - an["apex"] + 1.0, 1.0)
              * _soft(an["dome"]["left"] + 2.5 - y, 1.0))
    clav = (_soft(0.7 - np.abs(y - (an["apex"] + an["clavicle"] - 0.15 * ax)), w) * _soft(ax - 1.2, w)
            * _soft(an["lung_w"] - 1.0 - ax, w))
    return dens + 0.07 * ribs * thorax + 0.12 * clav


def _lateral(x, y, an, geom, s, ap, w):
    del ap
    half = an["depth"] / 2
    body_half = np.where(y < an["apex"] - 3.0, 6.5, half)
    dens = _AIR + _TISSUE * _soft(body_half - np.abs(x + np.where(y < an["apex"] - 3.0, 2.0, 0.0)), w)
    front = -half + an["wall"]
    a, b = _heart_axes(an, geom, s)
    a_lat = 0.19 * an["depth"] * a / (0.45 * an["lung_w"])
    heart = _soft(_ellipse(x, y, front + a_lat, an["dome"]["left"] - 0.55 * b, a_lat, b), w)
    dens = dens + 0.06 * heart
    back = half - an["wall"]
    disc = np.clip((np.cos(2 * math.pi * y / 3.2) - 0.8) * 5.0, 0.0, 1.0)
    dens = dens + 0.16 * _soft(1.8 - np.abs(x - (back - 3.5)), w) * (1.0 - 0.6 * disc)  # vertebral bodies
    sternum = (_soft(0.5 - np.abs(x - (front - 0.3)), w) * _soft(y - an["apex"] - 2.0, w)
               * _soft(an["dome"]["right"] - y, w))
    dens = dens + 0.10 * sternum
    carina = an["hilum_y"] - 2.5
    dens = dens - 0.20 * _soft(0.9 - np.abs(x - (-1.0 + 0.12 * (y - carina))), w) * _soft(carina - y, w)
    elev = _elevations(geom, s)
    air = np.zeros_like(x)
    for i, side in enumerate(SIDES):
        lung = _Lung(x, y, an, side, False, elev[side], w)
        a_s, p_s, e_s = _lung_findings(lung, False, geom, s, w)
        not_heart = 1.0 - heart
        air = air + 0.5 * a_s * not_heart
        mid = (lung.lo + lung.hi) / 2
        dens = dens + 0.5 * ((_PARENCHYMA + _markings(x, y, mid, an["hilum_y"], an, i)) * p_s * not_heart + e_s)
    return dens - _LUCENCY * 1.1 * air
