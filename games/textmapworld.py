"""Text map world: one player walks through a map of rooms, told only the room it is in and its exits.

Three games share the rules (as clembench defines them):

* `textmapworld`: visit every room with as few moves as possible and say "DONE" when finished.
* `textmapworld_graphreasoning`: the same, but every answer is a dictionary
  `{"action": "GO: north", "graph": {"nodes": [...], "edges": {"north": [...], ...}}}` that also carries
  the map the player has uncovered so far.
* `textmapworld_specificroom`: walk to a named target room and say "DONE" there.

Each round the player answers with a move ("GO: DIRECTION") or a stop ("DONE"), matched against the
instance's regular expressions. A reply that is neither, or both, ends the episode as aborted. A move
in a direction that has no exit is answered "not possible" and the player stays where it is; a move
that has an exit takes the player to the next room. After 20 rounds without "DONE" the episode ends
as aborted too.

Scores: every move into another room is judged "efficient" if it is the first step of a shortest walk
that covers all rooms adjacent to the visited ones (and not every room was visited before it).
Exploration is the share of rooms visited, efficiency the share of efficient moves; the Main Score is
their harmonic mean (exploration games) or 100/0 for stopping in / away from the target room
(specific room). Episodes not ended by "DONE" are aborted.

Maps are grids of rooms (4x4 cells, 4/6/8 rooms, with or without cycles) built by a random walk that
is fully determined by the split and seed; each map's canonical string decides its split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Generator, Hashable, Mapping

from games.core import BENCH_SCORE, GameError, GameMaster, Request
from games.registry import GameSpec, split_of

RESOURCES = Path(__file__).parent / "resources" / "textmapworld"
MAX_TURNS = 20
FOUR = ("north", "south", "east", "west")
DELTA = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
SPLIT_SALT = "textmapworld"  # one salt for all three games: a map's split is the same in each of them
GRID = 4

GAME_MAIN = "textmapworld"
GAME_GRAPH = "textmapworld_graphreasoning"
GAME_ROOM = "textmapworld_specificroom"

# Experiments (name -> (rooms, cycle)) as clembench runs them.
EXPERIMENTS = {
    GAME_MAIN: {"small": (4, "cycle_false"), "medium": (6, "cycle_false"), "large": (8, "cycle_false"),
                "medium_cycle": (6, "cycle_true"), "large_cycle": (8, "cycle_true")},
    GAME_GRAPH: {"small": (4, "cycle_false"), "medium": (6, "cycle_false"), "large": (8, "cycle_false")},
}
# The specific-room game plays the same 8-room maps at several target distances.
ROOM_EXPERIMENTS = {"on": (0,), "close": (1, 2), "far": (3, 4)}
ROOM_MAP = (8, "cycle_false")
# Maps per experiment and split (the specific-room game reuses one set of maps in all its experiments).
SIZES = {"test": 10, "validation": 10, "train": 200}

_RESOURCE_CACHE: dict[str, Any] = {}


def _resource(name: str) -> Any:
    if name not in _RESOURCE_CACHE:
        _RESOURCE_CACHE[name] = json.loads((RESOURCES / name).read_text())
    return _RESOURCE_CACHE[name]


# ----------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------
def _as_node(x: Any) -> Hashable:
    """Node ids are room names (named maps) or grid cells (unnamed maps); JSON lists become tuples."""
    if isinstance(x, list):
        return tuple(_as_node(v) for v in x)
    return x


def _literal(value: Any, field: str, game: str) -> Any:
    if isinstance(value, str):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ast.literal_eval(value)
        except Exception as e:  # noqa: BLE001 - any unreadable field is a malformed instance
            raise GameError(f"{game}: instance field {field!r} is not a readable literal: {e}") from None
    return value


class MapSpec:
    """The map and the rules of one instance, read from its clembench fields."""

    def __init__(self, instance: Mapping[str, Any], experiment: Mapping[str, Any], game: str):
        self.game = game

        def field(name: str, required: bool = True, default: Any = None) -> Any:
            if name in instance:
                return instance[name]
            if name in experiment:
                return experiment[name]
            if required:
                raise GameError(f"{game}: instance {instance.get('game_id')!r} lacks the field {name!r}")
            return default

        self.game_type = field("Game_Type", False, "named_graph")
        if self.game_type not in ("named_graph", "unnamed_graph"):
            raise GameError(f"{game}: Game_Type must be 'named_graph' or 'unnamed_graph', "
                            f"not {self.game_type!r}")
        self.named = self.game_type == "named_graph"
        self.ambiguity = field("Ambiguity", False, None)
        for name in ("Prompt", "Player2_positive_answer", "Player2_negative_answer"):
            if not isinstance(field(name), str):
                raise GameError(f"{game}: instance field {name!r} must be a string")
        self.prompt = field("Prompt")
        self.positive = field("Player2_positive_answer")
        self.negative = field("Player2_negative_answer")
        self.move_re = self._regex(field("Move_Construction"), "Move_Construction")
        self.stop_re = self._regex(field("Stop_Construction"), "Stop_Construction")
        self.response_re = (self._regex(field("Response_Construction"), "Response_Construction")
                            if game == GAME_GRAPH else None)

        try:
            self._read_map(field, game)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise GameError(f"{game}: malformed map fields (Graph_Nodes, Graph_Edges, Directions, Moves, "
                            f"Current_Position): {e!r}") from None
        self.loop_reminder = bool(field("Loop_Reminder", False, False))
        self.loop_reminder_text = str(field("Loop_Reminder_Text", False, ""))
        self.max_turns_reminder = bool(field("Max_Turns_Reminder", False, False))
        self.max_turns_reminder_text = str(field("Max_Turns_Reminder_Text", False, ""))
        # Both directions of every edge, in the order the scorer walks them.
        self.both_edges = [(b, a) for a, b in self.edges] + list(self.edges)
        self.adjacency: dict[Hashable, list[Hashable]] = {n: [] for n in self.nodes}
        for a, b in self.both_edges:
            self.adjacency[a].append(b)

    def _read_map(self, field, game: str) -> None:
        nodes = _literal(field("Graph_Nodes"), "Graph_Nodes", game)
        edges = _literal(field("Graph_Edges"), "Graph_Edges", game)
        directions = _literal(field("Directions"), "Directions", game)
        moves = _literal(field("Moves"), "Moves", game)
        self.nodes = [_as_node(n) for n in nodes]
        self.edges = [(_as_node(a), _as_node(b)) for a, b in edges]
        self.directions: dict[Hashable, list[str]] = {}
        for node, dirs in directions:
            node = _as_node(node)
            if node not in self.directions:  # the first entry of a node counts
                self.directions[node] = [str(d) for d in dirs]
        self.moves: dict[Hashable, dict[str, Hashable]] = {}
        for entry in moves:
            node = _as_node(entry["node"])
            for step in entry["node_moves"]:
                self.moves.setdefault(node, {})[str(step[0])] = _as_node(step[1])  # the last entry wins
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            raise GameError(f"{game}: Graph_Nodes must list distinct rooms")
        node_set = set(self.nodes)
        for a, b in self.edges:
            if a not in node_set or b not in node_set:
                raise GameError(f"{game}: edge {(a, b)!r} joins rooms that are not in Graph_Nodes")
        for node in self.nodes:
            if node not in self.directions:
                raise GameError(f"{game}: no Directions entry for room {node!r}")
            for d in self.directions[node]:
                target = self.moves.get(node, {}).get(d)
                if target not in node_set:
                    raise GameError(f"{game}: room {node!r} has the exit {d!r} but Moves leads to {target!r}")
        start = field("Current_Position")
        if not self.named and isinstance(start, str):
            start = _literal(start, "Current_Position", game)
        self.start = _as_node(start)
        if self.start not in node_set:
            raise GameError(f"{game}: Current_Position {self.start!r} is not a room of the map")
        self.target = None
        if game == GAME_ROOM:
            target = field("Specific_Room")
            if not isinstance(target, str) or not any(str(n).lower() == target.lower() for n in self.nodes):
                raise GameError(f"{game}: Specific_Room {target!r} is not a room of the map")
            self.target = target

    def _regex(self, pattern: Any, name: str) -> re.Pattern:
        if not isinstance(pattern, str):
            raise GameError(f"{self.game}: {name} must be a regular expression string")
        try:
            return re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise GameError(f"{self.game}: {name} is not a valid regular expression: {e}") from None

    # ----- the map as the game master reads it ---------------------------------------------------
    def exits(self, node: Hashable) -> list[str]:
        if node in self.directions:
            return self.directions[node]
        if self.named and isinstance(node, str):
            for k, v in self.directions.items():
                if isinstance(k, str) and k.lower() == node.lower():
                    return v
        return []

    def display(self, node: Hashable) -> str:
        """How a room is named to the player (a repeated room type carries its cell after '_')."""
        name = str(node)
        if self.ambiguity is not None:
            name = name.split("_")[0]
        return name

    def step(self, node: Hashable, direction: str) -> tuple[str, Hashable]:
        """('ok', next room) | ('invalid', same room) | ('abort', None) for a move from `node`."""
        available = set(self.exits(node)) & set(FOUR)
        if not set(direction.split()) & available:
            return "invalid", node
        target = self.moves.get(node, {}).get(direction.strip())
        if target is None or target not in self.adjacency:
            return "abort", None
        return "ok", target

    def judge(self, reply: str) -> tuple[str, str, Any]:
        """Reads one reply as (kind, parsed text, (direction, graph) for a move).

        Kinds: 'invalid' (the reply breaks the answer format), 'unreadable' (the format holds but no
        move can be read out of it), 'stop' and 'move'. The format checks run on the raw reply; the
        direction is read from the reply with its line breaks removed, as the game master passes it on.
        """
        if self.response_re is not None:
            return self._judge_graph(reply)
        stop = self.stop_re.search(reply)
        move = self.move_re.search(reply)
        if move and stop:
            return "invalid", reply, None
        parsed = reply.replace("\n", "").strip()
        found = None
        if self.stop_re.search(parsed):
            found = self.move_re.search(parsed)
        elif self.move_re.search(parsed):
            found = self.stop_re.search(parsed)
        if found:
            parsed = found.group()
        if stop:
            return "stop", parsed, None
        if len(self.move_re.findall(reply)) > 1 or not move:
            return "invalid", reply, None
        m = self.move_re.search(parsed)
        if not m or not m.groups() or not isinstance(m.group(1), str):
            return "unreadable", parsed, None  # no direction to be found: the game cannot go on
        return "move", parsed, (m.group(1).lower(), None)

    def _judge_graph(self, reply: str) -> tuple[str, str, Any]:
        cleaned = reply.replace("\n", "").strip()
        first = self.response_re.search(cleaned)
        if not first or not first.groups():
            return "invalid", reply, None
        action = first.group(1) or ""
        stop = self.stop_re.search(action)
        move = self.move_re.search(action)
        if move and stop:
            return "invalid", reply, None
        parsed = first.group()
        if stop:
            return "stop", parsed, None
        if len(self.move_re.findall(action)) > 1 or not move:
            return "invalid", reply, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                content = ast.literal_eval(parsed)
            act = content["action"]
            graph = content["graph"]
            m = self.move_re.search(act)
        except Exception:  # noqa: BLE001 - an unreadable dictionary ends the game
            return "unreadable", parsed, None
        if not m or not m.groups() or not isinstance(m.group(1), str):
            return "unreadable", parsed, None
        return "move", parsed, (m.group(1), graph)

    # ----- scoring helpers --------------------------------------------------------------------
    def best_first_steps(self, current: Hashable, visited: set) -> set:
        """First steps of the shortest walks from `current` that pass every unvisited neighbour of the
        visited rooms. A walk may only go back to a room it has passed when every exit of its last room
        leads to a room it has passed."""
        to_visit = {b for a, b in self.both_edges if a in visited and b not in visited}
        level = {(None, current, frozenset([current]))}
        length = 1
        found: set = set()
        while level and length <= 100:
            for first, _last, seen in level:
                if length > 1 and to_visit <= seen:
                    found.add((current, first))
            if found:
                return found
            nxt = set()
            for first, last, seen in level:
                avail = self.adjacency.get(last, [])
                fresh = [n for n in avail if n not in seen]
                for n in (fresh or avail):
                    nxt.add((n if first is None else first, n, seen | {n}))
            level = nxt
            length += 1
        return found


def loop_identification(visited: list) -> bool:
    """True when the last four positions hold fewer than three distinct rooms."""
    return len(visited) >= 4 and len(set(visited[-4:])) < 3


# ----------------------------------------------------------------------------------------------
# Graph similarity (graph reasoning)
# ----------------------------------------------------------------------------------------------
def _graph_of(nodes, edges) -> tuple[set, set]:
    ns = set(nodes)
    es = set()
    for a, b in edges:
        ns.add(a)
        ns.add(b)
        es.add(frozenset((a, b)))
    return ns, es


def _max_common_edges(a_nodes: set, a_edges: set, b_nodes: set, b_edges: set, budget: int = 30000) -> int:
    """Most edges kept by a one-to-one mapping of the rooms of A into B (A no larger than B).

    Exact branch and bound; after `budget` search nodes it returns the best mapping found so far.
    """
    a_adj = {n: set() for n in a_nodes}
    for e in a_edges:
        u, *rest = tuple(e)
        w = rest[0] if rest else u
        a_adj[u].add(w)
        a_adj[w].add(u)
    b_adj = {n: set() for n in b_nodes}
    for e in b_edges:
        u, *rest = tuple(e)
        w = rest[0] if rest else u
        b_adj[u].add(w)
        b_adj[w].add(u)
    limit = min(len(a_edges), len(b_edges))
    if limit == 0:
        return 0
    # Order A: each next room has the most already placed neighbours.
    order: list = []
    left = set(a_nodes)
    while left:
        placed = set(order)
        nxt = max(left, key=lambda n: (len(a_adj[n] & placed), len(a_adj[n]), str(n)))
        order.append(nxt)
        left.discard(nxt)
    # A edges with an endpoint at order[i:] are still undecided when order[i] is placed.
    pos = {n: i for i, n in enumerate(order)}
    undecided = [0] * (len(order) + 1)
    for e in a_edges:
        last = max(pos[n] for n in e)
        for i in range(last + 1):
            undecided[i] += 1
    b_list = sorted(b_nodes, key=lambda n: (-len(b_adj[n]), str(n)))
    best = 0
    count = 0
    phi: dict = {}
    used: set = set()

    def search(i: int, kept: int, b_decided: int) -> bool:
        nonlocal best, count
        count += 1
        if count > budget:
            return True
        if kept + min(undecided[i], len(b_edges) - b_decided) <= best:
            return False
        if i == len(order):
            best = kept
            return best >= limit
        u = order[i]
        images = [phi[w] for w in a_adj[u] if w in phi]
        self_loop = u in a_adj[u]
        options = []
        isolated_tried = False
        for v in b_list:
            if v in used:
                continue
            if not b_adj[v]:
                if isolated_tried:
                    continue
                isolated_tried = True
            gain = sum(1 for x in images if x in b_adj[v]) + (1 if self_loop and v in b_adj[v] else 0)
            decided = sum(1 for x in b_adj[v] if x in used) + (1 if v in b_adj[v] else 0)
            options.append((-gain, len(options), v, gain, decided))
        options.sort()
        for _, _, v, gain, decided in options:
            phi[u] = v
            used.add(v)
            stop = search(i + 1, kept + gain, b_decided + decided)
            del phi[u]
            used.discard(v)
            if stop:
                return True
        return False

    search(0, 0, 0)
    return best


def graph_edit_distance(nodes1, edges1, nodes2, edges2) -> int:
    """Edit distance of two unlabelled undirected graphs with unit costs for inserting and deleting rooms
    and edges (room names are ignored, as a free relabelling)."""
    n1, e1 = _graph_of(nodes1, edges1)
    n2, e2 = _graph_of(nodes2, edges2)
    if len(n1) <= len(n2):
        kept = _max_common_edges(n1, e1, n2, e2)
    else:
        kept = _max_common_edges(n2, e2, n1, e1)
    return abs(len(n1) - len(n2)) + len(e1) + len(e2) - 2 * kept


def graph_similarity(spec: MapSpec, graph_text: str) -> float:
    """Similarity (0-100) of a reported map to the true one; 0 for anything unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cont = ast.literal_eval(graph_text)
        true_nodes = [n.lower() for n in spec.nodes]
        true_edges = [(a.lower(), b.lower()) for a, b in spec.both_edges]
        nodes = [item.lower() for item in cont["nodes"]]
        edges = [(item[0].lower(), item[1].lower()) for sub in cont["edges"].values() for item in sub]
        distance = graph_edit_distance(true_nodes, true_edges, nodes, edges)
    except Exception:  # noqa: BLE001 - an unreadable map scores 0
        return 0.0
    normalized = 2 * (1 / (1 + math.exp(-0.5 * distance)) - 0.5)
    return (1 - normalized) * 100


