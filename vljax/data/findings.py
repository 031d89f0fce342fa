"""The fixed vocabulary of the Merlin task: 30 zero-shot findings, 13 organ-system report sections,
which section each finding belongs to, and the report-header synonyms that name each section.

Everything that has to agree on these names (phantom generator, report splitter, balanced sampling,
zero-shot evaluation) imports them from here.
"""

from __future__ import annotations

import re

# The 30 findings of Merlin's zero-shot protocol, in the order of DESIGN.md §1 (column order of
# `zero_shot_findings_disease_cls.csv` in vljax-written files).
FINDINGS: tuple[str, ...] = (
    "submucosal edema",
    "renal hypodensities",
    "aortic valve calcification",
    "coronary calcification",
    "thrombosis",
    "metastatic disease",
    "pancreatic atrophy",
    "renal cyst",
    "osteopenia",
    "surgically absent gallbladder",
    "atelectasis",
    "abdominal aortic aneurysm",
    "anasarca",
    "hiatal hernia",
    "lymphadenopathy",
    "prostatomegaly",
    "biliary ductal dilation",
    "cardiomegaly",
    "splenomegaly",
    "hepatomegaly",
    "atherosclerosis",
    "ascites",
    "pleural effusion",
    "hepatic steatosis",
    "appendicitis",
    "gallstones",
    "hydronephrosis",
    "bowel obstruction",
    "free air",
    "fracture",
)
FINDING_INDEX: dict[str, int] = {name: i for i, name in enumerate(FINDINGS)}

# The 13 organ-system sections of an abdominal CT report, in report order.
SECTIONS: tuple[str, ...] = (
    "lower_thorax",
    "liver",
    "gallbladder",
    "spleen",
    "pancreas",
    "adrenal_glands",
    "kidneys",
    "bowel",
    "peritoneum",
    "pelvic",
    "circulatory",
    "lymph_nodes",
    "musculoskeletal",
)
SECTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(SECTIONS)}

# Finding -> organ section (DESIGN.md §1). Used by the phantom (where a finding is written),
# by balanced sampling (a section batch is "abnormal" when its section carries a positive finding)
# and by evaluation breakdowns. Adrenal glands carry none of the 30 findings.
FINDING_SECTION: dict[str, str] = {
    "pleural effusion": "lower_thorax",
    "atelectasis": "lower_thorax",
    "cardiomegaly": "lower_thorax",
    "coronary calcification": "lower_thorax",
    "aortic valve calcification": "lower_thorax",
    "hepatomegaly": "liver",
    "hepatic steatosis": "liver",
    "biliary ductal dilation": "liver",
    "metastatic disease": "liver",
    "gallstones": "gallbladder",
    "surgically absent gallbladder": "gallbladder",
    "splenomegaly": "spleen",
    "pancreatic atrophy": "pancreas",
    "renal cyst": "kidneys",
    "renal hypodensities": "kidneys",
    "hydronephrosis": "kidneys",
    "bowel obstruction": "bowel",
    "appendicitis": "bowel",
    "submucosal edema": "bowel",
    "hiatal hernia": "bowel",
    "ascites": "peritoneum",
    "free air": "peritoneum",
    "anasarca": "peritoneum",
    "prostatomegaly": "pelvic",
    "atherosclerosis": "circulatory",
    "abdominal aortic aneurysm": "circulatory",
    "thrombosis": "circulatory",
    "lymphadenopathy": "lymph_nodes",
    "osteopenia": "musculoskeletal",
    "fracture": "musculoskeletal",
}

SECTION_FINDINGS: dict[str, tuple[str, ...]] = {
    s: tuple(f for f in FINDINGS if FINDING_SECTION[f] == s) for s in SECTIONS
}

# Report headers seen for each section (lower case, normalised with `normalize_header`).
# The first entry is the canonical header the phantom uses most often.
SECTION_HEADERS: dict[str, tuple[str, ...]] = {
    "lower_thorax": ("lower thorax", "lower chest", "lung bases", "thorax", "lungs", "chest",
                     "heart and lung bases", "heart"),
    "liver": ("liver", "liver and biliary tree", "hepatobiliary", "liver and biliary", "liver/biliary",
              "biliary", "biliary tree", "bile ducts"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
    "adrenal_glands": ("adrenal glands", "adrenals", "adrenal", "adrenal gland"),
    "kidneys": ("kidneys", "kidneys and ureters", "gu", "genitourinary", "urinary tract", "renal",
                "kidneys/ureters", "kidney", "ureters"),
    "bowel": ("bowel", "gastrointestinal tract", "gi", "gi tract", "bowel/mesentery", "bowel and mesentery",
              "stomach and bowel", "gastrointestinal", "stomach", "small bowel", "large bowel", "colon",
              "appendix"),
    "peritoneum": ("peritoneum", "peritoneal cavity", "abdominal wall", "peritoneum/retroperitoneum",
                   "retroperitoneum", "peritoneum and abdominal wall"),
    "pelvic": ("pelvic organs", "pelvis", "pelvic", "bladder", "urinary bladder", "prostate",
               "prostate and seminal vesicles", "uterus and ovaries", "reproductive organs", "uterus",
               "ovaries", "adnexa", "uterus and adnexa", "seminal vesicles"),
    "circulatory": ("vasculature", "vascular", "vessels", "circulatory", "aorta and vessels", "blood vessels",
                    "aorta", "abdominal aorta", "vascular structures"),
    "lymph_nodes": ("lymph nodes", "lymphatics", "nodes", "lymph node"),
    "musculoskeletal": ("musculoskeletal", "bones", "osseous structures", "bones and soft tissues", "osseous",
                        "bones/soft tissues", "bone", "bony structures", "skeleton"),
}

_SPACES = re.compile(r"\s+")


def normalize_header(header: str) -> str:
    """Canonical form of a report header for synonym lookup: lower case, single spaces, no
    trailing colon, '&' read as 'and', spaces around '/' removed."""
    h = header.strip().rstrip(":").strip().lower().replace("&", " and ")
    h = _SPACES.sub(" ", h)
    return h.replace(" / ", "/").replace("/ ", "/").replace(" /", "/")


HEADER_TO_SECTION: dict[str, str] = {
    normalize_header(h): s for s, headers in SECTION_HEADERS.items() for h in headers
}

LABEL_VALUES = (1, 0, -1)  # positive, explicitly negative, not mentioned
