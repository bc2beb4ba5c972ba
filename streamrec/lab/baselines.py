"""The simple recommenders every report compares against: popularity here, and the served blend's
own signals, item-kNN (cosine over co-occurrence, scored from the user's recent items) and
first-order Markov (last item -> next item), from the model wing."""

from __future__ import annotations

from streamrec.model.blend import Baseline, FloatArray


class Popularity(Baseline):
    name = "popularity"

    def _scores(self, history: list[int]) -> FloatArray:
        return self._pop_norm().copy()
