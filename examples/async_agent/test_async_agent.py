"""Testing an async agent's tools inside a sandbox.

Agent code is async: an agent calls its tools concurrently and bounds each call with a timeout.
``async_sandbox`` is the async twin of ``sandbox``: ``await sandbox.exec(...)`` leaves the event
loop free, so three tool calls run at once, and ``asyncio.wait_for`` around a call that hangs
fires on time and kills what the call started inside the sandbox.

Runs under pytest-asyncio (``@pytest.mark.asyncio``); with anyio's plugin, mark the tests
``@pytest.mark.anyio`` instead.
"""

import asyncio

import pytest

from pytest_kode import assert_exec


class CodeTool:
    """The tool under test: runs generated Python in the sandbox, with a time limit."""

    def __init__(self, sandbox, timeout_s=10.0):
        self.sandbox = sandbox
        self.timeout_s = timeout_s

    async def run_python(self, code, name="snippet.py"):
        await self.sandbox.fs.write(f"tools/{name}", code)
        return await self.sandbox.exec(
            f"python3 tools/{name}", timeout_ms=int(self.timeout_s * 1000)
        )


@pytest.mark.asyncio
async def test_runs_generated_code(async_sandbox):
    tool = CodeTool(async_sandbox)
    result = await tool.run_python("print(sum(range(10)))")
    assert_exec(result).succeeded().stdout_equals("45\n")


@pytest.mark.asyncio
async def test_generated_code_that_hangs_times_out(async_sandbox):
    tool = CodeTool(async_sandbox, timeout_s=0.5)
    result = await tool.run_python("import time; time.sleep(60)")
    assert_exec(result).timed_out()


# Each tool call waits until all three have started: run one after another, the first would
# wait for the others in vain and fail.
RENDEZVOUS = """
import os, sys, time
open("{name}.started", "w").close()
deadline = time.time() + 30
while not all(os.path.exists(f"{{n}}.started") for n in ("search", "fetch", "summarise")):
    if time.time() > deadline:
        sys.exit("the other tool calls never started: the calls ran one after another")
    time.sleep(0.05)
print("{name}")
"""


@pytest.mark.asyncio
async def test_three_tools_run_concurrently(async_sandbox):
    tool = CodeTool(async_sandbox, timeout_s=60)
    names = ("search", "fetch", "summarise")
    results = await asyncio.gather(
        *(tool.run_python(RENDEZVOUS.format(name=name), f"{name}.py") for name in names)
    )
    for name, result in zip(names, results, strict=True):
        assert_exec(result).succeeded().stdout_equals(f"{name}\n")


@pytest.mark.asyncio
async def test_cancelled_tool_call_is_killed_in_the_sandbox(async_sandbox):
    tool = CodeTool(async_sandbox)
    hanging = "open('started', 'w').close()\nimport time\ntime.sleep(60)\n"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tool.run_python(hanging, "hang.py"), timeout=2)
    assert await async_sandbox.fs.exists("started")
    # The process the call started is gone, and the sandbox still works.
    ps = await async_sandbox.exec("ps -eo args")
    assert "hang.py" not in ps.stdout
    assert_exec(await async_sandbox.exec("echo alive")).stdout_equals("alive\n")


@pytest.mark.asyncio
async def test_agents_in_separate_sandboxes(async_sandbox_factory):
    # Several agents at once, each in a sandbox of its own, created concurrently.
    boxes = await asyncio.gather(*(async_sandbox_factory() for _ in range(3)))
    answers = await asyncio.gather(
        *(CodeTool(box).run_python(f"print({n} * {n})") for n, box in enumerate(boxes))
    )
    assert [a.stdout for a in answers] == ["0\n", "1\n", "4\n"]
