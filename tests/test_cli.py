"""The `fastncl` command: user errors are one line on stderr, exit status 2, and no run folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from precomp_folder import make_scan

from fastncl.cli import main
from fastncl.config import dump_yaml, parse_override, resolve

# a synthetic dataset small enough that errors found after loading it cost nothing
TINY = ["data.synthetic.train_images=8", "data.synthetic.dev_images=4", "data.synthetic.test_images=4",
        "data.synthetic.feature_dim=8", "data.synthetic.regions=8", "data.synthetic.idiosyncratic_words=20",
        "runtime.progress=false", "runtime.threads=1"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so that a default run folder (runs/...) would show up."""
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)


def assert_user_error(code, capsys, *mentions, out: Path | None = None, before: set | None = None):
    """Exit status 2, one line on stderr starting 'fastncl: error:', no traceback, no run folder."""
    captured = capsys.readouterr()
    assert code == 2, f"exit status {code}; stderr:\n{captured.err}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{captured.err}"
    assert lines[0].startswith("fastncl: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    assert not Path("runs").exists(), "a default run folder was created"
    if out is not None:
        if before is None:
            assert not out.exists(), f"{out} was created"
        else:
            assert _listing(out) == before, f"something was written into {out}"
    return lines[0]


def _listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def train(*args):
    return main(["train", *args])


# ---------------------------------------------------------------------------------------------
# in-process


def test_missing_data_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = train("--data", str(tmp_path / "nowhere"), "--out", str(out), *TINY)
    assert_user_error(code, capsys, "--data", "nowhere", out=out)


def test_malformed_data_folder(tmp_path, capsys):
    folder = make_scan(tmp_path / "d")
    lines = (folder / "train_caps.txt").read_text().splitlines()
    (folder / "train_caps.txt").write_text("\n".join(lines[:-2]) + "\n")  # 28 captions for 6 images
    out = tmp_path / "run"
    code = train("--data", str(folder), "--out", str(out), *TINY)
    assert_user_error(code, capsys, "train_caps.txt", "28 captions for 6 images", out=out)


def test_unknown_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert_user_error(train("--preset", "nope", "--out", str(out)), capsys, "--preset", "nope", out=out)


@pytest.mark.parametrize("noise", ["1.0", "-0.1", "1.5"])
def test_noise_outside_unit_interval(tmp_path, capsys, noise):
    out = tmp_path / "run"
    assert_user_error(train("--noise", noise, "--out", str(out), *TINY), capsys, "--noise", out=out)


def test_noise_outside_unit_interval_without_out(capsys):
    assert_user_error(train("--noise", "1.0"), capsys, "--noise")  # and no runs/ folder


@pytest.mark.parametrize("content, mention", [(None, "cannot read it"), ("optim: [1, 2\n", "not valid YAML"),
                                              ("- a\n- b\n", "mapping")])
def test_unreadable_or_malformed_config(tmp_path, capsys, content, mention):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    assert_user_error(train("--config", str(path), "--out", str(out)), capsys, "--config", "c.yaml", mention, out=out)


def test_config_file_that_is_not_text(tmp_path, capsys):
    """E.g. a checkpoint passed as --config by mistake."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00\x80binary")
    out = tmp_path / "run"
    assert_user_error(train("--config", str(path), "--out", str(out)), capsys, "--config", "c.yaml", out=out)


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  epochs: 2\n  warp_speed: 9\n")
    out = tmp_path / "run"
    assert_user_error(train("--config", str(path), "--out", str(out)), capsys, "optim.warp_speed", out=out)


@pytest.mark.parametrize("override, mention", [("optim.warp_speed=9", "optim.warp_speed"),
                                               ("nonsense=1", "nonsense"),
                                               ("optim.epochs=many", "optim.epochs"),
                                               ("sps.proxy_label=magic", "sps.proxy_label"),
                                               ("optim.epochs", "key.path=value")])
def test_bad_override(tmp_path, capsys, override, mention):
    out = tmp_path / "run"
    assert_user_error(train("--out", str(out), override), capsys, mention, out=out)


def test_method_contradicting_preset(tmp_path, capsys):
    out = tmp_path / "run"
    code = train("--method", "ncr", "--preset", "esc-official", "--out", str(out))
    assert_user_error(code, capsys, "--method ncr", "--preset esc-official", out=out)


def test_non_empty_out_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    code = train("--out", str(out), *TINY)
    assert_user_error(code, capsys, "--out", "not empty", "--resume", out=out, before=before)
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_out(capsys):
    assert_user_error(train("--resume"), capsys, "--resume", "--out")


def test_resume_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert_user_error(train("--resume", "--out", str(out)), capsys, "--resume", "config.yaml", out=out, before=set())


def test_resume_with_no_checkpoint_starts_over(tmp_path, capsys):
    """A run folder whose first epoch never finished (config.yaml but no checkpoints/last.pt) has
    a way out: --resume starts it over (a rerun without --resume is refused: the folder is not empty)."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve(overrides=[parse_override(o) for o in [*TINY, f"out={out}", "optim.warmup_epochs=1",
                                                           "optim.epochs=0"]])
    (out / "config.yaml").write_text(dump_yaml(cfg))
    (out / "metrics.jsonl").write_text('{"epoch": 0, "phase": "warmup", "lr": 0.002, "dev": {}}\n')  # a line whose checkpoint was never written
    assert train("--resume", "--out", str(out)) == 0
    assert "holds no checkpoint yet: the run starts over" in capsys.readouterr().out
    assert (out / "results.json").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_folder_of_empty_folders_is_reused(tmp_path, capsys):
    """A run that died before its config.yaml was in place (only checkpoints/ made, or a temporary
    file of an atomic write left by a kill): a rerun may use the folder."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".config.yaml.x1y2.tmp").write_text("method: sp")
    assert train("--out", str(out), *TINY, "optim.warmup_epochs=1", "optim.epochs=0") == 0


@pytest.mark.parametrize("edit, mentions", [
    ({"method": "sps"}, ["method ncr (config.yaml: sps)"]),
    ({"model": {"embed_dim": 24}}, ["model.embed_dim 16 (config.yaml: 24)", "tensor region_proj.weight of shape"]),
])
def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, capsys, edit, mentions):
    """An edited config.yaml (or a checkpoint copied from another run): one line naming what differs, no
    traceback, nothing written; the run resumes once config.yaml is put back."""
    out = tmp_path / "run"
    args = ["--method", "ncr", "--out", str(out), *TINY, "model.embed_dim=16", "model.word_dim=8",
            "optim.warmup_epochs=1", "optim.epochs=1"]
    assert train(*args, "optim.epochs=0") == 0  # one finished epoch: checkpoints/last.pt
    capsys.readouterr()
    original = (out / "config.yaml").read_text()
    values = yaml.safe_load(original)
    values["optim"]["epochs"] = 1
    for key, value in edit.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    (out / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    before = _listing(out)
    assert_user_error(train("--resume", "--out", str(out)), capsys, "--resume", "checkpoints/last.pt", *mentions,
                      out=out, before=before)
    values = yaml.safe_load(original)
    values["optim"]["epochs"] = 1
    (out / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    assert train("--resume", "--out", str(out)) == 0


def test_noise_and_noise_file_together(tmp_path, capsys):
    path = tmp_path / "noise.npy"
    np.save(path, np.arange(40) // 5)
    out = tmp_path / "run"
    assert_user_error(train("--noise", "0.4", "--noise-file", str(path), "--out", str(out), *TINY), capsys,
                      "--noise 0.4", "--noise-file", out=out)


def test_default_folder_of_a_noise_file_run_names_the_file():
    from fastncl.config import resolve
    from fastncl.run import default_out

    cfg = resolve(method="ncr", overrides=[("data.noise_file", "idx/f30k_0.2.npy")])
    assert Path(default_out(cfg)).name.startswith("ncr-noisefile-f30k_0.2-seed0-")


@pytest.mark.parametrize("kind", ["missing", "garbage", "wrong_length", "out_of_range", "float"])
def test_bad_noise_file(tmp_path, capsys, kind):
    path = tmp_path / "noise.npy"
    n_captions = 8 * 5
    if kind == "garbage":
        path.write_bytes(b"not numpy")
    elif kind == "wrong_length":
        np.save(path, np.zeros(n_captions + 1, np.int64))
    elif kind == "out_of_range":
        np.save(path, np.full(n_captions, 8, np.int64))  # 8 training images: 0..7
    elif kind == "float":
        np.save(path, np.zeros(n_captions, np.float32))
    out = tmp_path / "run"
    code = train("--noise-file", str(path), "--out", str(out), *TINY)
    assert_user_error(code, capsys, "--noise-file", "noise.npy", out=out)


def test_unknown_method_is_rejected_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train("--method", "magic", "--out", str(tmp_path / "run"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["eval", "report"])
def test_eval_and_report_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    assert_user_error(main([command, str(folder)]), capsys, "not a fastncl run folder", out=folder,
                      before={"x.txt"})
    assert_user_error(main([command, str(tmp_path / "absent")]), capsys, "absent", out=tmp_path / "absent")


def test_eval_without_checkpoint(tmp_path, capsys):
    """A run folder with a config but no checkpoint: one line naming the missing checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(resolve(overrides=[parse_override(o) for o in TINY])))
    assert_user_error(main(["eval", str(run)]), capsys, "best.pt", out=run, before={"config.yaml"})


