"""Docs cannot rot: the commands, scenario keys, links and names README.md and docs/*.md show.

Commands. Every fenced ```bash block is split into commands with shlex (quotes, comments,
`\\` continuations, `&&`, `;`, a trailing `&`, `>`/`>>` into a file; a pipe fails the test).
Each command is handled in one of three ways, and `test_every_command_is_accounted_for` lists
which (run with `-s` to see the table). Nothing is skipped silently:

* **run**: cheap `edgeddl` commands (`run`, `validate`, `scenarios`, `profiles`, `compare`,
  `export`, `keys`, `ledger`, `infer plan`, `infer run`, `infer quantize`) run in-process
  through `edgeddl.cli.main.main`, in page order, in a fresh folder per page: a page's later
  commands use what its earlier ones made (`compare runs/star runs/ring`). A ```toml block
  tagged `file=NAME` is written to NAME there when its turn comes. Runs are shortened: the
  test appends `--set train.num_steps=2 --quiet` to `edgeddl run` and `--steps 2 --samples 16
  --this-machine pc` to `infer quantize`. `RUN_DIR` stands for a copy of one secured run
  stopped by SIGINT after its first step, made once for the module, so `run --resume` and
  `ledger verify` have something real to work on. Each command must exit 0.
* **parse**: the arguments go through the real argparse parser (the one `main` builds)
  without running anything, and a bundled scenario with its `--set` overrides goes through
  the real loader. This is what happens to the multi-process real-fleet commands
  (`edgeddl coordinator`, `edgeddl device`, `torchrun ... -m edgeddl device`, `infer run
  --processes`: tests/integration runs real fleets), to `edgeddl calibrate` (it times
  ResNet-32 on this machine for seconds), and to illustrations with placeholders
  (`COORDINATOR_HOST:29400`). torchrun's own options go through torchrun's parser.
* **other**: `pip install` and `python -m pip install` (the extras and pins they name must be
  pyproject.toml's), `python -m pytest` (its `-m` markers must be declared), `python
  benchmarks/X.py` (the script exists and declares every option shown; benchmarks take
  minutes, so none runs), `tensorboard` (a viewer that serves until stopped: listed only).
  Any other program fails the test.

Also checked: the command synopsis in docs/scenarios.md (every option it shows exists, and
every option of every subcommand is shown); every key of every ```toml block is a scenario
key, and docs/scenarios.md's reference block shows every key there is and loads; ```python
blocks compile and the `edgeddl.NAME` they use exist; links between pages and to files
resolve, anchors included (http links are not fetched); file paths in inline code exist
(under the repository or src/edgeddl/); `edgeddl.x.y` names import; CamelCase names
(`SimNetwork`, `Receiver.open`) are defined in src/edgeddl. benchmarks/README.md gets the same
static checks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import re
import shlex
import shutil
import signal
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import edgeddl
from edgeddl.cli import main as cli
from edgeddl.config.loader import bundled_names, load_scenario, scenario_from_dict
from edgeddl.config.schema import Scenario
from edgeddl.report.recorder import RunRecorder

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "edgeddl"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
STATIC_ONLY = ["benchmarks/README.md"]  # its commands are benchmarks of minutes: none runs
REFERENCE_PAGE = "docs/scenarios.md"  # the synopsis and the block with every scenario key

RUN_DIR = "RUN_DIR"
PLACEHOLDER = re.compile(r"(?<![A-Za-z])[A-Z][A-Z_]{2,}(?![A-Za-z])")
PARSE_ONLY = {
    ("coordinator",): "a real fleet's coordinator: serves device processes until the run ends "
    "(tests/integration runs real fleets)",
    ("device",): "a device process of a real fleet (tests/integration runs real fleets)",
    ("calibrate",): "times ResNet-32 steps on this machine for several seconds",
}
PROCESSES = "one process per device (tests/integration/test_inference_processes.py runs them)"
SHORTER = {
    ("run",): ["--set", "train.num_steps=2", "--quiet"],
    ("infer", "quantize"): ["--steps", "2", "--samples", "16", "--this-machine", "pc"],
}
OTHER_PROGRAMS = {"tensorboard": "TensorBoard's viewer: a server that runs until stopped"}


# ---- Reading the pages ------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    info: dict[str, str]
    text: str


@dataclass
class Command:
    page: str
    line: int
    argv: list[str]
    stdout: str = ""  # a file the output goes to (`>`, `>>`)
    append: bool = False

    def __str__(self) -> str:
        into = f" {'>>' if self.append else '>'} {self.stdout}" if self.stdout else ""
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}{into}"


@dataclass
class Page:
    name: str
    blocks: list[Block] = field(default_factory=list)
    prose: str = ""  # the page with its fenced blocks blanked out
    headings: list[str] = field(default_factory=list)


def read_page(name: str) -> Page:
    page = Page(name)
    fence = re.compile(r"^(\s*)```(\S*)\s*(.*)$")
    prose: list[str] = []
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = fence.match(lines[i])
        if not m:
            prose.append(lines[i])
            if h := re.match(r"^#{1,6}\s+(.*?)\s*$", lines[i]):
                page.headings.append(h[1])
            i += 1
            continue
        indent, lang, rest = m.groups()
        info = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
        body: list[str] = []
        j = i + 1
        while not lines[j].strip().startswith("```"):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        page.blocks.append(Block(name, i + 1, lang, info, "\n".join(body) + "\n"))
        prose.extend([""] * (j - i + 1))
        i = j + 1
    page.prose = "\n".join(prose)
    return page


def bash_commands(block: Block) -> list[Command]:
    """The block's commands, as a shell would split them (no pipes: nothing uses them)."""
    logical: list[tuple[int, str]] = []  # (first line, the line with its continuations)
    text, start = "", 0
    for n, raw in enumerate(block.text.splitlines(), start=block.line + 1):
        if not text:
            start = n
        if raw.rstrip().endswith("\\"):
            text += raw.rstrip()[:-1] + " "
            continue
        logical.append((start, text + raw))
        text = ""
    commands: list[Command] = []
    for n, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        current: list[str] = []
        redirect: tuple[str, bool] = ("", False)
        k = 0
        while k < len(tokens):
            tok = tokens[k]
            if tok in ("&&", ";", "&"):
                if current:
                    commands.append(Command(block.page, n, current, *redirect))
                current, redirect = [], ("", False)
            elif tok in (">", ">>"):
                assert k + 1 < len(tokens), f"{block.page}:{n}: {tok} without a file"
                redirect = (tokens[k + 1], tok == ">>")
                k += 1
            elif re.fullmatch(r"[|<>()&;]+", tok):
                raise AssertionError(f"{block.page}:{n}: {tok!r}: the docs test reads no pipes")
            else:
                current.append(tok)
            k += 1
        if current:
            commands.append(Command(block.page, n, current, *redirect))
    return commands


