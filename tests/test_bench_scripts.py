"""The GPU bench scripts, run here on the CPU so that they cannot rot: the meta-device memory count of a guided
step (bench/guided_memory.py), the meta-device FLOP count of every family (bench/generation_cost.py), sd_speed's
isolation of a failing mode and its side-by-side variants, and the prepared GPU check (bench/gpu_check.py: its
failure isolation, and its --cpu run of every row)."""

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name: str):
    """A bench script imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up while being defined)
    spec.loader.exec_module(module)
    return module


def test_guided_memory_counts_every_phase_and_checkpointing_lowers_it():
    gm = _script("guided_memory")
    args = gm.parse(["--tiny"])
    rows = {
        (s.dtype, s.gradient, s.checkpointing, s.attention): gm.measure(args, s)
        for s in (
            gm.Setup("float32", "full", False, "fused"),
            gm.Setup("bfloat16", "full", False, "fused"),
            gm.Setup("bfloat16", "full", True, "fused"),
            gm.Setup("bfloat16", "x0", False, "fused"),
            gm.Setup("bfloat16", "x0", True, "fused"),
            gm.Setup("bfloat16", "full", False, "sliced"),
        )
    }
    full, full_ckpt = rows["bfloat16", "full", False, "fused"], rows["bfloat16", "full", True, "fused"]
    x0, x0_ckpt = rows["bfloat16", "x0", False, "fused"], rows["bfloat16", "x0", True, "fused"]
    assert all(r.saved[p] > 0 for p in ("unet", "vae", "learner") for r in (full, full_ckpt))
    assert x0.saved["unet"] == 0 and x0.saved["vae"] > 0  # x0: no backward through the UNet
    # checkpointing takes effect in eval mode (blocks were checkpointed) and lowers what is held
    assert full.blocks == x0.blocks == 0 and full_ckpt.blocks > x0_ckpt.blocks > 0
    assert full_ckpt.total < full.total and x0_ckpt.total < x0.total
    assert full_ckpt.saved["unet"] < full.saved["unet"] and full_ckpt.saved["vae"] < full.saved["vae"]
    assert 0 < full_ckpt.recompute < full.total
    # bfloat16 holds half of float32's UNet activations; sliced attention keeps its probabilities on top
    assert rows["float32", "full", False, "fused"].saved["unet"] == pytest.approx(2 * full.saved["unet"], rel=0.05)
    assert rows["bfloat16", "full", False, "sliced"].saved["unet"] > full.saved["unet"]


def test_guided_memory_prints_one_table_of_its_rows(capsys, tmp_path, monkeypatch):
    gm = _script("guided_memory")
    assert len(set(gm.setups())) == 16  # dtype × gradient × checkpointing, and 4 with sliced attention
    two = [gm.Setup("bfloat16", "full", False, "fused"), gm.Setup("float16", "x0", True, "sliced")]
    monkeypatch.setattr(gm, "setups", lambda: two)  # (all 16 take 20 s here)
    rows = gm.main(["--tiny", "--json", str(tmp_path / "rows.json")])
    lines = capsys.readouterr().out.splitlines()
    assert [r.setup for r in rows] == two and lines[1].split()[:4] == ["dtype", "gradient", "ckpt", "attention"]
    assert len([line for line in lines if not line.startswith("#")]) == 1 + len(rows)
    assert [r["total"] > 0 for r in json.loads((tmp_path / "rows.json").read_text())] == [True] * len(rows)


class _FailingSD:
    """Samples, except in one guided mode, which runs out of memory (as on a GPU)."""

    def sample(self, labels, seeds, *, omega, gradient, **kw):
        if omega > 0 and gradient == "full":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")


def test_sd_speed_reports_a_failing_mode_and_measures_the_others(capsys, tmp_path):
    sd_speed = _script("sd_speed")
    import torch

    args = Namespace(n=2, classes=3, steps=1, cfg_scale=4.0, batch_size=2, repeats=2, tiny=True, resolution=32)
    args.__dict__.update(learner="x", learner_size=16, omega=0.05, guide_every=1, json=str(tmp_path / "out.json"))
    args.__dict__.update(family="sd", tiny_decoder=False)
    modes = [sd_speed.Mode("unguided", 0.0, 1, "full")]
    modes += [sd_speed.Mode(f"guided {g}", 0.05, 1, g) for g in ("full", "x0")]
    learner = Namespace(classify=None)
    best, errors = sd_speed.measure(args, torch.device("cpu"), _FailingSD(), learner, modes)
    assert set(best) == {"unguided", "guided x0"}
    assert errors == {"guided full": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    sd_speed.report(args, torch.device("cpu"), torch.float32, modes, best, errors)
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("guided full")]
    assert (
        failed and failed[0].split(None, 3)[3] == "FAILED: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["mode"], r["variant"], r["error"] is None) for r in rows] == [
        ("unguided", "eager", True),
        ("guided full", "eager", False),
        ("guided x0", "eager", True),
    ]


@pytest.mark.slow
def test_sd_speed_samples_a_family_eager_and_channels_last_side_by_side(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BENCH / "sd_speed.py"), "--cpu", "--family", "dit", "--channels-last", "--tiny-decoder"]
    cmd += ["--steps", "2", "--guide-every", "1", "-n", "2", "--batch-size", "2", "--repeats", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny random dit weights" in r.stdout and "TAESD-sized AutoencoderTiny" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["variant"]) for row in rows] == [
        ("unguided", "eager"),
        ("guided full", "eager"),  # (DiT's default gradient)
        ("unguided", "channels-last"),
        ("guided full", "channels-last"),
    ]
    assert all(row["error"] is None and row["images_per_s"] > 0 for row in rows)
    assert [row["cost_ratio"] for row in rows][::2] == [1.0, 1.0]  # each variant against its own unguided


@pytest.mark.slow
def test_generation_cost_counts_a_family_at_real_shapes_on_the_meta_device(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH / "generation_cost.py"), "--families", "sd", "--resolution", "256"]
    r = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    head = next(line for line in lines if line.startswith("family"))
    assert head.split()[:5] == ["family", "step", "decoder", "TFLOP/step", "denoiser"]
    assert head.split()[-3:] == ["GiB", "img/s", "ceiling"]
    table = [line for line in lines if line.startswith("sd sd15 256²")]
    assert [line.split()[3:5] for line in table] == [
        ["unguided", "-"],
        ["guided", "full*"],
        ["guided", "full"],
        ["guided", "x0"],
        ["guided", "x0"],
    ]
    assert "not a measurement" in r.stdout
    rows = {(row["step"], row["decoder"]): row for row in json.loads(out.read_text())}
    plain, vae, tiny = rows["unguided", ""], rows["guided full", "vae"], rows["guided full", "tiny"]
    x0_vae, x0_tiny = rows["guided x0", "vae"], rows["guided x0", "tiny"]
    # an unguided step is the UNet alone (CFG: batch 2), nothing saved; a guided one adds the decode and learner
    assert plain["step_flops"]["decoder"] == plain["step_flops"]["learner"] == plain["saved_bytes"] == 0
    assert plain["image_ratio"] == 1.0 and 1.0 < tiny["image_ratio"] < vae["image_ratio"]
    # x0: no backward through the UNet, whose share is then the unguided forward; the tiny decoder is TAESD's
    assert x0_vae["step_flops"]["denoiser"] == plain["step_flops"]["denoiser"] < vae["step_flops"]["denoiser"]
    assert 10 * tiny["step_flops"]["decoder"] < vae["step_flops"]["decoder"] == x0_vae["step_flops"]["decoder"]
    assert 0 < x0_tiny["saved_bytes"] < x0_vae["saved_bytes"] < vae["saved_bytes"]
    assert vae["ceiling"] == pytest.approx(989e12 / vae["image_flops"])


def test_gpu_check_keeps_going_after_a_failing_row_and_names_its_error(tmp_path):
    gc = _script("gpu_check")
    check = gc.Check(cpu=True, ws=tmp_path, env=gc.environment())
    py = [sys.executable, "-c"]

    def fails(c):
        c.call("fails", [*py, "import sys; print('working'); sys.exit('error: generator.model: no such folder')"], 60)

    def hangs(c):
        c.call("hangs", [*py, "import time; time.sleep(60)"], timeout=0.5)

    def works(c):
        return [gc.Row("works", "ok", c.call("works", [*py, "pass"], 60), "42 img/s")]

    rows = gc.run_all(check, [(["fails a", "fails b"], fails), (["hangs"], hangs), (["works"], works)])
    assert [(r.what, r.status) for r in rows] == [
        ("fails a", "FAILED: error: generator.model: no such folder"),
        ("fails b", "FAILED: error: generator.model: no such folder"),
        ("hangs", "FAILED: timed out after 0.5 s"),
        ("works", "ok"),
    ]
    assert "working" in (tmp_path / "logs" / "fails.log").read_text()  # the whole output, kept for reading
    text = gc.table(rows)
    assert "FAILED   " in text and "42 img/s" in text
    traceback = "Traceback (most recent call last):\n  File x\nRuntimeError: Expected all tensors on cuda:0\n"
    assert gc.error_line(traceback + "\n[rank0] exiting\n") == "RuntimeError: Expected all tensors on cuda:0"


@pytest.mark.slow
def test_gpu_check_cpu_runs_every_row(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--cpu", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert {row["status"] for row in rows if not row["what"].startswith("torchrun")} == {"ok"}, r.stdout
    assert [row["what"] for row in rows if row["status"].startswith("skipped")] == ["torchrun, 2 processes vs 1"]
    assert len(rows) == 20 and "dpops run, digits" in r.stdout
    assert {row["what"].split()[0] for row in rows} >= {"sd", "sdxl", "dit", "sd3"}
