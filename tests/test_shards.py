"""Sharded evaluation (issue 25.2): fixed blocks, per-block seeds, shards of whole blocks and their merge.

A sharded evaluation must give the unsharded eval.json (same per-example outcomes, accuracies, worst case and
masking checks), whatever the number of shards; a shard killed mid-way resumes to the same file; an evaluation of
one block (n_examples <= batch_size) gives what the code gave before blocks existed. CPU, small_cnn on mnist5k.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_evaluate import CountingAttack, _pyautoattack_robust, _train_run
from tiny_study import tiny_study

import deat.__main__
from deat import attack_suite, eval_files, evaluate, shards
from deat.data import load_dataset

# 60 examples in 3 blocks of 20; PGD-3 with 2 restarts and APGD-CE, all drawing random starts.
FLAGS = ("--checkpoints", "last", "--eps", "0.1", "--n-examples", "60", "--batch-size", "20", "--pgd-steps", "3",
         "--pgd-restarts", "2", "--autoattack-attacks", "apgd-ce")


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory) -> Path:
    """small_cnn after one epoch of PGD-2 training at eps 0.1: about 40 % clean, a quarter of the examples robust,
    so every attack has survivors to attack in every block."""
    return _train_run(tmp_path_factory.mktemp("robust") / "run", epochs=1, pgd_steps=2, eps=0.1)


def _evaluate(run_dir: Path, *flags: str) -> dict:
    args = evaluate.get_args_parser().parse_args(["--run-dir", str(run_dir), "--device", "cpu", *flags])
    assert evaluate.main(args) == 0
    return json.loads(Path(args.out).read_text())


def _sharded(run: Path, workdir: Path, count: int) -> tuple[dict, list[dict]]:
    """(merged eval.json, shard files) of `count` shards, in a private copy of the run (no shared eval_cache)."""
    run = Path(shutil.copytree(run, workdir / f"run{count}"))
    files = [run / f"shard{i}.json" for i in range(1, count + 1)]
    parts = [_evaluate(run, *FLAGS, "--shard", f"{i}/{count}", "--out", str(f)) for i, f in enumerate(files, 1)]
    merged = _evaluate(run, *FLAGS, "--out", str(run / "eval.json"), "--merge", *map(str, reversed(files)))
    return merged, parts


@pytest.fixture(scope="module")
def evaluations(robust_run, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("sharded")
    whole = _evaluate(Path(shutil.copytree(robust_run, workdir / "run1")), *FLAGS, "--out",
                      str(workdir / "run1" / "eval.json"))
    return {1: (whole, []), 2: _sharded(robust_run, workdir, 2), 3: _sharded(robust_run, workdir, 3)}


def _strip_timings(result: dict) -> dict:
    result = {k: v for k, v in copy.deepcopy(result).items() if k not in ("wall_time_s", "environment", "run_dir")}
    for entry in result["checkpoints"].values():
        del entry["wall_time_s"]
        for attack in (entry.get("autoattack") or {}).values():
            del attack["wall_time_s"]
    return result


# ------------------------------------------------------------------------------------------- the rules

def test_shards_are_whole_contiguous_blocks_and_seeds_are_per_block():
    assert shards.n_blocks(60, 20) == 3 and shards.n_blocks(61, 20) == 4 and shards.n_blocks(20, 500) == 1
    assert shards.split(60, 20, 1) == [(0, 60)]
    assert shards.split(60, 20, 2) == [(0, 20), (20, 60)]  # blocks 0 | 1, 2
    assert shards.split(60, 20, 3) == [(0, 20), (20, 40), (40, 60)]
    assert shards.split(10_000, 500, 4) == [(0, 2500), (2500, 5000), (5000, 7500), (7500, 10_000)]
    assert shards.split(1050, 500, 2) == [(0, 500), (500, 1050)]  # 3 blocks, the last one of 50
    assert shards.shard_examples(60, 20, 2, 3) == (20, 40)
    assert shards.shard_of(20, 60, 60, 20) == (2, 2) and shards.shard_of(0, 20, 60, 20) == (1, 2)
    with pytest.raises(ValueError, match=r"4 shards but 60 examples make only 3 block\(s\) of batch_size 20: use "
                                         r"at most 3 shards, or a batch_size of at most 15"):
        shards.split(60, 20, 4)
    assert shards.parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(ValueError, match=rf"shard='{bad}' is invalid; expected I/N with 1 <= I <= N"):
            shards.parse_shard(bad)
    # Block 0 keeps the attack seed itself; block b > 0 takes 4 bytes of sha256("seed,b").
    assert shards.block_seed(0, 0) == 0 and shards.block_seed(7, 0) == 7
    assert shards.block_seed(0, 1) == int(hashlib.sha256(b"0,1").hexdigest()[:8], 16)
    assert len({shards.block_seed(s, b) for s in range(3) for b in range(50)}) == 150
    assert shards.shard_path("r/eval_ab.json", 0, 500) == Path("r/eval_ab.shard_0-500.json")


def test_every_attack_runs_per_block_on_that_blocks_survivors_with_its_own_seed(evaluations, robust_run):
    # The rule computed by hand with the public attack: robust_mask on each block alone, its generator seeded
    # with block_seed(0, b), matches what evaluate recorded for PGD-10 and PGD-3 x 2.
    model, _ = evaluate.load_run_model(robust_run / "last.pt", "cpu")
    data = load_dataset("mnist5k")
    index = evaluate.select_examples(len(data.test_y), 60, seed=0)
    x, y = data.test_x[index].float() / 255, data.test_y[index]
    entry = evaluations[1][0]["checkpoints"]["last"]
    for steps, restarts, key in ((10, 1, "pgd10_acc"), (3, 2, "pgd_acc")):
        robust = torch.cat([attack_suite.robust_mask(model, x[a:a + 20], y[a:a + 20], 0.1, 0.025, steps,
                                                     restarts=restarts, batch_size=20,
                                                     generator=torch.Generator().manual_seed(
                                                         shards.block_seed(0, a // 20)))
                            for a in (0, 20, 40)])
        assert entry[key] == robust.sum().item() / 60
    assert 0 < entry["aa_acc"] < entry["clean_acc"]  # the attacks had work to do in this test
    assert evaluations[1][0]["settings"]["seeding"] == evaluate.SEEDING  # more than one block: said so


# ------------------------------------------------------------------------------ sharded equals unsharded

def test_one_two_and_three_shards_give_the_unsharded_result(evaluations):
    whole = evaluations[1][0]
    for count in (2, 3):
        merged, parts = evaluations[count]
        assert _strip_timings(merged) == _strip_timings(whole), f"{count} shards"
        assert set(merged) == set(whole)
        assert [s["examples"] for s in merged["environment"]["shards"]] == [p["shard"]["examples"] for p in parts]
        # Each shard file holds its examples' outcomes, at positions of the whole subset.
        start, stop = parts[-1]["shard"]["examples"]
        positions = parts[-1]["checkpoints"]["last"]["robust_positions"]
        assert all(start <= p < stop for p in positions["clean"]) and len(positions["clean"]) > 0
    seconds = evaluations[3][0]["checkpoints"]["last"]["wall_time_s"]["pgd"]
    assert seconds == pytest.approx(sum(p["checkpoints"]["last"]["wall_time_s"]["pgd"] for p in evaluations[3][1]))


def _coin_pgd(model, x, y, eps, alpha, steps, norm, restarts, batch_size, generator, on_batch=None):
    """A stand-in for robust_mask whose outcome is its generator's coin flips: any seed that depended on the
    shard count, or survivors packed across blocks, would change some outcome."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return correct & (torch.rand(len(y), generator=generator) < 0.7)