# ----------------------------------------------------------------------------------------------
# Game masters
# ----------------------------------------------------------------------------------------------
class TextMapWorld(GameMaster):
    """Exhaustive exploration: visit all rooms, then say DONE."""

    game_name = GAME_MAIN
    roles = ("Describer",)

    def setup(self) -> None:
        self.spec = MapSpec(self.instance, self.experiment, self.game_name)
        self.current = self.spec.start
        self.moves: list[tuple[Hashable, Hashable]] = []   # room changes, in order
        self.graphs: list[str] = []                          # reported maps logged with the moves
        self.stopped = False
        self.aborted = False
        self.turns_limit = False
        self._loop_reminder = self.spec.loop_reminder
        self._max_turns_reminder = self.spec.max_turns_reminder
        self._trail = [self.spec.start]  # positions the loop reminder looks at

    def initial_prompt(self) -> str:
        spec = self.spec
        text = spec.prompt
        if spec.target is not None:
            text = text.replace("$GOAL$", spec.target)
        if "$INITIAL_ROOM$" in text:
            text = text.replace("$INITIAL_ROOM$", spec.display(spec.start))
        return text.replace("$INITIAL_DIRECTIONS$", ", ".join(spec.exits(spec.start)))

    def _answer(self, valid: bool) -> str:
        spec = self.spec
        exits = ", ".join(spec.exits(self.current))
        if valid:
            text = spec.positive.replace("$DIRECTIONS$", exits)
            if spec.named or isinstance(self.current, str):
                text = text.replace("$ANOTHER_ROOM$", spec.display(self.current))
        else:
            text = spec.negative.replace("$DIRECTIONS$", exits)
            if spec.named or isinstance(self.current, str):
                text = text.replace("$SAME_ROOM$", spec.display(self.current))
        return text

    def play(self) -> Generator[Request, str, None]:
        spec = self.spec
        text = self.initial_prompt()
        while True:
            reply = yield from self.ask(0, text)
            kind, parsed, info = spec.judge(reply)
            if kind == "invalid":  # the reply breaks the answer format
                self._abort()
                return
            self.log_to_self("parse", parsed)
            if kind == "stop":
                self.count_parsed()
                self.stopped = True
                self.log_to_self("stop", "The guesser decided to stop the game")
                return
            if kind == "unreadable":  # well-formed on the surface, but no move can be read out of it
                self._abort()
                return
            direction, graph = info
            old = self.current
            status, new = spec.step(old, direction)
            if status == "abort":  # the map has no room behind an exit it lists
                self._abort()
                return
            self.count_parsed()
            self.current = new
            self.log_to_self("Valid format", "Continue")
            text = self._answer(status == "ok")
            if old != new:
                self._trail.append(new)
            if self._loop_reminder and loop_identification(self._trail):
                # Once per episode, when the last four positions hold fewer than three rooms.
                self.log_to_self("loop_detected", "Loop detected in the visited nodes list")
                self._loop_reminder = False
                text = spec.loop_reminder_text + "\n" + text
            if self._max_turns_reminder and self.current_round == MAX_TURNS - 2:
                self._max_turns_reminder = False
                text = spec.max_turns_reminder_text + "\n" + text
            if old != new:
                self.moves.append((old, new))
                self.log_to_self("move", json.dumps({"old": old, "new": new}, default=str))
                if spec.response_re is not None:
                    self.graphs.append(str(graph))
                    self.log_to_self("graph", self.graphs[-1])
            if self.current_round + 1 >= MAX_TURNS:
                self.turns_limit = True
                self.log_to_self("turns_limit", str(MAX_TURNS))
                return
            self.next_round()

    def _abort(self) -> None:
        self.count_violated()
        self.aborted = True
        self.log_to_self("aborted", "abort game")

    # ----- scores -------------------------------------------------------------------------------
    def _walk_scores(self) -> dict:
        spec = self.spec
        current = spec.start
        visited = {spec.start}
        visited_list = [spec.start]
        seen = {spec.start} | set(spec.adjacency[spec.start])
        good: list[bool] = []
        loops = [spec.start]
        count_loops = 0
        for _old, new in self.moves:
            best = spec.best_first_steps(current, visited)
            good.append((current, new) in best and len(visited) != len(spec.nodes))
            current = new
            visited_list.append(new)
            seen |= set(spec.adjacency.get(current, []))
            loops.append(current)
            visited.add(current)
            if loop_identification(loops):
                count_loops += 1
                if self.game_name == GAME_ROOM:
                    loops.clear()
        exploration = len(visited) / len(spec.nodes) * 100
        efficiency = sum(good) / len(good) * 100 if good else 0.0
        total = efficiency + exploration
        quality = 2 * efficiency * exploration / total if total else 0.0
        return {"good": good, "visited": visited, "visited_list": visited_list, "seen": seen,
                "loops": count_loops, "exploration": exploration, "efficiency": efficiency,
                "quality": quality}

    def _success(self, w: dict) -> bool:
        return w["visited"] == set(self.spec.nodes)

    def _main_score(self, w: dict, success: bool) -> float:
        return w["quality"]

    def compute_scores(self) -> None:
        w = self._walk_scores()
        for i, ok in enumerate(w["good"]):
            self.log_turn_score(i, "effiencient_move", int(ok))
        stopped = self.stopped and not self.aborted
        success = stopped and self._success(w)
        es = self.episode_scores
        nan = math.nan

        def if_stopped(value):
            return value if stopped else nan

        self.set_outcome(aborted=not stopped, success=success, score=None)
        es["moves"] = if_stopped(len(self.moves))
        es["valid_moves"] = if_stopped(len(self.moves))
        es["invalid_moves"] = if_stopped(0)
        es["stopped"] = if_stopped(1)
        es["turns_limit"] = if_stopped(int(self.turns_limit))
        es["loops"] = if_stopped(w["loops"])
        es["number_visited"] = if_stopped(len(w["visited"]))
        es["seen"] = if_stopped(len(w["seen"]))
        es["efficiency"] = if_stopped(w["efficiency"])
        es["exploration"] = if_stopped(w["exploration"])
        self._extra_scores(w, stopped)
        self.episode_scores[BENCH_SCORE] = if_stopped(float(self._main_score(w, success)))
        self.log_request_turn_scores()

    def _extra_scores(self, w: dict, stopped: bool) -> None:
        pass