def all_pages() -> list[Page]:
    return [read_page(p) for p in [*PAGES, *STATIC_ONLY]]


def all_commands(pages: list[str]) -> list[Command]:
    return [
        c
        for p in pages
        for b in read_page(p).blocks
        if b.lang in ("bash", "sh", "shell")
        for c in bash_commands(b)
    ]


# ---- What to do with a command -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    """The CLI's own parser, taking options only as spelled (`--min-device` would pass as an
    abbreviation of `--min-devices`: not in the docs)."""
    parser = cli._parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(a.choices.values())
    return parser


def _subcommand(args: argparse.Namespace) -> tuple[str, ...]:
    path = [args.command]
    for attr in ("infer_command", "keys_command", "ledger_command"):
        if getattr(args, attr, None):
            path.append(getattr(args, attr))
    return tuple(path)


def parse_edgeddl(argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return _parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the CLI refuses it: {err.getvalue().strip()}")


def edgeddl_argv(cmd: Command) -> list[str] | None:
    """The arguments after `edgeddl` (also `python -m edgeddl`); None for another program."""
    if cmd.argv[0] == "edgeddl":
        return cmd.argv[1:]
    if cmd.argv[:3] == ["python", "-m", "edgeddl"]:
        return cmd.argv[3:]
    return None


def classify(cmd: Command) -> tuple[str, str]:
    """("run" | "parse" | "other", why). Fails for a program the test does not know."""
    argv = edgeddl_argv(cmd)
    if argv is not None:
        args = parse_edgeddl(argv, str(cmd))
        sub = _subcommand(args)
        if sub in PARSE_ONLY:
            return "parse", PARSE_ONLY[sub]
        if sub == ("infer", "run") and args.processes:
            return "parse", PROCESSES
        names = {m for tok in argv for m in PLACEHOLDER.findall(tok)} - {RUN_DIR}
        if names:
            return "parse", f"an illustration with placeholders ({', '.join(sorted(names))})"
        return "run", "in-process" + (f", with {' '.join(SHORTER[sub])}" if sub in SHORTER else "")
    prog = cmd.argv[0]
    if prog == "torchrun":
        return "parse", "torchrun starts real-fleet device processes: " + PARSE_ONLY[("device",)]
    if prog == "pip" or cmd.argv[:3] == ["python", "-m", "pip"]:
        return "other", "pip: the extras and pins it names are pyproject.toml's"
    if cmd.argv[:3] == ["python", "-m", "pytest"]:
        return "other", "pytest: the markers it names are declared (this is the test suite)"
    if prog == "python" and len(cmd.argv) > 1 and cmd.argv[1].startswith("benchmarks/"):
        return "other", "a benchmark of minutes: the script and its options exist"
    if prog in OTHER_PROGRAMS:
        return "other", OTHER_PROGRAMS[prog]
    pytest.fail(f"{cmd}: a program the docs test does not know; teach it what to check")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def check_pip(cmd: Command) -> None:
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    pins = {*project["dependencies"], *(d for ds in extras.values() for d in ds)}
    words = cmd.argv[cmd.argv.index("install") + 1 :]
    skip_next = False
    for w in words:
        if skip_next:
            skip_next = False
            continue
        if w in ("--no-binary", "--index-url", "-r"):
            skip_next = True
            continue
        if w.startswith("-"):
            continue
        m = re.fullmatch(r"(\.|edgeddl)(?:\[([\w,-]+)\])?", w)
        if m:
            unknown = set((m[2] or "").split(",")) - {""} - set(extras)
            assert not unknown, f"{cmd}: extras {sorted(unknown)} not in pyproject.toml"
        else:
            assert w in pins, f"{cmd}: {w} is not a requirement pyproject.toml pins"


def check_pytest(cmd: Command) -> None:
    declared = {
        m.split(":")[0].strip() for m in _pyproject()["tool"]["pytest"]["ini_options"]["markers"]
    }
    argv = cmd.argv[3:]
    for k, w in enumerate(argv):
        if w == "-m":
            used = set(re.findall(r"\w+", argv[k + 1])) - {"and", "or", "not"}
            assert used <= declared, f"{cmd}: markers {sorted(used - declared)} not declared"
        elif not w.startswith("-") and (k == 0 or argv[k - 1] != "-m"):
            assert (ROOT / w.split("::")[0]).exists(), f"{cmd}: {w} does not exist"


def check_benchmark(cmd: Command) -> None:
    script = ROOT / cmd.argv[1]
    assert script.is_file(), f"{cmd}: no {cmd.argv[1]}"
    source = script.read_text(encoding="utf-8")
    for w in cmd.argv[2:]:
        if w.startswith("--"):
            assert f'"{w}"' in source, f"{cmd}: {cmd.argv[1]} has no option {w}"


def check_scenario_args(cmd: Command, args: argparse.Namespace, executed: bool) -> None:
    """A bundled scenario a command names loads with its `--set` overrides; a file in the
    repository exists. A file the page makes is checked when the command runs."""
    specs: list[tuple[str | None, list[str]]] = []
    if hasattr(args, "overrides") and getattr(args, "resume", None) is None:
        specs.append((args.scenario, args.overrides))  # run, validate, coordinator
    if getattr(args, "fleet", None):
        specs.append((args.fleet, []))  # infer
    for spec, overrides in specs:
        if spec is None or spec in bundled_names():
            load_scenario(spec, overrides)
        elif "/" in spec:
            assert (ROOT / spec).is_file(), f"{cmd}: {spec} is not in the repository"
        else:
            assert executed, f"{cmd}: parse-only, but names {spec}, which the test cannot check"


def check_statically(cmd: Command) -> str:
    """Everything that can be checked without running: returns the command's mode."""
    mode, _ = classify(cmd)
    argv = edgeddl_argv(cmd)
    if argv is not None:
        args = parse_edgeddl(argv, str(cmd))
        if not PLACEHOLDER.search(" ".join(a for a in argv if a != RUN_DIR)):
            check_scenario_args(cmd, args, executed=mode == "run")
    elif cmd.argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                targs = get_args_parser().parse_args(cmd.argv[1:])
        except SystemExit:
            pytest.fail(f"{cmd}: torchrun refuses it: {err.getvalue().strip()}")
        assert targs.module and targs.training_script == "edgeddl", f"{cmd}: not -m edgeddl"
        args = parse_edgeddl(targs.training_script_args, str(cmd))
        assert args.command == "device", f"{cmd}: torchrun starts devices"
    elif cmd.argv[0] == "pip" or cmd.argv[:3] == ["python", "-m", "pip"]:
        check_pip(cmd)
    elif cmd.argv[:3] == ["python", "-m", "pytest"]:
        check_pytest(cmd)
    elif cmd.argv[0] == "python":
        check_benchmark(cmd)
    return mode