class _Foreign:
    """An object of another program (a pickle of it names this class)."""


def _hostile_checkpoint(kind: str, good: Path) -> bytes:
    """A checkpoints/*.pt that fastncl did not write as it is, from the run's own ``good`` one."""
    import io
    import pickle

    if kind == "random bytes":
        return np.random.default_rng(0).bytes(4096)
    if kind == "empty":
        return b""
    if kind == "cut short":
        return good.read_bytes()[:3000]
    if kind == "another program's pickle":
        return pickle.dumps({"weights": _Foreign()}, protocol=4)
    buf = io.BytesIO()
    if kind == "another program's torch file":  # loads, but holds no fastncl checkpoint
        torch.save({"state_dict": {"w": torch.zeros(2)}, "step": 3}, buf)
    else:  # "a newer fastncl's"
        state = torch.load(good, weights_only=True)
        state["format"] = 99
        torch.save(state, buf)
    return buf.getvalue()


HOSTILE = ["random bytes", "empty", "cut short", "another program's pickle", "another program's torch file",
           "a newer fastncl's"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    assert train("--method", "ncr", "--out", str(out), *TINY, "optim.warmup_epochs=1", "optim.epochs=0") == 0
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_damaged_or_foreign_checkpoint_is_one_line(finished_run, tmp_path, capsys, kind, command):
    """`fastncl eval RUN` (best.pt) and `--resume` (last.pt) on a checkpoint fastncl did not write
    as it is: one line naming the file, exit status 2, nothing written, and never torch's advice to
    load it with weights_only=False."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    name = "best" if command == "eval" else "last"
    path = run / "checkpoints" / f"{name}.pt"
    path.write_bytes(_hostile_checkpoint(kind, path))
    capsys.readouterr()
    before = _listing(run)
    code = main(["eval", str(run)]) if command == "eval" else train("--resume", "--out", str(run))
    line = assert_user_error(code, capsys, str(path), out=run, before=before)
    assert "weights_only" not in line
    if kind == "a newer fastncl's":
        assert "newer fastncl (checkpoint format 99" in line
    else:
        assert "not a fastncl checkpoint" in line


def test_too_few_synthetic_regions_is_a_user_error(tmp_path, capsys):
    """The synthetic data shows six attributes (one twice) in its regions: fewer than 7 must be refused."""
    out = tmp_path / "run"
    code = train("--out", str(out), *TINY, "data.synthetic.regions=4")
    assert_user_error(code, capsys, "data.synthetic.regions", out=out)


@pytest.mark.parametrize("args, mention", [(["--seed", "-1"], "seed"),
                                           (["--noise", "0.2", "data.noise_seed=-5"], "data.noise_seed"),
                                           (["data.synthetic.seed=-5"], "data.synthetic.seed"),
                                           (["--seed", "99999999999999999999"], "--seed"),  # torch overflowed
                                           (["data.synthetic.seed=9223372036854775808"], "data.synthetic.seed")])
def test_seed_out_of_range_is_a_user_error(tmp_path, capsys, args, mention):
    out = tmp_path / "run"
    code = train("--out", str(out), *args, *TINY)
    assert_user_error(code, capsys, mention, out=out)


def test_out_naming_a_file_is_a_user_error(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a folder\n")
    assert_user_error(train("--out", str(out), *TINY), capsys, "--out", "not a folder", out=out,
                      before=set())
    assert out.read_text() == "not a folder\n"


def test_out_below_a_file_is_a_user_error(tmp_path, capsys):
    """A run folder that cannot be created (here: a file on its path): one line, nothing left."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert_user_error(train("--out", str(out), *TINY), capsys, "--out", "cannot create the run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_triton_backend_on_cpu_is_a_user_error(tmp_path, capsys, monkeypatch):
    """Refused before the run folder is made (the Triton kernels need CUDA tensors, or the
    interpreter that only the tests switch on)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    code = train("--device", "cpu", "--out", str(out), *TINY, "runtime.backend=triton", "optim.warmup_epochs=1",
                 "optim.epochs=0")
    assert_user_error(code, capsys, "triton", out=out)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("fastncl ")


# ---------------------------------------------------------------------------------------------
# the installed console script


def _console_script() -> str:
    path = shutil.which("fastncl") or str(Path(sys.executable).parent / "fastncl")
    if not os.path.exists(path):
        pytest.fail("the `fastncl` console script is not installed (pip install -e .)")
    return path


def run_script(*args, cwd):
    return subprocess.run([_console_script(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, mention", [
    (["train", "--noise", "1.0"], "--noise"),
    (["train", "--data", "nowhere"], "nowhere"),
])
def test_console_script_user_error(tmp_path, args, mention):
    proc = run_script(*args, "--out", "run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastncl: error: ") and mention in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_console_script_unknown_method(tmp_path):
    proc = run_script("train", "--method", "magic", cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """Any subcommand: an OSError (here: compare on a results.json it may not read) is one line
    naming the file, exit status 2, no traceback."""
    import fastncl.compare

    def unreadable(run_dirs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "results.json"))

    monkeypatch.setattr(fastncl.compare, "compare_rows", unreadable)
    code = main(["compare", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"fastncl: error: {tmp_path / 'run' / 'results.json'}: Permission denied\n"
