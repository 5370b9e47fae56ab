"""The data pipeline: loading every file type, row validation, prompt masking, packing, splits, `data check`."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest
import torch
from typer.testing import CliRunner

from lorafleet.config import DataSection
from lorafleet.errors import DataError
from lorafleet.training.data import build_datasets, encode, load_samples, split_holdout, token_boundary
from lorafleet.training.data_formats import Alpaca, Chat, Completion, Message, Renderer, Text
from lorafleet.training.data_packing import IGNORE_INDEX, Collator, pack
from lorafleet.training.data_sources import DataSourceError, load_rows
from tests.helpers import run_cli

ROWS: dict[str, list[dict[str, Any]]] = {
    "alpaca": [
        {"instruction": "Name a colour", "output": "Blue"},
        {"instruction": "Translate to English", "input": "chat", "output": "cat"},
    ],
    "chat": [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
    ],
    "completion": [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "1, 2,", "completion": " 3"}],
    "text": [{"text": "Once upon a time."}, {"text": "The end."}],
}
RECORDS = {
    "alpaca": [Alpaca("Name a colour", "", "Blue"), Alpaca("Translate to English", "chat", "cat")],
    "chat": [
        Chat((Message("user", "Hi"), Message("assistant", "Hello!"))),
        Chat((Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4"))),
    ],
    "completion": [Completion("The sky is", " blue."), Completion("1, 2,", " 3")],
    "text": [Text("Once upon a time."), Text("The end.")],
}


def write_rows(path: Path, rows: list[Any]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns(rows))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:  # from_pylist takes its columns from the first row: give every row every column
        table = pyarrow.Table.from_pylist([{key: row.get(key) for key in columns(rows)} for row in rows])
        pyarrow.parquet.write_table(table, path)
    return path


def columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def data_section(train: Path, **fields: Any) -> DataSection:
    return DataSection(train=str(train), **fields)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def plain_tokenizer(tiny_model_dir: str):
    """The same tokenizer without a chat template: the plain Alpaca-style prompt is used."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    return tokenizer


# --- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_loads_from_every_file_type(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = write_rows(tmp_path / f"data{suffix}", ROWS[fmt])
    samples = load_samples(str(path), fmt)
    assert [sample.record for sample in samples] == RECORDS[fmt]
    if suffix == ".json":  # indent=2: each element starts on a line of its own "  {"
        lines = [n for n, line in enumerate(path.read_text().split("\n"), 1) if line == "  {"]
    else:
        lines = {".jsonl": [1, 2], ".csv": [2, 3], ".parquet": [0, 1]}[suffix]
    template = "{}[{}]" if suffix == ".parquet" else "{}:{}"
    assert [sample.location for sample in samples] == [template.format(path, line) for line in lines]


def test_json_file_may_hold_json_lines_and_max_rows_limits_rows(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.json", [json.dumps(row) for row in ROWS["text"] * 3])
    assert [row.line for row in load_rows(str(path))] == [1, 2, 3, 4, 5, 6]
    assert [row.line for row in load_rows(str(path), max_rows=2)] == [1, 2]


def test_builtin_reference_resolves_through_demo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_rows(tmp_path / "price.jsonl", ROWS["alpaca"])
    fake = types.ModuleType("lorafleet.demo_data")
    fake.resolve_builtin_dataset = lambda reference: {"builtin:price": path}[reference]
    monkeypatch.setitem(sys.modules, "lorafleet.demo_data", fake)
    assert [s.record for s in load_samples("builtin:price", "alpaca")] == RECORDS["alpaca"]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("/no/such/file.jsonl", "data file not found: /no/such/file.jsonl"),
        ("/tmp/data.txt", "unsupported file type"),
        ("nobody/no-such-dataset", "cannot load hub dataset 'nobody/no-such-dataset'"),  # HF_HUB_OFFLINE=1
    ],
)
def test_unreadable_references_say_why(reference: str, message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        load_rows(reference)


# --- validation ------------------------------------------------------------------------------------------


def test_broken_json_line_is_named_with_every_other_bad_row(tmp_path: Path) -> None:
    lines = [json.dumps(ROWS["alpaca"][0])] * 10
    lines[2] = json.dumps({"instruction": "no output"})
    lines[6] = '{"instruction": "broken", "output": '
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as caught:
        load_samples(str(path), "alpaca")
    message = str(caught.value)
    assert f"{path}:7: invalid JSON" in message
    assert f"{path}:3: field 'output': missing" in message
    assert message.startswith(f"{path}: 2 bad row(s)")


BAD_ROWS = [
    ("alpaca", {"instruction": "x"}, "field 'output': missing"),
    ("alpaca", {"instruction": "x", "output": 5}, "field 'output': expected a string, got int"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "field 'instruction': empty"),
    ("alpaca", {"instruction": "x", "input": ["a"], "output": "y"}, "field 'input': expected a string, got list"),
    ("alpaca", ["not", "an", "object"], "expected an object with the alpaca fields, got list"),
    ("chat", {"messages": []}, "field 'messages': expected a non-empty list, got list"),
    ("chat", {"messages": "hi"}, "field 'messages': not a JSON list"),
    (
        "chat",
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "field 'messages[0].role': expected one of system/user/assistant, got 'bot'",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        "field 'messages[0].content': empty",
    ),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "field 'messages': no assistant message"),
    (
        "chat",
        {"messages": [{"role": "assistant", "content": "y"}]},
        "field 'messages[0].role': the conversation must start with a system or user message",
    ),
    ("completion", {"prompt": "p", "completion": None}, "field 'completion': missing"),
    ("completion", {"prompt": 1.5, "completion": "c"}, "field 'prompt': expected a string, got float"),
    ("text", {"text": ""}, "field 'text': empty"),
    ("text", {"body": "x"}, "field 'text': missing"),
]