# ---- Static checks -----------------------------------------------------------------------


@pytest.mark.parametrize("page", [*PAGES, *STATIC_ONLY])
def test_commands_parse(page: str) -> None:
    for cmd in all_commands([page]):
        check_statically(cmd)


def test_every_command_is_accounted_for() -> None:
    """Each command is run, parse-checked or checked as another program, for a reason (the
    table shows with `pytest -s`)."""
    rows = [(str(c), *classify(c)) for c in all_commands([*PAGES, *STATIC_ONLY])]
    print(f"\n{len(rows)} commands in the docs:")
    for where, mode, why in rows:
        print(f"  [{mode:5}] {where}  ({why})")
    modes = [m for _, m, _ in rows]
    assert modes.count("run") >= 40, "most of the docs' commands should run"
    assert all(why for *_, why in rows)


def _leaf_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    leaves: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            leaves[path] = p
            return
        for name, sp in subs[0].choices.items():
            walk(sp, (*path, name))

    walk(_parser(), ())
    return leaves


def test_the_synopsis_shows_every_subcommand_and_option_and_no_other() -> None:
    leaves = _leaf_parsers()
    block = next(
        b
        for b in read_page(REFERENCE_PAGE).blocks
        if b.lang == "text" and b.text.startswith("edgeddl ")
    )
    shown: dict[tuple[str, ...], set[str]] = {}
    current: tuple[str, ...] = ()
    for line in block.text.splitlines():
        code = line.split("#")[0]
        if line.startswith("edgeddl "):
            words = code.split()[1:]
            current = ()
            while words and (*current, words[0]) in {k[: len(current) + 1] for k in leaves}:
                current = (*current, words.pop(0))
            assert current in leaves, f"{REFERENCE_PAGE}: {line!r}: not a subcommand"
        shown.setdefault(current, set()).update(re.findall(r"--[a-z][a-z0-9-]*", code))
    for path, p in leaves.items():
        options = {s for a in p._actions for s in a.option_strings if s.startswith("--")}
        options.discard("--help")
        name = " ".join(("edgeddl", *path))
        assert path in shown, f"{REFERENCE_PAGE}: the synopsis lacks `{name}`"
        assert shown[path] <= options, f"`{name}` has no {sorted(shown[path] - options)}"
        assert options <= shown[path], f"synopsis of `{name}` lacks {sorted(options - shown[path])}"


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _nested(tp: Any) -> tuple[str, type] | None:
    """("table" | "list" | "dict", dataclass) for a field holding dataclasses."""
    if dataclasses.is_dataclass(tp):
        return "table", tp  # type: ignore[return-value]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return "list", args[0]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return "dict", args[1]
    return None


