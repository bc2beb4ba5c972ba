"""Loaders for the three dataset formats return the same plain values."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamrec.datasets import DatasetError, load, write_recbole


def test_recbole_inter_with_sibling_item_file(tmp_path: Path) -> None:
    inter = tmp_path / "toy.inter"
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t300\n1\t11\t3\t100\n2\t12\t5\t200\n"
    )
    (tmp_path / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Comedy\n"
        "11\tHeat\t1995\tCrime\n"
    )
    ds = load(inter, "recbole")
    assert ds.name == "toy" and ds.users == 2 and len(ds.events) == 3
    assert [(e.user_id, e.item_id, e.ts) for e in ds.events][:2] == [("1", "10", 300.0), ("1", "11", 100.0)]
    toy = ds.catalog.get("10")
    assert toy is not None and toy.title == "Toy Story" and toy.category == "Animation Comedy"
    assert toy.description == "release_year: 1995"
    missing = ds.catalog.get("12")  # in the log but not in .item: still a catalog item
    assert missing is not None and missing.title == "item 12"


def test_recbole_without_item_file_or_timestamp(tmp_path: Path) -> None:
    inter = tmp_path / "log.inter"
    inter.write_text("user_id:token\titem_id:token\nu\ta\nu\tb\n")
    ds = load(inter, "recbole")
    assert [e.ts for e in ds.events] == [0.0, 1.0]  # file order
    assert len(ds.catalog) == 2


def test_csv_with_iso_times_and_types(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "user_id,item_id,timestamp,type\n"
        "u1,a,2026-01-01T00:00:00Z,click\n"
        "u1,b,2026-01-01T00:01:00+00:00,purchase\n"
        "u2,a,5,\n"
    )
    ds = load(path, "csv")
    assert [e.type for e in ds.events] == ["click", "purchase", "click"]
    assert ds.events[1].ts - ds.events[0].ts == 60.0
    assert ds.events[2].ts == 5.0


def test_jsonl_event_log(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"user_id": "u", "item_id": "a", "ts": "2026-01-01T00:00:00Z", "type": "purchase"}\n'
        '{"user_id": "u", "item_id": 7, "timestamp": 1767225660}\n'
    )
    ds = load(path, "csv")
    assert [(e.item_id, e.type) for e in ds.events] == [("a", "purchase"), ("7", "click")]


def test_sequence_format(tmp_path: Path) -> None:
    path = tmp_path / "seqs.txt"
    path.write_text("u1 a b c\nu2 c a\n\n")
    ds = load(path, "seq")
    assert [e.item_id for e in ds.events if e.user_id == "u1"] == ["a", "b", "c"]
    assert ds.users == 2 and len(ds.catalog) == 3


@pytest.mark.parametrize(
    ("name", "body", "fmt"),
    [
        ("bad.csv", "user,item\n1,2\n", "csv"),
        ("bad.inter", "uid:token\titem_id:token\n1\t2\n", "recbole"),
        ("bad.csv", "user_id,item_id,timestamp\n1,2,yesterday\n", "csv"),
        ("empty.txt", "\n", "seq"),
    ],
)
def test_malformed_files_say_what_is_wrong(tmp_path: Path, name: str, body: str, fmt: str) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(DatasetError):
        load(path, fmt)  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        load(tmp_path / "nope.inter", "recbole")


def test_recbole_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    src.write_text("user_id,item_id,timestamp,type\nu,a,1,click\nu,b,2,purchase\n")
    ds = load(src, "csv")
    write_recbole(ds, tmp_path / "out" / "a.inter")
    back = load(tmp_path / "out" / "a.inter", "recbole")
    assert [(e.user_id, e.item_id, e.ts, e.type) for e in back.events] == [
        (e.user_id, e.item_id, e.ts, e.type) for e in ds.events
    ]
    assert [i.title for i in back.catalog] == [i.title for i in ds.catalog]
