"""Prompt datasets: verl/DAPO-layout parquet and jsonl files -> validated rows -> chat-templated,
tokenized prompts; a per-epoch shuffled order with a resumable cursor; DP sharding. (DAPO dynamic
sampling, which draws more prompt batches, lives in rollout/collect.py.)

Row layout (one problem per row; exactly the layout of ../shared/data/eval/*.parquet):
    prompt        list of {"role": str, "content": str}      column `DataConfig.prompt_key`
    reward_model  {"ground_truth": str, "style": str}        dotted path `DataConfig.answer_key`
    data_source   str, optional (default: the file's stem)   metrics and reward routing
    extra_info    any, optional                              carried through untouched
Every column of a row (these and any other) reaches the user's reward functions unchanged
(`Prompt.columns`). Row numbers in messages: parquet rows count from 0 in file order (as
pyarrow and pandas index them); jsonl rows are reported by 1-based line number, as editors show.

Legend: N samples, G groups.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from rpg_megatron.config import DataConfig

logger = logging.getLogger(__name__)

Message = dict[str, str]
BadRowPolicy = Literal["skip", "error"]
Template = Literal["tokenizer", "plain"]

_LOGGED_BAD_ROWS = 20
"""Skipped rows logged one by one; the rest only appear in the counts (a 17k-row file with a
systematic problem should not print 17k lines)."""


class DataError(ValueError):
    """A dataset file or row is unusable; the message names the file and the row."""


# ------------------------------------------------------------------------------------ rows
@dataclass(frozen=True, slots=True, kw_only=True)
class PromptRow:
    """One validated dataset row, before templating."""

    messages: tuple[Message, ...]
    """Chat messages, each exactly {"role", "content"} (extra struct fields dropped)."""
    ground_truth: str
    """Reference answer as text (integers in the file are written as digits)."""
    data_source: str
    """The row's `data_source`, or the file's stem when the column is absent or empty."""
    extra_info: Any
    """The row's `extra_info`, untouched (None when absent)."""
    origin: str
    """Where it came from, `file:row 12` or `file:line 13`; errors and metrics quote it."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Every column of the row as read (the user reward functions' **columns); not to mutate."""


@dataclass(slots=True)
class _BadRows:
    """Applies `on_bad_row`: raise naming file and row, or count and log and go on."""

    policy: BadRowPolicy
    skip_hint: str = "set data.on_bad_row=skip"
    """How the caller's user turns skipping on (a config key, or a command-line flag)."""
    counts: Counter[str] = field(default_factory=Counter)

    def __call__(self, origin: str, reason: str, detail: str) -> None:
        if self.policy == "error":
            raise DataError(f"{origin}: {detail} ({self.skip_hint} to drop such rows)")
        self.counts[reason] += 1
        if sum(self.counts.values()) <= _LOGGED_BAD_ROWS:
            logger.warning("skipping bad row %s: %s", origin, detail)


def _iter_parquet(path: Path, prompt_key: str, answer_key: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"data.train_files: reading {path} needs pyarrow: pip install pyarrow"
        ) from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors do not name the file
        raise DataError(f"{path}: not a readable parquet file: {_one_line(e)}") from None
    names = pf.schema_arrow.names
    for key, cfg_key in ((prompt_key, "prompt_key"), (answer_key.split(".")[0], "answer_key")):
        if key not in names:
            # A missing column is a file problem, not a row problem: never skipped row by row.
            raise DataError(
                f"{path}: no column {key!r} (data.{cfg_key}); columns: {', '.join(names)}"
            )
    row = 0
    # Every column: user reward functions receive the whole row (reward.functions).
    batches = pf.iter_batches(batch_size=1024)
    while True:
        # The footer was fine, so damage shows only here, as the pages are decoded: pyarrow
        # raises OSError ("Couldn't deserialize thrift", a bad checksum) or ArrowException
        # (ArrowInvalid on a bad string or list length), neither naming the file.
        try:
            batch = next(batches, None)
            records = [] if batch is None else batch.to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{path}: damaged parquet data from row {row} on ({_one_line(e)}); the footer "
                "reads but its pages do not decode: write the file again"
            ) from None
        if batch is None:
            return
        for record in records:
            yield f"{path}:row {row}", record
            row += 1


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's span several)."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)