def _coin_autoattack(model, x, y, attack, eps, norm, batch_size, seed, num_classes=None):
    return torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.7


def test_outcomes_depend_on_each_blocks_seed_alone_whatever_the_shard_count(robust_run, tmp_path, monkeypatch):
    monkeypatch.setattr(attack_suite, "robust_mask", _coin_pgd)
    monkeypatch.setattr(attack_suite, "autoattack_survivors", _coin_autoattack)
    flags = (*FLAGS[:-1], "apgd-ce", "apgd-t")
    whole = _evaluate(Path(shutil.copytree(robust_run, tmp_path / "run1")), *flags, "--out",
                      str(tmp_path / "run1" / "eval.json"))
    for count in (2, 3):
        run = Path(shutil.copytree(robust_run, tmp_path / f"run{count}"))
        files = [str(run / f"shard{i}.json") for i in range(1, count + 1)]
        for i, f in enumerate(files, 1):
            _evaluate(run, *flags, "--shard", f"{i}/{count}", "--out", f)
        merged = _evaluate(run, *flags, "--out", str(run / "eval.json"), "--merge", *files)
        assert _strip_timings(merged) == _strip_timings(whole)
    # The coins decided: each attack broke some examples and left others.
    entry = whole["checkpoints"]["last"]
    assert 0 < entry["pgd10_acc"] < entry["clean_acc"] and 0 < entry["aa_acc"] < entry["pgd10_acc"]


