"""The hardware a plan is made for: how many devices, their memory, speed and links, and the disk.

A device kind names a row of `GPUS` (peak dense FLOP/s from the vendors' data sheets, without sparsity;
memory bandwidth; the link between the devices of a node) or "cpu": this machine, whose matmul rate and
memory bandwidth `measure_cpu` measures on the spot (under a second). Explicit `tflops` / `bandwidth`
describe any other device.

How much of those peaks a step reaches is not in a data sheet. On a CPU it was measured (fitted to the
pieces of the default run's steps on this project's CPU, fp32: bench/plan_time.py); on a GPU it is assumed,
since no GPU was at hand to measure: 40% of the peak FLOP/s (large-model training reaches 38-43% of an H100's BF16
peak: the Llama 3 report, section 3.3.4), 70% of the memory bandwidth, and 10 microseconds per op launched
(eager PyTorch's dispatch and kernel launch, overlapped with the kernels themselves).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from linearize.errors import LinearizeError
from linearize.plan.costs import Device

GiB = float(1 << 30)
TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class Gpu:
    """A data sheet's numbers: peak dense TFLOP/s in bf16 and in fp32 (no tensor cores), GiB of memory,
    memory bandwidth and the link to the node's other devices (NVLink / Infinity Fabric / PCIe), GB/s."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    memory_gib: float
    bandwidth_gbs: float
    link_gbs: float


GPUS = {
    "h100": Gpu("H100 SXM 80GB", 989.4, 66.9, 80, 3350, 450),
    "h200": Gpu("H200 SXM 141GB", 989.4, 66.9, 141, 4800, 450),
    "a100-40": Gpu("A100 SXM 40GB", 312, 19.5, 40, 1555, 300),
    "a100-80": Gpu("A100 SXM 80GB", 312, 19.5, 80, 2039, 300),
    "l40s": Gpu("L40S 48GB", 362, 91.6, 48, 864, 32),
    "mi300x": Gpu("MI300X 192GB", 1307.4, 163.4, 192, 5300, 448),
}
KINDS = (*GPUS, "cpu")
# between nodes: one 400 Gb/s InfiniBand NDR adapter per GPU, as in a DGX H100 (an assumption for every kind)
INTER_NODE_BYTES = 50 * GIGA
DISK_BYTES = 2 * GIGA  # reading or writing stored activations: an NVMe drive's sequential rate (assumed)

GPU_FLOP_UTILISATION = 0.40
GPU_BANDWIDTH_UTILISATION = 0.70
GPU_OP_SECONDS = 10e-6
# Fitted on this project's CPU (a 2-vCPU Intel Xeon with AVX-512, torch 2.13, fp32; `python bench/plan_time.py
# --fit --threads 1 --clock cpu`): each piece of a step (a teacher layer, a transfer step with and without a
# recall memory, a stage-2 layer step, its forward, the head) timed on the real SmolLM2-135M beside its ops
# counted, against the measured 1-thread matmul rate (151 GFLOP/s) and 4 MiB copy bandwidth (23 GB/s). The
# error is flat around these values (0.7-0.8 of the FLOP/s, 0.4-0.5 of the bandwidth, 0-12 us per op: every
# piece within 0.8-1.2); with them a short run (8,192 + 4,096 tokens, 1 thread, timed by CPU time) measured
# stage 1 in 103.8 s (estimate 103.7 s) and stage 2 in 37.5 s (estimate 42.2 s). docs/scale.md has the tables.
CPU_FLOP_UTILISATION = 0.70
CPU_BANDWIDTH_UTILISATION = 0.50
CPU_OP_SECONDS = 12e-6