def walk_keys(cls: type, table: dict[str, Any], where: str, seen: dict[type, set[str]]) -> None:
    """Every key of `table` is a field of `cls` (recursively); `seen` collects them."""
    fields = _fields(cls)
    for key, value in table.items():
        assert key in fields, f"{where}: {key}: not a scenario key (allowed: {', '.join(fields)})"
        seen.setdefault(cls, set()).add(key)
        nested = _nested(fields[key])
        if nested is None:
            continue
        kind, sub = nested
        items = [value] if kind == "table" else value if kind == "list" else list(value.values())
        for item in items:
            walk_keys(sub, item, f"{where}{key}.", seen)


def _schema_classes(cls: type = Scenario) -> set[type]:
    found = {cls}
    for tp in _fields(cls).values():
        if nested := _nested(tp):
            found |= _schema_classes(nested[1])
    return found


def _toml_blocks(pages: list[str]) -> Iterator[tuple[Block, dict[str, Any]]]:
    for p in pages:
        for b in read_page(p).blocks:
            if b.lang == "toml":
                yield b, tomllib.loads(b.text)


def test_every_toml_key_is_a_scenario_key() -> None:
    for block, table in _toml_blocks([*PAGES, *STATIC_ONLY]):
        table.pop("include", None)
        walk_keys(Scenario, table, f"{block.page}:{block.line}: ", {})


