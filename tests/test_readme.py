"""The README's examples work as written: its Python blocks run, and every `stepfusion-train`,
`torchrun ... -m stepfusion_kernels.train` and `stepfusion-bench` command it shows parses with the CLI as
it is now (task names, flags and their values). Parsing only: nothing is trained or timed."""

import os
import re
import shlex

import pytest

from stepfusion_kernels import bench
from stepfusion_kernels import train as cli

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
with open(README) as handle:
    TEXT = handle.read()

PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def commands(pattern):
    """The arguments after each match of `pattern` (to the end of its code span or line, comments cut),
    leaving out usage lines with placeholders (TASK, DIR, a|b choices, [optional] parts)."""
    found = []
    for match in re.finditer(pattern + r"([^`\n]*)", TEXT):
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
