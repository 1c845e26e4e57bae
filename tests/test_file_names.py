"""File names read from a checkpoint are data, never paths: a crafted index, conversion record or torch_dist metadata
cannot make the converters (or training, or the VL data reader) read or write outside the folders named on the
command line. Each hostile form is refused by name, through the command lines users run, with every byte of the
surrounding tree unchanged and no output created; a Hugging Face cache (shards as links into a blob store) still
converts."""

import json
import os
import pickle
import runpy
import shutil
from pathlib import Path

import pytest

from megatron_qwen35.checkpoint import CONFIG
from megatron_qwen35.convert.safetensors_files import INDEX_NAME
from megatron_qwen35.file_names import UnsafeFileName, media_file, plain_file_name
from tests.test_convert import REPO, assert_same_hf_checkpoint, make_hf_checkpoint

pytestmark = pytest.mark.usefixtures("megatron_single_process")

TO_MEGATRON = runpy.run_path(str(REPO / "tools/convert/hf_to_megatron.py"), run_name="cli")["main"]
TO_HF = runpy.run_path(str(REPO / "tools/convert/megatron_to_hf.py"), run_name="cli")["main"]


def hostile_names(root: Path) -> dict[str, str]:
    """Each form a crafted name takes, for a file `x.safetensors` (the outside targets exist under `root`)."""
    return {"parent": "../outside/x.safetensors", "absolute": str(root / "outside" / "x.safetensors"),
            "subfolder": "sub/x.safetensors", "dot-dot": "..", "empty": "", "backslash": "..\\x.safetensors"}


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: a file's bytes, a link's target, a folder's marker."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    """A sharded tiny checkpoint (save_pretrained with an index) and its conversion."""
    root = tmp_path_factory.mktemp("named")
    hf = make_hf_checkpoint(root / "hf", "tiny")
    assert (hf / INDEX_NAME).is_file() and len(list(hf.glob("*.safetensors"))) > 1
    assert TO_MEGATRON(["--hf-dir", str(hf), "--out-dir", str(root / "mg"), "--no-progress"]) == 0
    return hf, root / "mg"


@pytest.fixture
def world(sharded_source, tmp_path):
    """A copy of the source and its conversion under tmp_path, beside an `outside` folder holding a valid shard and a
    user's file that a crafted name could reach."""
    hf, mg = sharded_source
    shutil.copytree(hf, tmp_path / "hf")
    shutil.copytree(mg, tmp_path / "mg")
    (tmp_path / "outside").mkdir()
    shutil.copy(next(iter(sorted(hf.glob("*.safetensors")))), tmp_path / "outside" / "x.safetensors")
    (tmp_path / "outside" / "victim.txt").write_text("a user's file\n")
    return tmp_path


def refused(run, root: Path, capsys, *, named: str, why: str = "not a plain file name") -> str:
    """`run()` exits 2 with one error line naming `named` and saying `why`, and leaves every byte under `root` as
    it was."""
    before = tree(root)
    assert run() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert repr(named) in err and why in err, err
    assert tree(root) == before
    return err


