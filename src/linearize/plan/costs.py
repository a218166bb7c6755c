"""What a run's steps cost, counted op by op on the meta device, and what they take on given hardware.

Every piece of work a stage repeats is run once on the meta device (shapes only: no memory, no arithmetic,
any model size) under a dispatch mode that records, for every op PyTorch runs (backward included), its
floating-point operations (`torch.utils.flop_counter`'s formulas: matmuls, attention) and the bytes it
reads and writes (its tensor arguments and results; views move nothing):

- `teacher`: one teacher decoder layer's forward, softmax attention, no gradient (stage 1's pass over the
  data, the recomputation `transfer.store` blocks / none imply, stage 2's teacher targets), its attention
  counted as the fused kernel it runs as (`FusedAttention`);
- `transfer`: a converted layer's `mix` (q/k/v projections and the mixer) forward and backward, and
  AdamW's step over the layer's mixer (stage 1's training);
- `student` / `student_forward`: a student decoder layer with its LoRA adapter, forward and backward with
  the gradient flowing through (stage 2), and the forward alone (what gradient checkpointing recomputes);
- `head` / `head_forward`: the final norm and the output layer with stage 2's losses, forward and backward;
  the same forward with the top-k the teacher targets keep.

An op's time on a device is the longer of its arithmetic at a fraction of the peak FLOP/s and its traffic
at a fraction of the memory bandwidth, plus a fixed cost per op (Python and dispatch; on a GPU, where
kernels are launched asynchronously, a floor instead). `Device` holds those numbers; the constants below
are how they were set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry


@dataclass
class OpCounts:
    """The ops of one piece of work: per op its FLOPs, bytes moved, and whether it computes in float32."""

    flops: list[float] = field(default_factory=list)
    bytes: list[float] = field(default_factory=list)
    float32: list[bool] = field(default_factory=list)

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(self.flops + other.flops, self.bytes + other.bytes, self.float32 + other.float32)

    @property
    def total_flops(self) -> float:
        return sum(self.flops)

    def seconds(self, device: Device) -> float:
        """The time these ops take on `device`, one after the other."""
        total = 0.0
        for flops, moved, wide in zip(self.flops, self.bytes, self.float32):
            peak = device.flops_float32 if wide else device.flops
            busy = max(flops / (peak * device.flop_utilisation), moved / (device.bandwidth *
                                                                             device.bandwidth_utilisation))
            total += max(busy, device.op_seconds) if device.asynchronous else busy + device.op_seconds
        return total


@dataclass(frozen=True)
class Device:
    """One device's speed as the time model uses it. flops / flops_float32: peak FLOP/s at the run's
    16-bit dtype and in float32; bandwidth: memory bytes/s; the utilisations: the fractions of them ops
    reach; op_seconds: the fixed cost of an op; asynchronous: kernels run behind the host's dispatch."""

    flops: float
    flops_float32: float
    bandwidth: float
    flop_utilisation: float
    bandwidth_utilisation: float
    op_seconds: float
    asynchronous: bool


class OpCounter(TorchDispatchMode):
    """Records every op dispatched inside it (run on meta tensors: shapes only) into `counts`."""

    def __init__(self):
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        moved = 0 if view else sum(t.numel() * t.element_size() for t in tensors)
        floating = [t for t in tensors if t.is_floating_point()]
        self.counts.flops.append(float(flops))
        self.counts.bytes.append(float(moved))
        self.counts.float32.append(bool(floating) and floating[0].dtype == torch.float32)
        return out


class FusedAttention(TorchFunctionMode):
    """Softmax attention without a gradient (the teacher's) as the one fused kernel it runs as on a device
    (flash attention: q, k and v read once, the output written once; causal: half the products), instead
    of the T x T matrices its decomposition on the meta device would count."""

    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or torch.is_grad_enabled():
            return func(*args, **kwargs)
        q, k, v = args[:3]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        causal = kwargs.get("is_causal", False) and q.shape[-2] == k.shape[-2]
        products = q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        self.counts.flops.append(2.0 * products * (0.5 if causal else 1.0))
        self.counts.bytes.append(float(sum(t.numel() * t.element_size() for t in (q, k, v, out))))
        self.counts.float32.append(q.dtype == torch.float32)
        return out


def count(work) -> OpCounts:
    """The ops `work()` runs (on meta tensors)."""
    with OpCounter() as counter, FusedAttention(counter.counts):
        work()
    return counter.counts


@dataclass
class LayerCosts:
    """The ops of one decoder layer's pieces of work at one batch size (see the module docstring)."""

    teacher: OpCounts
    transfer: OpCounts  # empty for a layer kept as the teacher's
    student: OpCounts
    student_forward: OpCounts


@dataclass
class ModelCosts:
    """Per decoder layer and for the output head, at `batch` sequences of `seq_len` tokens."""

    batch: int
    seq_len: int
    layers: list[LayerCosts]
    head: OpCounts
    head_forward: OpCounts


