"""fastrob.verify and fastrob.selfchecks: the record, the self-checks, auto's fallback from a kernel that
fails its check (planted here: a wrong and a raising Triton kernel, on CPU tensors through the Triton
interpreter, which the AUTO_KERNELS_ON_CPU hook makes auto treat as a GPU target) and `fastrob check`."""

import json
import warnings

import pytest
import torch
from op_checks import triton_runs_here

import fastrob.triton.sqnorm as triton_sqnorm
from fastrob import _backend, cli, selfchecks, verify
from fastrob.ops import pgd_step, pgd_step_reference, sqnorm, sqnorm_reference

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_runs_here(),
    reason="plants kernels on CPU tensors through the Triton interpreter",
)


@pytest.fixture
def cpu_target(monkeypatch, tmp_path):
    """auto treats CPU tensors as a GPU target; an empty record of the test's own; fresh caches."""
    monkeypatch.setattr(_backend, "AUTO_KERNELS_ON_CPU", True)
    monkeypatch.setattr(verify, "RECORD_PATH", tmp_path / "verified.json")
    monkeypatch.delenv("FASTROB_VERIFY", raising=False)
    verify.clear_cache()
    _backend.clear_auto_cache()
    yield tmp_path / "verified.json"
    verify.clear_cache()
    _backend.clear_auto_cache()


@pytest.fixture
def wrong_sqnorm(monkeypatch):
    """The Triton sqnorm forward, off by 1% (a kernel bug the self-check must catch)."""
    original = triton_sqnorm.sqnorm_forward

    def wrong(g, out):
        original(g, out)
        out.mul_(1.01)

    monkeypatch.setattr(triton_sqnorm, "sqnorm_forward", wrong)


def test_shipped_record_is_valid():
    record = json.loads(verify.RECORD_PATH.read_text())
    assert record["schema"] == verify.SCHEMA and isinstance(record["entries"], list)
    for entry in record["entries"]:
        assert {"op", "backend", "capability", "device", "torch", "triton", "date", "passed"} <= set(entry)
        assert entry["op"] in selfchecks.OPS and entry["backend"] in ("triton", "cuda") and entry["passed"]


def result(op, backend, passed, dtype="float32", device="cpu"):
    return selfchecks.CheckResult(op, backend, device, dtype, 0.0 if passed else 1.0, 0.0 if passed else 9.0, passed)


def test_record_entries_need_every_dtype_to_pass_and_replace_older_ones(tmp_path):
    path = tmp_path / "r.json"
    results = [
        result("sqnorm", "triton", True),
        result("sqnorm", "triton", True, "bfloat16"),
        result("pgd_step", "triton", True),
        result("pgd_step", "triton", False, "float16"),
    ]
    entries = verify.record_entries(results)
    assert [(e["op"], e["backend"], e["capability"]) for e in entries] == [("sqnorm", "triton", "interpreter")]
    assert "float32, bfloat16" in entries[0]["passed"][0]
    verify.write_record(entries, path)
    older = dict(entries[0], date="2000-01-01")
    other = dict(entries[0], op="bias_act", date="2000-01-01")
    path.write_text(json.dumps({"schema": 1, "entries": [older, other]}))
    verify.write_record(entries, path)
    written = verify.load_record(path)["entries"]
    assert sorted((e["op"], e["date"] != "2000-01-01") for e in written) == [("bias_act", False), ("sqnorm", True)]


