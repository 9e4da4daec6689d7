"""The one list of each name the config, the mixing operator and the methods share (DESIGN.md, "Layers").

Plain constants with no imports, so the mixing operator and the methods take their vocabularies from here without
loading the config (which knows the dataset sources) or any data code.
"""

from __future__ import annotations

BRANCHES = ("vanilla", "unmix", "mixmask", "mixmask-unmix", "erase")
MIXED_KINDS = ("mixmask", "unmix", "erase")
# The MixedBatch kinds each branch feeds the method, in order (MixMask* = MixMask + Un-Mix, different partners).
BRANCH_KINDS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "mixmask": ("mixmask",),
    "unmix": ("unmix",),
    "mixmask-unmix": ("mixmask", "unmix"),
    "erase": ("erase",),
}
MASK_KINDS = ("block", "discrete", "discrete_exact")  # generators: mixmask.core.masks.MASK_GENERATORS
MASK_SHARES = ("batch", "pair", "sample")
PERMUTATIONS = ("reverse", "random")
ERASE_FILLS = ("zero", "mean", "noise")
