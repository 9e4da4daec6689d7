"""MixMask: filling-based masking for Siamese ConvNets, on MoCo, SimCLR, BYOL and SimSiam."""

__version__ = "0.1.0"
