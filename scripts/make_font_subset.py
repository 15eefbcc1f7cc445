#!/usr/bin/env python3
"""Subset DejaVu Sans to the glyphs gradsift's plots use, so `--plot` needs no system fonts.

Run from the repository root (Debian: apt-get install fonts-dejavu-core; pip install fonttools):
    python3 scripts/make_font_subset.py
Writes assets/fonts/DejaVuSans-gradsift.ttf (a few tens of KB instead of 750 KB).
DejaVu fonts are under the Bitstream Vera / DejaVu license (assets/fonts/LICENSE-DejaVu).
"""
from fontTools import subset

SOURCE = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
TARGET = "assets/fonts/DejaVuSans-gradsift.ttf"
# Printable ASCII plus the symbols of axis labels and legends: ² · × ρ σ ≤ −.
UNICODES = list(range(0x20, 0x7F)) + [0xB2, 0xB7, 0xD7, 0x3C1, 0x3C3, 0x2264, 0x2212]

options = subset.Options()
options.layout_features = ["kern"]
options.hinting = False
options.name_IDs = ["*"]
options.notdef_outline = True
font = subset.load_font(SOURCE, options)
subsetter = subset.Subsetter(options)
subsetter.populate(unicodes=UNICODES)
subsetter.subset(font)
subset.save_font(font, TARGET, options)
print(TARGET)
