"""The model room's command: ``presets`` (the paper's and the small stage configurations, with parameter counts
and, with --memory, the training memory per GPU)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def presets(
    paper_only: bool = typer.Option(False, help="Only the paper's configurations."),
    memory: bool = typer.Option(False, help="Also the training memory per GPU of each preset at fp32 and bf16, "
                                "with DDP and with FSDP over --gpus (reimagen.models.memory: computed on fake tensors)."),
    gpus: int = typer.Option(8, min=1, help="With --memory: the ranks FSDP shards over."),
    gpu_gb: float = typer.Option(80.0, min=1.0, help="With --memory: GPU memory in GiB, for the largest micro-batch."),
    optimizer: str = typer.Option("adamw", help="With --memory: adamw or adafactor."),
) -> None:
    """List stage presets with parameter counts (built on the meta device: no memory, no weights)."""
    from .config import PRESETS
    from .memory import OPTIMISER_BYTES, parameter_count

    if optimizer not in OPTIMISER_BYTES:
        raise typer.BadParameter(f"--optimizer must be one of {', '.join(OPTIMISER_BYTES)}, got {optimizer!r}")
    table = Table(title="stage presets")
    for col in ("preset", "resolution", "params", "paper", "note"):
        table.add_column(col)
    chosen = {name: p for name, p in PRESETS.items() if p.paper_params is not None or not paper_only}
    for name, p in chosen.items():
        c = p.config
        res = f"{c.lowres_size}->{c.image_size}" if c.is_super_resolution else f"{c.image_size}"
        table.add_row(name, res, f"{parameter_count(c) / 1e6:,.1f}M",
                      f"{p.paper_params / 1e6:,.0f}M" if p.paper_params else "-", p.note)
    Console().print(table)
    if memory:
        Console().print(_memory_table(chosen, gpus, gpu_gb, optimizer))


def _memory_table(chosen, gpus: int, gpu_gb: float, optimizer: str) -> Table:
    from .memory import GiB, estimate

    table = Table(title=f"training memory per GPU ({optimizer}, K = 2; GiB; max micro-batch on {gpu_gb:g} GiB, "
                        "2 GiB reserved)")
    for col in ("preset", "precision", "states DDP", f"states FSDP x {gpus}", "activations / sample",
                "max micro-batch DDP", f"max micro-batch FSDP x {gpus}"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for name, p in chosen.items():
        for precision in ("fp32", "bf16"):
            ddp = estimate(p.config, precision, optimizer=optimizer)
            fsdp = estimate(p.config, precision, gpus, fsdp=True, optimizer=optimizer)
            table.add_row(name, precision, f"{(ddp.states_bytes + ddp.weight_copy_bytes) / GiB:.2f}",
                          f"{fsdp.states_bytes / GiB:.2f}", f"{ddp.activation_bytes / GiB:.3f}",
                          str(ddp.max_micro_batch(gpu_gb * GiB)), str(fsdp.max_micro_batch(gpu_gb * GiB)))
    return table


COMMANDS = [("presets", presets)]