@pytest.mark.parametrize(("fmt", "row", "message"), BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_bad_rows_are_named_with_line_and_field(tmp_path: Path, fmt: str, row: Any, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(ROWS[fmt][0]), "", json.dumps(row)])
    with pytest.raises(DataError) as caught:
        load_samples(str(path), fmt)
    assert f"{path}:3: {message}" in str(caught.value)


def test_many_bad_rows_list_twenty_and_count_the_rest(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": ""})] * 25)
    with pytest.raises(DataError) as caught:
        load_samples(str(path), "text")
    assert len(caught.value.problems) == 20
    assert "25 bad row(s)" in str(caught.value) and "... and 5 more" in str(caught.value)


def test_csv_lines_count_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"two\nlines",ok\nthird,\n')
    with pytest.raises(DataError, match=rf"{path}:4: field 'output': empty"):
        load_samples(str(path), "alpaca")


# --- rendering and masking ------------------------------------------------------------------------------


def response_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "plain-prompt"])
def test_alpaca_masks_the_prompt(tokenizer, plain_tokenizer, templated: bool) -> None:
    tok = tokenizer if templated else plain_tokenizer
    record = Alpaca("Translate to English", "chat", "cat")
    rendered = Renderer(tok)(record)
    input_ids, labels = encode(rendered, tok, train_on_prompt=False)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first, last = labelled[0], labelled[-1]
    assert labelled == list(range(first, last + 1))  # one span: the response; -100 on everything else
    assert labels[first : last + 1] == input_ids[first : last + 1]
    assert response_text(tok, input_ids, labels) == "cat" + tok.eos_token
    prompt = tok.decode(input_ids[:first])
    assert "Translate to English" in prompt and "chat" in prompt
    assert ("<|im_start|>assistant" in prompt) == templated and ("### Response:" in prompt) != templated


def test_chat_puts_the_loss_on_every_assistant_turn(tokenizer, plain_tokenizer) -> None:
    record = Chat(
        (
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "2+2?"),
            Message("assistant", "4"),
        )
    )
    for tok in (tokenizer, plain_tokenizer):
        input_ids, labels = encode(Renderer(tok)(record), tok, train_on_prompt=False)
        eos = tok.eos_token
        assert response_text(tok, input_ids, labels) == f"Hello!{eos}4{eos}"
        masked = tok.decode([i for i, label in zip(input_ids, labels, strict=True) if label == IGNORE_INDEX])
        assert "Be brief." in masked and "Hi" in masked and "2+2?" in masked


@pytest.mark.parametrize(
    ("record", "response"),
    [(Completion("The sky is", " blue."), " blue."), (Text("Once upon a time."), "Once upon a time.")],
)
def test_completion_and_text_are_raw(tokenizer, record, response: str) -> None:
    rendered = Renderer(tokenizer)(record)
    assert "<|im_start|>" not in rendered.text
    input_ids, labels = encode(rendered, tokenizer, train_on_prompt=False)
    assert response_text(tokenizer, input_ids, labels) == response + tokenizer.eos_token


def test_train_on_prompt_labels_everything_but_padding(tmp_path: Path, tokenizer) -> None:
    path = write_rows(tmp_path / "train.jsonl", ROWS["alpaca"])
    data = build_datasets(data_section(path, val_split=0, train_on_prompt=True), tokenizer, seed=0)
    batch = Collator(tokenizer.pad_token_id)([data.train[0], data.train[1]])
    assert torch.equal(batch["labels"] == IGNORE_INDEX, batch["attention_mask"] == 0)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # there was padding to check
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