class TextMapWorldGraphReasoning(TextMapWorld):
    """Exhaustive exploration that also reports the uncovered map with every move."""

    game_name = GAME_GRAPH

    def _extra_scores(self, w: dict, stopped: bool) -> None:
        sims = [graph_similarity(self.spec, g) for g in self.graphs]
        for i, s in enumerate(sims):
            self.log_turn_score(i, "similarity", s)
        self.episode_scores["graph_similarity"] = (sims[-1] if sims else 0) if stopped else math.nan


class TextMapWorldSpecificRoom(TextMapWorld):
    """Walk to a named room and say DONE there."""

    game_name = GAME_ROOM

    def _success(self, w: dict) -> bool:
        return str(w["visited_list"][-1]).lower() == self.spec.target.lower()

    def _main_score(self, w: dict, success: bool) -> float:
        return 100.0 if success else 0.0

    def _extra_scores(self, w: dict, stopped: bool) -> None:
        self.episode_scores["old_benchscore"] = w["quality"] if stopped else math.nan


# ----------------------------------------------------------------------------------------------
# Map generation
# ----------------------------------------------------------------------------------------------
def _random_map(rng: random.Random, n_rooms: int, cycle: str) -> tuple[list, list] | None:
    """A random walk on the grid: the cells it enters are rooms, the steps it takes are doors.

    Without cycles the walk may only re-enter a room through a door it already used; with cycles it
    may open new doors into rooms it has seen, and the map must end up with at least one cycle.
    """
    pos = (rng.randrange(GRID), rng.randrange(GRID))
    cells = [pos]
    doors: set = set()
    for _ in range(400):
        if len(cells) >= n_rooms:
            break
        d = rng.choice(FOUR)
        nxt = (pos[0] + DELTA[d][0], pos[1] + DELTA[d][1])
        if not (0 <= nxt[0] < GRID and 0 <= nxt[1] < GRID):
            continue
        door = frozenset((pos, nxt))
        if nxt in cells and door not in doors and cycle == "cycle_false":
            continue
        if nxt not in cells:
            cells.append(nxt)
        doors.add(door)
        pos = nxt
    if len(cells) < n_rooms:
        return None
    if cycle == "cycle_true" and len(doors) < len(cells):
        return None
    return cells, sorted(tuple(sorted(d)) for d in doors)


