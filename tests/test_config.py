"""TrainConfig as a user writes it: a YAML run file plus flags, strict keys and types, ranges, per-dataset defaults."""

from pathlib import Path

import pytest

from deat.config import TrainConfig, config_from_args, load_yaml, parse_number
from deat.train import get_args_parser


def config_from(argv: list[str]) -> TrainConfig:
    return config_from_args(get_args_parser().parse_args(argv))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- file and flags

def test_yaml_run_file_and_flags_combine_and_flags_win(tmp_path):
    run_file = write_yaml(tmp_path, "method: pgd_at\nlr: 0.05\nepochs: 20\neps: 8/255\nmilestones: [10, 15]\n"
                                    "random_start: false\n")
    cfg = config_from(["--config", str(run_file), "--lr", "0.2", "--batch-size", "64", "--milestones", "12", "16"])

    assert cfg.lr == 0.2 and cfg.batch_size == 64 and cfg.milestones == [12.0, 16.0]  # the flags
    assert cfg.method == "pgd_at" and cfg.epochs == 20 and cfg.eps == 8 / 255 and cfg.random_start is False
    assert cfg.k2 == 0.8 and cfg.seed == 0  # neither given: the dataclass defaults
    assert config_from(["--config", str(run_file), "--random-start"]).random_start is True


def test_flags_alone_and_an_empty_run_file_give_the_defaults(tmp_path):
    assert config_from([]) == TrainConfig()
    assert config_from(["--config", str(write_yaml(tmp_path, ""))]) == TrainConfig()
    assert config_from(["--eps", "8/255", "--no-attack-bn-eval"]) == TrainConfig(eps=8 / 255, attack_bn_eval=False)


def test_unknown_key_is_an_error_naming_it_a_near_miss_and_the_allowed_keys(tmp_path):
    run_file = write_yaml(tmp_path, "learning_rate: 0.1\nlr: 0.1\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown key 'learning_rate'; allowed: .*\blr\b.*pgd_steps"):
        config_from(["--config", str(run_file)])
    with pytest.raises(ValueError, match=r"unknown keys 'batchsize' \(did you mean 'batch_size'\?\), 'epoch' "
                                         r"\(did you mean 'epochs'\?\); allowed: "):
        TrainConfig.from_dict({"epoch": 3, "batchsize": 4})


def test_unknown_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--learning-rate", "0.1"])
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "ten", r"epochs: expected an integer, got 'ten'"),
    ("epochs", 3.0, r"epochs: expected an integer, got 3\.0"),
    ("batch_size", True, r"batch_size: expected an integer, got True"),
    ("lr", "fast", r"lr: expected a number \(or a fraction like 8/255\), got 'fast'"),
    ("lr", [0.1], r"lr: expected a number"),
    ("lr", None, r"lr: null is not allowed"),
    ("random_start", "yes", r"random_start: expected true or false, got 'yes'"),
    ("random_start", 1, r"random_start: expected true or false, got 1"),
    ("milestones", 100, r"milestones: expected a list of numbers, got 100"),
    ("milestones", [100, "late"], r"milestones: expected a number"),
    ("dataset", 10, r"dataset: expected a string, got 10"),
])
def test_wrong_types_are_errors_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({key: value})


def test_yaml_types_are_checked_too(tmp_path):
    run_file = write_yaml(tmp_path, "pgd_steps: 10.5\n")
    with pytest.raises(ValueError, match=r"run\.yaml: pgd_steps: expected an integer, got 10\.5"):
        config_from(["--config", str(run_file)])


def test_nullable_options_accept_null(tmp_path):
    run_file = write_yaml(tmp_path, "eps: null\nmilestones: null\nval_size: null\nout: null\n")
    assert config_from(["--config", str(run_file)]) == TrainConfig()


