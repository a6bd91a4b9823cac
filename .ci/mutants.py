"""A small mutation check: named bugs that matter, planted one at a time, each run against the tests meant to catch
it. The check fails when a mutant survives (its tests all pass) and prints which test killed each.

    python .ci/mutants.py              # every mutant (tests/test_mutants.py runs this in the suite)
    python .ci/mutants.py NAME ...     # some of them

A mutant is a function that plants its bug with a pytest ``MonkeyPatch`` on a small, named behaviour of the engine
(a function or method with a stable meaning: the seed of clip k, the start camera of a trajectory, the cache a
resumed scene opens ...), its one-line docstring says which bug it mimics, and ``KILLERS`` names the tests that
must catch it (in-process tests: a subprocess they start does not see the patch). One worker process plants the
mutants in turn, runs each one's tests with ``pytest.main`` and takes it out again (a single start-up for all);
``WORLDSTEREO_MUTANT=NAME pytest ...`` plants one for any pytest run (``tests/conftest.py``). When the engine is
restructured, re-point a mutant at the function that now holds its behaviour.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ENV = "WORLDSTEREO_MUTANT"
MUTANTS: dict[str, Callable] = {}
KILLERS: dict[str, tuple[str, ...]] = {}


def mutant(*killers: str):
    """Register the decorated function as a mutant caught by the tests ``killers`` (paths under tests/)."""
    def register(fn):
        MUTANTS[fn.__name__], KILLERS[fn.__name__] = fn, tuple(f"tests/{k}" for k in killers)
        return fn
    return register


# ---- the five bugs that once went unnoticed --------------------------------------------------------------------
@mutant("test_scene.py::test_resume_after_an_interruption_finishes_as_an_uninterrupted_run")
def resume_opens_the_first_clips_cache(mp):
    """A resumed scene reopens the first clip's 3D cache instead of the last committed one."""
    from engine import jobfolder

    real = jobfolder.JobFolder.load_state

    def load_state(self, manifest):
        older = copy.deepcopy(manifest)
        older["state"]["cache"] = jobfolder.cache_file(min(1, len(manifest["clips"])))
        return real(self, older)

    mp.setattr(jobfolder.JobFolder, "load_state", load_state)


@mutant("test_scene.py::test_resume_after_an_interruption_finishes_as_an_uninterrupted_run",
        "test_scene.py::test_cli_tiny_random_runs_the_network_loop")
def every_clip_uses_the_scene_seed(mp):
    """Clip k draws its noise from the scene's seed instead of seed + k."""
    import engine.scene

    mp.setattr(engine.scene, "clip_seed", lambda seed, index: seed)


@mutant("test_scene.py::test_every_start_view_plans_from_its_own_direction")
def panorama_trajectories_start_at_view0(mp):
    """Every panorama trajectory starts at view0, whatever start view it names."""
    from engine.scene import Scene

    real = Scene._start_for
    mp.setattr(Scene, "_start_for", lambda self, name: real(self, re.sub(r"^view\d+:", "view0:", name)))


@mutant("test_resident.py::test_switching_variants_loads_shared_networks_once")
def variant_switch_keeps_the_old_camera_branch(mp):
    """Switching Fast <-> Quality keeps the previous variant's camera branch weights."""
    from engine.pipeline import ClipPipeline

    real = ClipPipeline.switch_variant

    def switch_variant(self, *args, **kwargs):
        old = {k: v.clone() for k, v in self.transformer.controlnet.state_dict().items()}
        real(self, *args, **kwargs)
        self.transformer.controlnet.load_state_dict(old)

    mp.setattr(ClipPipeline, "switch_variant", switch_variant)


@mutant("test_bad_inputs.py::test_every_preset_plans_at_its_maximum_and_refuses_beyond_it",
        "test_bad_inputs.py::test_trajectory_parameters_plan_or_refuse")
def amount_check_refuses_the_maximum(mp):
    """The trajectory-amount validation refuses a valid amount: the preset's maximum itself."""
    from engine.geometry import trajectories

    real = trajectories.amount_in_range
    mp.setattr(trajectories, "amount_in_range",
               lambda spec, amount: real(spec, amount) and amount != spec.max_amount)


