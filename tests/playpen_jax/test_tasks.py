"""Standard-benchmark evaluation through TFDS: small datasets with the real datasets' names, configs
and features, built by TFDS itself into array_record files, read back without TensorFlow."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from playpen_jax import tasks

ARC = [  # question, choices, labels, answer key
    ("Which is a colour?", ["red", "table", "seven", "run"], "ABCD", "A"),
    ("Which is a fruit?", ["stone", "apple", "car"], "ABC", "B"),
    ("What do plants need?", ["light", "plastic", "noise", "metal"], "1234", "1"),
    ("Which is largest?", ["ant", "mouse", "whale", "cat"], "ABCD", "C"),
]
GSM = [("Tom has 3 apples and buys 4 more. How many?", "7"), ("What is 1,000 + 234?", "1,234"),
       ("Half of 9?", "4.5")]


def _builders():
    options = ["A", "B", "C", "D", "E"]

    class Ai2Arc(tfds.core.GeneratorBasedBuilder):
        name = "ai2_arc"
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ARC-Easy")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "question": tfds.features.Text(),
                "choices": tfds.features.Sequence({"text": tfds.features.Text(),
                                                   "label": tfds.features.ClassLabel(names=options)}),
                "answerKey": tfds.features.ClassLabel(names=options)}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            n_to_l = dict(zip("12345", "ABCDE"))   # as the real builder maps numbered labels
            for i, (q, texts, labels, key) in enumerate(ARC):
                yield i, {"id": str(i), "question": q, "answerKey": n_to_l.get(key, key),
                          "choices": {"text": texts, "label": [n_to_l.get(x, x) for x in labels]}}

    class Gsm8k(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {k: tfds.features.Text() for k in ("question", "answer", "annotation", "short_answer")}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, (q, a) in enumerate(GSM):
                yield i, {"question": q, "answer": f"... #### {a}", "annotation": "", "short_answer": a}

    return Ai2Arc, Gsm8k


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    with tfds.core.registered.skip_registration():
        arc, gsm = _builders()
    for cls in (arc, gsm):
        cls(data_dir=str(path), file_format="array_record").download_and_prepare()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models import registry
    from tests.train.tiny_model import make_tiny_model

    return registry.load(make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model")))


def test_items_come_from_the_array_record_files(data_dir):
    items = tasks.load_items(tasks.get("arc_easy"), data_dir)
    by_question = {it.context: it for it in items}
    assert len(items) == len(ARC)
    for q, texts, labels, key in ARC:
        it = by_question[f"Question: {q}\nAnswer:"]
        assert it.choices == tuple(" " + t for t in texts) and it.answer == labels.index(key)
    assert len(tasks.load_items(tasks.get("arc_easy"), data_dir, limit=2)) == 2
    gen = tasks.load_items(tasks.get("gsm8k"), data_dir)
    assert sorted(it.answer for it in gen) == ["1234", "4.5", "7"]


def test_other_tasks_decode_their_tfds_examples():
    hs = tasks.TASKS["hellaswag"].to_item({"context": b"A man lifts a bar.", "endings": [b"He drops it.",
                                                                                           b"It sings."],
                                          "label": 0, "activity_label": b"", "split_type": b"",
                                          "source_id": b""})
    assert hs == tasks.ChoiceItem("A man lifts a bar.", (" He drops it.", " It sings."), 0)
    pq = tasks.TASKS["piqa"].to_item({"id": b"0", "goal": b"Open a jar", "sol1": b"twist", "sol2": b"bite",
                                      "label": 1})
    assert pq.choices == (" twist", " bite") and pq.answer == 1 and pq.context.endswith("Answer:")
    wg = tasks.TASKS["winogrande"].to_item({"sentence": b"The cup fell off the table because _ was round.",
                                            "option1": b"the cup", "option2": b"the table", "label": 0})
    assert wg == tasks.ChoiceItem("", ("The cup fell off the table because the cup was round.",
                                       "The cup fell off the table because the table was round."), 0)
    with pytest.raises(tasks.TaskError, match="without a blank"):
        tasks.TASKS["winogrande"].to_item({"sentence": b"no blank", "option1": b"a", "option2": b"b",
                                           "label": 0})


def test_choice_loglikelihoods_equal_a_plain_forward(data_dir, tiny):
    from models import llama

    items = tasks.load_items(tasks.get("arc_easy"), data_dir)
    lls = tasks.choice_loglikelihoods(tiny, items, batch_size=3)
    tok = tiny.tokenizer
    for item, ll in zip(items, lls):
        assert ll.shape == (len(item.choices),)
        for choice, got in zip(item.choices, ll):
            ctx, cont = tok.encode(item.context, add_bos=True), tok.encode(choice)
            ids = jnp.asarray([ctx + cont])
            logits, _ = llama.forward(tiny.params, ids, config=tiny.config)
            logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
            want = sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)
    scores = tasks.evaluate_choice(tiny, items, batch_size=4)
    expected = 100 * np.mean([int(np.argmax(ll)) == it.answer for ll, it in zip(lls, items)])
    assert scores["n"] == len(items) and scores["acc"] == pytest.approx(expected)
    assert 0 <= scores["acc_norm"] <= 100


def test_generation_is_scored_by_the_parsed_number(data_dir):
    from models.remote import RemotePolicy
    from tests.models.test_remote import FakeServer

    assert tasks._number("so 1,000.50 then #### 1,234.0") == "1234"
    assert tasks._number("no digits") is None
    items = tasks.load_items(tasks.get("gsm8k"), data_dir)
    answers = {it.prompt.split("\n")[0]: it.answer for it in items}
    # an HTTP model that answers two of the three questions right
    right = {"Tom has 3 apples and buys 4 more. How many?": "3 + 4 = 7\n#### 7",
             "What is 1,000 + 234?": "#### 1,234", "Half of 9?": "#### 4"}
    server = FakeServer(reply=lambda messages: right[messages[-1]["content"].split("\n")[0]])
    try:
        policy = RemotePolicy("openai:m", base_url=server.url, api_key="")
        scores = tasks.evaluate_generate(None, items, tasks.get("gsm8k").parse, policy=policy)
    finally:
        server.close()
    assert len(answers) == 3
    assert scores == {"n": 3, "exact_match": pytest.approx(200 / 3), "answered": 100.0}


def test_cli_writes_scores_and_names_missing_data(data_dir, tiny, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert tasks.main([f"--model={tiny.path}", "--tasks=arc_easy", f"--data_dir={data_dir}", "--limit=3",
                       f"--out={out}"]) == 0
    scores = json.loads(out.read_text())["scores"]["arc_easy"]
    assert scores["n"] == 3 and "arc_easy" in capsys.readouterr().out
    assert tasks.main([f"--model={tiny.path}", "--tasks=hellaswag", f"--data_dir={data_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hellaswag: not prepared in") and "--file_format=array_record" in err
    assert tasks.main([f"--model={tiny.path}", "--tasks=mmlu", f"--data_dir={data_dir}"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
