"""Quality at an equal wall-clock budget on Fashion-MNIST (issue 9).

Each method trains from its demo config (``experiments/demo/<method>.yaml``, the same ViT, crops and batch)
for the same training wall-clock time: :class:`~sop_lightning.callbacks.TimeBudget` plans the run's steps
from its first step times and plans again every 100 steps from the latest ones, so the schedules (lr,
momentum, temperatures) end when the budget does even when the machine's speed drifts (a short calibration
fit before it only places the evaluation points). The teacher's weighted k-NN (ALGORITHMS.md §11.1: all 60k
training images as neighbours, the 10k test split, k = 20, T = 0.07) is measured at a few points and at the
end; evaluation time is not part of the budget. One JSON per method lands in ``benchmarks/results/`` as soon
as it completes, so long sessions can be split; ``--report`` turns them into ``docs/benchmarks.md`` and a
PNG plot.

Baselines on the same protocol: ``pixels`` (raw and centred pixels) and ``random_init`` (the demo ViT with
its random initial weights, under the eval transform).

Usage::

    python benchmarks/quality.py --methods sop --budget 20            # one method per run (CPU: ~22 min)
    python benchmarks/quality.py --methods pixels random_init         # the baseline rows
    python benchmarks/quality.py --report                             # table + plot in docs/
    python benchmarks/quality.py --compare sop dino                   # paired test on the same test images
    python benchmarks/quality.py --methods sop --seed 1 --tag seed1   # another seed (not a row of the table)
    python benchmarks/quality.py --methods sop --budget 45 --tag budget45              # a longer budget's table
    python benchmarks/quality.py --methods sop --budget 45 --seed 1 --tag budget45seed1  # ... and its seeds
    python benchmarks/quality.py --methods dino --budget 0.2 --points 1 --knn-subset 200 --tag smoke

On a GPU, a budget in epochs instead of minutes (``--epochs``: the schedules end after that many passes over
the 60k training images), with the device, precision, batch and loader workers as overrides (the default tag:
the rows are told apart by their machine, ``gpu``, and make that machine's table)::

    python benchmarks/quality.py --methods sop --epochs 100 --set trainer.accelerator=gpu \
        --set trainer.precision=bf16-mixed --set data.init_args.batch_size=256 --set data.init_args.num_workers=12

``benchmarks/quality_gpu.sh 5.5 3`` trains the five at once on one GPU for 5.5 minutes each (``100ep``: 100 epochs
each): the 28-px runs are bound by the loader's CPU crops, so five at once share the cores (the GPU table of
``docs/benchmarks.md``).

``--set key=value`` passes LightningCLI overrides (``--set model.init_args.momentum_teacher_end=0.995``).
Needs the ``bench`` extra for the plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from sop_lightning import KNNEvaluation, knn_classify
from sop_lightning.callbacks import TimeBudget
from sop_lightning.cli import ConfigError, build_cli
from sop_lightning.data import FashionMNIST

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
METHODS = {"sop": "SOP", "dino": "DINO", "ibot": "iBOT", "dino_vmf": "DINO-vMF", "ibot_vmf": "iBOT-vMF"}
BASELINES = ("pixels", "random_init")
COMMAND = "python benchmarks/quality.py"
#: Result tags in the report: ``main`` (the current demo configs) and ``previous`` (a method's latest row under
#: an earlier demo recipe, kept until it is re-run; its ``recipe_note`` says which recipe, marked in the table).
REPORTED_TAGS = ("main", "previous")
MARKS = "†‡§¶"


class StepClock(L.Callback):
    """Training wall clock with validation time taken out, and the k-NN curve at every validation."""

    def __init__(self, knn: KNNEvaluation):
        self.knn, self.train_seconds, self.eval_seconds, self.curve = knn, 0.0, 0.0, []
        self._since: float | None = None

    def _pause(self) -> None:
        if self._since is not None:
            self.train_seconds += time.perf_counter() - self._since
            self._since = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause()
        self._eval_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.eval_seconds += time.perf_counter() - self._eval_start
        fitting = trainer.state.fn == "fit"
        m, self.knn.last_metrics = self.knn.last_metrics, {}
        if m and fitting:
            self.curve.append({"train_seconds": round(self.train_seconds, 1), "step": trainer.global_step,
                               "top1": m["val/knn_top1"], "top5": m["val/knn_top5"]})  # fmt: skip
        if fitting:
            self._since = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._pause()


def _cli_args(method: str, steps: int, points: int, root: Path, tag: str, extra: list[str], subset: int | None,
              max_steps: int | None = None):  # fmt: skip
    args = [
        "--config", str(ROOT / "experiments" / "demo" / f"{method}.yaml"), "--trainer.max_epochs", "-1",
        "--trainer.max_steps", str(max_steps or steps), "--trainer.limit_train_batches", "null",
        "--trainer.max_time", "null", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.val_check_interval", str(steps // max(points, 1) + 1), "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", f"{method}_{tag}",
    ]  # fmt: skip
    if subset:
        args += ["--data.init_args.knn_train_subset", str(subset), "--data.init_args.knn_val_subset", str(subset)]
    for item in extra:
        key, _, value = item.partition("=")
        args += [f"--{key}", value]
    return args


def _build(method: str, steps: int, points: int, root: Path, tag: str, extra: list[str], subset: int | None,
           max_steps: int | None = None):  # fmt: skip
    sys.argv = sys.argv[:1]
    cli = build_cli(_cli_args(method, steps, points, root, tag, extra, subset, max_steps), run=False)
    knn = KNNEvaluation(student=False)
    clock = StepClock(knn)
    cli.trainer.callbacks.extend([knn, clock])
    return cli, knn, clock


def _time_budget(minutes: float, calibration_steps: int) -> TimeBudget:
    """TimeBudget timing ``calibration_steps`` (at most 5 of them, half of a short fit, as warm-up)."""
    return TimeBudget(minutes, calibration_steps=calibration_steps, warmup_steps=min(5, calibration_steps // 2))


def seconds_per_step(method: str, root: Path, extra: list[str], minutes: float, steps: int = 30) -> float:
    """Median training step time of a short fit, as TimeBudget measures it for a run of ``minutes``."""
    cli, _, _ = _build(method, steps, 0, root, "calibration", extra + ["trainer.limit_val_batches=0"], None)
    budget = _time_budget(minutes, steps)
    cli.trainer.callbacks.append(budget)
    cli.trainer.fit(cli.model, cli.datamodule)
    if budget.seconds_per_step is None:
        raise RuntimeError(f"the calibration fit of {method} ended before {steps} steps were timed")
    return budget.seconds_per_step


def steps_per_epoch(method: str, root: Path, extra: list[str]) -> int:
    """Training batches in one epoch of ``method``'s demo config with the overrides ``extra`` (the batch size
    among them; the last incomplete batch is dropped)."""
    cli, _, _ = _build(method, 1, 0, root, "epochs", extra, None)
    return len(cli.datamodule.train_dataloader())


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` on the first ``/proc/cpuinfo`` line that has it (Linux), else ``None``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def processor() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def has_amx() -> bool:
    """Whether the cores have AMX tiles (``amx_tile`` in ``/proc/cpuinfo``; ``False`` where it is not readable)."""
    return "amx_tile" in (_cpuinfo("flags") or "").split()


def machine(device: torch.device | None = None) -> dict:
    """What a row ran on: the processor, its vector ISA and AMX tiles, torch, and ``device`` — the run's
    (``trainer.strategy.root_device``: a CPU run on a machine with a GPU is a CPU row), else this machine's GPU
    where it has one."""
    threads = torch.get_num_threads()
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = "cuda:" + torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"platform": platform.platform(), "processor": processor(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_amx": has_amx(),
            "torch_threads": threads, "torch": torch.__version__, "device": device}  # fmt: skip


def machine_tag(where: dict) -> str:
    """``gpu``, or ``cpu_<vector ISA>`` (``cpu_avx2``, ``cpu_avx512``), with ``_amx`` where the cores have AMX
    tiles (``cpu_avx512_amx``): the processor name alone ("AMD EPYC") does not tell machines of 2.5x different
    speed apart, torch reports "AVX512" for cores with and without AMX's bf16 matrix units, and rows at an
    equal wall clock compare only on one machine."""
    if where["device"].startswith("cuda"):
        return "gpu"
    capability = re.sub(r"[^a-z0-9]+", "", where.get("cpu_capability", "").lower())
    amx = "_amx" if where.get("cpu_amx") else ""
    return f"cpu_{capability}{amx}" if capability else "cpu"


def recipe(cli) -> dict:
    """The model and data arguments a run trained with (its demo config and the overrides), for the record."""
    config = cli.config.as_dict()
    return json.loads(json.dumps({k: config[k]["init_args"] for k in ("model", "data")}, default=str))


def _overrides(method: str, overrides: list[str]) -> list[str]:
    """The LightningCLI overrides a method's quality run takes: SOP keeps each bank row's image index for the
    SOP pictures (no effect on training)."""
    return [*overrides, "model.init_args.track_indices=true"] if method == "sop" else overrides


def run_method(method: str, args: argparse.Namespace) -> tuple[dict, LightningCLI]:
    """Trains ``method`` for the budget of ``args`` and evaluates it: its result row, and the CLI that
    holds the trained model and data (for :func:`draw_pictures`)."""
    root = args.runs
    # the training seed: the ViT's initialisation (the CLI seeds before it builds the model) and every draw after
    extra = [*_overrides(method, args.set), *([f"seed_everything={args.seed}"] if args.seed else [])]
    budget = None
    if args.steps:  # recipe probes: equal steps, whatever else runs on the machine
        per_step, steps = float("nan"), args.steps
    elif args.epochs:  # equal passes over the data (GPU runs): the loader's batches per epoch, with the overrides
        per_step, steps = float("nan"), max(1, round(args.epochs * steps_per_epoch(method, root, extra)))
    else:  # the estimate places the evaluation points; TimeBudget plans the run (at most twice the estimate)
        per_step = seconds_per_step(method, root, extra, args.budget, args.calibration_steps)
        steps = max(1, int(args.budget * 60 / per_step))
        budget = _time_budget(args.budget, args.calibration_steps)
    L.seed_everything(args.seed)
    # room for a machine that speeds up; a run too short for TimeBudget to plan ends at the estimate
    cap = 2 * steps if budget and steps > 2 * args.calibration_steps else steps
    cli, knn, clock = _build(method, steps, args.points, root, args.tag, extra, args.knn_subset, max_steps=cap)
    if budget is not None:
        cli.trainer.callbacks.append(budget)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    knn.student = True
    final = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    wall = time.perf_counter() - start
    if not clock.curve or clock.curve[-1]["step"] != cli.trainer.global_step:
        clock.curve.append({"train_seconds": round(clock.train_seconds, 1), "step": cli.trainer.global_step,
                            "top1": final["val/knn_top1"], "top5": final["val/knn_top5"]})  # fmt: skip
    batch = cli.datamodule.batch_size
    ckpt = root / f"{method}_{args.tag}.ckpt"
    where = machine(cli.trainer.strategy.root_device)  # the run's device: a CPU run on a GPU machine is a CPU row
    cli.trainer.save_checkpoint(ckpt, weights_only=False)  # resumable: callbacks and loops too
    row = {
        "method": method, "name": METHODS[method], "tag": args.tag, "seed": args.seed,
        "budget_minutes": None if args.steps or args.epochs else args.budget, "epochs": args.epochs,
        "seconds_per_step_calibration": round(per_step, 4), "steps": cli.trainer.global_step, "batch_size": batch,
        "seconds_per_step_last_plan": round(budget.seconds_per_step, 4) if budget and budget.seconds_per_step else None,
        "train_seconds": round(clock.train_seconds, 1), "eval_seconds": round(clock.eval_seconds, 1),
        "wall_seconds": round(wall, 1),
        "images_per_second": round(cli.trainer.global_step * batch / clock.train_seconds, 1),
        "curve": clock.curve, "top1": final["val/knn_top1"], "top5": final["val/knn_top5"],
        "top1_k200": final.get("val/knn_top1_k200"), "student_top1": final.get("val/knn_student_top1"),
        "knn_subset": args.knn_subset, "overrides": args.set, "recipe": recipe(cli),
        "checkpoint": os.path.relpath(ckpt, ROOT), "command": COMMAND, "launcher": args.launcher,
        "machine": where, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    return row, cli


def draw_pictures(cli: LightningCLI, where: dict, docs: Path) -> list[Path]:
    """The k-NN retrievals and SOPs of a trained SOP run (``cli``) for docs/benchmarks.md, named by the
    machine ``where`` it ran on; needs matplotlib (extra ``bench``)."""
    from sop_lightning.evaluation import show_retrievals, show_sops

    device = machine_tag(where)
    paths = [docs / f"retrievals_{device}.png", docs / f"sops_{device}.png"]
    show_retrievals(cli.model, cli.datamodule, num_queries=6, k=8, path=paths[0])
    show_sops(cli.model, cli.datamodule, num_sops=5, num_neighbors=8, path=paths[1])
    return paths


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, resamples: int = 10_000,
                      seed: int = 0) -> dict:  # fmt: skip
    """Whether two classifiers' top-1 differ beyond the test set's sampling, on the *same* test images.

    ``correct_a``, ``correct_b``: ``(N,)`` bools. Returns the difference ``a - b`` in points, its 95 % paired
    bootstrap interval (test images resampled with replacement, both classifiers on the same draw), and
    McNemar's exact two-sided p-value on the discordant images (``a_only``: a right and b wrong; ``b_only``).
    It covers the test sampling only; a second training seed adds the run-to-run spread on top.
    """
    a, b = correct_a.bool(), correct_b.bool()
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"correct_a {tuple(a.shape)} and correct_b {tuple(b.shape)} must be equal 1-d shapes")
    n, delta = a.numel(), a.float() - b.float()
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([delta[torch.randint(n, (n,), generator=g)].mean() for _ in range(resamples)])
    low, high = torch.quantile(means.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    m = a_only + b_only  # under H0 each discordant image is a fair coin: Binomial(m, 1/2)
    tail = min(a_only, b_only)
    log_half = m * math.log(2)
    log_pmf = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - log_half for i in range(tail + 1)]
    p = min(1.0, 2 * sum(math.exp(x) for x in log_pmf)) if m else 1.0
    return {"difference": delta.mean().item() * 100, "ci95": (low * 100, high * 100), "a_only": a_only,
            "b_only": b_only, "mcnemar_p": p, "n": n}  # fmt: skip


def compare(methods: list[str], args: argparse.Namespace) -> None:
    """Paired comparison of two trained rows on the same 10k test images (:func:`paired_difference`), from the
    checkpoints their results name (``--tag``: the rows of that tag); prints it and saves
    ``compare_<machine>_<a>_<b>.json`` (``…_<b>_<tag>.json`` for a tag other than ``main``) beside the results
    (not a row of the report). The rows are those of the device the overrides ``--set`` run on (a CPU
    comparison on a GPU machine reads the CPU table), and the features are extracted there, under the run's
    precision, as :class:`~sop_lightning.KNNEvaluation` takes them in training."""
    from sop_lightning.evaluation.knn import extract_features

    correct, where = {}, None
    for method in methods:
        L.seed_everything(0)
        cli, _, _ = _build(method, 1, 1, args.runs, "compare", _overrides(method, args.set), None)
        device = cli.trainer.strategy.root_device
        where = machine(device)
        tag = machine_tag(where)
        result_path = args.results / f"quality_{tag}_{method}_{args.tag}.json"
        if not result_path.exists():
            raise SystemExit(f"--compare {method}: no result {result_path} of this device ({tag}); run it first")
        result = json.loads(result_path.read_text())
        ckpt = ROOT / result["checkpoint"]
        if not ckpt.exists():
            raise SystemExit(f"--compare {method}: the checkpoint {ckpt} of {result_path.name} is gone")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        cli.model.load_state_dict(state)
        cli.model.to(device).eval()
        # the teacher's features under the eval transform, on the run's device and precision
        with torch.no_grad(), cli.trainer.precision_plugin.forward_context():
            (ftr, ytr), (fte, yte) = (extract_features(cli.model.embed, loader, device)
                                      for loader in cli.datamodule.knn_dataloaders())  # fmt: skip
        scores = knn_classify(ftr, ytr, fte, k=20, temperature=0.07, num_classes=10)
        correct[method] = scores.argmax(1) == yte
        print(f"{METHODS[method]}: top-1 {correct[method].float().mean().item() * 100:.2f} "
              f"(result file: {result['top1']:.2f})")  # fmt: skip
    a, b = methods
    out = paired_difference(correct[a], correct[b])
    print(f"{METHODS[a]} - {METHODS[b]}: {out['difference']:+.2f} points, 95 % paired bootstrap interval "
          f"[{out['ci95'][0]:+.2f}, {out['ci95'][1]:+.2f}]; discordant test images {out['a_only']} "
          f"({METHODS[a]} only right) / {out['b_only']} ({METHODS[b]} only right), "
          f"McNemar p = {out['mcnemar_p']:.3f}")  # fmt: skip
    out.update({"methods": methods, "command": COMMAND, "machine": where, "date": time.strftime("%Y-%m-%d")})
    suffix = "" if args.tag == "main" else f"_{args.tag}"  # another tag's comparison beside the main one's
    (args.results / f"compare_{tag}_{a}_{b}{suffix}.json").write_text(json.dumps(out, indent=1))


def _root(args: argparse.Namespace) -> dict:
    return {"root": args.root} if args.root else {}


def run_baselines(which: list[str], args: argparse.Namespace) -> list[dict]:
    """The baseline rows, recorded under the device the overrides ``--set`` run on (the random-init ViT is
    evaluated there; the pixel rows join that device's table)."""
    out = []
    L.seed_everything(0)
    cli, _, _ = _build("sop", 1, 1, args.runs, "random_init", args.set, args.knn_subset)
    where = machine(cli.trainer.strategy.root_device)
    if "pixels" in which:
        train, test = FashionMNIST(split="train", **_root(args)), FashionMNIST(split="test", **_root(args))
        xtr, ytr = train.images.flatten(1).float() / 255, train.targets
        xte, yte = test.images.flatten(1).float() / 255, test.targets
        mean = xtr.mean(0)
        for name, a, b in (("raw pixels", xtr, xte), ("raw pixels, centred", xtr - mean, xte - mean)):
            scores = knn_classify(a, ytr, b, k=20, temperature=0.07, num_classes=10)
            top = scores.topk(5, dim=1).indices
            out.append({"method": "pixels", "name": name, "top1": (top[:, 0] == yte).float().mean().item() * 100,
                        "top5": (top == yte[:, None]).any(1).float().mean().item() * 100})  # fmt: skip
    if "random_init" in which:
        m = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
        out.append({"method": "random_init", "name": "random init (demo ViT)", "top1": m["val/knn_top1"],
                    "top5": m["val/knn_top5"]})  # fmt: skip
    for row in out:
        row.update({"command": COMMAND, "machine": where, "date": time.strftime("%Y-%m-%d")})
    return out


def save(result: dict, results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    if result["method"] in BASELINES:
        name = re.sub(r"[^a-z0-9]+", "_", result["name"].lower()).strip("_")
    else:
        name = f"{result['method']}_{result.get('tag', 'main')}"
    path = results / f"quality_{machine_tag(result['machine'])}_{name}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def _command(row: dict) -> str:
    """The command that reproduces a row: its launcher where one started it (``--launcher``: the five GPU rows
    of ``benchmarks/quality_gpu.sh`` come from one command), else its own ``quality.py`` command."""
    return row.get("launcher") or row["command"]


def _note(row: dict) -> str | None:
    """Which earlier recipe a ``previous`` row was measured with (``None`` for a row of the current one)."""
    if row.get("tag", "main") != "previous":
        return None
    return row.get("recipe_note") or "measured with an earlier demo recipe."


#: What makes two runs of a method the same experiment but for the seed: the recipe, the budget and the overrides.
SAME_RUN = ("recipe", "budget_minutes", "epochs", "overrides")


def seed_runs(rows: list[dict], main: dict, tags: str = r"seed\d+") -> list[dict]:
    """``main`` and the rows of other seeds of the same experiment (tags matching ``tags``: ``seed<n>`` for the
    main budget, ``budget<m>seed<n>`` for a longer one; the same machine and :data:`SAME_RUN` fields), in seed
    order."""
    same = [r for r in rows if r["method"] == main["method"] and re.fullmatch(tags, str(r.get("tag")))
            and machine_tag(r["machine"]) == machine_tag(main["machine"])
            and all(r.get(k) == main.get(k) for k in SAME_RUN)]  # fmt: skip
    return sorted([main, *same], key=lambda r: r.get("seed") or 0)


def host_adjusted(runs: dict[str, list[dict]]) -> dict | None:
    """SOP's lead over each method with the host held fixed: least squares of the additive model ``top1 = a_SOP
    + b_method + c_host`` over every run in ``runs`` (method -> rows), the host being the row's kernel build and
    processor (``machine["platform"]``, ``machine["processor"]``: VMs of one kernel build have run on an AMD EPYC
    and on an Intel Xeon). Equal-time runs on a faster host make more steps and read higher, so where the
    methods' seeds ran on the hosts in different shares the plain means carry the host's effect; within-host
    contrasts do not. Returns ``{"leads": {method: (SOP − method, its standard error)}, "dof", "sd" (the
    residual deviation), "hosts", "runs", "shares" ({host_label: its number of runs})}``; None where the runs
    span one host, SOP has no run, or the model has no residual degree of freedom or cannot tell method from host
    (a rank-deficient design: a method whose runs all ran on a host no other method used)."""
    if "sop" not in runs:
        return None
    methods = ["sop", *(m for m in runs if m != "sop")]
    flat = [(m, host_key(r), r["top1"]) for m in methods for r in runs[m]]
    hosts = sorted({h for _, h, _ in flat})
    if len(hosts) < 2:
        return None
    y = torch.tensor([top1 for _, _, top1 in flat], dtype=torch.float64)
    x = torch.tensor([[1.0, *(float(m == o) for o in methods[1:]), *(float(h == o) for o in hosts[1:])]
                      for m, h, _ in flat], dtype=torch.float64)  # fmt: skip
    n, p = x.shape
    if n <= p or int(torch.linalg.matrix_rank(x)) < p:
        return None
    inverse = torch.linalg.inv(x.T @ x)
    beta = inverse @ x.T @ y
    variance = float(((y - x @ beta) ** 2).sum()) / (n - p)
    leads = {m: (-float(beta[i]), math.sqrt(variance * float(inverse[i, i]))) for i, m in enumerate(methods[1:], 1)}
    runs_on = Counter(h for _, h, _ in flat)
    shares = {host_label(*h): runs_on[h] for h in hosts}
    return {"leads": leads, "dof": n - p, "sd": math.sqrt(variance), "hosts": len(hosts), "runs": n,
            "shares": shares}  # fmt: skip


def host_key(row: dict) -> tuple[str, str]:
    """The host a result row ran on: its kernel build and processor (``machine["platform"]``,
    ``machine["processor"]``; empty where not recorded); :func:`host_label` names it."""
    return row["machine"].get("platform", ""), row["machine"].get("processor", "")


def host_label(platform_name: str, processor_name: str) -> str:
    """A host as the report names it: its processor and kernel release (``platform_name``, the row's
    ``machine["platform"]``, less the OS name and the architecture and libc tails), e.g. ``"AMD EPYC,
    6.18.44-fc-v1098"``. (Not ``platform``/``processor``: those name this module's import and helper.)"""
    kernel = re.sub(r"^Linux-|-(x86_64|aarch64|arm64).*$|-with-.*$", "", platform_name)
    return ", ".join(part for part in (processor_name, kernel) if part) or "host not recorded"


def seed_table(rows: list[dict], mains: list[dict], tag: str = "") -> list[str]:
    """Markdown lines of the methods' k-NN top-1 over their seeds (:func:`seed_runs`; ``tag`` the longer
    budget's, e.g. ``"budget45"``, whose other seeds are tagged ``budget45seed<n>``): mean ± sample standard
    deviation, range, and SOP's lead with two standard errors of a difference of two means: one from the two
    methods' own deviations (Welch's), one from the deviation pooled over every method with two seeds or more,
    ``s_p² = Σ (n_m − 1) s_m² / Σ (n_m − 1)``, ``s_p · sqrt(1/n_SOP + 1/n_m)``. With two or three seeds a
    method's own deviation is itself a noisy guess (two seeds that happen to agree give a small one), while
    the training seed's spread is much the same for every method, so the pooled one is the steadier; it also
    gives a standard error where a method has one seed. None where no method has two seeds."""
    runs = {m["method"]: seed_runs(rows, m, rf"{tag}seed\d+") for m in mains if m["method"] in METHODS}
    if max((len(r) for r in runs.values()), default=0) < 2:
        return []
    stats = {}
    for method, group in runs.items():
        top1 = [r["top1"] for r in group]
        stats[method] = (statistics.fmean(top1), statistics.stdev(top1) if len(top1) > 1 else math.nan, len(top1))
    dof = sum(n - 1 for _, _, n in stats.values())
    pooled = math.sqrt(sum((n - 1) * sd**2 for _, sd, n in stats.values() if n > 1) / dof)
    lines = [f"Over seeds (`--seed <n> --tag {tag}seed<n>`, the same recipe and budget; mean ± sample standard "
             "deviation; SOP − method ± the standard error of the difference of the means, from the two methods' "
             f"own deviations and from the deviation pooled over the methods, {pooled:.2f} with {dof} degrees of "
             "freedom):", "",
             "| method | runs (seeds) | k-NN top-1 | range | mean steps | SOP − method | ± own SDs | ± pooled SD |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    sop = stats.get("sop")
    for method in (m for m in METHODS if m in runs):
        (mean, sd, n), group = stats[method], runs[method]
        seeds = ", ".join(str(r.get("seed") or 0) for r in group)
        spread = f" ± {sd:.2f}" if n > 1 else ""
        lead = own = pooled_se = ""
        if sop and method != "sop":
            lead = f"{sop[0] - mean:+.2f}"
            pooled_se = f"{pooled * math.sqrt(1 / sop[2] + 1 / n):.2f}"
            if sop[2] > 1 and n > 1:
                own = f"{math.sqrt(sop[1] ** 2 / sop[2] + sd**2 / n):.2f}"
        steps = sum(r["steps"] for r in group) / n
        span = f"{min(r['top1'] for r in group):.2f}–{max(r['top1'] for r in group):.2f}" if n > 1 else ""
        lines.append(f"| {METHODS[method]} | {n} ({seeds}) | {mean:.2f}{spread} | {span} | {steps:.0f} | {lead} "
                     f"| {own} | {pooled_se} |")  # fmt: skip
    adjusted = host_adjusted(runs)
    if adjusted:
        leads = ", ".join(f"− {METHODS[m]} {adjusted['leads'][m][0]:+.2f} ± {adjusted['leads'][m][1]:.2f}"
                          for m in METHODS if m in adjusted["leads"])  # fmt: skip
        shares = "; ".join(f"{n} on {host}" for host, n in adjusted["shares"].items())
        lines += ["", f"Host-adjusted (the {adjusted['runs']} runs span {adjusted['hosts']} hosts: {shares}; told "
                  "apart by their kernel build and processor: least squares of top-1 = method + host, so each lead "
                  "is measured within hosts; residual deviation "
                  f"{adjusted['sd']:.2f} with {adjusted['dof']} degrees of freedom): SOP {leads}."]  # fmt: skip
    return lines


def budget_tables(rows: list[dict], device: str) -> dict[str, tuple[list[str], list[dict]]]:
    """Markdown lines and rows of ``device``'s runs with a longer budget (tags ``budget<n>``, e.g. ``--budget 45
    --tag budget45``), one table per tag: each method's latest row, its curve as "top-1 (at minutes)"; other
    seeds of the budget (``--seed <s> --tag budget<n>seed<s>``) in a seed table (:func:`seed_table`) under it."""
    tables = {}
    longer = [r for r in rows if re.fullmatch(r"budget\d+", str(r.get("tag"))) and r["method"] in METHODS
              and machine_tag(r["machine"]) == device]  # fmt: skip
    for tag in sorted({r["tag"] for r in longer}, key=lambda t: int(t[len("budget") :])):
        dated = sorted((r for r in longer if r["tag"] == tag), key=lambda r: r.get("date", ""))
        group = {r["method"]: r for r in dated}  # a method's latest row
        best = max(r["top1"] for r in group.values())
        first = next(iter(group.values()))
        budget = (f"{first['budget_minutes']:g} training minutes" if first.get("budget_minutes")
                  else f"{first.get('epochs')} epochs")  # fmt: skip
        seeds = seed_table(rows, list(group.values()), tag)
        runs = "one seed each" if not seeds else "each method's first seed; more seeds below"
        lines = [f"A longer budget (`--tag {tag}`: {budget}, {runs}):", "",
                 "| method | k-NN top-1 | top-5 | steps | images/s | training time | k-NN top-1 during training "
                 "(at minutes) | measured |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for method in (m for m in METHODS if m in group):
            r = group[method]
            top1 = f"**{r['top1']:.2f}**" if r["top1"] == best else f"{r['top1']:.2f}"
            curve = ", ".join(f"{p['top1']:.2f} ({p['train_seconds'] / 60:.0f})" for p in r["curve"][:-1])
            lines.append(f"| {r['name']} | {top1} | {r['top5']:.2f} | {r['steps']} | {r['images_per_second']:.0f} | "
                         f"{r['train_seconds'] / 60:.1f} min | {curve} | {r.get('date', '')} |")  # fmt: skip
        commands = sorted({_command(r) for r in group.values()})
        seeds = [*seeds, ""] if seeds else []
        tables[tag] = ([*lines, "", *seeds, "```bash", *commands, "```", ""], list(group.values()))
    return tables


def report(results: Path = RESULTS, docs: Path = DOCS) -> None:
    """``docs/benchmarks.md`` (quality section) and ``docs/quality_<device>.png`` from the saved results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in sorted(results.glob("quality_*.json"))]
    docs.mkdir(parents=True, exist_ok=True)
    lines = []
    # raw pixels and random init give the same numbers on every machine: they stand in every machine's table
    baselines = {r["name"]: r for r in rows if r["method"] in BASELINES}
    trained = [r for r in rows if r["method"] not in BASELINES and r.get("tag", "main") in REPORTED_TAGS]
    notes = list(dict.fromkeys(_note(r) for r in trained if _note(r)))
    mark = {note: MARKS[i % len(MARKS)] * (1 + i // len(MARKS)) for i, note in enumerate(notes)}

    def label(row: dict) -> str:  # a row's name, with the mark of its earlier recipe
        return row["name"] + (f" {mark[_note(row)]}" if _note(row) else "")

    # a GPU's table first, then the machines with the most rows of the current recipe (the complete tables)
    current = [machine_tag(r["machine"]) for r in trained if r.get("tag", "main") == "main"]
    devices = sorted({machine_tag(r["machine"]) for r in trained},
                     key=lambda d: (not d.startswith("gpu"), -current.count(d), d))  # fmt: skip
    for device in devices:
        group = [r for r in trained if machine_tag(r["machine"]) == device]
        rerun = {r["method"] for r in group if r.get("tag", "main") == "main"}
        group = [r for r in group if r.get("tag", "main") == "main" or r["method"] not in rerun]
        where = next((r for r in group if r.get("tag", "main") == "main"), group[0])["machine"]
        # the processor the rows ran on, never this machine's (rows of 2026-11-24 did not record it)
        named = where.get("processor") or next(
            (r["machine"]["processor"] for r in group if r["machine"].get("processor")), "processor not recorded"
        )
        group += list(baselines.values())
        chip = where["device"] if where["device"] != "cpu" else named
        isa = where.get("cpu_capability", "") + (", AMX" if where.get("cpu_amx") else "")
        isa = f" ({isa})" if isa and where["device"] == "cpu" else ""
        lines += [f"### {device.split('_')[0].upper()}: {chip}{isa}, {where['cpu_count']} cores, "
                  f"torch {where['torch']}, {where['platform']}", ""]  # fmt: skip
        # the runs the tables below show (the rows, their seeds, the longer budgets and theirs): one vector ISA,
        # maybe several hosts; name them, so that the heading (the main rows' host) is not read as every run's
        mains = [r for r in group if r.get("tag", "main") == "main"]
        longer = budget_tables(rows, device)
        shown = [r for r in group if r["method"] in METHODS and r.get("tag", "main") != "main"]
        shown += [s for m in mains if m["method"] in METHODS for s in seed_runs(rows, m)]
        for tag, (_, firsts) in longer.items():
            shown += [s for m in firsts for s in seed_runs(rows, m, rf"{tag}seed\d+")]
        hosts = Counter(host_label(*host_key(r)) for r in shown)
        if len(hosts) > 1:
            where_ran = "; ".join(f"{n} on {h}" for h, n in sorted(hosts.items()))
            lines += [f"The {len(shown)} runs under this heading ran on {len(hosts)} hosts with this vector ISA "
                      f"({where_ran}); the heading names the host of the first table's rows, each seed table's "
                      "Host-adjusted line where its runs ran.", ""]  # fmt: skip
        lines += [
                  "| method | k-NN top-1 | top-5 | student top-1 | steps | images/s | training time | "
                  "wall time (incl. eval) | measured |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        best = max((r["top1"] for r in group if r["method"] not in BASELINES), default=None)
        order = list(BASELINES) + list(METHODS)
        for r in sorted(group, key=lambda r: (order.index(r["method"]), r["name"])):
            if r["method"] in BASELINES:
                lines.append(f"| {r['name']} | {r['top1']:.2f} | {r['top5']:.2f} | | | | | | |")
            else:
                top1 = f"**{r['top1']:.2f}**" if r["top1"] == best else f"{r['top1']:.2f}"
                student = f"{r['student_top1']:.2f}" if r.get("student_top1") is not None else ""
                lines.append(f"| {label(r)} | {top1} | {r['top5']:.2f} | {student} | {r['steps']} | "
                             f"{r['images_per_second']:.0f} | {r['train_seconds'] / 60:.1f} min | "
                             f"{r['wall_seconds'] / 60:.1f} min | {r.get('date', '')} |")  # fmt: skip
        for note in dict.fromkeys(_note(r) for r in group if _note(r)):
            lines += ["", f"{mark[note]} Not yet re-run with the current demo recipe: {note}"]
        seeds = seed_table(rows, mains)
        lines += ["", *seeds] if seeds else []
        commands = sorted({_command(r) for r in mains})
        lines += ["", "Commands:", "", "```bash", *commands, "```", ""] if commands else [""]
        for tag, (table, firsts) in longer.items():  # their curves dashed in the plot
            lines += table
            group += [{**r, "name": f"{r['name']} ({tag})"} for r in firsts]
        # against training time (the budget: each method's step cost counts) and against steps (what a step
        # buys, whatever the host's speed was that day)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, x, xlabel in ((axes[0], "train_seconds", "training time (min)"), (axes[1], "step", "steps")):
            for r in group:
                if r["method"] in BASELINES:
                    ax.axhline(r["top1"], ls="--", lw=0.8, color="gray")
                    ax.text(0.99, r["top1"], r["name"], fontsize=7, va="bottom", ha="right",
                            transform=ax.get_yaxis_transform())  # inside the axes, at the right end  # fmt: skip
                elif r["curve"]:
                    scale = 60 if x == "train_seconds" else 1
                    style = "o-" if r.get("tag", "main") in REPORTED_TAGS else "s--"  # a longer budget: dashed
                    ax.plot([p[x] / scale for p in r["curve"]], [p["top1"] for p in r["curve"]], style,
                            label=label(r), color=f"C{list(METHODS).index(r['method'])}")  # fmt: skip
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("k-NN top-1 (%)")
        if axes[0].get_legend_handles_labels()[0]:  # rows without curves have nothing to name
            axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / f"quality_{device}.png", dpi=120)
        lines += [f"![k-NN top-1 against training time and against steps, {device}](quality_{device}.png)", ""]
        if (docs / f"retrievals_{device}.png").exists():
            lines += ["Nearest training images of test images (teacher features of the SOP run; row: query label and "
                      "how many of the 8 neighbours share it):", "", f"![retrievals](retrievals_{device}.png)", "",
                      "SOPs of the trained [CLS] bank: an anchor and the images of its nearest bank rows "
                      "(`SOP(track_indices=True)`, `show_sops`):", "", f"![SOPs](sops_{device}.png)", ""]  # fmt: skip
    section = "\n".join(lines)
    doc = docs / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    block = f"{start}\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n## Quality at equal wall-clock budget (Fashion-MNIST)\n\n" + block + "\n"
    doc.write_text(text)
    print(section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=[], choices=[*METHODS, *BASELINES])
    parser.add_argument("--budget", type=float, default=20.0, help="training minutes per method")
    parser.add_argument("--points", type=int, default=4, help="k-NN evaluations, the last one at the end (spaced "
                        "by the calibration fit's estimate: one more or less where the run re-plans)")  # fmt: skip
    parser.add_argument("--knn-subset", type=int, default=None, help="quick probes only: k-NN on n/n images")
    parser.add_argument("--set", action="append", default=[], help="LightningCLI override key=value")
    parser.add_argument("--tag", default="main", help="result name suffix; 'main' (and 'previous') are reported")
    parser.add_argument("--seed", type=int, default=0, help="training seed (run-to-run spread: another seed "
                        "with its own --tag, e.g. --seed 1 --tag seed1)")  # fmt: skip
    parser.add_argument("--calibration-steps", type=int, default=30, help="steps timed to plan the budget")
    parser.add_argument("--steps", type=int, default=None, help="probes: plan this many steps instead of a budget")
    parser.add_argument("--epochs", type=float, default=None, help="plan this many epochs instead of a budget in "
                        "minutes (GPU runs: --epochs 100)")  # fmt: skip
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON results go")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="logs and checkpoints")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where --report writes benchmarks.md and the plot")
    parser.add_argument("--launcher", default=None, help="the command that started this run with others (e.g. "
                        "benchmarks/quality_gpu.sh ...), shown in the report instead of the run's own")  # fmt: skip
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar="METHOD", choices=list(METHODS), help="paired test of two "
                        "trained rows of this machine on the same test images (from their checkpoints)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("budget", "epochs", "steps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be > 0, got {value}")
    if args.steps and args.epochs:
        parser.error(f"give --steps or --epochs, not both (got --steps {args.steps} --epochs {args.epochs})")
    global COMMAND
    COMMAND = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.root:
        args.set = [f"data.init_args.root={args.root}", *args.set]
    baselines = [m for m in args.methods if m in BASELINES]
    for row in run_baselines(baselines, args) if baselines else []:
        print(json.dumps({k: row[k] for k in ("name", "top1", "top5")}), "->", save(row, args.results))
    failed = []
    for method in (m for m in args.methods if m in METHODS):
        try:
            result, cli = run_method(method, args)
        except ConfigError as err:  # a bad or misspelt --set: one line and status 2 (the rows before it are saved)
            parser.error(f"--methods {method}: {err}")
        print(json.dumps({k: result[k] for k in ("name", "top1", "top5", "steps", "images_per_second")}),
              "->", save(result, args.results))  # fmt: skip
        if method == "sop" and args.tag == "main":  # the row is saved first: a failed picture loses no training
            try:
                print("pictures ->", *draw_pictures(cli, result["machine"], args.docs))
            except ImportError as err:
                failed.append(f"the SOP pictures were not drawn ({err}); the result row is saved")
                print(f"error: {failed[-1]}", file=sys.stderr)
    if args.compare:
        compare(args.compare, args)
    if args.report:
        report(args.results, args.docs)
    if not args.methods and not args.report and not args.compare:
        parser.error("nothing to do: give --methods, --compare and/or --report")
    if failed:
        sys.exit("quality.py: " + "; ".join(failed))


if __name__ == "__main__":
    main()
