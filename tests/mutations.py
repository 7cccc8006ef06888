"""Mutation check: plant plausible bugs one at a time and report which ones the tests catch.

A script, not a test module (pytest collects ``test_*.py`` only) and not part of CI: it
runs the relevant tests once per bug (minutes per bug on two busy cores: see docs/testing.md).

    python tests/mutations.py                     # every mutation; prints a Markdown table
    python tests/mutations.py cli_bgr_false       # some of them, by name
    python tests/mutations.py --list              # the mutations, without running anything

How: the repository's files (tracked and untracked-but-not-ignored, as they are in the
working tree) are copied into a temporary folder; each bug is planted there as an exact
text substitution (a text not found exactly once stops the script: rewrite the mutation
after the code changed), the tests expected to catch it run (``first``), then, if they
pass, its whole test files, with ``PYTHONPATH`` on the copy's ``src`` and ``pytest -x``,
and the file is put back. The working tree is never touched, and the
copy is removed however the script ends (Ctrl-C and SIGTERM included). In the copy
the shared conformance data (``../shared/conformance``, beside the repository) is not
found, so its tests skip: "caught" means caught by the repository's own tests. First the
unmutated copy must pass every selected file (with ``--quick-baseline``: every ``first``
test), else the table would mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what the planted bug does, for the report
    file: str  # under src/demoe/
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # test files under tests/
    first: tuple[str, ...] = ()  # the tests expected to catch it (file::name), run before the whole files


MUTATIONS = [
    # The three bugs an audit planted that the tests missed, and its expert swap.
    Mutation("cli_input_guard", "CLI refuses an output only when it is its own input (dest == src), not any input",
             "cli.py", "        if key in inputs:\n", "        if key == _key(src):\n", ("test_cli.py",),
             first=("test_cli.py::test_an_input_is_never_the_output_of_another_input",)),
    Mutation("routing_least_textured", "image routing votes with the least textured tiles", "routing.py",
             "order = np.argsort(-energy)[:ROUTING_TILES]", "order = np.argsort(energy)[:ROUTING_TILES]",
             ("test_routing.py", "test_api.py"),
             first=("test_routing.py::test_an_image_is_routed_from_its_most_textured_tiles",)),
    Mutation("cli_bgr_false", "CLI passes bgr=False for files OpenCV reads in BGR order", "cli.py",
             "bgr=image.bgr,", "bgr=False,", ("test_cli.py",),
             first=("test_cli.py::test_a_real_network_sees_each_files_channels_routing_and_intensities",)),
    Mutation("expert_swap_mixing", "the mixture sends expert 1's weight to expert 3 and back", "model.py",
             "for e, expert in enumerate(self.experts):", "for e, expert in zip((0, 3, 2, 1, 4), self.experts):",
             ("test_model.py",),
             first=("test_model.py::test_pinned_outputs_of_a_seeded_model",)),
    # Others of the same kinds: routing, channels, intensities, files, weights.
    Mutation("expert_swap_loading", "loading swaps the weights of experts 1 and 3", "checkpoint.py",
             "    model.load_state_dict(state_dict)\n",
             '    model.load_state_dict({re.sub(r"(experts\\.\\d+\\.experts\\.)([13])\\.", lambda m: '
             'f"{m.group(1)}{4 - int(m.group(2))}.", k): v for k, v in state_dict.items()})\n',
             ("test_model.py", "test_checkpoint.py"),
             first=("test_model.py::test_pinned_outputs_of_a_seeded_model",)),
    Mutation("top_k_not_renormalised", "the top-k routing weights are not renormalised to sum to one", "model.py",
             "top = top / top.sum(dim=1, keepdim=True)", "top = top", ("test_model.py", "test_api.py"),
             first=("test_model.py::test_top_k_mixes_and_renormalises",)),
    Mutation("blend_window_one_sided", "the tiles' blending windows rise at both ends (no partition of unity)",
             "tiling.py", "w[-axis.overlap :] = r[::-1]", "w[-axis.overlap :] = r", ("test_tiling.py", "test_api.py"),
             first=("test_tiling.py::test_windows_are_a_partition_of_unity",)),
    Mutation("integers_not_clipped", "integer results are rounded but not clipped (they wrap around)", "_arrays.py",
             "return np.clip(np.rint(x), info.min, top).astype(dtype)", "return np.rint(x).astype(dtype)",
             ("test_api.py",),
             first=("test_api.py::test_integers_near_their_maximum_stay_in_range",)),
    Mutation("offset_not_restored", "the result is scaled back but not shifted back to the input's intensities",
             "_arrays.py", "return to_dtype(y / ftype(1.0 / (hi - lo)) + ftype(lo), dtype)",
             "return to_dtype(y / ftype(1.0 / (hi - lo)), dtype)", ("test_api.py",),
             first=("test_api.py::test_twelve_bit_in_uint16_uses_percentiles",)),
    Mutation("low_light_mean_forced", "the mean is forced back even where the low-light expert restored", "api.py",
             'else "low_light" not in used', "else True", ("test_api.py",),
             first=("test_api.py::test_tile_routing_where_only_part_is_low_light",)),
    Mutation("holes_not_given_back", "NaN and masked pixels come back restored instead of as they were", "_plan.py",
             "            out[self.holes] = self.moved[self.holes]\n", "            pass\n", ("test_api.py",),
             first=("test_api.py::test_nan_policy_keep_restores_around_holes",)),
    Mutation("input_filled_in_place", "filling NaN holes writes into the caller's float array", "_arrays.py",
             "filled = arr.astype(float_for(arr.dtype))", "filled = arr.astype(float_for(arr.dtype), copy=False)",
             ("test_api.py",),
             first=("test_api.py::test_nan_policy_keep_restores_around_holes",)),
    Mutation("gray_first_channel", "a colour network's result for a gray image is its red channel, not the mean",
             "api.py", "block = block.mean(axis=0, keepdims=True)", "block = block[:1]", ("test_api.py",),
             first=("test_api.py::test_gray_is_replicated_and_averaged",)),
    Mutation("ensemble_unview_order", "self-ensemble undoes flip-and-transpose in the wrong order", "_runner.py",
             "    y = y.flip(flips) if flips else y\n    return y.transpose(-1, -2) if k >= 4 else y\n",
             "    y = y.transpose(-1, -2) if k >= 4 else y\n    return y.flip(flips) if flips else y\n",
             ("test_api.py",),
             first=("test_api.py::test_ensemble_averages_the_restored_flips_and_transposes",)),
    Mutation("dask_neighbours_not_added", "a dask chunk's pixels leave out the tiles of the next chunks that overlap "
             "them", "_chunks.py", "own[n : n + overlap] += own[n + overlap :]",
             "own[n : n + overlap] += 0 * own[n + overlap :]", ("test_scale_out.py", "test_api.py"),
             first=("test_scale_out.py::test_dask_gives_the_numpy_paths_result",)),
    Mutation("pickles_executed", "checkpoints are unpickled with weights_only=False", "checkpoint.py",
             "weights_only=True)", "weights_only=False)", ("test_checkpoint.py",),
             first=("test_checkpoint.py::test_pickled_code_is_refused_and_never_runs",)),
    Mutation("outputs_replaced_silently", "existing outputs are replaced without --overwrite", "cli.py",
             "if dest.exists() and not args.overwrite:", "if False:", ("test_cli.py",),
             first=("test_cli.py::test_existing_outputs_need_overwrite",)),
    Mutation("classify_ignores_tlc", "classify_blur() routes with global pooling whatever deblur() uses",
             "routing.py", "streams=streams, bgr=bgr, preserve_mean=None, tlc=tlc,",
             "streams=streams, bgr=bgr, preserve_mean=None, tlc=False,", ("test_routing.py",),
             first=("test_routing.py::test_probabilities_are_the_ones_deblur_routes_with",)),
]


def copy_repository(dest: Path) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) copied under ``dest/repo``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    repo = dest / "repo"
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    return repo


def run_tests(repo: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """("passed", seconds), or the first failing test (or what stopped pytest) and the seconds.

    ``tests``: files or node ids under tests/."""
    env = {k: v for k, v in os.environ.items() if k != "DEMOE_CONFORMANCE"}
    env.update(PYTHONPATH=str(repo / "src"), QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-rfE",
                              *(f"tests/{f}" for f in tests)], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if out.returncode == 0:
        return "passed", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (tests/\S+)", out.stdout, re.M)
    if failed:
        return failed[0].removeprefix("tests/"), seconds
    return f"pytest exit status {out.returncode}: {(out.stdout + out.stderr).strip().splitlines()[-1:]}", seconds


def check(repo: Path, m: Mutation, timeout: float) -> tuple[str, float]:
    """The tests' verdict on the planted ``m``: its ``first`` tests, then (if they pass) its whole files."""
    seconds = 0.0
    for tests in ([*m.first], [*m.tests]) if m.first else ([*m.tests],):
        result, s = run_tests(repo, tests, timeout)
        seconds += s
        if result != "passed":
            break
    return result, seconds