def _direction(a: tuple, b: tuple) -> str:
    delta = (b[0] - a[0], b[1] - a[1])
    return next(d for d, v in DELTA.items() if v == delta)


def _named_map(rng: random.Random, n_rooms: int, cycle: str) -> dict:
    while True:
        made = _random_map(rng, n_rooms, cycle)
        if made is not None:
            break
    cells, doors = made
    rooms = rng.sample(_resource("rooms.json")["rooms"], len(cells))
    name = dict(zip(cells, rooms))
    exits: dict = {c: [] for c in cells}
    for a, b in doors:
        exits[a].append(b)
        exits[b].append(a)
    directions, moves = [], []
    for c in cells:
        nbrs = list(exits[c])
        rng.shuffle(nbrs)
        directions.append((name[c], [_direction(c, n) for n in nbrs]))
        moves.append({"node": name[c], "node_moves": [(_direction(c, n), name[n]) for n in nbrs]})
    return {
        "nodes": [name[c] for c in cells],
        "edges": [(name[a], name[b]) for a, b in doors],
        "directions": directions,
        "moves": moves,
        "mapping": {c: name[c] for c in cells},
        "cycle": cycle,
    }


def map_key(nodes, edges) -> str:
    """The canonical string of a map: its rooms and doors, sorted."""
    ns = sorted(str(_as_node(n)) for n in nodes)
    es = sorted("~".join(sorted((str(_as_node(a)), str(_as_node(b))))) for a, b in edges)
    return "rooms=" + "|".join(ns) + ";doors=" + "|".join(es)


