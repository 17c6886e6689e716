"""The launcher's environment, for every multi-process command (training, shards, retrieval, sampling):
(rank, world size) from what torchrun / accelerate launch set, and rank 0's wait for the files of the others
in jobs sharded by files rather than by a process group."""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from the RANK and WORLD_SIZE that torchrun / accelerate launch set, else (0, 1).
    A half-set launcher environment (one of the two) or a value that is not an integer is refused."""
    env = os.environ if environ is None else environ
    given = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if not given:
        return 0, 1
    if len(given) == 1:
        other = "WORLD_SIZE" if given[0] == "RANK" else "RANK"
        raise ValueError(f"{given[0]}={env[given[0]]} is set but {other} is not: a launcher (torchrun, accelerate "
                         "launch) sets both; set both or neither")
    values = {}
    for k in given:
        try:
            values[k] = int(env[k])
        except ValueError:
            raise ValueError(f"{k}={env[k]!r} is not an integer") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} outside WORLD_SIZE {world}")
    return rank, world


def wait_for_others(missing: Callable[[], int], what: str, timeout: float, world_size: int,
                    log: Callable[[str], None] | None = None) -> None:
    """Rank 0 of a file-sharded job (no process group: each rank writes its part, rank 0 combines): poll until
    ``missing()`` is 0. Nothing missing with one process is an error at once; a timeout says how to resume."""
    start, delay, last_log = time.monotonic(), 0.2, -1e9
    while True:
        n = missing()
        if not n:
            return
        if world_size == 1:
            raise RuntimeError(f"{n} {what} are missing after this process's work")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{n} {what} of the other processes are still missing after {timeout:.0f} s; rerun "
                               "the same command (one process resumes what is missing)")
        if log is not None and time.monotonic() - last_log > 60:
            log(f"rank 0: waiting for {n} {what} from the other {world_size - 1} processes")
            last_log = time.monotonic()
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


__all__ = ["shard_from_env", "wait_for_others"]
