"""Inference: stages in a cascade, with their retriever, into run folders (Sec. 3.1 Eq. 4 with Sec. 3.2's guidance).

    sampling.py    one stage's denoising loop: the guided denoiser, per-sample generators, DDPM / DDIM
    cascade.py     Cascade.sample(prompts, neighbours, seed): 64 -> 256 -> 1024
    pipeline.py    ReImagenPipeline: a cascade with its retriever and knowledge base, from_pretrained / save
    generate.py    generators (Re-Imagen, diffusers, folders) and resumable, sharded run folders
    sample_run.py  the ``sample`` command's run: prompts, neighbours, contact sheets
"""

from .cascade import Cascade, CascadeOutput, Neighbours, Stage  # noqa: F401
from .pipeline import PipelineOutput, ReImagenPipeline  # noqa: F401
from .sampling import NonFiniteError, SamplerSettings  # noqa: F401

__all__ = ["Cascade", "CascadeOutput", "Neighbours", "Stage", "PipelineOutput", "ReImagenPipeline", "NonFiniteError",
           "SamplerSettings"]
