import errno
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from colquant.research import workspace
from colquant.research.params import load_profile, quantization_section
from colquant.retriever.checkpoint_files import METADATA_FILE


@pytest.fixture
def profile(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["calibration"]["seqlens"] = [1024, 256]
    profile["quantization"].update(rtn_baseline=True, grid=None)  # the grid's own variants: tests/test_weight_grid.py
    return profile


def finish_variant(profile, name, method="autoround", seqlen=256):
    directory = workspace.variants_dir(profile) / name
    directory.mkdir(parents=True)
    (directory / METADATA_FILE).write_text(json.dumps({"settings": {"method": method}, "calibration": {"seqlen": seqlen}}))
    return directory


def test_outputs_follow_the_override_and_variants_sort_by_seqlen_then_rtn(profile, tmp_path):
    assert workspace.output_dir(profile) == tmp_path / "outputs" / "tiny"
    s256, s1024 = workspace.autoround_variant(profile, 256), workspace.autoround_variant(profile, 1024)
    rtn = quantization_section(profile).variant_name(256, "rtn")
    for name in (rtn, s1024, s256):
        finish_variant(profile, name)
    (workspace.variants_dir(profile) / workspace.autoround_variant(profile, 512)).mkdir()  # unfinished: no metadata
    assert list(workspace.quantized_variants(profile)) == [s256, s1024, rtn]


def test_variants_of_a_removed_seqlen_and_staging_folders_are_not_picked_up(profile):
    finish_variant(profile, workspace.autoround_variant(profile, 256))
    finish_variant(profile, workspace.autoround_variant(profile, 512))  # a seqlen the profile no longer has
    finish_variant(profile, f".{workspace.autoround_variant(profile, 1024)}.abc123")  # an interrupted save
    assert list(workspace.quantized_variants(profile)) == [workspace.autoround_variant(profile, 256)]


def test_variant_names_follow_the_calibration_source_notebook_02_used(profile):
    assert workspace.autoround_variant(profile, 256) == "w4a16-g128-sym-pile10k-seqlen256-iters20"  # not run yet
    workspace.write_json(workspace.results_dir(profile) / "calibration__seqlen256.json", {"source_used": "embedded"})
    assert workspace.autoround_variant(profile, 256) == "w4a16-g128-sym-embedded-seqlen256-iters20"
    assert workspace.expected_variants(profile)[0] == "w4a16-g128-sym-embedded-seqlen256-iters20"


def test_a_corrupt_metadata_file_is_reported_by_path_with_the_fix(profile):
    directory = finish_variant(profile, workspace.autoround_variant(profile, 256))
    (directory / METADATA_FILE).write_text("")
    with pytest.raises(workspace.OutputError, match=rf"{METADATA_FILE} is empty; delete the folder .* re-run notebooks/03"):
        workspace.quantized_variants(profile)


def test_looking_up_output_paths_creates_nothing(profile, tmp_path):
    """Directories appear where something is written into them, not where a path is looked up."""
    for lookup in (workspace.output_dir, workspace.results_dir, workspace.variants_dir, workspace.corpus_dir):
        lookup(profile)
    workspace.calibration_file(profile, 256)
    workspace.expected_variants(profile)
    assert not (tmp_path / "outputs").exists()
    workspace.write_json(workspace.results_dir(profile) / "r.json", {})
    assert (tmp_path / "outputs" / "tiny" / "results" / "r.json").exists()


@pytest.mark.parametrize("name", ["../../etc", "..", "a/b", "/abs", ".hidden", "", "x\0y"])
def test_a_profile_name_that_is_not_a_plain_name_cannot_write_outside_the_root(profile, tmp_path, name):
    profile["profile"] = name
    with pytest.raises(workspace.OutputError, match="is not a plain name"):
        workspace.output_dir(profile)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_json_is_written_atomically(tmp_path):
    path = workspace.write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert os.listdir(path.parent) == ["r.json"]


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path):
    path = workspace.write_json(tmp_path / "r.json", {"old": 1})

    def crash(staging):
        staging.write_text('{"new": ')
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        workspace.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["r.json"]


def test_a_full_disk_gives_one_message_naming_the_path(tmp_path, monkeypatch):
    def full(staging):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(workspace.OutputError, match=r"cannot write .*r\.json: the disk is full.*COLQUANT_OUTPUT_ROOT"):
        workspace.atomic_write(tmp_path / "r.json", full)
    assert os.listdir(tmp_path) == []


