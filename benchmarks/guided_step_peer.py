"""The peer of ``guided_step.py --peer``: imagen-pytorch's ``Unet`` in its own venv, run as a worker subprocess
(``guided_step.py --_peer-worker``) that answers timing requests over stdin/stdout, so that its repeats interleave
with ours. Only the standard library is imported at the top: the worker's venv has torch and imagen-pytorch, not
this project."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = "/tmp/peer/bin/python"
PEER_SETUP = ("python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -c /work/main/constraints.txt "
              "torch==2.13.0 imagen-pytorch==2.1.0")


def _peer_import_unet():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_reimagen_compat", REPO / "reimagen" / "_compat.py")
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)  # type: ignore[union-attr]
    compat.patch_torchvision_if_broken()  # CUDA torchvision 0.28 wheel next to the CPU torch
    import transformers
    from transformers import T5Config

    # imagen_pytorch reads T5Config.from_pretrained('google/t5-v1_1-base') at import time (offline: fails).
    transformers.T5Config.from_pretrained = lambda *a, **k: T5Config(d_model=768)  # type: ignore[assignment]
    import warnings

    warnings.filterwarnings("ignore")
    from imagen_pytorch import Unet

    return Unet


def peer_worker(args: argparse.Namespace) -> int:
    """Serve timing requests on stdin: 'time N' -> one JSON line of N per-step seconds; 'quit' ends."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints advice at construction
        Unet = _peer_import_unet()
        import imagen_pytorch

        torch.manual_seed(args.seed)
        mults = tuple(int(v) for v in args.peer_dim_mults.split(","))
        unet = Unet(dim=args.peer_dim, dim_mults=mults, num_resnet_blocks=args.peer_resnet_blocks,
                    text_embed_dim=args.text_dim, cond_dim=args.peer_cond_dim).eval()
    b, s, n = args.batch, args.image_size, args.text_len
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(b, 3, s, s, generator=g)
    times = torch.rand(b, generator=g)
    text = torch.randn(b, n, args.text_dim, generator=g)
    lengths = torch.randint(max(1, n // 4), n + 1, (b,), generator=g)
    mask = torch.arange(n)[None] < lengths[:, None]

    def step():
        with torch.no_grad():
            return unet.forward_with_cond_scale(x, times, text_embeds=text, text_mask=mask, cond_scale=3.0)

    flops = _count_flops(step)
    for _ in range(args.warmup):
        step()
    info = {"ready": True, "params": sum(p.numel() for p in unet.parameters()), "flops": flops,
            "version": getattr(imagen_pytorch, "__version__", None) or _dist_version("imagen-pytorch"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "config": {"dim": args.peer_dim, "dim_mults": list(mults), "num_resnet_blocks": args.peer_resnet_blocks,
                       "text_embed_dim": args.text_dim, "cond_dim": args.peer_cond_dim}}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "time":
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(int(cmd[1])):
                step()
            print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}), flush=True)
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


class PeerClient:
    """The peer worker subprocess: started once, asked for one timed run at a time."""

    def __init__(self, args: argparse.Namespace, image_size: int, text_dim: int):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [args.peer_python, str(Path(__file__).resolve()), "--_peer-worker", "--batch", str(args.batch),
               "--threads", str(args.threads), "--warmup", str(max(1, args.warmup)), "--seed", str(args.seed),
               "--text-len", str(args.text_len), "--_image-size", str(image_size), "--_text-dim", str(text_dim),
               "--peer-dim", str(args.peer_dim), "--peer-dim-mults", args.peer_dim_mults,
               "--peer-resnet-blocks", str(args.peer_resnet_blocks), "--peer-cond-dim", str(args.peer_cond_dim)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=tempfile.gettempdir())
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = "".join(self.stderr.read().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"the peer worker exited with code {self.proc.returncode}:\n{tail}")
        return json.loads(line)

    def time(self, steps: int) -> dict:
        """Wall and CPU seconds of ``steps`` guided steps."""
        self.proc.stdin.write(f"time {steps}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self.stderr.close()


# ----------------------------------------------------------------------------------------------
# The main benchmark (project venv)
# ----------------------------------------------------------------------------------------------


def _count_flops(fn) -> int | None:
    """Conv/matmul/attention FLOPs of one call (torch's FlopCounterMode; norms and pointwise ops not counted)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())
    except Exception:  # noqa: BLE001
        return None
