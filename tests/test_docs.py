"""The README and docs/ stay true: links resolve, shown commands exist, messages point at real headings.

The checkers read Markdown the way GitHub renders it: fenced code is code, `spans` are code, headings get
GitHub's anchors. Each checker is also tested on a small page with planted faults, so it can fail.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from cli import app
from pipeline import PROJECT_ROOT
from pipeline import config as cfg
from trainer.methods import METHODS
from trainer.models import MODELS
from trainer.recipes import RECIPES

PAGES = [PROJECT_ROOT / "README.md", PROJECT_ROOT / "CHANGELOG.md", PROJECT_ROOT / "data" / "README.md",
         *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
SHELL = {"", "bash", "sh", "shell", "console"}
CLI = typer.main.get_command(app)  # the click command tree every checker reads


# --- reading Markdown --------------------------------------------------------------------------------------

def split_code(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the prose with fenced blocks blanked, [(info string, block text)])."""
    prose, blocks, fence, info, block = [], [], None, "", []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, info, block = match.group(1), match.group(2), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((info, "\n".join(block)))
            fence = None
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def code_spans(prose: str) -> list[str]:
    """Inline code of the prose (a span may wrap lines, never a blank line); a table's \\| is |."""
    spans = []
    for match in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", prose, flags=re.S):
        if "\n\n" not in match.group(2):
            spans.append(" ".join(match.group(2).replace("\\|", "|").split()))
    return spans


def without_spans(prose: str) -> str:
    return re.sub(r"(`+).+?(?<!`)\1(?!`)", "", prose, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[str]:
    prose, _ = split_code(text)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.M)]


