"""What a local template costs per sandbox: the copy of a 200-file template tree.

T1: a LocalSandbox created from a built 200-file template + one ``exec("true")``, against a plain
    empty LocalSandbox doing the same: the template copy cost.               target <= 1.5x
T2 (for information): ``dispose()`` of each, where removing the copied files is the difference
    (the local backend's removal, not the template layer's, decides it).

The template is built once before timing (the once-per-run cost, reported too). A and B alternate
round by round; medians are reported. ``--root`` puts the sandboxes elsewhere (e.g. /dev/shm).
Run: ``python benchmarks/templates.py [--rounds N] [--files N] [--root DIR]``. Exits 1 when T1
misses its target.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kode._template_local import LocalTemplate, LocalTemplateBuilder  # noqa: E402
from pytest_kode.backends.local import LocalSandbox, detect_isolation  # noqa: E402
from pytest_kode.options import TemplateSpec  # noqa: E402

TARGET = 1.5


def _interleaved(
    a: Callable[[], Callable[[], None]],
    b: Callable[[], Callable[[], None]],
    rounds: int,
    work_s: float = 0.0,
) -> tuple[float, float, float, float]:
    """Median times of a's and b's set-up, and of the clean-up each set-up returns.

    ``work_s`` (untimed) stands for what a test does with its sandbox between creations.
    """
    times: dict[str, list[float]] = {"a": [], "b": [], "a_end": [], "b_end": []}
    for index in range(rounds):
        order = (("a", a), ("b", b)) if index % 2 == 0 else (("b", b), ("a", a))
        for name, func in order:
            started = time.perf_counter()
            finish = func()
            times[name].append(time.perf_counter() - started)
            time.sleep(work_s)
            started = time.perf_counter()
            finish()
            times[name + "_end"].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    return median["a"], median["b"], median["a_end"], median["b_end"]


def _spec(files: int) -> TemplateSpec:
    # 20 directories of small files (about 1 KiB each, like a small source tree).
    script = (
        f"for i in $(seq 0 {files - 1}); do d=src/pkg$((i % 20)); mkdir -p $d; "
        "head -c 1024 /dev/urandom | base64 > $d/file$i.py; done"
    )
    return TemplateSpec(base="debian", build_commands=(script,))


def _lifecycle(root: Path, template: LocalTemplate | None) -> Callable[[], Callable[[], None]]:
    def once() -> Callable[[], None]:
        sandbox = LocalSandbox(root_dir=root, local_template=template).init()
        sandbox.exec("true")
        return sandbox.dispose

    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--root", type=Path, default=None, help="where sandboxes go")
    parser.add_argument(
        "--work-ms",
        type=float,
        default=0.0,
        help="untimed work per test (default 0: sandboxes created back to back, the worst case "
        "for the template copy, which is otherwise made ahead of need in the background)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kode-bench-templates-"))
    root = Path(tempfile.mkdtemp(prefix="kode-bench-root-", dir=args.root))
    try:
        started = time.perf_counter()
        template = LocalTemplateBuilder(work / "cache").prepare(_spec(args.files))
        build_s = time.perf_counter() - started
        count = sum(1 for path in template.tree.rglob("*") if path.is_file())
        print(
            f"isolation={detect_isolation()} template files={count} build={build_s:.2f}s (once) "
            f"sandboxes in {root}, {args.work_ms:g} ms of work per test"
        )
        plain, templated, plain_end, templated_end = _interleaved(
            _lifecycle(root, None), _lifecycle(root, template), args.rounds, args.work_ms / 1000
        )
        ratio = templated / plain
        status = "ok" if ratio <= TARGET else "MISSED"
        print(
            f"T1 create+exec: plain {plain * 1000:.2f} ms, from template {templated * 1000:.2f} ms "
            f"(copy {(templated - plain) * 1000:.2f} ms), ratio {ratio:.2f}x "
            f"(target <= {TARGET}x) {status}"
        )
        print(
            f"T2 dispose:     plain {plain_end * 1000:.2f} ms, from template "
            f"{templated_end * 1000:.2f} ms, ratio {templated_end / plain_end:.2f}x; whole life "
            f"cycle {(templated + templated_end) / (plain + plain_end):.2f}x"
        )
        return 0 if ratio <= TARGET else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
