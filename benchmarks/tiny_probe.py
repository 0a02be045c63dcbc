"""How much content the tiny backbone's features carry: a 1×1-conv probe on synthetic shapes.

Trained tiny model vs a random-weight copy, at several noise levels t. Prints a table; the
docs/guides/families.md quotes it.

    python benchmarks/tiny_probe.py
"""

from __future__ import annotations

import argparse
import tempfile

from csdiff.assess import linear_probe_miou, random_weight_copy, shapes_probe_data
from csdiff.backbone import DiffusionFeatureExtractor, Variant

LAYERS = ["up-level1-upsampler-out", "up-level2-upsampler-out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--img_size", type=int, default=128)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train, val = shapes_probe_data(48, 128, seed=99), shapes_probe_data(16, 128, seed=98)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"trained tiny": "tiny", "random-weight copy": str(random_weight_copy(tmp))}
        print(f"| backbone | {' | '.join(f't={t}' for t in args.timesteps)} |")
        print(f"|---|{'---|' * len(args.timesteps)}")
        for name, model in models.items():
            scores = []
            for t in args.timesteps:
                ex = DiffusionFeatureExtractor(
                    model,
                    LAYERS,
                    img_size=args.img_size,
                    timestep=t,
                    variants=[Variant("p", "a photo of shapes on a background")],
                )
                scores.append(linear_probe_miou(ex, train, val))
            print(f"| {name} | {' | '.join(f'{s:.3f}' for s in scores)} |", flush=True)


if __name__ == "__main__":
    main()