def model_costs(text_config, config, batch: int, dtype: torch.dtype | None = None) -> ModelCosts:
    """Count every piece of work of the run `config` (a RunConfig) on its teacher `text_config`, at `batch`
    sequences of `config.data.seq_len` tokens. Layers alike (converted or not, with or without a recall
    memory, the teacher's window) are counted once."""
    from peft import get_peft_model

    from linearize.devices import resolve_dtype
    from linearize.layers.attention import TOKEN_IDS, LinearizedAttention, attention_mode
    from linearize.methods import get_method
    from linearize.models import LinearizedForCausalLM
    from linearize.models.modeling import decoder_layers
    from linearize.placement import planned
    from linearize.teacher.streaming import empty_teacher
    from linearize.train.finetune import lora_config
    from linearize.train.targets import top_k_kl
    from linearize.train.transfer import position_embeddings

    dtype = dtype or resolve_dtype(config.dtype)
    seq_len, tune = config.data.seq_len, config.finetune
    with torch.random.fork_rng(devices=[]):
        teacher = empty_teacher(text_config, dtype)
        student = LinearizedForCausalLM.from_teacher(teacher, config.method, planned(config.attention, text_config),
                                                     device=torch.device("meta"))
        student.requires_grad_(False)
    layers = decoder_layers(student)
    first: dict[tuple, int] = {}  # each kind of layer, by its first index
    for index in range(len(layers)):
        first.setdefault(signature(layers[index], text_config, index), index)
    meta = torch.device("meta")
    hidden_size = text_config.hidden_size
    token_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=meta)
    positions = torch.arange(seq_len, device=meta)[None].expand(batch, -1)

    def hidden(grad: bool = False) -> torch.Tensor:
        return torch.empty(batch, seq_len, hidden_size, dtype=dtype, device=meta, requires_grad=grad)

    rotary = position_embeddings(student, hidden())

    def call(index: int, x: torch.Tensor) -> torch.Tensor:
        return layers[index](x, position_ids=positions, position_embeddings=rotary[index], use_cache=False,
                             **{TOKEN_IDS: token_ids})

    def teacher_pass(index: int) -> None:  # stage 2's teacher targets run it with the adapter disabled
        with torch.no_grad(), attention_mode(student, "softmax"):
            call(index, hidden())

    transfers = "transfer" in get_method(config.method).stages

    def transfer_step(index: int) -> None:
        attention = layers[index].self_attn
        if not transfers or not isinstance(attention, LinearizedAttention):
            return  # a method without stage 1, or a layer kept as the teacher's
        params = list(attention.mixer.parameters())
        trained = [p.requires_grad for p in params]
        for p in params:  # stage 1 trains every mixer parameter, whatever stage 2 does
            p.requires_grad_(True)
        attention.mix(hidden(), rotary[index], token_ids).float().pow(2).mean().backward()
        adam_step(params)
        for p, flag in zip(params, trained):
            p.requires_grad_(flag)

    def student_step(index: int) -> None:
        call(index, hidden(grad=True)).float().sum().backward()
        adam_step([p for p in layers[index].parameters() if p.requires_grad])

    def student_forward(index: int) -> None:
        call(index, hidden(grad=True))

    stage1 = {key: [count(partial(work, index)) for work in (teacher_pass, transfer_step)]
              for key, index in first.items()}  # before stage 2's adapter exists, as stage 1 runs
    adapter = lora_config(tune)
    adapter.layers_to_transform = sorted(first.values())  # the LoRA layers stage 2 trains, on those counted
    get_peft_model(student, adapter)
    if tune.train_mixers:
        for name, param in student.named_parameters():
            if ".mixer." in name:
                param.requires_grad_(True)
    counted = {key: LayerCosts(*stage1[key], *(count(partial(work, index)) for work in (student_step, student_forward)))
               for key, index in first.items()}
    costs = [counted[signature(layer, text_config, index)] for index, layer in enumerate(layers)]

    base = student.model
    top_k = tune.distill_top_k

    def head_step() -> None:
        logits = student.lm_head(base.norm(hidden(grad=True)))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), token_ids.flatten())
        if tune.distill_weight > 0 and top_k > 0:
            indices = torch.zeros(batch, seq_len, top_k, dtype=torch.long, device=meta)
            loss = loss + top_k_kl(logits, indices, torch.empty(batch, seq_len, top_k, device=meta))
        elif tune.distill_weight > 0:
            loss = loss + F.kl_div(logits.float().log_softmax(-1), logits.detach().float(), log_target=True,
                                   reduction="batchmean")
        loss.backward()

    def head_forward() -> None:
        with torch.no_grad():
            logits = student.lm_head(base.norm(hidden()))
            if top_k > 0:
                logits.float().log_softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)

    return ModelCosts(batch, seq_len, costs, count(head_step), count(head_forward))


def signature(layer: torch.nn.Module, text_config, index: int) -> tuple:
    """What makes one decoder layer's work differ from another's: converted or kept, its mixer and the
    branches it keeps (a recall memory and its size), the teacher's window."""
    from linearize.teacher.families import teacher_window

    mixer = getattr(layer.self_attn, "mixer", None)
    return (type(layer.self_attn).__name__, type(mixer).__name__, getattr(mixer, "branches", ()),
            getattr(mixer, "memory_buckets", 0), teacher_window(text_config, index))


def adam_step(params: list[torch.nn.Parameter]) -> None:
    """AdamW's arithmetic on `params` (meta): what the optimizer adds to a step."""
    for p in params:
        p.grad = torch.empty_like(p)
    torch.optim.AdamW(params, lr=1e-3, foreach=False).step()
    for p in params:
        p.grad = None