def _iter_jsonl(path: Path, bad: _BadRows) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded per line: a bad byte is then one bad row, not an error for the whole file.
    try:
        f = path.open("rb")
    except OSError as e:  # no permission
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            origin = f"{path}:line {lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad(origin, "invalid_utf8", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                bad(origin, "invalid_json", f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield origin, record


def _dotted(record: Mapping[str, Any], key: str) -> Any:
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _ground_truth_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):  # bool is an int subclass; True is never an answer
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and np.isfinite(value):
        # pandas turns integer columns with a gap into floats: 7.0 means "7".
        return str(int(value)) if value.is_integer() else repr(value)
    return None


class _RowProblem(Exception):
    """Why one row is unusable: a reason key for the counts and a message for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _validate(record: Any, prompt_key: str, answer_key: str, stem: str, origin: str) -> PromptRow:
    """The row as a PromptRow; raises _RowProblem naming what is wrong."""
    if not isinstance(record, Mapping):
        raise _RowProblem("not_a_mapping", f"row is a {type(record).__name__}, not an object")
    prompt = record.get(prompt_key)
    if prompt is None:
        raise _RowProblem("no_prompt", f"{prompt_key!r} is missing or null")
    if not isinstance(prompt, list | tuple):
        kind = type(prompt).__name__
        raise _RowProblem(
            "prompt_not_messages", f"{prompt_key!r} is a {kind}, expected a list of messages"
        )
    messages = []
    for i, m in enumerate(prompt):
        if not (
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and m["role"]
            and isinstance(m.get("content"), str)
        ):
            raise _RowProblem(
                "prompt_not_messages",
                f"{prompt_key}[{i}] = {m!r:.80} is not a {{role: str, content: str}} message",
            )
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in messages):
        raise _RowProblem("empty_prompt", f"{prompt_key!r} has no message with content")
    raw_answer = _dotted(record, answer_key)
    answer = _ground_truth_text(raw_answer)
    if answer is None:
        raise _RowProblem(
            "no_ground_truth",
            f"{answer_key!r} is missing, empty or not a string/number (got {raw_answer!r:.80})",
        )
    source = record.get("data_source")
    return PromptRow(
        messages=tuple(messages),
        ground_truth=answer,
        data_source=source if isinstance(source, str) and source else stem,
        extra_info=record.get("extra_info"),
        origin=origin,
        columns=dict(record),
    )


def read_rows(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "reward_model.ground_truth",
    on_bad_row: BadRowPolicy = "error",
    field: str = "data.train_files",
    skip_hint: str = "set data.on_bad_row=skip",
) -> tuple[list[PromptRow], Counter[str]]:
    """Validated rows of one .parquet or .jsonl file and the count of skipped rows by reason.

    Bad rows (no ground truth, no/empty prompt, prompt not a list of {role, content} messages,
    a jsonl line that is not JSON) raise DataError naming file and row, or are skipped and
    counted, per `on_bad_row`. A missing column or unreadable file always raises. Errors
    name `field` (the setting that named the file) and `skip_hint` (how to skip bad rows).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({field})")
    bad = _BadRows(on_bad_row, skip_hint)
    if path.suffix == ".parquet":
        records = _iter_parquet(path, prompt_key, answer_key)
    elif path.suffix == ".jsonl":
        records = _iter_jsonl(path, bad)
    else:
        raise DataError(f"{path}: unknown suffix {path.suffix!r}; use .parquet or .jsonl")
    rows = []
    for origin, record in records:
        try:
            rows.append(_validate(record, prompt_key, answer_key, path.stem, origin))
        except _RowProblem as problem:
            bad(origin, problem.reason, problem.detail)
    if bad.counts:
        logger.warning(
            "%s: skipped %d bad rows %s", path, sum(bad.counts.values()), dict(bad.counts)
        )
    return rows, bad.counts


def deduplicate(rows: Sequence[PromptRow]) -> list[PromptRow]:
    """First occurrence of every (messages, ground truth) pair, in order.

    The key is the message text, not `extra_info.index`: in aime25 and amc-23 that index is not
    constant across the 32 copies of a problem.
    """
    seen: set[tuple[Any, ...]] = set()
    out = []
    for row in rows:
        key = (tuple((m["role"], m["content"]) for m in row.messages), row.ground_truth)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