def merging_tokenizer():
    """A byte-level BPE that merges "a"+"b": a boundary between them falls inside one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ab"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.mark.parametrize("with_offsets", [True, False])
def test_boundary_inside_a_merged_token_falls_back(with_offsets: bool) -> None:
    tok = merging_tokenizer()
    encoding = tok("xab", add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoding["input_ids"]) == 2  # "x", "ab"
    offsets = encoding["offset_mapping"] if with_offsets else None
    assert token_boundary(tok, "xab", 2, encoding["input_ids"], offsets) == 1  # "ab" starts the span
    assert token_boundary(tok, "xab", 1, encoding["input_ids"], offsets) == 1  # an exact prefix


# --- truncation, dropping, splits ------------------------------------------------------------------------


def test_truncation_and_dropping_are_counted(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "long " * 2, "output": "a fairly long answer"},  # keeps part of its answer at 40
        {"instruction": "prompt " * 20, "output": "never seen"},  # the whole answer is cut off
    ]
    path = write_rows(tmp_path / "train.jsonl", rows)
    data = build_datasets(data_section(path, val_split=0, max_seq_len=40), tokenizer, seed=0)
    stats = data.stats.train
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert all(len(example["input_ids"]) <= 40 for example in data.train)
    assert stats.tokens == sum(len(example["input_ids"]) for example in data.train)
    assert 0 < stats.label_tokens < stats.tokens
    assert data.eval is None and data.stats_dict()["train"]["dropped"] == 1


def test_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(50)])
    samples = load_samples(str(path), "text")
    first = split_holdout(samples, 0.2, seed=1, source="train")
    assert split_holdout(samples, 0.2, seed=1, source="train") == first
    assert split_holdout(samples, 0.2, seed=2, source="train")[1] != first[1]
    train, held_out = first
    assert len(held_out) == 10 and sorted(train + held_out, key=samples.index) == samples


def test_eval_file_or_holdout_or_none(tmp_path: Path, tokenizer) -> None:
    train = write_rows(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(20)])
    eval_file = write_rows(tmp_path / "eval.jsonl", [{"text": "held out"}])
    with_file = build_datasets(data_section(train, format="text", eval=str(eval_file)), tokenizer, seed=0)
    assert (len(with_file.train), len(with_file.eval)) == (20, 1)
    held = build_datasets(data_section(train, format="text", val_split=0.25), tokenizer, seed=0)
    assert (len(held.train), len(held.eval)) == (15, 5)
    assert build_datasets(data_section(train, format="text", val_split=0), tokenizer, seed=0).eval is None


def test_data_hash_follows_the_records_not_the_file(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": f"row {i}"} for i in range(20)]
    first = build_datasets(data_section(write_rows(tmp_path / "a.jsonl", rows), format="text"), tokenizer, seed=0)
    same = build_datasets(data_section(write_rows(tmp_path / "b.jsonl", rows), format="text"), tokenizer, seed=0)
    edited = rows[:-1] + [{"text": "row 19!"}]
    other = build_datasets(data_section(write_rows(tmp_path / "c.jsonl", edited), format="text"), tokenizer, seed=0)
    assert len(first.stats.data_hash) == 64
    assert first.stats.data_hash == same.stats.data_hash != other.stats.data_hash
    assert first.stats_dict()["data_hash"] == first.stats.data_hash  # what run.json records


def test_too_few_rows_to_hold_out_is_an_error(tmp_path: Path, tokenizer) -> None:
    train = write_rows(tmp_path / "train.jsonl", [{"text": "only row"}])
    with pytest.raises(DataSourceError, match="too few to hold out data.val_split"):
        build_datasets(data_section(train, format="text", val_split=0.1), tokenizer, seed=0)


# --- packing ---------------------------------------------------------------------------------------------


def test_pack_fills_bins_best_fit_decreasing() -> None:
    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (2, 6, 3, 5, 4)]
    packed = pack(examples, max_seq_len=10)
    assert sorted(len(sequence["input_ids"]) for sequence in packed) == [10, 10]
    with pytest.raises(ValueError, match="does not fit"):
        pack(examples, max_seq_len=5)


def segments(sequence: dict[str, list[int]]) -> list[tuple[int, int]]:
    starts = [i for i, position in enumerate(sequence["position_ids"]) if position == 0]
    return list(zip(starts, starts[1:] + [len(sequence["input_ids"])], strict=True))


@pytest.fixture
def packed_and_unpacked(tmp_path: Path, tokenizer):
    rows = [{"instruction": "word " * (1 + i % 7), "output": f"answer {i} " * (1 + i % 3)} for i in range(12)]
    path = write_rows(tmp_path / "train.jsonl", rows)
    packed = build_datasets(data_section(path, val_split=0, packing=True, max_seq_len=160), tokenizer, seed=0)
    unpacked = build_datasets(data_section(path, val_split=0, max_seq_len=160), tokenizer, seed=0)
    return packed, unpacked


def test_packing_keeps_examples_whole_and_restarts_positions(packed_and_unpacked) -> None:
    packed, unpacked = packed_and_unpacked
    stats = packed.stats.train
    assert stats.sequences == len(packed.train) < len(unpacked.train) == stats.examples == 12
    assert stats.packing_efficiency == pytest.approx(stats.tokens / (stats.sequences * 160))
    pieces = []
    for sequence in packed.train:
        assert len(sequence["input_ids"]) <= 160
        for start, end in segments(sequence):
            assert sequence["position_ids"][start:end] == list(range(end - start))
            assert sequence["labels"][start] == IGNORE_INDEX  # not a target of the previous example
            pieces.append((sequence["input_ids"][start:end], sequence["labels"][start + 1 : end]))
    originals = [(example["input_ids"], example["labels"][1:]) for example in unpacked.train]
    assert sorted(pieces) == sorted(originals)  # every example exactly once, never split


def per_example_losses(model, batch: dict[str, torch.Tensor], row_segments: list[list[tuple[int, int]]]):
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    losses = {}
    for row, spans in enumerate(row_segments):
        for start, end in spans:
            targets = batch["labels"][row, start + 1 : end]
            loss = torch.nn.functional.cross_entropy(logits[row, start : end - 1], targets, ignore_index=IGNORE_INDEX)
            losses[tuple(batch["input_ids"][row, start:end].tolist())] = loss.item()
    return losses


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_packed_batch_gives_each_example_its_own_loss(packed_and_unpacked, tiny_model, tokenizer) -> None:
    packed, unpacked = packed_and_unpacked
    collate = Collator(tokenizer.pad_token_id)
    separate: dict[tuple[int, ...], float] = {}
    for example in unpacked.train:
        batch = collate([example])
        separate |= per_example_losses(tiny_model, batch, [[(0, len(example["input_ids"]))]])
    batch = collate(list(packed.train))
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    row_segments = [segments(sequence) for sequence in packed.train]  # padding excluded
    together = per_example_losses(tiny_model, batch, row_segments)
    assert together.keys() == separate.keys()
    for key, loss in separate.items():
        assert together[key] == pytest.approx(loss, abs=1e-4)
    # The control: with an all-ones attention_mask, examples see each other and the losses change.
    leaky_batch = batch | {"attention_mask": torch.ones_like(batch["input_ids"])}
    leaky = per_example_losses(tiny_model, leaky_batch, row_segments)
    assert max(abs(leaky[key] - loss) for key, loss in separate.items()) > 1e-3


def test_trainer_turns_off_the_kv_cache_that_would_hide_packing(tmp_path: Path, tiny_model_dir: str) -> None:
    """transformers detects packing only without past_key_values; a model called with its config's
    use_cache=True makes a cache and silently attends across examples. The Trainer turns the cache off."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.use_cache
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert model.config.use_cache is False


