"""Random command lines for every subcommand against tiny models (issue 18): the workspace and the
hypothesis strategies that tests/test_fuzz_cli.py (a few hundred examples in CI) and
benchmarks/fuzz_cli.py (10,000 and more) share.

A run is one `ctxdiff.cli.main(argv)` in this process (no interpreter start, so thousands fit) with
the workspace as its working folder. The workspace holds tiny files a user could pass: t2i bundles
(one trained on the shapes world as far as its header says), a Stable Diffusion checkpoint, a
video, an image, an inversion, a tuned file, a run folder, recipes, text files good and bad, damaged
model files, and output paths that cannot be used (a file, a path under a file, /proc). `check`
states what every run must do:

- return 0, 1 or 2 (docs/exit-codes.md) and raise nothing: an exception escaping main() is the
  traceback a user would see;
- on failure, end stderr with one line "error: ...";
- leave every file that existed before it byte-identical, unless --force was given (or --resume,
  and then only the files a run writes: checkpoints, its log, its model files).

After each run the workspace is put back as it was (new paths removed, changed files restored), so
every example starts from the same files and a failure replays.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

SUBCOMMANDS = ("generate", "shapes", "train", "tune-video", "invert", "edit", "evaluate")
EXIT_CODES = {0, 1, 2}
SRC = "a red circle moving to the right"

TINY_RECIPE = """\
output: {output}
model:
  clip: {{arch: tiny-clip}}
  unet: {{image_size: 16, base_channels: 16, channel_mults: [1, 2], num_res_blocks: 1, attention_levels: [1],
          heads: 2, text_dim: 32, pooled_dim: 32, timesteps: 100}}
  adapter: {{x_shape: [3, 16, 16], patch_size: 4, width: 32, heads: 2, blocks: 1, text_dim: 32, timesteps: 100}}
diffusion: {{schedule: cosine, timesteps: 100, cond_drop_prob: 0.2}}
data: {{source: shapes, image_size: 16, shapes_count: 8}}
train: {{steps: 1, batch_size: 2, lr: 0.001, warmup_steps: 0, ema_decay: 0.9, checkpoint_every: 1, keep_last: 1,
         sample_every: 0, log_every: 1}}
