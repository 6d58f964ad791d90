"""fastrob._backend: detection is cached, explicit backends fail clearly, auto falls back quietly."""

import warnings

import pytest
import torch

from fastrob import _backend


def test_torch_is_always_available():
    st = _backend.status("torch")
    assert st.available and torch.__version__ in st.reason


def test_detection_is_cached():
    for name in ("torch", "triton", "cuda"):
        assert _backend.status(name) is _backend.status(name)


def test_every_unavailable_backend_says_why():
    for name in ("torch", "triton", "cuda"):
        st = _backend.status(name)
        assert st.reason, name


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', 'cuda', got 'gpu'"):
        _backend.resolve("gpu", torch.device("cpu"), torch.float32, op="x")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.status("gpu")


def fake_status(available: dict):
    return lambda name: _backend.BackendStatus(name, available.get(name, True), f"{name} fake reason")


def test_auto_prefers_cuda_then_triton_on_gpu_tensors(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_extension_runs_on_device", lambda device: True)
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": True, "triton": True}))
    assert _backend.resolve("auto", cuda, torch.float32, op="x") == "cuda"
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": False, "triton": True}))
    assert _backend.resolve("auto", cuda, torch.bfloat16, op="x") == "triton"
    # dtypes the kernels lack go to the reference without a fuss
    assert _backend.resolve("auto", cuda, torch.float64, op="x") == "torch"
    # a GPU the extension has no code for goes to Triton
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": True, "triton": True}))
    monkeypatch.setattr(_backend, "_extension_runs_on_device", lambda device: False)
    assert _backend.resolve("auto", cuda, torch.float32, op="x") == "triton"


@pytest.mark.parametrize(
    "capability, runs",
    [
        ((8, 0), True),
        ((8, 6), True),
        ((8, 9), True),  # sm_80 machine code runs on later 8.x
        ((9, 0), True),
        ((10, 0), True),
        ((12, 0), True),  # through the sm_90 PTX
        ((7, 5), False),
        ((7, 0), False),  # older than anything compiled
    ],
)
def test_extension_runs_on_compiled_archs(monkeypatch, capability, runs):
    monkeypatch.setattr(_backend, "extension_build_record", lambda: {"built": True, "archs": ["80", "90"]})
    assert _backend.extension_runs_on(capability) is runs


def test_extension_runs_nowhere_when_not_built(monkeypatch):
    monkeypatch.setattr(_backend, "extension_build_record", lambda: {"built": False, "reason": "test"})
    assert not _backend.extension_runs_on((9, 0))


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": False, "triton": False}))
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _backend.resolve("auto", torch.device("cuda"), torch.float32, op="x") == "torch"
    assert len(caught) == 1 and "cuda fake reason" in str(caught[0].message)


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": False}))
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: cuda fake reason"):
        _backend.resolve("cuda", torch.device("cuda"), torch.float32, op="x")


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.setattr(_backend, "status", fake_status({}))
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, got tensors on cpu"):
        _backend.resolve("cuda", torch.device("cpu"), torch.float32, op="x")


def test_auto_uses_the_registered_trust_policy(monkeypatch):
    from fastrob.selfchecks import CheckResult

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_extension_runs_on_device", lambda device: True)
    monkeypatch.setattr(_backend, "status", fake_status({"cuda": True, "triton": True}))
    asked = []

    def policy(op, backend, device, dtype):
        asked.append((op, backend))
        return None if backend == "triton" else CheckResult(op, backend, "cuda", "float32", 1.0, 9.0, False)

    monkeypatch.setattr(_backend, "_trust_policy", _backend._trust_policy)  # restored after the test
    _backend.set_trust_policy(policy)
    try:
        with pytest.warns(RuntimeWarning, match="the cuda kernel of my_op failed its self-check"):
            assert _backend.resolve("auto", cuda, torch.float32, op="my_op") == "triton"
        assert asked == [("my_op", "cuda"), ("my_op", "triton")]
        assert _backend.resolve("auto", cuda, torch.float32, op="my_op") == "triton"  # cached: asked once
        assert len(asked) == 2
        with pytest.raises(TypeError, match="policy must be callable"):
            _backend.set_trust_policy("trust me")
    finally:
        _backend.clear_auto_cache()


def test_ptx_only_where_the_build_record_says(monkeypatch):
    # TORCH_CUDA_ARCH_LIST="8.0;9.0" (no +PTX): nothing runs on a newer major than 9
    record = {"built": True, "archs": ["80", "90"], "ptx": []}
    monkeypatch.setattr(_backend, "extension_build_record", lambda: record)
    assert _backend.extension_runs_on((9, 0)) and not _backend.extension_runs_on((12, 0))
    record["ptx"] = ["80"]  # "8.0+PTX;9.0": PTX from sm_80 also serves newer GPUs
    assert _backend.extension_runs_on((12, 0))


@pytest.mark.parametrize(
    "driver, says",
    [
        (0, "no NVIDIA driver is installed"),
        (12080, "the NVIDIA driver supports CUDA up to 12.8, but fastrob._C was built with the CUDA 13.0 runtime"),
    ],
)
def test_cuda_status_tells_no_driver_from_an_old_driver(monkeypatch, driver, says):
    class Extension:
        cuda_runtime_version = 13000

        @staticmethod
        def device_count():
            return -1, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"

        @staticmethod
        def driver_version():
            return driver

    monkeypatch.setattr(_backend, "_load_extension", lambda: (Extension, ""))
    _backend.status.cache_clear()
    try:
        reason = _backend.status("cuda").reason
    finally:
        _backend.status.cache_clear()
    assert says in reason
