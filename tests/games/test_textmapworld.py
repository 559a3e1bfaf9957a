"""Tests of the text map world games: scripted episodes, players, generator, loading, fuzzing."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from games import registry
from games import textmapworld as T
from games.core import GameError, run_episode

MOVE = "^GO:\\s*(north|east|west|south)$"
STOP = "^DONE$"
RESPONSE = ('^\\{\\s*"action":\\s*"([^{}]*?)"\\s*,\\s*"graph":\\s*(\\{\\s*"nodes"\\s*:\\s*\\[.*?\\]\\s*,\\s*'
            '"edges"\\s*:\\s*\\{.*?\\}\\s*\\})\\s*\\}$')

# A small test map:            Study (1,1)
#                                 |
#           Kitchen (0,0) -- Hall (1,0) -- Attic (2,0)
CELLS = {"Kitchen": (0, 0), "Hall": (1, 0), "Study": (1, 1), "Attic": (2, 0)}
DOORS = [("Kitchen", "Hall"), ("Hall", "Study"), ("Hall", "Attic")]


def make_instance(game=T.GAME_MAIN, start="Kitchen", strict=True, cells=None, doors=None, **extra):
    """A clembench-layout instance of a map (the test map by default), with our own prompt texts."""
    cells, doors = cells or CELLS, doors or DOORS

    def _dir(a, b):
        (ax, ay), (bx, by) = cells[a], cells[b]
        return {(0, 1): "north", (0, -1): "south", (1, 0): "east", (-1, 0): "west"}[(bx - ax, by - ay)]

    nbrs = {n: [] for n in cells}
    for a, b in doors:
        nbrs[a].append(b)
        nbrs[b].append(a)
    inst = {
        "game_id": 7,
        "Prompt": ("Explore! Reply GO: DIRECTION or DONE. Target: $GOAL$. You are in the $INITIAL_ROOM$. "
                   "Exits: $INITIAL_DIRECTIONS$."),
        "Player2_positive_answer": "Now in the $ANOTHER_ROOM$. Exits: $DIRECTIONS$.",
        "Player2_negative_answer": "Blocked. Still in the $SAME_ROOM$. Exits: $DIRECTIONS$.",
        "Move_Construction": MOVE if strict else "GO:\\s*(north|east|west|south)",
        "Stop_Construction": STOP if strict else "DONE",
        "Grid_Dimension": "4",
        "Graph_Nodes": str(list(cells)),
        "Graph_Edges": str(doors),
        "Current_Position": start,
        "Picture_Name": "none.png",
        "Directions": str([(n, [_dir(n, m) for m in nbrs[n]]) for n in cells]),
        "Moves": str([{"node": n, "node_moves": [(_dir(n, m), m) for m in nbrs[n]]} for n in cells]),
        "Cycle": "cycle_false",
        "Ambiguity": None,
        "Game_Type": "named_graph",
        "Loop_Reminder": False,
        "Loop_Reminder_Text": "LOOP!",
        "Max_Turns_Reminder": False,
        "Max_Turns_Reminder_Text": "HURRY!",
        "Mapping": str({v: k for k, v in cells.items()}),
        "Strict": strict,
    }
    if game == T.GAME_GRAPH:
        inst["Response_Construction"] = RESPONSE
    if game == T.GAME_ROOM:
        inst["Specific_Room"] = "Attic"
        inst["Specific_Room_Distance"] = "2"
    inst.update(extra)
    return inst


MASTERS = {T.GAME_MAIN: T.TextMapWorld, T.GAME_GRAPH: T.TextMapWorldGraphReasoning,
           T.GAME_ROOM: T.TextMapWorldSpecificRoom}


def play(replies, game=T.GAME_MAIN, **kw):
    master = MASTERS[game](make_instance(game, **kw), {"name": "test"})
    it = iter(replies)
    run_episode(master, [lambda messages: next(it)])
    return master


def events(master, type_):
    return [e.content for rnd in master.turns for e in rnd if e.type == type_]


def harmonic(a, b):
    return 2 * a * b / (a + b) if a + b else 0.0


def graph_reply(action, nodes=(), edges=None):
    return json.dumps({"action": action, "graph": {"nodes": list(nodes), "edges": edges or {}}})


# ----- scripted episodes: textmapworld ------------------------------------------------------------
def test_optimal_exploration_succeeds_with_full_score():
    m = play(["GO: east", "GO: north", "GO: south", "GO: east", "DONE"])
    es = m.episode_scores
    assert (es["Aborted"], es["Success"], es["Lose"]) == (0, 1, 0)
    assert es["Main Score"] == 100.0
    assert (es["moves"], es["number_visited"], es["seen"], es["loops"]) == (4, 4, 4, 0)
    assert [m.turn_scores[i]["effiencient_move"] for i in range(4)] == [1, 1, 1, 1]
    assert es["Request Count"] == 5 and es["Parsed Request Count"] == 5 and es["Violated Request Count"] == 0
    assert [json.loads(c) for c in events(m, "move")][:2] == [{"old": "Kitchen", "new": "Hall"},
                                                                {"old": "Hall", "new": "Study"}]
    # The describer's answers carry the room and its exits.
    assert m.histories[0][2]["content"] == "Now in the Hall. Exits: west, north, east."
    assert m.histories[0][0]["content"].endswith("You are in the Kitchen. Exits: east.")


def test_detour_lowers_efficiency_and_counts_loop():
    # Hall -> Kitchen is not a best move (Study and Attic are still unseen).
    m = play(["GO: east", "GO: west", "GO: east", "GO: north", "GO: south", "GO: east", "DONE"])
    es = m.episode_scores
    good = [m.turn_scores[i]["effiencient_move"] for i in range(6)]
    assert good == [1, 0, 1, 1, 1, 1]
    assert es["Success"] == 1 and es["loops"] == 1
    assert es["efficiency"] == pytest.approx(500 / 6)
    assert es["Main Score"] == pytest.approx(harmonic(500 / 6, 100.0))


def test_best_walks_go_back_only_from_dead_ends():
    # On the line Gallery - Map room - Cellar - Kitchen, starting in the Map room, the only efficient
    # first move is to the Gallery: a walk may turn back only where all exits lead to rooms it passed,
    # so via the Cellar it would have to pass the Kitchen before coming back.
    cells = {"Gallery": (0, 0), "Map room": (1, 0), "Cellar": (2, 0), "Kitchen": (3, 0)}
    doors = [("Gallery", "Map room"), ("Map room", "Cellar"), ("Cellar", "Kitchen")]
    m = play(["GO: east", "GO: east", "GO: west", "GO: west", "GO: west", "DONE"], start="Map room",
             cells=cells, doors=doors)
    assert [m.turn_scores[i]["effiencient_move"] for i in range(5)] == [0, 1, 1, 1, 1]
    assert m.episode_scores["Main Score"] == pytest.approx(harmonic(80.0, 100.0))
    m = play(["GO: west", "GO: east", "GO: east", "GO: east", "DONE"], start="Map room",
             cells=cells, doors=doors)
    assert m.episode_scores["Main Score"] == 100.0


def test_moves_after_everything_was_visited_are_not_efficient():
    m = play(["GO: east", "GO: north", "GO: south", "GO: east", "GO: west", "DONE"])
    assert [m.turn_scores[i]["effiencient_move"] for i in range(5)] == [1, 1, 1, 1, 0]
    assert m.episode_scores["Success"] == 1
    assert m.episode_scores["Main Score"] == pytest.approx(harmonic(80.0, 100.0))


def test_stopping_early_loses():
    m = play(["GO: east", "DONE"])
    es = m.episode_scores
    assert (es["Aborted"], es["Success"], es["Lose"]) == (0, 0, 1)
    assert es["exploration"] == 50.0 and es["efficiency"] == 100.0
    assert es["Main Score"] == pytest.approx(harmonic(100.0, 50.0))


def test_impossible_direction_keeps_the_player_in_place():
    m = play(["GO: south", "go: EAST", "DONE"])
    assert m.histories[0][2]["content"] == "Blocked. Still in the Kitchen. Exits: east."
    assert m.histories[0][4]["content"].startswith("Now in the Hall.")  # case-insensitive move
    es = m.episode_scores
    assert es["moves"] == 1 and es["invalid_moves"] == 0 and es["Lose"] == 1
    assert es["Parsed Request Count"] == 3


def test_no_move_then_done_scores_zero():
    m = play(["DONE"])
    es = m.episode_scores
    assert es["Lose"] == 1 and es["Main Score"] == 0.0 and es["exploration"] == 25.0


@pytest.mark.parametrize("reply", ["I go north", "GO: north\nDONE", " DONE", "GO: up", "", "DONE please"])
def test_format_violations_abort(reply):
    m = play(["GO: east", reply])
    es = m.episode_scores
    assert (es["Aborted"], es["Success"], es["Lose"]) == (1, 0, 0)
    assert math.isnan(es["Main Score"]) and math.isnan(es["moves"])
    assert es["Violated Request Count"] == 1 and es["Parsed Request Count"] == 1
    assert events(m, "aborted") == ["abort game"]


def test_trailing_newline_is_tolerated():
    m = play(["GO: east\n", "DONE\n"])
    assert m.episode_scores["Aborted"] == 0 and m.episode_scores["moves"] == 1


@pytest.mark.parametrize("reply", ["GO: east and then DONE", "GO: east GO: north"])
def test_loose_patterns_abort_on_both_or_several_moves(reply):
    m = play([reply], strict=False)
    assert m.episode_scores["Aborted"] == 1


def test_loose_patterns_accept_surrounding_text():
    m = play(["Let me think. GO: east", "all rooms seen, DONE"], strict=False)
    assert m.episode_scores["Aborted"] == 0 and m.episode_scores["moves"] == 1


def test_turn_limit_aborts_after_twenty_rounds():
    m = play(["GO: east", "GO: west"] * 20)
    es = m.episode_scores
    assert es["Aborted"] == 1 and math.isnan(es["Main Score"])
    assert es["Request Count"] == T.MAX_TURNS and len(m.turns) == T.MAX_TURNS
    assert events(m, "turns_limit") == ["20"]


def test_done_in_the_last_round_is_played():
    m = play(["GO: east", "GO: west"] * 9 + ["GO: east", "DONE"])
    assert m.episode_scores["Aborted"] == 0 and m.episode_scores["Request Count"] == 20


def test_reminders():
    m = play(["GO: east", "GO: west"] * 20, Max_Turns_Reminder=True, Loop_Reminder=True)
    prompts = [h["content"] for h in m.histories[0] if h["role"] == "user"]
    assert prompts[3].startswith("LOOP!\n") and sum(p.startswith("LOOP!") for p in prompts) == 1
    assert prompts[19].startswith("HURRY!\n") and sum("HURRY!" in p for p in prompts) == 1
    assert len(events(m, "loop_detected")) == 1


# ----- scripted episodes: graph reasoning ---------------------------------------------------------
FULL_EDGES = {"east": [["Kitchen", "Hall"], ["Hall", "Attic"]], "north": [["Hall", "Study"]],
              "west": [["Hall", "Kitchen"], ["Attic", "Hall"]], "south": [["Study", "Hall"]]}


def test_graph_reasoning_success_and_similarity():
    replies = [graph_reply("GO: east", ["Kitchen"]),
               graph_reply("GO: north", ["Kitchen", "Hall"], {"east": [["Kitchen", "Hall"]]}),
               graph_reply("GO: south", ["Kitchen", "Hall", "Study"]),
               graph_reply("GO: east", list(CELLS), FULL_EDGES),
               graph_reply("DONE", [])]
    m = play(replies, T.GAME_GRAPH)
    es = m.episode_scores
    assert es["Success"] == 1 and es["Main Score"] == 100.0
    sims = [m.turn_scores[i]["similarity"] for i in range(4)]

    def sim(d):
        return (1 - 2 * (1 / (1 + math.exp(-0.5 * d)) - 0.5)) * 100

    # GED to the true map (4 rooms, 3 doors): 3+3=6, 2+3+1-2=4, 1+3=4 (no edges: 3 rooms), 0.
    assert sims == pytest.approx([sim(6), sim(4), sim(4), 100.0])
    assert es["graph_similarity"] == 100.0  # the map sent with DONE is not scored
    assert len(events(m, "graph")) == 4


def test_graph_reasoning_direction_is_case_sensitive():
    m = play([graph_reply("GO: East"), graph_reply("DONE")], T.GAME_GRAPH)
    assert m.histories[0][2]["content"].startswith("Blocked.")
    assert m.episode_scores["moves"] == 0 and m.episode_scores["graph_similarity"] == 0


@pytest.mark.parametrize("reply", ["GO: east", '{"action": "GO: east"}', graph_reply("jump"),
                                   '{"action": "GO: east", "graph": {"nodes": [], "edges": {}}} ok'])
def test_graph_reasoning_format_violations_abort(reply):
    m = play([reply], T.GAME_GRAPH)
    assert m.episode_scores["Aborted"] == 1 and events(m, "parse") == []


def test_graph_reasoning_unreadable_dictionary_aborts_after_parsing():
    m = play(['{"action": "GO: east", "graph": {"nodes": [Kitchen], "edges": {}}}'], T.GAME_GRAPH)
    es = m.episode_scores
    assert es["Aborted"] == 1 and es["Violated Request Count"] == 1
    assert len(events(m, "parse")) == 1 and events(m, "aborted") == ["abort game"]


def test_graph_reasoning_unreadable_map_scores_zero():
    m = play([graph_reply("GO: east", [1, 2]), graph_reply("DONE")], T.GAME_GRAPH)
    assert m.episode_scores["Aborted"] == 0 and m.turn_scores[0]["similarity"] == 0


# ----- scripted episodes: specific room -----------------------------------------------------------
def test_specific_room_success():
    m = play(["GO: east", "GO: east", "DONE"], T.GAME_ROOM)
    es = m.episode_scores
    assert es["Success"] == 1 and es["Main Score"] == 100.0
    assert es["old_benchscore"] == pytest.approx(harmonic(100.0, 75.0))
    assert "Target: Attic." in m.histories[0][0]["content"]


def test_specific_room_counts_loops_afresh_after_each_loop():
    replies = ["GO: east", "GO: west", "GO: east", "GO: west", "GO: east", "GO: east", "DONE"]
    assert play(replies, T.GAME_ROOM).episode_scores["loops"] == 1
    assert play(replies, T.GAME_MAIN).episode_scores["loops"] == 3


def test_specific_room_wrong_room_loses():
    m = play(["GO: east", "GO: north", "DONE"], T.GAME_ROOM)
    es = m.episode_scores
    assert (es["Success"], es["Lose"], es["Main Score"]) == (0, 1, 0.0)


def test_specific_room_target_is_start():
    m = play(["DONE"], T.GAME_ROOM, start="Attic")
    assert m.episode_scores["Success"] == 1 and m.episode_scores["Main Score"] == 100.0


def test_specific_room_turn_limit_aborts():
    m = play(["GO: south"] * 20, T.GAME_ROOM)
    assert m.episode_scores["Aborted"] == 1


# ----- malformed instances ------------------------------------------------------------------------
@pytest.mark.parametrize("game,change", [
    (T.GAME_MAIN, {"Current_Position": "Garden"}),
    (T.GAME_MAIN, {"Move_Construction": "GO: (north"}),
    (T.GAME_MAIN, {"Graph_Nodes": "['Kitchen', 'Hall'"}),
    (T.GAME_MAIN, {"Directions": "[('Kitchen', ['north'])]"}),
    (T.GAME_MAIN, {"Moves": "[{'node': 'Kitchen'}]"}),
    (T.GAME_MAIN, {"Game_Type": "3d_graph"}),
    (T.GAME_ROOM, {"Specific_Room": "Garden"}),
])
def test_malformed_instances_raise(game, change):
    with pytest.raises(GameError):
        MASTERS[game](make_instance(game, **change), {})


@pytest.mark.parametrize("game,field", [(T.GAME_MAIN, "Prompt"), (T.GAME_GRAPH, "Response_Construction"),
                                        (T.GAME_ROOM, "Specific_Room")])
def test_missing_fields_raise(game, field):
    inst = make_instance(game)
    del inst[field]
    with pytest.raises(GameError, match=field):
        MASTERS[game](inst, {})


# ----- graph edit distance ------------------------------------------------------------------------
def _brute_ged(n1, e1, n2, e2):
    nodes1, edges1 = T._graph_of(n1, e1)
    nodes2, edges2 = T._graph_of(n2, e2)
    small, big, es, eb = (nodes1, nodes2, edges1, edges2) if len(nodes1) <= len(nodes2) else \
        (nodes2, nodes1, edges2, edges1)
    small = sorted(small)
    best = 0
    for image in itertools.permutations(sorted(big), len(small)):
        phi = dict(zip(small, image))
        best = max(best, sum(1 for e in es if frozenset(phi[x] for x in e) in eb))
    return abs(len(nodes1) - len(nodes2)) + len(edges1) + len(edges2) - 2 * best


def _random_graph(rng, prefix):
    nodes = [f"{prefix}{i}" for i in range(rng.randint(0, 5))]
    p = rng.random() * 0.7
    edges = [(a, b) for a, b in itertools.combinations(nodes, 2) if rng.random() < p]
    return nodes, edges


def test_graph_edit_distance_matches_brute_force():
    rng = random.Random(3)
    for _ in range(150):
        g1, g2 = _random_graph(rng, "a"), _random_graph(rng, "b")
        assert T.graph_edit_distance(*g1, *g2) == _brute_ged(*g1, *g2)


def test_graph_edit_distance_matches_networkx():
    nx = pytest.importorskip("networkx")
    rng = random.Random(5)
    for _ in range(40):
        (n1, e1), (n2, e2) = _random_graph(rng, "a"), _random_graph(rng, "b")
        g1, g2 = nx.Graph(), nx.Graph()
        g1.add_nodes_from(n1)
        g1.add_edges_from(e1)
        g2.add_nodes_from(n2)
        g2.add_edges_from(e2)
        assert T.graph_edit_distance(n1, e1, n2, e2) == nx.graph_edit_distance(g1, g2)


# ----- programmatic players -----------------------------------------------------------------------
GAMES = [T.GAME_MAIN, T.GAME_GRAPH, T.GAME_ROOM]


def _run(game, kind, split, n=20, seed=0):
    played, quality = [], []
    for ep in registry.instances(game, split, seed)[::3][:n]:
        master = registry.make_master(ep)
        run_episode(master, [registry.make_player(game, kind, master.roles[0], ep)])
        es = master.episode_scores
        played.append(1 - es["Aborted"])
        if not es["Aborted"]:
            quality.append(es["Main Score"])
    return sum(played) / len(played), (sum(quality) / len(quality) if quality else 0.0)


@pytest.mark.parametrize("game", GAMES)
@pytest.mark.parametrize("split", registry.SPLITS)
def test_strong_player(game, split):
    played, quality = _run(game, "strong", split)
    assert played >= 0.9 and quality >= 95


@pytest.mark.parametrize("game", GAMES)
def test_weak_player(game):
    played, quality = _run(game, "weak", "test", n=30)
    assert quality < 60


def test_strong_graph_player_reports_the_whole_map():
    ep = registry.instances(T.GAME_GRAPH, "test", 0)[-1]
    master = registry.make_master(ep)
    run_episode(master, [registry.make_player(T.GAME_GRAPH, "strong", "Describer", ep)])
    assert master.episode_scores["graph_similarity"] == 100.0


def test_strong_player_follows_its_own_history():
    # The strong player reads where it is from the conversation, so a detour forced on it is undone.
    inst = make_instance()
    player = T._strong_factory(T.GAME_MAIN)("Describer", inst, {}, random.Random(0))
    history = [{"role": "user", "content": "start"}, {"role": "assistant", "content": "GO: east"},
               {"role": "user", "content": "..."}, {"role": "assistant", "content": "GO: north"},
               {"role": "user", "content": "..."}]
    assert player(history) == "GO: south"
    assert player(history[:1]) == "GO: east"


# ----- generator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("game", GAMES)
def test_generator_deterministic_and_sized(game):
    spec = registry.get(game)
    a, b = spec.generate("test", 0), spec.generate("test", 0)
    assert a == b and spec.generate("train", 1) != spec.generate("train", 2)
    expected = {T.GAME_MAIN: 5, T.GAME_GRAPH: 3, T.GAME_ROOM: 3}[game]
    for split, per in (("test", 10), ("validation", 10), ("train", 200)):
        exps = spec.generate(split, 0)["experiments"]
        assert len(exps) == expected
        assert all(len(e["game_instances"]) == per for e in exps)
        ids = [i["game_id"] for e in exps for i in e["game_instances"]]
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("game", GAMES)
def test_no_map_shared_between_splits(game):
    spec = registry.get(game)
    keys = {s: {spec.instance_key(ep.instance) for seed in (0, 1) for ep in registry.instances(game, s, seed)}
            for s in registry.SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    for s, ks in keys.items():
        assert all(registry.split_of(k, salt=T.SPLIT_SALT) == s for k in ks)


def test_generated_maps_follow_the_experiments():
    for ep in registry.instances(T.GAME_MAIN, "validation", 0):
        spec = T.MapSpec(ep.instance, ep.experiment, T.GAME_MAIN)
        rooms, cycle = T.EXPERIMENTS[T.GAME_MAIN][ep.experiment_name]
        assert len(spec.nodes) == rooms
        has_cycle = len(spec.edges) >= len(spec.nodes)
        assert has_cycle == (cycle == "cycle_true") and ep.instance["Cycle"] == cycle
        for node in spec.nodes:  # every exit leads to the neighbouring cell in its direction
            cell = ast_cell(ep.instance, node)
            for d in spec.exits(node):
                dx, dy = T.DELTA[d]
                assert ast_cell(ep.instance, spec.moves[node][d]) == (cell[0] + dx, cell[1] + dy)
    for ep in registry.instances(T.GAME_ROOM, "test", 0):
        spec = T.MapSpec(ep.instance, ep.experiment, T.GAME_ROOM)
        dist = T._distances({"nodes": spec.nodes, "edges": spec.edges}, spec.start)[spec.target]
        assert dist == int(ep.instance["Specific_Room_Distance"])
        assert dist in T.ROOM_EXPERIMENTS[ep.experiment_name]


def ast_cell(instance, node):
    import ast

    return {v: k for k, v in ast.literal_eval(instance["Mapping"]).items()}[node]


# ----- clembench-style instance files -------------------------------------------------------------
def test_instances_file_loads_and_plays(tmp_path):
    unnamed = make_instance(
        Graph_Nodes="[(0, 0), (1, 0), (1, 1)]", Graph_Edges="[((0, 0), (1, 0)), ((1, 0), (1, 1))]",
        Current_Position="(0, 0)", Game_Type="unnamed_graph",
        Directions="[((0, 0), ['east']), ((1, 0), ['west', 'north']), ((1, 1), ['south'])]",
        Moves=("[{'node': (0, 0), 'node_moves': [('east', (1, 0))]}, "
               "{'node': (1, 0), 'node_moves': [('west', (0, 0)), ('north', (1, 1))]}, "
               "{'node': (1, 1), 'node_moves': [('south', (1, 0))]}]"),
        Prompt="Explore. Exits: $INITIAL_DIRECTIONS$.", game_id=8)
    del unnamed["Mapping"]
    data = {"experiments": [{"name": "small", "game_instances": [make_instance(), unnamed]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    episodes = registry.load_instances_file(path, T.GAME_MAIN)
    assert len(episodes) == 2
    for ep in episodes:
        master = registry.make_master(ep)
        run_episode(master, [registry.make_player(T.GAME_MAIN, "strong", "Describer", ep)])
        assert master.episode_scores["Success"] == 1 and master.episode_scores["Main Score"] == 100.0
    assert json.loads(events(master, "move")[0]) == {"old": [0, 0], "new": [1, 0]}

    room = {"experiments": [{"name": "far", "game_instances": [make_instance(T.GAME_ROOM, start="Study")]}]}
    path.write_text(json.dumps(room))
    (ep,) = registry.load_instances_file(path, T.GAME_ROOM)
    master = registry.make_master(ep)
    run_episode(master, [registry.make_player(T.GAME_ROOM, "strong", "Describer", ep)])
    assert master.episode_scores["Main Score"] == 100.0 and master.episode_scores["moves"] == 2


# ----- fuzzing ------------------------------------------------------------------------------------
def _check_scores(master):
    es = master.scores()["episode scores"]
    assert es["Aborted"] + es["Success"] + es["Lose"] == 1
    if es["Aborted"]:
        assert math.isnan(es["Main Score"])
    else:
        assert 0 <= es["Main Score"] <= 100
    assert master.done and len(master.turns) <= T.MAX_TURNS


_GRAPHS = ['{"nodes": [], "edges": {}}', '{"nodes": ["a"], "edges": {"x": "ab"}}',
           '{"nodes": ["Hall"], "edges": {"east": [["Kitchen", "Hall", 1]]}}',
           '{"nodes": [1], "edges": {}}', '{"nodes": [], "edges": {"a": [[1]]}}']
_replies = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["GO: north", "GO: south", "GO: east", "GO: west", "DONE", "go: West\n", "GO:north"]),
    st.builds(lambda a, g: '{"action": "' + a + '", "graph": ' + g + '}',
              st.sampled_from(["GO: east", "GO: north", "GO: west", "DONE", "GO: East"]),
              st.one_of(st.text(max_size=40), st.sampled_from(_GRAPHS))),
)


@settings(max_examples=50, deadline=None)
@given(game=st.sampled_from(GAMES), replies=st.lists(_replies, min_size=1, max_size=25))
def test_fuzz_replies_never_raise(game, replies):
    master = MASTERS[game](make_instance(game), {"name": "fuzz"})
    it = iter(replies + ["DONE"] * 25)
    run_episode(master, [lambda messages: next(it)])
    _check_scores(master)
