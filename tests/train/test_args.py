"""train.py's arguments: a config file under the command line, and a clear error for a key it does not know."""
import hgrn_vision  # noqa: F401
from hgrn_vision.train import trainer
from hgrn_vision.train.args import parse_args, train_parser


def test_unknown_config_key(image_folder, main_fails, tiny, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nwarmup_epoch: 1\n')
    err = main_fails(trainer.main, ['-c', cfg, image_folder, *tiny, '--output', tmp_path / 'out'], tmp_path / 'out')
    assert "Unknown key 'warmup_epoch'" in err and str(cfg) in err and 'warmup_epochs' in err, err


def test_config_file_and_cli_override(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nlr: 0.01\nmodel-kwargs: {depth: 2}\n')
    args = parse_args(train_parser(), ['-c', str(cfg), '--lr', '0.5'])
    assert args.epochs == 3 and args.lr == 0.5 and args.model_kwargs == {'depth': 2}