sample: {{steps: 2, sr_steps: 2, guidance: 2.0}}
preview_prompts: ["a red circle"]
"""


# --------------------------------------------------------------------------- the workspace

def tiny_bundle(path: Path, seed: int, extra: dict | None = None) -> Path:
    """An untrained 16x16 t2i bundle (tiny CLIP, U-Net and adapter; T = 100), weights perturbed."""
    from tiny_video import tiny_bundle as bundle

    from ctxdiff.recipes import SampleConfig

    return bundle(path, seed, noise=0.02, extra=extra, sample=SampleConfig(steps=2, sr_steps=2))


@dataclass
class Outcome:
    argv: list[str]
    code: int | None
    out: str
    err: str
    raised: str | None = None          # the traceback of an exception that escaped main()
    changed: list[str] = field(default_factory=list)   # pre-existing files changed, where that is not allowed

    def problems(self) -> list[str]:
        found = []
        if self.raised is not None:
            found.append(f"raised instead of exiting:\n{self.raised}")
        elif self.code not in EXIT_CODES:
            found.append(f"exit code {self.code}, not 0, 1 or 2")
        if "Traceback" in self.err:
            found.append("a traceback on stderr")
        if self.code not in (0, None):
            lines = [line for line in self.err.splitlines() if line.strip()]
            if not lines or not lines[-1].startswith("error: "):
                found.append("a failure whose stderr does not end with one 'error: ...' line")
        if self.changed:
            found.append(f"pre-existing files changed without --force: {self.changed}")
        return found

    def describe(self) -> str:
        return (f"ctxdiff {' '.join(self.argv)}\nexit {self.code}\n--- stderr ---\n{self.err[-3000:]}\n"
                + "\n".join(self.problems()))


class Workspace:
    """The tiny files (see the module docstring), built once under `root`; `run` runs one command
    line there and puts everything back afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.pristine = self.root.parent / f"{self.root.name}-pristine"
        if not (self.pristine / ".built").is_file():
            self._build()
        if self.root.exists():                     # what an interrupted run may have left
            _chmod_tree(self.root)
            shutil.rmtree(self.root)
        shutil.copytree(self.pristine, self.root, symlinks=True)
        self.initial = self._walk()
        self._hashes: dict[tuple, str] = {}

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        import numpy as np
        from PIL import Image

        from ctxdiff.cli import main
        from ctxdiff.data.video import write_video
        from ctxdiff.models.latent import save_compvis
        from ctxdiff.shapes.datasets import write_samples
        from ctxdiff.shapes.world import moving_shape_video
        from tiny_sd import tiny_sd_models

        if self.root.exists():
            shutil.rmtree(self.root)
        a, s = self.root / "assets", self.root / "scratch"
        a.mkdir(parents=True)
        s.mkdir()
        tiny = tiny_bundle(a / "tiny.safetensors", 0, extra={"recipe": {"data": {"source": "shapes"}}})
        tiny_bundle(a / "plain.safetensors", 1)
        save_compvis(a / "tiny-sd.safetensors", tiny_sd_models(0))
        clip = moving_shape_video("a large red circle moving to the right on a gray background", frames=4, size=16,
                                  seed=7)
        video = write_video(a / "video", clip.frames, fps=8, metadata={"prompt": SRC})
        Image.fromarray(clip.frames[0]).save(a / "image.png")
        quiet = ["-q", "--device", "cpu"]
        assert main([*quiet, "invert", str(video), "-m", str(tiny), "--steps", "3", "--frames", "4", "--stride", "1",
                     "--attention", "--out", str(a / "inv.safetensors")]) == 0
        assert main([*quiet, "tune-video", str(video), "-m", str(tiny), "--steps", "1", "--frames", "4", "--stride",
                     "1", "--out", str(a / "tunerun")]) == 0
        shutil.copy(a / "tunerun" / "tuned.safetensors", a / "tuned.safetensors")
        (a / "recipe.yaml").write_text(TINY_RECIPE.format(output="run"))      # relative: in the working folder
        (a / "prompts.txt").write_text("a red circle\na blue square above a green cross\n", encoding="utf-8")
        (a / "latin1.txt").write_bytes("un cercle rouge \xe9t\xe9\n".encode("latin-1"))
        (a / "binary.bin").write_bytes(bytes(range(256)) * 4)
        (a / "empty.txt").write_text("")
        write_samples(a / "real", 4, seed=0, size=16)
        assert main([*quiet, "evaluate", "--metric", "fid", "--real", str(a / "real"), "--save-stats",
                     str(a / "stats.npz"), "--features", f"clip:tiny-clip:{tiny}"]) == 0
        from ctxdiff.checkpoints import save_bundle

        import torch
        save_bundle(a / "damaged.safetensors", {"clip": {"w": torch.zeros(2)}}, {}, kind="t2i")
        (a / "truncated.safetensors").write_bytes(tiny.read_bytes()[:5000])
        (a / "text.safetensors").write_text("not a model\n")
        (s / "afile").write_text("a file\n")
        (s / "full").mkdir()
        (s / "full" / "mine.txt").write_text("keep me\n")
        (s / "empty").mkdir()
        (s / "keep.json").write_text('{"mine": true}\n')
        (s / "keep.npz").write_bytes(b"my statistics")
        (s / "keep.mp4").write_bytes(b"my video")
        (s / "keep.safetensors").write_bytes(b"my inversion")
        (s / "ro").mkdir()
        (s / "ro").chmod(0o555)
        # a run of this recipe (train --resume continues it) beside a folder of a user's files
        assert main([*quiet, "train", "--recipe", str(a / "recipe.yaml"), "--set", f"output={s / 'oldrun'}"]) == 0
        (s / "userrun").mkdir()
        for name in ("recipe.yaml", "model.safetensors", "metrics.jsonl"):
            (s / "userrun" / name).write_text(f"the user's {name}\n")
        np.save(s / "array.npy", np.zeros(3))
        (self.root / ".built").write_text("")
        if self.pristine.exists():
            _chmod_tree(self.pristine)
            shutil.rmtree(self.pristine)
        shutil.copytree(self.root, self.pristine, symlinks=True)

    # ------------------------------------------------------------------ state

    def _walk(self) -> dict[str, tuple]:
        """relative path -> (kind, size, mtime_ns, inode) of everything under root."""
        found = {}
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder) / name
                st_ = path.lstat()
                kind = "dir" if path.is_dir() and not path.is_symlink() else "file"
                found[str(path.relative_to(self.root))] = (kind, st_.st_size, st_.st_mtime_ns, st_.st_ino)
        return found

    def _hash(self, rel: str, key: tuple, base: Path | None = None) -> str:
        cached = self._hashes.get((rel, key))
        if cached is None:
            cached = hashlib.sha256(((base or self.root) / rel).read_bytes()).hexdigest()
            self._hashes[(rel, key)] = cached
        return cached

    def _changed_files(self) -> list[str]:
        """Initial files whose bytes differ now (or that are gone)."""
        now = self._walk()
        changed = []
        for rel, key in self.initial.items():
            if key[0] != "file":
                continue
            current = now.get(rel)
            if current is None or current[0] != "file":
                changed.append(rel)
            elif current != key and self._hash(rel, current) != self._hash(rel, key, self.pristine):
                changed.append(rel)
        return changed

    def restore(self) -> None:
        """Back to the built workspace: new paths removed, changed or removed files copied back."""
        now = self._walk()
        for rel in sorted(set(now) - set(self.initial), key=len):
            path = self.root / rel
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
        for rel in self._changed_files():
            target = self.root / rel
            if not os.path.lexists(self.pristine / rel):     # scratch/drawn.yaml: removed after the run
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.pristine / rel, target)
        self.initial = self._walk()

    # ------------------------------------------------------------------ running

    def run(self, argv: list[str], stdin: bytes = b"", recipe: str | None = None) -> Outcome:
        """`ctxdiff argv` here, stdin `stdin`; `recipe` (text) is written to scratch/drawn.yaml first."""
        from ctxdiff.cli import main

        if recipe is not None:
            drawn = self.root / "scratch" / "drawn.yaml"
            drawn.write_text(recipe, encoding="utf-8", errors="surrogateescape")
            self.initial = self._walk()
            self._hash("scratch/drawn.yaml", self.initial["scratch/drawn.yaml"])   # its bytes before the run
        out, err = io.StringIO(), io.StringIO()
        cwd, old_stdin = os.getcwd(), sys.stdin
        code, raised = None, None
        try:
            os.chdir(self.root / "scratch")
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
            with redirect_stdout(out), redirect_stderr(err):
                code = main(argv)
        except BaseException:       # noqa: BLE001 -- anything escaping main() is what the check is for
            raised = traceback.format_exc()
        finally:
            os.chdir(cwd)
            sys.stdin = old_stdin
        outcome = Outcome(argv, code, out.getvalue(), err.getvalue(), raised)
        outcome.changed = [rel for rel in self._changed_files() if not _may_change(rel, argv)]
        self.restore()
        if recipe is not None:
            (self.root / "scratch" / "drawn.yaml").unlink(missing_ok=True)
            self.initial = self._walk()
        return outcome

    # ------------------------------------------------------------------ paths for the strategies

    def asset(self, name: str) -> str:
        return str(self.root / "assets" / name)

    def scratch(self, name: str) -> str:
        return str(self.root / "scratch" / name)