def test_the_reference_block_shows_every_scenario_key_and_loads() -> None:
    blocks = list(_toml_blocks([REFERENCE_PAGE]))
    block, table = max(blocks, key=lambda bt: len(bt[0].text))
    seen: dict[type, set[str]] = {}
    walk_keys(Scenario, table, f"{block.page}:{block.line}: ", seen)
    for cls in _schema_classes():
        related = [k for c, k in seen.items() if issubclass(c, cls) or issubclass(cls, c)]
        covered = set().union(*related) if related else set()
        missing = set(_fields(cls)) - covered
        assert not missing, f"{REFERENCE_PAGE}: the reference lacks {cls.__name__} {missing}"
    table["security"].pop("devices")  # its enrolled device shows empty keys: refused
    scenario_from_dict(table)  # the rest is a scenario that loads


def test_python_blocks_compile_and_name_real_things() -> None:
    for p in PAGES:
        for b in read_page(p).blocks:
            if b.lang != "python":
                continue
            compile(b.text, f"{p}:{b.line}", "exec")
            for name in re.findall(r"\bedgeddl\.(\w+)", b.text):
                found = hasattr(edgeddl, name) or importlib.util.find_spec(f"edgeddl.{name}")
                assert found, f"{p}:{b.line}: edgeddl.{name} does not exist"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Page) -> set[str]:
    found: set[str] = set()
    for h in page.headings:
        s = _slug(h)
        n = 1
        base = s
        while s in found:
            s, n = f"{base}-{n}", n + 1
        found.add(s)
    return found


def test_links_resolve() -> None:
    pages = {p.name: p for p in all_pages()}
    for page in pages.values():
        here = (ROOT / page.name).parent
        for text, target in re.findall(r"\[([^\]]+)\]\(([^)\s]+)\)", page.prose):
            if re.match(r"^[a-z]+://", target):
                continue  # not fetched
            path, _, anchor = target.partition("#")
            file = (here / path).resolve() if path else ROOT / page.name
            assert file.exists(), f"{page.name}: [{text}]({target}): no such file"
            if anchor:
                rel = file.relative_to(ROOT).as_posix()
                linked = pages.get(rel) or read_page(rel)
                assert anchor in _anchors(linked), (
                    f"{page.name}: [{text}]({target}): no heading #{anchor} in {rel}"
                )


def _known_file_names() -> set[str]:
    names: set[str] = set()
    for top in ("src", "benchmarks", "tests", "docs"):
        names |= {p.name for p in (ROOT / top).rglob("*") if p.is_file()}
    return names


@functools.cache
def _source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py")))


def _defined(name: str) -> bool:
    """A class, function or constant of that name is defined in src/edgeddl."""
    n = re.escape(name)
    return re.search(rf"^\s*(class|def)\s+{n}\b|^{n}\s*[:=]", _source(), re.M) is not None