def instance_key(instance: Mapping[str, Any]) -> Hashable:
    try:
        nodes = _literal(instance["Graph_Nodes"], "Graph_Nodes", "textmapworld")
        edges = _literal(instance["Graph_Edges"], "Graph_Edges", "textmapworld")
        return map_key(nodes, edges)
    except Exception:  # noqa: BLE001 - fall back to the whole instance
        return json.dumps({k: v for k, v in instance.items() if k != "game_id"}, sort_keys=True, default=str)


def _maps_for(split: str, rng: random.Random, n_rooms: int, cycle: str, count: int, taken: set) -> list[dict]:
    out = []
    tries = 0
    while len(out) < count and tries < count * 200:
        tries += 1
        m = _named_map(rng, n_rooms, cycle)
        key = map_key(m["nodes"], m["edges"])
        if key in taken or split_of(key, salt=SPLIT_SALT) != split:
            continue
        taken.add(key)
        out.append(m)
    return out


def _base_instance(game: str, m: dict, start: str) -> dict:
    p = _resource("prompts.json")
    inst = {
        "Prompt": p["prompts"][game],
        "Player2_positive_answer": p["answers"]["named_positive"],
        "Player2_negative_answer": p["answers"]["named_negative"],
        "Move_Construction": p["regex"]["move"],
        "Stop_Construction": p["regex"]["stop"],
    }
    if game == GAME_GRAPH:
        inst["Response_Construction"] = p["regex"]["response"]
    digest = hashlib.sha256(map_key(m["nodes"], m["edges"]).encode()).hexdigest()[:10]
    inst.update({
        "Grid_Dimension": str(GRID),
        "Graph_Nodes": str(m["nodes"]),
        "Graph_Edges": str(m["edges"]),
        "Current_Position": start,
        "Picture_Name": f"map_{digest}.png",  # no picture is drawn; kept for the instance layout
        "Directions": str(m["directions"]),
        "Moves": str(m["moves"]),
        "Cycle": m["cycle"],
        "Ambiguity": None,
        "Game_Type": "named_graph",
        "Loop_Reminder": False,
        "Loop_Reminder_Text": p["reminders"]["loop"],
        "Max_Turns_Reminder": False,
        "Max_Turns_Reminder_Text": p["reminders"]["max_turns"],
        "Mapping": str(m["mapping"]),
        "Strict": True,
    })
    return inst


