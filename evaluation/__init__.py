"""FID / zero-shot FID benchmarks on COCO-30K and WikiImages-20K (paper Sec. 4.1, Table 1).

Lands with the [fid] issue; the package exists now so that the distribution's layout is fixed.
"""
