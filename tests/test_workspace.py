import json

from colquant import workspace
from colquant.params import load_profile
from colquant.quantization import METADATA_FILE


def test_outputs_follow_the_override_and_variants_sort_by_seqlen_then_rtn(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    assert workspace.output_dir(profile) == tmp_path / "tiny"
    for name, method, seqlen in (("rtn", "rtn", 256), ("s1024", "autoround", 1024), ("s256", "autoround", 256), ("unfinished", "autoround", 512)):
        directory = workspace.variants_dir(profile) / name
        directory.mkdir(parents=True)
        if name != "unfinished":
            (directory / METADATA_FILE).write_text(json.dumps({"settings": {"method": method}, "calibration": {"seqlen": seqlen}}))
    assert list(workspace.quantized_variants(profile)) == ["s256", "s1024", "rtn"]


def test_json_is_written_atomically(tmp_path):
    path = workspace.write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert not list(path.parent.glob("*.partial"))
