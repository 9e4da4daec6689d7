"""The loader backends by name (`data.backend`): the module and the two-view and eval loader classes of each.

Plain strings, no imports: the config offers these names without loading torch or a loader, and
`pipelines.loaders` imports the module a run picks on first use (ffcv and DALI are heavy). Adding a backend is one
entry here plus its module in `pipelines/loaders/`.
"""

from __future__ import annotations

from typing import NamedTuple


class LoaderClasses(NamedTuple):
    module: str
    two_view_class: str
    eval_class: str


BACKENDS: dict[str, LoaderClasses] = {
    "ffcv": LoaderClasses("pipelines.loaders.ffcv_backend", "FFCVTwoViewLoader", "FFCVEvalLoader"),
    "dali": LoaderClasses("pipelines.loaders.dali_backend", "DALITwoViewLoader", "DALIEvalLoader"),
    "torchvision": LoaderClasses("pipelines.loaders.torchvision_backend", "TorchvisionTwoViewLoader",
                                 "TorchvisionEvalLoader"),
}
BACKEND_NAMES = tuple(BACKENDS)
