import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _autotune_cache_in_a_temporary_folder(tmp_path_factory):
    """Runs on the 'auto' backend cache kernel timings: keep the tests' out of the user's cache folder."""
    from spark_sparse.autotune import CACHE_DIR_ENV

    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("autotune-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
