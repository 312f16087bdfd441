"""Untrusted files: no code path unpickles anything.

1. An AST scan of every module under src/multilora for the ways Python runs code hidden in data:
   pickle-family imports, `torch.load` without `weights_only=True`, builtin eval/exec/compile,
   `trust_remote_code=True` (as an argument or a default), `yaml.load` without a safe loader /
   `yaml.unsafe_load`, `numpy.load(allow_pickle=True)`, `pandas.read_pickle`. A self-test feeds the
   scanner a snippet of each pattern, so a scanner that stopped seeing one fails.
2. A PEFT adapter that has only `adapter_model.bin` (a pickle) is refused by every entry point that
   takes a PEFT adapter, with a message that says why and how to convert it, and the .bin is never
   opened (torch.load / pickle / open of the file all fail the test).
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

import multilora
from multilora.analyze import analyze_run
from multilora.cli import main
from multilora.errors import MultiLoRAError
from multilora.evaluate import resolve_target
from multilora.peft_import import import_peft

CAT = "untrusted input"
PACKAGE = Path(multilora.__file__).resolve().parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle", "jsonpickle"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


# ----------------------------------------------------------------------------- the scanner


def _dotted(node: ast.AST) -> str:
    """'torch.load' for Attribute(Name('torch'), 'load'); '' if not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.findings: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> fully qualified ('th' -> 'torch', 'load' -> 'torch.load')

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {what}")

    def qualified(self, func: ast.AST) -> str:
        name = _dotted(func)
        head, _, rest = name.partition(".")
        head = self.aliases.get(head, head)
        return f"{head}.{rest}" if rest else head

    # imports --------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in PICKLE_MODULES:
                self.flag(node, f"imports {a.name}")
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in PICKLE_MODULES:
            self.flag(node, f"imports from {module}")
        for a in node.names:
            if a.name in PICKLE_MODULES:
                self.flag(node, f"imports {a.name} from {module}")
            if module:
                self.aliases[a.asname or a.name] = f"{module}.{a.name}"
        self.generic_visit(node)

    # calls ----------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualified(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ("torch.load", "torch.serialization.load") and not _is_true(kw.get("weights_only")):
            self.flag(node, "torch.load without weights_only=True")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile") \
                and node.func.id not in self.aliases:
            self.flag(node, f"builtin {node.func.id}()")
        if name in ("builtins.eval", "builtins.exec", "builtins.compile"):
            self.flag(node, f"{name}()")
        if name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            self.flag(node, f"{name}()")
        if name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                self.flag(node, f"{name}() without a safe Loader")
        if _is_true(kw.get("allow_pickle")):
            self.flag(node, f"{name or 'call'}(allow_pickle=True)")
        if name.rsplit(".", 1)[-1] == "read_pickle":
            self.flag(node, f"{name}()")
        if _is_true(kw.get("trust_remote_code")):
            self.flag(node, "trust_remote_code=True passed")
        self.generic_visit(node)

    # defaults and literals ------------------------------------------------------------------
    def _check_defaults(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        positional = args.posonlyargs + args.args
        for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
            if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):
                self.flag(node, f"trust_remote_code defaults to {ast.unparse(default)}")
        for arg, default in zip(args.kwonlyargs, args.kw_defaults):
            if arg.arg == "trust_remote_code" and default is not None \
                    and not (isinstance(default, ast.Constant) and default.value is False):
                self.flag(node, f"trust_remote_code defaults to {ast.unparse(default)}")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._check_defaults(node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._check_defaults(node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:  # dataclass field `trust_remote_code: bool = True`
        if isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code" and _is_true(node.value):
            self.flag(node, "trust_remote_code = True default")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if _is_true(node.value) and any(isinstance(t, ast.Name) and t.id == "trust_remote_code" for t in node.targets):
            self.flag(node, "trust_remote_code = True")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:  # {"trust_remote_code": True} handed to from_pretrained
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v):
                self.flag(node, '{"trust_remote_code": True}')
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in `source` that could run code hidden in a file (see the module docstring)."""
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.findings


# ----------------------------------------------------------------------------- the scan


def test_package_has_no_code_path_that_unpickles_or_runs_remote_code(tally):
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 15 and (PACKAGE / "checkpoint.py") in files and any(f.parent.name == "tasks" for f in files)
    findings = []
    for f in files:
        findings += scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
        tally(CAT, "AST scan: src/multilora modules")
    assert not findings, "code that may unpickle or run untrusted code:\n" + "\n".join(findings)


BAD_SNIPPETS = {
    "import pickle": "import pickle\n",
    "import pickle as pk": "import pickle as pk\n",
    "from pickle import loads": "from pickle import loads\n",
    "import cPickle": "import cPickle\n",
    "import _pickle": "import _pickle\n",
    "import dill": "import dill\n",
    "import joblib": "import joblib\n",
    "from joblib import load": "from joblib import load\n",
    "import marshal": "import marshal\n",
    "import shelve": "import shelve\n",
    "import cloudpickle": "import cloudpickle\n",
    "torch.load(f)": "import torch\ntorch.load(f)\n",
    "torch.load(weights_only=False)": "import torch\ntorch.load(f, weights_only=False)\n",
    "torch.load(weights_only=flag)": "import torch\ntorch.load(f, weights_only=flag)\n",
    "th.load(f)": "import torch as th\nth.load(f)\n",
    "from torch import load": "from torch import load\nload(f)\n",
    "from torch import load as tl": "from torch import load as tl\ntl(f, map_location='cpu')\n",
    "torch.serialization.load": "import torch\ntorch.serialization.load(f)\n",
    "eval()": "x = eval(text)\n",
    "exec()": "exec(code)\n",
    "compile()": "c = compile(src, 'f', 'exec')\n",
    "builtins.eval()": "import builtins\nbuiltins.eval('1')\n",
    "eval inside a function": "def f(s):\n    return [eval(x) for x in s]\n",
    "trust_remote_code=True argument": "AutoModel.from_pretrained(p, trust_remote_code=True)\n",
    "trust_remote_code default True": "def load(p, trust_remote_code=True):\n    pass\n",
    "trust_remote_code kw-only default True": "def load(p, *, trust_remote_code: bool = True):\n    pass\n",
    "trust_remote_code default from a name": "def load(p, trust_remote_code=TRUST):\n    pass\n",
    "trust_remote_code dataclass field": "class C:\n    trust_remote_code: bool = True\n",
    "trust_remote_code assignment": "trust_remote_code = True\n",
    "trust_remote_code in a dict": "kw = {'trust_remote_code': True}\n",
    "trust_remote_code in a method": "class M:\n    def load(self, trust_remote_code=True):\n        pass\n",
    "yaml.load(f)": "import yaml\nyaml.load(f)\n",
    "yaml.load(Loader=yaml.Loader)": "import yaml\nyaml.load(f, Loader=yaml.Loader)\n",
    "yaml.load(f, yaml.FullLoader)": "import yaml\nyaml.load(f, yaml.FullLoader)\n",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load(f)\n",
    "yaml.full_load": "import yaml\nyaml.full_load(f)\n",
    "yaml.load_all(f)": "import yaml\nyaml.load_all(f)\n",
    "numpy.load(allow_pickle=True)": "import numpy\nnumpy.load(f, allow_pickle=True)\n",
    "np.load(allow_pickle=True)": "import numpy as np\nnp.load(f, allow_pickle=True)\n",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle(f)\n",
}

GOOD_SNIPPET = textwrap.dedent("""
    import re, yaml, torch, numpy as np
    from safetensors.torch import load_file
    pattern = re.compile(r"a+")              # re.compile is not the builtin compile
    state = torch.load(f, weights_only=True)
    cfg = yaml.safe_load(text)
    cfg2 = yaml.load(text, Loader=yaml.SafeLoader)
    cfg3 = yaml.load(text, yaml.CSafeLoader)
    arr = np.load(f)
    arr2 = np.load(f, allow_pickle=False)
    tensors = load_file(path)
    def load_model(name, trust_remote_code=False, *, dtype=None):
        return AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    class Options:
        trust_remote_code: bool = False
    text = "import pickle; eval(x)"          # strings are data, not code
    model.eval()                             # nn.Module.eval is a method, not the builtin
""")


@pytest.mark.parametrize("what", list(BAD_SNIPPETS))
def test_scanner_flags_each_forbidden_pattern(what, tally):
    findings = scan_source(BAD_SNIPPETS[what])
    tally(CAT, "AST scan self-test: patterns flagged", failures=0 if findings else 1)
    assert findings, f"the scanner missed: {what}"


def test_scanner_passes_safe_code(tally):
    assert scan_source(GOOD_SNIPPET) == []
    tally(CAT, "AST scan self-test: safe code passes")


def test_scanner_sees_the_real_sources():
    """The scan would see a forbidden line added to a real module (not just to snippets)."""
    source = (PACKAGE / "checkpoint.py").read_text(encoding="utf-8")
    assert scan_source(source) == []
    assert scan_source(source + "\nimport pickle\n")
    assert scan_source(source.replace("load_file(str(weights))", "torch.load(str(weights))", 1))


# ----------------------------------------------------------------------------- pickled PEFT adapters


class _Opened(AssertionError):
    pass


def install_guard(monkeypatch) -> None:
    """Make torch.load, pickle loading, and opening a *.bin / *.pkl file for reading raise _Opened."""
    def refuse(name):
        def boom(*args, **kwargs):
            raise _Opened(f"{name} was called: a pickle was about to be loaded")
        return boom

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", refuse("torch.serialization.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and str(file).endswith((".bin", ".pkl")) and "r" in mode:
            raise _Opened(f"{file} was opened")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.fixture
def never_unpickle(monkeypatch):
    """Fail the test if anything unpickles, or opens a file named *.bin / *.pkl for reading."""
    install_guard(monkeypatch)


@pytest.fixture(scope="module")
def pickled_peft(tiny_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter folder whose weights are only adapter_model.bin (a real torch.save pickle)."""
    peft = pytest.importorskip("peft")
    from multilora.models import load_model

    model, _ = load_model(str(tiny_dir))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("pickled") / "adapter"
    model.save_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), folder / "adapter_model.bin")  # what older peft wrote
    weights.unlink()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    return folder


