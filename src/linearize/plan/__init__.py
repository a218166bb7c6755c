"""What a run needs and how long it takes, before it loads a weight, from the teacher's config.json alone.

- `sizes`: memory per process and disk per stage-1 store (exact counts and fitted estimates);
- `costs`: every op of a step counted on the meta device, and its time on given hardware;
- `hardware`: the devices a plan is made for (a table of common GPUs, or this machine's CPU measured);
- `layout`: every layout that fits the hardware, timed; the fastest suggested, why each other one loses.
"""

from linearize.plan.costs import Device, ModelCosts, OpCounts, model_costs
from linearize.plan.hardware import GPUS, KINDS, Hardware, described_hardware, reference_hardware, run_hardware
from linearize.plan.layout import (
    Estimate,
    Suggestion,
    count_costs,
    estimate_run,
    format_estimate,
    format_suggestion,
    suggest,
)
from linearize.plan.sizes import (
    ADAM_BYTES,
    DTYPE_BYTES,
    STORES,
    GiB,
    ModelShape,
    Plan,
    Stage1Plan,
    Stage2Plan,
    check_layers_per_block,
    choose_store,
    device_memory,
    disk_budget,
    format_plan,
    gib,
    model_shape,
    rows_of,
    stage1_plan,
    stage2_plan,
)

__all__ = [
    "ADAM_BYTES", "DTYPE_BYTES", "GPUS", "KINDS", "STORES", "Device", "Estimate", "GiB", "Hardware", "ModelCosts",
    "ModelShape", "OpCounts", "Plan", "Stage1Plan", "Stage2Plan", "Suggestion", "check_layers_per_block",
    "choose_store", "count_costs", "device_memory", "disk_budget", "estimate_run", "format_estimate", "format_plan",
    "format_suggestion", "gib", "described_hardware", "model_costs", "model_shape", "reference_hardware", "rows_of",
    "run_hardware", "stage1_plan", "stage2_plan", "suggest",
]
