"""The ``reimagen-eval`` application: one command line over the model, retrieval, the benchmarks, the human
evaluation and the toy world (``reimagen_eval.cli``), and the main job on the embedded default
(``reimagen_eval.demo``). It is the top layer: nothing below imports it."""
