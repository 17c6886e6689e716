#!/usr/bin/env python
"""Speed of ONE guided sampling step: Re-Imagen's interleaved guidance (Eq. 6), K neighbours, batch B.

Two ways of computing the same thing, measured in the same run and interleaved repeat by repeat:

* ours   what ``reimagen.sampling.sample_stage`` does: the text projection and the neighbour memory
         f(c_n, 0) (``model.encode_neighbours``, the neighbour cache) are computed once per sample, before
         the loop; each step is one batched forward of 2*B rows (the full branch plus, per row, the
         partial branch its draw R selects), then ``guidance.combine``.
* naive  per step and per guidance branch separately (two forwards of B rows): re-project the prompt and
         the neighbour texts, re-encode the K neighbours through the DStack, run the forward; then the
         same Eq. 6 combination (``guidance.combine`` -> ``guidance.interleaved``).

Rows of the table:

* ours, sample_stage            ``project_text`` x 2 + ``encode_neighbours`` + ``sample_stage(steps)``,
                                divided by ``steps``: the once-per-sample encoding is amortised over
                                ``--steps`` steps (a DDPM update and dynamic thresholding are included).
* ours, sample_stage @256       the same loop per step + the encoding divided by 256 (the paper's
                                EntityDrawBench setting for the 64x64 stage); encoding timed separately.
* naive, full step              the sample_stage loop with the naive guided eps (same DDPM update).
* ours / naive, eps only        hand-rolled loops of just the guided eps (plan, forward(s), combine).
* encode once                   prompt + neighbour text projection and f(c_n, 0), once per sample.

Correctness is asserted before timing: for one step with the same draws, ours and naive give the same
guided eps (allclose), and sample_stage and the naive sampler give the same images for the same seeds.
The network's zero-initialised output layers are re-initialised at random first, otherwise every branch
would predict eps = 0 and the check would be vacuous.

``--peer`` adds a row for imagen-pytorch (``Unet.forward_with_cond_scale``, plain text CFG) at about the
same parameter count, against our model's text-only guided step (``JointGuidance(w=3,
use_neighbours=False)``: one batched forward of 2*B rows, neighbours dropped). The peer runs in its own
venv (``/tmp/peer``) as a subprocess driven over stdin/stdout, so its repeats interleave with ours.

The stage is ``--preset`` (default ``small-32-eff``, 8.32M parameters, whose DStack is 55% of a forward;
``small-32``, the same widths with the UStack 2.5x the DStack, gains less: benchmarks/README.md).
``--flops-only`` checks correctness, counts FLOPs and stops (no timing).

Run: ``make bench`` or ``.venv/bin/python benchmarks/guided_step.py [--preset P] [--peer] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = "/tmp/peer/bin/python"
PEER_SETUP = ("python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -c /work/main/constraints.txt "
              "torch==2.13.0 imagen-pytorch==2.1.0")
PAPER_STEPS = 256  # EntityDrawBench, 64x64 stage (Sec. 4.2)
TARGET_RATIO = 1.8


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-32-eff",
                   help="reimagen.config preset of the stage (default small-32-eff; small-32 is the "
                        "guided-diffusion-style U-Net of the same size, see benchmarks/README.md)")
    p.add_argument("--batch", type=int, default=8, help="B, samples per batch (default 8)")
    p.add_argument("--k", type=int, default=2, help="K, retrieved neighbours per sample (default 2)")
    p.add_argument("--text-len", type=int, default=16, help="n, text tokens per prompt (default 16)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per timed run (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per measurement (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2 = the machine's cores)")
    p.add_argument("--max-other-cores", type=float, default=None,
                   help="redo a timed run if other processes used more than this many cores meanwhile "
                        "(e.g. 0.1 on a shared machine; default: keep every run)")
    p.add_argument("--max-retries", type=int, default=20, help="redos per timed run with --max-other-cores")
    p.add_argument("--retry-wait", type=float, default=5.0, help="seconds to wait before a redo (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--flops-only", action="store_true",
                   help="check correctness, count FLOPs and stop: no timing (fine while the machine is busy)")
    p.add_argument("--peer", action="store_true", help="also time imagen-pytorch in the peer venv")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help=f"peer interpreter (default {DEFAULT_PEER_PYTHON})")
    p.add_argument("--peer-dim", type=int, default=44, help="imagen-pytorch Unet dim (default 44: ~8.6M params)")
    p.add_argument("--peer-dim-mults", default="1,2,4", help="imagen-pytorch Unet dim_mults (default 1,2,4)")
    p.add_argument("--peer-resnet-blocks", type=int, default=1, help="imagen-pytorch num_resnet_blocks (default 1)")
    p.add_argument("--peer-cond-dim", type=int, default=128, help="imagen-pytorch cond_dim (default 128)")
    p.add_argument("--_peer-worker", dest="peer_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_image-size", dest="image_size", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--_text-dim", dest="text_dim", type=int, default=384, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "k", "text_len", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _fmt(s: float | None) -> str:
    return "-" if s is None else f"{s:.4f}"


# ----------------------------------------------------------------------------------------------
# The peer: imagen-pytorch, run by the peer venv's interpreter (no reimagen import here, only the
# torchvision workaround loaded from its file, so the peer venv needs nothing of this project).
# ----------------------------------------------------------------------------------------------
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


def _count_flops(fn) -> int | None:
    """Conv/matmul/attention FLOPs of one call (torch's FlopCounterMode; norms and pointwise ops not counted)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())
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
def run(args: argparse.Namespace) -> int:
    # Run from anywhere: benchmarks/ is sys.path[0] when run as a script, not the repository root.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    from reimagen.config import get_preset
    from reimagen.diffusion import ddpm_step, dynamic_threshold, eps_to_x0, get_schedule, sampling_times, to_eps
    from reimagen.guidance import InterleavedGuidance, JointGuidance, branch_drop_masks
    from reimagen.sampling import SamplerSettings, guided_eps, make_generators, rand_rows, randn_rows, sample_stage
    from reimagen.unet import ReImagenUNet, count_parameters

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset)
    if cfg.is_super_resolution:
        raise SystemExit(f"--preset {args.preset} is a super-resolution stage; this benchmark times a base stage")
    if not cfg.neighbour_attention:
        raise SystemExit(f"--preset {args.preset} has no neighbour attention")
    model = ReImagenUNet(cfg).eval()
    _randomize_zero_init(model, args.seed)
    params = count_parameters(model)
    B, K, n, S = args.batch, args.k, args.text_len, cfg.image_size
    shape = (cfg.in_channels, S, S)
    log_snr = get_schedule(cfg.schedule)
    guidance = InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5)
    nb = guidance.num_branches
    settings = SamplerSettings(steps=args.steps, sampler="ddpm")

    # Inputs: text-encoder outputs as random tensors (B, n, text_dim) with masks of random lengths.
    g = torch.Generator().manual_seed(args.seed)

    def random_text(rows: int):
        emb = torch.randn(rows, n, cfg.text_dim, generator=g)
        lengths = torch.randint(max(1, n // 4), n + 1, (rows,), generator=g)
        return emb, torch.arange(n)[None] < lengths[:, None]

    prompt_emb, prompt_mask = random_text(B)
    nbr_emb, nbr_mask = random_text(B * K)
    nbr_images = torch.rand(B, K, *shape, generator=g) * 2 - 1
    prompt_ids, sample_idx = [f"prompt-{i}" for i in range(B)], list(range(B))

    def gens(stream: str):
        return make_generators(args.seed, prompt_ids, sample_idx, 0, stream)

    # -- the two ways --------------------------------------------------------------------------
    def encode():
        """Once per sample: project the prompt and neighbour texts, f(c_n, 0) through the DStack."""
        text = model.project_text(prompt_emb, prompt_mask)
        memory = model.encode_neighbours(nbr_images, model.project_text(nbr_emb, nbr_mask))
        return text, memory

    def ours_eps(x, t, text_rep, nbr_rep, codes):
        """sample_stage's guided eps: one batched forward of nb*B rows on the cached conditioning."""
        return guided_eps(model, x, t, log_snr(t), text_rep, nbr_rep, guidance, codes)

    def naive_eps(x, t, codes):
        """Per branch separately: re-project the texts, re-encode the neighbours, one forward of B rows."""
        preds = []
        for j in range(nb):
            text = model.project_text(prompt_emb, prompt_mask)
            memory = model.encode_neighbours(nbr_images, model.project_text(nbr_emb, nbr_mask))
            drop_text, drop_nbr = branch_drop_masks(codes[j])
            pred = model(x, t, text, memory, drop_text, drop_nbr)
            preds.append(to_eps(pred, x, log_snr(t), cfg.prediction))
        return guidance.combine(torch.stack(preds), codes)

    def naive_sample(steps: int):
        """sample_stage's DDPM loop with the naive guided eps (same seeds, same update)."""
        noise_gens, guidance_gens = gens("noise"), gens("guidance")
        x = randn_rows(noise_gens, shape)
        times = sampling_times(steps)
        for i in range(steps):
            t, s = times[i].expand(B), times[i + 1].expand(B)
            lt, ls = log_snr(t), log_snr(s)
            codes = guidance.plan(rand_rows(guidance_gens))
            eps = naive_eps(x, t, codes)
            x0 = dynamic_threshold(eps_to_x0(x, eps, lt), settings.threshold)
            x = x0 if i == steps - 1 else ddpm_step(x, x0, lt, ls, randn_rows(noise_gens, shape))
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError("naive sampler: non-finite values")
        return x

    def ours_sample(steps: int):
        """What a cascade stage does: encode once, then sample_stage.
        Returns (x, (wall, cpu) seconds of the encoding, (wall, cpu) seconds of the loop)."""
        c0 = _clock()
        text, memory = encode()
        c1 = _clock()
        st = settings if steps == settings.steps else SamplerSettings(steps=steps, sampler="ddpm")
        x = sample_stage(model, text, memory, guidance, st, gens("noise"), gens("guidance"))
        c2 = _clock()
        return x, _since(c0, c1), _since(c1, c2)

    def step_inputs(i: int, steps: int):
        times = sampling_times(steps)
        x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(args.seed + 1000 + i))
        return x, times[i].expand(B)

    text_once, memory_once = None, None

    def ours_eps_loop(steps: int):
        rep = torch.arange(B).repeat(nb)
        text_rep, nbr_rep = text_once.index(rep), memory_once.index(rep)
        guidance_gens = gens("guidance")
        for i in range(steps):
            x, t = step_inputs(i, steps)
            ours_eps(x, t, text_rep, nbr_rep, guidance.plan(rand_rows(guidance_gens)))

    def naive_eps_loop(steps: int):
        guidance_gens = gens("guidance")
        for i in range(steps):
            x, t = step_inputs(i, steps)
            naive_eps(x, t, guidance.plan(rand_rows(guidance_gens)))

    # Text-only guided step for the peer comparison: JointGuidance(w=3, use_neighbours=False).
    joint = JointGuidance(w=3.0, use_neighbours=False)

    def ours_textonly_loop(steps: int):
        rep = torch.arange(B).repeat(joint.num_branches)
        text_rep = text_once.index(rep)
        for i in range(steps):
            x, t = step_inputs(i, steps)
            guided_eps(model, x, t, log_snr(t), text_rep, None, joint, joint.plan(torch.zeros(B)))

    def step_flops() -> dict[str, float | int | None]:
        """Conv/matmul/attention FLOPs of one step, ours and naive (the draw the table uses, and the
        expectation over draws: ours depends on how many rows share their DStack pass), and the split of one
        forward of B rows into the DStack and the rest (neighbour attention + UStack)."""
        rep = torch.arange(B).repeat(nb)
        x, t = step_inputs(0, 4)
        codes = guidance.plan(torch.rand(B, generator=g))
        text_rep, nbr_rep = text_once.index(rep), memory_once.index(rep)
        ours = _count_flops(lambda: ours_eps(x, t, text_rep, nbr_rep, codes))
        # r = 0: every second branch is eps(x, c_n) (no sharing); r = 1: eps(x, c_p) (all rows share)
        lo = _count_flops(lambda: ours_eps(x, t, text_rep, nbr_rep, guidance.plan(torch.ones(B))))
        hi = _count_flops(lambda: ours_eps(x, t, text_rep, nbr_rep, guidance.plan(torch.zeros(B))))
        expected = (None if lo is None or hi is None else guidance.eta * hi + (1 - guidance.eta) * lo)
        dstack = _count_flops(lambda: model.dstack(x, t, text_once))
        forward = _count_flops(lambda: model(x, t, text_once, memory_once))
        naive = _count_flops(lambda: naive_eps(x, t, codes))
        return {"ours_eps": ours, "ours_eps_expected": expected, "naive_eps": naive,
                "encode_once": _count_flops(encode), "dstack_b_rows": dstack, "forward_b_rows": forward,
                "dstack_share_of_forward": None if not (dstack and forward) else dstack / forward}

    print(f"reimagen guided-step benchmark: preset {args.preset} ({params / 1e6:.2f}M params, {S}x{S}), "
          f"B={B}, K={K}, n={n}, interleaved guidance w_p=w_n=3 eta=0.5, {args.steps} steps x {args.repeats} "
          f"repeats, torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)

    with torch.no_grad():
        # -- correctness: same draws -> same guided eps, and same images -------------------------
        text_once, memory_once = encode()
        rep = torch.arange(B).repeat(nb)
        x, t = step_inputs(0, 4)
        t = torch.full((B,), 0.6)
        r = torch.tensor([0.25, 0.75] * (B // 2) + [0.25] * (B % 2))  # both Eq. 6 lines in one batch
        codes = guidance.plan(r)
        e_ours = ours_eps(x, t, text_once.index(rep), memory_once.index(rep), codes)
        e_naive = naive_eps(x, t, codes)
        scale = float(e_ours.abs().max())
        step_diff = float((e_ours - e_naive).abs().max())
        # The branches must differ by far more than the tolerance, or the check says nothing.
        full = model(x, t, text_once, memory_once)
        yes = torch.ones(B, dtype=torch.bool)
        branch_gap = min(float((full - model(x, t, text_once, memory_once, drop_neighbours=yes)).abs().max()),
                         float((full - model(x, t, text_once, memory_once, drop_text=yes)).abs().max()))
        _check(scale > 0.1 and branch_gap > 1e-2, f"degenerate model outputs (|eps| {scale}, gap {branch_gap})")
        _check(torch.allclose(e_ours, e_naive, rtol=1e-4, atol=1e-4 * scale),
               f"ours and naive guided eps differ: max |diff| {step_diff:.3g} (|eps| max {scale:.3g})")
        x_ours, _, _ = ours_sample(4)
        x_naive = naive_sample(4)
        sample_diff = float((x_ours - x_naive).abs().max())
        _check(torch.allclose(x_ours, x_naive, rtol=1e-3, atol=1e-3),
               f"sample_stage and the naive sampler give different images: max |diff| {sample_diff:.3g}")
        print(f"correctness: guided eps max|ours - naive| = {step_diff:.2e} (|eps| up to {scale:.2f}, "
              f"branch gap {branch_gap:.2f}); 4-step samples max|diff| = {sample_diff:.2e}  OK", flush=True)
        if args.flops_only:
            return _report_flops(args, step_flops(), params, cfg, torch.__version__,
                                 {"eps_max_abs_diff": step_diff, "eps_max_abs": scale, "branch_gap": branch_gap,
                                  "sample_max_abs_diff": sample_diff})

        # -- peer (optional) ---------------------------------------------------------------------
        peer = None
        peer_skip = None
        if args.peer:
            if not Path(args.peer_python).exists():
                peer_skip = f"peer venv missing ({args.peer_python}); create it with:\n    {PEER_SETUP}"
            else:
                try:
                    print("starting the imagen-pytorch peer worker ...", flush=True)
                    peer = PeerClient(args, S, cfg.text_dim)
                except Exception as err:  # noqa: BLE001
                    peer_skip = f"peer worker failed: {err}"
                    peer = None
            if peer_skip:
                print(f"skipping the peer row: {peer_skip}", flush=True)

        # -- warm-up ---------------------------------------------------------------------------------
        w = max(1, args.warmup)
        ours_sample(w), naive_sample(w), ours_eps_loop(w), naive_eps_loop(w)
        if peer is not None:
            ours_textonly_loop(w)

        # -- timed repeats, interleaved (order rotated every repeat) ----------------------------------
        # Wall time is what the table ranks by; process CPU time is kept next to it because it barely
        # moves when other processes share the cores (with --threads 1; with more threads it includes
        # the spin-waits of the thread pool).
        N = args.steps
        keys = ["ours_sample_stage_total", "ours_encode", "ours_loop", "naive_sample", "ours_eps", "naive_eps"]
        if peer is not None:
            keys += ["peer_guided", "ours_textonly"]
        res: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {k: [] for k in keys}

        def t_ours_sample():
            _, enc, loop = ours_sample(N)
            return {"ours_sample_stage_total": ((enc[0] + loop[0]) / N, (enc[1] + loop[1]) / N),
                    "ours_encode": enc, "ours_loop": (loop[0] / N, loop[1] / N)}

        def timed(key, fn):
            def go():
                c0 = _clock()
                fn(N)
                w, c = _since(c0, _clock())
                return {key: (w / N, c / N)}
            return go

        def t_peer():
            out = peer.time(N)
            return {"peer_guided": (out["seconds"] / N, out["cpu"] / N)}

        jobs = [t_ours_sample, timed("naive_sample", naive_sample), timed("ours_eps", ours_eps_loop),
                timed("naive_eps", naive_eps_loop)]
        if peer is not None:
            jobs += [t_peer, timed("ours_textonly", ours_textonly_loop)]
        pids = [os.getpid()] + ([peer.proc.pid] if peer is not None else [])
        snap = _cpu_snapshot(pids)
        time.sleep(1.0)
        others_before = _other_cores(snap, _cpu_snapshot(pids))
        ncpu = os.cpu_count() or 1
        if others_before is not None and others_before > ncpu - args.threads + 0.2:
            print(f"warning: other processes are using {others_before:.1f} of {ncpu} cores, fewer than "
                  f"--threads {args.threads} are free: wall times include waiting for the CPU"
                  + (" and for descheduled pool threads (a fixed cost per operator, which penalises many small "
                     "calls)" if args.threads > 1 else "")
                  + "; compare the CPU-time column, use --max-other-cores, or a quiet machine", flush=True)

        others: list[float] = []  # other processes' cores during each kept measurement
        discarded = 0

        def measure(job) -> None:
            """Run one timed job; with --max-other-cores, redo it while other processes were busy."""
            nonlocal discarded
            for attempt in range(args.max_retries + 1):
                snap = _cpu_snapshot(pids)
                out = job()
                oc = _other_cores(snap, _cpu_snapshot(pids))
                if args.max_other_cores is None or oc is None or oc <= args.max_other_cores \
                        or attempt == args.max_retries:
                    break
                discarded += 1
                time.sleep(args.retry_wait)
            for key, (w, c) in out.items():
                res[key].append(w)
                cpu[key].append(c)
            if oc is not None:
                others.append(oc)

        load_before = _loadavg()
        t_start = time.perf_counter()
        for rep_i in range(args.repeats):
            order = jobs[rep_i % len(jobs):] + jobs[:rep_i % len(jobs)]
            for job in order:
                measure(job)
            busy = others[-len(jobs):]
            print(f"  repeat {rep_i + 1}/{args.repeats}: ours {res['ours_sample_stage_total'][-1]:.4f} s/step, "
                  f"naive {res['naive_sample'][-1]:.4f} s/step"
                  + (f", other processes up to {max(busy):.2f} cores" if busy else "")
                  + (f" ({discarded} busy runs redone so far)" if discarded else ""), flush=True)
        wall = time.perf_counter() - t_start
        load_after = _loadavg()
        peer_info = peer.info if peer is not None else None
        if peer is not None:
            peer.close()

    # -- report ------------------------------------------------------------------------------------
    def summarise(d: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
        m = {k: _median(v) for k, v in d.items()}
        m["ours_256"] = m["ours_loop"] + m["ours_encode"] / PAPER_STEPS
        r = {"naive_over_ours": m["naive_sample"] / m["ours_sample_stage_total"],
             f"naive_over_ours_at_{PAPER_STEPS}_steps": m["naive_sample"] / m["ours_256"],
             "naive_eps_over_ours_eps": m["naive_eps"] / m["ours_eps"]}
        if "peer_guided" in m:
            r["peer_over_ours_textonly"] = m["peer_guided"] / m["ours_textonly"]
        return m, r

    med, ratios = summarise(res)
    med_cpu, ratios_cpu = summarise(cpu)
    with torch.no_grad():
        flops_step = step_flops()
        flops_textonly = _count_flops(lambda: ours_textonly_loop(1)) if peer is not None else None
    flops_ours, flops_naive, flops_encode = flops_step["ours_eps"], flops_step["naive_eps"], flops_step["encode_once"]
    flops_step.update({"ours_textonly": flops_textonly, "peer_guided": peer_info["flops"] if peer_info else None})

    rows = [  # (name, what, key, flops)
        ("ours: encode + sample_stage", f"encode amortised over {N} steps", "ours_sample_stage_total", flops_ours),
        (f"ours: sample_stage @{PAPER_STEPS} steps", f"loop/step + encode/{PAPER_STEPS}", "ours_256", flops_ours),
        ("naive: full step", "2 x (encode + forward B) + update", "naive_sample", flops_naive),
        ("ours: guided eps only", "cache precomputed, 1 forward 2B", "ours_eps", flops_ours),
        ("naive: guided eps only", "2 x (encode + forward B)", "naive_eps", flops_naive),
        ("encode once (per sample)", "texts + f(c_n, 0), s per call", "ours_encode", flops_encode),
    ]
    if peer is not None:
        rows += [
            (f"peer: imagen-pytorch {peer_info['params'] / 1e6:.2f}M", "forward_with_cond_scale, w=3",
             "peer_guided", peer_info["flops"]),
            (f"ours: text-only {params / 1e6:.2f}M", "JointGuidance(w=3, no nbrs), 2B", "ours_textonly",
             flops_textonly),
        ]
    _print_table([(name, what, med[key], res.get(key), med_cpu[key], fl) for name, what, key, fl in rows],
                 title=f"one guided sampling step, {args.threads} thread(s): median of {args.repeats} repeats")

    def both(key: str) -> str:
        return f"{ratios[key]:.2f}x wall, {ratios_cpu[key]:.2f}x CPU time"

    met = ratios["naive_over_ours"] >= TARGET_RATIO
    lines = [(f"naive / ours (sample_stage, {N} steps)", f"{both('naive_over_ours')}   (target >= {TARGET_RATIO} "
              f"wall: {'met' if met else 'NOT met'})"),
             (f"naive / ours (encode amortised over {PAPER_STEPS})",
              both(f"naive_over_ours_at_{PAPER_STEPS}_steps")),
             ("naive / ours (guided eps only)", both("naive_eps_over_ours_eps"))]
    if flops_ours and flops_naive:
        expected = flops_step["ours_eps_expected"]
        lines.append(("naive / ours (conv+matmul FLOPs per step)", f"{flops_naive / flops_ours:.2f}x (this draw"
                      + (f"; expected over draws {flops_naive / expected:.2f}x)" if expected else ")")))
    if peer is not None:
        lines.append(("peer / ours (text-only guided step)", f"{both('peer_over_ours_textonly')}   (params: "
                      f"imagen-pytorch {peer_info['params']:,}, ours {params:,})"))
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)} = {value}")
    if peer is None and peer_skip:
        print(f"peer row skipped: {peer_skip}")
    contention = (f"other processes used {_median(others):.2f} cores (median over timed runs, max {max(others):.2f}"
                  f"; {discarded} busy runs redone)" if others else "contention unknown (no /proc)")
    print(f"{contention}; load average before/after: {load_before} / {load_after}; timed wall {wall:.0f} s")
    if others and max(others) > 0.2 and args.max_other_cores is None:
        print("note: some runs shared the CPU with other processes (see min/max); for steadier numbers rerun with "
              "--max-other-cores 0.1", flush=True)

    if args.json_path:
        out = {
            "benchmark": "guided_step", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                        "loadavg_before": load_before, "loadavg_after": load_after,
                        "other_processes_cores_before": others_before,
                        "other_processes_cores_per_run": others, "busy_runs_redone": discarded,
                        "max_other_cores": args.max_other_cores},
            "config": {"preset": args.preset, "params": params, "image_size": S, "batch": B, "k": K,
                       "text_len": n, "text_dim": cfg.text_dim, "steps": N, "repeats": args.repeats,
                       "warmup": args.warmup, "guidance": "interleaved w_p=3 w_n=3 eta=0.5", "seed": args.seed},
            "seconds_per_step_median": _named(med, N), "cpu_seconds_per_step_median": _named(med_cpu, N),
            "encode_seconds_median": med["ours_encode"],
            "raw_wall": res, "raw_cpu": cpu, "ratios": ratios, "ratios_cpu": ratios_cpu,
            "target_ratio": TARGET_RATIO, "target_met": met, "flops_per_step": flops_step,
            "correctness": {"eps_max_abs_diff": step_diff, "eps_max_abs": scale, "branch_gap": branch_gap,
                            "sample_max_abs_diff": sample_diff},
            "peer": ({**peer_info, "ours_params": params} if peer_info else {"skipped": peer_skip}
                     if args.peer else None),
        }
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


def _report_flops(args: argparse.Namespace, fl: dict, params: int, cfg, torch_version: str,
                  correctness: dict) -> int:
    """--flops-only: print (and with --json write) the FLOP counts of one step and the ratios they bound."""
    g = lambda v: "-" if v is None else f"{v / 1e9:.2f}"  # noqa: E731
    ours, naive, enc = fl["ours_eps"], fl["naive_eps"], fl["encode_once"]
    ours_exp = fl["ours_eps_expected"]
    ratios = {}
    if ours and naive and enc and ours_exp:
        ratios = {"naive_over_ours": naive / ours, "naive_over_ours_expected": naive / ours_exp,
                  f"naive_over_ours_expected_encode_over_{args.steps}_steps": naive / (ours_exp + enc / args.steps),
                  f"naive_over_ours_expected_encode_over_{PAPER_STEPS}_steps": naive / (ours_exp + enc / PAPER_STEPS)}
    print(f"GFLOP per step (conv + matmul + attention): ours {g(ours)} (expected over draws {g(ours_exp)}), "
          f"naive {g(naive)}; encode once {g(enc)}; one forward of B rows {g(fl['forward_b_rows'])}, "
          f"its DStack {g(fl['dstack_b_rows'])} ({fl['dstack_share_of_forward'] or 0:.0%})")
    for key, v in ratios.items():
        print(f"  {key} = {v:.2f}x")
    if args.json_path:
        out = {"benchmark": "guided_step", "flops_only": True,
               "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch_version,
               "config": {"preset": args.preset, "params": params, "unet": cfg.to_dict(), "batch": args.batch,
                          "k": args.k, "text_len": args.text_len, "steps": args.steps,
                          "guidance": "interleaved w_p=3 w_n=3 eta=0.5", "seed": args.seed},
               "flops_per_step": fl, "flop_ratios": ratios, "target_ratio": TARGET_RATIO, "correctness": correctness}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


def _check(ok: bool, message: str) -> None:
    """An assertion that ``python -O`` keeps."""
    if not ok:
        raise AssertionError(message)


def _named(m: dict[str, float], steps: int) -> dict[str, float]:
    names = {"ours_sample_stage_total": f"ours_sample_stage_{steps}_steps",
             "ours_256": f"ours_sample_stage_{PAPER_STEPS}_steps", "ours_loop": "ours_loop_per_step",
             "naive_sample": "naive_full_step", "ours_eps": "ours_eps", "naive_eps": "naive_eps",
             "peer_guided": "peer_guided", "ours_textonly": "ours_textonly"}
    return {names[k]: v for k, v in m.items() if k in names}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return b[0] - a[0], b[1] - a[1]


def _randomize_zero_init(model, seed: int) -> None:
    """Give every all-zero parameter (residual and attention output layers, conv_out, norm biases) random values."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == 0).all()):
                std = (1.0 / p[0].numel() ** 0.5) if p.dim() > 1 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _cpu_snapshot(pids: list[int]) -> tuple[int, int, int] | None:
    """(busy jiffies of all CPUs, total jiffies of all CPUs, jiffies of ``pids``) from /proc, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
        total = busy + v[3] + v[4]  # + idle iowait
        own = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own += int(fields[11]) + int(fields[12])  # utime stime (all threads)
        return busy, total, own
    except (OSError, ValueError, IndexError):
        return None


def _other_cores(a, b) -> float | None:
    """CPU cores used on average by processes other than ours between two snapshots."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    ncpu = os.cpu_count() or 1
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / ((b[1] - a[1]) / ncpu))


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _print_table(rows, title: str) -> None:
    """rows: (name, what, median wall s/step, raw wall list | None, median CPU s/step, FLOPs | None)."""
    cols = ("measurement", "what", "s/step", "min", "max", "CPU s/step", "GFLOP")
    cells = []
    for name, what, m, raw, c, fl in rows:
        lo, hi = (min(raw), max(raw)) if raw else (None, None)
        cells.append((name, what, f"{m:.4f}", _fmt(lo), _fmt(hi), f"{c:.4f}", "-" if fl is None else f"{fl / 1e9:.1f}"))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain aligned text
        widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(cols)]
        print(title)
        for r in [cols, *cells]:
            print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        return
    table = Table(title=title)
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in cells:
        table.add_row(*r)
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        return peer_worker(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