# ---- conventions and choices of the loop -------------------------------------------------------------------------
@mutant("test_conditioning.py::test_own_render_gives_holes_where_the_zbuffer_is_empty")
def render_mask_marks_covered_pixels(mp):
    """The render mask is 1 where a point landed instead of 1 in the holes (the official polarity)."""
    from engine import conditioning

    real = conditioning.render_video_and_mask

    def flipped(image, render_image, covered):
        video, mask = real(image, render_image, covered)
        mask = 1 - mask
        mask[:, :, 0] = 0
        return video, mask

    mp.setattr(conditioning, "render_video_and_mask", flipped)


@mutant("test_conditioning.py::test_plucker_map_matches_golden")
def plucker_channels_moment_first(mp):
    """The Plücker map's channels come as (o x d, d) instead of the release's (d, o x d)."""
    import torch

    from engine import conditioning

    real = conditioning.plucker_map
    mp.setattr(conditioning, "plucker_map", lambda *a, **kw: torch.roll(real(*a, **kw), 3, dims=0))


@mutant("test_conditioning.py::test_camera_codes_match_golden_with_one_and_two_references")
def camera_codes_real_part_last(mp):
    """Camera codes hold the quaternion as (x, y, z, w) instead of the release's (w, x, y, z)."""
    import torch

    from engine import conditioning

    real = conditioning.camera_codes
    mp.setattr(conditioning, "camera_codes", lambda w2c: torch.cat([real(w2c)[:, 1:4], real(w2c)[:, :1],
                                                                    real(w2c)[:, 4:]], dim=1))


@mutant("test_scene.py::test_resume_after_an_interruption_finishes_as_an_uninterrupted_run")
def kept_frames_evenly_spaced(mp):
    """A clip gives the memory bank evenly spaced frames from frame 1 instead of the release's sample_align_nframe."""
    from engine.scene import Scene

    def evenly(self, n):
        k = min(self.settings.keep_frames, n - 1)
        return sorted({int(round(1 + i * (n - 2) / max(k - 1, 1))) for i in range(k)}) if k > 0 else []

    mp.setattr(Scene, "_kept_indices", evenly)


@mutant("test_scene.py::test_resume_after_an_interruption_finishes_as_an_uninterrupted_run")
def resume_forgets_the_clips_memory(mp):
    """A resumed scene's memory bank holds its seed frames only, not the frames earlier clips added."""
    from engine import jobfolder
    from engine.geometry.memory import MemoryBank

    real = jobfolder.JobFolder.load_state

    def load_state(self, manifest):
        image, start, cache, _ = real(self, manifest)
        return image, start, cache, MemoryBank.load(self.path / jobfolder.BANK_START)

    mp.setattr(jobfolder.JobFolder, "load_state", load_state)


# ---- the memory from the second clip on (the release's rule, official scenes) ------------------------------------
@mutant("test_official_scene.py::test_corridor_runs_as_the_release_runs_it",
        "test_retrieval_release.py::test_ref_index_is_the_first_target_that_took_each_frame")
def ref_index_by_last_pick(mp):
    """A reference is placed at the last target that took it instead of the first (the release's ref_index)."""
    from engine.geometry import retrieval

    def last_picks(scores):
        picks = [int(j) for j in scores.argmax(dim=1).tolist()]
        last = {}
        for row, j in enumerate(picks):
            last[j] = row
        first = list(dict.fromkeys(picks))
        return picks, first, [last[j] for j in first]

    mp.setattr(retrieval, "_argmax_picks", last_picks)


@mutant("test_official_scene.py::test_an_official_scene_resumes_and_reverts_as_any_scene")
def resume_forgets_the_bank_labels(mp):
    """A reopened memory bank names its frames by the clip that added them, losing the labels the shortcut rules read."""
    from engine.geometry.memory import MemoryBank

    real = MemoryBank.load.__func__

    def load(cls, folder):
        bank = real(cls, folder)
        bank.labels = list(bank.sources)
        return bank

    mp.setattr(MemoryBank, "load", classmethod(load))


@mutant("test_official_scene.py::test_each_trajectory_is_generated_with_its_own_prompt",
        "test_official_scene.py::test_corridor_runs_as_the_release_runs_it")
def trajectory_prompts_ignored(mp):
    """Every trajectory is generated with the scene's prompt, not its own (an official trajectory's caption)."""
    from engine.scene import Scene

    mp.setattr(Scene, "clip_prompt", lambda self, request: self.settings.prompt)