@pytest.mark.parametrize("form", list(hostile_names(Path("/"))))
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused_on_import(world, capsys, form):
    name = hostile_names(world)[form]
    index = json.loads((world / "hf" / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (world / "hf" / INDEX_NAME).write_text(json.dumps(index))
    if form == "subfolder":  # a real shard there, so only the name's form can refuse it
        (world / "hf" / "sub").mkdir()
        shutil.copy(world / "outside" / "x.safetensors", world / "hf" / "sub" / "x.safetensors")
    err = refused(lambda: TO_MEGATRON(["--hf-dir", str(world / "hf"), "--out-dir", str(world / "out"),
                                       "--no-progress"]), world, capsys, named=name)
    assert INDEX_NAME in err and not (world / "out").exists()


def _crafted_record(mg: Path, change) -> None:
    config = json.loads((mg / CONFIG).read_text())
    change(config["metadata"])
    (mg / CONFIG).write_text(json.dumps(config))


def export(world: Path):
    return lambda: TO_HF(["--megatron-dir", str(world / "mg"), "--out-dir", str(world / "out"), "--no-progress"])


@pytest.mark.parametrize("form", list(hostile_names(Path("/"))))
@pytest.mark.parametrize("field", ["text file", "index shard", "single file"])
def test_a_record_naming_files_outside_the_export_folder_is_refused(world, capsys, form, field):
    """The export writes the recorded source's files back: crafted names there would create or replace files
    anywhere (a user's file truncated and replaced by a shard, `../escaped.txt` beside --out-dir)."""
    name = hostile_names(world)[form]
    if field == "text file":  # an import carries config.json and generation_config.json, nothing else
        name = name.replace("x.safetensors", "victim.txt")
        change = lambda meta: meta["hf_files"].update({name: "{}"})  # noqa: E731
    elif field == "index shard":
        def change(meta):
            index = json.loads(meta["hf_shards"]["index"])
            index["weight_map"][next(iter(index["weight_map"]))] = name
            meta["hf_shards"]["index"] = json.dumps(index)
    else:
        change = lambda meta: meta.update(hf_shards={"file": name})  # noqa: E731
    _crafted_record(world / "mg", change)
    why = "among the Hugging Face side files" if field == "text file" else "not a plain file name"
    err = refused(export(world), world, capsys, named=name, why=why)
    assert str(world / "mg" / CONFIG) in err and not (world / "out").exists()


@pytest.mark.parametrize("field,name", [("index shard", "config.json"), ("single file", INDEX_NAME)])
def test_a_recorded_shard_named_like_a_side_file_is_not_written_over_it(world, capsys, field, name):
    """A plain name, but one a side file is written under (config.json; the index, which a one-file export does not
    write, so nothing else would have caught it and a re-import read a shard as JSON): a shard is a .safetensors."""
    def change(meta):
        if field == "single file":
            meta["hf_shards"] = {"file": name}
            return
        index = json.loads(meta["hf_shards"]["index"])
        index["weight_map"] = {k: name for k in index["weight_map"]}
        meta["hf_shards"]["index"] = json.dumps(index)

    _crafted_record(world / "mg", change)
    refused(export(world), world, capsys, named=name, why="which is not a .safetensors file")
    assert not (world / "out").exists()


DAMAGED_CONFIGS = {  # a qwen35_config.json changed by hand or by a tool -> the fault the one line names
    "not JSON": (lambda config: "{", "JSONDecodeError"),
    "no config": (lambda config: {"metadata": config["metadata"]}, "KeyError: 'config'"),
    "metadata a list": (lambda config: {**config, "metadata": ["hf_files"]}, "'metadata' is a list"),
    "no source dtype": (lambda config: {**config, "metadata": {k: v for k, v in config["metadata"].items()
                                                               if k != "source_dtype"}}, "KeyError: 'source_dtype'"),
    "files a number": (lambda config: {**config, "metadata": {**config["metadata"], "hf_files": 5}}, "TypeError"),
    "experts a string": (lambda config: {**config, "metadata": {**config["metadata"], "expert_layout": "packed"}},
                         "AttributeError"),
    "LoRA without rank": (lambda config: {**config, "metadata": {**config["metadata"], "lora": {"alpha": 8}}},
                          "a damaged LoRA record"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_CONFIGS))
def test_a_damaged_config_or_record_is_refused_on_export_in_one_line(world, capsys, damage):
    """A field missing or of the wrong kind was a raw KeyError / TypeError / AttributeError traceback."""
    change, says = DAMAGED_CONFIGS[damage]
    changed = change(json.loads((world / "mg" / CONFIG).read_text()))
    (world / "mg" / CONFIG).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    before = tree(world)
    assert export(world)() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and says in err, err
    assert str(world / "mg" / CONFIG) in err or damage == "LoRA without rank", err
    assert tree(world) == before and not (world / "out").exists()


@pytest.mark.parametrize("form", list(hostile_names(Path("/"))))
def test_torch_dist_metadata_naming_a_data_file_outside_the_checkpoint_is_refused(world, capsys, form):
    """`.metadata` names each record's data file: the export reads none outside the checkpoint's folder."""
    from megatron_qwen35.convert.torch_dist import TorchDistReader

    release = world / "mg" / "release"
    metadata = TorchDistReader(release).metadata
    shutil.copy(release / "__0_0.distcp", world / "outside" / "x.safetensors")  # the same bytes, outside
    name = hostile_names(world)[form]
    for index, info in list(metadata.storage_data.items()):
        if info.relative_path == "__0_0.distcp":
            metadata.storage_data[index] = type(info)(name, info.offset, info.length)
    with open(release / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    refused(export(world), world, capsys, named=name)


def test_a_hugging_face_cache_with_linked_shards_converts(sharded_source, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/ holds links into blobs/; plain names that are links inside the input
    folder are followed for reading."""
    hf, _ = sharded_source
    snapshot, blobs = tmp_path / "cache" / "snapshots" / "abc123", tmp_path / "cache" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(hf.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    assert TO_MEGATRON(["--hf-dir", str(snapshot), "--out-dir", str(tmp_path / "mg"), "--no-progress"]) == 0
    assert TO_HF(["--megatron-dir", str(tmp_path / "mg"), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    assert_same_hf_checkpoint(hf, tmp_path / "out")


def test_a_vl_dataset_index_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    from megatron_qwen35.data.preprocess_vl import FORMAT, INDEX
    from megatron_qwen35.data.vl_dataset import Qwen35VLSamples

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / INDEX).write_text(json.dumps({"format": FORMAT, "vision": {}, "eod_id": 0, "patch_dim": 1,
                                                       "shards": [{"file": "../x.safetensors", "samples": 1}]}))
    with pytest.raises(UnsafeFileName, match=r"'\.\./x\.safetensors', which is not a plain file name"):
        Qwen35VLSamples(tmp_path / "data")


@pytest.mark.parametrize("name", ["model-00001-of-00002.safetensors", "..hidden", "a..b", ".config"])
def test_plain_names_pass(name):
    assert plain_file_name(name, source="x") == name


@pytest.mark.parametrize("name", ["../secret.png", "images/../../secret.png", "/etc/passwd", "images//a.png",
                                  "images\\a.png", ""])
def test_a_media_path_leaving_the_media_folder_is_refused(tmp_path, name):
    with pytest.raises(UnsafeFileName, match="not a relative path inside the media folder"):
        media_file(tmp_path, name, source="rows.jsonl:3: 'images'")


def test_media_paths_inside_the_folder_pass(tmp_path):
    assert media_file(tmp_path, "images/./a.png", source="x") == tmp_path / "images" / "a.png"
    assert media_file(tmp_path, "a..b.png", source="x") == tmp_path / "a..b.png"


@pytest.mark.parametrize("tool,row", [
    ("preprocess_sft", {"messages": [{"role": "user", "content": [{"type": "image", "image": "../outside.png"},
                                                                  {"type": "text", "text": "?"}]},
                                     {"role": "assistant", "content": "x"}]}),
    ("preprocess_vl", {"text": "<image> x", "images": ["../outside.png"]}),
])
def test_data_rows_naming_images_outside_the_media_folder_are_refused(tmp_path, capsys, tool, row):
    """The image exists, one folder up: the row may not reach it; one error line names the row, nothing is written."""
    shutil.copy(REPO / "data/vl/images" / sorted(os.listdir(REPO / "data/vl/images"))[0], tmp_path / "outside.png")
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "rows.jsonl").write_text(json.dumps(row) + "\n")
    main = runpy.run_path(str(REPO / "tools/data" / f"{tool}.py"))["main"]
    code = main(["--input", str(tmp_path / "rows" / "rows.jsonl"), "--output-dir", str(tmp_path / "out"),
                 "--qwen35-preset", "tiny-vl-moe"])
    err = capsys.readouterr().err
    assert code == 2 and "rows.jsonl:1" in err and "'../outside.png'" in err and not (tmp_path / "out").exists(), err
    # the same image through --media-dir: the folder named on the command line
    row_ok = json.loads(json.dumps(row).replace("../outside.png", "outside.png"))
    (tmp_path / "rows" / "rows.jsonl").write_text(json.dumps(row_ok) + "\n")
    assert main(["--input", str(tmp_path / "rows" / "rows.jsonl"), "--output-dir", str(tmp_path / "out"),
                 "--qwen35-preset", "tiny-vl-moe", "--media-dir", str(tmp_path)]) == 0


def test_a_tokenizer_folder_naming_a_file_outside_itself_is_refused(tmp_path, capsys):
    """--tokenizer-dir's tokenizer_config.json names the files transformers opens; `fast_tokenizer_files` pointing one
    folder up had transformers read that file. Refused by name (the field and the file), through the tools; the same
    folder with the name inside it loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_qwen35.data.tokenizer import Qwen35Tokenizer

    folder = tmp_path / "tok"
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / "tokenizer.json", tmp_path / "outside" / "tokenizer.4.0.json")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**config, "fast_tokenizer_files": ["../outside/tokenizer.4.0.json"]}))
    with pytest.raises(UnsafeFileName, match=r"tokenizer_config.json \(fast_tokenizer_files\) names the file "
                                             r"'../outside/tokenizer.4.0.json'"):
        Qwen35Tokenizer(folder)
    (tmp_path / "c.txt").write_text("a a\n")
    main = runpy.run_path(str(REPO / "tools/data/preprocess.py"))["main"]
    code = main(["--input", str(tmp_path / "c.txt"), "--output-prefix", str(tmp_path / "out" / "c"),
                 "--tokenizer-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "fast_tokenizer_files" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    config_file.write_text(json.dumps({**config, "fast_tokenizer_files": ["tokenizer.4.0.json"]}))
    shutil.copy(folder / "tokenizer.json", folder / "tokenizer.4.0.json")
    assert Qwen35Tokenizer(folder).encode("a") == [0]
