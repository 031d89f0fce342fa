"""Report language for the phantom generator: per-finding positive paraphrases and negations,
normal sentences per organ section, header styles and the impression.

A positive finding (label 1) is always described in its organ section; a finding labelled 0 is
explicitly negated there; a finding labelled -1 is not mentioned at all (as in Merlin's regex-derived
labels). Phrases are written in the register of real abdominal CT reports, with paraphrases so that a
model has to learn the concept, not one string.
"""

from __future__ import annotations

import numpy as np

from vljax.data.findings import (FINDING_SECTION, FINDINGS, HEADER_TO_SECTION, SECTION_FINDINGS, SECTIONS,
                                 normalize_header)
from vljax.data.phantom.signs import THROMBOSIS_VESSELS

# {finding: (positive templates, negative templates)}; "{side}" / "{sev}" / "{level}" / "{vessel}"
# are filled from the finding's parameters.
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pleural effusion": (("{sev} {side} pleural effusion.", "There is a {sev} {side} pleural effusion.",
                          "{Side} pleural fluid collection, {sev}."),
                         ("No pleural effusion.", "No pleural effusions.", "There is no pleural fluid.")),
    "atelectasis": (("{Side} basilar atelectasis.", "Dependent atelectasis at the {side} lung base.",
                     "Plate-like atelectasis in the {side} lower lobe."),
                    ("No atelectasis.", "No focal atelectasis or consolidation.")),
    "cardiomegaly": (("Cardiomegaly.", "The heart is enlarged.", "Mild cardiomegaly is noted."),
                     ("Heart size is normal.", "No cardiomegaly.", "The heart is normal in size.")),
    "coronary calcification": (("Coronary artery calcifications.", "Calcification of the coronary arteries.",
                                "Coronary arterial calcifications are present."),
                               ("No coronary artery calcification.", "No coronary calcifications.")),
    "aortic valve calcification": (("Aortic valve calcification.", "Calcification of the aortic valve leaflets.",
                                    "Calcified aortic valve."),
                                   ("No aortic valve calcification.",)),
    "hepatomegaly": (("Hepatomegaly.", "The liver is enlarged, measuring {size} cm craniocaudally.",
                      "Enlarged liver."),
                     ("The liver is normal in size.", "No hepatomegaly.")),
    "hepatic steatosis": (("Hepatic steatosis.", "Diffuse fatty infiltration of the liver.",
                           "Diffusely decreased hepatic attenuation consistent with steatosis."),
                          ("No hepatic steatosis.", "Normal hepatic attenuation without steatosis.")),
    "biliary ductal dilation": (("Intrahepatic and extrahepatic biliary ductal dilation.",
                                 "Dilated common bile duct with intrahepatic biliary dilatation.",
                                 "Biliary ductal dilation."),
                                ("No biliary ductal dilation.", "No intrahepatic or extrahepatic biliary dilatation.")),
    "metastatic disease": (("Multiple hypoattenuating hepatic lesions compatible with metastatic disease.",
                            "Numerous liver metastases.", "Hepatic metastatic disease with several rim-enhancing lesions."),
                           ("No evidence of metastatic disease.", "No suspicious hepatic lesions to suggest metastases.")),
    "gallstones": (("Cholelithiasis.", "Gallstones within the gallbladder.", "Several dependent gallstones."),
                   ("No gallstones.", "No cholelithiasis.", "No radiopaque gallstones.")),
    "surgically absent gallbladder": (("Surgically absent gallbladder.", "Status post cholecystectomy.",
                                       "The gallbladder has been removed; surgical clips in the fossa."),
                                      ("The gallbladder is present.", "Gallbladder is in place.")),
    "splenomegaly": (("Splenomegaly, measuring {size} cm.", "The spleen is enlarged.", "{Sev} splenomegaly."),
                     ("No splenomegaly.", "The spleen is normal in size.")),
    "pancreatic atrophy": (("Pancreatic atrophy.", "Diffuse fatty atrophy of the pancreas.",
                            "The pancreas is atrophic."),
                           ("No pancreatic atrophy.", "Normal pancreatic bulk without atrophy.")),
    "renal cyst": (("Simple {side} renal cyst measuring {size} cm.", "{Side} renal cyst.",
                    "Exophytic cyst of the {side} kidney."),
                   ("No renal cyst.", "No renal cysts.")),
    "renal hypodensities": (("Several subcentimeter renal hypodensities, too small to characterize.",
                             "Bilateral renal hypodensities.", "Small hypodense renal lesions."),
                            ("No renal hypodensities.", "No focal renal lesions.")),
    "hydronephrosis": (("{Sev} {side} hydronephrosis.", "{Side} hydroureteronephrosis.",
                        "Dilated {side} renal collecting system consistent with hydronephrosis."),
                       ("No hydronephrosis.", "No hydronephrosis or hydroureter.")),
    "bowel obstruction": (("Dilated fluid-filled small bowel loops with air-fluid levels, consistent with "
                           "small bowel obstruction.", "Small bowel obstruction.",
                           "Findings of bowel obstruction with decompressed colon."),
                          ("No bowel obstruction.", "No evidence of bowel obstruction.")),
    "appendicitis": (("Dilated thick-walled appendix with periappendiceal fat stranding, compatible with "
                      "acute appendicitis.", "Acute appendicitis.", "Findings of appendicitis."),
                     ("No appendicitis.", "Normal appendix.", "No evidence of appendicitis.")),
    "submucosal edema": (("Diffuse bowel wall thickening with submucosal edema.",
                          "Submucosal edema of the colon.", "Target appearance of bowel wall from submucosal edema."),
                         ("No submucosal edema.", "No bowel wall thickening.")),
    "hiatal hernia": (("{Sev} hiatal hernia.", "Hiatal hernia.", "A hiatal hernia is present."),
                      ("No hiatal hernia.",)),
    "ascites": (("{Sev} ascites.", "Ascites throughout the abdomen and pelvis.", "Free fluid consistent with ascites."),
                ("No ascites.", "No free fluid.", "No ascites or free fluid.")),
    "free air": (("Free intraperitoneal air.", "Pneumoperitoneum.", "Foci of free air beneath the anterior abdominal wall."),
                 ("No free air.", "No pneumoperitoneum.", "No free intraperitoneal air.")),
    "anasarca": (("Anasarca.", "Diffuse subcutaneous edema consistent with anasarca.",
                  "Body wall edema in keeping with anasarca."),
                 ("No anasarca.", "No body wall edema.")),
    "prostatomegaly": (("Prostatomegaly.", "The prostate is enlarged.", "Enlarged prostate gland measuring {size} cm."),
                       ("No prostatomegaly.", "The prostate is normal in size.")),
    "atherosclerosis": (("Atherosclerosis of the abdominal aorta and iliac arteries.",
                         "Moderate aortoiliac atherosclerotic calcification.", "Atherosclerotic disease."),
                        ("No atherosclerosis.", "No significant atherosclerotic calcification.")),
    "abdominal aortic aneurysm": (("Infrarenal abdominal aortic aneurysm measuring {size} cm.",
                                   "Abdominal aortic aneurysm with mural thrombus.", "Aneurysmal dilation of the abdominal aorta."),
                                  ("No abdominal aortic aneurysm.", "Normal caliber abdominal aorta.")),
    "thrombosis": (("Thrombosis of the {vessel}.", "Filling defect in the {vessel} consistent with thrombus.",
                    "{Vessel} thrombosis."),
                   ("No thrombosis.", "No venous thrombosis.", "Patent vessels without thrombus.")),
    "lymphadenopathy": (("Retroperitoneal and mesenteric lymphadenopathy.", "Enlarged lymph nodes, the largest "
                         "measuring {size} cm.", "Lymphadenopathy."),
                        ("No lymphadenopathy.", "No enlarged lymph nodes.", "No pathologically enlarged lymph nodes.")),
    "osteopenia": (("Osteopenia.", "Diffuse osteopenia.", "Diffusely decreased bone mineral density."),
                   ("No osteopenia.", "Normal bone mineralization.")),
    "fracture": (("Compression fracture of the {level} vertebral body.", "Acute {level} compression fracture.",
                  "Fracture of the {level} vertebral body with loss of height."),
                 ("No fracture.", "No acute fracture.", "No acute osseous abnormality or fracture.")),
}