def plant(repo: Path, m: Mutation) -> str:
    """Write ``m`` into the copy; returns the file's original text. SystemExit if ``m.old`` is not there once."""
    path = repo / "src" / "demoe" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: its text is found {text.count(m.old)} times in src/demoe/{m.file}, "
                         f"not once; rewrite it for the current source:\n{m.old!r}")
    path.write_text(text.replace(m.old, m.new))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run (default 1200)")
    parser.add_argument("--quick-baseline", action="store_true",
                        help="check the unmutated source with the mutations' first tests only, not their whole "
                             "files (10 min less on two cores; the whole files must then be known to pass)")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug} (src/demoe/{m.file}; {', '.join(m.tests)})")
        return 0

    # Interrupted (Ctrl-C, or SIGTERM turned into SystemExit here), the copy is still removed and the
    # running pytest killed; the working tree is never written to in any case.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="demoe-mutations-") as tmp:
        repo = copy_repository(Path(tmp))
        for m in chosen:  # every text is checked before anything runs
            (repo / "src" / "demoe" / m.file).write_text(plant(repo, m))
        if args.quick_baseline:
            files = list(dict.fromkeys(f for m in chosen for f in m.first))
        else:
            files = sorted({f for m in chosen for f in m.tests})
        result, seconds = run_tests(repo, files, args.timeout)
        print(f"unmutated: {', '.join(files)} {result} ({seconds:.0f} s)", file=sys.stderr)
        if result != "passed":
            print(f"the unmutated source fails {result}: fix that first", file=sys.stderr)
            return 1
        rows = []
        for m in chosen:
            original = plant(repo, m)
            try:
                result, seconds = check(repo, m, args.timeout)
            finally:
                (repo / "src" / "demoe" / m.file).write_text(original)
            caught = result != "passed"
            rows.append(f"| `{m.name}` | {m.bug} | `{m.file}` | {', '.join(m.tests)} | "
                        f"{'**caught**: ' + result if caught else 'MISSED'} | {seconds:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    missed = sum("MISSED" in r for r in rows)
    minutes = (time.perf_counter() - t_start) / 60
    command = " ".join(["python tests/mutations.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["| mutation | planted bug | in | tests run | result (first failing test) | s |", "|---" * 6 + "|", *rows,
             "", (f"{len(rows) - missed} of {len(rows)} caught; `{command}`, {time.strftime('%Y-%m-%d')}, "
                  f"{platform.machine()} CPU, {os.cpu_count()} cores, {minutes:.0f} min.")]
    print("\n".join(lines))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
