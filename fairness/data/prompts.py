"""Prompt corpora: plain text, JSON Lines, CSV and Parquet, read lazily with pyarrow and checked row by row.

One prompt per row; the optional columns ``family`` / ``concept`` / ``split`` travel with it
(per-family weighting, held-out splits). A row that cannot be used is never dropped silently:
it becomes a :class:`RowIssue` (row number, reason, detail) in the :class:`CorpusReport`. By
default any bad row raises :class:`CorpusError` naming the rows; with ``invalid="exclude"`` the
bad rows are left out and the report says which. An empty corpus or a missing ``prompt``
column always raises.

Row numbers are 1-based data records: the line number for text and JSON Lines, the record after
the header for CSV (a quoted value spanning lines is one record), the table row for Parquet
(the files of a folder in sorted order).

Why these readers:

* Text and JSON Lines are streamed as raw byte lines through ``pyarrow.csv`` (one binary
  column) and decoded per row. ``pyarrow.json`` stops the whole stream at the first malformed
  line and reports block-relative positions, so it cannot produce a per-row report.
* CSV columns are read as binary so invalid UTF-8 is one reported row, not a failed file.
* ``use_threads=False``: pyarrow then passes true row numbers to the handler of malformed CSV
  rows (wrong field count), which are skipped by pyarrow and reported here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CorpusFormat = Literal["text", "jsonl", "csv", "parquet"]
InvalidPolicy = Literal["raise", "exclude"]
IssueReason = Literal[
    "empty", "too_long", "too_many_tokens", "invalid_utf8", "invalid_json", "missing_prompt", "wrong_type",
    "malformed_row",
]

SUFFIXES: dict[str, CorpusFormat] = {
    ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}
OPTIONAL_COLUMNS = ("family", "concept", "split")
COLUMNS = ("prompt", *OPTIONAL_COLUMNS)
DEFAULT_MAX_CHARS = 1000
_ROWS = pa.schema([("row", pa.int64())] + [(c, pa.string()) for c in COLUMNS])
SCHEMA = pa.schema([("index", pa.int64()), *_ROWS])
_LINE_DELIMITER = "\x1f"  # never inside valid JSON; a text line containing it is reported, not split
_BLOCK_BYTES = 1 << 20

Record = dict[str, Any]


class CorpusError(ValueError):
    """A corpus that cannot be used as a whole (missing column, no rows, bad rows under ``raise``)."""


@dataclass(frozen=True)
class RowIssue:
    """Why one row is unusable; a row gets the first check it fails."""

    row: int
    reason: IssueReason
    detail: str = ""


@dataclass
class CorpusReport:
    """What was read: row counts, the optional columns present, every unusable row."""

    source: str
    format: CorpusFormat
    invalid_policy: InvalidPolicy
    columns: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_valid: int = 0
    issues: list[RowIssue] = field(default_factory=list)

    @property
    def rows_invalid(self) -> int:
        return len(self.issues)

    def counts(self) -> dict[str, int]:
        """Invalid rows per reason."""
        return dict(Counter(i.reason for i in self.issues))

    def rows_with(self, reason: IssueReason) -> list[int]:
        return [i.row for i in self.issues if i.reason == reason]

    def summary(self, max_rows: int = 10) -> str:
        """One line a person can act on: the counts and the first row numbers per reason."""
        head = f"{self.source}: {self.rows_read} rows, {self.rows_valid} valid, {self.rows_invalid} invalid"
        parts = []
        for reason in self.counts():
            rows = self.rows_with(reason)  # type: ignore[arg-type]
            more = f" (+{len(rows) - max_rows} more)" if len(rows) > max_rows else ""
            parts.append(f"{reason}: row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:max_rows]))}{more}")
        return head + (f" ({'; '.join(parts)})" if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "invalid_policy": self.invalid_policy,
                "columns": self.columns, "rows_read": self.rows_read, "rows_valid": self.rows_valid,
                "rows_invalid": self.rows_invalid, "excluded": self.rows_invalid > 0, "counts": self.counts(),
                "issues": [asdict(i) for i in self.issues]}

    def write_json(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2))
        return out


@dataclass(frozen=True)
class Corpus:
    """The valid rows (columns of :data:`SCHEMA`; ``index`` is the position among them) and the report."""

    table: pa.Table
    report: CorpusReport

    @property
    def prompts(self) -> list[str]:
        return self.table.column("prompt").to_pylist()


def detect_format(path: str | Path) -> CorpusFormat:
    p = Path(path)
    if p.is_dir():
        return "parquet"
    fmt = SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise CorpusError(f"{p}: unknown corpus format {p.suffix!r}; use one of {sorted(SUFFIXES)} or pass format=")
    return fmt


def read_corpus(
    path: str | Path,
    *,
    format: CorpusFormat | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_tokens: int | None = None,
    invalid: InvalidPolicy = "raise",
) -> Corpus:
    """Read and check a corpus.

    A prompt is invalid when it is missing, empty (whitespace only), longer than ``max_chars``
    characters, or, with a ``tokenizer``, longer than ``max_tokens`` tokens counting BOS/EOS
    (default: ``tokenizer.model_max_length``, the text encoder's context: longer prompts would be
    truncated without notice). Undecodable bytes, malformed lines and non-string values are
    invalid rows too.
    """
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"prompt corpus not found: {src}")
    fmt = format or detect_format(src)
    if fmt not in _READERS:
        raise CorpusError(f"{src}: unknown corpus format {fmt!r}")
    report = CorpusReport(source=str(src), format=fmt, invalid_policy=invalid)
    parts: list[pa.Table] = []
    for records in _READERS[fmt](src, report):
        report.rows_read += len(records)
        good: list[tuple[int, Record]] = []
        for row, rec in records:
            checked = rec if isinstance(rec, RowIssue) else _check(row, rec, max_chars)
            if isinstance(checked, RowIssue):
                report.issues.append(checked)
            else:
                good.append((row, checked))
        if tokenizer is not None and good:
            good = _check_tokens(good, tokenizer, max_tokens or tokenizer.model_max_length, report)
        if good:
            columns = {"row": [r for r, _ in good], **{c: [rec.get(c) for _, rec in good] for c in COLUMNS}}
            parts.append(pa.table(columns, schema=_ROWS))
    report.issues.sort(key=lambda i: i.row)
    report.rows_valid = sum(t.num_rows for t in parts)
    if report.rows_read == 0:
        raise CorpusError(f"{src}: the corpus has no rows")
    if report.issues and invalid == "raise":
        raise CorpusError(f"{report.summary()}; fix these rows or read with invalid='exclude'")
    if report.rows_valid == 0:
        raise CorpusError(f"no valid prompts in {report.summary()}")
    table = pa.concat_tables(parts)
    table = table.add_column(0, "index", pa.array(range(table.num_rows), pa.int64()))
    return Corpus(table, report)


# -- row checks ----------------------------------------------------------------------------------
def _check(row: int, rec: Record, max_chars: int) -> Record | RowIssue:
    out: Record = {}
    for col in COLUMNS:
        value = rec.get(col)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return RowIssue(row, "invalid_utf8", f"column {col!r}: byte {exc.start} is not valid UTF-8")
        if value is None or (col != "prompt" and value == ""):
            if col == "prompt":
                return RowIssue(row, "missing_prompt", "the row has no prompt value")
            continue
        if not isinstance(value, str):
            return RowIssue(row, "wrong_type", f"column {col!r} is {type(value).__name__}, expected a string")
        out[col] = value
    prompt = out["prompt"]
    if not prompt.strip():
        return RowIssue(row, "empty", "the prompt is empty or whitespace")
    if len(prompt) > max_chars:
        return RowIssue(row, "too_long", f"{len(prompt)} characters > max_chars={max_chars}")
    return out


def _check_tokens(good: list[tuple[int, Record]], tokenizer: PreTrainedTokenizerBase, limit: int,
                  report: CorpusReport) -> list[tuple[int, Record]]:
    ids = tokenizer([rec["prompt"] for _, rec in good], truncation=False, verbose=False)["input_ids"]
    kept = []
    for (row, rec), toks in zip(good, ids):
        if len(toks) > limit:
            report.issues.append(RowIssue(row, "too_many_tokens", f"{len(toks)} tokens (with BOS/EOS) > {limit}"))
        else:
            kept.append((row, rec))
    return kept


# -- readers: each yields, per pyarrow batch, [(row number, raw record or RowIssue)] ---------------
Batch = list[tuple[int, "Record | RowIssue"]]


def _stream_csv(path: Path, header: bool, parse: pacsv.ParseOptions, malformed: Callable[[Any], str],
                report: CorpusReport) -> Iterator[Batch]:
    """Stream ``path`` with binary columns, interleaving the rows pyarrow skipped as malformed."""
    skipped: dict[int, str] = {}
    offset = 1 if header else 0

    def on_invalid(row: Any) -> str:
        if row.number is None:
            raise CorpusError(f"{path}: malformed row without a row number: {row.text[:80]!r}")
        skipped[row.number - offset] = malformed(row)
        return "skip"

    read = pacsv.ReadOptions(use_threads=False, block_size=_BLOCK_BYTES, column_names=None if header else ["prompt"])
    parse.invalid_row_handler = on_invalid
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in COLUMNS}, strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise CorpusError(f"{path}: the corpus has no rows") from exc
        raise CorpusError(f"{path}: cannot read: {exc}") from exc
    names = reader.schema.names
    if header:
        _require_prompt(path, names)
        report.columns = [c for c in OPTIONAL_COLUMNS if c in names]
    next_row = 1
    for batch in reader:
        cols = {c: batch.column(c).to_pylist() for c in COLUMNS if c in names}
        out: Batch = []
        for i in range(batch.num_rows):
            while next_row in skipped:
                out.append((next_row, RowIssue(next_row, "malformed_row", skipped.pop(next_row))))
                next_row += 1
            out.append((next_row, {c: values[i] for c, values in cols.items()}))
            next_row += 1
        yield out
    if skipped:
        yield [(r, RowIssue(r, "malformed_row", skipped[r])) for r in sorted(skipped)]


def _line_options() -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=_LINE_DELIMITER, quote_char=False, escape_char=False,
                              newlines_in_values=False, ignore_empty_lines=False)


def _control_char(row: Any) -> str:
    return "the line contains the control character U+001F"


def _read_text(path: Path, report: CorpusReport) -> Iterator[Batch]:
    yield from _stream_csv(path, False, _line_options(), _control_char, report)


def _read_jsonl(path: Path, report: CorpusReport) -> Iterator[Batch]:
    fields: set[str] = set()
    for batch in _stream_csv(path, False, _line_options(), _control_char, report):
        out: Batch = []
        for row, raw in batch:
            rec = raw if isinstance(raw, RowIssue) else _json_record(row, raw["prompt"])
            if isinstance(rec, dict):
                fields.update(rec)
            out.append((row, rec))
        yield out
    if fields and "prompt" not in fields:
        _require_prompt(path, sorted(fields))
    report.columns = [c for c in OPTIONAL_COLUMNS if c in fields]


def _json_record(row: int, line: bytes) -> Record | RowIssue:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowIssue(row, "invalid_utf8", f"byte {exc.start} is not valid UTF-8")
    if not text.strip():
        return RowIssue(row, "empty", "blank line")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowIssue(row, "invalid_json", f"{exc.msg} at column {exc.colno}")
    if not isinstance(value, dict):
        return RowIssue(row, "invalid_json", f"a JSON {type(value).__name__}, expected an object")
    return value


def _read_csv(path: Path, report: CorpusReport) -> Iterator[Batch]:
    def wrong_width(row: Any) -> str:
        return f"{row.actual_columns} fields where the header has {row.expected_columns}"

    yield from _stream_csv(path, True, pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
                           wrong_width, report)


def _read_parquet(path: Path, report: CorpusReport) -> Iterator[Batch]:
    dataset = pads.dataset(str(path), format="parquet")
    schema = dataset.schema
    _require_prompt(path, schema.names)
    present = [c for c in COLUMNS if c in schema.names]
    for c in present:
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t)):
            raise CorpusError(f"{path}: column {c!r} has type {t}; expected strings")
    report.columns = [c for c in OPTIONAL_COLUMNS if c in present]
    row = 0
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        for batch in fragment.to_batches(columns=present):
            cols = {c: batch.column(c).to_pylist() for c in present}
            yield [(row + i + 1, {c: v[i] for c, v in cols.items()}) for i in range(batch.num_rows)]
            row += batch.num_rows


def _require_prompt(path: Path, names: list[str]) -> None:
    if "prompt" not in names:
        raise CorpusError(f"{path}: no 'prompt' column (columns: {names})")


_READERS: dict[str, Callable[[Path, CorpusReport], Iterator[Batch]]] = {
    "text": _read_text, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
}