# Sentences for a section with no positive finding (before its explicit negations).
NORMAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "lower_thorax": ("The visualized lung bases are clear.", "Lung bases are clear.", "Normal."),
    "liver": ("The liver is unremarkable.", "Normal.", "No focal hepatic lesion."),
    "gallbladder": ("Unremarkable gallbladder.", "Normal.", "The gallbladder is normally distended."),
    "spleen": ("Normal.", "The spleen is unremarkable.", "Unremarkable."),
    "pancreas": ("Normal.", "The pancreas is unremarkable.", "No pancreatic ductal dilation or mass."),
    "adrenal_glands": ("Normal.", "The adrenal glands are unremarkable.", "No adrenal nodule."),
    "kidneys": ("Symmetric renal enhancement.", "The kidneys are unremarkable.", "Normal."),
    "bowel": ("Normal caliber bowel.", "The stomach and bowel are unremarkable.", "Normal."),
    "peritoneum": ("Unremarkable.", "Normal.", "No peritoneal abnormality."),
    "pelvic": ("The bladder is unremarkable.", "Normal.", "Unremarkable pelvic organs."),
    "circulatory": ("The aorta and its branches are unremarkable.", "Vessels are patent.", "Normal."),
    "lymph_nodes": ("No pathologically enlarged lymph nodes by CT size criteria.", "Normal.", "Unremarkable."),
    "musculoskeletal": ("No suspicious osseous lesions.", "Mild degenerative changes of the spine.", "Normal."),
}
OTHERWISE = ("Otherwise unremarkable.", "Otherwise normal.", "")
UNKNOWN_HEADERS = ("SOFT TISSUES", "OTHER", "TUBES AND LINES", "ABDOMINAL SOFT TISSUES")
UNKNOWN_BODIES = ("Unremarkable.", "None.", "No additional findings.")
SEVERITY = ("small", "moderate", "large", "mild")
LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4")


