"""Testing a command-line tool's output and exit codes inside a sandbox.

The tool under test (a tiny word counter) is written into the sandbox, then run the way a user
would run it. Each test gets a fresh sandbox, so nothing one test leaves behind affects another.
"""

import pytest

from pytest_kode import assert_exec

WORDCOUNT = """\
import sys

if len(sys.argv) != 2:
    print("usage: wordcount FILE", file=sys.stderr)
    sys.exit(2)
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        words = handle.read().split()
except FileNotFoundError:
    print(f"wordcount: {sys.argv[1]}: no such file", file=sys.stderr)
    sys.exit(1)
print(len(words))
"""


@pytest.fixture
def tool(sandbox):
    sandbox.fs.write("bin/wordcount.py", WORDCOUNT)
    return sandbox


def test_counts_words(tool):
    tool.fs.write("poem.txt", "so much depends\nupon a red wheel barrow\n")
    result = tool.exec("python3 bin/wordcount.py poem.txt")
    assert_exec(result).succeeded().stdout_equals("8\n").stderr_empty()


def test_missing_file_is_exit_1_with_a_message(tool):
    result = tool.exec("python3 bin/wordcount.py nowhere.txt")
    assert_exec(result).failed(exit_code=1).stderr_contains("no such file")


def test_usage_error_is_exit_2(tool):
    assert_exec(tool.exec("python3 bin/wordcount.py")).exit_code(2).stderr_matches(r"^usage:")


@pytest.mark.sandbox(exec_timeout_ms=500)
def test_a_hanging_tool_times_out_instead_of_hanging_the_suite(sandbox):
    result = sandbox.exec("sleep 30")
    assert_exec(result).timed_out()
