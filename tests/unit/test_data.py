"""Prompt datasets: real eval slices, bad rows named by file and row, the skip/error switch,
templates and lengths, the per-epoch order and its cursor, DP sharding, dynamic sampling.

Ground truths below were read from ../shared/data/eval/*.parquet with pyarrow (first five
distinct problems of each file, in file order); token counts are counted by hand on the
character-level tiny tokenizer (one token per character, BOS one token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rpg_megatron import data, tiny
from rpg_megatron.config import ConfigError, DataConfig
from rpg_megatron.rollout import collect

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SHARED_EVAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
SLICES = {
    "aime24_slice.parquet": ("math_dapo", ["540", "204", "721", "236", "809"]),
    "aime25_slice.parquet": ("aime2025", ["16", "821", "70", "106", "237"]),
    "amc23_slice.parquet": ("amc_23", ["7", "50", "96", "265", "9"]),
}
ID = {t: i for i, t in enumerate(tiny.TINY_VOCAB)}


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer(model_max_length=4096)


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(content: str, answer: object) -> str:
    return json.dumps(
        {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": answer}}
    )


# ------------------------------------------------------------------------------ real files
@pytest.mark.parametrize("name", list(SLICES))
def test_eval_slices_load_with_ground_truths_and_dedup(tok, name: str) -> None:
    source, truths = SLICES[name]
    path = str(FIXTURES / name)
    full = data.load_prompts(DataConfig(train_files=(path,), max_prompt_tokens=4096), tok)
    assert len(full) == 15  # 5 problems x 3 copies
    assert sorted(p.ground_truth for p in full.prompts) == sorted(truths * 3)
    assert full.report.duplicates == 0 and full.report.skipped == {}

    uniq = data.load_prompts(
        DataConfig(train_files=(path,), unique=True, max_prompt_tokens=4096), tok
    )
    assert [p.ground_truth for p in uniq.prompts] == truths
    assert uniq.report.duplicates == 10 and uniq.report.template == "tokenizer"
    for p in uniq.prompts:
        assert p.data_source == source
        assert p.text.startswith("<bos>Solve the following math problem")
        assert p.text.endswith('after "Answer:".\nAnswer: ')
        assert len(p.token_ids) == len(p.text) - len("<bos>") + 1  # one token per character


@pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="../shared/data/eval is not beside the repo")
@pytest.mark.parametrize(
    ("name", "rows", "problems"),
    [("aime-2024.parquet", 960, 30), ("aime25.parquet", 960, 30), ("amc-23.parquet", 1280, 40)],
)
def test_full_eval_files_repeat_each_problem_32_times(name: str, rows: int, problems: int) -> None:
    read, skipped = data.read_rows(SHARED_EVAL / name)
    assert len(read) == rows and not skipped
    assert len(data.deduplicate(read)) == problems == rows // 32


# --------------------------------------------------------------------------------- bad rows
def test_bad_parquet_rows_named_by_file_and_row(tmp_path: Path) -> None:
    rows = tiny.arithmetic_rows(6, seed=0)
    rows[1]["reward_model"]["ground_truth"] = None
    rows[3]["prompt"] = []
    rows[4]["prompt"] = [{"role": "user", "content": None}]
    path = tiny.write_parquet(rows, tmp_path / "bad.parquet")

    with pytest.raises(data.DataError, match=rf"{path}:row 1: .*ground_truth.*on_bad_row=skip"):
        data.read_rows(path, on_bad_row="error")

    kept, skipped = data.read_rows(path, on_bad_row="skip")
    assert [r.origin for r in kept] == [f"{path}:row {i}" for i in (0, 2, 5)]
    assert dict(skipped) == {"no_ground_truth": 1, "empty_prompt": 1, "prompt_not_messages": 1}
    assert [r.ground_truth for r in kept] == [
        rows[i]["reward_model"]["ground_truth"] for i in (0, 2, 5)
    ]


def test_bad_jsonl_rows_named_by_file_and_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            _row("1+2=", "3"),  # line 1: good
            json.dumps({"prompt": "1+2=", "reward_model": {"ground_truth": "3"}}),  # not messages
            "{not json",  # line 3
            "",  # line 4: blank lines are not rows
            json.dumps({"prompt": [{"role": "user", "content": "1+1="}]}),  # no ground truth
            _row("2+2=", 4),  # line 6: an integer ground truth is fine
            _row("   ", "0"),  # line 7: only whitespace
        ],
    )
    with path.open("ab") as f:
        f.write(b'{"prompt": "\xff"}\n')  # line 8: not UTF-8
    with pytest.raises(data.DataError, match=rf"{path}:line 2: 'prompt' is a str"):
        data.read_rows(path)
    kept, skipped = data.read_rows(path, on_bad_row="skip")
    assert [(r.origin, r.ground_truth) for r in kept] == [
        (f"{path}:line 1", "3"),
        (f"{path}:line 6", "4"),
    ]
    assert dict(skipped) == {
        "prompt_not_messages": 1,
        "invalid_json": 1,
        "no_ground_truth": 1,
        "empty_prompt": 1,
        "invalid_utf8": 1,
    }
    assert kept[0].data_source == "bad"  # no data_source column: the file's stem


def test_unreadable_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(data.DataError, match=r"broken\.parquet: not a readable parquet file"):
        data.read_rows(path, on_bad_row="skip")


def test_missing_column_is_a_file_error_even_when_skipping(tmp_path: Path) -> None:
    rows = [{"prompt": r["prompt"], "answer": "1"} for r in tiny.arithmetic_rows(2, seed=0)]
    path = tiny.write_parquet(rows, tmp_path / "nogt.parquet")
    with pytest.raises(data.DataError, match=r"nogt.parquet: no column 'reward_model'"):
        data.read_rows(path, on_bad_row="skip")
    kept, _ = data.read_rows(path, answer_key="answer")  # the dotted key is configurable
    assert [r.ground_truth for r in kept] == ["1", "1"]


def test_too_long_prompt_skipped_or_raised_with_row(tmp_path: Path, tok) -> None:
    # "<bos>1+2=\nAnswer: " is 1 + 4 + 1 + 8 = 14 tokens; "10+20=" makes it 16.
    path = _jsonl(tmp_path / "len.jsonl", [_row("1+2=", "3"), _row("10+20=", "30")])
    cfg = DataConfig(train_files=(str(path),), max_prompt_tokens=15)
    with pytest.raises(data.DataError, match=rf"{path}:line 2: prompt has 16 tokens > .*=15"):
        data.load_prompts(cfg, tok)
    ds = data.load_prompts(
        DataConfig(train_files=(str(path),), max_prompt_tokens=15, on_bad_row="skip"), tok
    )
    assert [p.ground_truth for p in ds.prompts] == ["3"] and ds.report.skipped == {"too_long": 1}
    assert ds.prompts[0].token_ids == tuple(ID[t] for t in ["<bos>", *"1+2=\nAnswer: "])


def test_all_rows_bad_raises_rather_than_training_on_nothing(tmp_path: Path, tok) -> None:
    path = _jsonl(tmp_path / "x.jsonl", [_row("", "1")])
    with pytest.raises(data.DataError, match="no usable prompts"):
        data.load_prompts(DataConfig(train_files=(str(path),), on_bad_row="skip"), tok)


# -------------------------------------------------------------------------------- templates
def test_plain_fallback_when_the_tokenizer_has_no_template(tmp_path: Path, tok) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [_row("1+2=", "3")])
    bare = tiny.tiny_tokenizer()
    bare.chat_template = None
    ds = data.load_prompts(DataConfig(train_files=(str(path),)), bare)
    assert ds.report.template == "plain"
    assert ds.prompts[0].text == "User: 1+2=\nAssistant:"
    with pytest.raises(data.DataError, match=r"data\.chat_template=tokenizer"):
        data.load_prompts(DataConfig(train_files=(str(path),), chat_template="tokenizer"), bare)
    forced = data.load_prompts(DataConfig(train_files=(str(path),), chat_template="plain"), tok)
    assert forced.prompts[0].text == "User: 1+2=\nAssistant:"


def test_config_rejects_unknown_suffix_and_bad_limits() -> None:
    with pytest.raises(ConfigError, match="unknown suffix"):
        DataConfig(train_files=("a.csv",))
    with pytest.raises(ConfigError, match=r"data\.max_gen_batches=0"):
        DataConfig(max_gen_batches=0)


# -------------------------------------------------------------------- order, cursor, shards
def _dataset(tmp_path: Path, tok, n: int) -> data.PromptDataset:
    path = tiny.write_parquet(tiny.arithmetic_rows(n, seed=1), tmp_path / "a.parquet")
    return data.load_prompts(DataConfig(train_files=(str(path),)), tok)


def test_take_wraps_into_the_next_epoch() -> None:
    got, cursor = data.take(5, data.DataCursor(epoch=0, index=3), 4, seed=0, shuffle=False)
    assert got == [3, 4, 0, 1] and cursor == data.DataCursor(epoch=1, index=2)


def test_epoch_orders_are_seeded_permutations() -> None:
    e0 = data.epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert sorted(e0) == list(range(50))
    assert e0 == data.epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert e0 != data.epoch_order(50, seed=7, epoch=1, shuffle=True)
    assert e0 != data.epoch_order(50, seed=8, epoch=0, shuffle=True)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dp_shards_are_disjoint_cover_the_batch_and_agree(tmp_path: Path, tok, world: int) -> None:
    ds = _dataset(tmp_path, tok, 24)
    reference = data.PromptSampler(ds, seed=3, shuffle=True)
    ranks = [data.PromptSampler(ds, seed=3, shuffle=True) for _ in range(world)]
    seen: list[str] = []
    for _ in range(3):  # 3 x 8 = one epoch of 24
        global_batch = [ds.prompts[i].origin for i in reference.next_indices(8)]
        shards = [
            [p.origin for p in s.next_batch(8, dp_rank=r, dp_size=world)]
            for r, s in enumerate(ranks)
        ]
        assert [
            o for shard in shards for o in shard
        ] == global_batch  # disjoint, covering, in the global order
        seen += global_batch
    assert sorted(seen) == sorted(p.origin for p in ds.prompts)  # each prompt once per epoch
    assert all(s.cursor == reference.cursor for s in ranks)
    with pytest.raises(ValueError, match="prompts_per_step=6 is not divisible"):
        ranks[0].next_batch(6, dp_rank=0, dp_size=4)


def test_cursor_restore_gives_the_identical_continuation(tmp_path: Path, tok) -> None:
    ds = _dataset(tmp_path, tok, 12)
    straight = data.PromptSampler(ds, seed=5, shuffle=True)
    expected = [[p.origin for p in straight.next_batch(5)] for _ in range(7)]  # crosses epochs

    first = data.PromptSampler(ds, seed=5, shuffle=True)
    for _ in range(3):
        first.next_batch(5)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = data.PromptSampler(ds, seed=5, shuffle=True)
    resumed.load_state_dict(state)
    assert [[p.origin for p in resumed.next_batch(5)] for _ in range(4)] == expected[3:]

    other = data.PromptSampler(_dataset(tmp_path, tok, 13), seed=5, shuffle=True)
    with pytest.raises(ValueError, match="saved for 12 prompts"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------ dynamic sampling
def test_filter_groups_drops_uniform_groups() -> None:
    rewards_N = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    group_ids_N = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep_N = collect.filter_groups(rewards_N, group_ids_N)
    assert keep_N.tolist() == [False, False, True, True, False, False, False, False]
    # group ids need not be contiguous or sorted
    keep_N = collect.filter_groups(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([5, 9, 5, 9]))
    assert keep_N.tolist() == [False, True, False, True]
    near = torch.tensor([0.5, 0.5 + 1e-6])
    assert collect.filter_groups(near, torch.tensor([0, 0]), atol=1e-3).tolist() == [False, False]


BATCHES = [
    [("a", [1, 1]), ("b", [0, 1]), ("c", [0, 0])],
    [("d", [1, 0]), ("e", [1, 1]), ("f", [0, 1])],
    [("g", [0, 1])],
]


@pytest.mark.parametrize(
    ("target", "max_batches", "drop", "groups", "batches", "uniform"),
    [
        (3, 10, True, ["b", "d", "f"], 2, 3),
        (2, 10, True, ["b", "d"], 2, 3),  # the surplus "f" is discarded
        (3, 1, True, ["b"], 1, 2),  # ran out of generation batches
        (3, 10, False, ["a", "b", "c"], 1, 2),  # plain sampling keeps everything
        (9, 4, True, ["b", "d", "f", "g"], 4, 3),  # never enough: all 4 batches used
    ],
)
def test_dynamic_sampling_loop(target, max_batches, drop, groups, batches, uniform) -> None:
    calls: list[int] = []

    def generate(i: int):
        calls.append(i)
        return BATCHES[i] if i < len(BATCHES) else []

    out = collect.dynamic_sampling(
        generate, target_groups=target, max_gen_batches=max_batches, drop_uniform=drop
    )
    assert out.groups == groups and out.gen_batches == batches
    assert out.groups_uniform == uniform and out.enough == (len(groups) == target)
    assert calls == list(range(batches))