def test_one_block_gives_exactly_the_result_of_the_code_before_blocks(robust_run, tmp_path):
    # n_examples <= batch_size: one block, seeded with the attack seed itself, attacked as one batch: what
    # evaluate did before blocks (one generator for the whole attack, survivors of every batch packed together)
    # computes the same on one batch. The settings keep their keys, so earlier eval files stay up to date.
    result = _evaluate(robust_run, "--checkpoints", "last", "--eps", "0.1", "--n-examples", "40", "--pgd-steps",
                       "3", "--pgd-restarts", "2", "--autoattack-attacks", "apgd-ce", "--out",
                       str(tmp_path / "eval.json"))
    entry, settings = result["checkpoints"]["last"], result["settings"]
    assert "seeding" not in settings and settings["batch_size"] == 500
    model, _ = evaluate.load_run_model(robust_run / "last.pt", "cpu")
    data = load_dataset("mnist5k")
    index = evaluate.select_examples(len(data.test_y), 40, seed=0)
    x, y = data.test_x[index].float() / 255, data.test_y[index]
    seeded = lambda: torch.Generator().manual_seed(attack_suite.ATTACK_SEED)
    pgd10 = attack_suite.robust_mask(model, x, y, 0.1, 0.025, 10, generator=seeded())
    pgd3 = attack_suite.robust_mask(model, x, y, 0.1, 0.025, 3, restarts=2, generator=seeded())
    aa = _pyautoattack_robust(model, x, y, ["apgd-ce"], 0.1, 9)
    assert entry["pgd10_acc"] == pgd10.sum().item() / 40 and entry["pgd_acc"] == pgd3.sum().item() / 40
    assert entry["aa_acc"] == aa.sum().item() / 40
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert entry["worst_case_acc"] == (correct & pgd10 & pgd3 & aa).sum().item() / 40


# ---------------------------------------------------------------------------------------------- resume