def _distances(m: dict, start: str) -> dict:
    adj: dict = {n: [] for n in m["nodes"]}
    for a, b in m["edges"]:
        adj[a].append(b)
        adj[b].append(a)
    dist = {start: 0}
    q = deque([start])
    while q:
        u = q.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def _check_split(split: str) -> None:
    if split not in SIZES:
        raise GameError(f"textmapworld: unknown split {split!r}; one of {', '.join(SIZES)}")


def _generate_exploration(game: str, split: str, seed: int) -> dict:
    _check_split(split)
    taken: set = set()
    experiments = []
    game_id = 0
    for name, (n_rooms, cycle) in EXPERIMENTS[game].items():
        rng = random.Random(f"{game}/{split}/{seed}/{name}")
        exp = {"name": name, "game_instances": []}
        for m in _maps_for(split, rng, n_rooms, cycle, SIZES[split], taken):
            inst = {"game_id": game_id}
            inst.update(_base_instance(game, m, rng.choice(m["nodes"])))
            exp["game_instances"].append(inst)
            game_id += 1
        experiments.append(exp)
    return {"experiments": experiments}


def generate_main(split: str, seed: int = 0) -> dict:
    return _generate_exploration(GAME_MAIN, split, seed)


def generate_graphreasoning(split: str, seed: int = 0) -> dict:
    return _generate_exploration(GAME_GRAPH, split, seed)


