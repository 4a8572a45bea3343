"""The quality benchmark runs end to end for a moment (it is a benchmark, not a test of quality)."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_fake_fmnist

ROOT = Path(__file__).resolve().parents[1]
#: quality.py overrides of a SOP small enough for a test: a tiny ViT, banks and anchors, batches of 4
TINY_SOP = ["--set", "data.init_args.batch_size=4", "--set", "data.init_args.num_workers=0",
            "--set", "model.init_args.embed_dim=32", "--set", "model.init_args.depth=1",
            "--set", "model.init_args.num_heads=2", "--set", "model.init_args.hidden_dim=32",
            "--set", "model.init_args.memory_size=64", "--set", "model.init_args.patch_memory_size=32",
            "--set", "model.init_args.num_anchors=8", "--set", "model.init_args.num_patch_anchors=4"]  # fmt: skip


def _load_quality():
    """benchmarks/quality.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def test_quality_benchmark_refuses_a_misspelt_set_in_one_line(fake_fmnist, tmp_path, capsys):
    quality = _load_quality()
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--methods", "sop", "--root", str(fake_fmnist), "--results", str(tmp_path), "--set",
                      "model.init_args.num_anchorz=2"])  # fmt: skip
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("error: --methods sop: model.init_args.num_anchorz: sop_lightning.SOP has no argument 'num_anchorz' "
            "(did you mean num_anchors") in last_line, last_line  # fmt: skip


