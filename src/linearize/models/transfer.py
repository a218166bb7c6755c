"""What a converted model took from its teacher: each tensor copied (from which teacher tensor) or new.

XATL's claim rests on this table (every shared component copied, only the new mixer parts initialised);
for the attention-swapping methods it shows how little conversion adds.
"""

from __future__ import annotations

from torch import nn


def teacher_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a (not yet converted) teacher."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def transfer_table(teacher: dict[str, tuple[int, ...]], student: nn.Module, copied: bool = True) -> list[dict]:
    """One row per student tensor: name, shape, source (the teacher tensor it was copied from, or "new").
    A converted layer keeps the teacher's projections under the same names, so a tensor is copied when the
    teacher had it with the same shape; `copied=False` (a random-init control) marks everything new."""
    rows = []
    for name, p in student.named_parameters():
        shape = tuple(p.shape)
        source = teacher.get(name)
        if source is not None and source != shape:
            from linearize.errors import LinearizeError

            raise LinearizeError(f"student tensor {name} {shape} cannot take teacher tensor {name} {source}")
        rows.append({
            "name": name, "shape": shape, "numel": p.numel(),
            "source": name if (copied and source is not None) else "new",
        })
    return rows


def transfer_counts(rows: list[dict]) -> dict[str, int]:
    copied = [r for r in rows if r["source"] != "new"]
    new = [r for r in rows if r["source"] == "new"]
    return {
        "copied_tensors": len(copied), "copied_parameters": sum(r["numel"] for r in copied),
        "new_tensors": len(new), "new_parameters": sum(r["numel"] for r in new),
    }


def format_transfer_table(rows: list[dict]) -> str:
    counts = transfer_counts(rows)
    lines = [
        f"# Transfer table\n\ncopied from the teacher: {counts['copied_tensors']} tensors, "
        f"{counts['copied_parameters']:,} parameters; new: {counts['new_tensors']} tensors, "
        f"{counts['new_parameters']:,} parameters\n",
        "| tensor | shape | from |", "|---|---|---|",
    ]
    lines += [f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['source']} |" for r in rows]
    return "\n".join(lines) + "\n"
