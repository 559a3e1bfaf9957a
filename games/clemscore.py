"""clemscore: % played and quality per game, macro-averaged over games.

Per game, % played = 100 × (1 − mean Aborted) and quality = mean Main Score over the episodes that
were played (aborted episodes have no Main Score). The overall clemscore is
(average % played / 100) × (average quality), both averaged over games, as clembench computes it.
As there, a game whose episodes were all aborted has no quality (NaN): it counts in the average
% played (with 0) but not in the average quality.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from games.core import BENCH_SCORE, METRIC_ABORTED, METRIC_SUCCESS


def game_scores(episode_scores: Iterable[Mapping]) -> dict:
    eps = list(episode_scores)
    if not eps:
        return {"episodes": 0, "played": math.nan, "quality": math.nan, "success": math.nan,
                "clemscore": math.nan}
    played = [0.0 if e.get(METRIC_ABORTED) else 1.0 for e in eps]
    quals = []
    for e in eps:
        q = e.get(BENCH_SCORE)
        if not e.get(METRIC_ABORTED) and q is not None and not (isinstance(q, float) and math.isnan(q)):
            quals.append(float(q))
    pct_played = 100.0 * sum(played) / len(eps)
    quality = sum(quals) / len(quals) if quals else math.nan
    success = 100.0 * sum(1.0 for e in eps if e.get(METRIC_SUCCESS)) / len(eps)
    return {"episodes": len(eps), "played": pct_played, "quality": quality, "success": success,
            "clemscore": pct_played / 100.0 * quality if quals else 0.0}


def aggregate(per_game: Mapping[str, Iterable[Mapping]]) -> dict:
    """{game: [episode scores]} -> {"games": {game: scores}, "played", "quality", "clemscore"}."""
    games = {g: game_scores(eps) for g, eps in per_game.items()}
    scored = [s for s in games.values() if s["episodes"]]
    if not scored:
        return {"games": games, "played": math.nan, "quality": math.nan, "clemscore": math.nan}
    played = sum(s["played"] for s in scored) / len(scored)
    quals = [s["quality"] for s in scored if not math.isnan(s["quality"])]
    quality = sum(quals) / len(quals) if quals else 0.0
    return {"games": games, "played": played, "quality": quality, "clemscore": played / 100.0 * quality}