@dataclass(frozen=True)
class Hardware:
    """`devices` devices (processes), `per_node` to a node, each with `memory` bytes and `device`'s speed;
    `link`: bytes/s between two devices of a node; `disk`: free bytes where the run writes."""

    name: str
    kind: str  # a key of GPUS, "cpu", or "custom"
    devices: int
    per_node: int
    memory: float
    disk: float
    device: Device
    link: float

    @property
    def nodes(self) -> int:
        return math.ceil(self.devices / self.per_node)

    def link_between(self, processes: int) -> float:
        """Bytes/s each process exchanges with the others at: within a node, or across nodes."""
        return self.link if processes <= self.per_node else min(self.link, INTER_NODE_BYTES)

    def rates(self) -> str:
        """How the time model treats one op on this hardware, in words."""
        d = self.device
        source = "fitted on a 2-core CPU" if self.kind == "cpu" else "assumed: no GPU measured"
        per_op = "floor" if d.asynchronous else "cost"
        return (f"every op's FLOPs at {d.flop_utilisation:.0%} of the peak FLOP/s or its bytes at "
                f"{d.bandwidth_utilisation:.0%} of the memory bandwidth, whichever takes longer, and a "
                f"{d.op_seconds * 1e6:.0f} us {per_op} per op; {source}, linearize/plan/hardware.py")

    def describe(self) -> str:
        d = self.device
        nodes = f" on {self.nodes} nodes of {self.per_node}" if self.nodes > 1 else ""
        speed = f"{d.flops / TERA:.0f}" if d.flops >= TERA else f"{d.flops / TERA:.2f}"
        return (f"{self.devices} x {self.name}{nodes}: {self.memory / GiB:.0f} GiB, {speed} TFLOP/s peak, "
                f"{d.bandwidth / GIGA:,.0f} GB/s each; disk {gib_text(self.disk)} free")


def gib_text(value: float) -> str:
    return f"{value / GiB / 1024:.1f} TiB" if value >= 1000 * GiB else f"{value / GiB:.0f} GiB"