WHY = ("adapter_model.bin", "pickle", "never loads pickles", "arbitrary code")
HOW = ("safe_serialization=True", "adapter_model.safetensors")


def _check_message(msg: str, folder: Path) -> None:
    assert str(folder) in msg, msg
    for needle in WHY + HOW:
        assert needle in msg, f"{needle!r} not in {msg}"


def test_pickled_peft_adapter_is_refused_by_every_entry_point(pickled_peft, tiny_dir, tmp_path, capsys,
                                                               never_unpickle, tally):
    from conftest import make_tiny

    from multilora.checkpoint import load_adapter, read_adapter
    from multilora.export import export_peft

    entries = {
        "import_peft": lambda: import_peft(pickled_peft, tmp_path / "ours"),
        "resolve_target": lambda: resolve_target(str(pickled_peft)),
        "resolve_target --model": lambda: resolve_target(str(pickled_peft), str(tiny_dir)),
        "analyze_run": lambda: analyze_run(pickled_peft),
        "read_adapter": lambda: read_adapter(pickled_peft),
        "load_adapter": lambda: load_adapter(make_tiny("llama"), pickled_peft),
        "export_peft": lambda: export_peft(pickled_peft, tmp_path / "peft"),
    }
    for name, fn in entries.items():
        with pytest.raises(MultiLoRAError) as e:
            fn()
        _check_message(str(e.value), pickled_peft)
        tally(CAT, f"{name}: PEFT adapter_model.bin only")
    argvs = {
        "import-peft": ["import-peft", pickled_peft, "--out", tmp_path / "ours"],
        "eval": ["eval", pickled_peft, "--tasks", "rte", "--limit", "1", "--out", tmp_path / "eval.json"],
        "analyze": ["analyze", pickled_peft, "--out", tmp_path / "analysis"],
        "export": ["export", pickled_peft, "--out", tmp_path / "peft"],
        "export merged": ["export", pickled_peft, "--format", "merged", "--model", tiny_dir, "--out", tmp_path / "m"],
    }
    for name, argv in argvs.items():
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"multilora {argv[0]}: error: "), err
        _check_message(lines[0], pickled_peft)
        tally(CAT, f"multilora {name}: PEFT adapter_model.bin only")
    assert not any(p.exists() for p in (tmp_path / "ours", tmp_path / "eval.json", tmp_path / "analysis",
                                         tmp_path / "peft", tmp_path / "m"))


