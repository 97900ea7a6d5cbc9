"""Write a random-weight checkpoint in the exact official or mmdetection container and key layout.

Real checkpoints cannot be downloaded everywhere; this gives a fresh machine something to run the whole
pipeline on (the accuracy is meaningless, the plumbing is real).

    python scripts/make_demo_checkpoint.py resdcn_18 demo.pth
    python scripts/make_demo_checkpoint.py mmdet_r18_dcnv2 demo_mmdet.pth --num-classes 80
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from centernet_edge.export.models import ARCHITECTURES, build_model
from centernet_edge.runtime.atomic import atomic_path


def make_checkpoint(arch: str, out: Path, num_classes: int = 80, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes)
    # Random BN statistics keep activations from being trivially zero-mean/unit-variance.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    if ARCHITECTURES[arch].source == "mmdet":
        container = {"meta": {"note": "centernet-edge demo checkpoint (random weights)"}, "state_dict": state}
    else:
        container = {"epoch": 0, "state_dict": state}
    with atomic_path(out) as tmp:
        torch.save(container, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=sorted(ARCHITECTURES), help="architecture name")
    parser.add_argument("output", type=Path, help="where to write the .pth")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_checkpoint(args.arch, args.output, args.num_classes, args.seed)
    print(f"wrote {path} ({ARCHITECTURES[args.arch].source} layout, random weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
