"""One rank of test_distributed.py's sharded-loading measurement: the recipe's steps up to the sharded student
(FSDP2), and this process's resident memory before and at most after building it, as JSON.

    torchrun --nproc-per-node 2 tests/sharded_load_worker.py CONFIG.yaml RESULT_PREFIX
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

from linearize import distributed
from linearize.api import load_config
from linearize.pipeline import Recipe


def resident_bytes() -> int:
    """This process's resident memory now (not its peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(config_path: str, prefix: str) -> None:
    torch.set_num_threads(1)
    config = load_config(config_path, [])
    device = torch.device("cpu")
    distributed.init(device)
    recipe = Recipe(config, device, log=lambda message: None, fresh=True)
    recipe.prepare()
    recipe.plan()
    recipe.read_data()
    before = resident_bytes()
    recipe.load_teacher()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    local = sum(p.to_local().numel() * p.element_size() for p in recipe.model.parameters())
    out = {"rank": distributed.rank(), "before": before, "peak": peak, "local_bytes": local}
    with open(f"{prefix}.rank{distributed.rank()}.json", "w") as handle:
        json.dump(out, handle)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