def generate_specificroom(split: str, seed: int = 0) -> dict:
    _check_split(split)
    rng = random.Random(f"{GAME_ROOM}/{split}/{seed}")
    maps = _maps_for(split, rng, ROOM_MAP[0], ROOM_MAP[1], SIZES[split], set())
    starts = [rng.choice(m["nodes"]) for m in maps]
    experiments = []
    game_id = 0
    for name, distances in ROOM_EXPERIMENTS.items():
        exp = {"name": name, "game_instances": []}
        for m, start in zip(maps, starts):
            wanted = rng.choice(distances)
            order = [wanted] + [d for d in distances if d != wanted]
            chosen = None
            for d in order:  # the distance drawn, else another of the experiment, else another start
                for s in [start] + sorted(m["nodes"]):
                    rooms = sorted(r for r, k in _distances(m, s).items() if k == d)
                    if rooms:
                        chosen = (s, rng.choice(rooms), d)
                        break
                if chosen:
                    break
            if chosen is None:
                continue
            s, target, d = chosen
            inst = {"game_id": game_id}
            inst.update(_base_instance(GAME_ROOM, m, s))
            inst["Specific_Room"] = target
            inst["Specific_Room_Distance"] = str(d)
            exp["game_instances"].append(inst)
            game_id += 1
        experiments.append(exp)
    return {"experiments": experiments}


