"""Automatic faithfulness scores of EntityDrawBench images beyond CLIP: DINO subject similarity and a VQA-style
score through a plug-in.

    dino_i   cosine similarity of DINO ViT-S/16 [CLS] embeddings of the image and the entity's reference image
             (DreamBench's DINO score: it tells instances of a class apart, where CLIP-I does not). The model is
             a Hugging Face ``ViTModel`` (``facebook/dino-vits16``, or a local folder of it); images are resized to
             224 (bicubic) and normalised with ImageNet's statistics, as its image processor does.
    vqa      P("yes") to "Does this figure show '<prompt>'?" (VQAScore, Lin et al. 2024), from a plug-in:

                 hf:<model>     a Hugging Face visual-question-answering pipeline (e.g.
                                hf:dandelin/vilt-b32-finetuned-vqa): the score of the answer "yes"
                 t2v:<model>    t2v_metrics' VQAScore (``pip install t2v-metrics``; e.g. t2v:clip-flant5-xl)
                 module:attr    any callable ``f(images: list[PIL.Image], prompts: list[str]) -> list[float]``

Weights are not downloaded here: a missing model is an error that says what to download and where it goes.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import numpy as np

VQA_QUESTION = "Does this figure show '{prompt}'? Please answer yes or no."
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoScorer:
    """Unit-norm DINO [CLS] embeddings of PIL images."""

    def __init__(self, model: str = "facebook/dino-vits16", device: str = "cpu", batch_size: int = 32):
        from transformers import ViTModel

        try:
            self.net = ViTModel.from_pretrained(model, add_pooling_layer=False).to(device).eval()
        except (OSError, ValueError) as err:
            raise RuntimeError(f"DINO model {model!r} is not available ({str(err).splitlines()[0][:160]}). On a "
                               f"machine with internet: `huggingface-cli download facebook/dino-vits16 --local-dir "
                               f"DIR`, then pass --dino-model DIR (or let the Hugging Face cache find it)") from None
        self.model, self.device, self.batch_size = model, device, batch_size

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((224, 224), 3), np.float32)
                                              ).permute(2, 0, 1) / 255 for im in images[i:i + self.batch_size]])
            with torch.no_grad():
                h = self.net(pixel_values=((x - mean) / std).to(self.device)).last_hidden_state[:, 0]
            out.append(F.normalize(h.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def load_vqa(spec: str, device: str = "cpu") -> Callable[[list, list[str]], list[float]]:
    """The VQA-style scorer of ``spec`` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"--vqa {spec!r}: give hf:<model>, t2v:<model> or module:attr")
    if kind == "hf":
        from transformers import pipeline

        try:
            pipe = pipeline("visual-question-answering", model=rest, device=device)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"VQA model {rest!r} is not available ({str(err).splitlines()[0][:160]}); download it "
                               "with `huggingface-cli download` on a machine with internet") from None

        def hf(images: list, prompts: list[str]) -> list[float]:
            out = []
            for im, p in zip(images, prompts):
                answers = pipe(image=im, question=VQA_QUESTION.format(prompt=p), top_k=50)
                out.append(next((float(a["score"]) for a in answers if a["answer"].strip().lower() == "yes"), 0.0))
            return out

        return hf
    if kind == "t2v":
        try:
            import t2v_metrics
        except ImportError:
            raise RuntimeError("--vqa t2v:... needs t2v_metrics: pip install t2v-metrics") from None
        scorer = t2v_metrics.VQAScore(model=rest, device=device)

        def t2v(images: list, prompts: list[str]) -> list[float]:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:  # t2v_metrics reads image files
                paths = []
                for k, im in enumerate(images):
                    paths.append(str(Path(tmp) / f"{k}.png"))
                    im.save(paths[-1])
                return [float(scorer(images=[pth], texts=[p])[0][0]) for pth, p in zip(paths, prompts)]

        return t2v
    try:
        fn = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--vqa {spec!r}: cannot import {rest} from {kind} ({err})") from None
    if not callable(fn):
        raise ValueError(f"--vqa {spec!r} is not callable")
    return fn


__all__ = ["DinoScorer", "load_vqa", "VQA_QUESTION"]
