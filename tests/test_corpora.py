"""Prompt corpora: every format, every validation case with its row number, Ray Data sharding."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fairness.data.prompts import SCHEMA, CorpusError, read_corpus
from fairness.models.tiny import TINY_WORDS
from fairness.models.tokenizer import build_clip_tokenizer


def _issues(corpus) -> list[tuple[int, str]]:
    return [(i.row, i.reason) for i in corpus.report.issues]


def test_text_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a photo of the doctor\r\na photo of the nurse\n\"quoted\", with comma\n")
    corpus = read_corpus(path)
    assert corpus.prompts == ["a photo of the doctor", "a photo of the nurse", '"quoted", with comma']
    assert corpus.table.schema == SCHEMA
    assert corpus.table.column("row").to_pylist() == [1, 2, 3]
    assert corpus.report.rows_read == 3 and corpus.report.rows_valid == 3 and not corpus.report.issues


def test_jsonl_with_optional_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a photo of the chef", "family": "occupation", "concept": "chef", "split": "train", "x": 1},
            {"prompt": "a person playing tennis", "family": "sport"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = read_corpus(path)
    assert corpus.table.select(["prompt", "family", "concept", "split"]).to_pylist() == [
        {"prompt": "a photo of the chef", "family": "occupation", "concept": "chef", "split": "train"},
        {"prompt": "a person playing tennis", "family": "sport", "concept": None, "split": None}]
    assert corpus.report.columns == ["family", "concept", "split"]


def test_csv_quoting_multiline_and_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,family,other\n"a photo, of the pilot",occupation,1\n"two\nlines",,2\nplain,sport,3\n')
    corpus = read_corpus(path)
    assert corpus.prompts == ["a photo, of the pilot", "two\nlines", "plain"]
    assert corpus.table.column("family").to_pylist() == ["occupation", None, "sport"]
    assert corpus.table.column("row").to_pylist() == [1, 2, 3]  # records after the header
    assert corpus.report.columns == ["family"]


def test_parquet_file_and_folder_in_path_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["c", "d"], "split": ["test", "test"]}), folder / "part-1.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"], "split": ["train", None]}), folder / "part-0.parquet")
    corpus = read_corpus(folder)
    assert corpus.prompts == ["a", "b", "c", "d"]
    assert corpus.table.column("split").to_pylist() == ["train", None, "test", "test"]
    assert read_corpus(folder / "part-1.parquet").prompts == ["c", "d"]


def test_text_validation_reports_every_bad_row(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"good one\n\n   \nbad \xff\xfe bytes\n" + b"x" * 41 + b"\nsplit\x1fhere\ngood two\n")
    with pytest.raises(CorpusError, match=r"7 rows, 2 valid, 5 invalid.*empty: rows 2, 3.*invalid_utf8: row 4"):
        read_corpus(path, max_chars=40)
    corpus = read_corpus(path, max_chars=40, invalid="exclude")
    assert corpus.prompts == ["good one", "good two"]
    assert corpus.table.column("row").to_pylist() == [1, 7]
    assert _issues(corpus) == [(2, "empty"), (3, "empty"), (4, "invalid_utf8"), (5, "too_long"), (6, "malformed_row")]
    assert corpus.report.counts() == {"empty": 2, "invalid_utf8": 1, "too_long": 1, "malformed_row": 1}


def test_csv_validation_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,family\nok,a\n,b\nbad\xff,c\ntoo,many,fields\nfam bytes,\xff\nlast,d\n")
    corpus = read_corpus(path, invalid="exclude")
    assert corpus.prompts == ["ok", "last"]
    assert _issues(corpus) == [(2, "empty"), (3, "invalid_utf8"), (4, "malformed_row"), (5, "invalid_utf8")]
    assert "column 'family'" in corpus.report.issues[-1].detail


def test_jsonl_validation_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [b'{"prompt": "fine"}', b'{"prompt": ', b'{"family": "x"}', b'{"prompt": 7}', b'["a list"]',
             b'{"prompt": "caf\xc3\xa9"}', b'{"prompt": "\xff"}', b"", b'{"prompt": "a", "family": 3}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    corpus = read_corpus(path, invalid="exclude")
    assert corpus.prompts == ["fine", "café"]
    assert _issues(corpus) == [(2, "invalid_json"), (3, "missing_prompt"), (4, "wrong_type"), (5, "invalid_json"),
                               (7, "invalid_utf8"), (8, "empty"), (9, "wrong_type")]


def test_parquet_null_prompt_is_reported(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, " "]}), path)
    corpus = read_corpus(path, invalid="exclude")
    assert _issues(corpus) == [(2, "missing_prompt"), (3, "empty")]


def test_token_limit_uses_the_tokenizer(tmp_path):
    tok = build_clip_tokenizer(TINY_WORDS, tmp_path / "tok")
    path = tmp_path / "p.txt"
    path.write_text("a photo of the doctor\n" + " ".join(["photo"] * 30) + "\n")
    corpus = read_corpus(path, tokenizer=tok, invalid="exclude")
    assert corpus.prompts == ["a photo of the doctor"]
    (issue,) = corpus.report.issues
    assert (issue.row, issue.reason) == (2, "too_many_tokens") and f"> {tok.model_max_length}" in issue.detail
    assert read_corpus(path, tokenizer=tok, max_tokens=40).report.rows_valid == 2


@pytest.mark.parametrize("name, content, message", [
    ("p.csv", b"text,family\nhello,a\n", r"no 'prompt' column \(columns: \['text', 'family'\]\)"),
    ("p.jsonl", b'{"text": "hello"}\n', r"no 'prompt' column"),
    ("p.txt", b"", "no rows"),
    ("p.csv", b"", "no rows"),
    ("p.txt", b"\n \n", r"no valid prompts.*empty: rows 1, 2"),
    ("p.yaml", b"prompt: x\n", "unknown corpus format"),
])
def test_unusable_corpora_raise_precise_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus(path, invalid="exclude")


def test_missing_column_in_parquet_and_missing_file(tmp_path):
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="no 'prompt' column"):
        read_corpus(tmp_path / "p.parquet")
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "absent.txt")


def test_report_writes_json(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\n\ntwo\n")
    corpus = read_corpus(path, invalid="exclude")
    data = json.loads(corpus.report.write_json(tmp_path / "out" / "report.json").read_text())
    assert data["rows_read"] == 3 and data["rows_valid"] == 2 and data["excluded"]
    assert data["issues"] == [{"row": 2, "reason": "empty", "detail": "the prompt is empty or whitespace"}]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_dataset_shards_cover_every_prompt_once(tmp_path, ray_session):
    from pipelines.corpora import corpus_dataset, rank_shard

    path = tmp_path / "p.txt"
    prompts = [f"prompt number {i}" for i in range(23)]
    path.write_text("\n".join(prompts[:5] + [""] + prompts[5:]) + "\n")
    ds, report = corpus_dataset(path, invalid="exclude", report_path=tmp_path / "report.json", rows_per_block=4)
    assert report.rows_with("empty") == [6] and (tmp_path / "report.json").exists()
    world = 3
    shards = [sorted(r["prompt"] for r in rank_shard(ds, rank, world).take_all()) for rank in range(world)]
    assert Counter(p for s in shards for p in s) == Counter(prompts)
    assert sorted(len(s) for s in shards) == [7, 8, 8]
    assert sorted(r["prompt"] for r in rank_shard(ds, 1, world).take_all()) == shards[1]  # same rows every time
    with pytest.raises(ValueError, match="rank 3"):
        rank_shard(ds, 3, world)