# ---------------------------------------------------------------------- templating, tokens
def resolve_template(tokenizer: Any, mode: Literal["auto", "tokenizer", "plain"]) -> Template:
    """Which template `render_prompt` uses: the tokenizer's chat template or the plain one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "auto":
        return "tokenizer" if has_template else "plain"
    if mode == "tokenizer" and not has_template:
        raise DataError(
            f"data.chat_template=tokenizer but {type(tokenizer).__name__} has no chat template "
            "(tokenizer.chat_template is empty); use data.chat_template=auto or plain"
        )
    return mode


TOKENIZER_PROBE = "Answer: 12 + 30 = 42"
"""Text every usable tokenizer encodes to known tokens (digits, ASCII letters, spaces, `+=:`:
all inside tiny.py's 27-character vocabulary too)."""


def load_tokenizer(
    model_dir: str | Path,
    *,
    field: str = "model.hf_path",
    chat_template: Literal["auto", "tokenizer", "plain"] = "auto",
) -> Any:
    """The tokenizer of an HF model directory, refused unless it can do its job.

    transformers builds a tokenizer even from a directory without tokenizer files (for
    model_type qwen3 a Qwen2Tokenizer holding one special token), which encodes every prompt to
    []; such a tokenizer, one whose files do not parse, one that encodes `TOKENIZER_PROBE` to
    nothing or only to its unknown token, and (when `chat_template` needs or may use it) a chat
    template that fails on a one-message conversation are DataErrors naming `field` (the setting
    that gave the directory) and the directory. The one loader of tokenizers (train and eval).
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    where = f"{field} {path}"
    if not path.is_dir():
        raise DataError(f"{where}: not a directory (it should hold the tokenizer files)")
    files = ", ".join(sorted(p.name for p in path.iterdir() if not p.name.endswith(".safetensors")))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # tokenizers, sentencepiece, json and jinja raise their own types
        raise DataError(
            f"{where}: its tokenizer files do not load ({type(e).__name__}: {_one_line(e)}); "
            f"files there: {files or 'none'}"
        ) from None
    try:
        ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    except Exception as e:
        raise DataError(
            f"{where}: its tokenizer cannot encode text ({type(e).__name__}: {_one_line(e)})"
        ) from None
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unk for i in ids):
        raise DataError(
            f"{where}: no usable tokenizer files: the tokenizer transformers built there has a "
            f"vocabulary of {len(tokenizer)} and encodes {TOKENIZER_PROBE!r} to "
            f"{'[]' if not ids else 'unknown tokens only'} (files there: {files or 'none'}); "
            "copy tokenizer.json / tokenizer_config.json (or vocab.json + merges.txt, "
            "tokenizer.model) from the base model"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "tokenizer" and not has_template:
        raise DataError(
            f"data.chat_template=tokenizer but the tokenizer of {where} has no chat template "
            "(no chat_template.jinja, none in tokenizer_config.json); add one, or use "
            "data.chat_template=auto or plain"
        )
    if chat_template != "plain" and has_template:
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": TOKENIZER_PROBE}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as e:  # jinja2's TemplateError and whatever the template raises
            raise DataError(
                f"{where}: its chat template fails on a one-message conversation "
                f"({type(e).__name__}: {_one_line(e)}); fix chat_template.jinja or "
                "tokenizer_config.json's chat_template, or set data.chat_template=plain"
            ) from None
    return tokenizer


def render_prompt(messages: Sequence[Message], tokenizer: Any, template: Template) -> str:
    """Prompt text ending where the model's answer begins.

    tokenizer: `apply_chat_template(..., add_generation_prompt=True)`; its special tokens (BOS,
    role markers) are in the text. plain: "{Role}: {content}" per message, then "Assistant:".
    """
    if template == "tokenizer":
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def tokenize_prompts(texts: Sequence[str], tokenizer: Any, template: Template) -> list[list[int]]:
    """Token ids of rendered prompts. A chat template already wrote its special tokens, so they
    are not added twice; the plain text gets whatever the tokenizer adds by itself (e.g. BOS)."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=template == "plain")
    return [list(ids) for ids in encoded["input_ids"]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Prompt:
    """One prompt ready for an engine."""

    token_ids: tuple[int, ...]
    """Templated prompt tokens, at most `DataConfig.max_prompt_tokens` of them."""
    text: str
    """The templated prompt text the ids encode."""
    ground_truth: str
    """Reference answer for the reward function."""
    data_source: str
    """Dataset name for per-source metrics."""
    origin: str
    """`file:row n` / `file:line n` of the source row."""
    extra_info: Any = None
    """The row's extra_info, untouched."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Every column of the source row, as read; user reward functions get them as **columns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    """What `load_prompts` read, dropped and chose; log it once at start-up."""

    files: tuple[str, ...]
    """The files read, in order."""
    rows_valid: int
    """Rows that passed validation (before de-duplication and the length check)."""
    duplicates: int
    """Repeated problems dropped by `unique` (0 when unique is off)."""
    skipped: dict[str, int]
    """Bad rows dropped under on_bad_row=skip, by reason (no_ground_truth, too_long, ...)."""
    template: Template
    """Which template rendered the prompts: the tokenizer's chat template or the plain one."""
    prompts: int
    """Prompts in the dataset."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptDataset:
    """Tokenized prompts in file order, and how they were obtained."""

    prompts: tuple[Prompt, ...]
    """Every usable prompt, in file order (files in `DataConfig.train_files` order)."""
    report: LoadReport
    """Counts and choices of the load."""

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    files: Sequence[str | Path] | None = None,
    field: str = "data.train_files",
    skip_hint: str = "set data.on_bad_row=skip",
) -> PromptDataset:
    """Read, validate, de-duplicate (cfg.unique), template and tokenize `files` (default
    `cfg.train_files`). Bad rows, including prompts over `cfg.max_prompt_tokens` tokens, raise
    or are skipped per `cfg.on_bad_row`; the result is never empty. Errors name `field` and
    `skip_hint` (`rpg-megatron eval` passes its --data and --on-bad-row flags)."""
    paths = [str(p) for p in (cfg.train_files if files is None else files)]
    if not paths:
        raise DataError(f"{field} is empty: name at least one .parquet or .jsonl file")
    bad = _BadRows(cfg.on_bad_row, skip_hint)
    rows: list[PromptRow] = []
    for path in paths:
        file_rows, skipped = read_rows(
            path,
            prompt_key=cfg.prompt_key,
            answer_key=cfg.answer_key,
            on_bad_row=cfg.on_bad_row,
            field=field,
            skip_hint=skip_hint,
        )
        rows += file_rows
        bad.counts.update(skipped)
    n_valid = len(rows)
    if cfg.unique:
        rows = deduplicate(rows)
    template = resolve_template(tokenizer, cfg.chat_template)
    texts = [render_prompt(r.messages, tokenizer, template) for r in rows]
    prompts = []
    for row, text, ids in zip(
        rows, texts, tokenize_prompts(texts, tokenizer, template), strict=True
    ):
        if len(ids) > cfg.max_prompt_tokens:
            bad(
                row.origin,
                "too_long",
                f"prompt has {len(ids)} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens}",
            )
            continue
        prompts.append(
            Prompt(
                token_ids=tuple(ids),
                text=text,
                ground_truth=row.ground_truth,
                data_source=row.data_source,
                origin=row.origin,
                extra_info=row.extra_info,
                columns=row.columns,
            )
        )
    report = LoadReport(
        files=tuple(paths),
        rows_valid=n_valid,
        duplicates=n_valid - len(rows),
        skipped=dict(bad.counts),
        template=template,
        prompts=len(prompts),
    )
    if not prompts:
        skipped = ", ".join(f"{n} {why}" for why, n in report.skipped.items()) or "none"
        raise DataError(
            f"{', '.join(paths)} ({field}): no usable prompts: {report.rows_valid} valid rows, "
            f"{report.duplicates} duplicates dropped, bad rows skipped: {skipped}"
        )
    logger.info(
        "data: %d prompts from %d files (%s template; %d duplicates dropped; skipped %s)",
        report.prompts,
        len(paths),
        "the tokenizer's chat" if template == "tokenizer" else "the plain fallback",
        report.duplicates,
        report.skipped or "none",
    )
    return PromptDataset(prompts=tuple(prompts), report=report)


# ------------------------------------------------------------------ order, cursor, sharding
@dataclass(frozen=True, slots=True, kw_only=True)
class DataCursor:
    """Position in the global prompt order: the next prompt is `epoch_order(epoch)[index]`."""

    epoch: int = 0
    """Passes over the dataset completed."""
    index: int = 0
    """Prompts of this epoch's order already handed out (always < the dataset size)."""


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The global order of dataset indices in `epoch`: a permutation drawn from (seed, epoch)
    alone, so every rank computes the same order without communicating, and a resumed run
    recomputes it from the cursor instead of storing it. seed and epoch must be >= 0."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def take(
    n: int, cursor: DataCursor, count: int, *, seed: int, shuffle: bool
) -> tuple[list[int], DataCursor]:
    """The next `count` dataset indices of the global order, and the cursor after them.

    A batch that reaches the end of an epoch continues into the next epoch's order: no prompt is
    dropped and every batch has `count` prompts (so with count > n a batch repeats prompts).
    """
    if n < 1 or count < 0:
        raise ValueError(f"take: n={n} prompts, count={count}: need n >= 1 and count >= 0")
    if not 0 <= cursor.index < n:
        raise ValueError(f"data cursor index {cursor.index} is outside a {n}-prompt dataset")
    out: list[int] = []
    epoch, index = cursor.epoch, cursor.index
    while len(out) < count:
        k = min(count - len(out), n - index)
        out += epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)[index : index + k]
        index += k
        if index == n:
            epoch, index = epoch + 1, 0
    return out, DataCursor(epoch=epoch, index=index)


