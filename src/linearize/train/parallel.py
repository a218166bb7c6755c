"""How stage 2 spreads over processes: PyTorch's own engines, chosen by `finetune.parallel`.

- `Local`: one process. The model as it is; this process writes the checkpoints.
- `Replicated` (DDP): every rank holds the whole model and takes its share of every global batch
  (`finetune.batch_size` sequences, a multiple of the number of ranks); DistributedDataParallel averages
  the gradients during backward, so every rank takes the same optimizer step. Rank 0 writes checkpoints
  (the values are the same everywhere) and every rank reads them on resume.
- `Sharded` (FSDP2, `torch.distributed.fsdp.fully_shard`): every decoder layer and the root are sharded
  over the ranks, so weights, gradients and optimizer state take 1/N of the memory each; the forward and
  backward passes gather one layer at a time. Checkpoints hold the trainable parameters and their
  optimizer state as full tensors (gathered to rank 0, written as safetensors), so they resume on any
  number of ranks, as DDP's do.

Only bookkeeping is ours (which rows a rank takes, who writes); gradients move through DDP and FSDP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

import linearize.distributed as distributed
from linearize.checkpoint import (
    atomic_replace_dir,
    load_params_strict,
    load_tensors,
    load_train_state,
    save_train_state,
)
from linearize.errors import LinearizeError

PARALLEL = ("auto", "ddp", "fsdp")


class Local:
    sharded = False

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls."""
        return model

    def share(self, batch: list[int]) -> list[int]:
        """This rank's rows of a global batch."""
        return batch

    def mean(self, value: float) -> float:
        return value

    def save_state(self, state_dir: Path, model: nn.Module, params: dict, optimizer, scheduler, progress) -> None:
        save_train_state(state_dir, params, optimizer, scheduler, progress)

    def load_state(self, state_dir: Path, model: nn.Module, params: dict, optimizer, scheduler) -> dict | None:
        saved = load_train_state(state_dir)
        if saved is None:
            return None
        tensors, optimizer_state, scheduler_state, progress = saved
        load_params_strict(params, tensors, f"resume state in {state_dir}")
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        return progress

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """None: the model itself holds its trained tensors, whole (see `Sharded`)."""
        return None


class Replicated(Local):
    """DistributedDataParallel: the whole model on every rank, the batch split, gradients averaged."""

    def __init__(self, device: torch.device):
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # a method may leave some of its parameters out of a forward (LoLCATS' window factor without a window)
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def share(self, batch: list[int]) -> list[int]:
        if len(batch) % distributed.world():
            raise LinearizeError(f"a batch of {len(batch)} sequences does not split over {distributed.world()} "
                                 "processes: set finetune.batch_size to a multiple of the number of processes")
        return batch[distributed.rank() :: distributed.world()]

    def mean(self, value: float) -> float:
        return distributed.mean(value)

    def save_state(self, state_dir, model, params, optimizer, scheduler, progress) -> None:
        if distributed.is_main():
            super().save_state(state_dir, model, params, optimizer, scheduler, progress)
        distributed.barrier()