def test_unreadable_record_is_empty(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="bad.json is not JSON"):
        assert verify.load_record(tmp_path / "bad.json")["entries"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing record is normal: no warning
        assert verify.load_record(tmp_path / "missing.json")["entries"] == []


GOOD_ENTRY = {
    "op": "sqnorm",
    "backend": "triton",
    "capability": "interpreter",
    "device": "CPU",
    "torch": "2.5",
    "triton": "3.1",
    "date": "2026-01-01",
    "passed": ["fastrob check float32"],
}
# (file contents, words of the warning): each malformed record is ignored after one warning
MALFORMED = [
    (b"{not json", "is not JSON"),
    (b"\xff\xfe{}", "is not JSON"),
    (b"[" * 100000, "is not JSON"),
    (b"[1]", "holds a list, not an object"),
    (b'{"entries": []}', "has schema null"),
    (b'{"schema": 2, "entries": []}', "has schema a number 2, and this fastrob reads schema 1"),
    (b'{"schema": true, "entries": []}', "has schema a boolean"),
    (b'{"schema": 1}', "has 'entries' null"),
    (b'{"schema": 1, "entries": {}}', "has 'entries' an object, not a list"),
    (b'{"schema": 1, "entries": [1]}', "entry 0 is a number 1, not an object"),
    (b'{"schema": 1, "entries": [{}]}', "entry 0 has 'op' null"),
    (
        json.dumps({"schema": 1, "entries": [GOOD_ENTRY, {**GOOD_ENTRY, "device": None}]}).encode(),
        "entry 1 has 'device'",
    ),
    (json.dumps({"schema": 1, "entries": [{**GOOD_ENTRY, "capability": 9.0}]}).encode(), "'capability' a number 9.0"),
    (json.dumps({"schema": 1, "entries": [{**GOOD_ENTRY, "passed": []}]}).encode(), "'passed' a list, not a non-empty"),
]


@pytest.mark.parametrize("contents, words", MALFORMED, ids=[words for _, words in MALFORMED])
def test_a_malformed_record_is_ignored_after_one_warning_naming_the_file(tmp_path, contents, words):
    path = tmp_path / "r.json"
    path.write_bytes(contents)
    with pytest.warns(RuntimeWarning) as caught:
        assert verify.load_record(path)["entries"] == []
    assert len(caught) == 1 and str(path) in str(caught[0].message) and words in str(caught[0].message)
    with pytest.warns(RuntimeWarning, match="it is ignored"):
        assert "none yet" in verify.describe_record(path)
    with pytest.warns(RuntimeWarning, match="it is ignored"):  # --record replaces a malformed record
        verify.write_record([GOOD_ENTRY], path)
    assert verify.load_record(path)["entries"] == [GOOD_ENTRY]


def test_fastrob_info_reports_a_malformed_record_in_one_line(monkeypatch, tmp_path, capsys):
    path = tmp_path / "verified.json"
    path.write_text('{"schema": 1, "entries": [{}]}')
    monkeypatch.setattr(verify, "RECORD_PATH", path)
    assert cli.main(["info"]) == 0
    captured = capsys.readouterr()
    assert "verified kernels (verified.json" in captured.out
    assert [line for line in captured.err.splitlines() if str(path) in line] == [
        f"fastrob: warning: the kernel record {path} entry 0 has 'op' null (or missing), not a non-empty string: "
        "it is ignored (backend='auto' self-checks each fused kernel before using it)"
    ]


@needs_interpreter
def test_auto_never_trusts_a_malformed_record(cpu_target, wrong_sqnorm):
    # the entry vouches for the (wrong) kernel but lacks its evidence: auto must self-check, and fall back
    cpu_target.write_text(json.dumps({"schema": 1, "entries": [{**GOOD_ENTRY, "passed": None}]}))
    with pytest.warns(RuntimeWarning) as caught:
        assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="sqnorm") == "torch"
    messages = [str(w.message) for w in caught]
    assert sum("it is ignored" in m for m in messages) == 1 and any("failed its self-check" in m for m in messages)
    verify.clear_cache()
    _backend.clear_auto_cache()
    cpu_target.write_text(json.dumps({"schema": 1, "entries": [GOOD_ENTRY]}))  # well formed: trusted as recorded
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="sqnorm") == "triton"


@needs_interpreter
def test_self_check_passes_for_the_kernels_and_catches_a_wrong_one(wrong_sqnorm):
    good = selfchecks.run_check("cross_entropy", "triton", "cpu", torch.float32)
    assert good.passed and good.verdict == "pass" and 0 <= good.ratio <= 1
    bad = selfchecks.run_check("sqnorm", "triton", "cpu", torch.float32)
    assert not bad.passed and bad.verdict == "MISMATCH" and bad.ratio > 1 and bad.max_error > 0


@needs_interpreter
def test_auto_uses_a_kernel_that_passes(cpu_target):
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="sqnorm") == "triton"
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="pgd_step") == "triton"  # pgd_step's check
    assert ("pgd_step", "triton", "cpu", torch.float32) in verify._checked


