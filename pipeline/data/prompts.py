"""Readable text prompts for data set class names that are not good prompts on their own.

A text-promptable backend (SEEM, CLIPSeg, SAM 3) scores one prompt per output; a class with several
prompts gets the sum of their probabilities. `[foundation.map]` in the config overrides any entry.
VOC's names are glued words; ADE20K's short names are the first synonym of objectInfo150's list, and
several are ambiguous alone ("pot", "tank", "base"), so their other synonyms are added. A name means one
thing in every data set here, so one table serves all (checked by a test: no entry changes another list's
prompts).
"""

from __future__ import annotations

VOC = {
    "aeroplane": ("airplane",),
    "diningtable": ("dining table",),
    "motorbike": ("motorbike", "motorcycle"),
    "pottedplant": ("potted plant",),
    "tvmonitor": ("tv monitor", "television"),
}

ADE20K = {
    "windowpane": ("windowpane", "window"),
    "earth": ("earth", "ground"),
    "plant": ("plant", "flora"),
    "signboard": ("signboard", "sign"),
    "base": ("pedestal", "stand"),
    "case": ("display case", "showcase"),
    "palm": ("palm tree",),
    "bar": ("bar counter",),
    "hovel": ("hovel", "hut", "shack"),
    "streetlight": ("street lamp",),
    "booth": ("booth", "kiosk"),
    "television receiver": ("television", "tv"),
    "apparel": ("clothes", "apparel"),
    "land": ("land", "soil"),
    "bannister": ("bannister", "handrail"),
    "buffet": ("sideboard",),
    "plaything": ("toy",),
    "waterfall": ("waterfall", "falls"),
    "minibike": ("minibike", "motorbike"),
    "cradle": ("cradle", "crib"),
    "step": ("step", "stair"),
    "tank": ("storage tank",),
    "trade name": ("brand name", "logo"),
    "pot": ("flowerpot",),
    "screen": ("projection screen",),
    "blind": ("window blind",),
    "hood": ("exhaust hood",),
    "sconce": ("wall sconce",),
    "ashcan": ("trash can", "garbage can"),
    "crt screen": ("crt screen", "computer screen"),
    "glass": ("drinking glass",),
    "washer": ("washing machine",),
    "conveyer belt": ("conveyor belt",),
    "chest of drawers": ("chest of drawers", "dresser"),
}

# Cityscapes' names are readable; these get the everyday word too (no other class of its list uses them).
CITYSCAPES = {
    "vegetation": ("vegetation", "tree"),
    "terrain": ("terrain", "grass"),
    "rider": ("rider", "cyclist"),
    "traffic sign": ("traffic sign", "road sign"),
}

# COCO's thing names: a misspelling and two words that mean something else alone.
COCO = {
    "hair drier": ("hair dryer",),
    "mouse": ("computer mouse",),
    "remote": ("remote control",),
    "tv": ("tv", "television"),
}

READABLE = {**VOC, **ADE20K, **CITYSCAPES, **COCO}


def prompts_for(name: str) -> tuple[str, ...]:
    """The default prompts of a class: the readable form, else the name with underscores as spaces."""
    return READABLE.get(name, (name.replace("_", " ").strip(),))