def test_quality_benchmark_smoke(fake_fmnist, tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--methods", "pixels", "sop", "--budget", "0.03",
           "--points", "1", "--calibration-steps", "4", "--root", str(fake_fmnist), "--results", str(results),
           "--docs", str(docs), "--runs", str(tmp_path / "runs"), "--report", *TINY_SOP]  # fmt: skip
    results.mkdir()
    here = torch.backends.cpu.get_cpu_capability()  # this machine's rows go together, another machine's apart
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = [line.split() for line in cpuinfo.splitlines() if line.startswith("flags")]
    amx = bool(flags) and "amx_tile" in flags[0]  # torch says "AVX512" with and without AMX tiles
    tag = "cpu_" + re.sub(r"[^a-z0-9]+", "", here.lower()) + ("_amx" if amx else "")
    for method, name, top1, isa, has_amx in (("dino", "DINO", 11.0, here, amx), ("sop", "SOP", 12.0, here, amx),
                                             ("ibot", "iBOT", 13.0, "OTHERISA", False),  # another machine
                                             ("dino_vmf", "DINO-vMF", 14.0, here, not amx)):  # fmt: skip
        machine = {"device": "cpu", "processor": "x", "cpu_count": 2, "torch": "t", "platform": "p",
                   "cpu_capability": isa, "cpu_amx": has_amx}  # fmt: skip
        old = {"method": method, "name": name, "tag": "previous", "machine": machine, "top1": top1, "top5": 50.0,
               "student_top1": None, "steps": 3, "images_per_second": 1.0, "train_seconds": 60.0,
               "wall_seconds": 60.0, "curve": [], "command": "old", "recipe_note": f"recipe {isa}."}  # fmt: skip
        file_tag = f"cpu_{isa.lower()}" + ("_amx" if has_amx else "")
        (results / f"quality_{file_tag}_{method}_previous.json").write_text(json.dumps(old))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sop = json.loads((results / f"quality_{tag}_sop_main.json").read_text())
    assert sop["steps"] >= 1 and sop["curve"] and 0 <= sop["top1"] <= 100 and sop["images_per_second"] > 0
    assert sop["machine"]["cpu_capability"] == here and sop["curve"][-1]["step"] == sop["steps"]  # one at the end
    # --points 1: the end only, or one more where TimeBudget planned past the calibration fit's estimate
    assert len(sop["curve"]) == 1 or (len(sop["curve"]) == 2 and sop["curve"][0]["step"] > sop["steps"] / 2)
    assert (results / f"quality_{tag}_raw_pixels_centred.json").exists()
    text = (docs / "benchmarks.md").read_text()
    assert "| SOP |" in text and "raw pixels" in text and (docs / f"quality_{tag}.png").exists()
    # a method not re-run keeps its earlier row, marked; a re-run method shows only its new row
    assert "| DINO † | 11.00 |" in text and f"† Not yet re-run with the current demo recipe: recipe {here}." in text
    assert "| SOP † |" not in text
    # each row records what it trained with: the demo config and the overrides
    assert sop["recipe"]["model"]["embed_dim"] == 32 and sop["recipe"]["data"]["batch_size"] == 4
    assert (docs / f"retrievals_{tag}.png").exists() and (docs / f"sops_{tag}.png").exists() and "![SOPs]" in text
    # a row of another machine is a table of its own, which the baselines join (equal wall clock compares
    # only on one machine); this machine's table does not hold it
    # keyed by the ISA in the heading's "<processor> (<ISA>), <n> cores" (a processor name may hold "(R)")
    tables = {re.search(r"\(([^()]*)\), \d+ cores", s.splitlines()[0]).group(1): s for s in text.split("### ")[1:]}
    # the same ISA with and without AMX tiles are two machines (2026-12: 2-core machines of both kinds)
    here_label, other_label = (f"{here}, AMX", here) if amx else (here, f"{here}, AMX")
    assert set(tables) == {here_label, other_label, "OTHERISA"}
    assert "| DINO-vMF † | **14.00** |" in tables[other_label] and "DINO-vMF" not in tables[here_label]
    tables[here] = tables[here_label]
    assert "| iBOT ‡ | **13.00** |" in tables["OTHERISA"] and "‡ Not yet re-run" in tables["OTHERISA"]
    assert "raw pixels" in tables["OTHERISA"] and "‡" not in tables[here]
    assert "iBOT" not in tables[here] and "| SOP |" not in tables["OTHERISA"]
    # the paired comparison reloads the runs' checkpoints and re-measures their k-NN on the same test images;
    # the rows of another tag (here a copy of the main row) compare into a file of their own, beside the main
    # comparison's
    (results / f"quality_{tag}_sop_budget45.json").write_text(json.dumps(sop))
    compare = [*cmd[:2], "--compare", "sop", "sop", *cmd[cmd.index("--root") : cmd.index("--root") + 2],
               "--results", str(results), "--runs", str(tmp_path / "runs"), "--tag", "budget45", *TINY_SOP]  # fmt: skip
    proc = subprocess.run(compare, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (results / f"compare_{tag}_sop_sop.json").exists()
    paired = json.loads((results / f"compare_{tag}_sop_sop_budget45.json").read_text())
    assert paired["difference"] == 0 and paired["mcnemar_p"] == 1.0 and paired["n"] == 8  # the fake test split
    assert f"SOP: top-1 {sop['top1']:.2f} (result file: {sop['top1']:.2f})" in proc.stdout


def test_quality_benchmark_epochs(fake_fmnist, tmp_path, capsys):
    """``--epochs`` (the GPU budget) plans that many passes over the training images: 20 fake images in batches
    of 6 are 3 steps an epoch (the last incomplete batch dropped), so 2 epochs are 6 steps; bad budgets exit
    with a message that names the argument."""
    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--methods", "dino", "--epochs", "2",
           "--points", "1", "--tag", "epochs", "--root", str(fake_fmnist), "--results", str(results),
           "--runs", str(tmp_path / "runs"), "--set", "data.init_args.batch_size=6",
           "--set", "data.init_args.num_workers=0", "--set", "model.init_args.embed_dim=32",
           "--set", "model.init_args.depth=1", "--set", "model.init_args.num_heads=2",
           "--set", "model.init_args.hidden_dim=32", "--set", "model.init_args.num_prototypes=64"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = [json.loads(p.read_text()) for p in results.glob("quality_*_dino_epochs.json")]
    assert row["steps"] == 6 and row["epochs"] == 2 and row["budget_minutes"] is None
    quality = _load_quality()  # the argument checks in this process: the same parser, no second start-up
    for bad, message in ((["--epochs", "0"], "--epochs must be > 0, got 0.0"),
                         (["--epochs", "1", "--steps", "3"], "give --steps or --epochs, not both")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            quality.main(["--methods", "dino", *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_quality_benchmark_keeps_the_row_when_the_pictures_fail(fake_fmnist, tmp_path, monkeypatch, capsys):
    """A SOP run that cannot draw its pictures (matplotlib not importable: ``None`` in ``sys.modules`` makes
    ``import matplotlib`` raise) saves its result row first, then exits non-zero naming what is missing:
    the training minutes are not lost to the pictures drawn after them."""
    quality = _load_quality()
    monkeypatch.setattr(sys, "argv", ["quality.py"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    results, docs = tmp_path / "results", tmp_path / "docs"
    args = ["--methods", "sop", "--steps", "2", "--points", "1", "--root", str(fake_fmnist), "--results",
            str(results), "--docs", str(docs), "--runs", str(tmp_path / "runs"), *TINY_SOP,
            "--set", "trainer.enable_progress_bar=false"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        quality.main(args)
    message = str(exit_info.value.code)
    assert message.startswith("quality.py: the SOP pictures were not drawn") and "matplotlib" in message, message
    (row,) = [json.loads(p.read_text()) for p in results.glob("quality_*_sop_main.json")]
    assert row["steps"] == 2 and 0 <= row["top1"] <= 100
    assert "->" in capsys.readouterr().out and not list(tmp_path.rglob("*.png"))


def _run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _smoke_args(root: Path, workdir: Path) -> dict[str, list[str]]:
    """The single-process benchmark scripts, each for a moment."""
    bench = ROOT / "benchmarks"
    return {
        "data_pipeline": [str(bench / "data_pipeline.py"), "--root", str(root), "--batch", "4", "--batches", "2",
                          "--warmup", "1", "--rounds", "1", "--workers", "0", "--images", "12", "--image-size",
                          "240", "230", "--workdir", str(workdir / "data_pipeline")],
        "throughput": [str(bench / "throughput.py"), "--root", str(root), "--batch", "4", "--steps", "4", "--warmup",
                       "1", "--rounds", "1", "--workers", "0", "--profile", "2"],
        "sop_loss": [str(bench / "sop_loss.py"), "--repeats", "1", "--batch", "2", "--memory-size", "512",
                     "--anchors", "32", "--patch-memory-size", "128", "--patch-anchors", "8"],
        "knn": [str(bench / "knn.py"), "--train", "300", "--test", "50", "--dim", "16", "--classes", "5",
                "--repeats", "1"],
    }  # fmt: skip


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[dict[str, subprocess.Popen], Path]:
    """Every script of :func:`_smoke_args`, started side by side (they run on one thread each)."""
    workdir = tmp_path_factory.mktemp("smoke")
    root = write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, args in _smoke_args(root, workdir).items():
        (workdir / name).mkdir()
        procs[name] = subprocess.Popen([sys.executable, *args], cwd=workdir / name, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)  # fmt: skip
    yield procs, workdir
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _smoke_output(smoke_runs, name: str) -> str:
    procs, _ = smoke_runs
    stdout, stderr = procs[name].communicate(timeout=300)
    assert procs[name].returncode == 0, stderr[-4000:]
    return stdout


def test_data_pipeline_benchmark_smoke(smoke_runs):
    out = _smoke_output(smoke_runs, "data_pipeline")
    lines = [line for line in out.splitlines() if "library / bare" in line]
    assert len(lines) == 2 and lines[0].startswith("demo (2x28 + ") and lines[1].startswith("imagenet (2x224")
    assert len(list((smoke_runs[1] / "data_pipeline" / "jpegs").glob("*.jpg"))) == 12


def test_throughput_benchmark_smoke(smoke_runs):
    out = _smoke_output(smoke_runs, "throughput")
    for name in ("library dino", "library sop", "bare dino"):  # the profiled extra run of each
        assert re.search(rf"profile {name}: [\d.]+ ms of device kernels a step, .* [\d.]+ aten calls", out), out
    assert "calls a step, library sop - bare dino:" in out and "host ms a step, library dino - bare dino:" in out
    for mode in ("step", "loader"):
        for name in ("library dino", "library ibot", "library sop", "lightly dino", "bare dino"):
            assert f"{mode:6s} {name}" in out, out
        assert f"{mode}: library DINO / lightly DINO = " in out and f"{mode}: SOP step / iBOT step = " in out


def test_sop_loss_benchmark_smoke(smoke_runs):
    out = _smoke_output(smoke_runs, "sop_loss")
    assert "losses / floor" in out and "distinct [CLS] supports" in out and "bfloat16 search mm" in out


def test_knn_benchmark_smoke(smoke_runs):
    out = _smoke_output(smoke_runs, "knn")
    assert "knn_classify[auto]" in out and "agree on the first" in out and "True" in out


def test_ddp_throughput_benchmark_smoke(fake_fmnist, tmp_path):
    out = _run([str(ROOT / "benchmarks" / "ddp_throughput.py"), "--method", "dino", "--batch", "4", "--steps", "4",
                "--warmup", "1", "--strategy", "ddp_spawn", "--data.init_args.root", str(fake_fmnist),
                "--data.init_args.num_workers", "0", "--model.init_args.depth", "1",
                "--model.init_args.embed_dim", "32", "--model.init_args.num_heads", "2",
                "--model.init_args.hidden_dim", "32"], tmp_path, timeout=400)  # fmt: skip
    assert "2 ranks / 1 process = " in out


def test_paired_difference_against_scipy():
    """quality.py's paired comparison: McNemar's exact p against scipy's binomial test, the difference and its
    bootstrap interval against the counts written out by hand."""
    from scipy.stats import binomtest

    quality = _load_quality()
    # 1000 test images: both right on 800, a only on 60, b only on 40, both wrong on 100
    a = torch.tensor([True] * 800 + [True] * 60 + [False] * 40 + [False] * 100)
    b = torch.tensor([True] * 800 + [False] * 60 + [True] * 40 + [False] * 100)
    out = quality.paired_difference(a, b, resamples=2000)
    assert (out["a_only"], out["b_only"], out["n"]) == (60, 40, 1000)
    assert abs(out["difference"] - 2.0) < 1e-4  # (860 - 840) / 1000
    assert abs(out["mcnemar_p"] - binomtest(40, 100, 0.5).pvalue) < 1e-9
    # the bootstrap interval holds the difference and has the normal approximation's width: 2 * 1.96 * sd
    sd = ((60 + 40) / 1000 - 0.02**2) ** 0.5 / 1000**0.5 * 100
    low, high = out["ci95"]
    assert low < 2.0 < high and abs((high - low) - 2 * 1.96 * sd) < 0.25 * 2 * 1.96 * sd
    # identical classifiers: no difference, p = 1
    same = quality.paired_difference(a, a, resamples=100)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0 and same["ci95"] == (0.0, 0.0)


def test_quality_report_names_the_processor_the_rows_ran_on(tmp_path):
    """A table's heading names the processor recorded with its rows; rows that did not record one read 'processor
    not recorded', never the name of the machine the report runs on. Where the runs under one heading (one vector
    ISA) ran on several hosts, a line under it counts the runs of each."""
    quality = _load_quality()
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()

    def row(method: str, processor: str | None, isa: str) -> dict:
        where = {"platform": "Linux-test", "cpu_count": 2, "torch": "2.x", "device": "cpu", "cpu_capability": isa}
        if processor is not None:
            where["processor"] = processor
        return {"method": method, "name": method.upper(), "tag": "main", "top1": 80.0, "top5": 99.0,
                "student_top1": 80.0, "steps": 10, "images_per_second": 1.0, "train_seconds": 60.0,
                "wall_seconds": 70.0, "curve": [{"train_seconds": 60.0, "step": 10, "top1": 80.0}],
                "command": f"python benchmarks/quality.py --methods {method}", "machine": where}  # fmt: skip

    for i, r in enumerate([row("sop", None, "AVX512"), row("dino", None, "AVX512"), row("sop", "Chip X", "AVX2")]):
        (results / f"quality_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    headings = [line for line in (docs / "benchmarks.md").read_text().splitlines() if line.startswith("### ")]
    assert sorted(headings) == ["### CPU: Chip X (AVX2), 2 cores, torch 2.x, Linux-test",
                                "### CPU: processor not recorded (AVX512), 2 cores, torch 2.x, Linux-test"]  # fmt: skip

    # a heading stands for one vector ISA; where its runs (main, seeds, longer budgets) came from several hosts,
    # the line under it counts each host's runs, so the heading's host is not read as every run's
    for path in results.glob("*.json"):
        path.unlink()
    amd, intel = ("AMD", "Linux-6.1-v1-x86_64-with-glibc"), ("Intel", "Linux-6.1-v2-x86_64-with-glibc")
    # the last, an ablation's tag, is neither shown nor counted
    runs = [("sop", "main", amd), ("dino", "main", amd), ("sop", "seed1", intel), ("sop", "budget45", intel),
            ("dino", "budget45", amd), ("sop", "k512", intel)]  # fmt: skip
    for i, (method, tag, (processor, platform)) in enumerate(runs):
        r = row(method, processor, "AVX512")
        r["machine"]["platform"], r["tag"], r["seed"] = platform, tag, int(tag.partition("seed")[2] or 0)
        (results / f"quality_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    text = (docs / "benchmarks.md").read_text()
    assert ("The 5 runs under this heading ran on 2 hosts with this vector ISA (3 on AMD, 6.1-v1; 2 on Intel, "
            "6.1-v2); the heading names the host of the first table's rows") in text  # fmt: skip
    for i, (method, _, (processor, platform)) in enumerate(runs[:2]):  # one host: no such line
        r = row(method, processor, "AVX512")
        r["machine"]["platform"] = platform
        (results / f"quality_{i}.json").write_text(json.dumps(r))
    for i in range(2, len(runs)):
        (results / f"quality_{i}.json").unlink()
    quality.report(results, docs)
    assert "runs under this heading" not in (docs / "benchmarks.md").read_text()


def test_quality_rows_name_the_device_they_ran_on():
    """A row records the run's device, not whether the machine has a GPU: a CPU run is a CPU row (its table is
    the ISA's), a CUDA run a ``gpu`` row."""
    quality = _load_quality()
    cpu = quality.machine(torch.device("cpu"))
    assert cpu["device"] == "cpu" and quality.machine_tag(cpu).startswith("cpu")
    assert quality.machine_tag({**cpu, "device": "cuda:NVIDIA H200"}) == "gpu"


def test_quality_baselines_and_compare_use_the_runs_device(fake_fmnist, tmp_path, monkeypatch):
    """On a machine with a GPU, a run whose overrides keep the demo configs' CPU accelerator is a CPU run: its
    baseline rows join the CPU table and ``--compare`` reads the CPU table, not the machine's GPU one."""
    quality = _load_quality()
    real = quality.machine
    # this machine "has a GPU": what a row would record if it asked the machine instead of the run
    monkeypatch.setattr(quality, "machine", lambda device=None: real(device) if device is not None
                        else {**real(torch.device("cpu")), "device": "cuda:fake"})  # fmt: skip
    small = ["data.init_args.batch_size=4", "data.init_args.num_workers=0", "model.init_args.embed_dim=32",
             "model.init_args.depth=1", "model.init_args.num_heads=2", "model.init_args.hidden_dim=32",
             "model.init_args.memory_size=64", "model.init_args.patch_memory_size=32",
             "model.init_args.num_anchors=8", "model.init_args.num_patch_anchors=4",
             f"data.init_args.root={fake_fmnist}"]  # fmt: skip
    args = argparse.Namespace(runs=tmp_path / "runs", set=small, knn_subset=None, root=str(fake_fmnist),
                              results=tmp_path, tag="main")  # fmt: skip
    rows = quality.run_baselines(["pixels"], args)
    assert [quality.machine_tag(r["machine"]) for r in rows] == [quality.machine_tag(real(torch.device("cpu")))] * 2
    with pytest.raises(SystemExit, match=r"no result .*quality_cpu_\w+_sop_main\.json of this device \(cpu_"):
        quality.compare(["sop", "sop"], args)


def test_quality_report_summarises_seeds(tmp_path):
    """The report's seed table: mean and sample standard deviation over the ``main`` row and its ``seed<n>`` rows
    of the same recipe and budget (written out here), SOP's lead with the standard error of a difference of
    means from the methods' own deviations and from the pooled one; a probe (another tag), another budget or
    another machine's seed stays out."""
    quality = _load_quality()
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    where = {"platform": "Linux-test", "cpu_count": 2, "torch": "2.x", "device": "cpu", "cpu_capability": "AVX512",
             "processor": "Chip"}  # fmt: skip

    def row(method: str, tag: str, seed: int, top1: float, budget: float = 20.0, isa: str = "AVX512") -> dict:
        return {"method": method, "name": quality.METHODS[method], "tag": tag, "seed": seed, "top1": top1,
                "top5": 99.0, "student_top1": None, "steps": 100 + seed, "images_per_second": 1.0,
                "train_seconds": 60.0, "wall_seconds": 70.0, "curve": [], "command": f"run {method}",
                "budget_minutes": budget, "epochs": None, "overrides": [], "recipe": {"model": {"d": 1}},
                "machine": {**where, "cpu_capability": isa}}  # fmt: skip

    rows = [row("sop", "main", 0, 86.0), row("sop", "seed1", 1, 87.0), row("sop", "seed2", 2, 86.5),
            row("dino", "main", 0, 85.0), row("dino", "seed1", 1, 85.4),
            row("dino", "steps4800", 0, 99.0), row("dino", "seed2", 2, 99.0, budget=5.0),
            row("dino", "seed3", 3, 99.0, isa="AVX2"), row("ibot", "main", 0, 84.0)]  # fmt: skip
    for i, r in enumerate(rows):
        (results / f"quality_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in (docs / "benchmarks.md").read_text().splitlines()
             if line.startswith("| ") and "(" in line.split("|")[2]}  # fmt: skip
    # SOP: mean 86.5, sd sqrt((0.25 + 0.25 + 0) / 2) = 0.5; DINO: mean 85.2, sd sqrt((0.04 + 0.04) / 1) = 0.2828
    assert table["SOP"] == ["3 (0, 1, 2)", "86.50 ± 0.50", "86.00–87.00", "101", "", "", ""]
    se = (0.5**2 / 3 + 0.08 / 2) ** 0.5  # 0.3415
    # pooled: (2 · 0.25 + 1 · 0.08) / 3 degrees of freedom = 0.1933, s_p = 0.4397
    pooled = ((2 * 0.25 + 1 * 0.08) / 3) ** 0.5
    assert f"pooled over the methods, {pooled:.2f} with 3 degrees of freedom" in (docs / "benchmarks.md").read_text()
    pooled_dino, pooled_ibot = pooled * (1 / 3 + 1 / 2) ** 0.5, pooled * (1 / 3 + 1) ** 0.5  # 0.4014, 0.5077
    assert table["DINO"] == ["2 (0, 1)", "85.20 ± 0.28", "85.00–85.40", "100", "+1.30", f"{se:.2f}",
                             f"{pooled_dino:.2f}"]  # fmt: skip
    assert table["iBOT"] == ["1 (0)", "84.00", "", "100", "+2.50", "", f"{pooled_ibot:.2f}"]
    # a longer budget's rows (tag budget<n>) are a table of their own under their machine's, not seeds
    text = (docs / "benchmarks.md").read_text()
    assert "A longer budget" not in text
    curve = [{"train_seconds": 600.0, "step": 50, "top1": 85.25}, {"train_seconds": 2700.0, "step": 100, "top1": 88.0}]
    longer = [{**row("sop", "budget45", 0, 88.0, budget=45.0), "curve": curve, "date": "2026-12-03"},
              {**row("sop", "budget45", 0, 80.0, budget=45.0), "date": "2026-12-01"},  # an older run: replaced
              {**row("dino", "budget45", 0, 87.5, budget=45.0), "curve": curve[1:]},
              row("ibot", "budget45", 0, 99.0, budget=45.0, isa="AVX2")]  # another machine  # fmt: skip
    for i, r in enumerate(longer):
        (results / f"quality_longer_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    text = (docs / "benchmarks.md").read_text()
    section = text[text.index("A longer budget (`--tag budget45`: 45 training minutes, one seed each):") :]
    rows_45 = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows_45[0] == "| SOP | **88.00** | 99.00 | 100 | 1 | 1.0 min | 85.25 (10) | 2026-12-03 |"
    assert rows_45[1] == "| DINO | 87.50 | 99.00 | 100 | 1 | 1.0 min |  |  |"
    assert "| iBOT | 99.00" not in section and "80.00" not in section  # another machine's; the replaced run
    assert "budget45seed<n>" not in section  # no seed table while every method has one seed
    # other seeds of the longer budget (tags budget45seed<n>): a seed table under its table, not rows of it
    seeds = [
        row("sop", "budget45seed1", 1, 87.0, budget=45.0),
        row("sop", "budget45seed2", 2, 87.5, budget=45.0),
        row("dino", "budget45seed1", 1, 86.9, budget=45.0),
        row("dino", "seed4", 4, 99.0, budget=45.0),  # a seed of the 45-minute budget under the main tags
    ]
    for i, r in enumerate(seeds):
        (results / f"quality_seeds45_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    text = (docs / "benchmarks.md").read_text()
    section = text[text.index("A longer budget (`--tag budget45`: 45 training minutes, each method's first seed") :]
    assert "Over seeds (`--seed <n> --tag budget45seed<n>`" in section
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    rows_45 = [line for line in lines if "(" not in line.split("|")[2]][1:]
    assert rows_45[0] == "| SOP | **88.00** | 99.00 | 100 | 1 | 1.0 min | 85.25 (10) | 2026-12-03 |"
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines if "(" in line.split("|")[2]}  # fmt: skip
    # SOP: 88.0, 87.0, 87.5: mean 87.5, sd 0.5; DINO: 87.5, 86.9: mean 87.2, sd 0.6 / sqrt(2) = 0.4243
    assert table["SOP"] == ["3 (0, 1, 2)", "87.50 ± 0.50", "87.00–88.00", "101", "", "", ""]
    se = (0.5**2 / 3 + 0.18 / 2) ** 0.5
    pooled = ((2 * 0.25 + 1 * 0.18) / 3) ** 0.5 * (1 / 3 + 1 / 2) ** 0.5
    assert table["DINO"] == ["2 (0, 1)", "87.20 ± 0.42", "86.90–87.50", "100", "+0.30", f"{se:.2f}",
                             f"{pooled:.2f}"]  # fmt: skip
    assert "99.00" not in "".join(table["DINO"])


def test_host_adjusted_leads_hold_the_host_fixed():
    """SOP's host-adjusted lead (least squares of top-1 = method + host). Unbalanced hosts and noise-free additive
    data: the plain means' difference carries the host's effect, the adjusted lead is the true one. A balanced
    2 × 2 design with two runs a cell and noise: the lead is the difference of the methods' means and its standard
    error s · sqrt(1/4 + 1/4), s² the residual sum of squares of the additive fit (written out) over 8 − 3."""
    quality = _load_quality()

    def run(top1: float, host: str) -> dict:
        return {"top1": top1, "machine": {"platform": host}}

    # SOP is 0.3 above DINO on either host; the fast host adds 0.5; SOP ran mostly on the slow one
    runs = {"sop": [run(87.0, "slow"), run(87.0, "slow"), run(87.0, "slow"), run(87.5, "fast")],
            "dino": [run(86.7, "slow"), run(87.2, "fast"), run(87.2, "fast")]}  # fmt: skip
    plain = sum(r["top1"] for r in runs["sop"]) / 4 - sum(r["top1"] for r in runs["dino"]) / 3
    assert abs(plain - 0.3) > 0.1  # the plain means mislead ...
    out = quality.host_adjusted(runs)
    lead, se = out["leads"]["dino"]
    assert abs(lead - 0.3) < 1e-9 and se < 1e-6 and out["dof"] == 7 - 3 and out["hosts"] == 2  # ... not this

    cells = {("sop", "a"): [86.0, 86.4], ("sop", "b"): [87.1, 86.9], ("dino", "a"): [85.8, 85.6],
             ("dino", "b"): [86.2, 86.8]}  # fmt: skip
    runs = {m: [run(v, h) for (mm, h), vs in cells.items() if mm == m for v in vs] for m in ("sop", "dino")}
    groups = {"sop": cells["sop", "a"] + cells["sop", "b"], "dino": cells["dino", "a"] + cells["dino", "b"],
              "a": cells["sop", "a"] + cells["dino", "a"], "b": cells["sop", "b"] + cells["dino", "b"]}  # fmt: skip
    mean = {k: sum(v) / len(v) for k, v in groups.items()}
    grand = sum(sum(v) for v in cells.values()) / 8
    rss = sum((v - (mean[m] + mean[h] - grand)) ** 2 for (m, h), vs in cells.items() for v in vs)
    lead, se = quality.host_adjusted(runs)["leads"]["dino"]
    assert abs(lead - (mean["sop"] - mean["dino"])) < 1e-9
    assert abs(se - (rss / 5) ** 0.5 * (1 / 4 + 1 / 4) ** 0.5) < 1e-9

    # the report's seed table states it under the table
    def row(method: str, seed: int, top1: float, host: str) -> dict:
        return {"method": method, "tag": "main" if seed == 0 else f"seed{seed}", "seed": seed, "top1": top1,
                "steps": 100, "machine": {"platform": host, "device": "cpu", "cpu_capability": "AVX512"}}  # fmt: skip

    rows = [row(m, i, v, h) for (m, h), vs in cells.items() for i, v in enumerate(vs, 2 * (h == "b"))]
    rows.append(row("pixels", 0, 84.6, "c"))  # a baseline row, measured once on another host, stays out
    lines = quality.seed_table(rows, [r for r in rows if r["seed"] == 0])
    assert lines[-1].startswith("Host-adjusted (the 8 runs span 2 hosts: 4 on a; 4 on b; told apart")
    assert lines[-1].endswith(f"5 degrees of freedom): SOP − DINO {lead:+.2f} ± {se:.2f}.")
    # one host, or a method seen on a host no other method ran on: nothing to adjust, or no way to
    assert quality.host_adjusted({"sop": [run(1.0, "a"), run(2.0, "a")], "dino": [run(1.0, "a")]}) is None
    assert quality.host_adjusted({"sop": [run(1.0, "a"), run(2.0, "a")], "dino": [run(1.0, "b")] * 3}) is None

    # one kernel build on two processors is two hosts: the adjusted lead removes the processor's effect too
    def on(top1: float, processor: str) -> dict:
        return {"top1": top1, "machine": {"platform": "same-kernel", "processor": processor}}

    runs = {"sop": [on(87.0, "AMD"), on(87.0, "AMD"), on(86.5, "Intel")],
            "dino": [on(86.8, "AMD"), on(86.8, "AMD"), on(86.3, "Intel"), on(86.3, "Intel")]}  # fmt: skip
    plain = sum(r["top1"] for r in runs["sop"]) / 3 - sum(r["top1"] for r in runs["dino"]) / 4
    assert abs(plain - 0.2) > 0.05  # the Intel runs' share differs between the methods
    out = quality.host_adjusted(runs)
    assert out["hosts"] == 2 and abs(out["leads"]["dino"][0] - 0.2) < 1e-9 and out["leads"]["dino"][1] < 1e-6
    assert out["shares"] == {"AMD, same-kernel": 4, "Intel, same-kernel": 3}  # the report names each host's runs
    platform = "Linux-6.18.44-fc-v1098-x86_64-with-glibc2.36"
    assert quality.host_label(platform, "AMD EPYC") == "AMD EPYC, 6.18.44-fc-v1098"


def test_quality_report_shows_the_launcher_of_rows_run_together(tmp_path):
    """Rows started together by one launcher (``--launcher``, as ``benchmarks/quality_gpu.sh`` passes it) are
    reproduced by that one command: the report lists it once instead of each row's own ``quality.py`` command;
    a row without a launcher keeps its own."""
    quality = _load_quality()
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    gpu = {"platform": "Linux-test", "cpu_count": 16, "torch": "2.x", "device": "cuda:Test GPU"}
    launcher = "benchmarks/quality_gpu.sh 5.5 3 out/results out/docs"
    for i, method in enumerate(["sop", "dino", "ibot"]):
        r = {"method": method, "name": method.upper(), "tag": "main", "top1": 80.0 + i, "top5": 99.0,
             "student_top1": None, "steps": 10, "images_per_second": 1.0, "train_seconds": 60.0,
             "wall_seconds": 70.0, "curve": [], "command": f"python benchmarks/quality.py --methods {method}",
             "launcher": launcher if method != "ibot" else None, "machine": gpu}  # fmt: skip
        (results / f"quality_{i}.json").write_text(json.dumps(r))
    quality.report(results, docs)
    text = (docs / "benchmarks.md").read_text()
    block = text[text.index("Commands:") :].split("```")[1].strip().splitlines()
    assert block == ["bash", launcher, "python benchmarks/quality.py --methods ibot"]


def test_quality_gpu_launcher_runs_every_method(tmp_path):
    """``benchmarks/quality_gpu.sh`` (shell syntax; five methods; each run told its launcher) — read, not run:
    it trains five methods at once."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    methods = " ".join(_load_quality().METHODS)  # the script's list is quality.py's, in its order
    assert f"for method in {methods}" in text and '--launcher "$LAUNCHER"' in text
