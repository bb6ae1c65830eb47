"""Dataset rows: chat rows rendered with the chat template, and the JSONL / Parquet / `datasets` sources."""

from __future__ import annotations

import json
import sys

import pytest

from orchestrator.config import ConfigError, DataSource, load_config
from orchestrator.data import DataError, check_rows, load_rows, prepare_prompts, prepare_rows

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}={% endif %}")
ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}]


@pytest.fixture()
def tokenizer():
    from examples.arith.tokenizer import build_tokenizer

    return build_tokenizer()


def test_chat_rows_are_rendered_with_the_template(tokenizer):
    tokenizer.chat_template = TEMPLATE
    rows = [{"messages": [{"role": "system", "content": "12"}, {"role": "user", "content": "1+2"}], "answer": "3"},
            {"prompt": "4+5=", "answer": "9"}]
    out = prepare_rows(rows, "prompt", "data.train", tokenizer, max_prompt_tokens=64)
    # The template's own BOS is dropped: the engines tokenize with special tokens and add one.
    assert out[0]["prompt"] == "12\n1+2\n=" and out[1]["prompt"] == "4+5="
    ids = tokenizer(out[0]["prompt"])["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert "prompt" not in rows[0]  # inputs are not changed
    request = prepare_prompts(rows, "prompt", "data.train", tokenizer, max_prompt_tokens=64, uid_prefix="u")[0]
    assert request.row["messages"][1]["content"] == "1+2" and request.row["answer"] == "3"  # rewards see the rest
    assert (request.uid, request.prompt, request.prompt_ids) == ("u0", out[0]["prompt"], ids)  # tokenized once


def test_conversation_under_the_prompt_key_and_check_rows_in_place(tokenizer):
    tokenizer.chat_template = TEMPLATE
    rows = [{"prompt": [{"role": "user", "content": "7+8"}], "answer": "15"}]
    check_rows(rows, "prompt", "data.eval", tokenizer)
    assert rows == [{"prompt": "7+8\n=", "answer": "15"}]


def test_tokenizer_without_chat_template_names_the_row(tokenizer):
    rows = ROWS + [{"messages": [{"role": "user", "content": "1+1"}]}]
    with pytest.raises(DataError, match=r"data.train: row 3 is a chat row .* no chat template"):
        prepare_rows(rows, "prompt", "data.train", tokenizer)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user"}]}, "row 1: messages must be a non-empty list of"),
    ({"messages": []}, "row 1: messages must be a non-empty list of"),
    ({"prompt": "1+1=", "messages": [{"role": "user", "content": "x"}]}, "row 1 has both 'prompt' and 'messages'"),
    ({"question": "1+1="}, "row 1 has no non-empty string field 'prompt'"),
])
def test_bad_rows_are_named(tokenizer, row, message):
    tokenizer.chat_template = TEMPLATE
    with pytest.raises(DataError, match=message):
        prepare_rows([row], "prompt", "data.eval", tokenizer)


def test_jsonl_source(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_rows(DataSource(source=str(path))) == ROWS
    path.write_text('{"prompt": "1+2="}\n{oops\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: not valid JSON"):
        load_rows(DataSource(source=str(path)))


def test_parquet_source(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = ROWS + [{"prompt": "", "answer": "0", "messages": [{"role": "user", "content": "0+0"}]}]
    rows = [{**r, "messages": r.get("messages")} for r in rows]  # one schema for every row
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_rows(DataSource(source=str(path))) == rows
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rows(DataSource(source=str(tmp_path / "bad.parquet")))


def test_parquet_without_pyarrow_or_pandas_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(DataError, match=r"rows.parquet: reading a .parquet file needs pyarrow: pip install pyarrow"):
        load_rows(DataSource(source=str(tmp_path / "rows.parquet")))


def test_datasets_source(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    src = DataSource(source="datasets:json", kwargs={"data_files": str(path), "cache_dir": str(tmp_path / "cache")})
    assert load_rows(src) == ROWS
    with pytest.raises(DataError, match="datasets:json: datasets.load_dataset failed"):
        load_rows(DataSource(source="datasets:json", kwargs={"data_files": str(tmp_path / "missing.jsonl")}))


def test_datasets_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"datasets:json: this source needs the datasets package: pip install datasets"):
        load_rows(DataSource(source="datasets:json", kwargs={"data_files": "x.jsonl"}))


def test_config_accepts_each_source_kind(tmp_path, tiny_model):
    from tests.conftest import base_config
    import yaml

    (tmp_path / "train.parquet").write_bytes(b"")
    cfg = base_config(tiny_model, data={"train": {"source": str(tmp_path / "train.parquet")},
                                        "eval": {"source": "datasets:json", "kwargs": {"data_files": "e.jsonl"}}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "job.yaml")
    assert loaded.data.eval.source == "datasets:json"
    with pytest.raises(ConfigError, match=r"data.train.source: file .*missing.parquet' not found"):
        load_config(tmp_path / "job.yaml", [f"data.train.source={tmp_path / 'missing.parquet'}"])


def test_train_cli_exits_2_on_chat_rows_without_template(tmp_path, tiny_model, capsys):
    """A chat dataset for a model without a chat template fails before Ray starts, naming the row."""
    import yaml

    from orchestrator.cli import main
    from tests.conftest import base_config

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+2"}],
                                                     "answer": "3"}) + "\n")
    cfg = base_config(tiny_model, data={"train": {"source": str(tmp_path / "chat.jsonl")}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "job.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "data.train: line 1 is a chat row" in capsys.readouterr().err


@pytest.mark.parametrize("third_line, message", [
    ('{"question": "no prompt"}', "line 3 has no non-empty string field 'prompt'"),
    ('{"prompt": "1+2=", oops', "line 3: not valid JSON"),
    ('{"prompt": "' + "1+2=" * 100 + '"}', "line 3 has a"),
], ids=["bad row", "bad JSON", "too long"])
def test_jsonl_errors_name_the_1_based_line_of_the_file(tmp_path, tiny_model, capsys, third_line, message):
    """A bad row and a JSON syntax error on the same line (the 3rd, after a blank one) are named alike."""
    import yaml

    from orchestrator.cli import main
    from tests.conftest import base_config

    (tmp_path / "train.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n\n' + third_line + "\n")
    cfg = base_config(tiny_model, data={"train": {"source": str(tmp_path / "train.jsonl")}, "max_prompt_tokens": 64})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "job.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "row" not in err, err


def test_rows_of_other_sources_are_counted_from_1(tmp_path, tokenizer):
    """A function's, Parquet's or a datasets split's rows: "row N", the first row is row 1."""
    with pytest.raises(DataError, match=r"data.train: row 2 has no non-empty string field 'prompt'"):
        prepare_rows([ROWS[0], {"question": "1+1="}], "prompt", "data.train", tokenizer)
    with pytest.raises(DataError, match=r"data.train: row 2 has a \d+-token prompt"):
        prepare_rows([ROWS[0], {"prompt": "1+2=" * 100}], "prompt", "data.train", tokenizer, max_prompt_tokens=64)
