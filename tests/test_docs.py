"""The README's first screen and each guide page's first example run as they are written.

What is extracted:

* **README**: every ``searchlab ...`` command in the code blocks that come before the
  README's first ``## `` heading (the set-up block and the "what to type" block).
* **Guide**: every page in ``mkdocs.yml``'s nav except the generated references
  (``cli.md``, ``api.md``) and the contributors' pages: its first fenced ``bash`` or
  ``python`` block (``text``, ``toml``, ``yaml`` blocks are not examples). Every page that
  has such a block must give this test something to run. A ``<!-- test: flags -->`` line
  just before the block means its commands need what a test machine lacks (PostgreSQL, an
  MLflow server, a cluster): each ``searchlab`` command's subcommand and flags are then
  checked against ``searchlab SUBCOMMAND --help`` instead of being run.

How a block runs:

* ``python``: written to a file in the project folder and run with this interpreter.
* ``bash``: each ``searchlab ...`` command (continuation lines joined, ``# comments``
  dropped, leading ``VAR=value`` words kept as its environment) runs, in order; other lines
  (``source``, ``pip``, ``createdb``, ``mlflow server``) are not run.
  ``searchlab run`` gets ``--trials 2 --epochs 2 --subset 300,100`` appended, the same for
  every run so two runs of a study never differ in settings, and ``--in-process`` (unless
  it names ``--workers`` or ``--gpus``: one Keras start-up instead of two) -- except ``--try``, which has
  its own small budget and runs only if ``searchlab run --help`` offers it (another branch
  adds the flag: until then that one command is skipped, and said so).
  ``searchlab ui`` starts a server and waits for a browser: its flags are checked against
  ``searchlab ui --help`` instead. A ``report`` or ``export`` of a study that the block did
  not run first reads a small run of it made once per module.

Where: a fresh project folder with ``studies/`` copied in, ``HOME`` and ``SEARCHLAB_HOME``
inside it (nothing leaks into the user's folders), the data directory at the shared data,
no store from the environment, offline: ``CIFAR_VGG_WEIGHTS=none``, as the README tells an
offline user to do (no ImageNet weights exist here).

Every command's flags are also checked against ``--help`` in the fast tests, so a flag that
disappears fails ``-m "not slow"`` too. Running an example starts Keras (10-25 s a command
on 2 cores) or trains, so those tests are slow.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEARCHLAB = Path(sys.executable).parent / "searchlab"
SMALL_RUN = ["--trials", "2", "--epochs", "2", "--subset", "300,100"]
#: pages that are references or for contributors, not user pages with examples to run
NOT_USER_PAGES = {"cli.md", "api.md", "architecture.md", "development.md"}
FENCE = re.compile(r"^```(\w*)\s*$")
FLAGS_MARK = "<!-- test: flags -->"
TIMEOUT = 600


@dataclass
class Command:
    """One ``searchlab`` command line of a bash block."""

    argv: list[str]  # starts with "searchlab"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def subcommand(self) -> str | None:
        return next((a for a in self.argv[1:] if not a.startswith("-")), None)

    @property
    def flags(self) -> list[str]:
        return [a.split("=", 1)[0] for a in self.argv[1:] if re.match(r"^--?[a-zA-Z]", a)]

    @property
    def study(self) -> str | None:
        """The study file (or model URI) the command names, if any."""
        sub = self.subcommand
        args = self.argv[self.argv.index(sub) + 1 :] if sub else []
        positional = []
        skip = False
        for arg in args:
            if skip:
                skip = False
            elif arg.startswith("-"):
                skip = "=" not in arg and not _is_switch(sub, arg)
            else:
                positional.append(arg)
        return positional[0] if positional else None

    def __str__(self) -> str:
        prefix = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{prefix} {shlex.join(self.argv)}".strip()


#: flags that take no value, per subcommand (for finding the study argument)
SWITCHES = {
    "run": {"--try", "--in-process", "--allow-changed-settings"},
    "report": {"--json"},
}


def _is_switch(sub: str | None, flag: str) -> bool:
    return flag in SWITCHES.get(sub or "", set()) or flag in {"-h", "--help", "-v", "--verbose"}


@dataclass
class Example:
    source: str  # e.g. "README.md (first screen)" or "docs/crashes.md"
    language: str  # "bash" or "python"
    text: str
    flags_only: bool = False

    @property
    def commands(self) -> list[Command]:
        return bash_commands(self.text) if self.language == "bash" else []

    @property
    def slow(self) -> bool:
        """Running it starts Keras (10-25 s a command on 2 cores) or trains: all but a
        flags-only block."""
        return not self.flags_only


def blocks(markdown: str) -> list[tuple[str, str, bool]]:
    """(language, text, flags_only) of every fenced block, in order."""
    found: list[tuple[str, str, bool]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        flags_only = i > 0 and lines[i - 1].strip() == FLAGS_MARK
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append((m.group(1), "\n".join(lines[i + 1 : end]), flags_only))
        i = end + 1
    return found


def bash_commands(text: str) -> list[Command]:
    """The ``searchlab`` commands of a bash block, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words and words[0] == "searchlab":
            commands.append(Command(words, env))
    return commands


