"""Human evaluation of EntityDrawBench runs (paper Sec. 4.2, Table 2, Figure 5).

    tasks.py        blind rating tasks from run folders (opaque HMAC ids, per-rater order), rater lists
    store.py        the ratings table (SQLite, WAL; one row per rater and task)
    app.py          the Streamlit rating app (``reimagen-eval rate serve``)
    labelstudio.py  Label Studio export / import of the same tasks and ratings
    simulate.py     simulated raters for the synthetic world (the judge CNN plus noise; labelled as simulated)
    report.py       Table 2, Figure 5, inter-rater agreement, majority votes, CLIP correlation
    cli.py          the ``rate`` sub-app of ``reimagen-eval``
    testing.py      test helpers (synthetic run folders; Chromium and Label Studio for end-to-end tests)
"""
