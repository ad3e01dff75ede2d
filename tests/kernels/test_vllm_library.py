"""Finding and loading vLLM's libraries (kernels/vllm_library.py): every refusal names what is needed, for
both libraries the project uses (Machete/Marlin/CUTLASS W4A8 in vllm_ops, FlashAttention-3 in fa3_ops)."""

import pytest
import torch

from colquant.kernels import fa3_ops, vllm_library, vllm_ops

LIBRARIES = [pytest.param(vllm_ops.LIBRARY, id="ops"), pytest.param(fa3_ops.LIBRARY, id="fa3")]


@pytest.fixture(params=LIBRARIES)
def library(request, monkeypatch):
    """A library with neither of its variables set, as on a machine that never heard of them."""
    monkeypatch.delenv(request.param.env, raising=False)
    monkeypatch.delenv(request.param.disable_env, raising=False)
    return request.param


@pytest.fixture
def stand_in_file(tmp_path):
    path = tmp_path / "library.so"
    path.write_bytes(b"not a shared object")
    return path


def test_missing_library_names_the_extra_and_the_variable(library, monkeypatch):
    monkeypatch.setattr(vllm_library.VllmLibrary, "path", lambda self: None)
    why = library.load_error()
    assert "colquant[vllm-kernels]" in why and library.env in why and "0.26.0" in why


def test_explicit_path_that_does_not_exist(library, monkeypatch, tmp_path):
    monkeypatch.setenv(library.env, str(tmp_path / "nope.so"))
    why = library.load_error()
    assert "does not exist" in why and library.relpath in why


def test_explicit_path_that_is_a_directory(library, monkeypatch, tmp_path):
    monkeypatch.setenv(library.env, str(tmp_path))
    assert "is a directory" in library.load_error()


def test_a_file_that_is_not_the_library_is_refused(library, monkeypatch, stand_in_file):
    monkeypatch.setenv(library.env, str(stand_in_file))
    monkeypatch.setattr(vllm_library, "environment_mismatch", lambda: None)  # as on the GPU image
    why = library.load_error()
    assert "failed to load" in why and "vllm 0.26.0" in why


def test_wrong_vllm_release_is_refused(library, monkeypatch, stand_in_file):
    monkeypatch.setattr(vllm_library.VllmLibrary, "path", lambda self: stand_in_file)
    monkeypatch.setattr(vllm_library, "installed_vllm_version", lambda: "0.25.1")
    why = library.load_error()
    assert "vllm 0.25.1 is installed" in why and "vllm==0.26.0" in why


def test_the_installed_release_is_found_without_importing_vllm(library, monkeypatch, tmp_path):
    """`path` locates the package (no import: vLLM's engine would come with it)."""
    package = tmp_path / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('imported')")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert library.path() == package / library.relpath


@pytest.mark.parametrize("torch_version, cuda, needed", [("2.13.0+cpu", None, "torch 2.11"),
                                                         ("2.11.0+cpu", None, "no CUDA (a CPU build)"),
                                                         ("2.11.0+cu128", "12.8", "CUDA 13")])
def test_wrong_torch_or_no_cuda_is_refused(library, monkeypatch, stand_in_file, torch_version, cuda, needed):
    monkeypatch.setenv(library.env, str(stand_in_file))
    monkeypatch.setattr(torch, "__version__", torch_version)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert needed in library.load_error()


def test_disabled_by_env(library, monkeypatch):
    monkeypatch.setenv(library.disable_env, "1")
    assert library.disable_env in library.load_error()


def test_each_module_caches_its_librarys_answer(monkeypatch):
    """The wrappers ask in every layer and block: the answer is computed once until `clear_cache`."""
    for module in (vllm_ops, fa3_ops):
        module.clear_cache()
        monkeypatch.setenv(module.DISABLE_ENV, "1")
        assert module.DISABLE_ENV in module.load_error()
        monkeypatch.delenv(module.DISABLE_ENV)
        assert module.DISABLE_ENV in module.load_error()  # cached
        module.clear_cache()
        assert module.load_error() is None or module.DISABLE_ENV not in module.load_error()



def test_a_switched_off_library_puts_no_release_in_the_tuned_tables_key(monkeypatch):
    vllm_ops.clear_cache()
    monkeypatch.setenv(vllm_ops.DISABLE_ENV, "1")
    try:
        assert vllm_ops.version() is None
    finally:
        vllm_ops.clear_cache()  # the next caller decides again, without the switch
