"""Tests for cache/classification.py: both layouts, every error a user can hit, encodings, the split
rule, unlabelled order and the submission writer."""

import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mner.cache.classification import (
    DEFAULT_ENCODINGS,
    ClassDataConfig,
    ClassSplit,
    Example,
    classification_images,
    decode_text,
    is_classification_folder,
    read_classification,
    read_split_file,
    seed_form_file,
    split_train,
    write_predictions,
    write_seed_form,
)
from mner.cache.conll import DatasetError

TRAIN = [("1", "positive", "what a day"), ("2", "negative", "so sad"), ("3", "neutral", "a bus")]


def write(path: Path, content: str | bytes) -> Path:
    """Write a file (str as UTF-8 without newline translation, bytes as is), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def make_mvsa(folder: Path, train=TRAIN, valid=None, test=None, unlabelled=None) -> Path:
    """An MVSA folder: (guid, label, text) rows per split; unlabelled is (guid, text) rows."""
    splits = {"train.txt": train, "valid.txt": valid, "test.txt": test}
    for file, rows in splits.items():
        if rows is not None:
            write(folder / file, "guid,tag\n" + "".join(f"{g},{lab}\n" for g, lab, _ in rows))
    if unlabelled is not None:
        write(folder / "test_without_label.txt", "guid,tag\n" + "".join(f"{g},null\n" for g, _ in unlabelled))
    for rows in [*(r for r in splits.values() if r), [(g, None, t) for g, t in unlabelled or []]]:
        for guid, _, text in rows:
            write(folder / "data" / f"{guid}.txt", text)
    return folder


def read(folder: Path, **changes):
    return read_classification(ClassDataConfig(data_dir=str(folder), **changes))


def rows(split: ClassSplit) -> list[tuple]:
    return [(e.guid, e.label, e.text) for e in split.examples]


# ---------------------------------------------------------------- both layouts


def test_mvsa_layout_reads_every_split(tmp_path):
    folder = make_mvsa(
        tmp_path / "mvsa",
        valid=[("4", "positive", "yay")],
        test=[("5", "negative", "no")],
        unlabelled=[("6", "who knows")],
    )
    data = read(folder)
    assert data.report.layout == "mvsa" and data.report.split_made is None
    assert list(data.splits) == ["train", "valid", "test", "test_without_label"]
    assert rows(data.splits["train"]) == [(g, lab, t) for g, lab, t in TRAIN]
    assert rows(data.splits["valid"]) == [("4", "positive", "yay")]
    assert rows(data.splits["test_without_label"]) == [("6", None, "who knows")]
    assert data.splits["test_without_label"].labelled is False and data.splits["test"].labelled
    assert data.labels == ("negative", "neutral", "positive")
    first = data.splits["train"].examples[0]
    assert first == Example(
        guid="1", text="what a day", label="positive", image=folder / "data/1.jpg", line=2
    )


def test_mvsa_tolerates_crlf_bom_blank_lines_and_padding(tmp_path):
    make_mvsa(tmp_path, valid=[("4", "positive", "x")])
    write(tmp_path / "train.txt", "\ufeffguid,tag\r\n1, positive \r\n\r\n2,negative\r\n3,neutral")
    write(tmp_path / "data/1.txt", "\ufeff  what a day \r\n")
    train = read(tmp_path).splits["train"]
    assert rows(train) == [(g, lab, t) for g, lab, t in TRAIN]
    assert [e.line for e in train.examples] == [2, 4, 5]


def test_csv_layout_with_text_and_image_columns(tmp_path):
    write(
        tmp_path / "train.csv",
        ',guid,tag,text,image\n0,1,positive,"hello, world",data/1.jpg\n'
        '1,2,negative,"two\nlines",\n2,3,neutral,plain,pics/3.png\n',
    )
    write(tmp_path / "val.csv", "guid,tag,text\n7,negative,meh\n")
    write(tmp_path / "test.csv", "guid,tag,text\n8,,x\n9,null,y\n")
    data = read(tmp_path)
    assert data.report.layout == "csv"
    assert list(data.splits) == ["train", "valid", "test"]
    train = data.splits["train"].examples
    assert [(e.guid, e.label, e.text, e.image) for e in train] == [
        ("1", "positive", "hello, world", tmp_path / "data/1.jpg"),
        ("2", "negative", "two\nlines", None),
        ("3", "neutral", "plain", tmp_path / "pics/3.png"),
    ]
    # a record's line is its first line, also after a quoted newline
    assert [e.line for e in train] == [2, 3, 5]
    assert data.report.ignored_columns == {str(tmp_path / "train.csv"): [""]}
    assert data.splits["valid"].examples[0].image == tmp_path / "data/7.jpg"
    test = data.splits["test"]
    assert test.labelled is False and [(e.guid, e.label) for e in test.examples] == [("8", None), ("9", None)]


def test_the_bertresnet_seeds_own_csv_files_read_as_they_are(tmp_path):
    # TOMYUE/BertResNet@90e59ac train.csv / val.csv / test.csv: `text_id,text,img_path,tag`, texts
    # quoted with a trailing newline, images under data/img/, the test tags `null`.
    header = "text_id,text,img_path,tag\n"
    write(tmp_path / "train.csv", header + '1,"How I feel today #gym \n",data/img/1.jpg,positive\n'
          '10,"absolute disgrace \n",data/img/10.jpg,negative\n')  # fmt: skip
    write(tmp_path / "val.csv", header + '24,"Looking forward \n",data/img/24.jpg,positive\n')
    write(tmp_path / "test.csv", header + '8,"Energetic training \n",data/img/8.jpg,null\n')
    data = read(tmp_path)
    assert data.report.layout == "csv" and data.report.ignored_columns == {}
    assert [(e.guid, e.label, e.text, e.image) for e in data.splits["train"].examples] == [
        ("1", "positive", "How I feel today #gym", tmp_path / "data/img/1.jpg"),
        ("10", "negative", "absolute disgrace", tmp_path / "data/img/10.jpg"),
    ]
    assert rows(data.splits["valid"]) == [("24", "positive", "Looking forward")]
    test = data.splits["test"]
    assert test.labelled is False and [(e.guid, e.image) for e in test.examples] == [
        ("8", tmp_path / "data/img/8.jpg")
    ]


def test_csv_without_text_column_reads_data_folder(tmp_path):
    write(tmp_path / "train.csv", "guid,tag\n1,positive\n2,negative\n3,positive\n")
    for guid, text in (("1", "one"), ("2", "two"), ("3", "three")):
        write(tmp_path / f"data/{guid}.txt", text)
    data = read(tmp_path, valid_fraction=0.3)
    assert rows(data.splits["valid"]) in ([("1", "positive", "one")], [("3", "positive", "three")])
    assert len(data.splits["train"].examples) == 2 and ("2", "negative", "two") in rows(data.splits["train"])


def test_layout_detection_and_config_errors(tmp_path):
    write(tmp_path / "train.txt", "guid,tag\n")
    write(tmp_path / "train.csv", "guid,tag\n")
    with pytest.raises(ValueError, match="holds both train.txt and train.csv; pass layout 'mvsa' or 'csv'"):
        read(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither train.txt"):
        read(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        read(tmp_path / "nowhere")
    (tmp_path / "train.csv").unlink()
    with pytest.raises(ValueError, match=r"train\.csv: train file not found \(csv layout\)"):
        read(tmp_path, layout="csv")
    for changes, message in [
        ({"layout": "tsv"}, "unknown layout 'tsv'; expected one of auto, mvsa, csv"),
        ({"valid_fraction": 1.0}, "valid_fraction must be a number between 0 and 1"),
        ({"valid_fraction": 0}, "valid_fraction must be a number between 0 and 1"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"encodings": ()}, "encodings must name at least one encoding"),
        ({"encodings": ("utf-8", "klingon")}, "unknown encoding 'klingon' in encodings"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ClassDataConfig(data_dir=str(tmp_path), **changes)
    assert ClassDataConfig(data_dir=tmp_path, encodings="utf-8").to_dict() == {
        "data_dir": str(tmp_path),
        "layout": "auto",
        "valid_fraction": 0.2,
        "seed": 0,
        "encodings": ["utf-8"],
    }


# ---------------------------------------------------------------- errors, each with its file:line


@pytest.mark.parametrize(
    "train, message",
    [
        ("", "train.txt:1: file is empty; expected the header 'guid,tag'"),
        ("\n\n", "train.txt:1: file is empty"),
        ("guid,tag\n", "train.txt:1: no examples after the header"),
        ("1,positive\n2,negative\n", "train.txt:1: expected the header 'guid,tag', got '1,positive'"),
        (
            "guid,tag\n1,positive\n2,negative,extra\n",
            "train.txt:3: 3 comma-separated fields; expected 'guid,tag'",
        ),
        ("guid,tag\n1\n", "train.txt:2: 1 comma-separated fields"),
        ("guid,tag\n1,positive\n,negative\n", "train.txt:3: empty guid"),
        ("guid,tag\n1,positive\n2,null\n", "train.txt:3: guid '2' has no label ('null') in a labelled split"),
        ("guid,tag\n1,positive\n2,\n", "train.txt:3: guid '2' has no label ('')"),
        (
            "guid,tag\n1,positive\n2,negative\n1,neutral\n",
            "train.txt:4: duplicate guid '1' (first at train.txt:2)",
        ),
        ("guid,tag\n../1,positive\n", "train.txt:2: guid '../1' refused: it has a '..' component"),
        (
            "guid,tag\n/etc/passwd,positive\n",
            "train.txt:2: guid '/etc/passwd' refused: it is an absolute path",
        ),
        ("guid,tag\n1,positive\n9,negative\n", "train.txt:3: guid '9': text file {data}/9.txt not found"),
        ("guid,tag\n1,positive\n0,negative\n", "train.txt:3: guid '0': text file {data}/0.txt is empty"),
    ],
)
def test_malformed_mvsa_train(tmp_path, train, message):
    make_mvsa(tmp_path)
    write(tmp_path / "train.txt", train)
    write(tmp_path / "data/0.txt", " \r\n\t")
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/{message.format(data=tmp_path / 'data')}")):
        read(tmp_path)


def test_label_unseen_in_train_and_duplicate_across_splits(tmp_path):
    make_mvsa(tmp_path, valid=[("4", "positive", "x"), ("5", "ecstatic", "y")])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{tmp_path}/valid.txt:3: label 'ecstatic' of guid '5' is not in train "
            "(train labels: negative, neutral, positive)"
        ),
    ):
        read(tmp_path)
    make_mvsa(tmp_path, valid=[("4", "positive", "x")], test=[("6", "negative", "z"), ("2", "negative", "z")])
    with pytest.raises(
        DatasetError, match=re.escape("test.txt:3: duplicate guid '2' (first at train.txt:3)")
    ):
        read(tmp_path)


def test_unlabelled_file_must_say_null(tmp_path):
    make_mvsa(tmp_path, unlabelled=[("6", "a")])
    write(tmp_path / "test_without_label.txt", "guid,tag\n6,null\n7,positive\n")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "test_without_label.txt:3: guid '7': expected 'null' in an unlabelled split, got 'positive'"
        ),
    ):
        read(tmp_path)


def test_guid_leaving_the_data_folder_through_a_symlink(tmp_path):
    outside = write(tmp_path / "secret" / "x.txt", "stolen text")
    folder = make_mvsa(tmp_path / "mvsa")
    write(folder / "train.txt", "guid,tag\n1,positive\nleak,positive\n")
    os.symlink(outside, folder / "data" / "leak.txt")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"train.txt:3: guid 'leak' refused: it resolves outside {folder / 'data'} through a symlink"
        ),
    ):
        read(folder)
    # an image symlink out is refused the same way (the text itself is inside)
    (folder / "data" / "leak.txt").unlink()
    write(folder / "data" / "leak.txt", "fine")
    os.symlink(outside, folder / "data" / "leak.jpg")
    with pytest.raises(DatasetError, match=r"train\.txt:3: guid 'leak' refused: it resolves outside"):
        read(folder)
    # a symlink that stays inside is fine
    (folder / "data" / "leak.jpg").unlink()
    os.symlink(folder / "data" / "1.txt", folder / "data" / "leak.jpg")
    data = read(folder, valid_fraction=0.5)
    assert sorted(e.guid for name in ("train", "valid") for e in data.splits[name].examples) == ["1", "leak"]


def test_csv_image_folder_linked_to_another_disk_is_accepted(tmp_path):
    # the image folder is a link (as MVSA's data/ may be); an image file linking out is still refused
    disk = tmp_path / "disk" / "pics"
    write(disk / "1.jpg", b"jpeg")
    write(tmp_path / "secret.jpg", b"x")
    os.symlink(tmp_path / "secret.jpg", disk / "2.jpg")
    folder = tmp_path / "data"
    write(folder / "train.csv", "guid,tag,text,image\n1,a,x,pics/1.jpg\n3,a,y,pics/1.jpg\n4,b,z,\n5,b,w,\n")
    os.symlink(disk, folder / "pics")
    train = read(folder, valid_fraction=0.5).splits
    assert [e.image for e in train["train"].examples + train["valid"].examples if e.image] == [
        folder / "pics" / "1.jpg"
    ] * 2
    write(folder / "train.csv", "guid,tag,text,image\n1,a,x,pics/1.jpg\n2,b,y,pics/2.jpg\n")
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"train.csv:3: guid '2': image path 'pics/2.jpg' refused: it resolves outside {folder / 'pics'} "
            "through a symlink"
        ),
    ):
        read(folder)


@pytest.mark.parametrize(
    "train, message",
    [
        ("id,label\n1,positive\n", "train.csv:1: header 'id,label' has no 'guid' (or 'text_id') column"),
        (
            "text_id,guid,tag\n1,1,a\n",
            "train.csv:1: header names both 'guid' and 'text_id' (the BertResNet seed's name for 'guid'); keep one",
        ),
        (
            "guid,tag,image,img_path\n1,a,x.jpg,x.jpg\n",
            "train.csv:1: header names both 'image' and 'img_path' (the BertResNet seed's name for 'image'); "
            "keep one",
        ),
        ("guid,label\n1,positive\n", "train.csv:1: header 'guid,label' has no 'tag' column"),
        ("guid,tag,tag\n1,a,b\n", "train.csv:1: header names the column 'tag' twice"),
        ("guid,tag,text\n", "train.csv:1: no examples after the header"),
        ("", "train.csv:1: file is empty; expected a header with guid and tag columns"),
        ("guid,tag,text\n1,positive,a\n2,negative\n", "train.csv:3: 2 fields; the header has 3"),
        ('guid,tag,text\n1,positive,"a\nb"\n2,negative,"  "\n', "train.csv:4: guid '2': the text is empty"),
        (
            "guid,tag,text\n1,positive,a\n1,negative,b\n",
            "train.csv:3: duplicate guid '1' (first at train.csv:2)",
        ),
        (
            "guid,tag,text\n1,positive,a\n2,,b\n",
            "train.csv:3: guid '2' has no label ('') in a labelled split",
        ),
        (
            "guid,tag,text,image\n1,positive,a,../x.jpg\n",
            "train.csv:2: guid '1': image path '../x.jpg' refused",
        ),
        ("guid,tag\n1,positive\n", "train.csv:2: guid '1': text file {data}/1.txt not found"),
    ],
)
def test_malformed_csv(tmp_path, train, message):
    write(tmp_path / "train.csv", train)
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/{message.format(data=tmp_path / 'data')}")):
        read(tmp_path)


def test_csv_test_split_labelled_or_not_as_a_whole(tmp_path):
    write(tmp_path / "train.csv", "guid,tag,text\n1,positive,a\n2,negative,b\n")
    write(tmp_path / "val.csv", "guid,tag,text\n3,positive,c\n")
    write(tmp_path / "test.csv", "guid,tag,text\n4,positive,d\n5,null,e\n")
    with pytest.raises(
        DatasetError, match=r"test\.csv:3: guid '5' has no label \('null'\) in a labelled split"
    ):
        read(tmp_path)
    write(tmp_path / "test.csv", "guid,tag,text\n4,positive,d\n5,angry,e\n")
    with pytest.raises(DatasetError, match=r"test\.csv:3: label 'angry' of guid '5' is not in train"):
        read(tmp_path)


# ---------------------------------------------------------------- encodings


def test_cp1252_and_latin1_fallbacks_are_counted_reported_and_logged(tmp_path, caplog):
    folder = make_mvsa(tmp_path, valid=[("4", "positive", "x")])
    write(folder / "data/1.txt", "caf\u00e9 \u20ac5 \u201cnice\u201d".encode("cp1252"))  # é, €, curly quotes
    write(folder / "data/2.txt", "na\u00efve".encode("cp1252"))
    write(folder / "data/3.txt", b"odd \x81 byte")  # 0x81 is undefined in cp1252: only latin-1 takes it
    write(folder / "data/4.txt", "\ufeffd\u00e9j\u00e0 vu")  # UTF-8 with a BOM: not a fallback
    with caplog.at_level(logging.WARNING, logger="mner.cache.classification"):
        data = read(folder)
    texts = {e.guid: e.text for split in data.splits.values() for e in split.examples}
    assert texts == {
        "1": "caf\u00e9 \u20ac5 \u201cnice\u201d",
        "2": "na\u00efve",
        "3": "odd \x81 byte",
        "4": "d\u00e9j\u00e0 vu",
    }
    assert data.report.encodings == DEFAULT_ENCODINGS
    assert data.report.fallbacks == {"cp1252": 2, "latin-1": 1}
    assert data.report.fallback_sources == [
        f"{folder / 'data/1.txt'}:1 [cp1252]",
        f"{folder / 'data/2.txt'}:1 [cp1252]",
        f"{folder / 'data/3.txt'}:1 [latin-1]",
    ]
    assert f"decoded 2 as cp1252, 1 as latin-1 (not utf-8): {folder / 'data/1.txt'}:1 [cp1252]" in caplog.text


def test_utf8_only_makes_a_bad_byte_an_error_at_its_line(tmp_path):
    folder = make_mvsa(tmp_path, valid=[("4", "positive", "x")])
    write(folder / "data/2.txt", "first line\nsecond caf\u00e9".encode("cp1252"))
    with pytest.raises(
        DatasetError, match=re.escape(f"{folder / 'data/2.txt'}:2: not valid utf-8 (byte 0xe9 at column 11)")
    ):
        read(folder, encodings=("utf-8",))
    # a split file line in cp1252 is decoded and counted too
    write(folder / "data/2.txt", "fine")
    write(folder / "train.txt", "guid,tag\n1,positive\n2,n\u00e9gatif\n3,neutral\n".encode("cp1252"))
    data = read(folder)
    assert data.report.fallbacks == {"cp1252": 1}
    assert data.report.fallback_sources == [f"{folder / 'train.txt'}:3 [cp1252]"]
    assert "n\u00e9gatif" in data.labels


def test_decode_text_order():
    assert decode_text("\u00e9".encode()) == ("\u00e9", "utf-8")
    assert decode_text(b"\xef\xbb\xbfok") == ("ok", "utf-8")
    assert decode_text(b"\x80") == ("\u20ac", "cp1252")
    assert decode_text(b"\x81") == ("\x81", "latin-1")
    with pytest.raises(UnicodeDecodeError):
        decode_text(b"\x81", ("utf-8", "cp1252"))


# ---------------------------------------------------------------- the split rule


def labelled(n: int, labels=("a", "b", "c"), weights=(6, 3, 1)) -> ClassSplit:
    rng = random.Random(99)
    chosen = rng.choices(labels, weights=weights, k=n)
    examples = [Example(f"g{i}", f"text {i}", lab, None, i + 2) for i, lab in enumerate(chosen)]
    return ClassSplit("train", Path("train.txt"), examples, True)


@pytest.mark.parametrize("n, fraction", [(100, 0.1), (57, 0.2), (10, 0.1), (3, 0.5), (200, 0.33)])
def test_split_fraction_strata_and_seed(n, fraction):
    train = labelled(n)
    left, valid = split_train(train, fraction, seed=5)
    assert len(valid.examples) == max(1, round(fraction * n))
    assert sorted(left.examples + valid.examples, key=lambda e: e.line) == train.examples
    # file order kept in both
    assert [e.line for e in left.examples] == sorted(e.line for e in left.examples)
    assert [e.line for e in valid.examples] == sorted(e.line for e in valid.examples)
    # every label keeps a train example; each label's share within one example of exact
    counts, drawn = train.label_counts(), valid.label_counts()
    assert set(left.label_counts()) == set(counts)
    for label, count in counts.items():
        assert abs(drawn.get(label, 0) - len(valid.examples) * count / n) < 1 + 1e-9
    # same seed same split; another seed another one (on a train big enough to tell)
    assert split_train(train, fraction, seed=5)[1].examples == valid.examples
    if n >= 50:
        assert split_train(train, fraction, seed=6)[1].examples != valid.examples


def test_split_needs_two_examples_and_a_label_with_two():
    with pytest.raises(
        DatasetError, match=r"train\.txt:2: train needs at least 2 examples to draw a valid split"
    ):
        split_train(labelled(1), 0.1, 0)
    # every label once: drawing any would leave its label out of train
    with pytest.raises(
        DatasetError,
        match=r"train\.txt:2: cannot draw a valid split: every label has a single train example",
    ):
        examples = [Example(f"g{i}", "t", label, None, i + 2) for i, label in enumerate("abc")]
        split_train(ClassSplit("train", Path("train.txt"), examples, True), 0.5, 0)


def test_split_made_is_recorded_and_reproducible(tmp_path):
    train = [(str(i), ("positive", "negative", "neutral")[i % 3], f"text {i}") for i in range(1, 41)]
    folder = make_mvsa(tmp_path, train=train, unlabelled=[("99", "u")])
    data = read(folder, valid_fraction=0.25, seed=3)
    assert list(data.splits) == ["train", "valid", "test_without_label"]
    assert data.report.split_made == {
        "from": "train",
        "fraction": 0.25,
        "seed": 3,
        "stratified": True,
        "train": 30,
        "valid": 10,
    }
    assert data.splits["valid"].path == folder / "train.txt"
    # 14 negative, 13 neutral, 13 positive: 3.5, 3.25, 3.25 of 10; the largest remainder takes the 10th
    assert data.splits["valid"].label_counts() == {"negative": 4, "neutral": 3, "positive": 3}
    again = read(folder, valid_fraction=0.25, seed=3)
    assert again.splits["valid"].examples == data.splits["valid"].examples
    assert read(folder, valid_fraction=0.25, seed=4).splits["valid"].examples != data.splits["valid"].examples
    assert "no valid split: drew 10 of 40 train examples (fraction 0.25, seed 3" in data.report.summary()[0]


# ---------------------------------------------------------------- unlabelled order and the submission file


def test_unlabelled_order_is_kept_and_predictions_round_trip(tmp_path):
    guids = ["907", "13", "5000", "202", "44"]  # not sorted in any way
    folder = make_mvsa(
        tmp_path / "mvsa", valid=[("4", "positive", "x")], unlabelled=[(g, f"post {g}") for g in guids]
    )
    split = read(folder).splits["test_without_label"]
    assert [e.guid for e in split.examples] == guids
    assert [e.line for e in split.examples] == [2, 3, 4, 5, 6]
    predicted = ["positive", "negative", "neutral", "negative", "positive"]
    out = write_predictions(tmp_path / "pred.txt", split.examples, predicted)
    assert (
        out.read_text(encoding="utf-8")
        == "guid,tag\n907,positive\n13,negative\n5000,neutral\n202,negative\n44,positive\n"
    )
    # read back as a labelled split of the same folder: the same guids, order and labels
    (folder / "test.txt").write_bytes(out.read_bytes())
    (folder / "test_without_label.txt").unlink()
    back = read(folder).splits["test"]
    assert [(e.guid, e.label, e.text) for e in back.examples] == [
        (e.guid, label, e.text) for e, label in zip(split.examples, predicted)
    ]


@pytest.mark.parametrize(
    "guid, label, message",
    [
        ("1", "", "guid '1': label '' is empty or padded"),
        ("1", " a", "guid '1': label ' a' is empty or padded"),
        (" 1", "a", "guid ' 1': guid ' 1' is empty or padded"),
    ],
)
def test_write_predictions_refuses_what_would_not_read_back(tmp_path, guid, label, message):
    example = Example(guid, "t", None, None, 2)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_predictions(tmp_path / "p.txt", [example], [label])
    assert not (tmp_path / "p.txt").exists()


ODD_GUIDS = ["x,1", 'say "hi"', "two\nlines", '"', "plain"]


def test_guids_with_comma_quote_or_newline_round_trip(tmp_path):
    # a csv folder may name such guids (pandas quotes them); every file written of them reads back
    labels = ["a", "b", "a", "b", "a"]
    body = "".join(
        f'"{g.replace(chr(34), chr(34) * 2)}",{lab},"text {i}"\n'
        for i, (g, lab) in enumerate(zip(ODD_GUIDS, labels))
    )
    write(tmp_path / "train.csv", "guid,tag,text\n" + body)
    # an unlabelled test.csv of the same guids with a prefix (the same guid twice would be a duplicate)
    quoted = [g.replace('"', '""') for g in ODD_GUIDS]
    write(tmp_path / "test.csv", "guid,tag,text\n" + "".join(f'"t{g}",,x\n' for g in quoted))
    data = read(tmp_path)
    guids = [e.guid for name in ("train", "valid") for e in data.splits[name].examples]
    assert sorted(guids) == sorted(ODD_GUIDS)
    test = data.splits["test"]
    assert test.labelled is False and [e.guid for e in test.examples] == [f"t{g}" for g in ODD_GUIDS]
    # the submission file reads back as a split file, every guid and label as written
    predicted = labels
    (tmp_path / "out").mkdir()
    out = write_predictions(tmp_path / "out" / "pred.txt", test.examples, predicted)
    assert out.read_text(encoding="utf-8").splitlines()[:2] == ["guid,tag", '"tx,1",a']
    for e in test.examples:
        write(tmp_path / "out" / "data" / f"{e.guid}.txt", "t")
    back = read_split_file(out)
    assert [(e.guid, e.label) for e in back.examples] == [
        (e.guid, p) for e, p in zip(test.examples, predicted)
    ]


def test_malformed_quoting_is_an_error_at_its_line(tmp_path):
    make_mvsa(tmp_path)
    write(tmp_path / "train.txt", 'guid,tag\n1,positive\n"2"x,negative\n')
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/train.txt:3: malformed quoting")):
        read(tmp_path)
    write(tmp_path / "train.txt", 'guid,tag\n1,positive\n"2,negative\n3,neutral\n')
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/train.txt:3: malformed quoting")):
        read(tmp_path)


@pytest.mark.parametrize("header", ["guid,tag", "guid, tag", "GUID , Tag"])
def test_one_header_rule_for_the_reader_and_the_folder_test(tmp_path, header):
    make_mvsa(tmp_path, valid=[("4", "positive", "x")])
    write(tmp_path / "train.txt", f"{header}\n1,positive\n2,negative\n3,neutral\n")
    assert is_classification_folder(tmp_path)
    assert [e.guid for e in read(tmp_path).splits["train"].examples] == ["1", "2", "3"]
    assert not is_classification_folder(write(tmp_path / "ner" / "train.txt", "IMGID:1\nx\tO\n").parent)


def test_test_without_label_may_list_the_labelled_test_posts(tmp_path):
    folder = make_mvsa(
        tmp_path,
        valid=[("4", "positive", "x")],
        test=[("5", "negative", "no"), ("6", "positive", "yes")],
        unlabelled=[("6", "yes"), ("5", "no")],
    )
    data = read(folder)
    assert [e.guid for e in data.splits["test_without_label"].examples] == ["6", "5"]
    assert classification_images(ClassDataConfig(str(folder))).keys() == ["1", "2", "3", "4", "5", "6"]
    # train or valid against test stays a duplicate, in either file
    write(folder / "test_without_label.txt", "guid,tag\n6,null\n2,null\n")
    with pytest.raises(
        DatasetError, match=re.escape("test_without_label.txt:3: duplicate guid '2' (first at train.txt:3)")
    ):
        read(folder)
    make_mvsa(folder, valid=[("4", "positive", "x")], test=[("4", "negative", "no")])
    (folder / "test_without_label.txt").unlink()
    with pytest.raises(
        DatasetError, match=re.escape("test.txt:2: duplicate guid '4' (first at valid.txt:2)")
    ):
        read(folder)


def test_images_of_a_folder_without_train_file(tmp_path):
    # the posts to label of `mner predict`: only test_without_label.txt and data/
    folder = make_mvsa(tmp_path / "new", train=None, unlabelled=[("9", "a"), ("7", "b")])
    assert is_classification_folder(folder)
    images = classification_images(ClassDataConfig(str(folder)))
    assert images.keys() == ["7", "9"] and images.image_path("9") == folder / "data" / "9.jpg"
    write(tmp_path / "csv" / "test.csv", "guid,tag,text\n1,,x\n")
    assert classification_images(ClassDataConfig(str(tmp_path / "csv"))).keys() == ["1"]


def test_write_predictions_counts_must_match(tmp_path):
    with pytest.raises(ValueError, match="1 examples but 2 labels"):
        write_predictions(tmp_path / "p.txt", [Example("1", "t", None, None, 2)], ["a", "b"])


def test_reading_does_not_import_torch(tmp_path):
    # stage two's classifier reads this in data-loader workers and the CLI validates with it: no torch
    folder = make_mvsa(tmp_path, valid=[("4", "positive", "x")])
    code = (
        "import sys; from mner.cache.classification import ClassDataConfig, read_classification; "
        f"read_classification(ClassDataConfig({str(folder)!r})); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_readme_describes_the_classification_folders_as_read_by_train_classifier():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("**Sentence classification data**") :].split("\n\n")[0]
    assert "not built yet" not in paragraph
    assert "`mner train-classifier`" in paragraph


# The first records of TOMYUE/BertResNet@0d5c628's test.csv as they are (texts end in " \n", tags
# `null`), with records 76 and 110's doubled quotes, a comma and a non-ASCII text added.
SEED_TEST_CSV = (
    "text_id,text,img_path,tag\n"
    '8,"Energetic training today with our San Antonio New Dollars/New Partners trainees \n",data/img/8.jpg,null\n'
    '1576,"Let your voice be heard! 18+ #endsuicide #blithe #selfharm #thinspo #bonespo #edo #hurt #cut \n",'
    "data/img/1576.jpg,null\n"
    '116,"#Broadway #Play ""#Disgraced"" #Pulitzer #Prize \n",data/img/116.jpg,null\n'
    '600,""" drink water whenever you think of food"" #empty #oops \n",data/img/600.jpg,null\n'
    '4912,"a comma, and ü",data/img/4912.jpg,null\n'
)


