"""The Playpen split of games into training games and held-out games.

Training games are the seven games of the first clembench release; the held-out games were added
in clembench 2 and test whether what a model learned transfers to games it never trained on.
Unseen *instances* of the training games come from each game's `test` split, which never shares an
instance identity (target word, grid, map, ...) with the `train` split.
"""

TRAINING_GAMES = [
    "taboo",
    "wordle",
    "wordle_withclue",
    "wordle_withcritic",
    "referencegame",
    "imagegame",
    "privateshared",
]

HELD_OUT_GAMES = [
    "codenames",
    "matchit_ascii",
    "guesswhat",
    "textmapworld",
    "textmapworld_graphreasoning",
    "textmapworld_specificroom",
]


def set_of(game: str) -> str:
    """"training", "held-out", or "test" for a game outside the Playpen split (e.g. colourname,
    a trivially learnable game that exists to test learning code)."""
    if game in TRAINING_GAMES:
        return "training"
    if game in HELD_OUT_GAMES:
        return "held-out"
    return "test"