T = TypeVar("T")


def dp_shard(items: Sequence[T], *, rank: int, world: int) -> list[T]:
    """This DP rank's contiguous slice of a global batch that every rank holds in the same
    order: slices are disjoint and together cover the batch exactly once."""
    if not 0 <= rank < world:
        raise ValueError(f"dp_shard: rank={rank} is outside a data-parallel world of {world}")
    if len(items) % world:
        raise ValueError(
            f"rollout.prompts_per_step={len(items)} is not divisible by the data-parallel size "
            f"{world}: every DP rank must get the same number of prompts"
        )
    per = len(items) // world
    return list(items[rank * per : (rank + 1) * per])


class PromptSampler:
    """Global prompt batches in the per-epoch order, this rank's shard, a resumable cursor.

    Every DP rank builds the same sampler (same files, seed, cursor) and asks for the same global
    batch size, so all ranks agree on the global order and take disjoint slices of it with no
    communication. Only the cursor changes; save `state_dict()` with the checkpoint.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        *,
        seed: int,
        shuffle: bool,
        cursor: DataCursor | None = None,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = cursor or DataCursor()

    def next_indices(self, global_size: int) -> list[int]:
        """Dataset indices of the next global batch; advances the cursor."""
        indices, self.cursor = take(
            len(self.dataset), self.cursor, global_size, seed=self.seed, shuffle=self.shuffle
        )
        return indices

    def next_batch(self, global_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> list[Prompt]:
        """This rank's prompts of the next global batch of `global_size`; advances the cursor
        by the whole global batch (every rank does, so cursors stay equal)."""
        mine = dp_shard(self.next_indices(global_size), rank=dp_rank, world=dp_size)
        return [self.dataset.prompts[i] for i in mine]

    def state_dict(self) -> dict[str, int]:
        """JSON-able cursor plus what it is only valid for (dataset size, seed)."""
        return {
            "epoch": self.cursor.epoch,
            "index": self.cursor.index,
            "num_prompts": len(self.dataset),
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the cursor; a different dataset size or seed would silently give another
        order, so both must match."""
        if state["num_prompts"] != len(self.dataset) or state["seed"] != self.seed:
            raise DataError(
                f"data.train_files: the checkpoint's data cursor was saved for "
                f"{state['num_prompts']} prompts with data.seed={state['seed']}; this run has "
                f"{len(self.dataset)} prompts and data.seed={self.seed}: resume with the same "
                "data files, data.unique, data.max_prompt_tokens and data.seed, or start a new "
                "run in another log.run_dir"
            )
        self.cursor = DataCursor(epoch=int(state["epoch"]), index=int(state["index"]))
