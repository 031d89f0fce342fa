"""Analytic abdominal anatomy for the phantom CT generator, rendered in Hounsfield units.

The body is described in patient world coordinates (NIfTI RAS+, millimetres: x grows towards the
patient's Right, y towards Anterior, z towards Superior; the liver sits at +x, the spleen at -x). Structures are ellipsoids, tubes and cylinders given
by approximate signed distances; each is painted with a partial-volume weight
`clip(0.5 - sdf / voxel, 0, 1)`, so small structures (stones, calcifications) survive coarse voxels
the way they do on a real scanner. Every one of the 30 findings has a rendering rule here that
changes the volume where a radiologist would look for it (`render_anatomy`), with the size, HU
change and count that `signs` draws for the study.

Rendering happens on a canonical RAS grid; `phantom.py` then stores the array in the study's own
orientation with the matching affine.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Tissue attenuation (HU), portal-venous phase contrast CT.
HU = dict(
    air=-1000.0, lung=-850.0, fat=-100.0, visceral_fat=-95.0, fluid=8.0, bile=10.0, muscle=50.0,
    liver=105.0, spleen=115.0, pancreas=95.0, kidney=170.0, renal_sinus=-60.0, adrenal=45.0,
    blood=160.0, myocardium=60.0, portal=170.0, ivc=140.0, bowel_wall=55.0, bowel_fluid=15.0,
    stool=-250.0, bladder=6.0, prostate=45.0, uterus=90.0, node=45.0, cancellous=260.0,
    cortical=900.0, disc=80.0, canal=20.0, calcium=750.0, stone=650.0, metal=2500.0,
    thrombus=45.0,
)


@dataclasses.dataclass
class Canvas:
    """A volume on an axis-aligned RAS grid, with 1-D world coordinates per axis."""

    xs: np.ndarray  # (nx,) mm
    ys: np.ndarray  # (ny,)
    zs: np.ndarray  # (nz,)
    vol: np.ndarray  # (nx, ny, nz) float32 HU
    voxel: float  # mm, the partial-volume blur width

    def _window(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices covering the world box [lo, hi] (plus one voxel)."""
        out = []
        for c, a, b in zip((self.xs, self.ys, self.zs), lo, hi):
            i0 = int(np.searchsorted(c, a - self.voxel, side="left"))
            i1 = int(np.searchsorted(c, b + self.voxel, side="right"))
            out.append(slice(i0, i1))
        return tuple(out)

    def paint(self, sdf: Callable, lo, hi, value, where: Callable | None = None) -> None:
        """Blend `value` into the box [lo, hi] with weight clip(0.5 - sdf/voxel, 0, 1).

        `sdf(X, Y, Z)` gets broadcastable coordinate arrays of the box; `value` is a number or a
        callable of (X, Y, Z, current) giving HU; `where(current)` limits painting to some tissue.
        """
        win = self._window(np.asarray(lo, float), np.asarray(hi, float))
        if any(s.start >= s.stop for s in win):
            return
        X = self.xs[win[0]][:, None, None]
        Y = self.ys[win[1]][None, :, None]
        Z = self.zs[win[2]][None, None, :]
        cur = self.vol[win]
        alpha = np.clip(0.5 - sdf(X, Y, Z) / self.voxel, 0.0, 1.0).astype(np.float32)
        if where is not None:
            alpha = alpha * where(cur)
        if not alpha.any():
            return
        val = value(X, Y, Z, cur) if callable(value) else np.float32(value)
        self.vol[win] = cur + alpha * (val - cur)

    # Shapes -------------------------------------------------------------------------------------
    def ellipsoid(self, c, r, value, where=None) -> None:
        c = np.asarray(c, float)
        r = np.asarray(r, float)
        self.paint(lambda X, Y, Z: ellipsoid_sdf(X, Y, Z, c, r), c - r, c + r, value, where)

    def tube(self, p0, p1, radius: float, value, where=None) -> None:
        p0 = np.asarray(p0, float)
        p1 = np.asarray(p1, float)
        lo = np.minimum(p0, p1) - radius
        hi = np.maximum(p0, p1) + radius
        self.paint(lambda X, Y, Z: segment_sdf(X, Y, Z, p0, p1) - radius, lo, hi, value, where)

    def polyline(self, points, radius: float, value, where=None) -> None:
        for a, b in zip(points[:-1], points[1:]):
            self.tube(a, b, radius, value, where)

    def cylinder_z(self, cx, cy, rx, ry, z0, z1, value, where=None) -> None:
        """Elliptic cylinder along z between z0 and z1."""

        def sdf(X, Y, Z):
            radial = ellipse_sdf(X, Y, cx, cy, rx, ry)
            axial = np.maximum(z0 - Z, Z - z1)
            return np.maximum(radial, axial)

        self.paint(sdf, (cx - rx, cy - ry, z0), (cx + rx, cy + ry, z1), value, where)


