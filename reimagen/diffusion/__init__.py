"""The diffusion process and its guidance, as pure tensor functions that know no network (Sec. 3.1-3.2).

    gaussian.py   schedules in log-SNR form, Eq. 1-4 (forward process, loss, x0 from eps, DDPM step), DDIM,
                  dynamic thresholding, Min-SNR weighting
    guidance.py   Eq. 5 and Eq. 6: joint, weighted and interleaved classifier-free guidance

The loop that drives a network with them is ``reimagen.pipelines.sampling``; the trainer's loss is Eq. 2 from
here. ``from reimagen.diffusion import q_sample`` and the like read ``gaussian.py``.
"""

from .gaussian import *  # noqa: F401,F403  (the room's face: Eq. 1-4 by name)
from .gaussian import __all__ as _gaussian_all
from .guidance import (GuidanceStrategy, InterleavedGuidance, JointGuidance, WeightedGuidance,  # noqa: F401
                       make_guidance)

__all__ = list(_gaussian_all) + ["GuidanceStrategy", "InterleavedGuidance", "JointGuidance", "WeightedGuidance",
                                 "make_guidance"]