def readme_first_screen() -> Example:
    """The bash blocks before the README's first ``## `` heading, as one example."""
    intro = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    text = "\n".join(body for lang, body, _ in blocks(intro) if lang == "bash")
    return Example("README.md (first screen)", "bash", text)


def guide_pages() -> list[str]:
    """The nav's pages, in order (mkdocs.yml read as text: `- Title: page.md` lines)."""
    nav = (REPO / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def first_example(page: str) -> Example | None:
    for lang, body, flags_only in blocks((REPO / "docs" / page).read_text()):
        if lang in {"bash", "python"}:
            return Example(f"docs/{page}", lang, body, flags_only)
    return None


def _examples() -> list[Example]:
    found = [readme_first_screen()]
    for page in guide_pages():
        if page not in NOT_USER_PAGES and (example := first_example(page)) is not None:
            found.append(example)
    return found


EXAMPLES = _examples()
TRY_COMMANDS = [c for e in EXAMPLES for c in e.commands if "--try" in c.argv]


def _param(example: Example):
    marks = [pytest.mark.slow] if example.slow else []
    return pytest.param(example, id=example.source, marks=marks)


# -- fast: the extraction, and every documented flag against --help -------------------------


def test_the_readme_first_screen_says_what_to_type() -> None:
    subs = [c.subcommand for c in readme_first_screen().commands]
    assert {"doctor", "run", "ui", "export"} <= set(subs), subs
    text = (REPO / "README.md").read_text()
    assert "```bash\nscripts/demo" in "\n".join(text.splitlines()[:40])
    assert "scripts/test" in "\n".join(text.splitlines()[:40])
    assert len(text.splitlines()) <= 260, "the README is the front page: the rest is in docs/"


def test_every_user_page_is_in_the_nav_and_its_first_example_gives_something_to_run() -> None:
    pages = guide_pages()
    on_disk = {p.name for p in (REPO / "docs").glob("*.md")}
    assert on_disk == set(pages), "every docs/ page is in mkdocs.yml's nav, and only those"
    for page in pages:
        example = first_example(page)
        if page in NOT_USER_PAGES or example is None:
            continue
        assert example.language == "python" or example.commands, (
            f"docs/{page}: its first bash block has no searchlab command for the docs test to "
            "run; make the first example one that runs, or move it to a text block"
        )


def _help(sub: str | None) -> str:
    argv = [str(SEARCHLAB)] + ([sub] if sub else []) + ["--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str | None, str]:
    return {sub: _help(sub) for sub in (None, "run", "export", "report", "ui", "doctor")}


def check_flags(command: Command, helps: dict[str | None, str]) -> list[str]:
    """The flags of ``command`` that ``searchlab SUB --help`` does not list."""
    sub = command.subcommand
    assert sub in helps, f"{command}: searchlab has no command {sub!r}"
    known = helps[sub] + helps[None]
    missing = []
    for flag in command.flags:
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", known):
            missing.append(flag)
    return missing


@pytest.mark.parametrize("example", [pytest.param(e, id=e.source) for e in EXAMPLES])
def test_the_documented_flags_exist(example: Example, helps: dict[str | None, str]) -> None:
    for command in example.commands:
        assert not check_flags(command, helps), (
            f"{example.source}: `{command}` uses flags that `searchlab {command.subcommand} "
            f"--help` does not list: {check_flags(command, helps)}"
        )


def test_the_checks_would_catch_a_flag_that_is_gone(helps: dict[str | None, str]) -> None:
    block = (
        "source .venv/bin/activate\n"
        "X=1 searchlab run studies/s.py --trials 3 \\\n  --no-such-flag 2   # a comment\n"
        "pip install foo\n"
        "searchlab -v export studies/s.py -o best.h5 --trial 1\n"
    )
    run, export = bash_commands(block)
    assert run.env == {"X": "1"} and run.subcommand == "run" and run.study == "studies/s.py"
    assert check_flags(run, helps) == ["--no-such-flag"]
    assert export.subcommand == "export" and export.study == "studies/s.py"
    assert check_flags(export, helps) == []


# -- slow where they train: the examples, run ------------------------------------------------


@dataclass
class Project:
    folder: Path
    env: dict[str, str]
    trained: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Project:
    folder = tmp_path_factory.mktemp("docs-project")
    shutil.copytree(REPO / "studies", folder / "studies")
    (folder / "home").mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MLFLOW_TRACKING_URI", "SEARCHLAB_STORAGE", "SEARCHLAB_SESSION"}
    }
    env.update(
        HOME=str(folder / "home"),
        SEARCHLAB_HOME=str(folder / ".searchlab"),
        SEARCHLAB_DATA_DIR=str(data_dir),
        CIFAR_VGG_WEIGHTS="none",
        TF_CPP_MIN_LOG_LEVEL="2",
        PATH=f"{SEARCHLAB.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("KERAS_BACKEND", None)
    return Project(folder, env)


def _run(project: Project, argv: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(
        argv,
        cwd=project.folder,
        env={**project.env, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{output[-4000:]}"
    return output


def _small(command: Command) -> list[str]:
    argv = [str(SEARCHLAB)] + command.argv[1:]
    if command.subcommand == "run" and "--try" not in argv:
        argv += SMALL_RUN
        if not {"--workers", "--gpus"} & set(command.flags):
            argv.append("--in-process")  # one Keras start-up per command, not two
    return argv


def run_command(project: Project, command: Command, helps: dict[str | None, str]) -> None:
    sub = command.subcommand
    if sub == "ui":  # a server that waits for a browser: the flags are what is checked
        assert not check_flags(command, helps)
        return
    if "--try" in command.argv:
        return  # test_the_documented_try_runs runs these (and says why when it cannot)
    study = command.study
    if sub in {"report", "export"} and study and study.endswith(".py"):
        if study not in project.trained:
            small = Command(["searchlab", "run", study], command.env)
            _run(project, _small(small), command.env, f"a small run of {study}")
            project.trained.add(study)
    _run(project, _small(command), command.env, f"`{command}`")
    if sub == "run" and study and "--try" not in command.argv:
        project.trained.add(study)


@pytest.mark.parametrize("example", [_param(e) for e in EXAMPLES])
def test_the_documented_example_runs(
    example: Example, project: Project, helps: dict[str | None, str]
) -> None:
    if example.flags_only:
        for command in example.commands:
            assert not check_flags(command, helps), f"{example.source}: `{command}`"
        assert example.commands, f"{example.source}: a flags-only block without a command"
        return
    if example.language == "python":
        script = project.folder / "example.py"
        script.write_text(example.text)
        _run(project, [sys.executable, str(script)], {}, f"the first example of {example.source}")
        return
    for command in example.commands:
        run_command(project, command, helps)
    if example.source.startswith("README"):
        assert (project.folder / "best.h5").is_file(), "the README's export writes best.h5"


@pytest.mark.slow
@pytest.mark.parametrize("command", [pytest.param(c, id=str(c)) for c in TRY_COMMANDS])
def test_the_documented_try_runs(command: Command, project: Project) -> None:
    output = _run(project, _small(command), command.env, f"`{command}`")
    assert "try" in output.lower(), f"`{command}` does not say it is a try run:\n{output}"
