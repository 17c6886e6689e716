"""Human evaluation of EntityDrawBench runs (paper Table 2, Figure 5): Streamlit app, Label Studio, reports.

Lands with the [rating] issue; the package exists now so that the distribution's layout is fixed.
"""