SIDES = ("right", "left", "bilateral")


def prompt_phrases() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Zero-shot prompts from the report writer's own phrase lists: per finding, every positive and
    every negative template, with each placeholder expanded over its values (sides, severities,
    vertebral levels, vessels). Templates quoting a measured size are left out: a size is a number
    the image must show, not a phrase of the finding."""
    fills = dict(side=SIDES, sev=SEVERITY, level=LEVELS, vessel=THROMBOSIS_VESSELS)

    def expand(template: str) -> list[str]:
        names = sorted({n for n in fills if "{" + n + "}" in template or "{" + n.capitalize() + "}" in template})
        out = [template]
        for name in names:
            out = [t.replace("{" + name + "}", v).replace("{" + name.capitalize() + "}", v.capitalize())
                   for t in out for v in fills[name]]
        return [t[0].upper() + t[1:] for t in out]

    prompts = {}
    for finding in FINDINGS:
        pos, neg = ([t for t in side if "{size}" not in t] for side in PHRASES[finding])
        prompts[finding] = (tuple(x for t in pos for x in expand(t)), tuple(x for t in neg for x in expand(t)))
    return prompts


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _fill(template: str, finding: str, fp: dict, rng: np.random.Generator, sizes: dict[str, float]) -> str:
    side = fp.get(finding, {}).get("sides") or [fp.get(finding, {}).get("side", "right")]
    side_text = "bilateral" if len(side) == 2 else side[0]
    sev = _pick(rng, SEVERITY)
    vessel = fp.get("thrombosis", {}).get("vessel", "portal vein")
    values = dict(side=side_text, Side=side_text.capitalize(), sev=sev, Sev=sev.capitalize(),
                  size=f"{sizes.get(finding, 0.0):.1f}", level=_pick(rng, LEVELS), vessel=vessel,
                  Vessel=vessel.capitalize())
    text = template.format(**values)
    return text[0].upper() + text[1:]


def section_text(section: str, labels: dict[str, int], fp: dict, sex: str, rng: np.random.Generator,
                 sizes: dict[str, float]) -> str:
    """Body of one organ section: positives first, then a normal sentence or 'otherwise', then
    negations of the findings labelled 0, in a seeded order."""
    positives = [f for f in SECTION_FINDINGS[section] if labels[f] == 1]
    negatives = [f for f in SECTION_FINDINGS[section] if labels[f] == 0]
    parts = [_fill(_pick(rng, PHRASES[f][0]), f, fp, rng, sizes) for f in positives]
    if positives:
        parts.append(_pick(rng, OTHERWISE))
    elif section == "pelvic" and sex == "F":
        parts.append(_pick(rng, ("The uterus and ovaries are unremarkable.", "Normal.")))
    else:
        parts.append(_pick(rng, NORMAL_SENTENCES[section]))
    neg = [_pick(rng, PHRASES[f][1]) for f in negatives]
    rng.shuffle(neg)
    parts.extend(neg)
    return " ".join(p for p in parts if p)


# Headers the phantom dictates for a whole section (a subset of SECTION_HEADERS: the splitter also
# knows narrower ones such as "appendix" that would be odd as the only header of a section).
PHANTOM_HEADERS: dict[str, tuple[str, ...]] = {
    "lower_thorax": ("lower thorax", "lower chest", "lung bases", "thorax", "heart and lung bases"),
    "liver": ("liver", "liver and biliary tree", "hepatobiliary", "liver/biliary"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
    "adrenal_glands": ("adrenal glands", "adrenals", "adrenal"),
    "kidneys": ("kidneys", "kidneys and ureters", "gu", "genitourinary", "renal"),
    "bowel": ("bowel", "gastrointestinal tract", "gi", "gi tract", "bowel/mesentery", "stomach and bowel"),
    "peritoneum": ("peritoneum", "peritoneal cavity", "abdominal wall", "peritoneum/retroperitoneum",
                   "retroperitoneum"),
    "circulatory": ("vasculature", "vascular", "vessels", "aorta and vessels"),
    "lymph_nodes": ("lymph nodes", "lymphatics", "nodes"),
    "musculoskeletal": ("musculoskeletal", "bones", "osseous structures", "bones and soft tissues"),
}


def choose_header(section: str, sex: str, rng: np.random.Generator) -> str:
    headers = PHANTOM_HEADERS.get(section, ())
    if section == "pelvic":
        headers = ("pelvic organs", "pelvis", "prostate and seminal vesicles") if sex == "M" else (
            "pelvic organs", "pelvis", "uterus and ovaries")
    assert all(HEADER_TO_SECTION[normalize_header(h)] == section for h in headers), section
    if rng.uniform() < 0.6:
        return headers[0]
    return _pick(rng, headers)


def render_report(labels: dict[str, int], fp: dict, sex: str, rng: np.random.Generator,
                  sizes: dict[str, float]) -> tuple[str, str]:
    """(findings text, impression) for one study. Two layouts, as in real reports: one upper-case
    header per line, or a single paragraph with sentence-case headers. `fp` is the drawn geometry
    of every finding and `sizes` the sizes measured from it (cm), so the text quotes what the
    image shows."""
    per_line = rng.uniform() < 0.6
    chunks: list[tuple[str, str]] = []
    for section in SECTIONS:
        has_mention = any(labels[f] != -1 for f in SECTION_FINDINGS[section])
        if not has_mention and section in ("adrenal_glands", "lymph_nodes") and rng.uniform() < 0.15:
            continue  # occasionally a section is simply not dictated
        header = choose_header(section, sex, rng)
        chunks.append((header, section_text(section, labels, fp, sex, rng, sizes)))
        if section == "pelvic" and rng.uniform() < 0.25:  # a second header for the same section
            chunks.append(("bladder", _pick(rng, ("Unremarkable.", "The bladder is normally distended."))))
    if per_line and rng.uniform() < 0.15:
        pos = int(rng.integers(len(chunks) + 1))
        chunks.insert(pos, (_pick(rng, UNKNOWN_HEADERS), _pick(rng, UNKNOWN_BODIES)))
    if per_line:
        lines = [f"{h.upper()}: {body}" for h, body in chunks]
        if rng.uniform() < 0.5:
            lines.insert(0, "FINDINGS:")
        findings = "\n".join(lines)
    else:
        findings = " ".join(f"{h[0].upper() + h[1:]}: {body}" for h, body in chunks)

    positives = [f for f in labels if labels[f] == 1]
    if not positives:
        impression = _pick(rng, ("No acute abnormality in the abdomen or pelvis.",
                                 "No acute intra-abdominal or pelvic process.", "Unremarkable CT of the abdomen and pelvis."))
    else:
        order = sorted(positives, key=lambda f: (SECTIONS.index(FINDING_SECTION[f]), f))
        impression = " ".join(f"{i + 1}. {_fill(PHRASES[f][0][0], f, fp, rng, sizes)}" for i, f in enumerate(order))
    return findings, impression
