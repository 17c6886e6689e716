"""Re-Imagen: retrieval-augmented text-to-image diffusion (Chen et al., ICLR 2023), in PyTorch.

The package is a house of rooms; each imports only the rooms below it (``make test`` checks it):

    diffusion/   schedules, Eq. 1-4, DDIM, dynamic thresholding; guidance Eq. 5, Eq. 6 (pure functions)
    models/      the stage U-Net (DStack, neighbour attention, UStack), presets, text encoders, checkpoints
    pipelines/   the sampling loop, the cascade, ReImagenPipeline, run folders and generators
    training/    triples and shards, the text store, the loader, the trainer, torch.distributed
    retrieval/   knowledge bases and readers, BM25 and CLIP + faiss retrievers, KNN-ImageText triples
    utils/       atomic writes, the torchvision shim, precision, seeding, the launcher's environment
    cli.py       the model's commands (train, shards, embed-text, sample, presets), mounted from the rooms
"""

from .utils.compat import install_module_aliases, patch_torchvision_if_broken

patch_torchvision_if_broken()  # before anything imports transformers / torchvision
install_module_aliases()  # reimagen.unet and the other pre-0.2 module paths, with a DeprecationWarning

from .diffusion.guidance import InterleavedGuidance, JointGuidance, WeightedGuidance, make_guidance  # noqa: E402
from .models.config import PRESETS, UNetConfig, get_preset  # noqa: E402
from .models.unet import ReImagenUNet  # noqa: E402
from .pipelines.cascade import Cascade, CascadeOutput, Neighbours, Stage  # noqa: E402
from .pipelines.pipeline import PipelineOutput, ReImagenPipeline  # noqa: E402
from .pipelines.sampling import NonFiniteError, SamplerSettings  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Cascade", "CascadeOutput", "Neighbours", "Stage", "PRESETS", "UNetConfig", "get_preset",
    "InterleavedGuidance", "JointGuidance", "WeightedGuidance", "make_guidance", "NonFiniteError",
    "SamplerSettings", "ReImagenUNet", "ReImagenPipeline", "PipelineOutput",
]