def test_the_seed_form_is_what_the_seeds_notebook_writes(tmp_path):
    """The oracle is the notebook itself (BertResNet.ipynb cell 53): pandas reads test.csv, fills the tag
    column and writes it with `to_csv(index=False)`."""
    pd = pytest.importorskip("pandas")
    source = write(tmp_path / "test.csv", SEED_TEST_CSV)
    labels = ["positive", "negative", "neutral", "positive", "negative"]
    out = write_seed_form(tmp_path / "pred_test.seed.csv", source, labels)
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    for i, label in enumerate(labels):
        frame.at[i, "tag"] = label
    assert out.read_text(encoding="utf-8") == frame.to_csv(index=False, lineterminator="\n")
    back = read_split_file(out)  # and it reads back as the same posts, now labelled
    assert [(e.guid, e.label, e.text, e.image) for e in back.examples] == [
        (e.guid, label, e.text, e.image) for e, label in zip(read_split_file(source).examples, labels)
    ]


def test_the_seed_form_keeps_every_column_in_its_order_and_every_field_as_written(tmp_path):
    source = write(
        tmp_path / "in" / "test.csv",
        "Unnamed: 0,tag,img_path,text_id,text\r\n"
        '0,null,data/img/1.jpg,1,"  padded text \n"\r\n'
        "\r\n"
        "1,,,2,no image\r\n",
    )
    out = write_seed_form(tmp_path / "seed.csv", source, ["a", "b"])
    assert out.read_bytes() == (
        b'Unnamed: 0,tag,img_path,text_id,text\n0,a,data/img/1.jpg,1,"  padded text \n"\n1,b,,2,no image\n'
    )
    with pytest.raises(ValueError, match=r"test.csv holds 2 posts but 3 labels were given$"):
        write_seed_form(tmp_path / "bad.csv", source, ["a", "b", "c"])


def test_the_seed_form_file_lies_beside_the_submission_file(tmp_path):
    assert seed_form_file(tmp_path / "pred_test.txt") == tmp_path / "pred_test.seed.csv"
    assert seed_form_file("out/pred.csv") == Path("out/pred.seed.csv")
