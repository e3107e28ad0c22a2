"""Tests for cache/datasets.py and the configs helpers it reads dataset descriptions through."""

import os
import pickle
import re
from pathlib import Path

import pytest

from mner import configs
from mner.cache.conll import DatasetError, Post, label_names, parse_columns, read_split, write_split
from mner.cache.datasets import DATA_FIELDS, DataConfig, DataSource, recorded_data, resolve_data

TWO_POSTS = "IMGID:101\nGeorge\tB-PER\nZimmerman\tI-PER\nshot\tO\n\nIMGID:O_996\nParis\tB-LOC\nrocks\tO\n"


def write(folder: Path, name: str, text: str | bytes) -> Path:
    """Write a split file (str as UTF-8 without newline translation, bytes as is)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def make_data_dir(root: Path, name: str = "twitter2015", text: str = TWO_POSTS) -> Path:
    """A data folder with train/valid/test holding the same small text."""
    folder = root / name
    for split in ("train", "valid", "test"):
        write(folder, f"{split}.txt", text)
    return folder


def reference_parse(text: str) -> list[tuple[str, list[str], list[str]]]:
    """A second, deliberately naive reader for well-formed input: blocks split on blank lines."""
    posts = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        rows = [r.rstrip() for r in block.strip().split("\n") if r.strip()]
        if not rows:
            continue
        key = rows[0].split(":", 1)[1].strip()
        pairs = [r.split("\t") for r in rows[1:]]
        posts.append((key, [p[0] for p in pairs], [p[1] for p in pairs]))
    return posts


# ---------------------------------------------------------------- reading


def test_reads_posts_in_order(tmp_path):
    split = read_split(write(tmp_path, "train.txt", TWO_POSTS))
    assert split.name == "train" and split.fmt == "imgid" and split.orphan_i == 0
    assert split.posts == [
        Post(key="101", words=("George", "Zimmerman", "shot"), tags=("B-PER", "I-PER", "O"), line=1),
        Post(key="O_996", words=("Paris", "rocks"), tags=("B-LOC", "O"), line=6),
    ]


def test_crlf_trailing_space_blank_runs_bom_and_no_final_blank_match_reference(tmp_path):
    clean = TWO_POSTS + "\nIMGID:17_06_1\n#\tO\nNBA\tB-ORG\n"
    messy = "\ufeff" + clean.replace("\n\n", "\n\n\n\n").replace("\n", "  \r\n").rstrip("\r\n ")
    split = read_split(write(tmp_path, "messy.txt", messy), name="train")
    got = [(p.key, list(p.words), list(p.tags)) for p in split.posts]
    assert got == reference_parse(clean)
    assert [p.line for p in split.posts] == [1, 8, 14]
    assert [i + 1 for i, row in enumerate(messy.split("\n")) if "IMGID" in row] == [1, 8, 14]
    assert split.name == "train"


def test_whitespace_token_is_kept(tmp_path):
    # Twitter-2015 valid has a lone U+00A0 token; stripping it would shift every later tag.
    split = read_split(write(tmp_path, "valid.txt", "IMGID:1\n\u00a0\tO\nParis\tB-LOC\n"))
    assert split.posts[0].words == ("\u00a0", "Paris")


def test_one_space_between_token_and_tag_is_read(tmp_path):
    split = read_split(write(tmp_path, "t.txt", "IMGID:1\nParis B-LOC\nrocks  O\n"))
    assert split.posts[0].words == ("Paris", "rocks") and split.posts[0].tags == ("B-LOC", "O")


@pytest.mark.parametrize(
    "line, match",
    [
        # issue 10 A7: the middle field was dropped ("Street" lost) without a word
        ("Camden Street B-OTHER", r"t\.txt:3: 3 space-separated fields and no tab"),
        # the last of 3+ tab columns was taken as the tag, turning B-OTHER into O
        ("Camden\tB-OTHER\tO", r"t\.txt:3: 3 tab-separated columns"),
        ("rocks\tNN\tB-NP\tO", r"t\.txt:3: 4 tab-separated columns"),
    ],
)
def test_lines_with_more_than_token_and_tag_are_errors(tmp_path, line, match):
    path = write(tmp_path, "t.txt", f"IMGID:1\nok\tO\n{line}\n")
    with pytest.raises(DatasetError, match=match + r".*--columns WORD,TAG") as info:
        read_split(path)
    assert "e.g. --columns 0,3 for CoNLL-2003" in str(info.value)
    # predict input (tags optional) is held to the same rule
    with pytest.raises(DatasetError, match=match):
        read_split(path, require_tags=False)


def test_columns_pick_the_word_and_the_tag(tmp_path):
    conll2003 = "IMGID:1\nEU\tNNP\tB-NP\tB-ORG\nrejects VBZ B-VP O\nGerman\tJJ\tB-NP\tB-MISC\n"
    split = read_split(write(tmp_path, "t.txt", conll2003), columns=(0, 3))
    assert split.posts[0].words == ("EU", "rejects", "German")
    assert split.posts[0].tags == ("B-ORG", "O", "B-MISC")
    # the tag may come first
    split = read_split(write(tmp_path, "u.txt", "IMGID:1\nB-LOC\tParis\n"), columns=(1, 0))
    assert split.posts[0].words == ("Paris",) and split.posts[0].tags == ("B-LOC",)
    # a line with fewer columns than named is an error, naming its line
    path = write(tmp_path, "v.txt", "IMGID:1\nEU\tNNP\tB-NP\tB-ORG\nrejects\tVBZ\n")
    with pytest.raises(DatasetError, match=r"v\.txt:3: 2 columns, but columns 0,3 need at least 4"):
        read_split(path, columns=(0, 3))
    # predict input: a bare token still reads as a token without a tag
    split = read_split(write(tmp_path, "w.txt", "IMGID:1\nEU\n"), columns=(0, 3), require_tags=False)
    assert split.posts[0].tags == ("O",)


def test_the_readmes_columns_examples_read_conll2003(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    flag = re.search(r"e\.g\. `--columns (\S+)` for\s+CoNLL-2003", readme)
    toml = re.search(r"`columns = \[(\d+), (\d+)\]`\s+in a dataset TOML", readme)
    assert flag and toml, "the README's --columns examples moved: update this test"
    conll2003 = write(tmp_path, "t.txt", "IMGID:1\nEU\tNNP\tB-NP\tB-ORG\nrejects\tVBZ\tB-VP\tO\n")
    for given in (flag.group(1), [int(toml.group(1)), int(toml.group(2))]):
        post = read_split(conll2003, columns=parse_columns(given)).posts[0]
        assert (post.words, post.tags) == (("EU", "rejects"), ("B-ORG", "O"))


def test_columns_reach_the_reader_through_data_config(tmp_path):
    text = "IMGID:1\nEU\tNNP\tB-ORG\nrejects\tVBZ\tO\n"
    folder = make_data_dir(tmp_path, text=text)
    with pytest.raises(DatasetError, match=r"3 tab-separated columns"):
        DataConfig(data_dir=str(folder)).resolve().read("train")
    for columns in ("0,2", [0, 2], (0, 2)):
        data = DataConfig(data_dir=str(folder), columns=columns)
        assert data.columns == (0, 2) and data.to_dict()["columns"] == (0, 2)
        assert DataConfig.from_dict(data.to_dict()) == data
        assert data.resolve().read("train").posts[0].tags == ("B-ORG", "O")
    assert resolve_data(data_dir=folder, columns="0,2").read("valid").posts[0].words == ("EU", "rejects")
    assert DataConfig.from_dict({"data_dir": "x"}).columns is None  # records written before the option


@pytest.mark.parametrize("columns", ["0", "0,3,4", "a,b", "-1,2", "1,1", [0], 7])
def test_bad_columns_are_refused(columns):
    with pytest.raises(ValueError, match=r"columns .*: expected WORD,TAG: two different column numbers"):
        DataConfig(data_dir="x", columns=columns)


def test_types_that_differ_only_by_case_are_an_error_naming_both(tmp_path):
    path = write(tmp_path, "t.txt", "IMGID:1\nAnn\tB-PER\nsaw\tO\n\nIMGID:2\nBob\tB-per\nran\tO\n")
    with pytest.raises(
        DatasetError,
        match=r"t\.txt:6: tag type 'per' differs only by case from 'PER' \(first at line 2\)",
    ):
        read_split(path)
    # the same type in I- position counts too
    path = write(tmp_path, "u.txt", "IMGID:1\nNew\tB-LOC\nYork\tI-Loc\n")
    with pytest.raises(DatasetError, match=r"u\.txt:3: tag type 'Loc' differs only by case from 'LOC'"):
        read_split(path)


def test_tag_line_is_the_line_of_the_token(tmp_path):
    split = read_split(write(tmp_path, "t.txt", TWO_POSTS))
    lines = write(tmp_path, "t.txt", TWO_POSTS).read_text().split("\n")
    for post in split.posts:
        for i, word in enumerate(post.words):
            assert lines[post.tag_line(i) - 1].split("\t")[0] == word


def test_any_type_names(tmp_path):
    text = "IMGID:1\nBlackburn\tB-MISC\nFest\tI-MISC\nx\tB-OTHER\n"
    split = read_split(write(tmp_path, "t.txt", text))
    assert label_names(split) == ["O", "B-MISC", "I-MISC", "B-OTHER", "I-OTHER"]


def test_orphan_i_is_kept_and_counted(tmp_path):
    text = (
        "IMGID:1\nWater\tI-OTHER\nx\tO\nDriving\tI-ORG\n\n"  # after O, and at the start: 2 orphans
        "IMGID:2\nNew\tB-LOC\nYork\tI-PER\nCity\tI-PER\n\n"  # I-PER after B-LOC: 1 (then I-PER after I-PER: 0)
        "IMGID:3\nNew\tB-LOC\nYork\tI-LOC\n"  # well formed: 0
    )
    split = read_split(write(tmp_path, "t.txt", text))
    assert split.orphan_i == 3
    assert split.posts[0].tags == ("I-OTHER", "O", "I-ORG")
    # brute force over the flat tag list, resetting at post starts
    brute = 0
    for post in split.posts:
        for i, tag in enumerate(post.tags):
            before = post.tags[i - 1] if i else "O"
            brute += tag.startswith("I-") and before not in (f"B-{tag[2:]}", f"I-{tag[2:]}")
    assert brute == split.orphan_i
    assert "B-OTHER" in label_names(split) and "I-OTHER" in label_names(split)


def test_label_names_order(tmp_path):
    text = "IMGID:1\na\tB-PER\nb\tB-ORG\nc\tB-LOC\nd\tI-LOC\ne\tB-OTHER\n"
    split = read_split(write(tmp_path, "t.txt", text))
    assert label_names(split) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-ORG",
        "I-ORG",
        "B-OTHER",
        "I-OTHER",
        "B-PER",
        "I-PER",
    ]


def test_predict_input_without_tags(tmp_path):
    text = "IMGID:1\nParis\nrocks\tO\nhere\n"
    split = read_split(write(tmp_path, "input.txt", text), require_tags=False)
    assert split.posts[0].tags == ("O", "O", "O")
    assert split.name == "input"
    with pytest.raises(DatasetError, match=r"input\.txt:2: token 'Paris' has no tag"):
        read_split(tmp_path / "input.txt")


def test_image_path_format(tmp_path):
    text = "IMAGE:imgs/a/0001.jpg\nObama\tB-PER\n\r\nIMAGE: imgs/b/0002.png \r\nUN\tB-ORG\r\n"
    split = read_split(write(tmp_path, "train.txt", text), fmt="image-path")
    assert [p.key for p in split.posts] == ["imgs/a/0001.jpg", "imgs/b/0002.png"]
    assert split.fmt == "image-path"


# ---------------------------------------------------------------- writing


def as_written(posts: list[Post]) -> list[tuple]:
    """What a round trip must keep: key, words and tags of every post, in order."""
    return [(p.key, p.words, p.tags) for p in posts]


EDGE_POSTS = [
    # A lone U+00A0 token (Twitter-2015 valid), a word with inner and trailing spaces, an orphan I-.
    Post(key="17_06_1", words=("\u00a0", "New York ", "a b"), tags=("O", "B-LOC", "I-ORG"), line=0),
    Post(key="O_996", words=("#", "IMAGE:x", "caf\u00e9"), tags=("O", "O", "B-OTHER"), line=0),
    Post(key="3", words=("x",), tags=("O",), line=0),
]


@pytest.mark.parametrize("blank_after_last", [True, False])
def test_write_then_read_gives_the_same_imgid_posts(tmp_path, blank_after_last):
    path = write_split(tmp_path / "train.txt", EDGE_POSTS, "imgid", blank_after_last=blank_after_last)
    split = read_split(path)
    assert as_written(split.posts) == as_written(EDGE_POSTS)
    assert [p.line for p in split.posts] == [1, 6, 11]  # header, 3 words, blank line: 5 lines a post
    assert path.read_bytes().endswith(b"x\tO\n\n" if blank_after_last else b"x\tO\n")


def test_write_then_read_gives_the_same_image_path_posts(tmp_path):
    posts = [
        Post(key="imgs/a/0001.jpg", words=("Obama", "IMGID:2"), tags=("B-PER", "O"), line=0),
        Post(key="imgs/b/0002 x.png", words=("UN",), tags=("B-ORG",), line=0),
    ]
    path = write_split(tmp_path / "test.txt", posts, "image-path")
    assert path.read_text(encoding="utf-8").startswith("IMAGE:imgs/a/0001.jpg\nObama\tB-PER\n")
    assert as_written(read_split(path, fmt="image-path").posts) == as_written(posts)


def test_written_split_matches_the_reference_parser(tmp_path):
    posts = read_split(write(tmp_path, "in.txt", TWO_POSTS)).posts
    text = write_split(tmp_path / "out.txt", posts).read_text(encoding="utf-8")
    assert text == TWO_POSTS + "\n"  # the reader's own example file, with a blank line after the last post
    assert reference_parse(text) == [(p.key, list(p.words), list(p.tags)) for p in posts]


def test_predict_input_without_tags_is_written_with_o_tags(tmp_path):
    split = read_split(write(tmp_path, "new.txt", "IMGID:1\nParis\nrocks\t\n"), require_tags=False)
    path = write_split(tmp_path / "tagged.txt", split.posts)
    assert path.read_text(encoding="utf-8") == "IMGID:1\nParis\tO\nrocks\tO\n\n"


@pytest.mark.parametrize(
    "post, message",
    [
        (Post("../x", ("a",), ("O",), 0), "post '../x': image id refused: it has a '..' component"),
        (Post("", ("a",), ("O",), 0), "post '': image id refused: it is empty"),
        (Post(" 1", ("a",), ("O",), 0), "post ' 1': image id has surrounding whitespace or a newline"),
        (Post("1\n2", ("a",), ("O",), 0), "post '1\\n2': image id has surrounding whitespace or a newline"),
        (Post("1", (), (), 0), "post '1' has no words"),
        (Post("1", ("a", "b"), ("O",), 0), "post '1' has 2 words but 1 tags"),
        (Post("1", ("",), ("O",), 0), "post '1': word '' is empty or holds a tab or a newline"),
        (Post("1", ("a\tb",), ("O",), 0), "post '1': word 'a\\tb' is empty or holds a tab or a newline"),
        (Post("1", ("a\nb",), ("O",), 0), "post '1': word 'a\\nb' is empty or holds a tab or a newline"),
        (Post("1", ("IMGID:2",), ("O",), 0), "post '1': word 'IMGID:2' would read as a IMGID: line"),
        (
            Post("1", ("a",), ("S-LOC",), 0),
            "post '1': tag 'S-LOC' is not BIO (expected O, B-<type> or I-<type>)",
        ),
    ],
)
def test_write_refuses_what_would_not_read_back(tmp_path, post, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        write_split(tmp_path / "t.txt", [post])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, match",
    [
        ("IMGID:1\nParis\n", r"t\.txt:2: token 'Paris' has no tag"),
        ("IMGID:1\nParis\t\n", r"t\.txt:2: token 'Paris' has no tag"),
        ("IMGID:1\nok\tO\nParis\tX-PER\n", r"t\.txt:3: tag 'X-PER' is not BIO"),
        ("IMGID:1\nParis\tB-\n", r"t\.txt:2: tag 'B-' is not BIO"),
        ("IMGID:1\nParis\tfoo\n", r"t\.txt:2: tag 'foo' is not BIO"),
        ("IMGID:1\nParis\tS-LOC\n", r"t\.txt:2: tag 'S-LOC' is not BIO"),
        ("IMGID:1\n\tO\n", r"t\.txt:2: token is empty"),
        (
            "IMGID:1\na\tO\n\nIMGID:2\nb\tO\n\nIMGID:1\nc\tO\n",
            r"t\.txt:7: duplicate image id '1' \(first at line 1\)",
        ),
        ("", r"t\.txt:1: file is empty"),
        ("\n \r\n\n", r"t\.txt:1: file is empty"),
        ("\nParis\tB-LOC\nIMGID:1\n", r"t\.txt:2: token line outside a post: expected a 'IMGID:' line"),
        ("IMGID:1\na\tO\n\nstray\tO\n", r"t\.txt:4: token line outside a post"),
        ("IMGID:  \na\tO\n", r"t\.txt:1: IMGID: line has an empty id"),
        ("IMGID:1\na\tO\n\nIMGID:2\n\nIMGID:3\nb\tO\n", r"t\.txt:4: post '2' has no tokens"),
        ("IMGID:1\nIMGID:2\nb\tO\n", r"t\.txt:1: post '1' has no tokens"),
        ("IMGID:1\na\tO\nIMGID:2\n", r"t\.txt:3: post '2' has no tokens"),
        (
            "IMGID:../../etc/passwd\na\tO\n",
            r"t\.txt:1: image id '\.\./\.\./etc/passwd' refused: it has a '\.\.' component",
        ),
        ("IMGID:/etc/passwd\na\tO\n", r"t\.txt:1: image id '/etc/passwd' refused: it is an absolute path"),
    ],
)
def test_malformed_files(tmp_path, text, match):
    path = write(tmp_path, "t.txt", text)
    with pytest.raises(DatasetError, match=match) as info:
        read_split(path)
    assert str(info.value).startswith(f"{path}:")


def test_image_path_format_errors(tmp_path):
    path = write(tmp_path, "t.txt", "IMAGE:\na\tO\n")
    with pytest.raises(DatasetError, match=r"t\.txt:1: IMAGE: line has an empty path"):
        read_split(path, fmt="image-path")
    path = write(tmp_path, "t.txt", "IMAGE:a.jpg\nx\tO\n\nIMAGE:a.jpg\ny\tO\n")
    with pytest.raises(DatasetError, match=r"t\.txt:4: duplicate image path 'a\.jpg' \(first at line 1\)"):
        read_split(path, fmt="image-path")
    # an imgid file read as image-path has no post lines at all
    path = write(tmp_path, "t.txt", TWO_POSTS)
    with pytest.raises(DatasetError, match=r"t\.txt:1: token line outside a post: expected a 'IMAGE:' line"):
        read_split(path, fmt="image-path")


def test_non_utf8_names_the_line_of_the_bad_byte(tmp_path):
    data = TWO_POSTS.encode() + b"\nIMGID:3\ncaf\xe9\tO\n"
    path = write(tmp_path, "t.txt", data)
    with pytest.raises(DatasetError, match=r"t\.txt:11: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        read_split(path)
    assert data.split(b"\n")[10] == b"caf\xe9\tO"  # line 11 really is the bad one


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.txt: dataset file not found"):
        read_split(tmp_path / "nope.txt")
    path = write(tmp_path, "t.txt", TWO_POSTS)
    with pytest.raises(
        ValueError, match=r"unknown dataset format 'conll'; expected one of imgid, image-path"
    ):
        read_split(path, fmt="conll")
    with pytest.raises(ValueError, match=r"unknown dataset format 'conll'"):
        write_split(tmp_path / "out.txt", EDGE_POSTS, "conll")
    with pytest.raises(ValueError, match=r"unknown dataset format 'conll'"):
        DataSource(name="x", data_dir=tmp_path, image_dir=tmp_path, fmt="conll")


def test_dataset_error_is_a_value_error_that_survives_pickling(tmp_path):
    with pytest.raises(ValueError) as info:
        read_split(write(tmp_path, "t.txt", "IMGID:1\nParis\tfoo\n"))
    copy = pickle.loads(pickle.dumps(info.value))  # as it crosses from a DataLoader worker
    assert type(copy) is DatasetError and str(copy) == str(info.value)
    assert (copy.path, copy.line) == (tmp_path / "t.txt", 2)


# ---------------------------------------------------------------- safe image paths


def test_image_path_for_both_formats(tmp_path):
    imgid = DataSource(name="t", data_dir=str(tmp_path), image_dir=str(tmp_path / "images"), fmt="imgid")
    assert imgid.image_path("O_996") == tmp_path / "images" / "O_996.jpg"
    assert imgid.split_path("valid") == tmp_path / "valid.txt"
    news = DataSource(name="n", data_dir=tmp_path, image_dir=tmp_path, fmt="image-path")
    assert news.image_path("imgs/a/1.png") == tmp_path / "imgs" / "a" / "1.png"


@pytest.mark.parametrize(
    "key, reason",
    [
        ("../secret", r"it has a '\.\.' component"),
        ("a/../../secret", r"it has a '\.\.' component"),
        ("/etc/passwd", "it is an absolute path"),
        ("C:/Windows/x", "it is an absolute path"),
        ("..\\..\\secret", "it contains a backslash"),
        ("a\x00b", "it contains a NUL byte"),
        ("", "it is empty"),
    ],
)
def test_image_path_refuses_escapes(tmp_path, key, reason):
    for fmt in ("imgid", "image-path"):
        source = DataSource(name="t", data_dir=tmp_path, image_dir=tmp_path / "images", fmt=fmt)
        with pytest.raises(ValueError, match=rf"image key .* refused: {reason}"):
            source.image_path(key)


def test_image_path_refuses_symlink_out(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"")
    os.symlink(outside / "x.jpg", images / "leak.jpg")
    os.symlink(outside, images / "sub")
    os.symlink(images / "ok_target.jpg", images / "inside.jpg")  # a link that stays inside is fine
    source = DataSource(name="t", data_dir=tmp_path / "data", image_dir=images, fmt="imgid")
    with pytest.raises(
        ValueError, match=r"image key 'leak' refused: it resolves outside .* through a symlink"
    ):
        source.image_path("leak")
    with pytest.raises(ValueError, match=r"image key 'sub/x' refused: it resolves outside"):
        source.image_path("sub/x")
    assert source.image_path("inside") == images / "inside.jpg"


def test_image_folder_that_is_itself_a_symlink_is_fine(tmp_path):
    real = tmp_path / "big_disk" / "imgs"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "images")
    source = DataSource(name="t", data_dir=tmp_path, image_dir=tmp_path / "images", fmt="imgid")
    assert source.image_path("17_06_1") == tmp_path / "images" / "17_06_1.jpg"


# ---------------------------------------------------------------- resolve_data


def test_resolve_data_dir_prefers_images_then_named_then_sibling(tmp_path):
    folder = make_data_dir(tmp_path, "twitter2017")
    # nothing exists: the preferred folder is still returned, images will be recorded missing
    assert resolve_data(data_dir=folder).image_dir == folder / "images"
    (tmp_path / "twitter2017_images").mkdir()
    assert resolve_data(data_dir=folder).image_dir == tmp_path / "twitter2017_images"
    (folder / "twitter2017_images").mkdir()
    assert resolve_data(data_dir=folder).image_dir == folder / "twitter2017_images"
    (folder / "images").mkdir()
    source = resolve_data(data_dir=str(folder))
    assert source == DataSource(name="twitter2017", data_dir=folder, image_dir=folder / "images", fmt="imgid")
    assert resolve_data(data_dir=folder, image_dir=tmp_path / "elsewhere").image_dir == tmp_path / "elsewhere"


def test_resolve_data_sniffs_image_path_format(tmp_path):
    folder = make_data_dir(tmp_path, "news", "\ufeff\nIMAGE:a/1.jpg\nObama\tB-PER\n")
    (folder / "images").mkdir()  # not used: image-path keys are relative to the data folder
    source = resolve_data(data_dir=folder)
    assert (source.fmt, source.image_dir) == ("image-path", folder)
    assert source.read("test").posts[0].key == "a/1.jpg"


def test_resolve_dataset_through_configs(tmp_path):
    folder = make_data_dir(tmp_path, "twitter2015")
    source = resolve_data(dataset="twitter2015", data_root=tmp_path)
    assert source == DataSource(
        name="twitter2015", data_dir=folder, image_dir=folder / "twitter2015_images", fmt="imgid"
    )
    (tmp_path / "twitter2015_images").mkdir()  # the UMT sibling layout
    assert (
        resolve_data(dataset="twitter2015", data_root=tmp_path).image_dir == tmp_path / "twitter2015_images"
    )
    assert [p.key for p in source.read("valid").posts] == ["101", "O_996"]

    news = make_data_dir(tmp_path, "NewsMKG", "IMAGE:x/1.jpg\nUN\tB-ORG\n")
    source = resolve_data(dataset="newsmkg", data_root=str(tmp_path))
    assert source == DataSource(name="newsmkg", data_dir=news, image_dir=news, fmt="image-path")


def test_resolve_data_errors(tmp_path):
    make_data_dir(tmp_path)
    with pytest.raises(ValueError, match="give either data_dir or dataset \\(with data_root\\), not both"):
        resolve_data(data_dir=tmp_path, dataset="twitter2015", data_root=tmp_path)
    with pytest.raises(ValueError, match="give data_dir, or dataset with data_root"):
        resolve_data()
    with pytest.raises(
        ValueError, match="unknown dataset 'twitter2099'; known: newsmkg, twitter2015, twitter2017"
    ):
        resolve_data(dataset="twitter2099", data_root=tmp_path)
    with pytest.raises(
        ValueError, match="dataset 'twitter2017' needs data_root: the folder that holds twitter2017/"
    ):
        resolve_data(dataset="twitter2017")
    with pytest.raises(ValueError, match=r"data folder .*twitter2017 does not exist"):
        resolve_data(dataset="twitter2017", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"data folder .*nowhere does not exist"):
        resolve_data(data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data_root goes with dataset; with data_dir, leave it out"):
        resolve_data(data_dir=tmp_path, data_root=tmp_path)


def test_resolve_data_reports_a_broken_dataset_config(tmp_path, monkeypatch):
    (tmp_path / "datasets").mkdir()
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    (tmp_path / "datasets" / "nofmt.toml").write_text('subdir = "x"\nimage_dir = "images"\n')
    with pytest.raises(ValueError, match=r"nofmt\.toml: 'format' must be a string"):
        resolve_data(dataset="nofmt", data_root=tmp_path)
    (tmp_path / "datasets" / "badfmt.toml").write_text('format = "xml"\nsubdir = "x"\nimage_dir = "i"\n')
    with pytest.raises(ValueError, match=r"badfmt\.toml: format 'xml' is not one of imgid, image-path"):
        resolve_data(dataset="badfmt", data_root=tmp_path)


def test_a_dataset_config_may_name_its_columns(tmp_path, monkeypatch):
    (tmp_path / "datasets").mkdir()
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    (tmp_path / "datasets" / "four.toml").write_text(
        'format = "imgid"\nsubdir = "four"\nimage_dir = "images"\ncolumns = [0, 3]\n'
    )
    write(tmp_path / "four", "train.txt", "IMGID:1\nEU\tNNP\tB-NP\tB-ORG\n")
    source = resolve_data(dataset="four", data_root=tmp_path)
    assert source.columns == (0, 3) and source.read("train").posts[0].tags == ("B-ORG",)
    # the command line's columns win over the config's
    assert resolve_data(dataset="four", data_root=tmp_path, columns="0,2").columns == (0, 2)
    (tmp_path / "datasets" / "bad.toml").write_text(
        'format = "imgid"\nsubdir = "four"\nimage_dir = "images"\ncolumns = [3, 3]\n'
    )
    with pytest.raises(ValueError, match=r"bad\.toml: columns \[3, 3\]: expected WORD,TAG"):
        resolve_data(dataset="bad", data_root=tmp_path)


# ---------------------------------------------------------------- DataConfig


def test_data_config_resolves_as_resolve_data(tmp_path):
    folder = make_data_dir(tmp_path, "twitter2017")
    assert DataConfig(data_dir=str(folder)).resolve() == resolve_data(data_dir=folder)
    assert DataConfig(dataset="twitter2017", data_root=tmp_path).resolve() == resolve_data(
        dataset="twitter2017", data_root=tmp_path
    )


def test_data_config_keeps_paths_as_given_until_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(data_dir=Path("data"), image_dir="~/imgs")
    assert cfg.to_dict() == {
        "data_dir": "data", "dataset": None, "data_root": None, "image_dir": "~/imgs", "columns": None
    }  # fmt: skip
    assert list(cfg.to_dict()) == list(DATA_FIELDS)
    absolute = cfg.absolute()
    assert absolute.data_dir == str(tmp_path / "data")
    assert absolute.image_dir == str(Path("~/imgs").expanduser())
    assert DataConfig(dataset="newsmkg", data_root="root").absolute().data_root == str(tmp_path / "root")


def test_data_config_from_dict_reads_old_and_new_records():
    assert DataConfig.from_dict({"data_dir": "/d"}) == DataConfig(
        data_dir="/d"
    )  # runs made before DataConfig
    full = DataConfig(dataset="twitter2015", data_root="/r", image_dir="/i")
    assert DataConfig.from_dict(full.to_dict()) == full
    with pytest.raises(
        ValueError,
        match=re.escape("run/config.json: unknown data keys ['root']; known keys: " + ", ".join(DATA_FIELDS)),
    ):
        DataConfig.from_dict({"data_dir": "/d", "root": "/r"}, source="run/config.json")


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"data_dir": "d", "dataset": "twitter2015"},
            "give either data_dir or dataset (with data_root), not both",
        ),
        ({}, "give data_dir, or dataset with data_root"),
        ({"image_dir": "i"}, "give data_dir, or dataset with data_root"),
        ({"data_dir": "d", "data_root": "r"}, "data_root goes with dataset; with data_dir, leave it out"),
        ({"data_dir": 3}, "data_dir must be a path or None, got 3"),
    ],
)
def test_data_config_errors(fields, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DataConfig(**fields)


def test_recorded_data_is_none_once_the_folder_is_gone(tmp_path):
    folder = make_data_dir(tmp_path, "tw")
    config = {**DataConfig(data_dir=str(folder)).to_dict(), "out": "/cache", "topk": 20}
    assert recorded_data(config) == resolve_data(data_dir=folder)
    assert recorded_data({**config, "data_dir": str(tmp_path / "moved")}) is None
    assert recorded_data({"out": "/cache"}) is None


# ---------------------------------------------------------------- configs


def test_shipped_dataset_configs():
    assert configs.dataset_names() == ["newsmkg", "twitter2015", "twitter2017"]
    for name in configs.dataset_names():
        cfg = configs.load_toml(configs.path("datasets", f"{name}.toml"))
        assert set(cfg) == {"format", "subdir", "image_dir"}
        assert (
            configs.path("datasets", f"{name}.toml").read_text().startswith("# ")
        )  # says where it comes from


def test_load_toml_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.toml: config file not found"):
        configs.load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("format = \n")
    with pytest.raises(ValueError, match=r"bad\.toml: invalid TOML: "):
        configs.load_toml(bad)


def test_image_path_format_accepts_an_image_folder_linked_to_another_disk(tmp_path):
    # the first folder of an IMAGE: path may be a link; beneath it nothing may leave it
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "x.jpg").write_bytes(b"")
    os.symlink(tmp_path / "secret.jpg", disk / "leak.jpg")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(disk, data / "images")
    source = DataSource(name="t", data_dir=data, image_dir=data, fmt="image-path")
    assert source.image_path("images/x.jpg") == data / "images" / "x.jpg"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"image key 'images/leak.jpg' refused: it resolves outside {data / 'images'} through"
        ),
    ):
        source.image_path("images/leak.jpg")
    with pytest.raises(ValueError, match="image key 'images/../x.jpg' refused: it has a '..' component"):
        source.image_path("images/../x.jpg")