def _chmod_tree(root: Path) -> None:
    for folder, _, _ in os.walk(root):
        os.chmod(folder, 0o755)


def _may_change(rel: str, argv: list[str]) -> bool:
    from ctxdiff.training.trainer import RUN_OUTPUTS

    if "--force" in argv:
        return True
    return "--resume" in argv and any(part in RUN_OUTPUTS for part in Path(rel).parts)


# --------------------------------------------------------------------------- strategies

GOOD_PROMPTS = ("a red circle", "a blue square above a green cross", "a cat in armor", SRC)
ODD_TEXT = ("", " ", "[/]", "[bold]x", ":smile:", "a\x00b", "\u202e\u0301", "日本語のプロンプト", "a\tb", "-", "--json",
            "a " * 200, "é", "\U0001F600", "a\rb")


def _text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short random text without path separators (a drawn token never names a path outside the workspace)."""
    return st.text(st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)), max_size=max_size) \
        .filter(lambda t: t not in (".", ".."))


@dataclass(frozen=True)
class Values:
    """How to draw an option's value: `good` ones (an example drawn valid takes only these) and
    `bad` ones (refused, or wrong in some way the command must report)."""

    good: st.SearchStrategy[str]
    bad: st.SearchStrategy[str] | None = None

    def any(self) -> st.SearchStrategy[str]:
        return self.good if self.bad is None else st.one_of(self.good, self.bad)


def pick(good: list[str], bad: list[str] = ()) -> Values:
    return Values(st.sampled_from(good), st.sampled_from(list(bad)) if bad else None)


PROMPTS = Values(st.sampled_from(GOOD_PROMPTS), st.one_of(st.sampled_from(ODD_TEXT), _text()))
REFUSED_INTS = ("0", "-1", "2**70", "1e3", "x", "", "-99999999999999999999")


def ints(good: tuple[int, int], bad: tuple[str, ...] = ("100000", str(2**64), str(2**63))) -> Values:
    """An integer option: a small good value; bad: one that can never be valid, or one of `bad`,
    values the option refuses (its range, the model's T). Leave out of `bad` values that are valid
    but mean hours of work (`shapes --n 100000`)."""
    return Values(st.integers(*good).map(str), st.sampled_from(REFUSED_INTS + bad))


def counts(good: tuple[int, int]) -> Values:
    """A how-many option (-n, --n, --batch-size, tuning --steps): no huge values, which are valid."""
    return ints(good, ())


def floats(good: tuple[float, ...]) -> Values:
    return Values(st.sampled_from([str(g) for g in good]),
                  st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "1e400", "x", "1e308", "-0.0"]),
                            st.floats(allow_nan=True, allow_infinity=True).map(repr)))


SEEDS = Values(st.integers(0, 2**64 - 1).map(str), st.sampled_from(["-1", str(2**64), str(2**70), "0x10", "seed"]))
DEVICES = pick(["cpu", "auto"], ["meta", "mps", "xla", "cuda:99", "cuda", "gpu", "cpu:0", ""])


@dataclass(frozen=True)
class Option:
    """A flag and how to draw its value (None: a flag without value)."""

    flag: str
    values: Values | None = None


class Strategies:
    """Command lines for `ws` (paths of its files), one builder per subcommand. One example in three
    is drawn valid (good values only, no stray tokens): it runs to the end or stops at what only the
    files can tell (a model whose T is smaller, a video with fewer frames); the others mix in bad
    values, paths and tokens. `cheap`: work that succeeds is kept to a step (CI)."""

    def __init__(self, ws: Workspace, cheap: bool = True) -> None:
        self.ws, self.cheap = ws, cheap
        a, s = ws.asset, ws.scratch
        self.valid = False                # set per example by `command_line`
        self.models = pick([a("tiny.safetensors"), a("plain.safetensors")],
                           [a("tiny-sd.safetensors"), a("damaged.safetensors"), a("truncated.safetensors"),
                            a("text.safetensors"), a("inv.safetensors"), a("tuned.safetensors"), a("recipe.yaml"),
                            a("missing.safetensors"), a("real"), "/proc/ctxdiff-missing.safetensors"])
        self.folders_out = pick([s("new"), s("new/deeper"), s("empty"), "rel-out"],
                                [s("afile"), s("afile/sub"), s("full"), s("ro/new"), "/proc/ctxdiff-out", s("oldrun"),
                                 s("userrun"), a("real"), "/dev/null"])
        self.files_out = pick([s("new.json"), s("new.npz"), s("new.mp4"), s("new.gif"), s("new.safetensors"),
                               s("noext"), s("new/deeper.json")],
                              [s("new.avi"), s("keep.json"), s("keep.npz"), s("keep.mp4"), s("keep.safetensors"),
                               s("afile"), s("afile/x.json"), s("full"), "/proc/ctxdiff-x.json", s("ro/x.json"),
                               a("inv.safetensors"), "/dev/null"])
        self.texts_in = pick([a("prompts.txt")], [a("latin1.txt"), a("binary.bin"), a("empty.txt"), a("missing.txt"),
                                                  a("real"), a("tiny.safetensors")])
        self.videos = pick([a("video"), a("image.png")], [a("real"), a("tiny.safetensors"), a("missing.mp4"),
                                                          a("latin1.txt"), a("empty.txt"), s("empty")])
        self.adapters = pick([a("tiny-sd.safetensors")], [a("tiny.safetensors"), a("recipe.yaml"),
                                                          a("missing.safetensors"), a("tuned.safetensors")])
        self.tuned = pick([a("tuned.safetensors")], [a("tiny.safetensors"), a("damaged.safetensors"),
                                                     a("missing.safetensors")])
        self.inversions = pick([a("inv.safetensors")], [a("tiny.safetensors"), a("truncated.safetensors"),
                                                        a("missing.safetensors")])
        self.recipes = pick([a("recipe.yaml")], [a("latin1.txt"), a("binary.bin"), a("empty.txt"), a("missing.yaml"),
                                                 a("real")])

    # ------------------------------------------------------------------ helpers

    def value(self, draw, values: Values) -> str:
        return draw(values.good if self.valid else values.any())

    def _options(self, draw, table: list[Option], max_size: int = 6) -> list[str]:
        chosen = draw(st.lists(st.sampled_from(table), max_size=max_size, unique_by=lambda o: o.flag))
        argv: list[str] = []
        for option in chosen:
            argv.append(option.flag)
            if option.values is not None:
                argv.append(self.value(draw, option.values))
        return argv

    def _globals(self, draw) -> tuple[list[str], list[str]]:
        """Global options, before and after the subcommand (never --debug: it shows tracebacks)."""
        table = [Option("--json"), Option("-q"), Option("--quiet"), Option("--device", DEVICES)]
        return self._options(draw, table, 2), self._options(draw, table, 2)

    def _junk(self, draw) -> list[str]:
        """One bad example in ten ends with a stray token: an unknown option, a value without option, --help."""
        if self.valid or draw(st.integers(0, 9)):
            return []
        return [draw(st.one_of(st.sampled_from(["--nope", "-z", "--help", "--", "--steps", "-n", "--out="]), _text(12)))]

    def _steps(self) -> Values:
        return ints((1, 1) if self.cheap else (1, 3))

    # ------------------------------------------------------------------ subcommands

    def generate(self, draw) -> tuple[list[str], bytes]:
        prompts = [self.value(draw, PROMPTS) for _ in range(draw(st.integers(0 if not self.valid else 1, 3)))]
        table = [Option("--from-file", self.texts_in), Option("--height", ints((8, 24))),
                 Option("--width", ints((8, 24))), Option("-n", Values(counts((1, 2)).good, st.just("100001"))),
                 Option("--seed", SEEDS), Option("--steps", self._steps()), Option("--sr-steps", self._steps()),
                 Option("--sampler", pick(["ddim", "ddpm"], ["euler", "bogus", ""])),
                 Option("--eta", floats((0.0, 1.0))), Option("-g", floats((0.0, 2.0, 7.5))), Option("--no-adapter"),
                 Option("--out", self.folders_out), Option("--grid"), Option("--batch-size", counts((1, 4))),
                 Option("--force")]
        if not self.valid:
            table += [Option("--adapter", self.adapters), Option("--vae-tiling")]
        model = self.value(draw, self.models)
        argv = [*prompts, "-m", model, *self._options(draw, table)]
        if "--out" not in argv:
            argv += ["--out", self.value(draw, self.folders_out)]
        if "--steps" not in argv:
            argv += ["--steps", "1", "--sr-steps", "1"]
        if self.valid:
            stdin = b"a red circle\n"
        else:
            stdin = draw(st.one_of(st.just(b"a red circle\n"), st.binary(max_size=40),
                                   st.sampled_from([b"a \xff\xfe\n", "é\n".encode("latin-1"),
                                                    b"\xef\xbb\xbfa red circle\n"])))
        return ["generate", *argv], stdin

    def shapes(self, draw) -> tuple[list[str], bytes]:
        table = [Option("--n", counts((1, 2) if self.cheap else (1, 4))), Option("--seed", SEEDS),
                 Option("--size", ints((8, 24))), Option("--videos"), Option("--frames", ints((2, 4), ("100000",))),
                 Option("--force")]
        out = draw(st.one_of(self.folders_out.good if self.valid else self.folders_out.any(),
                             _text(10).filter(lambda t: not t.startswith("-") and t.strip())))
        argv = [out, *self._options(draw, table)]
        if "--n" not in argv:
            argv += ["--n", "1"]
        if "--size" not in argv:
            argv += ["--size", "16"]
        return ["shapes", *argv], b""

    def _set_train(self) -> Values:
        good = {"train.steps": ["1", "2"], "train.lr": ["1e-3", "0.01"], "train.batch_size": ["1", "2"],
                "sample.steps": ["1", "2"], "data.shapes_count": ["4", "8"], "train.seed": ["0", "7", str(2**64 - 1)],
                "sample.guidance": ["1.5"], "train.ema_decay": ["0.5"], "diffusion.schedule": ["linear"],
                "train.warmup_steps": ["1"], "data.shapes_seed": [str(2**64 - 1)], "output": ["drawn-run"]}
        bad = {"train.steps": ["0", "-1", "x", ".nan"], "train.lr": [".nan", ".inf", "-1", "x", "[1]"],
               "train.batch_size": ["0", "-3"], "sample.steps": ["1000", "0"], "diffusion.timesteps": ["200", "0"],
               "data.source": ["missing-folder", self.ws.asset("latin1.txt"), self.ws.asset("real"), "", "shapes2"],
               "data.image_size": ["0", "32"], "model.unet.base_channels": ["0", "-3"],
               "train.seed": ["-1", str(2**64)], "data.shapes_seed": ["-1"],
               "sample.guidance": [".inf", ".nan"], "train.adam_betas": ["[0.9, 1.5]", "[.nan, 0.9]", "0.9"],
               "train.precision": ["fp8"], "train.stpes": ["3"],
               "output": [self.ws.scratch("afile"), "/proc/x", self.ws.scratch("full"), "", self.ws.scratch("afile/x")],
               "train.grad_clip": ["0", ".inf"], "train.num_workers": ["-1"], "model": ["null", "[1, 2]"],
               "diffusion.cond_drop_prob": ["1.0", ".nan"], "train.stage": ["sr", "clip", "x"],
               "model.init_from": [self.ws.asset("damaged.safetensors"), self.ws.asset("missing.safetensors")]}

        def flat(table: dict) -> list[str]:
            return [f"{k}={v}" for k, vs in table.items() for v in vs]

        return Values(st.sampled_from(flat(good)),
                      st.sampled_from(flat(bad) + ["nonsense", "=3", "train.=1", "a.b.c.d=1", "train.steps"]))

    def recipe_text(self, draw) -> str:
        """A recipe: the tiny one with a few lines redrawn, or one with a key given twice, an alias
        bomb, a list, broken YAML."""
        base = TINY_RECIPE.format(output="drawn-run")
        kind = 0 if self.valid else draw(st.integers(0, 5))
        if kind <= 2:
            lines = base.splitlines()
            for _ in range(0 if self.valid else draw(st.integers(0, 2))):
                i = draw(st.integers(0, len(lines) - 1))
                lines[i] = draw(st.sampled_from([lines[i].replace("16", "0"), lines[i].replace(":", " "),
                                                 lines[i] + " extra", "  " + lines[i], "", lines[i].replace("1", "-1"),
                                                 lines[i].replace("0.001", ".nan")]))
            return "\n".join(lines) + "\n"
        if kind == 3:
            return base + draw(st.sampled_from(["train:\n  batch_size: 64\n", "model: {}\n", "sample: [1, 2]\n",
                                                "base: missing.yaml\n", "base: drawn.yaml\n"]))
        if kind == 4:
            levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
            levels += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdef", "bcdefg")]
            return "\n".join(levels) + "\ntrain: {steps: *g}\n"
        return draw(st.sampled_from(["- 1\n- 2\n", "{", "output: [\n", "null\n", "42\n", "\t- x\n",
                                     "train: !!python/object:os.system x\n"])) + draw(_text(20))

    def train(self, draw) -> tuple[list[str], bytes, str | None]:
        recipe = None
        if draw(st.integers(0, 3)) == 0:
            recipe = self.recipe_text(draw)
            path = self.ws.scratch("drawn.yaml")
        else:
            path = self.value(draw, self.recipes)
        argv = ["--recipe", path]
        for _ in range(draw(st.integers(0, 3))):
            argv += ["--set", self.value(draw, self._set_train())]
        argv += self._options(draw, [Option("--resume"), Option("--force"), Option("--print-recipe")],
                              1 if self.valid else 2)
        if not any(a.startswith("output=") for a in argv) and draw(st.booleans()):
            argv += ["--set", f"output={self.value(draw, self.folders_out)}"]
        return ["train", *argv], b"", recipe

    def _set_tune(self) -> Values:
        good = ["lr=1e-4", "steps=1", "frames=4", "stride=1", "window=2", "seed=5", f"seed={2**64 - 1}",
                "adam_betas=[0.9, 0.999]", "grad_clip=null", "weight_decay=0"]
        bad = ["lr=.nan", "lr=.inf", "lr=-1", "lr=x", "steps=0", "steps=-2", "frames=0", "frames=99", "stride=0",
               "window=0", "seed=-1", f"seed={2**64}", "adam_betas=[.nan, 0.9]", "adam_betas=[2, 3]", "grad_clip=0",
               "grad_clip=.inf", "weight_decay=-1", "weight_decay=.nan", "bogus=1", "checkpoint_every=0", "nonsense",
               "=1"]
        return pick(good, bad)

    def tune_video(self, draw) -> tuple[list[str], bytes]:
        table = [Option("--prompt", PROMPTS), Option("--out", self.folders_out), Option("--set", self._set_tune()),
                 Option("--frames", ints((1, 4))), Option("--stride", ints((1, 2))), Option("--start", ints((0, 1))),
                 Option("--lr", floats((1e-4,))), Option("--seed", SEEDS), Option("--no-adapter"),
                 Option("--force")]
        if not self.valid:
            table += [Option("--adapter", self.adapters), Option("--recipe", self.recipes), Option("--resume")]
        argv = [self.value(draw, self.videos), "-m", self.value(draw, self.models), *self._options(draw, table)]
        argv += ["--steps", self.value(draw, counts((1, 1) if self.cheap else (1, 2)))]
        if "--frames" not in argv:
            argv += ["--frames", "4", "--stride", "1"]
        if "--prompt" not in argv and self.valid:
            argv += ["--prompt", SRC]
        return ["tune-video", *argv], b""

    def _video_common(self) -> list[Option]:
        table = [Option("--frames", ints((1, 4))), Option("--stride", ints((1, 2))), Option("--start", ints((0, 1))),
                 Option("--spacing", pick(["leading", "trailing", "linspace"], ["bogus", ""])),
                 Option("--refine", ints((0, 1), ())), Option("--attention-on-cpu"), Option("--no-adapter"),
                 Option("--force")]
        if not self.valid:
            table += [Option("--tuned", self.tuned), Option("--adapter", self.adapters)]
        return table

    def _model(self, draw) -> list[str]:
        """-m: mostly given (without it the bundled 64-pixel model is used, slower)."""
        return ["-m", self.value(draw, self.models)] if self.valid or draw(st.integers(0, 4)) else []

    def invert(self, draw) -> tuple[list[str], bytes]:
        table = [*self._video_common(), Option("--prompt", PROMPTS), Option("--out", self.files_out),
                 Option("--attention"), Option("--no-check")]
        argv = [self.value(draw, self.videos), *self._options(draw, table), *self._model(draw)]
        argv += ["--steps", self.value(draw, ints((1, 3)))]
        if "--frames" not in argv:
            argv += ["--frames", "4", "--stride", "1"]
        if "--out" not in argv:
            argv += ["--out", self.value(draw, self.files_out)]
        if "--prompt" not in argv and self.valid:
            argv += ["--prompt", SRC]
        return ["invert", *argv], b""

    def edit(self, draw) -> tuple[list[str], bytes]:
        outs = pick([self.ws.scratch(name) for name in ("new.mp4", "new.gif", "new.webm", "new", "new/deeper.mp4")],
                    [self.ws.scratch(name) for name in ("new.json", "new.avi", "keep.mp4", "afile", "afile/x.mp4", "full",
                                                        "ro/x.mp4")] + ["/proc/ctxdiff-x.mp4", "/dev/null"])
        table = [*self._video_common(), Option("--src", PROMPTS), Option("--inversion", self.inversions),
                 Option("--out", outs), Option("--side-by-side"), Option("--guidance", floats((1.0, 7.5))),
                 Option("--self-replace", floats((0.0, 0.5, 1.0))), Option("--cross-replace", floats((0.8,))),
                 Option("--cross-mode", pick(["replace", "refine"], ["x"])),
                 Option("--blend-threshold", floats((0.3,))), Option("--no-fusion")]
        argv = [self.value(draw, self.videos), "--tgt", self.value(draw, PROMPTS), *self._options(draw, table),
                *self._model(draw)]
        argv += ["--steps", self.value(draw, ints((1, 3)))]
        if "--frames" not in argv and "--inversion" not in argv:
            argv += ["--frames", "4", "--stride", "1"]
        if "--out" not in argv:
            argv += ["--out", self.value(draw, outs)]
        if "--src" not in argv and self.valid:
            argv += ["--src", SRC]
        return ["edit", *argv], b""

    def evaluate(self, draw) -> tuple[list[str], bytes]:
        a, s = self.ws.asset, self.ws.scratch
        clip = f"clip:tiny-clip:{a('tiny.safetensors')}"
        features = pick([clip], ["inception", "bogus", f"clip:nope:{a('tiny.safetensors')}",
                                 f"clip:tiny-clip:{a('missing.safetensors')}"])
        images = pick([a("real")], [s("empty"), s("full"), a("missing"), a("tiny.safetensors")])
        reals = pick([a("real"), a("stats.npz")], [s("keep.npz"), a("missing"), s("empty"), a("binary.bin")])
        metric = draw(st.sampled_from(["fid", "kid", "clip-score", "text-alignment", "temporal-consistency", "shapes",
                                       "bpd"] + ([] if self.valid else ["bogus"])))
        needs = {"fid": [Option("--real", reals), Option("--fake", images)], "kid": [Option("--real", reals),
                                                                                    Option("--fake", images)],
                 "clip-score": [Option("--images", images)], "shapes": [Option("--images", images)],
                 "text-alignment": [Option("--videos", self.videos), Option("--prompt", PROMPTS)],
                 "temporal-consistency": [Option("--videos", self.videos)],
                 "bpd": [Option("--model", self.models), Option("--data", pick(["shapes", a("real")], [a("missing")]))]}
        table = [Option("--save-stats", Values(st.just(s("new.npz")), self.files_out.any())),
                 Option("--features", features), Option("--prompts", self.texts_in),
                 Option("--clip-weights", pick([a("tiny.safetensors")], [a("tiny-sd.safetensors"),
                                                                         a("missing.safetensors")])),
                 Option("--batch-size", counts((1, 8))), Option("--out", self.files_out), Option("--force"),
                 Option("-n", counts((1, 2))), Option("--seed", SEEDS), Option("--guidance", floats((1.0,))),
                 Option("--steps", ints((1, 2))), Option("--no-adapter"), Option("--bpd-timesteps", ints((1, 3)))]
        if not self.valid:
            table += [*[o for opts in needs.values() for o in opts],
                      Option("--model", self.models),
                      Option("--sweep", pick(["guidance=1,2"], ["guidance=", "steps=1", "guidance=x,nan"]))]
        argv = ["--metric", metric]
        if self.valid:
            for option in needs[metric]:
                argv += [option.flag, self.value(draw, option.values)]
        argv += self._options(draw, [o for o in table if o.flag not in argv], 5)
        if metric in ("fid", "kid") and "--features" not in argv:
            argv += ["--features", clip]
        if metric == "bpd" and "-n" not in argv:
            argv += ["-n", "1", "--bpd-timesteps", "2"]
        if "--model" in argv and "--steps" not in argv:
            argv += ["--steps", "1"]
        return ["evaluate", *argv], b""

    # ------------------------------------------------------------------ all of them

    def command_line(self, subcommand: str | None = None) -> st.SearchStrategy[CommandLine]:
        """A command line for `subcommand` (None: any of them)."""

        @st.composite
        def draw_line(draw) -> CommandLine:
            name = subcommand or draw(st.sampled_from(SUBCOMMANDS))
            self.valid = draw(st.integers(0, 2)) == 0
            built = getattr(self, name.replace("-", "_"))(draw)
            argv, stdin, recipe = (*built, None) if len(built) == 2 else built
            before, after = self._globals(draw)
            return CommandLine(name, [*before, *argv, *after, *self._junk(draw)], stdin, recipe, self.valid)

        return draw_line()


@dataclass(frozen=True)
class CommandLine:
    subcommand: str
    argv: list[str]
    stdin: bytes = b""
    recipe: str | None = None        # text written to scratch/drawn.yaml before the run
    valid: bool = False              # drawn from good values only

    def run(self, ws: Workspace) -> Outcome:
        return ws.run(self.argv, self.stdin, self.recipe)


def counts_table(counts: dict[tuple[str, int | str], int]) -> str:
    """A text table: subcommand x exit code -> examples."""
    codes = sorted({code for _, code in counts}, key=str)
    rows = [["subcommand", *map(str, codes), "total"]]
    for name in SUBCOMMANDS:
        row = [counts.get((name, code), 0) for code in codes]
        rows.append([name, *map(str, row), str(sum(row))])
    totals = [sum(counts.get((name, code), 0) for name in SUBCOMMANDS) for code in codes]
    rows.append(["all", *map(str, totals), str(sum(totals))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


