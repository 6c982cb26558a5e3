"""Paper tables, statistics and figures regenerated from per-run ``metrics.json`` / ``eval.json``.

Regenerate every table and figure of every study committed under ``results/`` (no training):

    python -m deat report --results-dir results

or one study, from the repository root (run directories in a manifest are relative to it):

    python -m deat report --manifest results/studies/quick/manifest.json

The package, in the order data flows through it:

- ``loading``: a study manifest and its runs' JSON files → a pandas frame of runs and one of epochs.
- ``statistics``: seed means, correlations with exact/permutation p-values, the like-for-like pairs of DEAT and
  SGD-momentum under each objective, the method × α ANOVA where the design supports it (scipy, statsmodels);
  ``power``: interval, MDE, verdict word, Holm, seeds for a target; ``comparisons``: every test the tables report,
  Holm-adjusted per family; ``selection``: best settings chosen on validation, headline records. Numbers only.
- ``formatting``: display labels and how a number is printed (percent, ±, markers).
- ``protocol``: the study's protocol, written once per study to ``protocol.md``.
- ``table_helpers``: what every table shares (labels, pairing, sweep-variant groups, footnotes); ``paper_tables``:
  the paper's Tables 2-4 and the comparison with its numbers; ``step_tables``: equal effective step and its means;
  ``study_tables``: best setting, objectives, robust overfitting, sweep sensitivity. Each table is display strings with a one-line caption and footnotes.
- ``render``: a table to Markdown, LaTeX and CSV through pandas' own writers.
- ``figures``: seaborn figures.
- ``study``: one study's tables, figures and ``summary.json``; ``cli``: the ``python -m deat report`` command.

Importing the package itself is cheap (no pandas): ``python -m deat --help`` builds the report's parser from
``cli`` without loading the rest.
"""