def anchors(text: str) -> set[str]:
    found, seen = set(), {}
    for heading in headings(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_problems(page: Path, text: str | None = None) -> list[str]:
    """Every relative link of ``page`` names a file that exists, and an anchor that its page has."""
    text = page.read_text() if text is None else text
    prose, _ = split_code(text)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_spans(prose)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            problems.append(f"{page.name}: link {target}: {path} does not exist")
        elif anchor and where.suffix == ".md":
            if anchor not in anchors(where.read_text() if where != page else text):
                problems.append(f"{page.name}: link {target}: no heading with anchor #{anchor}")
    return problems


# --- commands shown ----------------------------------------------------------------------------------------

def commands_shown(text: str) -> list[list[str]]:
    """The command lines of the shell blocks and the inline spans, as token lists (comments and line
    continuations resolved; `&&` and `;` separate commands)."""
    prose, blocks = split_code(text)
    lines = [*code_spans(prose)]
    for info, block in blocks:
        if info in SHELL:
            lines += re.sub(r"\\\n", " ", block).splitlines()
    commands = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*", "", line)
        for part in re.split(r"&&|\|\||;", line):
            try:  # quotes group words, as the shell does (BENCH_ARGS="--model focall ...")
                tokens = shlex.split(part)
            except ValueError:  # an apostrophe of the prose
                tokens = part.split()
            if tokens:
                commands.append(tokens)
    return commands


def option_names(command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", ()) or ())
        names.update(getattr(param, "secondary_opts", ()) or ())
    return {n for n in names if n.startswith("-")}


def placeholder(token: str) -> bool:
    """A value the reader fills in: <name>, ..., FILE, A, an option list of the docs' own notation."""
    return (token.startswith(("<", "$", "{")) or "..." in token or ".." in token or token.isupper()
            or token in ("", "|"))


KNOWN_VALUES = {
    "--config": lambda v: v.endswith(".toml") or "/" in v or v in cfg.PRESETS,
    "--recipe": lambda v: v in RECIPES,
    "--method": lambda v: v in METHODS,
    "--backend": lambda v: v in cfg.BACKENDS,
    "--format": lambda v: v in cfg.FORMATS,
    "--model": lambda v: v in MODELS or ":" in v,
}


def cli_problems(text: str, name: str = "page") -> list[str]:
    """Every `conformalsam ...` (or `cli.py ...` under torchrun) shown names commands, flags and registered
    values (presets, recipes, methods, backends, formats, models) that exist."""
    problems = []
    for tokens in commands_shown(text):
        if tokens[0] in CLI.commands and len(tokens) > 1:  # `train --resume`: a command named in the prose
            tokens = ["conformalsam", *tokens]
        starts = [i for i, t in enumerate(tokens) if t in ("conformalsam", "cli.py")]
        if not starts:
            continue
        args = [t.strip("[](),.`") if t.startswith(("[", "(")) or t.endswith(("]", ")", ",", "`")) else t
                for t in tokens[starts[0] + 1:]]
        shown = " ".join(tokens[starts[0]:])
        command, path = CLI, []
        while args and hasattr(command, "commands") and not args[0].startswith("-"):
            word = args.pop(0)
            if placeholder(word):
                command = None
                break
            if word not in command.commands:
                problems.append(f"{name}: `{shown}`: no command '{' '.join([*path, word])}'")
                command = None
                break
            command, path = command.commands[word], [*path, word]
        if command is None:
            continue
        if path == ["config", "init"] and args and not args[0].startswith("-") and not placeholder(args[0]):
            if args[0] not in cfg.PRESETS:
                problems.append(f"{name}: `{shown}`: no preset '{args[0]}'")
        valid = option_names(command)
        for i, arg in enumerate(args):
            flag = arg.split("=")[0].rstrip(":")
            if not re.fullmatch(r"--[a-z][\w-]*|-[a-zA-Z]", flag):
                continue
            if flag not in valid:
                problems.append(f"{name}: `{shown}`: {' '.join(path) or 'conformalsam'} has no option {flag}")
                continue
            value = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else "")
            if flag in KNOWN_VALUES and not value.startswith("-"):
                for v in value.split("|"):
                    if not placeholder(v) and not KNOWN_VALUES[flag](v):
                        problems.append(f"{name}: `{shown}`: {flag} {v} is not one the code knows")
    return problems


# flags of other programs that the pages name on their own, as `--flag`
FOREIGN = {"--index-url", "--no-build-isolation", "--no-deps",  # pip
           "--local-rank", "--local_rank",  # torch.distributed.launch
           "--annotators", "--student-width", "--dry", "--no-throughput"}  # benchmark scripts


def all_options() -> set[str]:
    found, todo = set(), [CLI]
    while todo:
        command = todo.pop()
        found |= option_names(command)
        todo += list(getattr(command, "commands", {}).values())
    return found


def flag_problems(text: str, name: str = "page") -> list[str]:
    """A flag shown on its own (`--eval-from 0.66`) is an option of some command (or another program's)."""
    known, problems = all_options() | FOREIGN, []
    for span in code_spans(split_code(text)[0]):
        if span.startswith("-"):
            for token in span.split():
                flag = token.split("=")[0].strip("[](),.")
                if re.fullmatch(r"--[a-z][\w-]*", flag) and flag not in known:
                    problems.append(f"{name}: `{span}`: no command has an option {flag}")
    return problems


def make_targets() -> set[str]:
    targets = set()
    for line in (PROJECT_ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\- ]+):(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def make_problems(text: str, name: str = "page") -> list[str]:
    """Every `make TARGET` shown is a target of the Makefile."""
    targets, problems = make_targets(), []
    for tokens in commands_shown(text):
        for i, token in enumerate(tokens):
            if token != "make":
                continue
            for target in tokens[i + 1:]:
                if "=" in target or target.startswith("-"):
                    continue
                if not re.fullmatch(r"[a-z][\w.-]*", target):
                    break
                if target not in targets:
                    problems.append(f"{name}: `{' '.join(tokens)}`: no make target '{target}'")
    return problems


# --- the pages ---------------------------------------------------------------------------------------------

def test_the_readme_is_a_short_front_door_with_the_two_commands_first():
    lines = (PROJECT_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    top = "\n".join(lines[:10])
    assert "make demo" in top and "make test" in top


def test_every_docs_page_is_linked_from_the_readme():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for page in (PROJECT_ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_command_shown_uses_commands_and_flags_that_exist(page):
    text = page.read_text()
    assert cli_problems(text, page.name) == []
    assert flag_problems(text, page.name) == []
    assert make_problems(text, page.name) == []


def test_the_pages_show_the_commands_at_all():
    """The extraction finds what is there (a checker that reads nothing passes everything)."""
    shown = [c for page in PAGES for c in commands_shown(page.read_text()) if "conformalsam" in c]
    assert len(shown) > 100
    assert {c[1] for c in shown if len(c) > 1} >= {"logits", "calibrate", "train", "eval", "export", "data"}


def test_every_recipe_and_preset_is_in_the_reference():
    trainer = (PROJECT_ROOT / "docs" / "trainer.md").read_text()
    assert [r for r in RECIPES if f"| `{r}`" not in trainer] == []
    commands = (PROJECT_ROOT / "docs" / "commands.md").read_text()
    families = {re.sub(r"-[\d_]+$", "", name) for name in cfg.PRESETS}  # voc-92 .. voc-1464 are one family
    assert [f for f in families if f"`{f}" not in commands] == []


SOURCES = [PROJECT_ROOT / "cli.py", PROJECT_ROOT / "Makefile", *PROJECT_ROOT.glob("scripts/*"),
           *(p for folder in ("pipeline", "trainer", "benchmarks") for p in (PROJECT_ROOT / folder).rglob("*.py"))]


def reference_problems(text: str, name: str = "source") -> list[str]:
    """``docs/page.md 'Heading'`` (or ``README 'Heading'``) in a message or comment names a real heading."""
    problems = []
    for page, heading in re.findall(r"(README(?:\.md)?|docs/[\w-]+\.md) '([^']+)'", text):
        path = PROJECT_ROOT / ("README.md" if page.startswith("README") else page)
        if not path.exists():
            problems.append(f"{name}: {page} does not exist")
        elif heading.replace("`", "") not in [h.replace("`", "") for h in headings(path.read_text())]:
            problems.append(f"{name}: {page} has no heading '{heading}'")
    return problems


def test_messages_name_headings_that_exist():
    found = [f for f in SOURCES if re.search(r"docs/[\w-]+\.md '", f.read_text())]
    assert len(found) >= 3  # the SEEM messages, the trainer's, the Makefile's
    problems = [p for f in SOURCES for p in reference_problems(f.read_text(), f.name)]
    assert problems == []


# --- the checkers find what they should --------------------------------------------------------------------

PLANTED = """# A page

## Quick `start`: here

See [there](#quick-start-here), [gone](#nowhere), [docs](docs/commands.md#experiment-config),
[missing](docs/nope.md) and [far](docs/commands.md#no-such-heading). Not a link: `[x](y.md)`.

```bash
conformalsam calibrate --alpha 0.1 --mode crc      # fine
conformalsam calibrate --alpah 0.1 && make demo nosuchtarget
torchrun --nproc_per_node 4 cli.py train --stage 1 --recipe voc-r101-999
conformalsam frobnicate
```

```toml
# conformalsam calibrate --not-checked
```

Inline: `conformalsam data split SOURCE --out DIR --labeled
N --seed 3`, `conformalsam config init voc-9999`, `conformalsam eval [--mode sliding] [--bogus]`,
`conformalsam train --method self|unimatch|mystery`, `train --resum`, `--eval-from 0.66`, `--evil-from 3`.
"""


def test_the_link_checker_finds_broken_files_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "commands.md").write_text("# C\n\n## Experiment config\n")
    page.write_text(PLANTED)
    problems = link_problems(page)
    assert len(problems) == 3, problems
    assert any("#nowhere" in p for p in problems) and any("nope.md does not exist" in p for p in problems)
    assert any("#no-such-heading" in p for p in problems)


def test_the_command_checker_finds_unknown_commands_flags_and_values():
    problems = cli_problems(PLANTED)
    expected = ["no option --alpah", "--recipe voc-r101-999", "no command 'frobnicate'", "no preset 'voc-9999'",
                "no option --bogus", "--method mystery", "no option --resum"]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems
    assert flag_problems(PLANTED) == ["page: `--evil-from 3`: no command has an option --evil-from"]
    problems = make_problems(PLANTED)
    assert len(problems) == 1 and "no make target 'nosuchtarget'" in problems[0], problems


def test_the_reference_checker_finds_missing_pages_and_headings():
    text = "x (docs/annotators.md 'SEEM') y (docs/annotators.md 'No such') z (docs/nope.md 'SEEM')"
    problems = reference_problems(text)
    assert len(problems) == 2 and "No such" in problems[0] and "nope.md" in problems[1]


def test_slugs_follow_github():
    assert slug("On a GPU: `make gpu-check` and measured figures") == "on-a-gpu-make-gpu-check-and-measured-figures"
    assert slug("The toy world: the method's ablation (synthetic)") == "the-toy-world-the-methods-ablation-synthetic"
    assert anchors("# A\n\n## B\n\n## B\n") == {"a", "b", "b-1"}