def test_inline_code_names_real_files_and_code() -> None:
    files = _known_file_names()
    import torch.distributed as dist

    for page in all_pages():
        here = (ROOT / page.name).parent
        for span in set(re.findall(r"`([^`\n]+)`", page.prose)):
            where = f"{page.name}: `{span}`"
            if PLACEHOLDER.search(span):
                continue  # RUN/ledger.jsonl, runs/NAME-TIMESTAMP/: a run's files
            if re.fullmatch(r"[\w.\-/]+\.(py|md)|[\w\-]+(/[\w\-]+)*/", span):
                if "/" not in span:
                    assert span in files or (SRC / span).exists(), f"{where}: no such file"
                    continue
                bases = (here, ROOT, SRC)
                assert any((b / span).exists() for b in bases), f"{where}: no such file or folder"
            elif m := re.match(r"^edgeddl((?:\.\w+)+)", span):
                parts = m[1].lstrip(".").split(".")
                obj: Any = edgeddl
                for k, part in enumerate(parts):
                    if hasattr(obj, part):
                        obj = getattr(obj, part)
                        continue
                    module = "edgeddl." + ".".join(parts[: k + 1])
                    try:
                        obj = importlib.import_module(module)
                    except ImportError:
                        pytest.fail(f"{where}: edgeddl.{'.'.join(parts[: k + 1])} does not exist")
            elif m := re.fullmatch(r"([A-Z]\w*[a-z]\w*)(?:\.([a-z_]\w*))?", span):
                cls, method = m[1], m[2]
                assert _defined(cls) or hasattr(dist, cls), f"{where}: {cls} is defined nowhere"
                if method:
                    assert _defined(method), f"{where}: no {method} in src/edgeddl"


# ---- Running the commands ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What RUN_DIR stands for: a secured two-device run stopped by SIGINT after its first
    of three steps (a checkpoint to resume, a ledger closed by an `interrupted` entry)."""
    base = tmp_path_factory.mktemp("stopped")
    scenario = base / "stopped.toml"
    scenario.write_text(
        '[run]\nname = "stopped"\n\n[[fleet.devices]]\nname = "pi"\nprofile = "rpi4"\n'
        "count = 2\n\n[data]\nnum_samples = 600\n\n[train]\nglobal_batch = 32\n"
        f'num_steps = 3\n\n[security]\nenabled = true\nkeys_dir = "{(base / "keys").as_posix()}"\n',
        encoding="utf-8",
    )
    for name in ("coordinator", "pi-0", "pi-1"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["keys", "new", name, "--out", str(base / "keys")]) == 0
        with scenario.open("a", encoding="utf-8") as f:
            f.write(out.getvalue())
    add_step = RunRecorder.add_step

    def stop_after_first(self: RunRecorder, *args: Any, **kwargs: Any) -> None:
        add_step(self, *args, **kwargs)
        if self.num_steps == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stderr(io.StringIO()):
        m.setattr(RunRecorder, "add_step", stop_after_first)
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["run", str(scenario), "--out", str(base / "run"), "--quiet"])
    assert rc == 130, "the run should stop on SIGINT"
    return base / "run"


def _execute(cmd: Command, cwd: Path, request: pytest.FixtureRequest) -> None:
    argv = list(edgeddl_argv(cmd) or [])
    if RUN_DIR in argv:
        copy = cwd / f"stopped-run-{cmd.line}"
        shutil.copytree(request.getfixturevalue("stopped_run"), copy)
        argv = [str(copy) if a == RUN_DIR else a for a in argv]
    sub = _subcommand(parse_edgeddl(argv, str(cmd)))
    argv += SHORTER.get(sub, [])
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except Exception as e:  # an error the CLI should have turned into one line
        pytest.fail(f"{cmd}: raised {type(e).__name__}: {e}")
    assert rc == 0, f"{cmd}: exit {rc}: {err.getvalue().strip()[-2000:]}"
    if cmd.stdout:
        with (cwd / cmd.stdout).open("a" if cmd.append else "w", encoding="utf-8") as f:
            f.write(out.getvalue())


@pytest.mark.parametrize("page", PAGES)
def test_commands_run(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The page's commands, in order, in a folder of their own; files its tagged ```toml
    blocks name are written when their turn comes."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for block in read_page(page).blocks:
        if block.lang == "toml" and "file" in block.info:
            (tmp_path / block.info["file"]).write_text(block.text, encoding="utf-8")
        if block.lang not in ("bash", "sh", "shell"):
            continue
        for cmd in bash_commands(block):
            if check_statically(cmd) == "run":
                _execute(cmd, tmp_path, request)
                ran += 1
    if page == "README.md":
        assert ran >= 10
