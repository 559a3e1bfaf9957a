"""Guess What?: rules, scores, generator, players and loading clembench-style instance files."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games import guesswhat as gw
from games import registry
from games.core import BENCH_SCORE, GameError, run_episode

CANDS = ["Eagle", "Owl", "Duck", "Swan", "Apple", "Lemon", "Chair", "Sofa"]
INSTANCE = {"game_id": 7, "target_word": "Owl", "candidate_list": CANDS}
EXP = gw.experiment_config("Level_2")


def scripted(guesser, answerer=(), instance=INSTANCE, experiment=EXP):
    """Plays one episode with fixed replies; fails if a player is asked more often than scripted."""
    g, a = iter(guesser), iter(answerer)
    master = gw.GuessWhatMaster(instance, experiment)
    return run_episode(master, {"Guesser": lambda m: next(g), "Answerer": lambda m: next(a)})


def es(master):
    return master.scores()["episode scores"]


def gm_events(master):
    return [(e.type, e.content) for rnd in master.turns for e in rnd if e.from_ == "GM" and e.to == "GM"]


# ----- success, loss and speed -------------------------------------------------------------------
def test_fast_success_scores_full_speed():
    m = scripted(["QUESTION: Is it a bird?", "QUESTION: Does it swim?", "QUESTION: Does it hunt at night?",
                  "GUESS: Owl"], ["ANSWER: yes", "ANSWER: No.", "ANSWER: Yes"])
    s = es(m)
    assert (s["Aborted"], s["Success"], s["Lose"]) == (0, 1, 0)
    assert s[BENCH_SCORE] == 100 and s[gw.SPEED] == 100
    assert s["Request Count"] == 4 and s["Parsed Request Count"] == 4 and s["Violated Request Count"] == 0
    assert s["Request Success Ratio"] == 1
    turns = m.scores()["turn scores"]
    assert [turns[str(i)][gw.ACCURACY] for i in range(4)] == [0, 0, 0, 1]
    assert all(turns[str(i)]["Request Count"] == 1 for i in range(4))
    assert ("correct guess", "owl") in gm_events(m) and ("correct guess", "end game") in gm_events(m)
    assert all(s[k] == 0 for k in (gw.INVALID_FORMAT_GUESSER, gw.INVALID_FORMAT_ANSWERER,
                                   gw.INVALID_CONTENT_GUESSER, gw.INVALID_CONTENT_ANSWERER))


@pytest.mark.parametrize("questions, expected", [
    (0, 100.0), (3, 100.0), (4, 100.0), (5, 100 * 2 / 3), (6, 100 / 3), (7, 0.0)])
def test_speed_falls_linearly_after_five_rounds(questions, expected):
    m = scripted(["QUESTION: Is it a bird?"] * questions + ["GUESS: owl."], ["ANSWER: yes"] * questions)
    s = es(m)
    assert s["Success"] == 1 and s["Request Count"] == questions + 1
    assert s[BENCH_SCORE] == pytest.approx(expected) and s[gw.SPEED] == pytest.approx(expected)


def test_wrong_guess_is_a_loss():
    m = scripted(["QUESTION: Is it a bird?", "GUESS: Eagle"], ["ANSWER: yes"])
    s = es(m)
    assert (s["Aborted"], s["Success"], s["Lose"], s[BENCH_SCORE]) == (0, 0, 1, 0)
    assert gw.SPEED not in s
    assert ("incorrect guess", "eagle") in gm_events(m)
    # A word outside the list and an empty guess are wrong guesses too, not format errors.
    assert es(scripted(["GUESS: Penguin"]))["Lose"] == 1
    assert es(scripted(["GUESS:"]))["Lose"] == 1


def test_no_guess_within_max_turns_is_a_loss():
    m = scripted(["QUESTION: Is it a bird?"] * 8, ["ANSWER: no"] * 8)
    s = es(m)
    assert (s["Aborted"], s["Lose"], s[BENCH_SCORE], s["Request Count"]) == (0, 1, 0, 8)
    assert ("max turns reached", "8") in gm_events(m)
    assert len(m.turns) == 8


def test_lenient_forms_that_are_valid():
    # No question mark, surrounding whitespace and punctuation in the guess are all fine.
    m = scripted(["  QUESTION: Is it a bird", "GUESS: OWL!\n"], [" ANSWER: Yes. "])
    assert es(m)["Success"] == 1 and es(m)["Request Count"] == 2


# ----- aborts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, kind", [
    ("I think it is the owl.", "format"),
    ("question: Is it a bird?", "format"),
    ("QUESTION: Is it a bird? QUESTION: Does it swim?", "format"),
    ("QUESTION: Is it a bird? Or a fish?", "format"),
    ("QUESTION: Is it a bird? I think so.", "format"),
    ("GUESS: snowy owl", "format"),
    ("QUESTION: Does the target word start with the letter o?", "content"),
    ("QUESTION: Is the third letter of the target word l?", "content"),
    ("QUESTION: Is the target word 'Owl'?", "content"),
    ('QUESTION: Is the target word "Sofa"?', "content"),
    ("QUESTION: Does the target word have exactly 3 letters?", "content"),
    ("QUESTION: Does the target word have more than two syllables?", "content"),
    ("QUESTION: Is the target word a noun?", "content"),
])
def test_guesser_violations_abort(reply, kind):
    m = scripted(["QUESTION: Is it a bird?", reply], ["ANSWER: yes"])
    s = es(m)
    assert (s["Aborted"], s["Success"], s["Lose"]) == (1, 0, 0) and math.isnan(s[BENCH_SCORE])
    assert (s["Request Count"], s["Parsed Request Count"], s["Violated Request Count"]) == (2, 1, 1)
    assert s["Request Success Ratio"] == 0.5
    counter = gw.INVALID_FORMAT_GUESSER if kind == "format" else gw.INVALID_CONTENT_GUESSER
    assert s[counter] == 1 and sum(s[k] for k in gw.GuessWhatMaster({**INSTANCE}, EXP).invalid) == 1
    assert gm_events(m)[-1] == (f"invalid {kind}", "abort game")
    turns = m.scores()["turn scores"]
    assert turns["1"]["Violated Request Count"] == 1 and turns["0"]["Violated Request Count"] == 0


@pytest.mark.parametrize("answer", ["ANSWER: maybe", "yes", "ANSWER: no.", "ANSWER: YES",
                                    "ANSWER: yes, it is", ""])
def test_answerer_outside_the_answer_variations_aborts(answer):
    m = scripted(["QUESTION: Is it a bird?"], [answer])
    s = es(m)
    assert s["Aborted"] == 1 and math.isnan(s[BENCH_SCORE])
    assert s[gw.INVALID_FORMAT_ANSWERER] == 1 and s[gw.INVALID_FORMAT_GUESSER] == 0
    assert (s["Request Count"], s["Violated Request Count"]) == (1, 1)
    assert gm_events(m)[-1] == ("invalid format", "abort game")


def test_allowed_questions_about_meaning_are_not_flagged():
    m = gw.GuessWhatMaster(INSTANCE, EXP)
    for q in ("Is it a bird?", "Is it one of the birds?", "Does it have more than two legs?",
              "Is the target word something you eat?", "Does it start to sing at dawn?"):
        assert m.check_question(f"QUESTION: {q}") == [], q


def test_clembench_stored_direct_guess_pattern_is_used_as_given():
    # Instance files may carry a direct-guess pattern whose back-reference was stored as a control
    # character; it is applied as given, so the quoted question passes there.
    exp = {**EXP, "direct_guess_pattern": "^is the target word\\s*(['\"])[^'\"]+?\x01\\s*\\?"}
    m = scripted(["QUESTION: Is the target word 'Owl'?", "GUESS: Owl"], ["ANSWER: yes"], experiment=exp)
    assert es(m)["Success"] == 1


# ----- prompts and setup -------------------------------------------------------------------------
def test_prompts_carry_the_list_the_budget_and_the_target():
    m = gw.GuessWhatMaster(INSTANCE, EXP)
    req = m.start()
    assert req.role == "Guesser" and str(CANDS) in req.messages[0]["content"]
    assert "at most 7 questions" in req.messages[0]["content"]
    req = m.step("QUESTION: Is it a bird?")
    assert req.role == "Answerer"
    first = req.messages[0]["content"]
    assert "The secret word is: Owl" in first and first.endswith("\n\nQUESTION: Is it a bird?")
    req = m.step("ANSWER: yes")
    assert req.role == "Guesser" and req.messages[-1] == {"role": "user", "content": "ANSWER: yes"}
    req = m.step("QUESTION: Does it swim?")
    assert req.messages[-1]["content"] == "QUESTION: Does it swim?" and len(req.messages) == 3


@pytest.mark.parametrize("instance, experiment", [
    ({"game_id": 1, "candidate_list": CANDS}, EXP),
    ({"game_id": 1, "target_word": "Owl", "candidate_list": "Owl, Eagle"}, EXP),
    ({"game_id": 1, "target_word": "Penguin", "candidate_list": CANDS}, EXP),
    ({"game_id": 1, "target_word": "Owl", "candidate_list": []}, EXP),
    (INSTANCE, {**EXP, "max_turns": 0}),
    (INSTANCE, {**EXP, "max_turns": "8"}),
    (INSTANCE, {**EXP, "letter_based_pattern": "(unclosed"}),
    (INSTANCE, {**EXP, "answer_variations": "ANSWER: yes"}),
])
def test_malformed_instances_raise_game_error(instance, experiment):
    with pytest.raises(GameError):
        gw.GuessWhatMaster(instance, experiment)


def test_bare_instance_uses_default_config():
    m = scripted(["QUESTION: Is it a bird?", "GUESS: owl"], ["ANSWER: Yes"], experiment={})
    assert es(m)["Success"] == 1 and m.max_turns == 8


# ----- generator ---------------------------------------------------------------------------------
def test_generator_is_deterministic_with_expected_sizes_and_layout():
    sets = {s: gw.generate(s, 0) for s in registry.SPLITS}
    assert gw.generate("test", 0) == sets["test"]
    assert gw.generate("train", 1) != sets["train"]
    names = [e["name"] for e in sets["test"]["experiments"]]
    assert names == ["Level_1", "Level_2", "Level_3", "Abs_Level_1", "Abs_Level_2", "Abs_Level_3"]
    for split, n in (("test", 10), ("validation", 10)):
        assert [len(e["game_instances"]) for e in sets[split]["experiments"]] == [n] * 6
    assert sum(len(e["game_instances"]) for e in sets["train"]["experiments"]) >= 600
    exp = sets["test"]["experiments"][0]
    for key in ("max_turns", "question_tag", "answer_tag", "guess_tag", "answer_variations",
                "letter_based_pattern", "direct_guess_pattern", "length_question_pattern",
                "syllable_question_pattern", "pos_question_pattern", "answerer_initial_prompt",
                "guesser_initial_prompt"):
        assert key in exp, key
    assert set(exp["game_instances"][0]) == {"game_id", "target_word", "candidate_list"}


def test_instances_follow_the_level_structure():
    lex = gw.lexicon()
    for split in registry.SPLITS:
        for exp in gw.generate(split, 3)["experiments"]:
            level = int(exp["name"][-1])
            abstract = exp["name"].startswith("Abs")
            for inst in exp["game_instances"]:
                cands = inst["candidate_list"]
                assert len(cands) == 8 and len({c.lower() for c in cands}) == 8
                assert inst["target_word"] in cands
                infos = [lex.info[c.lower()] for c in cands]
                assert {i["dataset"] for i in infos} == {"abstract" if abstract else "concrete"}
                cats = {i["category"] for i in infos}
                subs = {i["subcategory"] for i in infos}
                shape = {1: (4, 8), 2: (2, 4), 3: (1, 4)}[level]
                assert (len(cats), len(subs)) == shape, (exp["name"], cands)


def test_train_and_heldout_targets_never_overlap():
    keys = {s: {gw.instance_key(i) for seed in (0, 1, 2) for e in gw.generate(s, seed)["experiments"]
                for i in e["game_instances"]} for s in registry.SPLITS}
    assert keys["train"].isdisjoint(keys["test"]) and keys["train"].isdisjoint(keys["validation"])
    assert keys["validation"].isdisjoint(keys["test"])
    assert len(keys["test"]) >= 30 and len(keys["train"]) >= 300


# ----- resources and players ---------------------------------------------------------------------
def test_resources_words_are_unique_and_properties_distinguish_them():
    lex = gw.lexicon()
    master = gw.GuessWhatMaster(INSTANCE, EXP)
    words = [w for d in ("concrete", "abstract") for c in gw.load_dataset(d) for s in c["Subcategories"]
             for w in s["Members"]]
    assert len(words) == len({w.lower() for w in words}) >= 400
    assert all(w.isalpha() for w in words)
    for d in ("concrete", "abstract"):
        for c in gw.load_dataset(d):
            assert len(c["Subcategories"]) >= 4
            for s in c["Subcategories"]:
                assert len(s["Members"]) >= 3
                for w in s["Members"]:
                    q = s["Properties"][w]
                    assert q.endswith("?") and q.count("?") == 1
                    assert not master.check_question(f"QUESTION: {q}"), q
                    assert [v for v in s["Members"] if lex.truth(v, q)] == [w]


def test_strong_answerer_answers_from_the_features():
    lex = gw.lexicon()
    cases = [("Eagle", "Is it a bird?", True), ("Eagle", "Is it a bird of prey?", True),
             ("Duck", "Is it a bird of prey?", False), ("Owl", "Is it an animal?", True),
             ("Sofa", "Is it an animal?", False), ("Sofa", "Is it a seat or a table?", True),
             ("Eagle", "Is it not a bird?", False), ("Apple", "Is it a mammal?", False),
             ("joy", "Is it an emotion?", True), ("joy", "Is it a sad feeling?", False),
             ("Sofa", "Is it something you can eat?", False), ("Lemon", "Is it something you can eat?", True)]
    for word, question, truth in cases:
        assert lex.truth(word, question) is truth, (word, question)
    ep = registry.Episode("guesswhat", EXP, {"game_id": 0, "target_word": "Eagle", "candidate_list": CANDS})
    answerer = registry.make_player("guesswhat", "strong", "Answerer", ep)
    assert answerer([{"role": "user", "content": "intro\n\nQUESTION: Is it a bird?"}]) == "ANSWER: yes"
    assert answerer([{"role": "user", "content": "QUESTION: Is it a piece of furniture?"}]) == "ANSWER: no"


def play(ep, kind, seed=0, kinds=None):
    players = {r: registry.make_player("guesswhat", (kinds or {}).get(r, kind), r, ep, seed)
               for r in gw.GuessWhatMaster.roles}
    return run_episode(registry.make_master(ep), players)


@pytest.mark.parametrize("split", registry.SPLITS)
def test_strong_players_win_fast_weak_players_do_not(split):
    eps = registry.instances("guesswhat", split, seed=0)[::3][:20]
    strong = [es(play(e, "strong", i)) for i, e in enumerate(eps)]
    weak = [es(play(e, "weak", i)) for i, e in enumerate(eps)]
    assert sum(1 - s["Aborted"] for s in strong) / len(strong) >= 0.9
    assert sum(s[BENCH_SCORE] for s in strong) / len(strong) >= 90
    assert all(s["Request Count"] <= 5 for s in strong)
    assert sum(0 if s["Aborted"] else s[BENCH_SCORE] for s in weak) / len(weak) < 40


def test_strong_guesser_reads_the_answers_it_gets():
    # With a lying answerer the strong guesser is led to a wrong word: it follows the answers.
    ep = registry.instances("guesswhat", "test", seed=0)[12]
    liar = lambda m: "ANSWER: no" if gw.lexicon().truth(  # noqa: E731
        ep.instance["target_word"], m[-1]["content"].rsplit("QUESTION:", 1)[-1]) else "ANSWER: yes"
    guesser = registry.make_player("guesswhat", "strong", "Guesser", ep)
    m = run_episode(registry.make_master(ep), {"Guesser": guesser, "Answerer": liar})
    assert es(m)["Lose"] == 1


# ----- clembench-style instance files -------------------------------------------------------------
def test_clembench_instances_file_loads_and_plays(tmp_path):
    config = {
        "name": "Level_1", "max_turns": 8, "question_tag": "QUESTION:", "answer_tag": "ANSWER:",
        "guess_tag": "GUESS:",
        "answer_variations": ["ANSWER: yes", "ANSWER: no", "ANSWER: Yes.", "ANSWER: Yes", "ANSWER: No.",
                              "ANSWER: No"],
        **gw.PATTERNS,
        "answerer_initial_prompt": "Secret: $TARGET WORD$. Reply as ANSWER: yes or ANSWER: no.",
        "guesser_initial_prompt": "Find the word in $LIST$ with at most $N$ questions. QUESTION: / GUESS:",
    }
    instances = [
        {"game_id": 0, "target_word": "Hawk", "candidate_list": ["Copper", "Iron", "Hawk", "Robin", "Lime",
                                                                  "Mango", "Bench", "Crib"]},
        # Words outside our resources: the strong players fall back to naming candidates.
        {"game_id": 1, "target_word": "Quokka", "candidate_list": ["Zebu", "Quokka", "Gnu", "Okapi", "Tapir",
                                                                    "Dugong", "Kudu", "Numbat"]},
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"experiments": [{**config, "game_instances": instances}]}))
    eps = registry.load_instances_file(path, "guesswhat")
    assert [e.experiment_name for e in eps] == ["Level_1", "Level_1"]
    for ep in eps:
        m = play(ep, "strong")
        assert es(m)["Success"] == 1
        prompt = m.histories[0][0]["content"]
        assert prompt.startswith("Find the word in [") and "at most 7 questions" in prompt
    single = tmp_path / "Level_3" / "instance.json"
    single.parent.mkdir()
    single.write_text(json.dumps(instances[0]))
    (ep,) = registry.load_instances_file(single, "guesswhat")
    assert es(play(ep, "strong"))["Success"] == 1


# ----- fuzz --------------------------------------------------------------------------------------
REPLIES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["QUESTION: Is it a bird?", "GUESS: Owl", "GUESS: Eagle", "ANSWER: yes", "ANSWER: No.",
                     "QUESTION:", "GUESS:", "QUESTION: ??", "ANSWER:"]),
    st.builds(lambda p, t: p + t, st.sampled_from(["QUESTION: ", "GUESS: ", "ANSWER: "]),
              st.text(max_size=40)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(REPLIES, min_size=1, max_size=20))
def test_arbitrary_replies_never_raise(replies):
    master = gw.GuessWhatMaster(INSTANCE, EXP)
    req, n = master.start(), 0
    while req is not None:
        assert n < 40
        req = master.step(replies[n % len(replies)])
        n += 1
    s = master.scores()
    e = s["episode scores"]
    assert e["Aborted"] + e["Success"] + e["Lose"] == 1
    assert math.isnan(e[BENCH_SCORE]) if e["Aborted"] else 0 <= e[BENCH_SCORE] <= 100
    assert e["Request Count"] == len(master.turns) == len(s["turn scores"]) <= 8
    assert e["Parsed Request Count"] + e["Violated Request Count"] == e["Request Count"]
    json.dumps(s, allow_nan=True)
    json.dumps(master.interactions())
