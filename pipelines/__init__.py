"""Data: dataset sources, .beton conversion, augmentation spec and two-view loaders (FFCV, DALI, torchvision)."""