def measure_cpu(dtype: torch.dtype = torch.float32, threads: int | None = None) -> tuple[float, float]:
    """This CPU's matmul rate (FLOP/s, `dtype`, 1024 x 1024 products, best of a few) and copy bandwidth
    (bytes read and written per second, best of a few), with `threads` threads (default: torch's). The copy
    is of 4 MiB: the size of a step's activations on a small model, which stay in the CPU's caches; the
    bandwidth a step's ops see is that, not main memory's."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        torch.mm(a, b)  # warm up
        best = math.inf
        for _ in range(10):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        flops = 2 * 1024**3 / best
        source = torch.ones(1 << 20, dtype=torch.float32)
        target = torch.empty_like(source)
        target.copy_(source)
        best = math.inf
        for _ in range(20):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
        bandwidth = 2 * source.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)
    return flops, bandwidth


def machine_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def described_hardware(kind: str | None, devices: int, per_node: int | None, memory_gib: float | None,
                       disk_gib: float | None, free_disk: float, dtype: str = "bfloat16", tflops: float | None = None,
                       bandwidth_gbs: float | None = None) -> Hardware:
    """The hardware the `linearize plan` options describe, checked: a known `kind` (its data sheet; `memory_gib`,
    `tflops`, `bandwidth_gbs` override it), "cpu" (this machine, measured now: each of `devices` processes on
    its share of the cores), or no kind with explicit `tflops`, `bandwidth_gbs` and `memory_gib`; no kind and
    no numbers: an H100. `free_disk`: bytes free where the run writes, unless `disk_gib` is given."""
    for name, value in (("--devices", devices), ("--per-node", per_node), ("--memory", memory_gib),
                        ("--disk", disk_gib), ("--tflops", tflops), ("--bandwidth", bandwidth_gbs)):
        if value is not None and not value > 0:
            raise LinearizeError(f"{name} must be greater than 0, got {value:g}: give {HINTS[name]}")
    per_node = per_node or min(devices, 8)
    disk = disk_gib * GiB if disk_gib is not None else free_disk
    if not disk > 0:
        raise LinearizeError(f"the file system where the run writes has {disk / GiB:.1f} GiB free: free some space, "
                             "or give the disk the run will have with --disk GIB")
    numbers = tflops is not None and bandwidth_gbs is not None and memory_gib is not None
    if kind is not None and kind not in KINDS and not numbers:
        raise LinearizeError(f"unknown device kind '{kind}': known are {', '.join(KINDS)}; for another device give "
                             f"{HINTS['--tflops']} (--tflops), {HINTS['--bandwidth']} (--bandwidth) and "
                             f"{HINTS['--memory']} (--memory)")
    if kind == "cpu":
        threads = max(1, (os.cpu_count() or 1) // devices)
        measured, copy = measure_cpu(getattr(torch, dtype), threads)
        peak = tflops * TERA if tflops else measured
        speed = Device(peak, peak, bandwidth_gbs * GIGA if bandwidth_gbs else copy, CPU_FLOP_UTILISATION,
                       CPU_BANDWIDTH_UTILISATION, CPU_OP_SECONDS, False)
        memory = memory_gib * GiB if memory_gib else machine_memory() / devices
        return Hardware(f"CPU process ({threads} thread(s), measured)", "cpu", devices, per_node, memory, disk, speed,
                        copy / 2)
    if kind is None and (tflops is not None or bandwidth_gbs is not None):
        if not numbers:
            raise LinearizeError(f"a device given by its numbers needs all of {HINTS['--tflops']} (--tflops), "
                                 f"{HINTS['--bandwidth']} (--bandwidth) and {HINTS['--memory']} (--memory), "
                                 "or a known kind (--gpu)")
        kind = "custom"
    kind = kind or "h100"
    # a kind the table does not know is its numbers, linked to the others as across nodes
    gpu = GPUS.get(kind) or Gpu(f"{kind} device", tflops, tflops, memory_gib, bandwidth_gbs, INTER_NODE_BYTES / GIGA)
    peak = tflops or (gpu.fp32_tflops if dtype == "float32" else gpu.bf16_tflops)
    speed = Device(peak * TERA, (tflops or gpu.fp32_tflops) * TERA, (bandwidth_gbs or gpu.bandwidth_gbs) * GIGA,
                   GPU_FLOP_UTILISATION, GPU_BANDWIDTH_UTILISATION, GPU_OP_SECONDS, True)
    return Hardware(gpu.name, kind, devices, per_node, (memory_gib or gpu.memory_gib) * GiB, disk, speed,
                    gpu.link_gbs * GIGA)


HINTS = {
    "--devices": "the number of GPUs (or CPU processes) the run gets",
    "--per-node": "how many devices share a node",
    "--memory": "the GiB of memory of one device",
    "--disk": "the GiB free where the run writes (default: what output_dir's file system has)",
    "--tflops": "the device's peak TFLOP/s at the run's dtype",
    "--bandwidth": "the device's memory bandwidth in GB/s",
}


def kind_of_gpu(name: str) -> str | None:
    """The table's kind for a GPU's device name (torch.cuda.get_device_name), None when it is not there."""
    lowered = name.lower().replace(" ", "")
    for kind, marker in (("h200", "h200"), ("h100", "h100"), ("mi300x", "mi300x"), ("l40s", "l40s")):
        if marker in lowered:
            return kind
    if "a100" in lowered:
        return "a100-40" if "40gb" in lowered else "a100-80"
    return None


def run_hardware(device: torch.device, processes: int, dtype: str, disk: float) -> Hardware | None:
    """The hardware a run is on: this CPU measured (each process its own threads), or its GPU from the
    table; None for a GPU the table does not know (the run then prints no estimate)."""
    if device.type == "cuda":
        kind = kind_of_gpu(torch.cuda.get_device_name(device))
        if kind is None:
            return None
        memory = torch.cuda.get_device_properties(device).total_memory / GiB
        return described_hardware(kind, processes, None, memory, None, disk, dtype)
    flops, bandwidth = measure_cpu(getattr(torch, dtype))
    device_speed = Device(flops, flops, bandwidth, CPU_FLOP_UTILISATION, CPU_BANDWIDTH_UTILISATION, CPU_OP_SECONDS,
                          False)
    return Hardware(f"CPU ({torch.get_num_threads()} threads)", "cpu", processes, processes, machine_memory(), disk,
                    device_speed, bandwidth / 2)


def reference_hardware(kind: str, processes: int) -> Hardware:
    """Fixed hardware of `kind` ("cpu" or "cuda"): what stage 1 weighs its blocks on when it assigns them to
    ranks (every rank must reach the same assignment, so nothing measured)."""
    if kind == "cpu":
        speed = Device(100e9, 100e9, 10e9, CPU_FLOP_UTILISATION, CPU_BANDWIDTH_UTILISATION, CPU_OP_SECONDS, False)
        return Hardware("reference CPU", "cpu", processes, processes, math.inf, math.inf, speed, 5e9)
    return described_hardware("h100", processes, None, None, math.inf, math.inf)
