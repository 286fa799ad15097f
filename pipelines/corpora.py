"""Ray Data over prompt corpora: :mod:`fairness.data.prompts` reads and checks, Ray distributes.

Sharding prompts across N training workers. Two ways exist; this module gives the first:

* :func:`rank_shard` -- deterministic round-robin on the corpus ``index`` (the position among
  valid rows): worker ``r`` of ``n`` gets exactly the rows with ``index % n == r``. The shard of a
  rank depends only on the corpus and ``n``, so a restarted worker (Ray Train fault tolerance,
  resume from a checkpoint) sees the same prompts, and per-step prompt draws stay reproducible,
  which the debiasing loop relies on. Each worker reads the whole (small) corpus and keeps its
  share; every prompt lands in exactly one shard and shard sizes differ by at most one.
* ``Dataset.streaming_split(n, equal=False)`` -- what Ray Train's ``get_dataset_shard`` uses:
  a coordinator hands blocks to whichever consumer asks first. It balances throughput on
  heterogeneous workers, but which prompts a worker gets depends on timing (not reproducible),
  all n consumers must iterate concurrently, and ``equal=True`` drops rows to even the counts.
  That suits streaming large image datasets, not a prompt list that defines the experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from fairness.data.prompts import DEFAULT_MAX_CHARS, CorpusFormat, CorpusReport, InvalidPolicy, read_corpus

if TYPE_CHECKING:
    import ray.data
    from transformers import PreTrainedTokenizerBase


def corpus_dataset(
    path: str | Path,
    *,
    format: CorpusFormat | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_tokens: int | None = None,
    invalid: InvalidPolicy = "raise",
    report_path: str | Path | None = None,
    rows_per_block: int = 4096,
) -> tuple[ray.data.Dataset, CorpusReport]:
    """A Ray dataset of the corpus' valid rows (``fairness.data.prompts.SCHEMA``) and its report.

    The corpus is read and checked once, on the caller, so the report (also written to
    ``report_path`` as JSON) is complete before any worker starts. The rows are cut into blocks
    of ``rows_per_block`` so downstream operators run in parallel.
    """
    import ray.data

    corpus = read_corpus(path, format=format, max_chars=max_chars, tokenizer=tokenizer, max_tokens=max_tokens,
                         invalid=invalid)
    if report_path is not None:
        corpus.report.write_json(report_path)
    table = corpus.table
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks), corpus.report


def rank_shard(dataset: ray.data.Dataset, rank: int, world_size: int) -> ray.data.Dataset:
    """The rows of ``dataset`` (from :func:`corpus_dataset`) that worker ``rank`` of ``world_size`` owns."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return dataset.map_batches(_keep_rank, fn_kwargs={"rank": rank, "world_size": world_size},
                               batch_format="pyarrow")


def _keep_rank(batch: pa.Table, rank: int, world_size: int) -> pa.Table:
    return batch.filter(pc.equal(pc.remainder(batch["index"], world_size), rank))