# ----------------------------------------------------------------------------------------------
# Programmatic players
# ----------------------------------------------------------------------------------------------
def _spec_for(game: str, instance, experiment) -> MapSpec:
    return MapSpec(instance, experiment, game)


def _replay(spec: MapSpec, messages) -> tuple[Hashable, set]:
    """Where the player stands after its own earlier replies, following the game master's rules."""
    current = spec.start
    visited = {current}
    for m in messages:
        if m.get("role") != "assistant":
            continue
        kind, _parsed, info = spec.judge(str(m.get("content", "")))
        if kind != "move":
            continue
        status, new = spec.step(current, info[0])
        if status == "ok":
            current = new
            visited.add(new)
    return current, visited


def _shortest_path(spec: MapSpec, start: Hashable, goal_test) -> list:
    prev = {start: None}
    q = deque([start])
    while q:
        u = q.popleft()
        if goal_test(u):
            path = []
            while u is not None:
                path.append(u)
                u = prev[u]
            return path[::-1]
        for v in spec.adjacency.get(u, []):
            if v not in prev:
                prev[v] = u
                q.append(v)
    return [start]


def _direction_to(spec: MapSpec, node: Hashable, nxt: Hashable) -> str | None:
    for d in spec.exits(node):
        if spec.moves.get(node, {}).get(d) == nxt:
            return d
    return None


def _graph_answer(spec: MapSpec, action: str, known: set) -> str:
    """The reply of the graph-reasoning game: the action with the map of the known rooms."""
    nodes = [n for n in spec.nodes if n in known]
    edges: dict[str, list] = {d: [] for d in FOUR}
    for a in nodes:
        for d in spec.exits(a):
            b = spec.moves.get(a, {}).get(d)
            if b in known and d in edges:
                edges[d].append([a, b])
    return json.dumps({"action": action, "graph": {"nodes": nodes, "edges": edges}})


def _strong_factory(game: str):
    def factory(role, instance, experiment, rng: random.Random):
        spec = _spec_for(game, instance, experiment)

        def player(messages) -> str:
            current, visited = _replay(spec, messages)
            action = "DONE"
            nxt = None
            if game == GAME_ROOM:
                target = spec.target.lower()
                path = _shortest_path(spec, current, lambda n: str(n).lower() == target)
                if len(path) > 1:
                    nxt = path[1]
            elif len(visited) < len(spec.nodes):
                best = sorted((b for _a, b in spec.best_first_steps(current, visited)), key=str)
                nxt = best[0] if best else None
            if nxt is not None:
                d = _direction_to(spec, current, nxt)
                if d is not None:
                    action = f"GO: {d}"
            if game == GAME_GRAPH:
                known = set(visited) | ({nxt} if nxt is not None else set())
                return _graph_answer(spec, action, known)
            return action

        return player

    return factory


def _weak_factory(game: str, stop_chance: float = 0.2):
    def factory(role, instance, experiment, rng: random.Random):
        spec = _spec_for(game, instance, experiment)

        def player(messages) -> str:
            action = "DONE" if rng.random() < stop_chance else f"GO: {rng.choice(FOUR)}"
            if game == GAME_GRAPH:
                current, visited = _replay(spec, messages)
                return _graph_answer(spec, action, {current})
            return action

        return player

    return factory


SPECS = [
    GameSpec(
        name=GAME_MAIN,
        master=TextMapWorld,
        generate=generate_main,
        instance_key=instance_key,
        players={"strong": _strong_factory(GAME_MAIN), "weak": _weak_factory(GAME_MAIN)},
        description="Explore every room of a text map with as few moves as possible, then say DONE.",
    ),
    GameSpec(
        name=GAME_GRAPH,
        master=TextMapWorldGraphReasoning,
        generate=generate_graphreasoning,
        instance_key=instance_key,
        players={"strong": _strong_factory(GAME_GRAPH), "weak": _weak_factory(GAME_GRAPH)},
        description="Explore every room of a text map and report the uncovered map with every move.",
    ),
    GameSpec(
        name=GAME_ROOM,
        master=TextMapWorldSpecificRoom,
        generate=generate_specificroom,
        instance_key=instance_key,
        players={"strong": _strong_factory(GAME_ROOM), "weak": _weak_factory(GAME_ROOM)},
        description="Walk through a text map to a named target room and say DONE there.",
    ),
]
