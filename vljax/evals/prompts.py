"""The zero-shot prompt tables: per finding, positive and negative report phrases.

`FINDING_PROMPTS` are Merlin-style sentences written for real CT reports; `prompts_for(name)` gives a
named set (`PROMPT_SETS`): "merlin", "phantom" (the phantom report writer's own phrase lists) or both
as one ensemble per finding. `vljax.evals.zero_shot` scores images against them.
"""

from __future__ import annotations

# (positive phrases, negative phrases) per finding, in FINDINGS order. Written as report sentences
# so that they sit near real report text in the text tower's embedding space.
FINDING_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "submucosal edema": (
        (
            "submucosal edema of the colon",
            "bowel wall thickening with submucosal edema",
            "submucosal edema of the small bowel",
            "diffuse submucosal bowel wall edema",
        ),
        (
            "no submucosal edema",
            "no bowel wall thickening or submucosal edema",
            "the bowel wall is normal in thickness",
            "no bowel wall edema",
        ),
    ),
    "renal hypodensities": (
        (
            "multiple renal hypodensities",
            "bilateral renal hypodensities too small to characterize",
            "hypodense lesion in the left kidney",
            "subcentimeter renal hypodensity",
        ),
        (
            "no renal hypodensities",
            "no focal renal lesions",
            "the kidneys are normal without focal lesion",
            "no suspicious renal lesion",
        ),
    ),
    "aortic valve calcification": (
        (
            "aortic valve calcification",
            "calcification of the aortic valve",
            "dense aortic valve calcifications",
            "calcified aortic valve leaflets",
        ),
        (
            "no aortic valve calcification",
            "no calcification of the aortic valve",
            "the aortic valve is not calcified",
        ),
    ),
    "coronary calcification": (
        (
            "coronary artery calcification",
            "dense coronary artery calcifications",
            "three vessel coronary calcification",
            "calcified coronary arteries",
        ),
        (
            "no coronary artery calcification",
            "no coronary calcifications",
            "the coronary arteries are not calcified",
        ),
    ),
    "thrombosis": (
        (
            "portal vein thrombosis",
            "thrombosis of the left common iliac vein",
            "occlusive thrombus in the inferior vena cava",
            "deep venous thrombosis",
            "tumor thrombus in the renal vein",
        ),
        (
            "no venous thrombosis",
            "the portal and hepatic veins are patent without thrombosis",
            "no evidence of thrombus",
            "no portal vein thrombosis",
        ),
    ),
    "metastatic disease": (
        (
            "metastatic disease to the liver",
            "widespread osseous metastatic disease",
            "multiple hepatic metastases",
            "findings consistent with metastatic disease",
            "peritoneal metastases",
        ),
        (
            "no evidence of metastatic disease",
            "no metastatic disease in the abdomen or pelvis",
            "no suspicious lesions to suggest metastases",
            "no hepatic metastases",
        ),
    ),
    "pancreatic atrophy": (
        (
            "pancreatic atrophy",
            "diffuse atrophy of the pancreas",
            "the pancreas is atrophic",
            "fatty atrophy of the pancreas",
        ),
        (
            "no pancreatic atrophy",
            "the pancreas is normal in size",
            "normal pancreatic parenchyma without atrophy",
            "the pancreas is unremarkable",
        ),
    ),
    "renal cyst": (
        (
            "simple renal cyst",
            "left renal cyst",
            "bilateral renal cysts",
            "cyst in the right kidney",
            "exophytic cyst arising from the lower pole of the left kidney",
        ),
        (
            "no renal cysts",
            "no cystic renal lesions",
            "the kidneys are without cysts",
        ),
    ),
    "osteopenia": (
        (
            "diffuse osteopenia",
            "osteopenia of the visualized osseous structures",
            "the bones are demineralized",
            "the bones are osteopenic",
        ),
        (
            "no osteopenia",
            "normal bone mineralization",
            "bone density is normal",
            "the osseous structures are normally mineralized",
        ),
    ),
    "surgically absent gallbladder": (
        (
            "status post cholecystectomy",
            "the gallbladder is surgically absent",
            "prior cholecystectomy",
            "surgically absent gallbladder",
            "postsurgical absence of the gallbladder",
        ),
        (
            "the gallbladder is present",
            "normal gallbladder",
            "the gallbladder is unremarkable",
            "the gallbladder is normally distended",
        ),
    ),
    "atelectasis": (
        (
            "bibasilar atelectasis",
            "dependent atelectasis in the lung bases",
            "subsegmental atelectasis of the right lower lobe",
            "mild bibasilar subsegmental atelectasis",
        ),
        (
            "no atelectasis",
            "the lung bases are clear",
            "no consolidation or atelectasis in the lung bases",
        ),
    ),
    "abdominal aortic aneurysm": (
        (
            "infrarenal abdominal aortic aneurysm",
            "fusiform aneurysmal dilation of the abdominal aorta",
            "aneurysm of the infrarenal abdominal aorta",
            "large abdominal aortic aneurysm",
        ),
        (
            "no abdominal aortic aneurysm",
            "the abdominal aorta is normal in caliber",
            "no aortic aneurysm",
        ),
    ),
    "anasarca": (
        (
            "anasarca",
            "diffuse anasarca",
            "diffuse subcutaneous edema consistent with anasarca",
            "extensive body wall edema and anasarca",
        ),
        (
            "no anasarca",
            "no subcutaneous edema",
            "the subcutaneous soft tissues are unremarkable",
        ),
    ),
    "hiatal hernia": (
        (
            "small hiatal hernia",
            "large hiatal hernia",
            "moderate sliding hiatal hernia",
            "paraesophageal hernia",
        ),
        (
            "no hiatal hernia",
            "the gastroesophageal junction is normal",
            "no evidence of hiatal hernia",
        ),
    ),
    "lymphadenopathy": (
        (
            "retroperitoneal lymphadenopathy",
            "enlarged mesenteric lymph nodes",
            "pelvic lymphadenopathy",
            "bulky periaortic lymphadenopathy",
        ),
        (
            "no lymphadenopathy",
            "no pathologically enlarged lymph nodes",
            "no abdominal or pelvic lymphadenopathy",
            "no retroperitoneal lymphadenopathy",
        ),
    ),
    "prostatomegaly": (
        (
            "prostatomegaly",
            "enlarged prostate",
            "the prostate gland is enlarged",
            "mild prostatomegaly",
        ),
        (
            "the prostate is normal in size",
            "no prostatomegaly",
            "normal prostate gland",
            "the prostate is unremarkable",
        ),
    ),
    "biliary ductal dilation": (
        (
            "intrahepatic and extrahepatic biliary ductal dilation",
            "dilated common bile duct",
            "mild intrahepatic biliary ductal dilatation",
            "biliary dilation",
        ),
        (
            "no biliary ductal dilation",
            "no intrahepatic or extrahepatic biliary dilatation",
            "the common bile duct is normal in caliber",
        ),
    ),
    "cardiomegaly": (
        (
            "cardiomegaly",
            "mild cardiomegaly",
            "the heart is enlarged",
            "moderate cardiomegaly",
        ),
        (
            "the heart is normal in size",
            "no cardiomegaly",
            "normal heart size",
        ),
    ),
    "splenomegaly": (
        (
            "splenomegaly",
            "mild splenomegaly",
            "the spleen is enlarged",
            "massive splenomegaly",
        ),
        (
            "the spleen is normal in size",
            "no splenomegaly",
            "normal spleen",
        ),
    ),
    "hepatomegaly": (
        (
            "hepatomegaly",
            "the liver is enlarged",
            "mild hepatomegaly",
            "enlarged liver",
        ),
        (
            "no hepatomegaly",
            "the liver is normal in size",
            "normal liver size",
        ),
    ),
    "atherosclerosis": (
        (
            "atherosclerosis of the abdominal aorta",
            "moderate atherosclerotic calcification of the aorta",
            "extensive aortoiliac atherosclerosis",
            "mild atherosclerotic disease",
        ),
        (
            "no atherosclerosis",
            "no atherosclerotic calcification of the aorta",
            "no significant atherosclerotic disease",
        ),
    ),
    "ascites": (
        (
            "small volume ascites",
            "moderate ascites",
            "large volume ascites",
            "trace ascites in the pelvis",
        ),
        (
            "no ascites",
            "no free fluid or ascites",
            "no abdominal or pelvic ascites",
        ),
    ),
    "pleural effusion": (
        (
            "small pleural effusion",
            "moderate right pleural effusion",
            "bilateral pleural effusions",
            "small left pleural effusion",
        ),
        (
            "no pleural effusion",
            "no pleural effusions",
            "the pleural spaces are clear",
        ),
    ),
    "hepatic steatosis": (
        (
            "hepatic steatosis",
            "diffuse hepatic steatosis",
            "diffuse fatty infiltration of the liver",
            "the liver is diffusely hypoattenuating consistent with steatosis",
        ),
        (
            "no hepatic steatosis",
            "the liver is normal in attenuation",
            "no fatty infiltration of the liver",
        ),
    ),
    "appendicitis": (
        (
            "acute appendicitis",
            "dilated inflamed appendix consistent with appendicitis",
            "perforated appendicitis",
            "findings compatible with acute appendicitis",
        ),
        (
            "no appendicitis",
            "the appendix is normal",
            "normal appendix",
            "no evidence of acute appendicitis",
        ),
    ),
    "gallstones": (
        (
            "cholelithiasis",
            "gallstones",
            "multiple gallstones in the gallbladder",
            "a calcified gallstone",
        ),
        (
            "no gallstones",
            "no cholelithiasis",
            "no radiopaque gallstones",
        ),
    ),
    "hydronephrosis": (
        (
            "mild left hydronephrosis",
            "moderate right hydronephrosis",
            "bilateral hydronephrosis",
            "severe hydronephrosis",
        ),
        (
            "no hydronephrosis",
            "no hydronephrosis or hydroureter",
            "the renal collecting systems are not dilated",
        ),
    ),
    "bowel obstruction": (
        (
            "small bowel obstruction",
            "dilated loops of small bowel consistent with obstruction",
            "high grade small bowel obstruction",
            "large bowel obstruction",
        ),
        (
            "no bowel obstruction",
            "no evidence of bowel obstruction",
            "the bowel is normal in caliber",
        ),
    ),
    "free air": (
        (
            "free intraperitoneal air",
            "pneumoperitoneum",
            "free air under the diaphragm",
            "small amount of free air",
        ),
        (
            "no free air",
            "no pneumoperitoneum",
            "no free intraperitoneal air",
        ),
    ),
    "fracture": (
        (
            "acute rib fracture",
            "compression fracture of the l1 vertebral body",
            "nondisplaced fracture",
            "healed rib fractures",
            "pelvic fracture",
        ),
        (
            "no acute fracture",
            "no fracture",
            "no acute osseous abnormality or fracture",
        ),
    ),
}


# Prompt sets, by name (`config.zero_shot_prompts`): "merlin", the report sentences above, for any
# dataset; "phantom", the phantom report writer's own phrase lists
# (`vljax.data.phantom.text.prompt_phrases`); "merlin+phantom", both, as one ensemble per finding.
PROMPT_SETS = ("merlin", "phantom", "merlin+phantom")


def prompts_for(name: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The {finding: (positive phrases, negative phrases)} of prompt set `name` (`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"zero-shot prompt set {name!r}: choose one of {list(PROMPT_SETS)}")
    if name == "merlin":
        return dict(FINDING_PROMPTS)
    from vljax.data.phantom.text import prompt_phrases

    phantom = prompt_phrases()
    if name == "phantom":
        return phantom
    return {f: (tuple(FINDING_PROMPTS[f][0]) + phantom[f][0], tuple(FINDING_PROMPTS[f][1]) + phantom[f][1])
            for f in FINDING_PROMPTS}
