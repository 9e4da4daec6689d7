"""Data: dataset sources, .beton conversion, augmentation spec and two-view loaders (FFCV, DALI, torchvision)."""

from pipelines.numba_threads import prefer_openmp

prefer_openmp()  # before any data code imports numba or ffcv (ffcv starts numba's threads at import)
