"""Research scripts: experiments on the project, run from a checkout, not part of the library.

Nothing here is installed with the ``fairness`` package (see ``research/README.md``).
"""
