#!/usr/bin/env python
"""Speed of ONE guided sampling step: Re-Imagen's interleaved guidance (Eq. 6), K neighbours, batch B.

Two ways of computing the same thing, measured in the same run and interleaved repeat by repeat:

* ours   what ``reimagen.pipelines.sampling.sample_stage`` does: the text projection and the neighbour memory
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
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its helper modules, also in the peer's venv

from bench_timing import _clock, _cpu_snapshot, _loadavg, _median, _other_cores, _print_table, _since  # noqa: E402
from guided_step_peer import DEFAULT_PEER_PYTHON, PEER_SETUP, PeerClient, _count_flops, peer_worker  # noqa: E402

PAPER_STEPS = 256  # EntityDrawBench, 64x64 stage (Sec. 4.2)
TARGET_RATIO = 1.8


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-32-eff",
                   help="reimagen.models.config preset of the stage (default small-32-eff; small-32 is the "
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


class _Bench:
    """The stage, its random inputs and the two ways of computing a guided step (see the module docstring)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from reimagen.models.config import get_preset
        from reimagen.diffusion.gaussian import get_schedule
        from reimagen.diffusion.guidance import InterleavedGuidance, JointGuidance
        from reimagen.pipelines.sampling import SamplerSettings
        from reimagen.models.unet import ReImagenUNet, count_parameters

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        cfg = get_preset(args.preset)
        if cfg.is_super_resolution:
            raise SystemExit(f"--preset {args.preset} is a super-resolution stage; this benchmark times a base stage")
        if not cfg.neighbour_attention:
            raise SystemExit(f"--preset {args.preset} has no neighbour attention")
        self.args, self.cfg = args, cfg
        self.model = ReImagenUNet(cfg).eval()
        _randomize_zero_init(self.model, args.seed)
        self.params = count_parameters(self.model)
        self.B, self.K, self.n, self.S = args.batch, args.k, args.text_len, cfg.image_size
        self.shape = (cfg.in_channels, self.S, self.S)
        self.log_snr = get_schedule(cfg.schedule)
        self.guidance = InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5)
        self.nb = self.guidance.num_branches
        self.settings = SamplerSettings(steps=args.steps, sampler="ddpm")
        self.joint = JointGuidance(w=3.0, use_neighbours=False)  # the text-only step of the peer comparison
        # Inputs: text-encoder outputs as random tensors (B, n, text_dim) with masks of random lengths.
        self.g = torch.Generator().manual_seed(args.seed)
        self.prompt_emb, self.prompt_mask = self._random_text(self.B)
        self.nbr_emb, self.nbr_mask = self._random_text(self.B * self.K)
        self.nbr_images = torch.rand(self.B, self.K, *self.shape, generator=self.g) * 2 - 1
        self.prompt_ids, self.sample_idx = [f"prompt-{i}" for i in range(self.B)], list(range(self.B))
        self.text_once = self.memory_once = None

    def _random_text(self, rows: int):
        import torch

        emb = torch.randn(rows, self.n, self.cfg.text_dim, generator=self.g)
        lengths = torch.randint(max(1, self.n // 4), self.n + 1, (rows,), generator=self.g)
        return emb, torch.arange(self.n)[None] < lengths[:, None]

    def gens(self, stream: str):
        from reimagen.pipelines.sampling import make_generators

        return make_generators(self.args.seed, self.prompt_ids, self.sample_idx, 0, stream)

    # -- the two ways --------------------------------------------------------------------------
    def encode(self):
        """Once per sample: project the prompt and neighbour texts, f(c_n, 0) through the DStack."""
        m = self.model
        text = m.project_text(self.prompt_emb, self.prompt_mask)
        memory = m.encode_neighbours(self.nbr_images, m.project_text(self.nbr_emb, self.nbr_mask))
        return text, memory

    def ours_eps(self, x, t, text_rep, nbr_rep, codes):
        """sample_stage's guided eps: one batched forward of nb*B rows on the cached conditioning."""
        from reimagen.pipelines.sampling import guided_eps

        return guided_eps(self.model, x, t, self.log_snr(t), text_rep, nbr_rep, self.guidance, codes)

    def naive_eps(self, x, t, codes):
        """Per branch separately: re-project the texts, re-encode the neighbours, one forward of B rows."""
        import torch

        from reimagen.diffusion.gaussian import to_eps
        from reimagen.diffusion.guidance import branch_drop_masks

        preds = []
        for j in range(self.nb):
            text, memory = self.encode()
            drop_text, drop_nbr = branch_drop_masks(codes[j])
            pred = self.model(x, t, text, memory, drop_text, drop_nbr)
            preds.append(to_eps(pred, x, self.log_snr(t), self.cfg.prediction))
        return self.guidance.combine(torch.stack(preds), codes)

    def naive_sample(self, steps: int):
        """sample_stage's DDPM loop with the naive guided eps (same seeds, same update)."""
        import torch

        from reimagen.diffusion.gaussian import ddpm_step, dynamic_threshold, eps_to_x0, sampling_times
        from reimagen.pipelines.sampling import rand_rows, randn_rows

        noise_gens, guidance_gens = self.gens("noise"), self.gens("guidance")
        x = randn_rows(noise_gens, self.shape)
        times = sampling_times(steps)
        for i in range(steps):
            t, s = times[i].expand(self.B), times[i + 1].expand(self.B)
            lt, ls = self.log_snr(t), self.log_snr(s)
            codes = self.guidance.plan(rand_rows(guidance_gens))
            eps = self.naive_eps(x, t, codes)
            x0 = dynamic_threshold(eps_to_x0(x, eps, lt), self.settings.threshold)
            x = x0 if i == steps - 1 else ddpm_step(x, x0, lt, ls, randn_rows(noise_gens, self.shape))
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError("naive sampler: non-finite values")
        return x

    def ours_sample(self, steps: int):
        """What a cascade stage does: encode once, then sample_stage.
        Returns (x, (wall, cpu) seconds of the encoding, (wall, cpu) seconds of the loop)."""
        from reimagen.pipelines.sampling import SamplerSettings, sample_stage

        c0 = _clock()
        text, memory = self.encode()
        c1 = _clock()
        st = self.settings if steps == self.settings.steps else SamplerSettings(steps=steps, sampler="ddpm")
        x = sample_stage(self.model, text, memory, self.guidance, st, self.gens("noise"), self.gens("guidance"))
        c2 = _clock()
        return x, _since(c0, c1), _since(c1, c2)

    def step_inputs(self, i: int, steps: int):
        import torch

        from reimagen.diffusion.gaussian import sampling_times

        times = sampling_times(steps)
        x = torch.randn(self.B, *self.shape, generator=torch.Generator().manual_seed(self.args.seed + 1000 + i))
        return x, times[i].expand(self.B)

    def _rep(self, branches: int):
        import torch

        return torch.arange(self.B).repeat(branches)

    def ours_eps_loop(self, steps: int):
        from reimagen.pipelines.sampling import rand_rows

        rep = self._rep(self.nb)
        text_rep, nbr_rep = self.text_once.index(rep), self.memory_once.index(rep)
        guidance_gens = self.gens("guidance")
        for i in range(steps):
            x, t = self.step_inputs(i, steps)
            self.ours_eps(x, t, text_rep, nbr_rep, self.guidance.plan(rand_rows(guidance_gens)))

    def naive_eps_loop(self, steps: int):
        from reimagen.pipelines.sampling import rand_rows

        guidance_gens = self.gens("guidance")
        for i in range(steps):
            x, t = self.step_inputs(i, steps)
            self.naive_eps(x, t, self.guidance.plan(rand_rows(guidance_gens)))

    def ours_textonly_loop(self, steps: int):
        import torch

        from reimagen.pipelines.sampling import guided_eps

        text_rep = self.text_once.index(self._rep(self.joint.num_branches))
        for i in range(steps):
            x, t = self.step_inputs(i, steps)
            guided_eps(self.model, x, t, self.log_snr(t), text_rep, None, self.joint,
                       self.joint.plan(torch.zeros(self.B)))

    def step_flops(self) -> dict[str, float | int | None]:
        """Conv/matmul/attention FLOPs of one step, ours and naive (the draw the table uses, and the
        expectation over draws: ours depends on how many rows share their DStack pass), and the split of one
        forward of B rows into the DStack and the rest (neighbour attention + UStack)."""
        import torch

        B, g, m = self.B, self.guidance, self.model
        rep = self._rep(self.nb)
        x, t = self.step_inputs(0, 4)
        codes = g.plan(torch.rand(B, generator=self.g))
        text_rep, nbr_rep = self.text_once.index(rep), self.memory_once.index(rep)
        ours = _count_flops(lambda: self.ours_eps(x, t, text_rep, nbr_rep, codes))
        # r = 0: every second branch is eps(x, c_n) (no sharing); r = 1: eps(x, c_p) (all rows share)
        lo = _count_flops(lambda: self.ours_eps(x, t, text_rep, nbr_rep, g.plan(torch.ones(B))))
        hi = _count_flops(lambda: self.ours_eps(x, t, text_rep, nbr_rep, g.plan(torch.zeros(B))))
        expected = (None if lo is None or hi is None else g.eta * hi + (1 - g.eta) * lo)
        dstack = _count_flops(lambda: m.dstack(x, t, self.text_once))
        forward = _count_flops(lambda: m(x, t, self.text_once, self.memory_once))
        naive = _count_flops(lambda: self.naive_eps(x, t, codes))
        return {"ours_eps": ours, "ours_eps_expected": expected, "naive_eps": naive,
                "encode_once": _count_flops(self.encode), "dstack_b_rows": dstack, "forward_b_rows": forward,
                "dstack_share_of_forward": None if not (dstack and forward) else dstack / forward}

    def check(self) -> dict[str, float]:
        """Same draws -> same guided eps, and the same images; the branches must differ by far more than the
        tolerance, or the check says nothing."""
        import torch

        B, m = self.B, self.model
        self.text_once, self.memory_once = self.encode()
        rep = self._rep(self.nb)
        x, _ = self.step_inputs(0, 4)
        t = torch.full((B,), 0.6)
        r = torch.tensor([0.25, 0.75] * (B // 2) + [0.25] * (B % 2))  # both Eq. 6 lines in one batch
        codes = self.guidance.plan(r)
        e_ours = self.ours_eps(x, t, self.text_once.index(rep), self.memory_once.index(rep), codes)
        e_naive = self.naive_eps(x, t, codes)
        scale = float(e_ours.abs().max())
        step_diff = float((e_ours - e_naive).abs().max())
        full = m(x, t, self.text_once, self.memory_once)
        yes = torch.ones(B, dtype=torch.bool)
        branch_gap = min(float((full - m(x, t, self.text_once, self.memory_once, drop_neighbours=yes)).abs().max()),
                         float((full - m(x, t, self.text_once, self.memory_once, drop_text=yes)).abs().max()))
        _check(scale > 0.1 and branch_gap > 1e-2, f"degenerate model outputs (|eps| {scale}, gap {branch_gap})")
        _check(torch.allclose(e_ours, e_naive, rtol=1e-4, atol=1e-4 * scale),
               f"ours and naive guided eps differ: max |diff| {step_diff:.3g} (|eps| max {scale:.3g})")
        x_ours, _, _ = self.ours_sample(4)
        x_naive = self.naive_sample(4)
        sample_diff = float((x_ours - x_naive).abs().max())
        _check(torch.allclose(x_ours, x_naive, rtol=1e-3, atol=1e-3),
               f"sample_stage and the naive sampler give different images: max |diff| {sample_diff:.3g}")
        print(f"correctness: guided eps max|ours - naive| = {step_diff:.2e} (|eps| up to {scale:.2f}, "
              f"branch gap {branch_gap:.2f}); 4-step samples max|diff| = {sample_diff:.2e}  OK", flush=True)
        return {"eps_max_abs_diff": step_diff, "eps_max_abs": scale, "branch_gap": branch_gap,
                "sample_max_abs_diff": sample_diff}


def _start_peer(args: argparse.Namespace, bench: _Bench):
    """(the imagen-pytorch worker or None, why it was skipped or None)."""
    if not args.peer:
        return None, None
    if not Path(args.peer_python).exists():
        skip = f"peer venv missing ({args.peer_python}); create it with:\n    {PEER_SETUP}"
    else:
        try:
            print("starting the imagen-pytorch peer worker ...", flush=True)
            return PeerClient(args, bench.S, bench.cfg.text_dim), None
        except Exception as err:  # noqa: BLE001
            skip = f"peer worker failed: {err}"
    print(f"skipping the peer row: {skip}", flush=True)
    return None, skip


def run(args: argparse.Namespace) -> int:
    # Run from anywhere: benchmarks/ is sys.path[0] when run as a script, not the repository root.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    bench = _Bench(args)
    print(f"reimagen guided-step benchmark: preset {args.preset} ({bench.params / 1e6:.2f}M params, "
          f"{bench.S}x{bench.S}), B={bench.B}, K={bench.K}, n={bench.n}, interleaved guidance w_p=w_n=3 eta=0.5, "
          f"{args.steps} steps x {args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} "
          "thread(s)", flush=True)
    with torch.no_grad():
        correctness = bench.check()
        if args.flops_only:
            return _report_flops(args, bench.step_flops(), bench.params, bench.cfg, torch.__version__, correctness)
        peer, peer_skip = _start_peer(args, bench)
        timing = _timed_repeats(args, bench, peer)
        peer_info = peer.info if peer is not None else None
        if peer is not None:
            peer.close()
        flops_step = bench.step_flops()
        flops_step.update({"ours_textonly": _count_flops(lambda: bench.ours_textonly_loop(1)) if peer else None,
                           "peer_guided": peer_info["flops"] if peer_info else None})
    return _report(args, bench, timing, flops_step, correctness, peer_info, peer_skip)


def _timed_repeats(args: argparse.Namespace, bench: "_Bench", peer) -> dict:
    """Warm-up, then every measurement once per repeat, interleaved (the order rotated each repeat)."""
    # -- warm-up ---------------------------------------------------------------------------------
    w = max(1, args.warmup)
    bench.ours_sample(w), bench.naive_sample(w), bench.ours_eps_loop(w), bench.naive_eps_loop(w)
    if peer is not None:
        bench.ours_textonly_loop(w)

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
        _, enc, loop = bench.ours_sample(N)
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

    jobs = [t_ours_sample, timed("naive_sample", bench.naive_sample), timed("ours_eps", bench.ours_eps_loop),
            timed("naive_eps", bench.naive_eps_loop)]
    if peer is not None:
        jobs += [t_peer, timed("ours_textonly", bench.ours_textonly_loop)]
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
    return {"res": res, "cpu": cpu, "others": others, "discarded": discarded, "others_before": others_before,
            "load_before": load_before, "load_after": load_after, "wall": wall}

def _report(args: argparse.Namespace, bench: "_Bench", timing: dict, flops_step: dict, correctness: dict,
            peer_info: dict | None, peer_skip: str | None) -> int:
    """The table, the ratios against the target, and with --json the whole record."""
    import torch

    res, cpu, others, discarded = timing["res"], timing["cpu"], timing["others"], timing["discarded"]
    N, params, cfg = args.steps, bench.params, bench.cfg
    B, K, n, S = bench.B, bench.K, bench.n, bench.S
    load_before, load_after, wall = timing["load_before"], timing["load_after"], timing["wall"]
    others_before = timing["others_before"]
    step_diff, scale = correctness["eps_max_abs_diff"], correctness["eps_max_abs"]
    branch_gap, sample_diff = correctness["branch_gap"], correctness["sample_max_abs_diff"]
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
    flops_ours, flops_naive, flops_encode = flops_step["ours_eps"], flops_step["naive_eps"], flops_step["encode_once"]
    flops_textonly = flops_step["ours_textonly"]

    rows = [  # (name, what, key, flops)
        ("ours: encode + sample_stage", f"encode amortised over {N} steps", "ours_sample_stage_total", flops_ours),
        (f"ours: sample_stage @{PAPER_STEPS} steps", f"loop/step + encode/{PAPER_STEPS}", "ours_256", flops_ours),
        ("naive: full step", "2 x (encode + forward B) + update", "naive_sample", flops_naive),
        ("ours: guided eps only", "cache precomputed, 1 forward 2B", "ours_eps", flops_ours),
        ("naive: guided eps only", "2 x (encode + forward B)", "naive_eps", flops_naive),
        ("encode once (per sample)", "texts + f(c_n, 0), s per call", "ours_encode", flops_encode),
    ]
    if peer_info is not None:
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
    if peer_info is not None:
        lines.append(("peer / ours (text-only guided step)", f"{both('peer_over_ours_textonly')}   (params: "
                      f"imagen-pytorch {peer_info['params']:,}, ours {params:,})"))
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)} = {value}")
    if peer_info is None and peer_skip:
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


def _randomize_zero_init(model, seed: int) -> None:
    """Give every all-zero parameter (residual and attention output layers, conv_out, norm biases) random values."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == 0).all()):
                std = (1.0 / p[0].numel() ** 0.5) if p.dim() > 1 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        return peer_worker(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
