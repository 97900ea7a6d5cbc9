"""Print a Markdown table of parameters and FLOPs of every CenterNet architecture.

FLOPs are 2 x multiply-accumulates of convolutions, deconvolutions and DCN layers (a DCN counts as its
3x3 conv plus its offset/mask conv; bilinear sampling, BN, ReLU and additions are not counted). Models
are built on the meta device, so nothing is computed and the whole table takes a few seconds.

    python scripts/model_table.py [--size 512] [--num-classes 80]
"""

from __future__ import annotations

import argparse

import torch

from centernet_edge.export.models import ARCHITECTURES, build_model, count_macs, count_parameters


def table(size: int, num_classes: int) -> str:
    rows = [
        f"| arch | source | DCN | head_conv | params (M) | GFLOPs @{size}x{size} | GMACs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, info in ARCHITECTURES.items():
        with torch.device("meta"):
            model = build_model(name, num_classes=num_classes)
        params = count_parameters(model)
        macs = count_macs(model, (size, size))
        rows.append(f"| {name} | {info.source} | {'yes' if info.has_dcn else 'no'} | {info.default_head_conv} "
                    f"| {params / 1e6:.2f} | {2 * macs / 1e9:.1f} | {macs / 1e9:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="square input side (multiple of 128 for hourglass)")
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args(argv)
    print(table(args.size, args.num_classes))


if __name__ == "__main__":
    main()
