"""A VQA-style plug-in for the tests of `entitydraw-score --vqa module:attr`: a number in [0, 1] from the image and
the prompt's length (a stand-in with the plug-in's signature, not a VQA model)."""

import numpy as np


def colour_share(images, prompts):
    return [float(np.asarray(im, dtype=float)[..., 0].mean() / 255 * len(p) / (len(p) + 10))
            for im, p in zip(images, prompts)]
