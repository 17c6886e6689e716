"""Re-Imagen: retrieval-augmented text-to-image diffusion (Chen et al., ICLR 2023), in PyTorch.

Layout (one module per concept, the paper's section in each docstring):

    diffusion.py   schedules, Eq. 1-4, DDIM, dynamic thresholding (pure functions)
    guidance.py    Eq. 5 and Eq. 6: joint, weighted and interleaved classifier-free guidance
    unet.py        DStack / neighbour attention / UStack (Sec. 3.2, Fig. 3)
    config.py      UNetConfig and the paper's presets
    text.py        frozen text encoders (T5, MiniLM) and a tiny trainable one
    sampling.py    one stage's denoising loop, per-sample seeding
    cascade.py     the cascade of stages: Cascade.sample(prompts, neighbours, seed)
    pipeline.py    ReImagenPipeline: a cascade with its retriever and knowledge base, from_pretrained / save
    data.py        KNN-ImageText triples tables
    train.py       the trainer and checkpoints
"""

from ._compat import patch_torchvision_if_broken

patch_torchvision_if_broken()  # before anything imports transformers / torchvision

from .cascade import Cascade, CascadeOutput, Neighbours, Stage  # noqa: E402
from .pipeline import PipelineOutput, ReImagenPipeline  # noqa: E402
from .config import PRESETS, UNetConfig, get_preset  # noqa: E402
from .guidance import InterleavedGuidance, JointGuidance, WeightedGuidance, make_guidance  # noqa: E402
from .sampling import NonFiniteError, SamplerSettings  # noqa: E402
from .unet import ReImagenUNet  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Cascade", "CascadeOutput", "Neighbours", "Stage", "PRESETS", "UNetConfig", "get_preset",
    "InterleavedGuidance", "JointGuidance", "WeightedGuidance", "make_guidance", "NonFiniteError",
    "SamplerSettings", "ReImagenUNet", "ReImagenPipeline", "PipelineOutput",
]