@needs_interpreter
def test_auto_falls_back_from_a_wrong_kernel_with_one_warning(cpu_target, wrong_sqnorm):
    g = torch.randn(4, 9)
    with pytest.warns(RuntimeWarning) as caught:
        out = sqnorm(g)
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1
    for words in ("sqnorm", "triton", "cpu", "float32", "uses torch instead"):
        assert words in messages[0]
    torch.testing.assert_close(out, sqnorm_reference(g), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(sqnorm(g), sqnorm_reference(g), rtol=0, atol=0)  # no second warning


@needs_interpreter
def test_auto_falls_back_from_a_kernel_that_raises(cpu_target, monkeypatch):
    import fastrob.triton.pgd_step as triton_pgd

    def broken(*args, **kwargs):
        raise RuntimeError("planted launch failure")

    monkeypatch.setattr(triton_pgd, "pgd_step", broken)
    x = torch.rand(2, 3, 4, 4)
    g = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match="planted launch failure"):
        out = pgd_step(x, g, x, alpha=0.1, eps=0.3)
    torch.testing.assert_close(out, pgd_step_reference(x, g, x, alpha=0.1, eps=0.3), rtol=0, atol=0)


@needs_interpreter
def test_verify_modes_and_the_record(cpu_target, wrong_sqnorm, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTROB_VERIFY", "0")  # trusted without a check, wrong as it is
    assert _backend.resolve("auto", cpu, torch.float32, op="sqnorm") == "triton"
    assert not verify._checked
    # a recorded (op, backend, capability) is used without a check ...
    entry = dict(
        op="sqnorm",
        backend="triton",
        capability="interpreter",
        device="x",
        torch="t",
        triton="t",
        date="d",
        passed=["planted"],
    )
    cpu_target.write_text(json.dumps({"schema": 1, "entries": [entry]}))
    monkeypatch.setenv("FASTROB_VERIFY", "1")
    verify.clear_cache()
    _backend.clear_auto_cache()
    assert _backend.resolve("auto", cpu, torch.float32, op="sqnorm") == "triton"
    assert not verify._checked
    # ... unless FASTROB_VERIFY=always
    monkeypatch.setenv("FASTROB_VERIFY", "always")
    _backend.clear_auto_cache()
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        assert _backend.resolve("auto", cpu, torch.float32, op="sqnorm") == "torch"
    monkeypatch.setenv("FASTROB_VERIFY", "sometimes")
    _backend.clear_auto_cache()
    with pytest.raises(ValueError, match="FASTROB_VERIFY"):
        _backend.resolve("auto", cpu, torch.float32, op="sqnorm")


def test_auto_stays_on_torch_for_cpu_tensors_without_the_hook():
    assert _backend.resolve("auto", torch.device("cpu"), torch.float32, op="sqnorm") == "torch"


@needs_interpreter
def test_check_command_table_exit_status_and_record(cpu_target, capsys, monkeypatch):
    path = cpu_target.parent / "out.json"
    assert cli.main(["check", "--op", "sqnorm", "--record", "--record-path", str(path)]) == 0
    out = capsys.readouterr().out
    assert "err/tol" in out and out.count("sqnorm") >= 3 and "3 of 3 checks passed" in out
    entries = verify.load_record(path)["entries"]
    assert [(e["op"], e["backend"], e["capability"]) for e in entries] == [("sqnorm", "triton", "interpreter")]
    # without --record-path, interpreter results are not written into the package's record
    assert cli.main(["check", "--op", "sqnorm", "--record"]) == 0
    assert verify.load_record()["entries"] == []
    original = triton_sqnorm.sqnorm_forward
    monkeypatch.setattr(triton_sqnorm, "sqnorm_forward", lambda g, out: (original(g, out), out.mul_(1.01)))
    assert cli.main(["check", "--op", "sqnorm"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_the_trust_policy_is_registered_into_backend_without_an_import_cycle():
    import ast
    import inspect

    assert _backend._trust_policy is verify.trusted
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(inspect.getsource(_backend)))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    # the argument checks only: no op, no verify, no selfchecks (which import the ops, which resolve here)
    assert {name for name in imported if name and name.startswith("fastrob")} == {"fastrob._checks"}, imported
