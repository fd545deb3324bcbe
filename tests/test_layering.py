"""Layering: `tfrecords_tools` never imports Keras; `stp --help` stays cheap (no TensorFlow).

A plain `'keras' in sys.modules` check cannot tell who imported Keras: TensorFlow 2.21's own
`tensorflow/__init__.py` eagerly imports `keras.src.optimizers` whenever Keras is installed. So the
conversion runs in a fresh interpreter where every import of Keras is refused and its importer noted:
the conversion and verification must still work, and the only importer may be TensorFlow itself.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import tfrecords_tools

PACKAGE = Path(tfrecords_tools.__file__).parent

CONVERT_WITHOUT_KERAS = textwrap.dedent("""
    import json, sys, traceback

    ATTEMPTS = []

    class RefuseKeras:
        # Refuses every import of Keras and notes the file that asked; lets mere look-ups
        # (importlib.util.find_spec, which TensorFlow uses to find paths) through.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in ("keras", "tf_keras"):
                return None
            stack = traceback.extract_stack()[:-1]
            if stack[-2].name != "_find_and_load_unlocked":
                return None
            callers = [f.filename for f in stack if "importlib" not in f.filename and not f.filename.startswith("<")]
            ATTEMPTS.append([name, callers[-1] if callers else "?"])
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the layering test)", name=name)

    sys.meta_path.insert(0, RefuseKeras())
    import tfrecords_tools
    from tfrecords_tools import convert, manifest, patches, schema, shards, sources, spec, verify, video
    from tfrecords_tools.convert import ConvertConfig
    m = convert.convert(ConvertConfig(src=sys.argv[1], out=sys.argv[2], spec=spec.PatchSpec(4, 32, 32)))
    report = verify.verify(sys.argv[2])
    print(json.dumps({"patches": m["counts"]["patches"], "verified": report.ok, "attempts": ATTEMPTS,
                      "loaded": sorted(k for k in sys.modules if k.split(".")[0] in ("keras", "tf_keras")),
                      "tensorflow": "tensorflow" in sys.modules}))
""")


def test_no_module_of_tfrecords_tools_mentions_keras():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr == "keras":
                names = ["keras"]  # tf.keras
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in ("keras", "tf_keras", "stpkeras")], \
                f"{path.name}:{node.lineno} imports {names}"


def test_converting_and_verifying_works_with_keras_refused(tmp_path, clip64):
    src = tmp_path / "src"
    src.mkdir()
    (src / "v.mp4").write_bytes(Path(clip64.path).read_bytes())
    proc = subprocess.run([sys.executable, "-c", CONVERT_WITHOUT_KERAS, str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["patches"] == 24 and out["verified"] and out["tensorflow"]
    assert out["loaded"] == []
    importers = {Path(f).as_posix() for _, f in out["attempts"]}
    assert all("/site-packages/tensorflow/" in f for f in importers), importers
    assert not [f for f in importers if str(PACKAGE.as_posix()) in f]


def test_cli_help_imports_neither_tensorflow_nor_keras():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom stpkeras.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = proc.stdout.split()
    assert "stpkeras.cli" in modules
    assert [m for m in modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")] == []


WORKER_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import json, sys
    from tfrecords_tools import convert, sources, spec
    source = sources.read_source(sys.argv[1])
    item = source.items[0]
    cfg = convert.ConvertConfig(src=sys.argv[1], out=sys.argv[2], spec=spec.PatchSpec(4, 32, 32))
    result = convert.convert_video(item, convert.item_fields(item, source), cfg, sys.argv[3])
    print(json.dumps({"status": result["status"], "patches": result["patches"],
                      "tensorflow": sorted(k for k in sys.modules if k.split(".")[0] == "tensorflow")}))
""")


def test_a_conversion_worker_writes_raw_records_without_tensorflow(tmp_path, clip64):
    """A spawned conversion worker that imported TensorFlow would spend ~2 s of CPU before its first video;
    raw records and their TFRecord framing need only numpy, PyAV and google-crc32c."""
    import tensorflow as tf

    from tfrecords_tools import schema

    src = tmp_path / "src"
    src.mkdir()
    (src / "v.mp4").write_bytes(Path(clip64.path).read_bytes())
    chunk = tmp_path / "chunk.tfrecord"
    proc = subprocess.run([sys.executable, "-c", WORKER_WITHOUT_TENSORFLOW, str(src), str(tmp_path / "out"),
                           str(chunk)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"status": "ok", "patches": 24, "tensorflow": []}
    # TensorFlow reads the chunk, CRCs checked, and finds the patches of the video in grid order.
    records = [schema.parse_patch_numpy(r.numpy()) for r in tf.data.TFRecordDataset(str(chunk))]
    assert len(records) == 24
    assert [tuple(r[schema.OFFSET]) for r in records[:3]] == [(0, 0, 0), (0, 0, 32), (0, 32, 0)]


# --- imports go one way: no cycles among stpkeras modules, no borrowing of private names -----------

ROOT = PACKAGE.parent
PACKAGES = ("stpkeras", "tfrecords_tools")


def _modules():
    """{module name: parsed source} for every module of both packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(name, tree, modules):
    """(imported module, imported names) for every import of our packages in `tree`, in functions too."""
    package = name if name in PACKAGES or any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from stpkeras import artifacts` imports the submodule; `from x import name` the module x.
                yield (sub, ()) if sub in modules else (base, (alias.name,))


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    borrowed = []
    for name, tree in modules.items():
        for target, names in _imports(name, tree, modules):
            borrowed += [f"{name}: from {target} import {n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
        # `module._name` on a module of ours that was imported whole (`from stpkeras import train as t`).
        aliases = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in n.names})
            elif isinstance(n, ast.ImportFrom) and n.module:
                aliases.update({a.asname or a.name: f"{n.module}.{a.name}" for a in n.names})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases.get(node.value.id) in modules):
                borrowed.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert not borrowed, borrowed


def test_no_import_cycles_among_stpkeras_modules():
    """Function-level imports count: a cycle through a lazy import is still two modules that need each other."""
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, tree, modules) if t.startswith("stpkeras") and t != name}
             for name, tree in modules.items() if name.startswith("stpkeras")}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and len(path) > 1:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    # A package's __init__ importing its own submodules (which import each other through it) is how a
    # package works, not a cycle.
    def within_a_package(cycle):
        names = cycle.split(" -> ")
        return any(all(m == p or m.startswith(p + ".") for m in names) for p in names if p in packages)

    packages = {n for n in modules if any(m.startswith(n + ".") for m in modules)}
    cycles = [c for c in cycles if not within_a_package(c)]
    assert not sorted(set(cycles)), sorted(set(cycles))[:10]
