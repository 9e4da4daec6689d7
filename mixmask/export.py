"""Export a trained backbone: torchvision key names (`backbone.pt`) and detectron2's format (`.pkl`).

`python -m mixmask.export CHECKPOINT --detectron2 OUT.pkl` converts for the paper's detection and segmentation
transfer (detectron2's ResNet naming: stem, res2..res5, shortcut, conv.norm), as MoCo's conversion script does.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from mixmask.errors import UserError, cli_entry
from mixmask.evaluation.features import backbone_state


def to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    """Rename torchvision ResNet keys to detectron2's and wrap them as detectron2 loads third-party weights."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc.") or "num_batches_tracked" in key:
            continue
        k = key
        if not k.startswith("layer"):
            k = "stem." + k  # conv1, bn1
        for i in range(4):
            k = k.replace(f"layer{i + 1}", f"res{i + 2}")
        k = re.sub(r"bn(\d)", r"conv\1.norm", k)
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[k] = value.detach().cpu().numpy()
    return {"model": renamed, "__author__": "mixmask", "matching_heuristics": True}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmask.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoints/last.pt or backbone.pt of a run")
    parser.add_argument("--detectron2", type=Path, required=True, help="output .pkl for detectron2")
    args = parser.parse_args(argv)
    from mixmask.run.checkpoint import UnsafeFile, read_torch_file

    if not args.checkpoint.is_file():
        raise UserError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    from mixmask.run.launch import check_writable_dir

    check_writable_dir(args.detectron2.parent, "--detectron2")
    try:
        raw = read_torch_file(args.checkpoint)
    except UnsafeFile as err:
        raise UserError(f"{str(args.checkpoint)!r} holds {err}; give a run's checkpoints/last.pt or backbone.pt"
                        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"{str(args.checkpoint)!r} is corrupt, truncated or not a PyTorch file "
                        f"({type(err).__name__}); give a run's checkpoints/last.pt or backbone.pt") from None
    if isinstance(raw, dict) and isinstance(raw.get("method"), dict):  # a training checkpoint (last.pt, epoch_N.pt)
        state = backbone_state(raw["method"], source=repr(str(args.checkpoint)))
    elif isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state = raw  # backbone.pt
    else:
        raise UserError(f"{str(args.checkpoint)!r} is neither a training checkpoint nor a backbone.pt")
    out = to_detectron2(state)
    tmp = args.detectron2.with_name(args.detectron2.name + ".tmp")
    with open(tmp, "wb") as f:  # open() honours the umask, as the user's other files do
        pickle.dump(out, f)
    tmp.replace(args.detectron2)
    print(f"wrote {args.detectron2} ({len(out['model'])} tensors, detectron2 naming)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
