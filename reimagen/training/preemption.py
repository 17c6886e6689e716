"""Pre-emption: a cluster's SIGTERM (torchrun forwards it to every worker; Kubernetes, and SLURM at the end of
a job's time) or SLURM's SIGUSR1 (``sbatch --signal=USR1@120``) asks a job to stop within a grace period. Here
it only sets a flag: the step in flight finishes, every rank agrees (the flag is all-reduced after each step,
so ranks that saw the signal a step apart still stop at the same step), the checkpoint is written and the
process exits with ``EXIT_PREEMPTED``. Rerunning the same command resumes from that checkpoint, as Lightning,
Composer and torchtitan do on the same signals."""

from __future__ import annotations

import signal
import threading

#: The exit code of a pre-empted run that saved its checkpoint: EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing its checkpoint."""

    def __init__(self, signame: str, step: int, checkpoint: str | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no output folder)"
        super().__init__(f"stopped by {signame} after step {step}; {where}; rerun the same command to resume")


class PreemptionGuard:
    """While active, SIGTERM / SIGUSR1 set ``signame`` instead of ending the process; the previous handlers come
    back on exit. Signal handlers can only be set from the main thread: elsewhere the guard does nothing."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signame = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()


__all__ = ["EXIT_PREEMPTED", "SIGNALS", "Preempted", "PreemptionGuard"]