def test_collator_pads_unpacked_batches_with_a_mask() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


# --- lorafleet data check --------------------------------------------------------------------------------


def test_data_check_prints_a_summary(tmp_path: Path, tiny_model_dir: str) -> None:
    from lorafleet.cli import app

    path = write_rows(tmp_path / "train.jsonl", ROWS["alpaca"] * 5)
    result = CliRunner().invoke(
        app, ["data", "check", str(path), "--format", "alpaca", "--model", "builtin:tiny-llama", "--max-seq-len", "40"]
    )
    assert result.exit_code == 0, result.output
    assert f"{path}: 10 rows, format alpaca, all valid" in result.output
    for expected in ("tokens per example: p50", "p90", "p99", "max", "truncated at max_seq_len 40: 5 (50.0%)"):
        assert expected in result.output
    assert "label tokens:" in result.output


def test_data_check_on_bad_data_exits_2_naming_the_line(tmp_path: Path, tiny_model_dir: str) -> None:
    lines = [json.dumps(ROWS["alpaca"][0])] * 8
    lines[6] = '{"instruction": "broken"'
    path = write_lines(tmp_path / "train.jsonl", lines)
    result = run_cli("data", "check", str(path), "--format", "alpaca", "--model", "builtin:tiny-llama")
    assert result.returncode == 2, result.stderr
    assert f"{path}:7: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr
