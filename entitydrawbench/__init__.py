"""EntityDrawBench (paper Sec. 4.2, Appendix C): entities, prompt templates, frequency splits, best-of-4.

Lands with the [entitydraw] issue; the package exists now so that the distribution's layout is fixed.
"""