@contextmanager
def read_only(directory):
    """Make `directory` read-only for this process: chmod, or for root (whom permissions do not
    stop) a read-only bind mount of it onto itself."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield
        directory.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_output_directory_gives_one_message_naming_the_path(tmp_path):
    directory = tmp_path / "outputs" / "tiny"
    directory.mkdir(parents=True)
    with read_only(directory), pytest.raises(workspace.OutputError) as raised:
        workspace.write_json(directory / "r.json", {})
    assert str(raised.value).startswith(f"cannot write {directory / 'r.json'}: the directory is not writable")


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    with workspace.output_lock(tmp_path):
        holder = json.loads((tmp_path / workspace.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(workspace.OutputLockedError, match=rf"in use by another run \(pid {os.getpid()} on"):
            with workspace.output_lock(tmp_path, wait_s=0.2, poll_s=0.05):
                pass
    assert not (tmp_path / workspace.LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / workspace.LOCK_FILE).write_text(json.dumps(stale))
    with workspace.output_lock(tmp_path):
        assert json.loads((tmp_path / workspace.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("make, problem", [
    (lambda lock: lock.write_bytes(b"\xff\xfe\x00garbage"), "binary, not JSON text"),
    (lambda lock: lock.write_text(""), "empty"),
    (lambda lock: lock.write_text("{pid: 12"), "not JSON"),
    (lambda lock: lock.write_text("[1, 2]"), "a JSON list, not an object"),
    (lambda lock: lock.write_text(json.dumps({"pid": "abc", "host": socket.gethostname(), "started": "x"})),
     "a holder whose pid 'abc' is not a process id"),
    (lambda lock: lock.write_text(json.dumps({"pid": -1, "host": socket.gethostname(), "started": "x"})),
     "a holder whose pid -1 is not a process id"),  # os.kill(-1, 0) asks about every process: "alive"
    (lambda lock: lock.write_text(json.dumps({"pid": 2**70, "host": socket.gethostname(), "started": "x"})),
     "is not a process id"),
    (lambda lock: lock.write_text(json.dumps({"pid": 1})), "a holder without a host name and start time"),
    (lambda lock: lock.mkdir(), r"a folder .* \(rm -r "),
    (lambda lock: lock.symlink_to(lock.parent / "nowhere"), "a symbolic link"),
])
def test_a_lock_file_no_run_wrote_gets_the_locks_message_naming_what_is_wrong(tmp_path, make, problem):
    """Binary or list content, a non-integer pid and a folder raised UnicodeDecodeError, AttributeError,
    ValueError and IsADirectoryError; pid -1 or 0 passed for a live holder."""
    make(tmp_path / workspace.LOCK_FILE)
    with pytest.raises(workspace.OutputLockedError, match=rf"is locked by a file no colquant run wrote: .*{problem}"):
        with workspace.output_lock(tmp_path, wait_s=0.1, poll_s=0.05):
            pass
    assert (tmp_path / workspace.LOCK_FILE).exists() or (tmp_path / workspace.LOCK_FILE).is_symlink()


@pytest.mark.parametrize("wait_s", [float("nan"), -1.0, "10"])
def test_a_wait_that_is_no_number_of_seconds_is_refused(tmp_path, wait_s):
    """NaN never reached the deadline: a locked directory was waited on forever."""
    with pytest.raises(ValueError, match="pass the seconds to wait"):
        with workspace.output_lock(tmp_path, wait_s=wait_s):
            pass


def test_the_lock_is_readable_as_the_umask_allows(tmp_path):
    """It was tempfile's 0o600: another user's run could not read who holds the directory."""
    previous = os.umask(0o022)
    try:
        with workspace.output_lock(tmp_path) as lock:
            assert lock.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_calibration_files_of_other_settings_have_other_names(profile):
    first = workspace.calibration_file(profile, 256)
    assert first.suffix == ".safetensors" and first.parent == workspace.output_dir(profile) / "calibration"
    for section, key, value in (("calibration", "seed", 7), ("model", "dtype", "float32"), ("calibration", "nsamples", 3)):
        changed = {**profile, section: {**profile[section], key: value}}
        assert workspace.calibration_file(changed, 256) != first, key
    assert workspace.calibration_file({**profile, "calibration": {**profile["calibration"], "seqlens": [256]}}, 256) == first


def test_evaluation_fingerprint_changes_with_the_checkpoint_and_the_settings(profile, tmp_path):
    checkpoint = tmp_path / "variant"
    checkpoint.mkdir()
    (checkpoint / METADATA_FILE).write_text(json.dumps({"calibration": {"nsamples": 8}}))
    first = workspace.evaluation_fingerprint(profile, checkpoint)
    (checkpoint / METADATA_FILE).write_text(json.dumps({"calibration": {"nsamples": 4}}))  # re-quantized
    requantized = workspace.evaluation_fingerprint(profile, checkpoint)
    halved = {**profile, "model": {**profile["model"], "max_num_visual_tokens": profile["model"]["max_num_visual_tokens"] // 2}}
    exact = {**profile, "evaluation": {**profile["evaluation"], "scoring": "exact"}}
    assert len({first, requantized, workspace.evaluation_fingerprint(halved, checkpoint),
                workspace.evaluation_fingerprint(exact, checkpoint)}) == 4


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "variant"
    with workspace.atomic_directory(target) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), workspace.atomic_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise KeyboardInterrupt  # killed while writing the new one
    assert (target / "weights").read_text() == "old" and os.listdir(tmp_path) == ["variant"]
    with workspace.atomic_directory(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and os.listdir(tmp_path) == ["variant"]


def test_the_lock_creates_the_output_directory_it_guards(tmp_path):
    with workspace.output_lock(tmp_path / "outputs" / "tiny") as lock:
        assert lock.exists()


def test_stale_staging_folders_are_removed_and_finished_variants_kept(tmp_path):
    (tmp_path / ".w4a16-g128-sym-rtn.k2j3x_9a").mkdir()
    (tmp_path / ".w4a16-g128-sym-rtn.k2j3x_9a" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "w4a16-g128-sym-rtn").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()  # not a staging folder: kept
    assert [p.name for p in workspace.remove_stale_staging(tmp_path)] == [".w4a16-g128-sym-rtn.k2j3x_9a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ipynb_checkpoints", "w4a16-g128-sym-rtn"]
