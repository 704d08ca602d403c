"""Workflows built on the core (nothing in the core imports them); each module is one task:

    combine.py   a new adapter from several (linear, cat, svd, ties, dare, magnitude_prune)
                 (combine_methods.py: each method's rule at one module)
    extract.py   an adapter from a fully fine-tuned model (truncated SVD of W_ft - W_base)
    export.py    merged transformers directories (what `loraplex merge` writes)
    evaluate.py  the base and many adapters scored in one pass; results.py: the results file and leaderboard
    plot.py      results as a chart
    verify.py    the parity report (probes.py: probe sets, reference logits, golden files)
    promote.py   merge the chosen adapter, check parity, write a deployable directory with a model card
"""
