"""What fills the temporaries at the peak: the largest buffers live there, read from XLA's own dump of a compile.

Public surface: `explain_peak(compile_with_options, top) -> dict` and `peak_buffers(dump_dir, top) -> dict`.

`compile_with_options(options)` compiles the step with extra XLA debug options; here they dump the optimized HLO,
its buffer assignment and its live ranges (XLA:CPU text files) into a temporary directory. Each temporary buffer is
a slot (offset, size) of the one preallocated temp block; a slot is live from the first to the last program point
of any value placed in it. At the program point where the live slots cover the most bytes, the `top` largest are
listed with their shape, the values placed there and the first op_name among them (JAX's name stack: which
layer, which op, `transpose(jvp(...))` = backward). This reads text that XLA writes for people, so it degrades to
{"error": ...} rather than failing the plan if a future XLA writes it differently.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import tempfile
from typing import Callable, Iterator

VALUE = re.compile(r"\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (.*)")
LIVE = re.compile(r"\s+(\S+):(\d+)-(\d+)$")
OP_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name=\"([^\"]*)\"")


def _temp_values(buffer_assignment: str) -> dict[str, tuple[int, int, str]]:
    """{value name: (size, offset, shape)} of the preallocated temp allocation."""
    block = re.search(r"^allocation \d+: size \d+, preallocated-temp:\n(.*?)(?=^allocation |\Z)", buffer_assignment,
                      re.M | re.S)
    values = {}
    for line in (block.group(1).splitlines() if block else []):
        match = VALUE.match(line)
        if match:
            name = match.group(1) if "{" in match.group(1) else match.group(1) + "{}"
            values[name] = (int(match.group(2)), int(match.group(3)), match.group(4).split("{")[0])
    return values


def _covered(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(intervals):
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


def peak_buffers(dump_dir: str, top: int) -> dict:
    """The `top` largest temp slots live at the peak program point of the module dumped in `dump_dir`."""
    assignments = glob.glob(os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt"))
    if not assignments:
        return {"error": f"no buffer assignment dumped in {dump_dir}"}
    assignment = max(assignments, key=os.path.getsize)          # the train step, not a helper computation
    prefix = assignment[:-len("-buffer-assignment.txt")]
    values = _temp_values(open(assignment).read())
    live = {}
    for line in open(prefix + "-live-range.txt"):
        match = LIVE.match(line)
        if match and match.group(1) in values:
            live[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    op_names = {}
    for line in open(prefix + ".txt"):
        match = OP_NAME.match(line)
        if match:
            op_names[match.group(1)] = match.group(2)
    if not live:
        return {"error": "no live ranges for the temp values (unknown dump format)"}
    slots = collections.defaultdict(list)
    for name, (start, stop) in live.items():
        size, offset, shape = values[name]
        slots[(offset, size)].append((start, stop, name, shape))
    spans = {slot: (min(v[0] for v in vs), max(v[1] for v in vs), sorted(vs)) for slot, vs in slots.items()}
    points = sorted({point for start, stop, _ in spans.values() for point in (start, stop)})

    def live_bytes(point):
        return _covered([(o, o + s) for (o, s), (start, stop, _) in spans.items() if start <= point <= stop])

    peak_point = max(points, key=live_bytes)
    at_peak = sorted((slot for slot, (start, stop, _) in spans.items() if start <= peak_point <= stop),
                     key=lambda slot: -slot[1])
    listed = []
    for offset, size in at_peak[:top]:
        members = spans[(offset, size)][2]
        named = [op_names[m[2].split("{")[0]] for m in members if m[2].split("{")[0] in op_names]
        listed.append({"bytes": size, "shape": members[0][3], "values": [m[2] for m in members[:4]],
                       "op_name": named[0] if named else ""})
    return {"live_bytes_at_peak": live_bytes(peak_point), "buffers": listed}


@contextlib.contextmanager
def _no_persistent_cache() -> Iterator[None]:
    """A compile that the persistent compilation cache answers runs no XLA and dumps nothing (its key ignores the
    dump options): switch the cache off around it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()          # the cache decides once whether it is in use; make it decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def explain_peak(compile_with_options: Callable[[dict], object], top: int) -> dict:
    """Compiles once more with a dump and returns `peak_buffers` of it (or {"error": ...})."""
    with tempfile.TemporaryDirectory(prefix="llava_plan_dump_") as dump_dir:
        with _no_persistent_cache():
            compile_with_options({"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True})
        try:
            return peak_buffers(dump_dir, top)
        except (OSError, ValueError) as e:
            return {"error": f"could not read XLA's dump: {e}"}
