#!/usr/bin/env python
"""Fine-tune visattn/timm backbones for classification or semantic segmentation.

    python train.py                                              # the demo: resnet18_cbam on the UCI digits
    python train.py -c configs/imagenet/resnet50_cbam.yaml --data-dir /path/to/imagenet
    python train.py -c configs/ade20k/ccnet_resnet50.yaml --data-dir /path/to/ADEChallengeData2016
    torchrun --nproc_per_node 8 train.py -c configs/imagenet/resnet50_se.yaml --data-dir /path/to/imagenet

A YAML config (``-c``) sets the defaults, the command line overrides them; ``python train.py --help`` lists
every option. A mistake in the options, the data or a checkpoint ends with one line on stderr and exit status 2
(``--debug`` shows the traceback). See ``visattn.engine`` for the pieces.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import visattn  # noqa: F401  (registers the visattn models with timm)
from visattn.engine import cli, parse_args, run


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    return run(parse_args(argv))


if __name__ == '__main__':
    sys.exit(cli(sys.argv[1:]))
