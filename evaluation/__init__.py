"""FID / zero-shot FID benchmarks on COCO-30K and WikiImages-20K (paper Sec. 4.1, Table 1).

Protocol (``protocol.py``; README.md in this folder): prompts drawn with the seed from the validation captions,
reference = the full validation image set, the same center crop + resize to 256 (PIL bicubic) for real and
generated images before the backend's own Inception preprocessing; a row is "FID" when the retrieval database
is the dataset's own train split, "ZS-FID" otherwise.

    protocol.py   prompts, preprocessing, the FID / ZS-FID label
    datasets.py   coco, wikiimages (and the registry the synthetic world of [toy] plugs into)
    features.py   feature extractors: the backends' Inception (local weights, clear offline errors) or a custom
                  network injected through each backend's custom-extractor API
    backends.py   clean-fid and torch-fidelity: their datasets, extractors, Frechet distance and KID kernels
    metrics.py    streamed, resumable features; statistics; KID with bounded memory; CLIP score; the cached
                  reference statistics
    sweep.py      retrieval once, base-stage images once per 64-stage weight, SR sweep, shards, metrics
    results.py    tidy CSV / Markdown with the paper's reported numbers, the guidance plot
    cli.py        ``reimagen-eval fid``
"""

import reimagen as _reimagen  # noqa: E402,F401  (applies the torchvision workaround before clean-fid / torch-fidelity)
