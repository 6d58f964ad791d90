"""fastrob._C: built whenever nvcc was there at install time, and importable without a GPU."""

import os
import shutil

import pytest

from fastrob import _backend


def test_extension_imports_when_built():
    record = _backend.extension_build_record()
    if not record.get("built"):
        pytest.skip(f"fastrob._C was not built: {record.get('reason')}")
    ext = _backend.extension()
    for name in ("pgd_step_linf", "pgd_step_l2", "pgd_step_l2_workspace_floats", "device_count"):
        assert hasattr(ext, name), name
    count, why = ext.device_count()
    assert count > 0 or why  # no GPU: the runtime's reason, not a crash
    assert ext.cuda_runtime_version >= 11000


def test_extension_was_built_when_nvcc_is_here():
    """A silently failed build would leave only the torch and Triton backends; with nvcc on the
    machine and no FASTROB_CUDA=0, the install must have produced the extension."""
    if os.environ.get("FASTROB_CUDA") == "0" or not shutil.which("nvcc"):
        pytest.skip("nvcc is absent or the build was switched off")
    record = _backend.extension_build_record()
    assert record.get("built"), record.get("reason")
    assert record["archs"], "no target architectures recorded"


def test_l2_workspace_only_for_large_samples():
    if not _backend.extension_build_record().get("built"):
        pytest.skip("fastrob._C was not built")
    ext = _backend.extension()
    assert ext.pgd_step_l2_workspace_floats(256, 3 * 32 * 32) == 0  # a CIFAR sample fits one block
    # an ImageNet-sized sample needs per-chunk partial sums (three per chunk)
    floats = ext.pgd_step_l2_workspace_floats(256, 3 * 224 * 224)
    assert floats > 0 and floats % (256 * 3) == 0


def test_extension_status_explains_missing_gpu():
    st = _backend.status("cuda")
    if not st.available:
        assert "fastrob._C" in st.reason
