"""The README's examples work as written: its Python blocks run, and every `stepfusion-train`,
`torchrun ... -m stepfusion_kernels.train` and `stepfusion-bench` command it or a page under docs/ shows
parses with the CLI as it is now (task names, flags and their values). Parsing only: nothing is trained or
timed."""

import glob
import os
import re
import shlex

import pytest

from stepfusion_kernels import bench
from stepfusion_kernels import train as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def read(path):
    with open(path) as handle:
        return handle.read()


TEXT = read(README)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
# Commands are checked wherever they are shown: the README and the detailed pages under docs/.
COMMAND_TEXT = "\n".join([TEXT] + [read(path) for path in DOCS])


def commands(pattern):
    """The arguments after each match of `pattern` (to the end of its code span or line, comments cut),
    leaving out usage lines with placeholders (TASK, DIR, a|b choices, [optional] parts)."""
    found = []
    for match in re.finditer(pattern + r"([^`\n]*)", COMMAND_TEXT):
        arguments = match.group(1).split("#")[0].strip()
        if not re.search(r"TASK|DIR|\||\[|\.\.\.", arguments):
            found.append(arguments)
    return sorted(set(found))


TRAIN_COMMANDS = commands(r"(?:stepfusion-train|-m stepfusion_kernels\.train) ")
BENCH_COMMANDS = commands(r"stepfusion-bench(?=[ `\n])")


def test_the_readme_shows_commands_of_each_kind():
    assert PYTHON_BLOCKS and len(TRAIN_COMMANDS) >= 10 and BENCH_COMMANDS


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.splitlines()[0][:40])
def test_python_block_runs(block):
    exec(compile(block, README, "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("arguments", TRAIN_COMMANDS)
def test_train_command_parses(arguments):
    args = cli.parser().parse_args(shlex.split(arguments))
    assert arguments.split()[0] == args.task


@pytest.mark.parametrize("arguments", BENCH_COMMANDS)
def test_bench_command_parses(arguments):
    bench.parser().parse_args(shlex.split(arguments))
