"""Explanations: which history item supports each recommended item (item-kNN neighbour, Markov
predecessor, or the most recent item), the words for it, and the contract fields that carry them."""

from __future__ import annotations

import json

from streamrec.events import Recommendation
from streamrec.instructions import HistoryItem
from streamrec.model.blend import Blend, ItemKNN, Markov, Support, supports
from streamrec.serving import Served, explain

# Cosine co-occurrence: sim(a, b) .82 > sim(a, d) .67 > sim(c, d) .41; sim(c, x) .71; z stands alone.
# Markov: after c come d and x, once each.
TRAIN = {
    "u1": ["a", "d", "b"],
    "u2": ["a", "d"],
    "u3": ["a", "b"],
    "u4": ["c", "d"],
    "u5": ["c", "x"],
    "u6": ["z"],
}
ITEMS = ["a", "b", "c", "d", "x", "z"]
HISTORY = ["a", "c"]  # c is the last item


def blend(w_knn: float, w_markov: float, recent: int = 20) -> Blend:
    seqs = {u: [HistoryItem(i) for i in s] for u, s in TRAIN.items()}
    knn = ItemKNN(recent=recent).fit(seqs, ITEMS)
    markov = Markov().fit(seqs, ITEMS)
    assert isinstance(knn, ItemKNN) and isinstance(markov, Markov)
    return Blend(knn, markov, w_knn, w_markov)


def test_the_knn_neighbour_with_the_largest_contribution_explains_a_knn_ranked_item() -> None:
    out = supports(blend(0.9, 0.05), HISTORY, ["b", "d", "x"])
    assert out["b"] == Support("a", "knn")  # only a is similar to b
    assert out["d"] == Support("a", "knn")  # a is more similar to d than c is
    assert out["x"] == Support("c", "knn")


def test_the_last_item_explains_an_item_the_markov_transition_scored() -> None:
    out = supports(blend(0.05, 0.9), HISTORY, ["b", "d"])
    assert out["d"] == Support("c", "markov")  # c -> d outweighs the small kNN share
    assert out["b"] == Support("a", "knn")  # no transition from c to b: kNN still decides


def test_the_knn_window_decides_which_history_items_count() -> None:
    # Only the latest item counts for kNN: c, not the more similar but older a.
    assert supports(blend(0.9, 0.05, recent=1), HISTORY, ["d"])["d"] == Support("c", "knn")


def test_an_item_only_the_model_ranked_is_explained_by_the_most_similar_or_most_recent_item() -> None:
    out = supports(blend(0.0, 0.0), HISTORY, ["d", "z", "new", "c"])
    assert out["d"] == Support("a", "knn")  # the highest similarity, though the blend did not count it
    assert out["z"] == Support("c", "recent")  # similar to nothing: the most recent item
    assert out["new"] == Support("c", "recent")  # unknown to the blend
    assert out["c"] == Support("a", "recent")  # never explained by itself when there is another item


def test_without_a_blend_or_a_history() -> None:
    assert supports(None, HISTORY, ["b", "a"]) == {"b": Support("c", "recent"), "a": Support("c", "recent")}
    assert supports(blend(0.5, 0.3), [], ["b"]) == {}
    assert supports(blend(0.5, 0.3), ["unknown"], ["b"]) == {"b": Support("unknown", "recent")}


def test_every_support_names_a_history_item() -> None:
    b = blend(0.3, 0.3)
    for history in (["a"], ["c", "a"], ["z", "x", "d", "d"], ["b", "unknown"]):
        out = supports(b, history, ITEMS)
        assert set(out) == set(ITEMS)
        assert all(s.item_id in history for s in out.values())


def test_the_words() -> None:
    titles = {"a": "Orchid Compact Car Seat", "c": "Rain Cover"}
    history = [HistoryItem("a", "click"), HistoryItem("c", "click"), HistoryItem("a", "purchase")]
    bought = explain(Served("b", 0.4, "model"), Support("a", "knn"), history, titles)
    assert bought is not None and bought.text == 'because you bought "Orchid Compact Car Seat"'
    assert (bought.by, bought.item_id) == ("knn", "a")
    clicked = explain(Served("d", 0.3, "model+trending"), Support("c", "markov"), history, titles)
    assert clicked is not None and clicked.text == 'because you clicked "Rain Cover"' and clicked.by == "markov"
    untitled = explain(Served("d", 0.3, "model"), Support("gone", "recent"), [HistoryItem("gone")], titles)
    assert untitled is not None and untitled.text == 'because you clicked "gone"'
    trending = explain(Served("t", 0.2, "trending"), None, history, titles)
    assert trending is not None and (trending.text, trending.by, trending.item_id) == ("trending now", "trending", None)
    assert explain(Served("m", 0.2, "model"), None, [], titles) is None


def test_a_recommendation_without_the_new_fields_still_validates() -> None:
    old = {
        "rec_id": "r1",
        "user_id": "u1",
        "items": [{"item_id": "i1", "score": 0.5, "reason": "model"}],
        "model": {"base": "tiny"},
        "generated_at": "2024-06-01T00:00:00Z",
    }
    rec = Recommendation.model_validate_json(json.dumps(old))
    assert rec.task is None and rec.template is None and rec.items[0].explanation is None
    new = rec.model_copy(
        update={
            "task": "next_purchase",
            "template": "purchase-plain",
            "items": [
                rec.items[0].model_copy(
                    update={"explanation": 'because you clicked "x"', "explained_by": "knn", "explanation_item_id": "x"}
                )
            ],
        }
    )
    again = Recommendation.model_validate_json(new.model_dump_json())
    assert again.task == "next_purchase" and again.template == "purchase-plain"
    assert again.items[0].explained_by == "knn" and again.items[0].explanation_item_id == "x"
