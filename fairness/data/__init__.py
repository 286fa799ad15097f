"""Prompt corpora: reading and validating prompt files (pyarrow; no Ray)."""

from fairness.data.prompts import Corpus, CorpusError, CorpusReport, RowIssue, read_corpus

__all__ = ["Corpus", "CorpusError", "CorpusReport", "RowIssue", "read_corpus"]
