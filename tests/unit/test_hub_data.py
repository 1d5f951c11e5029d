"""Hub data sets: `data.path=org/name` through datasets.load_dataset and its cache, with the data set's subset,
split and revision as keys of their own, into the same readers and the same errors. Offline: the data sets are
written where datasets keeps what it downloaded (CACHE/org___name/SUBSET/VERSION/HASH), and HF_HUB_OFFLINE is on,
so load_dataset resolves `org/name` from that cache as it would after a real download."""

import json
import shutil

import pytest

from corral.cli import main
from corral.config import DataConfig
from corral.data.formats import DataError, HubDataset, read_conversations, resolve_data_path
from corral.data.mix import load_records


def sharegpt(i, reply="Hello"):
    turns = [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": reply}]
    return {"id": f"c{i}", "conversations": turns}


def cache_as_downloaded(cache, repo, subset, splits):
    """Write `splits` (split -> records) as datasets' cache holds a Hub data set's subset after load_dataset."""
    from datasets.packaged_modules.json.json import Json

    src = cache / "src" / subset
    src.mkdir(parents=True)
    files = {}
    for split, records in splits.items():
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        files[split] = str(src / f"{split}.jsonl")
    name = repo.split("/")[1]
    Json(cache_dir=str(cache / "build"), dataset_name=name, config_name=subset, hash="0123abcd",
         data_files=files).download_and_prepare()  # fmt: skip
    (built,) = (cache / "build" / name).glob(f"{subset}-*/0.0.0/0123abcd")
    target = cache / repo.replace("/", "___") / subset / "0.0.0" / "0123abcd"
    target.parent.mkdir(parents=True)
    shutil.move(str(built), target)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    cache_as_downloaded(cache, "corral-test/chats", "en", {"train": [sharegpt(0), sharegpt(1)],
                                                           "test": [sharegpt(2, "Bye")]})  # fmt: skip
    robot = {"id": "c4", "conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "x"}]}
    bad = [sharegpt(3), robot]
    cache_as_downloaded(cache, "corral-test/chats", "fr", {"validation": bad})
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set for this test too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_ids_are_told_from_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("org/name") == HubDataset("org/name")
    assert resolve_data_path("hf://datasets/org/name?subset=en&split=test&revision=v1") == HubDataset(
        "org/name", "en", "test", "v1")
    assert resolve_data_path("org/chats.jsonl") == tmp_path.joinpath("org/chats.jsonl").relative_to(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local folder of that name is the folder
    local = resolve_data_path("org/name")
    assert str(local) == "org/name" and not isinstance(local, HubDataset)
    with pytest.raises(DataError, match="'splits=test': a Hub data set takes subset=VALUE, split=VALUE, revision="):
        resolve_data_path("org/other?splits=test")


def test_config_keys_travel_with_the_path():
    assert DataConfig(path="org/name", subset="en", hub_split="test", revision="v1").path == (
        "org/name?subset=en&split=test&revision=v1")
    assert DataConfig(path="org/name?subset=en", subset="en").path == "org/name?subset=en"  # a saved config reloads
    sliced = DataConfig(path="hf://datasets/org/name", hub_split="train[:10]")
    assert sliced.path == "hf://datasets/org/name?split=train[:10]"
    with pytest.raises(ValueError, match=r"subset: for a data set on the Hub, path=org/name \(path is 'chats.jsonl'\)"):
        DataConfig(path="chats.jsonl", subset="en")
    with pytest.raises(ValueError, match="path 'org/name\\?subset=fr' gives subset=fr, the config en"):
        DataConfig(path="org/name?subset=fr", subset="en")


def test_reads_a_cached_hub_data_set_offline_by_subset_and_split(hub_cache):
    convs, report = read_conversations(DataConfig(path="corral-test/chats", subset="en").path)
    assert [c.id for c in convs] == ["c0", "c1"] and report.kept == report.total == 2  # train by default
    assert convs[0].source == "corral-test/chats?subset=en:record 0"
    assert [m.content for m in convs[1].messages] == ["Question 1?", "Hello"]
    test, _ = read_conversations(DataConfig(path="corral-test/chats", subset="en", hub_split="test").path)
    assert [(c.id, c.messages[1].content) for c in test] == [("c2", "Bye")]
    sliced, _ = read_conversations("corral-test/chats?subset=en&split=train[1:]")
    assert [c.id for c in sliced] == ["c1"]
    # Offline, datasets reads the cached copy whatever revision is asked for (it cannot ask the Hub).
    assert len(read_conversations("corral-test/chats?subset=en&revision=main")[0]) == 2


def test_hub_records_get_the_same_errors_and_skips(hub_cache):
    path = "corral-test/chats?subset=fr&split=validation"
    with pytest.raises(DataError, match=r"^corral-test/chats\?subset=fr&split=validation:record 1: field "
                                        r"'conversations\[1\]\.from': unknown role 'robot'"):  # fmt: skip
        read_conversations(path)
    convs, report = read_conversations(path, skip_invalid=True)
    assert [c.id for c in convs] == ["c3"] and report.total == 2 and sum(report.skipped.values()) == 1


@pytest.mark.parametrize("path, message", [
    ("corral-test/chats", "multiple 'corral-test/chats' configurations in the cache: en, fr"),
    ("corral-test/chats?subset=de", "Couldn't find cache for corral-test/chats for config 'de'"),
    ("corral-test/chats?subset=fr", "no 'train' split \\(it has validation\\): choose one with data.hub_split"),
    ("corral-test/chats?subset=en&split=dev", "Unknown split \"dev\""),
    ("corral-test/absent", "no such file or folder here, and it could not be loaded as a data set on the Hub"),
])  # fmt: skip
def test_what_is_not_in_the_cache_is_a_clear_error(hub_cache, path, message):
    with pytest.raises(DataError, match=message) as err:
        read_conversations(path)
    assert str(err.value).startswith(path.split("?")[0])


def test_mixture_sources_and_the_commands_read_hub_data_sets(hub_cache, tiny_model_dir, capsys):
    config = DataConfig(sources=[{"path": "corral-test/chats?subset=en", "count": 4},
                                 {"path": "corral-test/chats?subset=en&split=test"}])  # fmt: skip
    mixed = load_records(read_conversations, config.path, config.sources, 1, "", 0, 1, log=lambda _: None)
    assert sorted(c.id for c in mixed) == ["c0", "c0", "c1", "c1", "c2"]  # twice the 2 train records, then test's
    # The keys on the command line (a bare argument with "=" in it would be read as a key: inputs=... instead).
    stats = hub_cache.parent / "chats.stats.md"
    assert main(["data", "stats", "data.path=corral-test/chats", "data.subset=en", "data.hub_split=test",
                 f"model={tiny_model_dir}", "template=chatml", f"output={stats}"]) == 0  # fmt: skip
    assert "| conversations | 1 |" in stats.read_text()
    from corral.recipes.data import _stats_name

    assert _stats_name("corral-test/chats?subset=en&split=test[:5]") == "chats-en-test[:5]"
    out = hub_cache.parent / "clean.jsonl"
    assert main(["data", "clean", "inputs=corral-test/chats?subset=en&split=test", "--output", str(out)]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["c2"]
    capsys.readouterr()
    assert main(["data", "clean", "inputs=corral-test/chats?subset=de", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "corral data clean: error: corral-test/chats?subset=de: no such file or folder here" in err
    assert "Traceback" not in err