# ---- the clip writer behind the loop (engine.scene.ClipWriter) ----------------------------------------------------
@mutant("test_background_writer.py::test_a_failed_write_mid_scene_ends_in_one_sentence_and_resumes")
def clip_committed_before_its_files(mp):
    """The writer commits a clip (its cache file and the manifest) before the clip's files are written."""
    from engine.scene import ClipWriter

    def commit_first(self, clip):
        folder = self.scene.folder
        self.manifest = folder.commit_clip(self.manifest, clip.record(), clip.committed_cache)
        folder.write_clip(clip.name, self.scene.clip_content(clip))
        self.records.append(clip.record())

    mp.setattr(ClipWriter, "_commit", commit_first)


# ---- running them --------------------------------------------------------------------------------------------------
def plant(name: str, mp) -> None:
    """Plant mutant ``name`` with the MonkeyPatch ``mp`` (called by tests/conftest.py when WORLDSTEREO_MUTANT is
    set)."""
    if name not in MUTANTS:
        raise SystemExit(f"{ENV}={name!r} names no mutant; choose one of {', '.join(MUTANTS)}.")
    MUTANTS[name](mp)


RESULT = "mutant-result: "  # how the worker process marks its result lines among pytest's output
CONTROL = "(no mutant)"  # the worker's first run: every mutant's tests, nothing planted; all must pass


def _worker(names: list[str]) -> None:
    """Run every mutant's tests once with nothing planted (the control), then plant each mutant in turn in this
    process, run its tests with ``pytest.main`` and take it out again: one start-up (torch, diffusers, the test
    modules) for all of them. Prints one ``RESULT`` line per run."""
    import json

    import pytest

    os.chdir(REPO)
    for name in [CONTROL, *names]:
        failed: list[str] = []

        class Collect:
            def pytest_runtest_logreport(self, report):
                if report.failed:
                    failed.append(report.nodeid)

        mp = pytest.MonkeyPatch()
        t0 = time.perf_counter()
        tests = sorted({t for n in names for t in KILLERS[n]}) if name == CONTROL else KILLERS[name]
        try:
            if name != CONTROL:
                plant(name, mp)
            rc = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                              *(["-x"] if name != CONTROL else []), *tests], plugins=[Collect()])
        finally:
            mp.undo()
        # a run that ended otherwise than by failing tests (a usage or collection error) kills nothing
        killed = failed if int(rc) == int(pytest.ExitCode.TESTS_FAILED) else []
        print(RESULT + json.dumps({"name": name, "killed_by": killed, "exit": int(rc),
                                   "seconds": time.perf_counter() - t0}), flush=True)


def run(names: list[str]) -> dict[str, dict]:
    """Run the mutants ``names`` in one worker process: ``{name: {"killed_by": [...], "seconds": s, ...}}``."""
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    env.pop("PYTEST_ADDOPTS", None)  # an xdist worker's PYTEST_XDIST_WORKER stays: one torch thread, as there
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *names], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
            results[result.pop("name")] = result
    for name in names:  # a worker that died on the way leaves the rest unrun: they count as survivors
        results.setdefault(name, {"killed_by": [], "exit": done.returncode, "seconds": 0.0,
                                  "output": (done.stdout + done.stderr)[-2000:]})
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    names = argv or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        print(f"error: no mutant named {', '.join(unknown)}; choose from {', '.join(MUTANTS)}.", file=sys.stderr)
        return 2
    results = run(names)
    control = results.pop(CONTROL, {"killed_by": ["the worker did not run"], "exit": -1})
    if control["killed_by"] or control["exit"] != 0:
        print(f"error: the mutants' tests fail with no mutant planted ({', '.join(control['killed_by'])}); "
              "a kill would mean nothing.")
        return 1
    survivors = []
    for name in names:
        result, doc = results[name], (MUTANTS[name].__doc__ or "").strip()
        if result["killed_by"]:
            print(f"killed    {name} ({result['seconds']:.0f} s) by {', '.join(result['killed_by'])}\n"
                  f"          {doc}")
        else:
            survivors.append(name)
            print(f"SURVIVED  {name} (pytest exit {result['exit']}): {doc}{result.get('output', '')}")
    print(f"{len(names) - len(survivors)} of {len(names)} mutants killed"
          + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