# ------------------------------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("values,message", [
    ({"lr": 0}, r"lr=0\.0 is invalid; expected a number > 0"),
    ({"lr": -0.1}, r"lr=-0\.1 is invalid; expected a number > 0"),
    ({"k2": 1}, r"k2=1\.0 is invalid; expected 0 <= k2 < 1"),
    ({"k2": -0.1}, r"k2=-0\.1 is invalid"),
    ({"momentum": 1.0}, r"momentum=1\.0 is invalid; expected 0 <= momentum < 1"),
    ({"k1": -1}, r"k1=-1\.0 is invalid; expected a number >= 0"),
    ({"epochs": 0}, r"epochs=0 is invalid; expected an integer >= 1"),
    ({"batch_size": 0}, r"batch_size=0 is invalid"),
    ({"eps": -0.1}, r"eps=-0\.1 is invalid"),
    ({"gamma": 1.5}, r"gamma=1\.5 is invalid; expected 0 < gamma <= 1"),
    ({"epochs": 110, "milestones": [100, 120]},
     r"milestones=\[100\.0, 120\.0\] is invalid; expected strictly increasing epochs within \(0, epochs=110\]"),
    ({"epochs": 10, "milestones": [8, 5]}, r"milestones=\[8\.0, 5\.0\] is invalid"),
    ({"epochs": 10, "milestones": [5, 5]}, r"milestones=\[5\.0, 5\.0\] is invalid"),
    ({"epochs": 10, "milestones": [0, 5]}, r"milestones=\[0\.0, 5\.0\] is invalid"),
    ({"method": "sgd"}, r"method='sgd' is invalid; expected one of \('pgd_at', 'deat', 'trades', 'trades_deat', 'mart', "
                        r"'mart_deat', 'fast_at', 'fast_at_deat'\)"),
    ({"beta": -1}, r"beta=-1\.0 is invalid; expected a number >= 0"),
    ({"fgsm_step_size": -1}, r"fgsm_step_size=-1\.0 is invalid; expected a number >= 0"),
    ({"awp_gamma": -0.1}, r"awp_gamma=-0\.1 is invalid; expected a number >= 0"),
    ({"method": "mart", "awp_gamma": 5e-3},
     r"awp_gamma=0\.005 is invalid; expected 0 for method mart \(AWP is offered for the objectives \('pgd_at', 'trades'\)"),
    ({"method": "fast_at_deat", "awp_gamma": 5e-3}, r"awp_gamma=0\.005 is invalid; expected 0 for method fast_at_deat"),
    ({"method": "trades", "awp_gamma": 5e-3, "cuda_graph": True},
     r"awp_gamma=0\.005 is invalid; expected 0 when cuda_graph is true \(AWP runs eagerly"),
    ({"method": "pgd_at", "awp_gamma": 5e-3, "compile": "default"},
     r"awp_gamma=0\.005 is invalid; expected 0 when compile is not 'none'"),
    ({"arch": "resnet50"}, r"arch='resnet50' is invalid; expected one of \("),
    ({"dataset": "imagenet"}, r"dataset='imagenet' is invalid; expected one of cifar10, cifar100, svhn, cifar10_small, mnist5k"),
    ({"device": "gpu"}, r"device='gpu' is invalid; expected auto, cpu, cuda or cuda:N"),
    ({"compile": "fast"}, r"compile='fast' is invalid; expected one of \('none', 'default'"),
    ({"cuda_graph": True, "compile": "default"}, r"compile='default' is invalid; expected 'none' when cuda_graph"),
])
def test_out_of_range_values_are_errors_naming_the_key_and_the_allowed_range(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_boundary_values_are_accepted():
    cfg = TrainConfig.from_dict({"k2": 0.0, "momentum": 0.0, "k1": 0.0, "eps": 0.0, "pgd_steps": 0, "gamma": 1.0,
                                 "epochs": 10, "milestones": [10], "device": "cuda:1", "dataset": "npz:a.npz"})
    assert cfg.milestones == [10.0] and cfg.device == "cuda:1"


def test_flag_values_are_validated_like_run_file_values():
    with pytest.raises(ValueError, match=r"command line: lr=-1\.0 is invalid"):
        config_from(["--lr", "-1"])


# ------------------------------------------------------------------------------------------------ numbers

@pytest.mark.parametrize("text,expected", [
    ("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.5/2", 0.25), ("0.03", 0.03), ("1e-3", 0.001), ("3", 3.0),
])
def test_parse_number_reads_floats_and_fractions(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", ["8/", "/255", "eight/255", "8/255/2", "", "1/0"])
def test_parse_number_rejects_malformed_numbers_with_a_value_error(text):
    with pytest.raises(ValueError):
        parse_number(text)


def test_fractions_work_in_run_files_and_on_the_command_line(tmp_path):
    run_file = write_yaml(tmp_path, "eps: 8/255\npgd_step_size: '2/255'\n")
    cfg = config_from(["--config", str(run_file)])
    assert (cfg.eps, cfg.pgd_step_size) == (8 / 255, 2 / 255)
    assert config_from(["--eps", "4/255"]).eps == 4 / 255
    with pytest.raises(ValueError, match=r"eps: expected a number \(or a fraction like 8/255\), got '8/0'"):
        TrainConfig.from_dict({"eps": "8/0"})


# ------------------------------------------------------------------------------------ per-dataset defaults

def test_resolved_fills_the_mnist5k_defaults():
    cfg = TrainConfig(dataset="mnist5k", pgd_steps=10, epochs=110).resolved()
    assert cfg.eps == 0.3
    assert cfg.pgd_step_size == pytest.approx(2.5 * 0.3 / 10)
    assert cfg.milestones == [100.0, 105.0]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn", "npz:cifar10_small.npz"])
def test_resolved_fills_the_paper_defaults_for_other_datasets(dataset):
    cfg = TrainConfig(dataset=dataset, pgd_steps=10, epochs=110).resolved()
    assert cfg.eps == 8 / 255
    assert cfg.pgd_step_size == pytest.approx(2 / 255, rel=1e-12)  # the paper: step 2/255 for K = 10
    assert cfg.milestones == [100.0, 105.0]


def test_resolved_scales_milestones_with_epochs_and_step_with_steps():
    cfg = TrainConfig(dataset="cifar10", epochs=22, pgd_steps=5).resolved()
    assert cfg.milestones == pytest.approx([22 * 100 / 110, 22 * 105 / 110]) and cfg.milestones == pytest.approx(
        [20.0, 21.0])
    assert cfg.pgd_step_size == pytest.approx(2.5 * (8 / 255) / 5)
    assert TrainConfig(dataset="cifar10", pgd_steps=0).resolved().pgd_step_size == pytest.approx(2.5 * 8 / 255)


def test_resolved_keeps_explicit_values_and_leaves_the_original_alone():
    explicit = TrainConfig(dataset="mnist5k", eps=0.1, pgd_step_size=0.01, fgsm_step_size=0.2, milestones=[3.0],
                           epochs=5)
    assert explicit.resolved() == explicit
    unresolved = TrainConfig(dataset="cifar10")
    unresolved.resolved()
    assert (unresolved.eps, unresolved.pgd_step_size, unresolved.fgsm_step_size, unresolved.milestones) == (
        None, None, None, None)


def test_resolved_fgsm_step_is_wong_et_al_s_1_25_eps():
    assert TrainConfig(dataset="cifar10", method="fast_at").resolved().fgsm_step_size == pytest.approx(10 / 255)
    assert TrainConfig(dataset="mnist5k", method="fast_at").resolved().fgsm_step_size == pytest.approx(0.375)


# ------------------------------------------------------------------------------------------- bad run files

def test_malformed_yaml_is_an_error_naming_the_file(tmp_path):
    run_file = write_yaml(tmp_path, "lr: [0.1\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"run\.yaml: malformed YAML"):
        config_from(["--config", str(run_file)])


def test_run_file_must_be_a_mapping(tmp_path):
    run_file = write_yaml(tmp_path, "- lr\n- 0.1\n")
    with pytest.raises(ValueError, match=r"run\.yaml: expected a mapping of option: value, got list"):
        load_yaml(run_file)


def test_missing_run_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*absent\.yaml does not exist"):
        config_from(["--config", str(tmp_path / "absent.yaml")])


# --------------------------------------------------------------------------------------- CLI usage errors

def cli_error(capsys, argv: list[str]) -> list[str]:
    """The lines `python -m deat ARGV` prints on stderr when argparse refuses it (exit status 2)."""
    from deat.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_an_unknown_option_shows_the_subcommand_s_usage_and_the_option_it_meant(capsys):
    """Issue 26: `train --datset x` printed the top-level usage, which lists no option of train."""
    lines = cli_error(capsys, ["train", "--datset", "x"])
    assert lines[0].startswith("usage: python -m deat train ") and any("--dataset DATASET" in line for line in lines)
    assert lines[-1] == ("python -m deat train: error: unrecognized arguments: --datset x (did you mean "
                         "'--dataset'?)")
    assert "{train,evaluate,report" not in "\n".join(lines)  # not the top level's usage


def test_evaluate_without_a_source_is_one_line(capsys):
    from deat.__main__ import main

    assert main(["evaluate"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: give exactly one of --run-dir, --checkpoint FILE or --robustbench-model NAME"]


@pytest.mark.parametrize("argv, line", [
    (["train", "--k1", "abc"], "python -m deat train: error: argument --k1: expected a number (or a fraction like "
                               "8/255), got 'abc' (see python -m deat train --help)"),
    (["train", "--epochs", "2.5"], "python -m deat train: error: argument --epochs: expected an integer, got '2.5' "
                                   "(see python -m deat train --help)"),
])
def test_a_bad_value_is_one_line(capsys, argv, line):
    """Issue 26: `train --k1 abc` printed 28 lines of usage above the error."""
    assert cli_error(capsys, argv) == [line]


def test_an_unknown_command_gets_a_did_you_mean(capsys):
    lines = cli_error(capsys, ["trian"])
    assert lines[0].startswith("usage: python -m deat ")
    assert lines[-1].startswith("python -m deat: error: argument command: invalid choice: 'trian'")
    assert lines[-1].endswith("(did you mean 'train'?)")