def test_a_shard_killed_after_its_first_attacks_resumes_to_the_same_file(evaluations, robust_run, tmp_path,
                                                                          monkeypatch, capsys):
    run = Path(shutil.copytree(robust_run, tmp_path / "run"))
    out = run / "shard2.json"
    # The shard dies in APGD-CE, after clean, PGD-10 and PGD-3 x 2 finished.
    monkeypatch.setattr(attack_suite, "autoattack_survivors", CountingAttack(None, crash_on=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _evaluate(run, *FLAGS, "--shard", "2/3", "--out", str(out))
    partial = json.loads(eval_files.partial_path(out).read_text())
    assert set(partial["checkpoints"]["last"]["wall_time_s"]) == {"clean", "pgd10", "pgd"}
    assert not out.exists()

    monkeypatch.undo()  # the real AutoAttack again; PGD counted from here on
    pgd = CountingAttack(attack_suite.robust_mask)
    monkeypatch.setattr(attack_suite, "robust_mask", pgd)
    resumed = _evaluate(run, *FLAGS, "--shard", "2/3", "--out", str(out))
    assert pgd.calls == 0 and "resuming from" in capsys.readouterr().out
    assert not eval_files.partial_path(out).exists()
    uninterrupted = evaluations[3][1][1]
    assert _strip_timings(resumed) == _strip_timings(uninterrupted)


def test_a_finished_shard_is_found_again_under_another_shard_count_with_the_same_examples(robust_run, tmp_path,
                                                                                         monkeypatch, capsys):
    run = Path(shutil.copytree(robust_run, tmp_path / "run"))
    first = _evaluate(run, *FLAGS, "--shard", "1/3", "--out", str(shards.shard_path(run / "eval.json", 0, 20)))
    assert first["shard"] == {"examples": [0, 20], "blocks": [0, 1]}
    monkeypatch.setattr(attack_suite, "robust_mask", CountingAttack(None, crash_on=1))
    args = evaluate.get_args_parser().parse_args(["--run-dir", str(run), "--device", "cpu", *FLAGS, "--shard", "1/2"])
    assert evaluate.main(args) == 0  # default --out: RUN_DIR/eval.shard_0-20.json, the same examples
    assert "is up to date" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input

def test_bad_shards_and_merges_are_refused_with_one_line_naming_the_problem(evaluations, robust_run, tmp_path,
                                                                             capsys):
    run = Path(shutil.copytree(robust_run, tmp_path / "run"))
    merged_from_three = Path(evaluations[3][0]["run_dir"])
    files = [str(merged_from_three / f"shard{i}.json") for i in (1, 2, 3)]
    code = deat.__main__.main(["evaluate", "--run-dir", str(run), "--device", "cpu", *FLAGS, "--shard", "4/4"])
    error = capsys.readouterr().err
    assert code == 2 and error == ("error: 4 shards but 60 examples make only 3 block(s) of batch_size 20: use at "
                                   "most 3 shards, or a batch_size of at most 15\n")
    cases = [
        (("--shard", "1/2", "--merge", *files), "--shard and --merge exclude each other"),
        (("--merge", files[0], files[2]), (r"shard file .*shard3.json \(examples \[40, 60\)\) leaves examples "
                                           r"\[20, 40\) unevaluated")),
        (("--merge", files[0], files[1]), r"the shards cover examples \[0, 40\) of 60"),
        (("--merge", files[0], files[0], files[1], files[2]), "overlaps the one before"),
        (("--merge", str(tmp_path / "none.json")), "none.json is missing or unreadable"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            _evaluate(run, *FLAGS, "--out", str(run / "eval.json"), *flags)
    # Shards evaluated with other settings are not merged into this evaluation.
    other = [a if a != "0.1" else "0.2" for a in FLAGS]
    with pytest.raises(ValueError, match=r"shard file .*shard1.json was written for other settings than this merge"):
        _evaluate(run, *other, "--out", str(run / "eval.json"), "--merge", *files)
    assert not (run / "eval.json").exists()


# ----------------------------------------------------------------------------------- the real workflow

@pytest.mark.slow
def test_the_workflow_shards_an_evaluation_and_never_reattacks_a_finished_one(tmp_path):
    """Real snakemake: an unsharded study; `shards: 2` then schedules nothing; a deleted evaluation becomes 2 shard
    jobs and a merge whose file equals the unsharded one; `shards: 3` after that schedules nothing; 4 shards of 3
    blocks stop before any job with one line."""
    from test_reruns import scheduled_rules
    from test_workflow import snakemake, write_config

    config = tiny_study(epochs=1)
    config["studies"]["tiny"]["methods"] = ["pgd_at"]
    config["studies"]["tiny"]["eval"].update(n_examples=60, batch_size=20, pgd_steps=3, pgd_restarts=2)
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_file,) = (tmp_path / "results/runs").rglob("eval_*.json")
    unsharded = json.loads(eval_file.read_text())

    def set_shards(count: int) -> None:
        config["studies"]["tiny"]["eval"]["shards"] = count
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    set_shards(2)
    assert scheduled_rules(tmp_path) == set()  # a finished unsharded evaluation: no shard job at all
    eval_file.unlink()
    dry = snakemake(tmp_path, "--cores", "2", "-n")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, flags=re.MULTILINE))
    assert (counts.get("evaluate_shard"), counts.get("evaluate"), counts.get("train")) == ("2", "1", None), dry.stdout
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads(eval_file.read_text())
    assert _strip_timings(merged) == _strip_timings(unsharded)
    assert len(merged["environment"]["shards"]) == 2
    assert not list(eval_file.parent.glob("*.shard_*")), "shard files are temp: deleted once merged"
    logs = sorted(p.name for p in (tmp_path / "results/logs/evaluate").rglob("*.log"))
    assert sum(".shard_" in name for name in logs) == 2
    set_shards(3)
    assert scheduled_rules(tmp_path) == set()  # another shard count re-attacks nothing
    set_shards(1)
    assert scheduled_rules(tmp_path) == set()
    set_shards(4)
    result = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    assert result.returncode != 0
    assert ("config error: studies.tiny.eval.shards: 4 shards but 60 examples make only 3 block(s) of batch_size "
            "20: use at most 3 shards, or a batch_size of at most 15") in result.stdout + result.stderr
