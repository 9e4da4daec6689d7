"""The method: masks, mixing, Un-Mix, the mixing operator, backbones, losses and the Siamese methods.

Takes plain values (sizes, ratios, a `torch.Generator`, a device) and never a config object; imports no data and no
run code (`tests/test_layers.py`).
"""