class Sharded(Replicated):
    """FSDP2: every decoder layer and the root sharded over the ranks (a 1-D device mesh)."""

    sharded = True

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from linearize.models.modeling import decoder_layers

        if isinstance(model, FSDPModule):
            return model
        mesh = init_device_mesh(self.device.type, (distributed.world(),))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def shard(self, model: nn.Module, weights=None) -> nn.Module:
        """Shard `model` over the ranks, each rank filling only its own shards: a parameter the teacher's files
        hold (`weights`, a `linearize.teacher.FileWeights`) is read by every rank for its own rows alone; every
        other one (the mixers, the adapter; without `weights`, all) is scattered from rank 0's model. No rank
        ever holds the teacher whole, and no rank but 0 holds anything else whole. Its parameters may be on
        the meta device or storage-free (`linearize.teacher.streaming.without_storage`) wherever their values
        come from the files or, on ranks other than 0, from rank 0."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # computed, not stored
        sources = dict(model.named_parameters())  # rank 0's values, kept while the model goes to meta
        to_meta(model)
        self.wrap(model)
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
            for name, param in model.named_parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                stored = weights.stored(name) if weights is not None else None
                if stored is not None:
                    start, stop = rows_of_rank(param.shape[0], local.shape[0], param)
                    local.copy_(weights.read_rows(stored, start, stop))
                    continue
                source = sources[name]
                full = source.detach() if distributed.is_main() else torch.empty(source.shape, dtype=source.dtype)
                full = full.to(device=self.device, dtype=param.dtype)
                if isinstance(param, DTensor):
                    full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0).to_local()
                local.copy_(full)
        return model

    def load_full(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Load full tensors (every rank holds them: read from a shared file) into their shards, each rank
        keeping its own slice (no communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for name, full in tensors.items():
                param = model.get_parameter(name)
                if isinstance(param, DTensor):
                    full = full.to(device=param.device, dtype=param.dtype)
                    mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(mine.to_local())
                else:
                    param.copy_(full)

    def save_state(self, state_dir, model, params, optimizer, scheduler, progress) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        tensors = {k: v for k, v in get_model_state_dict(model, options=full).items() if k in params}
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
        if distributed.is_main():
            write_sharded_state(state_dir, tensors, optimizer_state, scheduler.state_dict(), progress)
        distributed.barrier()

    def load_state(self, state_dir, model, params, optimizer, scheduler) -> dict | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (state_dir / "state.json").is_file():
            return None
        tensors, optimizer_state, rest = read_sharded_state(state_dir)
        unknown, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        if unknown or missing:
            raise LinearizeError(f"resume state in {state_dir} does not match the model (unexpected {unknown[:3]}, "
                                 f"missing {missing[:3]}): it was saved for another model or config")
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, tensors, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        scheduler.load_state_dict(rest["scheduler"])
        return rest["progress"]

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Full tensors of the trainable and the mixer parameters, gathered to rank 0's CPU one at a time
        (None on other ranks): what an adapter-only save holds."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, param in model.named_parameters():
            if param.requires_grad or ".mixer." in name:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                if distributed.is_main():
                    out[name] = full.detach().cpu()
        return out if distributed.is_main() else None


def rows_of_rank(rows: int, local_rows: int, param) -> tuple[int, int]:
    """The rows [start, stop) of a parameter of `rows` rows (its first dimension) that this rank's shard holds:
    FSDP2 splits dimension 0 as torch.chunk does (ceil(rows / N) rows each, the last ranks fewer or none)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, rows
    if tuple(param.placements) != (Shard(0),):
        raise LinearizeError(f"a sharded parameter placed as {param.placements}: only FSDP2's Shard(0) is read "
                             "from the files rank by rank")
    per_rank = -(-rows // distributed.world())
    start = min(rows, distributed.rank() * per_rank)
    stop = min(rows, start + per_rank)
    if stop - start != local_rows:
        raise LinearizeError(f"this rank's shard holds {local_rows} of {rows} rows, expected rows {start}-{stop}")
    return start, stop


def to_meta(model: nn.Module) -> None:
    """Every parameter replaced by an empty one on the meta device (ties and requires_grad kept)."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in replaced:
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                replaced[id(param)] = nn.Parameter(empty, requires_grad=param.requires_grad)
            module._parameters[key] = replaced[id(param)]


def write_sharded_state(state_dir: Path, tensors: dict, optimizer_state: dict, scheduler_state: dict,
                        progress: dict) -> None:
    """A resumable snapshot of full tensors keyed by parameter name (safetensors + JSON), atomically."""
    from safetensors.torch import save_file

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moments, scalars = {}, {}
    for name, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0:
                moments[f"{name}::{key}"] = value.contiguous()
            else:
                scalars[f"{name}::{key}"] = value.item() if torch.is_tensor(value) else value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "params.safetensors"))
    save_file(moments, str(tmp / "optimizer.safetensors"))
    state = {"format": "full", "param_groups": optimizer_state["param_groups"], "scalars": scalars,
             "scheduler": scheduler_state, "progress": progress}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic_replace_dir(tmp, state_dir)


def read_sharded_state(state_dir: Path) -> tuple[dict, dict, dict[str, Any]]:
    try:
        rest = json.loads((state_dir / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise LinearizeError(f"resume state '{state_dir}/state.json' is corrupt ({err}); delete {state_dir}") from err
    tensors = load_tensors(state_dir / "params.safetensors")
    state: dict[str, dict] = {}
    for flat, value in list(load_tensors(state_dir / "optimizer.safetensors").items()) + list(rest["scalars"].items()):
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = torch.tensor(value) if key == "step" else value
    return tensors, {"state": state, "param_groups": rest["param_groups"]}, rest


def engine_for(tune, fits: bool, device: torch.device) -> Local:
    """The engine stage 2 runs on: Local for one process; with several, `finetune.parallel` (auto: DDP when
    the whole model `fits` one device, as the plan estimates, else FSDP2)."""
    if tune.parallel not in PARALLEL:
        raise LinearizeError(f"finetune.parallel must be one of {', '.join(PARALLEL)}, got '{tune.parallel}'")
    if distributed.world() == 1:
        return Local()
    if tune.parallel == "fsdp" and tune.full:
        raise LinearizeError("finetune.full (every weight trains, saved whole) runs replicated: set finetune.parallel "
                             "to ddp, or train LoRA adapters (finetune.full: false) when the model must be sharded")
    if tune.unfreeze_threshold is not None:
        raise LinearizeError("finetune.unfreeze_threshold (progressive unfreezing) changes which weights train in "
                             "the middle of a run, which DDP and FSDP do not follow: run it in one process")
    choice = tune.parallel
    if choice == "auto":
        choice = "ddp" if fits or tune.full else "fsdp"
    return Sharded(device) if choice == "fsdp" else Replicated(device)