def test_the_suggested_conversion_works(pickled_peft, tmp_path, tally):
    """The message's recipe (torch.load(weights_only=True) -> save_file) gives a folder that imports."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "converted"
    shutil.copytree(pickled_peft, d)
    save_file(torch.load(d / "adapter_model.bin", weights_only=True), str(d / "adapter_model.safetensors"))
    import_peft(d, tmp_path / "ours")  # safetensors present: the .bin is ignored, the import works
    resolve_target(str(d))
    tally(CAT, "import_peft: converted adapter imports")


def test_never_unpickle_guard_bites(pickled_peft):
    """The guard above really stops a load of the .bin (so the refusals are not vacuous)."""
    with pytest.MonkeyPatch.context() as mp:
        install_guard(mp)
        with pytest.raises(_Opened):
            torch.load(pickled_peft / "adapter_model.bin", weights_only=True)
        with pytest.raises(_Opened), open(pickled_peft / "adapter_model.bin", "rb"):
            pass


def test_resume_loads_checkpoint_state_only_with_weights_only(tiny_dir, tmp_path, monkeypatch, tally):
    """accelerate keeps optimizer/scheduler/RNG state as torch pickles; resuming must read them only
    through torch.load(weights_only=True) (the restricted unpickler), never a plain unpickle."""
    from multilora.config import load_config
    from multilora.train import train

    run = tmp_path / "run"
    args = {"model": str(tiny_dir), "method": "lora", "output_dir": str(run), "data.tasks": "[rte]",
            "data.max_len": 48, "data.eval_examples": 0, "adapter.targets": "[q_proj]", "adapter.r": 2,
            "train.max_steps": 1, "train.batch_size": 2, "train.save_every": 1, "train.eval_every": 0,
            "train.cpu": "true"}
    train(load_config(None, [x for k, v in args.items() for x in (f"--{k}", str(v))]), progress=False)
    real = torch.load
    seen = []

    def checked(*a, **kw):
        assert kw.get("weights_only") is True, f"torch.load({a[0] if a else ''}) without weights_only=True"
        seen.append(str(a[0]) if a else "")
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", checked)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called on resume"))
    args["train.max_steps"] = 2
    train(load_config(None, [x for k, v in args.items() for x in (f"--{k}", str(v))]), resume=run, progress=False)
    assert seen, "resume read no optimizer state at all?"
    tally(CAT, "train resume: torch.load weights_only")


def test_model_folder_with_only_pickled_weights_is_refused(tiny_dir, tmp_path, never_unpickle, tally):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # any bytes: it must never be opened
    try:
        with pytest.raises(MultiLoRAError) as e:
            resolve_target(str(folder))
        msg = str(e.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg, msg
    except BaseException:
        tally(CAT, "resolve_target: model folder with .bin only", failures=1)
        raise
    tally(CAT, "resolve_target: model folder with .bin only")