def ellipse_sdf(X, Y, cx, cy, rx, ry):
    q = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return (q - 1.0) * min(rx, ry)


def ellipsoid_sdf(X, Y, Z, c, r):
    q = np.sqrt(((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2)
    return (q - 1.0) * r.min()


def segment_sdf(X, Y, Z, p0, p1):
    d = p1 - p0
    L2 = float(d @ d) or 1.0
    t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / L2, 0.0, 1.0)
    return np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2)


def _is_fat(cur):
    return (cur < -40.0) & (cur > -300.0)


def _is_soft(cur):
    return cur > -300.0


# --------------------------------------------------------------------------------------------
# Anatomy parameters: drawn once per study, independent of its findings, so that toggling a
# finding changes only what that finding changes.
# --------------------------------------------------------------------------------------------
def sample_anatomy(rng: np.random.Generator, sex: str) -> dict:
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731  (jitter, mm)
    k = lambda lo=0.92, hi=1.08: float(rng.uniform(lo, hi))  # noqa: E731  (scale)
    zd = float(rng.uniform(95.0, 125.0))  # diaphragm dome height
    body = dict(rx=float(rng.uniform(135, 170)), ry=float(rng.uniform(100, 125)), cy=-5.0 + j(4),
                fat=float(rng.uniform(12, 32)), wall=float(rng.uniform(8, 13)))
    return dict(
        sex=sex, zd=zd, body=body, noise=float(rng.uniform(8.0, 16.0)),
        spine=dict(cy=-body["ry"] + 48 + j(3), r=17.0 * k(), level_phase=float(rng.uniform(0, 32))),
        liver=dict(c=(72 + j(5), 8 + j(5), zd - 45 + j(5)), r=(80 * k(), 90 * k(), 75 * k())),
        gallbladder=dict(c=(52 + j(4), 42 + j(4), zd - 105 + j(5)), r=(17 * k(), 19 * k(), 32 * k())),
        spleen=dict(c=(-88 + j(4), -42 + j(4), zd - 40 + j(5)), r=(32 * k(), 48 * k(), 48 * k())),
        stomach=dict(c=(-45 + j(5), 32 + j(5), zd - 38 + j(5)), r=(42 * k(), 34 * k(), 42 * k())),
        pancreas=dict(z=zd - 95 + j(4), r=13.0 * k()),
        kidneys=dict(z=zd - 125 + j(5), dz_left=float(rng.uniform(5, 15)), r=(27 * k(), 26 * k(), 52 * k())),
        heart=dict(c=(-22 + j(4), 35 + j(4), zd + 55 + j(4)), r=(62 * k(), 48 * k(), 52 * k())),
        aorta=dict(cx=-14 + j(2), r=11.5 * k(), bif=zd - 215 + j(6)),
        bowel_loops=[(float(rng.uniform(-65, 65)), float(rng.uniform(-5, 55)),
                      float(rng.uniform(-100, -15)), float(rng.uniform(0, np.pi))) for _ in range(9)],
        bladder=dict(c=(0 + j(3), 28 + j(4), -158 + j(5)), r=(40 * k(), 34 * k(), 28 * k())),
        nodes=[(float(rng.uniform(-35, 15)), float(rng.uniform(-45, 20)), float(rng.uniform(-90, 0)))
               for _ in range(4)],
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_anatomy(canvas: Canvas, a: dict, pos: dict, fp: dict) -> None:
    """Paint the whole abdomen into `canvas` (HU). `pos` maps finding -> True for positives;
    `fp` holds each finding's geometric parameters (drawn whether or not it is positive)."""
    P = pos.get
    zd = a["zd"]
    b = a["body"]
    rx, ry, cy = b["rx"], b["ry"], b["cy"]
    zlo, zhi = canvas.zs[0] - 20, canvas.zs[-1] + 20
    fat = b["fat"] + (fp["anasarca"]["thickness"] if P("anasarca") else 0.0)

    # Body wall: skin/subcutaneous fat, muscle, then the visceral cavity.
    canvas.cylinder_z(0, cy, rx, ry, zlo, zhi, HU["fat"])
    if P("anasarca"):  # subcutaneous oedema: stranding raises fat attenuation in a reticular pattern
        phase = fp["anasarca"]["phase"]
        canvas.cylinder_z(0, cy, rx, ry, zlo, zhi,
                          lambda X, Y, Z, cur: HU["fat"] + fp["anasarca"]["hu"]
                          + 30.0 * np.sin(X / 6.0 + phase) * np.cos(Y / 7.0 + Z / 9.0))
    canvas.cylinder_z(0, cy, rx - fat, ry - fat, zlo, zhi, HU["muscle"])
    irx, iry = rx - fat - b["wall"], ry - fat - b["wall"]
    canvas.cylinder_z(0, cy, irx, iry, zlo, zhi, HU["visceral_fat"])

    # Thorax above the diaphragm: lungs and mediastinum.
    lung_c = [(s * irx * 0.52, cy - iry * 0.12, zd + 130) for s in (1, -1)]
    lung_r = (irx * 0.46, iry * 0.78, 150.0)
    for c in lung_c:
        dome = lambda X, Y, Z, c=c: (zd + 12 - 14 * (1 - ((X - c[0]) / lung_r[0]) ** 2)) - Z  # noqa: E731
        canvas.paint(lambda X, Y, Z, c=c, dome=dome: np.maximum(
            ellipsoid_sdf(X, Y, Z, np.asarray(c), np.asarray(lung_r)), dome(X, Y, Z)),
            np.asarray(c) - lung_r, np.asarray(c) + lung_r, HU["lung"])
    if P("pleural effusion"):  # dependent fluid crescent at the posterior lung bases
        for side in fp["pleural effusion"]["sides"]:
            c = lung_c[0 if side == "right" else 1]
            depth = fp["pleural effusion"]["depth"]
            canvas.paint(lambda X, Y, Z, c=c: np.maximum(
                ellipsoid_sdf(X, Y, Z, np.asarray(c), np.asarray(lung_r)),
                np.maximum(Y - (c[1] - lung_r[1] + depth), Z - (zd + 90 + max(0.0, depth - 55.0)))),
                np.asarray(c) - lung_r, np.asarray(c) + lung_r, HU["lung"] + fp["pleural effusion"]["hu"],
                where=lambda cur: (cur < -500).astype(np.float32))
    if P("atelectasis"):  # plate-like collapsed lung at the bases
        for side in fp["atelectasis"]["sides"]:
            c = lung_c[0 if side == "right" else 1]
            zz = zd + fp["atelectasis"]["height"]
            canvas.ellipsoid((c[0], c[1] - 10, zz + fp["atelectasis"]["half"] - 9.0),
                             (lung_r[0] * 0.8, lung_r[1] * 0.55, fp["atelectasis"]["half"]),
                             HU["lung"] + fp["atelectasis"]["hu"],
                             where=lambda cur: (cur < -500).astype(np.float32))

    heart_r = np.asarray(a["heart"]["r"]) + (fp["cardiomegaly"]["growth"] if P("cardiomegaly") else 0.0)
    hc = np.asarray(a["heart"]["c"])
    canvas.ellipsoid(hc, heart_r + 6, HU["fat"])  # pericardial fat
    canvas.ellipsoid(hc, heart_r, HU["myocardium"])
    canvas.ellipsoid(hc + (0, 0, 5), heart_r * 0.7, HU["blood"])
    if P("coronary calcification"):
        for th, ph, rad in fp["coronary calcification"]["spots"]:  # on the anterior/left heart surface
            p = hc + heart_r * np.array([np.cos(th) * np.sin(ph), abs(np.sin(th)) * np.sin(ph), np.cos(ph)])
            canvas.ellipsoid(p, (rad, rad, rad), HU["myocardium"] + fp["coronary calcification"]["hu"])
    if P("aortic valve calcification"):  # aortic root, superior-medial heart
        av = fp["aortic valve calcification"]
        for ang in av["nodules"]:  # around the aortic root, superior-medial
            p = hc + (12 + 0.5 * heart_r[0] * np.cos(ang), 0.5 * heart_r[1] * np.sin(ang), -heart_r[2] * 0.1)
            canvas.ellipsoid(p, (av["radius"],) * 2 + (av["radius"] * 0.9,), HU["blood"] + av["hu"])

    # Hiatal hernia: stomach above the diaphragm, between the lung bases.
    st = a["stomach"]
    if P("hiatal hernia"):
        hh = fp["hiatal hernia"]["size"]
        canvas.ellipsoid((-8, cy - iry * 0.3, zd + 30), (hh, hh, hh * 1.1), HU["bowel_wall"])
        canvas.ellipsoid((-8, cy - iry * 0.3, zd + 32), (hh - 5, hh - 5, hh * 1.1 - 5), -700.0)

    # Diaphragm boundary: everything below zd that is not organ remains visceral fat.
    # Liver (with hepatomegaly extending caudally).
    lv = a["liver"]
    lc, lr = np.asarray(lv["c"]), np.asarray(lv["r"])
    if P("hepatomegaly"):
        growth = fp["hepatomegaly"]["growth"]
        lr = lr * np.array([1.12, 1.08, 1.0]) + (0, 0, growth / 2)
        lc = lc + (0, 0, -0.9 * growth / 2)
    liver_hu = HU["liver"] - (fp["hepatic steatosis"]["drop"] if P("hepatic steatosis") else 0.0)
    if P("ascites"):  # perihepatic, paracolic and pelvic fluid (painted before organs)
        canvas.cylinder_z(0, cy, irx, iry, -195, zd - 5, HU["visceral_fat"] + fp["ascites"]["hu"],
                          where=_as_weight(_is_fat))
        canvas.cylinder_z(0, cy + iry * 0.1, irx * 0.72, iry * 0.62, -195, zd - 5, HU["visceral_fat"])
    canvas.ellipsoid(lc, lr, liver_hu)
    canvas.ellipsoid(lc + (-30, 5, -20), (8, 8, 25), HU["portal"])  # hepatic/portal vessels
    if P("biliary ductal dilation"):
        hilum = lc + (-45, 10, -25)
        bd = fp["biliary ductal dilation"]
        for d in bd["branches"]:
            canvas.tube(hilum, hilum + np.asarray(d) * max(1.0, bd["radius"] / 6.0), bd["radius"], liver_hu + bd["hu"])
        canvas.tube(hilum, (25, 18, a["pancreas"]["z"] - 5), bd["radius"] + 0.5, liver_hu + bd["hu"])  # common duct
    if P("metastatic disease"):
        for (u, rad) in fp["metastatic disease"]["lesions"]:
            p = lc + np.asarray(u) * lr * 0.6
            canvas.ellipsoid(p, (rad + 3,) * 3, 75.0)  # enhancing rim
            canvas.ellipsoid(p, (rad,) * 3, HU["liver"] + fp["metastatic disease"]["hu"])

    # Gallbladder, stones, or surgical absence (clips in the fossa).
    gb = a["gallbladder"]
    gc, gr = np.asarray(gb["c"]), np.asarray(gb["r"])
    if P("surgically absent gallbladder"):
        canvas.ellipsoid(gc, gr, HU["visceral_fat"])
        sg = fp["surgically absent gallbladder"]
        for off in sg["clips"]:
            canvas.ellipsoid(gc + np.asarray(off), (sg["radius"],) * 3, HU["visceral_fat"] + sg["hu"])
    else:
        if P("gallstones"):  # a gallbladder packed with stones is distended around them
            gr = gr + max(0.0, max(r for _, r in fp["gallstones"]["stones"]) - 8.0)
        canvas.ellipsoid(gc, gr + 2.5, HU["bowel_wall"])
        canvas.ellipsoid(gc, gr, HU["bile"])
        if P("gallstones"):
            for (off, rad) in fp["gallstones"]["stones"]:
                canvas.ellipsoid(gc + np.asarray(off) * gr, (rad,) * 3, HU["bile"] + fp["gallstones"]["hu"])

    # Spleen.
    sp = a["spleen"]
    sc, sr = np.asarray(sp["c"]), np.asarray(sp["r"])
    if P("splenomegaly"):
        growth = fp["splenomegaly"]["growth"]
        sr = sr * np.array([1.45, 1.35, 1.0]) + (0, 0, growth / 2)
        sc = sc + (8, 15, -0.3 * growth)
    canvas.ellipsoid(sc, sr, HU["spleen"])

    # Stomach below the diaphragm (fluid with an anterior air cap).
    scn = np.asarray(st["c"])
    canvas.ellipsoid(scn, np.asarray(st["r"]) + 4, HU["bowel_wall"])
    canvas.ellipsoid(scn, st["r"], HU["bowel_fluid"])
    canvas.ellipsoid(scn + (0, st["r"][1] * 0.55, 0), (st["r"][0] * 0.7, st["r"][1] * 0.35, st["r"][2] * 0.6), -950.0)

    # Pancreas: head near the duodenum, tail towards the splenic hilum.
    pz = a["pancreas"]["z"]
    pr = fp["pancreatic atrophy"]["radius"] if P("pancreatic atrophy") else a["pancreas"]["r"]
    p_hu = HU["pancreas"] + (fp["pancreatic atrophy"]["hu"] if P("pancreatic atrophy") else 0.0)
    canvas.polyline([(28, 12, pz - 6), (0, 8, pz), (-40, -5, pz + 8), (-72, -18, pz + 16)], pr, p_hu)

    # Kidneys, adrenals, collecting systems.
    kd = a["kidneys"]
    kr = np.asarray(kd["r"])
    for side, sx in (("right", 1.0), ("left", -1.0)):
        kc = np.array([sx * 72.0, cy - iry * 0.45, kd["z"] + (kd["dz_left"] if sx < 0 else 0.0)])
        hydro = P("hydronephrosis") and side in fp["hydronephrosis"]["sides"]
        hr = fp["hydronephrosis"]["radius"]
        krs = kr * (1.15 if hydro else 1.0) + (hr - 7.0 if hydro else 0.0)
        canvas.tube(kc + (0, 0, krs[2] + 14), kc + (-sx * 10, 4, krs[2] + 30), 3.5, HU["adrenal"])
        canvas.ellipsoid(kc, krs, HU["kidney"])
        sinus_c = kc + (-sx * 12, 4, 0)
        if hydro:
            fluid = HU["kidney"] + fp["hydronephrosis"]["hu"]
            canvas.ellipsoid(sinus_c, (10 + hr, 10 + hr, 29 + hr), fluid)
            canvas.tube(sinus_c, (sx * 45, cy - iry * 0.35, -120), hr, fluid)  # dilated ureter
        else:
            canvas.ellipsoid(sinus_c, (9, 10, 28), HU["renal_sinus"])
        rc = fp["renal cyst"]
        if P("renal cyst") and (side == rc["side"] or rc["both"]):
            u = np.asarray(rc["pos"]) * ((1.0, 1.0, 1.0) if side == rc["side"] else (1.0, 1.0, -1.0))
            canvas.ellipsoid(kc + u * krs, (rc["radius"],) * 3, HU["kidney"] + rc["hu"])
        if P("renal hypodensities"):
            for (u, rad) in fp["renal hypodensities"]["lesions"][side]:
                canvas.ellipsoid(kc + np.asarray(u) * krs * 0.6, (rad,) * 3,
                                 HU["kidney"] + fp["renal hypodensities"]["hu"])

    # Vessels: aorta (aneurysm, calcified plaques, iliac arteries), IVC, portal vein.
    ao = a["aorta"]
    acx, acy, ar = ao["cx"], a["spine"]["cy"] + a["spine"]["r"] + ao["r"] + 4, ao["r"]
    bif = ao["bif"]
    canvas.cylinder_z(acx, acy, ar + 1.5, ar + 1.5, bif, zd + 80, HU["muscle"])
    canvas.cylinder_z(acx, acy, ar, ar, bif, zd + 80, HU["blood"])
    if P("abdominal aortic aneurysm"):
        rad = fp["abdominal aortic aneurysm"]["radius"]
        z0, z1 = bif + 8, kd["z"] - 20
        canvas.cylinder_z(acx, acy + rad - ar, rad, rad, z0, z1,
                          HU["blood"] + fp["abdominal aortic aneurysm"]["hu"])  # mural thrombus
        canvas.cylinder_z(acx, acy + rad - ar, rad * 0.55, rad * 0.55, z0, z1, HU["blood"])
    iliac_ends = [(55.0, cy - 10, -205.0), (-80.0, cy - 10, -205.0)]
    for e in iliac_ends:
        canvas.tube((acx, acy, bif), e, 7.0, HU["blood"])
    ivc_x = acx + 40.0
    canvas.cylinder_z(ivc_x, acy - 2, 13, 11, -110, zd + 10, HU["ivc"])
    pv0, pv1 = np.array([8.0, 10.0, pz + 2]), lc + (-35, 5, -25)
    canvas.tube(pv0, pv1, 7.5, HU["portal"])
    if P("thrombosis"):
        th = fp["thrombosis"]
        where, rad, clot = th["vessel"], th["radius"], HU["blood"] + th["hu"]
        if where == "portal vein":  # the clot distends the vein over most of its length
            canvas.tube(pv0 + 0.25 * (pv1 - pv0), pv0 + 0.85 * (pv1 - pv0), rad, clot)
        elif where == "inferior vena cava":
            canvas.cylinder_z(ivc_x, acy - 2, rad * 1.15, rad, kd["z"] - 40 - rad, kd["z"] + 10 + rad, clot)
        else:  # left common iliac vein alongside the artery
            canvas.tube((acx - 5, acy - 10, bif - 5), (-70.0, cy - 18, -190.0), rad, clot)
    if P("atherosclerosis"):
        for (th, zf, rad) in fp["atherosclerosis"]["plaques"]:
            if zf < 0.75:
                z = bif + zf / 0.75 * (zd + 40 - bif)
                p = (acx + ar * np.cos(th), acy + ar * np.sin(th), z)
            else:  # iliac plaque
                e = iliac_ends[int(th > np.pi)]
                t = (zf - 0.75) * 3.0
                p = (acx + t * (e[0] - acx), acy + t * (e[1] - acy), bif + t * (e[2] - bif))
            canvas.ellipsoid(p, (rad, rad, rad * 1.1), HU["blood"] + fp["atherosclerosis"]["hu"])

    # Bowel: colon frame, small-bowel loops, appendix.
    obstruct = P("bowel obstruction")
    edema = P("submucosal edema")
    col_r = 10.0 if obstruct else 20.0
    wall = fp["submucosal edema"]["wall"] if edema else 3.0
    submucosa = HU["bowel_wall"] + fp["submucosal edema"]["hu"]
    colon = [(100, 5, -105), (100, 5, -5), (60, 55, 10), (-60, 55, 10), (-100, 5, 0), (-100, 5, -110),
             (-40, -10, -135), (0, -45, -160)]
    canvas.polyline(colon, col_r + wall, HU["bowel_wall"])
    if edema:  # target sign: low-attenuation submucosa between mucosa and serosa
        canvas.polyline(colon, col_r + wall - 2.5, submucosa)
        canvas.polyline(colon, col_r + 1.5, HU["bowel_wall"] + 40)
    canvas.polyline(colon, col_r, HU["stool"])
    sb_r = fp["bowel obstruction"]["radius"] if obstruct else 11.0
    for (x, y, z, th) in a["bowel_loops"]:
        d = np.array([np.cos(th), np.sin(th) * 0.4, 0.35]) * 28
        p0, p1 = np.array([x, y, z]) - d, np.array([x, y, z]) + d
        canvas.tube(p0, p1, sb_r + (3.0 if not edema else wall - 1.0), HU["bowel_wall"])
        if edema:
            canvas.tube(p0, p1, sb_r + wall - 3.5, submucosa)
        canvas.tube(p0, p1, sb_r, HU["bowel_fluid"])
        if obstruct:  # air-fluid level in dilated loops: air in the non-dependent (anterior) part
            canvas.paint(lambda X, Y, Z, p0=p0, p1=p1: np.maximum(segment_sdf(X, Y, Z, p0, p1) - sb_r,
                                                                   (max(p0[1], p1[1]) + 4) - Y),
                         np.minimum(p0, p1) - sb_r, np.maximum(p0, p1) + sb_r, -950.0)
    app0 = np.array([92.0, 0.0, -112.0])
    app1 = app0 + np.asarray(fp["appendicitis"]["dir"]) * 60.0
    if P("appendicitis"):
        ap = fp["appendicitis"]
        stranding = HU["visceral_fat"] + ap["hu"]
        canvas.tube(app0, app1, ap["radius"], lambda X, Y, Z, cur: np.maximum(cur, stranding),
                    where=_as_weight(_is_fat))
        canvas.tube(app0, app1, ap["radius"] * 0.38, 70.0)
        canvas.tube(app0, app1, ap["radius"] * 0.19, 20.0)
    else:
        canvas.tube(app0, app1, 4.0, HU["bowel_wall"])

    # Lymph nodes (normal small ones; enlarged in lymphadenopathy).
    for n in a["nodes"]:
        canvas.ellipsoid(n, (4.0, 4.0, 5.0), HU["node"])
    if P("lymphadenopathy"):
        for (p, rad) in fp["lymphadenopathy"]["nodes"]:
            canvas.ellipsoid(p, (rad, rad, rad * 1.2), HU["visceral_fat"] + fp["lymphadenopathy"]["hu"])

    # Pelvis: bladder, prostate or uterus.
    bl = a["bladder"]
    bc = np.asarray(bl["c"])
    canvas.ellipsoid(bc, np.asarray(bl["r"]) + 3, HU["bowel_wall"])
    canvas.ellipsoid(bc, bl["r"], HU["bladder"])
    if a["sex"] == "M":
        if P("prostatomegaly"):  # the enlarged gland rises into the bladder base
            pm = fp["prostatomegaly"]
            pr_r = pm["radius"]
            canvas.ellipsoid(bc + (0, -12, -bl["r"][2] - 17.0 * 0.6 + pr_r * 0.5), (pr_r, pr_r * 0.9, pr_r),
                             HU["prostate"] + pm["hu"])
        else:
            canvas.ellipsoid(bc + (0, -12, -bl["r"][2] - 17.0 * 0.6), (17.0, 15.3, 17.0), HU["prostate"])
    else:
        canvas.ellipsoid(bc + (0, -45, 5), (32, 24, 38), HU["uterus"])

    # Free air rises to the non-dependent peritoneum, under the anterior wall.
    if P("free air"):
        for (x, z, rad) in fp["free air"]["pockets"]:  # rad: half the drawn diameter
            canvas.ellipsoid((x, cy + iry - rad * 0.35 - 2, z), (rad * 1.6, rad * 0.45, rad), HU["air"])

    # Skeleton: vertebral column (bodies, discs, canal), ribs, iliac wings.
    render_skeleton(canvas, a, pos, fp)


def _as_weight(pred):
    return lambda cur: pred(cur).astype(np.float32)


def render_skeleton(canvas: Canvas, a: dict, pos: dict, fp: dict) -> None:
    osteo = bool(pos.get("osteopenia"))
    cort = 480.0 if osteo else HU["cortical"]
    canc = HU["cancellous"] + fp["osteopenia"]["hu"] if osteo else HU["cancellous"]
    b = a["body"]
    sp = a["spine"]
    cy, r = sp["cy"], sp["r"]
    zlo, zhi = canvas.zs[0] - 20, canvas.zs[-1] + 20
    canvas.cylinder_z(0, cy, r, r, zlo, zhi, cort)
    canvas.cylinder_z(0, cy, r - 4, r - 4, zlo, zhi, canc)
    # Posterior elements and canal.
    canvas.cylinder_z(0, cy - r - 14, 16, 10, zlo, zhi, cort)
    canvas.cylinder_z(0, cy - r - 8, 7, 6, zlo, zhi, HU["canal"])
    # Discs every 32 mm.
    period, phase = 32.0, sp["level_phase"]
    z = zlo + phase
    while z < zhi:
        canvas.cylinder_z(0, cy, r - 0.5, r - 0.5, z - 3.5, z + 3.5, HU["disc"])
        z += period
    if pos.get("fracture"):  # compression fracture: loss of height, fracture cleft and sclerosis
        half = fp["fracture"]["half"]
        for zf in fp["fracture"]["levels"]:
            canvas.cylinder_z(0, cy, r + 2, r + 2, zf - half * 2 / 3, zf + half * 2 / 3, HU["disc"])
            cleft = r * 0.6 if half < 12 else r - 3  # a large cleft spans the vertebral body
            canvas.cylinder_z(0, cy + r - cleft, cleft, cleft, zf - half, zf + half,
                              HU["cancellous"] + fp["fracture"]["hu"])
            canvas.cylinder_z(0, cy, r, r, zf + half * 2 / 3, zf + half * 2 / 3 + 5, 1100.0)
    # Ribs in the upper abdomen and lower thorax (periodic bands in the body wall).
    rib_r0 = b["rx"] - b["fat"] - b["wall"] * 0.5
    rib_r1 = b["ry"] - b["fat"] - b["wall"] * 0.5
    for zr in np.arange(a["zd"] - 100, canvas.zs[-1], 26.0):
        canvas.paint(lambda X, Y, Z, zr=zr: np.maximum(
            np.abs(ellipse_sdf(X, Y, 0.0, b["cy"], rib_r0, rib_r1)) - 4.0, np.abs(Z - zr) - 4.5),
            (-rib_r0 - 6, b["cy"] - rib_r1 - 6, zr - 6), (rib_r0 + 6, b["cy"] + rib_r1 + 6, zr + 6),
            lambda X, Y, Z, cur: np.where(Y > b["cy"] + rib_r1 * 0.55, cur, cort))
    # Iliac wings and femoral heads low in the pelvis.
    for sx in (1.0, -1.0):
        canvas.ellipsoid((sx * 95, cy + 15, -150), (22, 45, 40), cort)
        canvas.ellipsoid((sx * 95, cy + 15, -150), (16, 39, 34), canc)
        canvas.ellipsoid((sx * 85, cy + 55, -205), (22, 22, 22), cort)
        canvas.ellipsoid((sx * 85, cy + 55, -205), (17, 17, 17), canc)
