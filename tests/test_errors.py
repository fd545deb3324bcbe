"""One error root (`tfrecords_tools.errors.StpError`) carrying the exit code, caught once at the CLI's edge."""

import importlib
import inspect
import pkgutil

import pytest

import stpkeras
import tfrecords_tools
from tfrecords_tools import errors, outputs
from tfrecords_tools.errors import EXIT_CODES, EXIT_OK, StpError
from videos import pattern_frames, write_video

# Exceptions that never leave their module: control-flow signals, caught where they are raised.
INTERNAL = {
    "tfrecords_tools.video.Replan",      # decoding found the plan wrong: the reader starts again with a new plan
    "stpkeras.serving._Retryable",       # wraps a ServingError for the retry loop, which raises the ServingError
}
# Modules of an optional extra (`stpkeras[beam]`) whose import needs a package this environment may lack.
OPTIONAL = {"apache_beam"}


def _exception_classes():
    found = {}
    for package in (tfrecords_tools, stpkeras):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] in OPTIONAL:
                    continue
                raise
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


CLASSES = _exception_classes()


def test_the_walk_finds_the_packages_exceptions():
    for name in ("tfrecords_tools.manifest.ManifestError", "tfrecords_tools.outputs.OutputBusyError",
                 "tfrecords_tools.convert.WriteError", "stpkeras.serving.ModelNotFound", "stpkeras.run_folder.RunError",
                 "stpkeras.artifacts.ArtifactError", "tfrecords_tools.video.Replan"):
        assert name in CLASSES, sorted(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_exception_derives_from_the_root_with_a_documented_exit_code(name):
    cls = CLASSES[name]
    if name in INTERNAL:
        assert not issubclass(cls, StpError), f"{name} is listed as internal but derives from StpError"
        return
    assert issubclass(cls, StpError), f"{name} derives from {[b.__name__ for b in cls.__mro__[1:]]}, not StpError"
    assert cls.exit_code in EXIT_CODES and cls.exit_code != EXIT_OK, (name, cls.exit_code)


def test_kinds_and_the_builtin_bases_callers_catch():
    from stpkeras.serving import BadRequest, ModelNotFound, RequestTooLarge, ServerUnavailable, ServingTimeout
    from stpkeras.train import RunError
    from tfrecords_tools.convert import ConvertError, StrictFailure, WriteError
    from tfrecords_tools.manifest import ManifestError, UnknownSplit
    from tfrecords_tools.sources import SourceError

    assert [c.exit_code for c in (errors.Stopped, errors.BadInput, errors.BadData, errors.NotNow)] == [1, 2, 3, 4]
    expected = {StrictFailure: 1, ConvertError: 2, SourceError: 2, RunError: 2, UnknownSplit: 2, ModelNotFound: 2,
                BadRequest: 2, RequestTooLarge: 2, outputs.OutputIsInputError: 2, ManifestError: 3,
                WriteError: 4, outputs.OutputBusyError: 4, ServerUnavailable: 4, ServingTimeout: 4}
    assert {cls: cls.exit_code for cls in expected} == expected
    # Library callers that caught the builtin (or the module's own) base still do.
    assert issubclass(ManifestError, ValueError) and issubclass(UnknownSplit, ManifestError)
    assert issubclass(RunError, RuntimeError) and issubclass(StrictFailure, ConvertError)
    assert errors.exit_code_of(ValueError("Invalid value for argument `x`")) == 2
    assert errors.exit_code_of(KeyError("x")) is None


def test_errors_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, tfrecords_tools.errors; print(sorted({'tensorflow', 'keras', 'click'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- one CLI test per kind: one `Error: ...` line on stderr, the kind's exit code, no traceback -------------


def _one_line(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_exits_2(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    _one_line(cli("convert", tmp_path / "empty", tmp_path / "out"), 2, f"{tmp_path / 'empty'}: no videos found")


def test_a_value_the_library_refuses_exits_2(tmp_path, cli):
    (tmp_path / "src").mkdir()
    _one_line(cli("convert", tmp_path / "src", tmp_path / "out", "--pixels", "yuv440", "--encoding", "jpeg"), 2,
              "encoding='jpeg'")


def test_bad_data_exits_3(tmp_path, cli):
    _one_line(cli("inspect", tmp_path), 3, f"{tmp_path / 'dataset.json'}: no manifest")
    (tmp_path / "dataset.json").write_text("{not json")
    _one_line(cli("verify", tmp_path), 3, "not valid JSON")


def test_not_now_exits_4(tmp_path, cli):
    import os

    with outputs.writing(str(tmp_path), command="stp convert (test)"):
        _one_line(cli("verify", tmp_path), 4, f"being written by PID {os.getpid()}")


def test_strict_stops_at_the_first_failure_with_exit_1(tmp_path, cli):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.mp4").write_text("not a video")
    result = cli("convert", tmp_path / "src", tmp_path / "out", "--strict", "--quiet")
    _one_line(result, 1, "--strict: ", "broken.mp4")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_training_on_a_folder_whose_every_video_failed_says_so(tmp_path, cli):
    # It once met the task's check first: "task enhance needs clean/degraded pairs", though the folder had none.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.mp4").write_text("not a video")
    assert cli("convert", tmp_path / "src", tmp_path / "data", "--pairs", "h264:37", "--quiet").exit_code == 1
    for task in ("classify", "enhance"):
        _one_line(cli("train", tmp_path / "data", "--out", tmp_path / f"run-{task}", "--task", task), 2,
                  f"{tmp_path / 'data'}: no records to train on (1 of 1 videos failed to convert, 0 skipped;")
    # A video too short for the patch is skipped, not failed: the line counts it so.
    write_video(str(tmp_path / "short" / "a.mp4"), pattern_frames(4, 32, 32))
    assert cli("convert", tmp_path / "short", tmp_path / "short-data", "--patch", "8x16x16", "--quiet").exit_code == 1
    _one_line(cli("train", tmp_path / "short-data", "--out", tmp_path / "run-short"), 2,
              "no records to train on (0 of 1 videos failed to convert, 1 skipped;")


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stpkeras.cli import main
    from tfrecords_tools import manifest

    def broken(root):
        raise KeyError("a bug")

    monkeypatch.setattr(manifest, "read_manifest", broken)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
